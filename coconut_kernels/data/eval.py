"""Answer extraction and exact-match accuracy, as the official evaluation computes them.

The model's decoded output (prompt included, special tokens skipped) ends in ``### <answer>``; the answer
is the text after the last ``#``, commas removed, stripped, compared verbatim with the record's answer.
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["extract_answer", "extract_cot", "normalize_answer", "is_correct", "exact_match_accuracy"]


def normalize_answer(answer: str) -> str:
    """The reference side of the comparison (commas removed because GSM8k numbers carry them)."""
    return answer.replace(",", "").strip()


def extract_answer(text: str) -> str:
    """The predicted answer in a decoded output: what follows the last ``#``, normalised."""
    return normalize_answer(text.split("#")[-1])


def extract_cot(text: str) -> str:
    """The language reasoning in a decoded output: the lines after the question, up to the first ``#``.
    Compare with ``"\\n".join(record["steps"])`` for the official CoT match."""
    return "\n".join(text.split("\n")[1:]).split("#")[0].strip()


def is_correct(text: str, answer: str) -> bool:
    return extract_answer(text) == normalize_answer(answer)


def exact_match_accuracy(texts: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of decoded outputs whose extracted answer equals the reference answer."""
    if len(texts) != len(answers):
        raise ValueError(f"texts/answers: lengths differ ({len(texts)} vs {len(answers)})")
    if not texts:
        raise ValueError("texts: empty; accuracy of nothing is undefined")
    return sum(is_correct(t, a) for t, a in zip(texts, answers)) / len(texts)

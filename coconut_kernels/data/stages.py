"""Stage-dependent construction of training examples and inference prompts (the COCONUT curriculum).

Follows facebookresearch/coconut's dataset code token for token: a record is tokenized once
(`tokenize_record`), then `build_example` lays out one training sequence for a curriculum stage and
`build_prompt` the matching inference prompt. The collators (`collate.py`) batch the result.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from .eval import normalize_answer
from .tokenizer import Tokenizer

__all__ = [
    "METHODS",
    "IGNORE_INDEX",
    "StageConfig",
    "TokenizedRecord",
    "Example",
    "tokenize_record",
    "tokenize_records",
    "build_example",
    "build_prompt",
]

IGNORE_INDEX = -100

# coconut: latents replace the first k steps. cot / no_cot: stage 0 / no steps at all, no markers.
# no_thoughts: the curriculum drops steps but feeds no latents and, as the official run.py does
# (c_thought = 0 and no_special_marker), no markers either. pause_as_thought: coconut's layout; the model
# layer feeds a learned pause embedding at the latents instead of hidden states.
METHODS = ("coconut", "cot", "no_cot", "no_thoughts", "pause_as_thought")
_MARKED = frozenset({"coconut", "pause_as_thought"})


@dataclass(frozen=True)
class StageConfig:
    """The official curriculum knobs (defaults: the official ProsQA config)."""

    method: str = "coconut"
    c_thought: int = 1  # latent thoughts per replaced reasoning step
    max_latent_stage: int = 6
    pad_latent_to_max: bool = True
    uniform_prob: float = 0.0  # probability of drawing the stage uniformly from 0..len(steps) per example

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        for name in ("c_thought", "max_latent_stage"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
        if self.c_thought == 0 and self.method in _MARKED:
            raise ValueError(f"c_thought: must be >= 1 for method {self.method!r} (use method='no_thoughts')")
        if not isinstance(self.pad_latent_to_max, bool):
            raise ValueError(f"pad_latent_to_max: expected a bool, got {self.pad_latent_to_max!r}")
        if not isinstance(self.uniform_prob, (int, float)) or not 0.0 <= self.uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob: expected a probability in [0, 1], got {self.uniform_prob!r}")

    @property
    def special_markers(self) -> bool:
        """Whether sequences carry ⟨bot⟩ … ⟨eot⟩ (the official ``not no_special_marker``)."""
        return self.method in _MARKED

    @property
    def thoughts_per_step(self) -> int:
        return 0 if self.method == "no_thoughts" else self.c_thought


@dataclass(frozen=True)
class TokenizedRecord:
    """A record tokenized once, as the official ``get_dataset`` does."""

    question: list[int]  # encode(question + "\n", add_special_tokens=True)
    steps: list[list[int]]  # [encode(step + "\n") for each step]
    answer: list[int]  # encode("### " + answer) + [eos]
    answer_text: str  # the record's answer, verbatim
    idx: int  # position of the record in its file

    @property
    def expected_answer(self) -> str:
        """What `eval.extract_answer` of a correct output equals."""
        return normalize_answer(self.answer_text)


@dataclass(frozen=True)
class Example:
    """One sequence. ``labels`` is None for inference prompts; labels are not shifted (the model shifts)."""

    input_ids: list[int]
    labels: list[int] | None
    n_latents: int
    stage: int  # the stage actually used (after a uniform_prob draw)
    idx: int


def tokenize_record(record: dict, tokenizer: Tokenizer, idx: int = 0) -> TokenizedRecord:
    return TokenizedRecord(
        question=tokenizer.encode(record["question"] + "\n", add_special_tokens=True),
        steps=[tokenizer.encode(s + "\n") for s in record["steps"]],
        answer=tokenizer.encode("### " + record["answer"]) + [tokenizer.eos_token_id],
        answer_text=record["answer"],
        idx=idx,
    )


def tokenize_records(records: Sequence[dict], tokenizer: Tokenizer) -> list[TokenizedRecord]:
    return [tokenize_record(r, tokenizer, i) for i, r in enumerate(records)]


def _check_stage(stage) -> None:
    if not isinstance(stage, int) or isinstance(stage, bool) or stage < 0:
        raise ValueError(f"stage: expected an int >= 0, got {stage!r}")


def _markers(config: StageConfig, tokenizer: Tokenizer, n_latents: int) -> list[int]:
    latents = [tokenizer.latent_id] * n_latents
    return [tokenizer.bot_id, *latents, tokenizer.eot_id] if config.special_markers else latents


def build_example(
    record: TokenizedRecord,
    stage: int,
    config: StageConfig,
    tokenizer: Tokenizer,
    rng: random.Random | None = None,
) -> Example:
    """The training sequence of ``record`` at curriculum ``stage``.

    ``question ⟨bot⟩ ⟨latent⟩×n ⟨eot⟩ steps[skip:] "### " answer ⟨eos⟩`` with labels -100 over the
    question, the markers and the latents. At stage k <= max_latent_stage: skip k steps, n = k·c (as the
    official code, also when k exceeds the record's step count: all steps skipped, still k·c latents); past
    max_latent_stage: skip all, n = (max_latent_stage if pad_latent_to_max else
    min(len(steps), max_latent_stage))·c. ``rng`` (required when uniform_prob > 0) draws the mixed stage.
    """
    _check_stage(stage)
    n_steps = len(record.steps)
    if config.method == "cot":
        stage = 0
    elif config.method != "no_cot" and config.uniform_prob > 0:
        if rng is None:
            raise ValueError("rng: a random.Random is required when uniform_prob > 0")
        if rng.random() < config.uniform_prob:
            stage = rng.choice(range(n_steps + 1))

    if config.method == "no_cot":
        n_skip, n_latent_steps = n_steps, 0
    elif stage > config.max_latent_stage:
        n_skip = n_steps
        n_latent_steps = config.max_latent_stage if config.pad_latent_to_max else min(n_steps, config.max_latent_stage)
    else:
        n_skip, n_latent_steps = stage, stage
    n_latents = n_latent_steps * config.thoughts_per_step

    prefix = record.question + _markers(config, tokenizer, n_latents)
    rest = [t for s in record.steps[n_skip:] for t in s] + record.answer
    return Example(
        input_ids=prefix + rest,
        labels=[IGNORE_INDEX] * len(prefix) + rest,
        n_latents=n_latents,
        stage=stage,
        idx=record.idx,
    )


def build_prompt(record: TokenizedRecord, stage: int, config: StageConfig, tokenizer: Tokenizer) -> Example:
    """The inference prompt at ``stage``: ``question ⟨bot⟩ ⟨latent⟩×n ⟨eot⟩`` (markers per method),
    n = min(stage, cap)·c with cap = max_latent_stage if pad_latent_to_max else min(max_latent_stage,
    len(steps)) (the official ``get_question_latent_dataset``); cot/no_cot prompts hold the question only.
    The answer to compare with is ``record.expected_answer``."""
    _check_stage(stage)
    if config.method in ("cot", "no_cot"):
        stage = 0
    cap = config.max_latent_stage if config.pad_latent_to_max else min(config.max_latent_stage, len(record.steps))
    n_latents = min(cap, stage) * config.thoughts_per_step
    return Example(
        input_ids=record.question + _markers(config, tokenizer, n_latents),
        labels=None,
        n_latents=n_latents,
        stage=stage,
        idx=record.idx,
    )

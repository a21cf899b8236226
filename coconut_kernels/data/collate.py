"""Batching of `stages` examples into padded tensors for the model layer.

`AlignedCollator` reproduces the official collator (left padding that puts every example's first latent in
one column, so one compute range serves the batch); `RaggedCollator` pads on the right only, for the
ragged latent engine that tracks each example's latent positions itself.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .stages import IGNORE_INDEX, Example

__all__ = ["AlignedCollator", "RaggedCollator"]


def _fields(ex) -> tuple[list[int], list[int] | None, int | None]:
    if isinstance(ex, Example):
        return ex.input_ids, ex.labels, ex.idx
    if isinstance(ex, Mapping):
        return list(ex["input_ids"]), ex.get("labels"), ex.get("idx")
    raise ValueError(f"examples: expected stages.Example or a mapping with 'input_ids', got {type(ex).__name__}")


class _Collator:
    def __init__(self, pad_token_id: int, latent_id: int, pad_to_multiple_of: int | None = None):
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of: expected None or an int >= 1, got {pad_to_multiple_of!r}")
        self.pad_token_id = pad_token_id
        self.latent_id = latent_id
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def from_tokenizer(cls, tokenizer, pad_to_multiple_of: int | None = None):
        return cls(tokenizer.pad_token_id, tokenizer.latent_id, pad_to_multiple_of)

    def _left_pads(self, ids: list[list[int]]) -> list[int]:
        raise NotImplementedError

    def __call__(self, examples: Sequence) -> dict[str, torch.Tensor]:
        if len(examples) == 0:
            raise ValueError("examples: empty batch")
        fields = [_fields(e) for e in examples]
        ids = [f[0] for f in fields]
        labels = [f[1] for f in fields]
        idx = [f[2] for f in fields]
        has_labels = [lab is not None for lab in labels]
        if any(has_labels) and not all(has_labels):
            raise ValueError("examples: either every example has labels or none does")
        for b, (x, lab) in enumerate(zip(ids, labels)):
            if len(x) == 0:
                raise ValueError(f"examples[{b}]: empty input_ids")
            if lab is not None and len(lab) != len(x):
                raise ValueError(f"examples[{b}]: labels length {len(lab)} != input_ids length {len(x)}")

        left = self._left_pads(ids)
        T = max(n + len(x) for n, x in zip(left, ids))
        m = self.pad_to_multiple_of
        if m is not None:
            T = -(-T // m) * m
        B = len(ids)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((B, T), dtype=torch.int64)
        position_ids = torch.zeros((B, T), dtype=torch.int64)
        out_labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.int64) if has_labels[0] else None
        for b, (n, x) in enumerate(zip(left, ids)):
            L = len(x)
            input_ids[b, n : n + L] = torch.tensor(x, dtype=torch.int64)
            attention_mask[b, n : n + L] = 1
            position_ids[b, n : n + L] = torch.arange(L, dtype=torch.int64)
            if out_labels is not None:
                out_labels[b, n : n + L] = torch.tensor(labels[b], dtype=torch.int64)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if out_labels is not None:
            batch["labels"] = out_labels
        if all(i is not None for i in idx):
            batch["idx"] = torch.tensor(idx, dtype=torch.int64)
        return batch


class AlignedCollator(_Collator):
    """The official collator: left-pad so the first ⟨latent⟩ of every example that has latents sits in one
    column, then right-pad to the batch maximum (rounded up to ``pad_to_multiple_of``)::

        q q q q q q b L L e s s a a -      (q question, b/e markers, L latents, s steps, a answer,
        - - - q q q b L e s s s a a a       - pad; examples without latents get no left padding)

    Returns int64 tensors (B, T): ``input_ids`` (pads = pad_token_id), ``attention_mask`` (1 real, 0 pad;
    int64 like Hugging Face's), ``position_ids`` (0..len-1 over the real tokens, 0 at pads), ``labels``
    (-100 at pads; only when the examples have labels) and ``idx`` (B,) when the examples carry it.
    """

    def _left_pads(self, ids):
        first = [x.index(self.latent_id) if self.latent_id in x else None for x in ids]
        starts = [f for f in first if f is not None]
        if not starts:
            return [0] * len(ids)
        s = max(starts)
        return [0 if f is None else s - f for f in first]


class RaggedCollator(_Collator):
    """Right padding only: each example keeps its latents at their own positions. Same tensors as
    `AlignedCollator`, plus ``latent_counts`` (B,) int64, the number of ⟨latent⟩ tokens per example."""

    def _left_pads(self, ids):
        return [0] * len(ids)

    def __call__(self, examples):
        batch = super().__call__(examples)
        batch["latent_counts"] = (batch["input_ids"] == self.latent_id).sum(dim=1)
        return batch

"""Plain-PyTorch reference of every op: the oracle of the tests and the "torch" backend.

Depends on torch alone. Written for clarity, not speed; computes in the inputs' dtype unless stated.
"""
from __future__ import annotations

import torch


def soft_embedding_reference(
    logits: torch.Tensor,
    weight: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    return_probs: bool = False,
):
    """Σ_i softmax(filtered(logits) / temperature)_i · weight[i] by sort, mask, softmax and matmul.

    The kept set is value-closed: the logits >= the top_k-th largest (top_k = 0: all), then among those the
    logits >= t for the largest t whose set {x >= t} has probability >= top_p (top_p = 1: all). The
    probabilities are computed in logits' dtype and cast to weight's for the matmul; `probs` (on request) is
    returned in at least float32.
    """
    lead, V = logits.shape[:-1], logits.shape[-1]
    x = logits.reshape(-1, V)
    keep = torch.ones_like(x, dtype=torch.bool)
    if 0 < top_k < V:
        keep = x >= x.topk(top_k, dim=-1).values[:, -1:]
    if top_p < 1.0:
        xs = x.masked_fill(~keep, float("-inf")).sort(dim=-1, descending=True).values
        cum = torch.softmax(xs / temperature, dim=-1).cumsum(dim=-1)
        # First sorted position whose cumulative probability reaches top_p; its value is the threshold
        # (all its ties are kept). If rounding keeps cum below top_p to the end, the index lands on a masked
        # -inf entry and nothing more is removed.
        first = (cum < top_p).sum(dim=-1, keepdim=True).clamp(max=V - 1)
        keep = keep & (x >= xs.gather(-1, first))
    probs = torch.softmax((x / temperature).masked_fill(~keep, float("-inf")), dim=-1)
    out = (probs.to(weight.dtype) @ weight).reshape(*lead, weight.shape[-1])
    if return_probs:
        return out, probs.to(torch.promote_types(probs.dtype, torch.float32)).reshape(logits.shape)
    return out

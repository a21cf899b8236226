"""Plain-PyTorch reference of every op: the oracle of the tests and the "torch" backend.

Depends on torch alone. Written for clarity, not speed; computes in the inputs' dtype unless stated.
"""
from __future__ import annotations

import torch


# ---- latent_feedback ---------------------------------------------------------------------------------
def _feedback_rows(hidden, batch_idx, src_pos, norm, weight, bias, eps):
    """f(hidden[batch_idx[i], src_pos[i]]) for every i; the norm runs in fp32 for fp16/bf16 (the op's
    contract), in the input's dtype otherwise."""
    rows = hidden[src_pos.long()] if batch_idx is None else hidden[batch_idx.long(), src_pos.long()]
    if norm == "none":
        return rows
    compute = torch.float32 if rows.dtype in (torch.float16, torch.bfloat16) else rows.dtype
    x = rows.to(compute)
    w = None if weight is None else weight.to(compute)
    b = None if bias is None else bias.to(compute)
    if norm == "layernorm":
        y = torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, eps)
    elif norm == "rmsnorm":
        y = torch.nn.functional.rms_norm(x, (x.shape[-1],), w, eps)
    else:
        raise ValueError(f'norm must be "none", "layernorm" or "rmsnorm", got {norm!r}')
    return y.to(rows.dtype)


def _feedback_index(batch_idx, dst_pos):
    return (dst_pos.long(),) if batch_idx is None else (batch_idx.long(), dst_pos.long())


def latent_feedback_reference(embeds, hidden, batch_idx, dst_pos, src_pos, *, norm="none", weight=None, bias=None,
                              eps=1e-5):
    """Out of place: a copy of embeds with embeds[batch_idx[i], dst_pos[i]] = f(hidden[batch_idx[i], src_pos[i]])
    (packed (rows, d) tensors indexed by the positions when batch_idx is None). Differentiable by autograd."""
    rows = _feedback_rows(hidden, batch_idx, src_pos, norm, weight, bias, eps)
    return embeds.index_put(_feedback_index(batch_idx, dst_pos), rows)


def latent_feedback_reference_(embeds, hidden, batch_idx, dst_pos, src_pos, *, norm="none", weight=None, bias=None,
                               eps=1e-5):
    """In-place twin of latent_feedback_reference (autograd handles the in-place write itself)."""
    rows = _feedback_rows(hidden, batch_idx, src_pos, norm, weight, bias, eps)
    return embeds.index_put_(_feedback_index(batch_idx, dst_pos), rows)

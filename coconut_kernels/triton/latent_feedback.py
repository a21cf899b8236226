"""Triton kernels of latent_feedback_ (forward, in place) and its backward, one program per written row.

Called by coconut_kernels/ops/latent_feedback.py for CUDA tensors when the backend is "triton"; the tests
run them on CPU tensors under TRITON_INTERPRET=1. Arguments are validated by the caller.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_NORMS = {"none": 0, "layernorm": 1, "rmsnorm": 2}


@triton.jit
def _row_indices(BAT, DST, SRC, i, B, T, S, HAS_BATCH: tl.constexpr):
    dst = tl.load(DST + i).to(tl.int64)
    src = tl.load(SRC + i).to(tl.int64)
    if HAS_BATCH:
        b = tl.load(BAT + i).to(tl.int64)
    else:
        b = tl.zeros((), dtype=tl.int64)
    # Bad indices write nothing (they are reported only under COCONUT_DEBUG, which costs a host sync).
    ok = (b >= 0) & (b < B) & (dst >= 0) & (dst < T) & (src >= 0) & (src < S)
    return b, dst, src, ok


@triton.jit
def _normalized(x, m, d, eps, NORM: tl.constexpr):
    """(x - mean) * rstd for LayerNorm (NORM 1), x * rstd for RMSNorm (NORM 2), over the d valid columns."""
    if NORM == 1:
        xc = tl.where(m, x - tl.sum(x, axis=0) / d, 0.0)
    else:
        xc = x
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / d + eps)
    return xc * rstd, rstd


@triton.jit
def _latent_feedback_fwd_kernel(E, H, BAT, DST, SRC, W, BIAS, d, B, T, S, e_bs, e_rs, h_bs, h_rs, eps,
                                HAS_BATCH: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr,
                                HAS_B: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0)
    b, dst, src, ok = _row_indices(BAT, DST, SRC, i, B, T, S, HAS_BATCH)
    cols = tl.arange(0, BLOCK_D)
    m = cols < tl.where(ok, d, 0)  # (cols < d) & ok, in a form the interpreter accepts
    x = tl.load(H + b * h_bs + src * h_rs + cols, mask=m, other=0.0)
    if NORM == 0:
        y = x
    else:
        y, rstd = _normalized(x.to(ACC), m, d, eps, NORM)
        if HAS_W:
            y = y * tl.load(W + cols, mask=m, other=0.0).to(ACC)
        if HAS_B:
            y = y + tl.load(BIAS + cols, mask=m, other=0.0).to(ACC)
    tl.store(E + b * e_bs + dst * e_rs + cols, y.to(E.dtype.element_ty), mask=m)


@triton.jit
def _latent_feedback_bwd_kernel(G, H, BAT, DST, SRC, W, GH, GW, GB, d, B, T, S, g_bs, g_rs, h_bs, h_rs, eps,
                                HAS_BATCH: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr,
                                HAS_B: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0)
    b, dst, src, ok = _row_indices(BAT, DST, SRC, i, B, T, S, HAS_BATCH)
    cols = tl.arange(0, BLOCK_D)
    m = cols < tl.where(ok, d, 0)  # (cols < d) & ok, in a form the interpreter accepts
    dy = tl.load(G + b * g_bs + dst * g_rs + cols, mask=m, other=0.0).to(ACC)
    if NORM == 0:
        dx = dy
    else:
        x = tl.load(H + b * h_bs + src * h_rs + cols, mask=m, other=0.0).to(ACC)
        xhat, rstd = _normalized(x, m, d, eps, NORM)
        # Per-row partial sums, reduced by the launcher in a fixed order: atomics here would make the
        # weight/bias gradients differ from run to run.
        if HAS_W:
            tl.store(GW + i.to(tl.int64) * d + cols, dy * xhat, mask=m)
        if HAS_B:
            tl.store(GB + i.to(tl.int64) * d + cols, dy, mask=m)
        if HAS_W:
            dy = dy * tl.load(W + cols, mask=m, other=0.0).to(ACC)
        c1 = tl.sum(dy * xhat, axis=0) / d
        if NORM == 1:
            dx = rstd * (dy - tl.sum(dy, axis=0) / d - xhat * c1)
        else:
            dx = rstd * (dy - xhat * c1)
    # Several rows may read the same source row: accumulate (GH is a zeroed contiguous accumulator).
    tl.atomic_add(GH + (b * S + src) * d + cols, dx, mask=m)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor, batched: bool):
    return (t.stride(0), t.stride(1)) if batched else (0, t.stride(0))


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def latent_feedback_fwd(embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps) -> None:
    """Writes f(hidden[batch_idx[i], src_pos[i]]) into embeds[batch_idx[i], dst_pos[i]] in place."""
    n = dst_pos.shape[0]
    if n == 0:
        return
    batched = batch_idx is not None
    e, h = _rows(embeds), _rows(hidden)
    d = h.shape[-1]
    B = h.shape[0] if batched else 1
    _latent_feedback_fwd_kernel[(n,)](
        e, h, batch_idx if batched else dst_pos, dst_pos, src_pos,
        weight if weight is not None else h, bias if bias is not None else h,
        d, B, e.shape[-2], h.shape[-2], *_strides(e, batched), *_strides(h, batched), eps,
        HAS_BATCH=batched, NORM=_NORMS[norm], HAS_W=weight is not None, HAS_B=bias is not None,
        ACC=_acc(h.dtype), BLOCK_D=triton.next_power_of_2(d))
    if e is not embeds:
        embeds.copy_(e)


def latent_feedback_bwd(grad_embeds, hidden, batch_idx, dst_pos, src_pos, norm, weight, bias, eps):
    """Returns (grad_hidden in hidden's dtype, grad_weight, grad_bias in fp32 (fp64 for double), 0-element
    when the norm has no such parameter), as coconut::latent_feedback_backward does."""
    batched = batch_idx is not None
    g, h = _rows(grad_embeds), _rows(hidden)
    d = h.shape[-1]
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    gh = torch.zeros(h.shape, dtype=acc, device=h.device)
    n = dst_pos.shape[0]
    # (n, d) partials of the weight/bias gradients (rows with bad indices keep their zeros), summed below.
    gw = torch.zeros((n, d) if weight is not None else (0, 0), dtype=acc, device=h.device)
    gb = torch.zeros((n, d) if bias is not None else (0, 0), dtype=acc, device=h.device)
    if n > 0:
        B = h.shape[0] if batched else 1
        _latent_feedback_bwd_kernel[(n,)](
            g, h, batch_idx if batched else dst_pos, dst_pos, src_pos, weight if weight is not None else h,
            gh, gw if weight is not None else gh, gb if bias is not None else gh,
            d, B, g.shape[-2], h.shape[-2], *_strides(g, batched), *_strides(h, batched), eps,
            HAS_BATCH=batched, NORM=_NORMS[norm], HAS_W=weight is not None, HAS_B=bias is not None,
            ACC=_acc(h.dtype), BLOCK_D=triton.next_power_of_2(d))
    return (gh.to(h.dtype), gw.sum(0) if weight is not None else gw.new_zeros(0),
            gb.sum(0) if bias is not None else gb.new_zeros(0))

"""Triton kernels of soft_embedding (the GPU implementation; there is no CUDA C++ one): a per-row statistics
kernel (filter threshold and log-normaliser), then forward and backward GEMM kernels that recompute the
probabilities tile by tile from the logits, so no (N, V) probability tensor is ever written.

The top-k and top-p thresholds are found without sorting (tl.sort / tl.topk are not in every Triton): logits are
mapped to int32 keys with the same order, and a 32-step bisection over the key range finds the largest key t with
count(x >= t) >= top_k, then the largest t with mass(x >= t) >= top_p * mass(kept by top-k). Each step is one
pass over the row (which stays in L2), so a row costs about 64 passes when both filters are on. The masses are
summed across blocks in float64: a nucleus of thousands of tokens would otherwise be off by about one token.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# A tl.constexpr global: the compiler rejects plain module globals read inside @triton.jit (the interpreter
# does not), so a plain int here would fail only on a real GPU.
_INT32_MAX: tl.constexpr = tl.constexpr(2147483647)


@triton.jit
def _order_key(x):
    # IEEE floats of one sign order like their bit patterns; flipping the magnitude bits of negatives makes
    # the int32 order equal the float order over all values.
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def _key_to_float(k):
    b = tl.where(k >= 0, k, k ^ 0x7FFFFFFF).to(tl.int32)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _stats_kernel(
    logits_ptr, thr_ptr, lse_ptr, V, stride_l, inv_t, top_k, top_p,
    HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_l
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    kmin = tl.full((), _INT32_MAX, tl.int32)
    for v0 in range(0, V, BLOCK_V):
        mask = v0 + offs < V
        x = tl.load(base + v0 + offs, mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.maximum(m, tl.max(x, 0))
        kmin = tl.minimum(kmin, tl.min(tl.where(mask, _order_key(x), _INT32_MAX), 0))
    lo = kmin.to(tl.int64)
    if HAS_TOPK:
        # Largest key t with count(key >= t) >= top_k: the top_k-th largest logit.
        hi = _order_key(m).to(tl.int64)
        for _ in range(32):
            mid = lo + (hi - lo + 1) // 2
            cnt = tl.zeros((), tl.int32)
            for v0 in range(0, V, BLOCK_V):
                mask = v0 + offs < V
                x = tl.load(base + v0 + offs, mask=mask, other=float("-inf")).to(tl.float32)
                cnt += tl.sum((mask & (_order_key(x) >= mid)).to(tl.int32), 0)
            ok = cnt >= top_k
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
    if HAS_TOPP:
        # Largest key t with mass(key >= t) >= top_p * mass(key >= lo): the smallest value-closed nucleus.
        z = tl.zeros((), tl.float64)
        for v0 in range(0, V, BLOCK_V):
            mask = v0 + offs < V
            x = tl.load(base + v0 + offs, mask=mask, other=float("-inf")).to(tl.float32)
            z += tl.sum(tl.where(mask & (_order_key(x) >= lo), tl.exp((x - m) * inv_t), 0.0), 0).to(tl.float64)
        target = top_p * z
        hi = _order_key(m).to(tl.int64)
        for _ in range(32):
            mid = lo + (hi - lo + 1) // 2
            mass = tl.zeros((), tl.float64)
            for v0 in range(0, V, BLOCK_V):
                mask = v0 + offs < V
                x = tl.load(base + v0 + offs, mask=mask, other=float("-inf")).to(tl.float32)
                mass += tl.sum(tl.where(mask & (_order_key(x) >= mid), tl.exp((x - m) * inv_t), 0.0), 0).to(tl.float64)
            ok = mass >= target
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
    thr = _key_to_float(lo)
    if not (HAS_TOPK or HAS_TOPP):
        thr = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float64)
    for v0 in range(0, V, BLOCK_V):
        mask = v0 + offs < V
        x = tl.load(base + v0 + offs, mask=mask, other=float("-inf")).to(tl.float32)
        s += tl.sum(tl.where(mask & (x >= thr), tl.exp((x - m) * inv_t), 0.0), 0).to(tl.float64)
    tl.store(thr_ptr + row, thr)
    tl.store(lse_ptr + row, m * inv_t + tl.log(s.to(tl.float32)))


@triton.jit
def _probs_tile(logits_ptr, stride_l, rows, row_mask, vo, v_mask, thr, lse, inv_t):
    x = tl.load(logits_ptr + rows[:, None] * stride_l + vo[None, :], mask=row_mask[:, None] & v_mask[None, :],
                other=float("-inf")).to(tl.float32)
    keep = row_mask[:, None] & v_mask[None, :] & (x >= thr[:, None])
    return tl.where(keep, tl.exp(x * inv_t - lse[:, None]), 0.0), keep


@triton.jit
def _fwd_kernel(
    logits_ptr, weight_ptr, thr_ptr, lse_ptr, out_ptr, N, V, D, stride_l, stride_w, stride_o, inv_t,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask, col_mask = rows < N, cols < D
    thr = tl.load(thr_ptr + rows, mask=row_mask, other=float("inf"))
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        vo = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        v_mask = vo < V
        p, keep = _probs_tile(logits_ptr, stride_l, rows, row_mask, vo, v_mask, thr, lse, inv_t)
        # Embedding rows no row of the block keeps are not read (the top-k case reads ~K rows per tile).
        used = tl.max(keep.to(tl.int32), 0) > 0
        w = tl.load(weight_ptr + vo[:, None] * stride_w + cols[None, :], mask=used[:, None] & col_mask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.dot(p, w, input_precision="ieee")
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _grad_tile(go_ptr, weight_ptr, rows, row_mask, vo, v_mask, D, stride_g, stride_w,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    # g[n, i] = grad_out[n] . weight[i] for the tile.
    g = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        go = tl.load(go_ptr + rows[:, None] * stride_g + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                     other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + vo[:, None] * stride_w + cols[None, :], mask=v_mask[:, None] & col_mask[None, :],
                    other=0.0).to(tl.float32)
        g += tl.dot(go, tl.trans(w), input_precision="ieee")
    return g


@triton.jit
def _bwd_logits_kernel(
    go_ptr, logits_ptr, weight_ptr, thr_ptr, lse_ptr, gl_ptr, N, V, D, stride_g, stride_l, stride_w, stride_gl,
    inv_t, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grad_logits = p (g - s) / T with s = sum_i p_i g_i: a first sweep for s, a second that writes (g is
    # recomputed rather than stored, so a bf16 grad_logits never holds an intermediate).
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    thr = tl.load(thr_ptr + rows, mask=row_mask, other=float("inf"))
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    s = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        vo = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        v_mask = vo < V
        p, keep = _probs_tile(logits_ptr, stride_l, rows, row_mask, vo, v_mask, thr, lse, inv_t)
        g = _grad_tile(go_ptr, weight_ptr, rows, row_mask, vo, v_mask, D, stride_g, stride_w, BLOCK_N, BLOCK_V,
                       BLOCK_D)
        s += tl.sum(p * g, 1)
    for v0 in range(0, V, BLOCK_V):
        vo = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        v_mask = vo < V
        p, keep = _probs_tile(logits_ptr, stride_l, rows, row_mask, vo, v_mask, thr, lse, inv_t)
        g = _grad_tile(go_ptr, weight_ptr, rows, row_mask, vo, v_mask, D, stride_g, stride_w, BLOCK_N, BLOCK_V,
                       BLOCK_D)
        gl = p * (g - s[:, None]) * inv_t
        tl.store(gl_ptr + rows[:, None] * stride_gl + vo[None, :], gl.to(gl_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & v_mask[None, :])


@triton.jit
def _bwd_weight_kernel(
    go_ptr, logits_ptr, thr_ptr, lse_ptr, gw_ptr, N, V, D, stride_g, stride_l, stride_gw, inv_t,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grad_weight[i] = sum_n p[n, i] grad_out[n]; every element is written (zero where no row keeps i).
    vo = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    v_mask, col_mask = vo < V, cols < D
    acc = tl.zeros((BLOCK_V, BLOCK_D), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_mask = rows < N
        thr = tl.load(thr_ptr + rows, mask=row_mask, other=float("inf"))
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        p, keep = _probs_tile(logits_ptr, stride_l, rows, row_mask, vo, v_mask, thr, lse, inv_t)
        go = tl.load(go_ptr + rows[:, None] * stride_g + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.dot(tl.trans(p), go, input_precision="ieee")
    tl.store(gw_ptr + vo[:, None] * stride_gw + cols[None, :], acc.to(gw_ptr.dtype.element_ty),
             mask=v_mask[:, None] & col_mask[None, :])


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def soft_embedding_fwd(logits: torch.Tensor, weight: torch.Tensor, temperature: float, top_k: int, top_p: float):
    """Triton forward of torch.ops.coconut.soft_embedding_fwd: (out, threshold, lse), threshold/lse fp32.

    logits (N, V) and weight (V, d) in fp32/fp16/bf16; arguments are validated by the caller."""
    logits, weight = logits.contiguous(), weight.contiguous()
    N, V = logits.shape
    D = weight.shape[1]
    thr = torch.empty(N, device=logits.device, dtype=torch.float32)
    lse = torch.empty(N, device=logits.device, dtype=torch.float32)
    out = torch.empty(N, D, device=logits.device, dtype=weight.dtype)
    if N == 0:
        return out, thr, lse
    inv_t = 1.0 / temperature
    _stats_kernel[(N,)](
        logits, thr, lse, V, logits.stride(0), inv_t, top_k, top_p,
        HAS_TOPK=0 < top_k < V, HAS_TOPP=top_p < 1.0, BLOCK_V=_block(V, 16, 2048),
    )
    if D == 0:
        return out, thr, lse
    BLOCK_N, BLOCK_V, BLOCK_D = _block(N, 16, 64), _block(V, 16, 64), _block(D, 16, 64)
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(D, BLOCK_D))
    _fwd_kernel[grid](
        logits, weight, thr, lse, out, N, V, D, logits.stride(0), weight.stride(0), out.stride(0), inv_t,
        BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D,
    )
    return out, thr, lse


def soft_embedding_bwd(grad_out, logits, weight, threshold, lse, temperature: float, output_mask):
    """Triton backward of torch.ops.coconut.soft_embedding_bwd: (grad_logits, grad_weight)."""
    grad_out, logits, weight = grad_out.contiguous(), logits.contiguous(), weight.contiguous()
    threshold, lse = threshold.contiguous(), lse.contiguous()
    N, V = logits.shape
    D = weight.shape[1]
    inv_t = 1.0 / temperature
    BLOCK_N, BLOCK_V, BLOCK_D = _block(N, 16, 32), _block(V, 16, 64), _block(D, 16, 64)
    grad_logits = logits.new_empty(logits.shape) if output_mask[0] else logits.new_empty(0)
    grad_weight = weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty(0)
    if output_mask[0] and N > 0:
        _bwd_logits_kernel[(triton.cdiv(N, BLOCK_N),)](
            grad_out, logits, weight, threshold, lse, grad_logits, N, V, D, grad_out.stride(0), logits.stride(0),
            weight.stride(0), grad_logits.stride(0), inv_t, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D,
        )
    if output_mask[1] and D > 0:
        _bwd_weight_kernel[(triton.cdiv(V, BLOCK_V), triton.cdiv(D, BLOCK_D))](
            grad_out, logits, threshold, lse, grad_weight, N, V, D, grad_out.stride(0), logits.stride(0),
            grad_weight.stride(0), inv_t, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D,
        )
    return grad_logits, grad_weight

"""Triton kernels of soft_embedding (the GPU implementation; there is no CUDA C++ one): out = softmax(filtered
logits / T) . weight, computed like flash-attention over the vocabulary. The forward is one streaming pass: each
program owns a tile of rows x output columns and a slice of the vocabulary, keeps an online max and sum, and
accumulates p . weight with tensor-core dots for fp16/bf16 weights (fp32 accumulation; fp32 weights keep
IEEE fp32 products: the op's fp32 tolerance, 1e-5, is below tf32's ~1e-3); slices of the vocabulary are merged
by a combine kernel, so the grid fills the GPU even for a few rows. No (N, V) probability tensor is written;
the backward recomputes p from the logits and the saved log-normaliser.

With a filter, a per-row kernel first finds the threshold (kept = logits >= threshold, value-closed). For
top_k <= 256 it is one pass that keeps each row's largest logits sorted (tl.topk / tl.sort, where the installed
Triton has tl.topk), plus one pass for the mass when top_p is on. Otherwise (larger top_k, top_p alone) logits
are mapped to int32 keys with the same order, and a 32-step bisection over the key range finds the largest key
t with count(x >= t) >= top_k, then the largest t with mass(x >= t) >= top_p * mass(kept by top-k); each step is
one pass over the row (which stays in L2). The masses are summed across blocks in float64: a nucleus of
thousands of tokens would otherwise be off by about one token.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import H100_SMS, interpreted, sm_count

LOG2E = 1.4426950408889634

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
def _threshold_kernel(
    logits_ptr, thr_ptr, V, stride_l, inv_t, top_k, top_p,
    HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr, SMALL_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Launched only with a filter on; the log-normaliser comes from the streaming pass.
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_l
    offs = tl.arange(0, BLOCK_V)
    if SMALL_K > 0:
        # top_k <= SMALL_K: one pass keeps the row's SMALL_K largest logits, sorted. Each block's top SMALL_K,
        # reversed, against the running list: the elementwise max of a descending and an ascending sorted list
        # is the larger half of their union, sorted again.
        idx = tl.arange(0, SMALL_K)
        best = tl.full((SMALL_K,), float("-inf"), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            x = tl.load(base + v0 + offs, mask=v0 + offs < V, other=float("-inf")).to(tl.float32)
            best = tl.sort(tl.maximum(best, tl.flip(tl.topk(x, SMALL_K), 0)), descending=True)
        kth = tl.max(tl.where(idx == top_k - 1, best, float("-inf")), 0)
        thr = kth
        if HAS_TOPP:
            # The kept mass z = mass(x >= kth) takes one more pass (ties of kth may lie past the list); the
            # nucleus threshold is the first listed value whose cumulative mass reaches top_p * z, as in the
            # reference's sorted cumsum (kth when rounding keeps the sum short of it).
            m = tl.max(best, 0)
            z = tl.zeros((), tl.float64)
            for v0 in range(0, V, BLOCK_V):
                mask = v0 + offs < V
                x = tl.load(base + v0 + offs, mask=mask, other=float("-inf")).to(tl.float32)
                z += tl.sum(tl.where(mask & (x >= kth), tl.exp((x - m) * inv_t), 0.0), 0).to(tl.float64)
            cum = tl.cumsum(tl.where(best >= kth, tl.exp((best - m) * inv_t), 0.0), 0).to(tl.float64)
            first = tl.sum((cum < top_p * z).to(tl.int32), 0)
            thr = tl.maximum(tl.max(tl.where(idx == first, best, float("-inf")), 0), kth)
    else:
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
                    mass += tl.sum(tl.where(mask & (_order_key(x) >= mid), tl.exp((x - m) * inv_t), 0.0),
                                   0).to(tl.float64)
                ok = mass >= target
                lo = tl.where(ok, mid, lo)
                hi = tl.where(ok, hi, mid - 1)
        thr = _key_to_float(lo)
    tl.store(thr_ptr + row, thr)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    # INTERPRET: Triton 3.9's interpreter multiplies bf16 operands as their uint16 bit patterns; fp32 copies of
    # fp16/bf16 values are exact, and their fp32 products are what the tensor cores accumulate, so the
    # interpreter computes what the compiled kernel does.
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _rounded(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x (fp32) in `dtype` (p for a half GEMM: rounded once, as the reference's probs.to(weight.dtype)), to
    nearest even as the compiled cast does. INTERPRET: Triton 3.9's interpreter truncates fp32 -> bf16 (up to one
    ulp off), so the rounding is done on the bits first."""
    if INTERPRET and dtype == tl.bfloat16:
        b = x.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        x = b.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _tile_pid(n_row_blocks, n_d_blocks, GROUP_N: tl.constexpr):
    """(row block, column block, vocabulary split) of this program in a 1-D grid. Programs are grouped by
    GROUP_N row blocks x every column block: neighbours share logits tiles (same rows) and weight tiles (same
    columns), so both are read about once from memory when N is large (GEMM-style swizzle)."""
    pid = tl.program_id(0)
    per_split = n_row_blocks * n_d_blocks
    split = pid // per_split
    pid = pid % per_split
    per_group = GROUP_N * n_d_blocks
    first = (pid // per_group) * GROUP_N
    rows_here = tl.minimum(n_row_blocks - first, GROUP_N)
    return first + (pid % per_group) % rows_here, (pid % per_group) // rows_here, split


@triton.jit
def _probs_tile(logits_ptr, stride_l, rows, row_mask, vo, v_mask, thr, lse, inv_t):
    # p = exp(x / T - lse) on the kept entries (x >= thr), 0 elsewhere: the backward's recomputation.
    x = tl.load(logits_ptr + rows[:, None] * stride_l + vo[None, :], mask=row_mask[:, None] & v_mask[None, :],
                other=float("-inf")).to(tl.float32)
    keep = row_mask[:, None] & v_mask[None, :] & (x >= thr[:, None])
    return tl.where(keep, tl.exp(x * inv_t - lse[:, None]), 0.0), keep


@triton.jit
def _fwd_kernel(
    logits_ptr, weight_ptr, thr_ptr, out_ptr, lse_ptr, part_acc_ptr, part_ml_ptr,
    N, V, D, stride_l, stride_w, stride_o, scale_log2, v_per_split,
    HAS_FILTER: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One pass over the vocabulary slice [v_lo, v_hi) of this program with an online max m and sum l (base 2):
    # acc = sum_i 2^(s_i - m) w_i, rescaled when m grows. SPLIT: the slice is one of several, its (m, l, acc)
    # go to the partial buffers for _combine_kernel; otherwise out = acc / l and lse are written here.
    n_row_blocks = tl.cdiv(N, BLOCK_N)
    # d = 0 still runs one (masked) column block: the log-normaliser is written all the same.
    pid_n, pid_d, split = _tile_pid(n_row_blocks, tl.maximum(tl.cdiv(D, BLOCK_D), 1), GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask, col_mask = rows < N, cols < D
    if HAS_FILTER:
        thr = tl.load(thr_ptr + rows, mask=row_mask, other=float("inf"))
    else:
        thr = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    m = tl.full((BLOCK_N,), -1.0e30, tl.float32)
    l = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    v_lo = split * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        vo = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        v_mask = vo < v_hi
        x = tl.load(logits_ptr + rows[:, None] * stride_l + vo[None, :], mask=row_mask[:, None] & v_mask[None, :],
                    other=float("-inf")).to(tl.float32)
        keep = row_mask[:, None] & v_mask[None, :] & (x >= thr[:, None])
        # Embedding rows no row of the block keeps are not read: with top-k most tiles are skipped whole.
        used = tl.max(keep.to(tl.int32), 0) > 0
        if tl.max(used.to(tl.int32), 0) > 0:
            s = tl.where(keep, x * scale_log2, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            w = tl.load(weight_ptr + vo[:, None] * stride_w + cols[None, :], mask=used[:, None] & col_mask[None, :],
                        other=0.0)
            acc = acc * alpha[:, None] + _dot(_rounded(p, w.dtype, INTERPRET), w, PRECISION, INTERPRET)
            m = m_new
    if SPLIT:
        part = split * N + rows
        tl.store(part_acc_ptr + part[:, None] * D + cols[None, :], acc, mask=row_mask[:, None] & col_mask[None, :])
        if pid_d == 0:
            tl.store(part_ml_ptr + 2 * part, m, mask=row_mask)
            tl.store(part_ml_ptr + 2 * part + 1, l, mask=row_mask)
    else:
        # l = 0 only for a row whose logits are all -inf: NaN, as torch.softmax gives.
        l = tl.where(row_mask, l, 1.0)
        tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :],
                 _rounded(acc / l[:, None], out_ptr.dtype.element_ty, INTERPRET),
                 mask=row_mask[:, None] & col_mask[None, :])
        if pid_d == 0:
            tl.store(lse_ptr + rows, (m + tl.log2(l)) / 1.4426950408889634, mask=row_mask)


@triton.jit
def _combine_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr, lse_ptr, N, D, stride_o, num_splits,
    INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Merges the vocabulary slices: M = max_s m_s, l = sum_s l_s 2^(m_s - M), out = sum_s acc_s 2^(m_s - M) / l.
    n_d_blocks = tl.maximum(tl.cdiv(D, BLOCK_D), 1)
    pid_n = tl.program_id(0) // n_d_blocks
    pid_d = tl.program_id(0) % n_d_blocks
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < N
    mask = row_mask[:, None] & (cols < D)[None, :]
    m = tl.full((BLOCK_N,), -1.0e30, tl.float32)
    for s in range(0, num_splits):
        m = tl.maximum(m, tl.load(part_ml_ptr + 2 * (s * N + rows), mask=row_mask, other=-1.0e30))
    l = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for s in range(0, num_splits):
        part = s * N + rows
        w = tl.exp2(tl.load(part_ml_ptr + 2 * part, mask=row_mask, other=-1.0e30) - m)
        l += w * tl.load(part_ml_ptr + 2 * part + 1, mask=row_mask, other=0.0)
        acc += w[:, None] * tl.load(part_acc_ptr + part[:, None] * D + cols[None, :], mask=mask, other=0.0)
    l = tl.where(row_mask, l, 1.0)  # padded rows (a row of -inf logits keeps l = 0: NaN, as torch.softmax)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :],
             _rounded(acc / l[:, None], out_ptr.dtype.element_ty, INTERPRET), mask=mask)
    if pid_d == 0:
        tl.store(lse_ptr + rows, (m + tl.log2(l)) / 1.4426950408889634, mask=row_mask)


@triton.jit
def _bwd_logits_kernel(
    go_ptr, logits_ptr, weight_ptr, thr_ptr, lse_ptr, dot_ptr, gl_ptr, N, V, D, stride_g, stride_l, stride_w,
    stride_gl, inv_t, PRECISION: tl.constexpr, INTERPRET: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grad_logits = p (g - s) / T for one (rows, vocabulary) tile, g = grad_out . weight_i (tensor-core dots
    # over d for half inputs) and s = grad_out . out, precomputed per row (dot_ptr). Tiles no row keeps are
    # zeros without reading the weight.
    pid_n, pid_v, _ = _tile_pid(tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    vo = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    row_mask, v_mask = rows < N, vo < V
    thr = tl.load(thr_ptr + rows, mask=row_mask, other=float("inf"))
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    p, keep = _probs_tile(logits_ptr, stride_l, rows, row_mask, vo, v_mask, thr, lse, inv_t)
    used = tl.max(keep.to(tl.int32), 0) > 0
    g = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    if tl.max(used.to(tl.int32), 0) > 0:
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            go = tl.load(go_ptr + rows[:, None] * stride_g + cols[None, :],
                         mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            w = tl.load(weight_ptr + vo[:, None] * stride_w + cols[None, :], mask=used[:, None] & col_mask[None, :],
                        other=0.0)
            g += _dot(go.to(w.dtype), tl.trans(w), PRECISION, INTERPRET)
    s = tl.load(dot_ptr + rows, mask=row_mask, other=0.0)
    gl = p * (g - s[:, None]) * inv_t
    tl.store(gl_ptr + rows[:, None] * stride_gl + vo[None, :], _rounded(gl, gl_ptr.dtype.element_ty, INTERPRET),
             mask=row_mask[:, None] & v_mask[None, :])


@triton.jit
def _bwd_weight_kernel(
    go_ptr, logits_ptr, thr_ptr, lse_ptr, gw_ptr, N, V, D, stride_g, stride_l, stride_gw, inv_t,
    PRECISION: tl.constexpr, INTERPRET: tl.constexpr, GROUP_N: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grad_weight[i] = sum_n p[n, i] grad_out[n]; every element is written (zero where no row keeps i).
    pid_v, pid_d, _ = _tile_pid(tl.cdiv(V, BLOCK_V), tl.cdiv(D, BLOCK_D), GROUP_N)
    vo = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    v_mask, col_mask = vo < V, cols < D
    acc = tl.zeros((BLOCK_V, BLOCK_D), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_mask = rows < N
        thr = tl.load(thr_ptr + rows, mask=row_mask, other=float("inf"))
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        p, keep = _probs_tile(logits_ptr, stride_l, rows, row_mask, vo, v_mask, thr, lse, inv_t)
        if tl.max(tl.max(keep.to(tl.int32), 1), 0) > 0:
            go = tl.load(go_ptr + rows[:, None] * stride_g + cols[None, :],
                         mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            acc += _dot(_rounded(tl.trans(p), go.dtype, INTERPRET), go, PRECISION, INTERPRET)
    tl.store(gw_ptr + vo[:, None] * stride_gw + cols[None, :], _rounded(acc, gw_ptr.dtype.element_ty, INTERPRET),
             mask=v_mask[:, None] & col_mask[None, :])


# ---- launchers ----------------------------------------------------------------------------------------

# The forward splits the vocabulary until its grid fills about two waves (two programs per SM), with at least
# _MIN_V_PER_SPLIT entries per slice (fewer would cost more in partial writes and the combine than the
# parallelism gains).
_MIN_V_PER_SPLIT = 512
_GROUP_N = 8
# Largest top_k found in one pass (a sorted list of this many logits per row); larger ones bisect.
_MAX_SMALL_K = 256


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _precision(dtype: torch.dtype) -> str:
    # fp32 weights keep IEEE fp32 products (tf32 would miss the fp32 tolerance); fp16/bf16 dots run on tensor
    # cores with fp32 accumulation whatever this says.
    return "ieee" if dtype == torch.float32 else "tf32"


def _small_k(top_k: int) -> int:
    """Length of the threshold kernel's sorted list of largest logits for this top_k (a power of two), or 0 for
    the bisection: top_k past _MAX_SMALL_K, or a Triton without tl.topk."""
    if not hasattr(tl, "topk") or top_k > _MAX_SMALL_K:
        return 0
    return max(16, triton.next_power_of_2(top_k))


def _tiles(N: int, D: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_D, num_warps) of the GEMM kernels: MMA-sized row blocks, 64-wide vocabulary and
    column tiles; fp32 (FMA products, no tensor cores) halves the row and vocabulary tiles: at 16 x 64 x 64 its
    forward needs 255 registers and spills ~200 bytes (sm_80 and sm_90), at 16 x 32 x 64 about 95 and none.
    64-row tiles (many rows) take 8 warps: with 4 the fp16 forward spilled 24 bytes on sm_80."""
    half = dtype != torch.float32
    block_n = _block(N, 16, 64 if half else 32)
    return block_n, 64 if half else 32, _block(D, 16, 64), 8 if block_n == 64 else 4


def num_vocab_splits(programs: int, V: int, block_v: int, sms: int = H100_SMS) -> int:
    """Slices of the vocabulary for a forward grid of `programs` (row blocks x column blocks)."""
    want = triton.cdiv(2 * sms, max(programs, 1))
    return max(1, min(want, V // _MIN_V_PER_SPLIT, triton.cdiv(V, block_v)))


def _forward(logits, weight, thr, has_filter: bool, inv_t: float, out_dtype, num_splits=None):
    """(out, lse) of the streaming pass (and its combine when the vocabulary is split)."""
    N, V = logits.shape
    D = weight.shape[1]
    out = torch.empty(N, D, device=logits.device, dtype=out_dtype)
    lse = torch.empty(N, device=logits.device, dtype=torch.float32)
    BLOCK_N, BLOCK_V, BLOCK_D, num_warps = _tiles(N, D, weight.dtype)
    programs = triton.cdiv(N, BLOCK_N) * max(1, triton.cdiv(D, BLOCK_D))
    if num_splits is None:
        num_splits = num_vocab_splits(programs, V, BLOCK_V, sm_count(logits.device))
    # Whole vocabulary tiles per slice; the count is recomputed so that no slice is empty.
    v_per_split = triton.cdiv(triton.cdiv(V, num_splits), BLOCK_V) * BLOCK_V
    num_splits = triton.cdiv(V, v_per_split)
    split = num_splits > 1
    part_acc = torch.empty(num_splits * N * D if split else 1, device=logits.device, dtype=torch.float32)
    part_ml = torch.empty(num_splits * N * 2 if split else 1, device=logits.device, dtype=torch.float32)
    _fwd_kernel[(programs * num_splits,)](
        logits, weight, thr, out, lse, part_acc, part_ml, N, V, D, logits.stride(0), weight.stride(0),
        out.stride(0), inv_t * LOG2E, v_per_split, HAS_FILTER=has_filter, SPLIT=split,
        PRECISION=_precision(weight.dtype), INTERPRET=interpreted(), GROUP_N=_GROUP_N, BLOCK_N=BLOCK_N,
        BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, num_warps=num_warps,
    )
    if split:
        cn, cd = 16, _block(D, 16, 128)
        _combine_kernel[(triton.cdiv(N, cn) * max(1, triton.cdiv(D, cd)),)](
            part_acc, part_ml, out, lse, N, D, out.stride(0), num_splits, INTERPRET=interpreted(), BLOCK_N=cn,
            BLOCK_D=cd,
        )
    return out, lse


def soft_embedding_fwd(logits: torch.Tensor, weight: torch.Tensor, temperature: float, top_k: int, top_p: float,
                       *, num_splits=None):
    """Triton forward of torch.ops.coconut.soft_embedding_fwd: (out, threshold, lse), threshold/lse fp32.

    logits (N, V) and weight (V, d) in fp32/fp16/bf16; arguments are validated by the caller. num_splits: slices
    of the vocabulary (None: chosen to fill the GPU; tests force it)."""
    logits, weight = logits.contiguous(), weight.contiguous()
    N, V = logits.shape
    D = weight.shape[1]
    inv_t = 1.0 / temperature
    has_topk, has_topp = 0 < top_k < V, top_p < 1.0
    if has_topk or has_topp:
        thr = torch.empty(N, device=logits.device, dtype=torch.float32)
        if N > 0:
            _threshold_kernel[(N,)](
                logits, thr, V, logits.stride(0), inv_t, top_k, top_p,
                HAS_TOPK=has_topk, HAS_TOPP=has_topp, SMALL_K=_small_k(top_k) if has_topk else 0,
                BLOCK_V=_block(V, 16, 2048),
            )
    else:
        thr = torch.full((N,), float("-inf"), device=logits.device, dtype=torch.float32)
    if N == 0:
        return torch.empty(0, D, device=logits.device, dtype=weight.dtype), thr, thr.clone()
    out, lse = _forward(logits, weight, thr, has_topk or has_topp, inv_t, weight.dtype, num_splits)
    return out, thr, lse


def soft_embedding_bwd(grad_out, logits, weight, threshold, lse, temperature: float, output_mask):
    """Triton backward of torch.ops.coconut.soft_embedding_bwd: (grad_logits, grad_weight)."""
    grad_out, logits, weight = grad_out.contiguous(), logits.contiguous(), weight.contiguous()
    threshold, lse = threshold.contiguous(), lse.contiguous()
    N, V = logits.shape
    D = weight.shape[1]
    inv_t = 1.0 / temperature
    BLOCK_N, BLOCK_V, BLOCK_D, num_warps = _tiles(N, D, weight.dtype)
    precision = _precision(weight.dtype)
    grad_logits = logits.new_empty(logits.shape) if output_mask[0] else logits.new_empty(0)
    grad_weight = weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty(0)
    if output_mask[0] and N > 0:
        # s[n] = sum_i p_i g_i = grad_out[n] . out[n]: out is recomputed in fp32 by the forward's streaming
        # pass (one GEMM, the same grid), so the logits kernel needs one sweep, not two.
        out32, _ = _forward(logits, weight, threshold, True, inv_t, torch.float32)
        dots = (grad_out.float() * out32).sum(1)
        _bwd_logits_kernel[(triton.cdiv(N, BLOCK_N) * triton.cdiv(V, BLOCK_V),)](
            grad_out, logits, weight, threshold, lse, dots, grad_logits, N, V, D, grad_out.stride(0),
            logits.stride(0), weight.stride(0), grad_logits.stride(0), inv_t, PRECISION=precision,
            INTERPRET=interpreted(), GROUP_N=_GROUP_N, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D,
            num_warps=num_warps,
        )
    if output_mask[1] and D > 0:
        _bwd_weight_kernel[(triton.cdiv(V, BLOCK_V) * triton.cdiv(D, BLOCK_D),)](
            grad_out, logits, threshold, lse, grad_weight, N, V, D, grad_out.stride(0), logits.stride(0),
            grad_weight.stride(0), inv_t, PRECISION=precision, INTERPRET=interpreted(), GROUP_N=_GROUP_N,
            BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, num_warps=num_warps,
        )
    return grad_logits, grad_weight

"""Triton kernels of `latent_attention`: KV-cache append (rotary on the way in), the flash-attention forward
over a growing cache, and its backward (dK/dV per key block, dQ per query block).

The op entry point (coconut_kernels/ops/latent_attention.py) calls the three launchers for CUDA tensors when
the backend is "triton"; their signatures are the op schemas of csrc/ops.cpp. Tests run them on CPU tensors
under TRITON_INTERPRET=1. Lengths are read from device tensors inside the kernels: no host sync.

Query heads of one GQA group share a program: its rows are the (t, g) pairs of one kv head, so every K/V
tile is loaded once per group (this is what makes Sq=1 decode efficient).

Attention dropout (DROPOUT): the keep mask of element (b, h, t, j) comes from tl.randint(seed, offset) at
offset ((b * Hq + h) * Sq + t) * Tmax + j (csrc/dropout.h states the rule every backend follows), so the
backward kernels regenerate the forward's mask; lse stays the undropped softmax's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import H100_SMS, sm_count

LOG2E = 1.4426950408889634


@triton.jit
def _load_rotated(row_ptr, offs_d, mask, pos, Cos, Sin, stride_ro,
                  ROT_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr):
    """Load a (rows, BLOCK_D) tile as fp32 and rotate its first ROT_DIM dims by the angles of `pos` (rows,).

    The rotation x' = x * cos + sign * partner(x) * sin reads the partner element from memory, so no
    register shuffles are needed; INVERSE rotates by the opposite angle (the transpose, for gradients)."""
    x = tl.load(row_ptr + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    if ROT_DIM > 0:
        HALF: tl.constexpr = ROT_DIM // 2
        if INTERLEAVED:
            partner = offs_d ^ 1
            freq = offs_d // 2
            sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
        else:
            partner = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
            freq = tl.where(offs_d < HALF, offs_d, offs_d - HALF)
            sign = tl.where(offs_d < HALF, -1.0, 1.0)
        rmask = mask & (offs_d < ROT_DIM)[None, :]
        xp = tl.load(row_ptr + partner[None, :], mask=rmask, other=0.0).to(tl.float32)
        cs_off = pos[:, None] * stride_ro + freq[None, :]
        c = tl.load(Cos + cs_off, mask=rmask, other=1.0).to(tl.float32)
        s = tl.load(Sin + cs_off, mask=rmask, other=0.0).to(tl.float32)
        if INVERSE:
            s = -s
        x = x * c + sign[None, :] * xp * s
    return x


@triton.jit
def _split_pid(rows, BLOCK: tl.constexpr):
    """(block index along `rows`, outer index as int64) of this program. The grid is 1-D (axis 0 allows 2^31 - 1
    programs, axes 1 and 2 only 65,535: B * Hkv passes that at B=2048 with 32 kv heads); the blocks of one outer
    index are adjacent, so they run together and share its K/V in L2."""
    n_blocks = tl.cdiv(rows, BLOCK)
    pid = tl.program_id(0)
    return pid % n_blocks, (pid // n_blocks).to(tl.int64)


@triton.jit
def _seq_lengths(CacheSeqlens, CacheLeftpad, NewSeqlens, b, Sq,
                 HAS_LEFTPAD: tl.constexpr, HAS_NEW_SEQLENS: tl.constexpr):
    """(cache length, left padding, number of valid new rows) of sequence b, as int32 scalars."""
    cs = tl.load(CacheSeqlens + b).to(tl.int32)
    if HAS_LEFTPAD:
        lp = tl.load(CacheLeftpad + b).to(tl.int32)
    else:
        lp = cs * 0
    if HAS_NEW_SEQLENS:
        n_valid = tl.minimum(tl.maximum(tl.load(NewSeqlens + b).to(tl.int32), 0), Sq)
    else:
        n_valid = cs * 0 + Sq
    return cs, lp, n_valid


@triton.jit
def _key_end(pid_m, cs, lp, n_valid, Tmax, GROUP: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """End of the key range [lp, end) of query block pid_m: its last valid row bounds the causal range; a block
    with no valid row gets an empty range."""
    t_last = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, n_valid - 1)
    if CAUSAL:
        hi = cs + t_last + 1
    else:
        hi = cs + n_valid
    hi = tl.minimum(hi, Tmax)
    return tl.where(t_last >= pid_m * BLOCK_M // GROUP, hi, lp)


@triton.jit
def _keep_factor(seed, b, hq, t, offs_n, Hq, Sq, Tmax, threshold, keep_scale):
    """(rows, BLOCK_N) factors of the probabilities: keep_scale where the element is kept, else 0."""
    offs = ((b * Hq + hq[:, None]) * Sq + t[:, None]) * Tmax + offs_n[None, :]
    r = tl.randint(seed, offs.to(tl.int64))
    return tl.where((r >> 8).to(tl.int32) >= threshold, keep_scale, 0.0)


@triton.jit
def _kv_block(k_base, v_base, start, hi, offs_d, d_ok, stride_kt, stride_vt, BLOCK_N: tl.constexpr):
    """Cache rows [start, start + BLOCK_N) below hi of K and V (zeros elsewhere), with their row indices."""
    offs_n = start + tl.arange(0, BLOCK_N).to(tl.int64)
    n_ok = (offs_n < hi) & (offs_n >= 0)
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    return offs_n, n_ok, k, v


@triton.jit
def _append_kernel(K, V, KNew, VNew, CacheSeqlens, CacheLeftpad, NewSeqlens, Cos, Sin,
                   stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                   stride_knb, stride_knt, stride_knh, stride_vnb, stride_vnt, stride_vnh,
                   stride_ro, seqlen_ro, Sq, H, Tmax, D,
                   HAS_LEFTPAD: tl.constexpr, HAS_NEW_SEQLENS: tl.constexpr, ROT_DIM: tl.constexpr,
                   INTERLEAVED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # Rows are the (t, h) pairs of one sequence; the grid is 1-D (see _split_pid).
    pid_m, b = _split_pid(Sq * H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    cs, lp, n_valid = _seq_lengths(CacheSeqlens, CacheLeftpad, NewSeqlens, b, Sq, HAS_LEFTPAD, HAS_NEW_SEQLENS)
    t = (offs_m // H).to(tl.int64)
    h = offs_m % H
    row = cs + t
    # Rows past Tmax are skipped, never written (validation of the lengths happens on the host).
    ok = (t < n_valid) & (row < Tmax) & (row >= 0)
    mask = ok[:, None] & (offs_d < D)[None, :]
    pos = tl.minimum(tl.maximum(row - lp, 0), seqlen_ro - 1)
    k = _load_rotated(KNew + b * stride_knb + t[:, None] * stride_knt + h[:, None] * stride_knh, offs_d, mask,
                      pos, Cos, Sin, stride_ro, ROT_DIM, INTERLEAVED, False)
    v = tl.load(VNew + b * stride_vnb + t[:, None] * stride_vnt + h[:, None] * stride_vnh + offs_d[None, :],
                mask=mask)
    tl.store(K + b * stride_kb + row[:, None] * stride_kt + h[:, None] * stride_kh + offs_d[None, :],
             k.to(K.dtype.element_ty), mask=mask)
    tl.store(V + b * stride_vb + row[:, None] * stride_vt + h[:, None] * stride_vh + offs_d[None, :], v, mask=mask)


@triton.jit(do_not_specialize=["dropout_seed"])
def _fwd_kernel(Q, K, V, Out, Lse, PartAcc, PartML, CacheSeqlens, CacheLeftpad, NewSeqlens, Cos, Sin,
                stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
                stride_ro, seqlen_ro, B, Sq, Hq, Hkv, Tmax, D, qk_scale_log2, num_splits, dropout_seed,
                drop_threshold, keep_scale,
                GROUP: tl.constexpr, HAS_LEFTPAD: tl.constexpr, HAS_NEW_SEQLENS: tl.constexpr,
                ROT_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, CAUSAL: tl.constexpr, SPLIT: tl.constexpr,
                DROPOUT: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # SPLIT (flash-decoding): the key range of each query block is cut into num_splits chunks, one program
    # each; a program writes its unnormalised (m, l, acc) to PartML / PartAcc and _fwd_combine_kernel merges
    # them. Without it one program covers the whole range and writes out and lse itself.
    pid_m, outer = _split_pid(Sq * GROUP, BLOCK_M)
    if SPLIT:
        split = outer % num_splits
        bh = outer // num_splits
    else:
        split = 0
        bh = outer
    b = bh // Hkv
    hkv = bh % Hkv
    cs, lp, n_valid = _seq_lengths(CacheSeqlens, CacheLeftpad, NewSeqlens, b, Sq, HAS_LEFTPAD, HAS_NEW_SEQLENS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    t = (offs_m // GROUP).to(tl.int64)
    hq = hkv * GROUP + offs_m % GROUP
    in_q = t < Sq
    row_ok = t < n_valid
    d_ok = offs_d < D
    q_pos = cs + t
    q = _load_rotated(Q + b * stride_qb + t[:, None] * stride_qt + hq[:, None] * stride_qh, offs_d,
                      in_q[:, None] & d_ok[None, :], tl.minimum(tl.maximum(q_pos - lp, 0), seqlen_ro - 1),
                      Cos, Sin, stride_ro, ROT_DIM, INTERLEAVED, False)
    q = q.to(K.dtype.element_ty)

    lo = lp
    hi = _key_end(pid_m, cs, lp, n_valid, Tmax, GROUP, CAUSAL, BLOCK_M)
    if SPLIT:
        # Equal chunks of whole key blocks over the actual range (read on the device: no host sync); the last
        # splits of a short range are empty and report l = 0.
        per = tl.cdiv(tl.cdiv(tl.maximum(hi - lp, 0), num_splits), BLOCK_N) * BLOCK_N
        lo = tl.minimum(lp + split * per, hi)
        hi = tl.minimum(lo + per, hi)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    for start in range(lo, hi, BLOCK_N):
        offs_n, n_ok, k, v = _kv_block(k_base, v_base, start, hi, offs_d, d_ok, stride_kt, stride_vt, BLOCK_N)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale_log2
        ok = row_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = p * _keep_factor(dropout_seed, b, hq, t, offs_n, Hq, Sq, Tmax, drop_threshold, keep_scale)
        acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty), v, input_precision=PRECISION)
        m_i = m_new

    row = (b * Hq + hq) * Sq + t  # the (b, head, t) index of lse and of the partials
    if SPLIT:
        n_rows = B * Hq * Sq
        part = split * n_rows + row
        tl.store(PartML + 2 * part, m_i, mask=in_q)
        tl.store(PartML + 2 * part + 1, l_i, mask=in_q)
        tl.store(PartAcc + part[:, None] * D + offs_d[None, :], acc, mask=in_q[:, None] & d_ok[None, :])
    else:
        has_keys = l_i > 0.0
        out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
        lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) / 1.4426950408889634,
                       float("-inf"))
        tl.store(Out + b * stride_ob + t[:, None] * stride_ot + hq[:, None] * stride_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=in_q[:, None] & d_ok[None, :])
        tl.store(Lse + row, lse, mask=in_q)


@triton.jit
def _fwd_combine_kernel(PartAcc, PartML, Out, Lse, stride_ob, stride_ot, stride_oh, n_rows, Sq, Hq, D, num_splits,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # Merges the num_splits partial softmaxes of BLOCK_R (b, head, t) rows: with M the largest partial max,
    # l = sum_s l_s 2^(m_s - M) and out = sum_s acc_s 2^(m_s - M) / l (fp32 throughout).
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = r < n_rows
    mask = r_ok[:, None] & (offs_d < D)[None, :]
    m = tl.full([BLOCK_R], -1.0e30, tl.float32)
    for s in range(0, num_splits):
        m = tl.maximum(m, tl.load(PartML + 2 * (s * n_rows + r), mask=r_ok, other=-1.0e30))
    l_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s in range(0, num_splits):
        part = s * n_rows + r
        w = tl.exp2(tl.load(PartML + 2 * part, mask=r_ok, other=-1.0e30) - m)
        l_sum += w * tl.load(PartML + 2 * part + 1, mask=r_ok, other=0.0)
        acc += w[:, None] * tl.load(PartAcc + part[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    has_keys = l_sum > 0.0
    out = acc / tl.where(has_keys, l_sum, 1.0)[:, None]
    lse = tl.where(has_keys, (m + tl.log2(tl.where(has_keys, l_sum, 1.0))) / 1.4426950408889634, float("-inf"))
    t = r % Sq
    bh = r // Sq
    b = bh // Hq
    h = bh % Hq
    tl.store(Out + b[:, None] * stride_ob + t[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=mask)
    tl.store(Lse + r, lse, mask=r_ok)


@triton.jit
def _bwd_delta_kernel(DO, O, Delta, stride_dob, stride_dot, stride_doh, stride_ob, stride_ot, stride_oh,
                      Sq, Hq, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # delta[b, h, t] = rowsum(dO * O): the softmax-backward term shared by the two gradient kernels.
    pid_m, b = _split_pid(Sq * Hq, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    t = (offs_m // Hq).to(tl.int64)
    h = offs_m % Hq
    mask = (t < Sq)[:, None] & (offs_d < D)[None, :]
    do = tl.load(DO + b * stride_dob + t[:, None] * stride_dot + h[:, None] * stride_doh + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    o = tl.load(O + b * stride_ob + t[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + (b * Hq + h) * Sq + t, tl.sum(do * o, 1), mask=t < Sq)


@triton.jit(do_not_specialize=["dropout_seed"])
def _bwd_dkdv_kernel(Q, K, V, DO, Lse, Delta, GK, GV, CacheSeqlens, CacheLeftpad, NewSeqlens, Cos, Sin,
                     stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                     stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                     stride_gkb, stride_gkt, stride_gkh, stride_gvb, stride_gvt, stride_gvh,
                     stride_ro, seqlen_ro, Sq, Hq, Hkv, Tmax, D, sm_scale, dropout_seed, drop_threshold, keep_scale,
                     GROUP: tl.constexpr, HAS_LEFTPAD: tl.constexpr, HAS_NEW_SEQLENS: tl.constexpr,
                     ROT_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    # One program owns one key block of one (b, kv head) and sums over every query row and query head of
    # the group, so it adds into the fp32 accumulators without atomics.
    pid_n, bh = _split_pid(Tmax, BLOCK_N)
    n0 = pid_n * BLOCK_N
    b = bh // Hkv
    hkv = bh % Hkv
    cs, lp, n_valid = _seq_lengths(CacheSeqlens, CacheLeftpad, NewSeqlens, b, Sq, HAS_LEFTPAD, HAS_NEW_SEQLENS)
    hi = tl.minimum(cs + n_valid, Tmax)
    if (n0 < hi) & (n0 + BLOCK_N > lp):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        n_ok = (offs_n >= lp) & (offs_n < hi)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * stride_kb + offs_n[:, None] * stride_kt + hkv * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + b * stride_vb + offs_n[:, None] * stride_vt + hkv * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        m_lo = 0
        if CAUSAL:
            # Query row t sees key n0 only when cs + t >= n0.
            m_lo = tl.maximum(n0 - cs, 0) * GROUP
        m_hi = n_valid * GROUP
        for start in range(m_lo, m_hi, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            t = (offs_m // GROUP).to(tl.int64)
            hq = hkv * GROUP + offs_m % GROUP
            row_ok = offs_m < m_hi
            q_mask = row_ok[:, None] & d_ok[None, :]
            q_pos = cs + t
            q = _load_rotated(Q + b * stride_qb + t[:, None] * stride_qt + hq[:, None] * stride_qh, offs_d,
                              q_mask, tl.minimum(tl.maximum(q_pos - lp, 0), seqlen_ro - 1),
                              Cos, Sin, stride_ro, ROT_DIM, INTERLEAVED, False).to(K.dtype.element_ty)
            do = tl.load(DO + b * stride_dob + t[:, None] * stride_dot + hq[:, None] * stride_doh + offs_d[None, :],
                         mask=q_mask, other=0.0)
            lse = tl.load(Lse + (b * Hq + hq) * Sq + t, mask=row_ok, other=0.0)
            delta = tl.load(Delta + (b * Hq + hq) * Sq + t, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
            ok = row_ok[:, None] & n_ok[None, :]
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= q_pos[:, None])
            p = tl.where(ok, tl.exp(s - tl.where(row_ok, lse, 0.0)[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v).to(DO.dtype.element_ty), input_precision=PRECISION)
            if DROPOUT:  # dV takes the dropped P; dS = P (mask * dP - delta)
                f = _keep_factor(dropout_seed, b, hq, t, offs_n, Hq, Sq, Tmax, drop_threshold, keep_scale)
                dv += tl.dot(tl.trans((p * f).to(DO.dtype.element_ty)), do, input_precision=PRECISION)
                ds = p * (dp * f - delta[:, None])
            else:
                dv += tl.dot(tl.trans(p.to(DO.dtype.element_ty)), do, input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(K.dtype.element_ty)), q, input_precision=PRECISION)
        gk_ptr = GK + b * stride_gkb + offs_n[:, None] * stride_gkt + hkv * stride_gkh + offs_d[None, :]
        gv_ptr = GV + b * stride_gvb + offs_n[:, None] * stride_gvt + hkv * stride_gvh + offs_d[None, :]
        tl.store(gk_ptr, tl.load(gk_ptr, mask=kv_mask) + dk * sm_scale, mask=kv_mask)
        tl.store(gv_ptr, tl.load(gv_ptr, mask=kv_mask) + dv, mask=kv_mask)


@triton.jit(do_not_specialize=["dropout_seed"])
def _bwd_dq_kernel(Q, K, V, DO, Lse, Delta, DQ, CacheSeqlens, CacheLeftpad, NewSeqlens, Cos, Sin,
                   stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                   stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                   stride_dqb, stride_dqt, stride_dqh,
                   stride_ro, seqlen_ro, Sq, Hq, Hkv, Tmax, D, sm_scale, dropout_seed, drop_threshold, keep_scale,
                   GROUP: tl.constexpr, HAS_LEFTPAD: tl.constexpr, HAS_NEW_SEQLENS: tl.constexpr,
                   ROT_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # dq of the rotated q; with rotary the launcher rotates it back (_unrotate_kernel) afterwards.
    pid_m, bh = _split_pid(Sq * GROUP, BLOCK_M)
    b = bh // Hkv
    hkv = bh % Hkv
    cs, lp, n_valid = _seq_lengths(CacheSeqlens, CacheLeftpad, NewSeqlens, b, Sq, HAS_LEFTPAD, HAS_NEW_SEQLENS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    t = (offs_m // GROUP).to(tl.int64)
    hq = hkv * GROUP + offs_m % GROUP
    in_q = t < Sq
    row_ok = t < n_valid
    d_ok = offs_d < D
    q_pos = cs + t
    q_mask = in_q[:, None] & d_ok[None, :]
    q = _load_rotated(Q + b * stride_qb + t[:, None] * stride_qt + hq[:, None] * stride_qh, offs_d, q_mask,
                      tl.minimum(tl.maximum(q_pos - lp, 0), seqlen_ro - 1),
                      Cos, Sin, stride_ro, ROT_DIM, INTERLEAVED, False).to(K.dtype.element_ty)
    do = tl.load(DO + b * stride_dob + t[:, None] * stride_dot + hq[:, None] * stride_doh + offs_d[None, :],
                 mask=q_mask, other=0.0)
    lse = tl.where(row_ok, tl.load(Lse + (b * Hq + hq) * Sq + t, mask=row_ok, other=0.0), 0.0)
    delta = tl.load(Delta + (b * Hq + hq) * Sq + t, mask=row_ok, other=0.0)

    hi = _key_end(pid_m, cs, lp, n_valid, Tmax, GROUP, CAUSAL, BLOCK_M)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    for start in range(lp, hi, BLOCK_N):
        offs_n, n_ok, k, v = _kv_block(k_base, v_base, start, hi, offs_d, d_ok, stride_kt, stride_vt, BLOCK_N)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
        ok = row_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= q_pos[:, None])
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v).to(DO.dtype.element_ty), input_precision=PRECISION)
        if DROPOUT:
            dp = dp * _keep_factor(dropout_seed, b, hq, t, offs_n, Hq, Sq, Tmax, drop_threshold, keep_scale)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(K.dtype.element_ty), k, input_precision=PRECISION)
    tl.store(DQ + b * stride_dqb + t[:, None] * stride_dqt + hq[:, None] * stride_dqh + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _unrotate_kernel(X, Y, CacheSeqlens, CacheLeftpad, Cos, Sin,
                     stride_xb, stride_xt, stride_xh, stride_yb, stride_yt, stride_yh,
                     stride_ro, seqlen_ro, Sq, H, D,
                     HAS_LEFTPAD: tl.constexpr, ROT_DIM: tl.constexpr, INTERLEAVED: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # Gradient w.r.t. the un-rotated q: the transpose of the rotation is the rotation by minus the angle.
    pid_m, b = _split_pid(Sq * H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    cs, lp, n_valid = _seq_lengths(CacheSeqlens, CacheLeftpad, CacheSeqlens, b, Sq, HAS_LEFTPAD, False)
    t = (offs_m // H).to(tl.int64)
    h = offs_m % H
    mask = (t < Sq)[:, None] & (offs_d < D)[None, :]
    pos = tl.minimum(tl.maximum(cs + t - lp, 0), seqlen_ro - 1)
    x = _load_rotated(X + b * stride_xb + t[:, None] * stride_xt + h[:, None] * stride_xh, offs_d, mask, pos,
                      Cos, Sin, stride_ro, ROT_DIM, INTERLEAVED, True)
    tl.store(Y + b * stride_yb + t[:, None] * stride_yt + h[:, None] * stride_yh + offs_d[None, :],
             x.to(Y.dtype.element_ty), mask=mask)


# ---- launchers ----------------------------------------------------------------------------------------


def _rotary_args(rotary_cos, rotary_sin, D, like):
    """(cos, sin, row stride, table length, rotary_dim); rotary_dim 0 means no rotation."""
    if rotary_cos is None:
        return like, like, 0, 1, 0
    rot_dim = 2 * rotary_cos.shape[1]
    if rotary_sin is None or rotary_sin.shape != rotary_cos.shape or rot_dim > D:
        raise ValueError(f"rotary_cos/rotary_sin must both be (seqlen_ro, rotary_dim/2) with rotary_dim <= D={D}, "
                         f"got {tuple(rotary_cos.shape)} and "
                         f"{None if rotary_sin is None else tuple(rotary_sin.shape)}")
    cos, sin = rotary_cos.contiguous(), rotary_sin.contiguous()
    return cos, sin, cos.stride(0), cos.shape[0], rot_dim


def _inner_contiguous(name, x):
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {x.stride()}")
    return x


def _precision(dtype):
    # fp32 inputs keep fp32 products (the reference accuracy); tf32 would lose ~3 digits.
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_d(D):
    return max(16, triton.next_power_of_2(D))


def _tiles(block_m, block_n, rows, block_d):
    """Default tiles: query rows sized to the rows there are (16 at decode, where Sq * group is small), and
    smaller tiles for D > 128 so the backward's four (block, D) fp32 tiles fit."""
    big = 64 if block_d <= 128 else 32
    if block_m is None:
        block_m = min(big, max(16, triton.next_power_of_2(rows)))
    return block_m, big if block_n is None else block_n


def _capability(device) -> int:
    """Compute capability of `device` as 80, 90, ...; 80 (the smallest supported target, so the tightest limits)
    where there is no GPU (the interpreter, meta tensors)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 80
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


# Launch of the dK/dV kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages) per (target, BLOCK_D, element bytes).
# Its loop streams q (with rotary: x, the partner x and the cos/sin tiles) and dO through shared memory, one
# buffer per stage, next to the K/V tiles and the transposed P/dS operands; the default 3 stages of 64-row
# tiles need ~288 KB at D=128 with rotary, past sm_80's 163 KB and sm_90's 227 KB per block. These choices
# fit each target for every dtype with rotary on (the worst case), checked by compiling them (python -m
# coconut_kernels.triton.aot, tests/test_gpu_static.py); they are not tuned for speed, which needs a GPU.
_DKDV_CONFIGS = {
    # sm_80 (A100: 163 KB)
    (80, 64, 2): (64, 64, 4, 2), (80, 128, 2): (32, 64, 4, 3), (80, 256, 2): (16, 32, 4, 2),
    (80, 64, 4): (32, 64, 4, 2), (80, 128, 4): (16, 32, 4, 2), (80, 256, 4): (16, 32, 4, 1),
    # sm_90 (H100/H200: 227 KB); 8 warps at D=128 halve the registers per thread of the fp32 dK/dV tiles
    (90, 64, 2): (64, 64, 4, 2), (90, 128, 2): (64, 64, 8, 2), (90, 256, 2): (32, 32, 4, 2),
    (90, 64, 4): (64, 64, 4, 2), (90, 128, 4): (32, 32, 4, 2), (90, 256, 4): (16, 32, 4, 2),
}


def _dkdv_config(block_d: int, dtype: torch.dtype, cc: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the dK/dV kernel on target `cc` (sm_80 limits below sm_90;
    newer targets use sm_90's: they have at least as much shared memory)."""
    return _DKDV_CONFIGS[(90 if cc >= 90 else 80, max(64, block_d), 4 if dtype == torch.float32 else 2)]


def _kv_stages(block_m: int, block_n: int, block_d: int, dtype: torch.dtype, cc: int) -> int:
    """num_stages of the kernels that stream K/V tiles (forward, dQ): each stage buffers one K and one V tile
    in shared memory next to the q tile. Triton's default 3 stages of fp32 64 x 128 tiles need ~200 KB, past
    sm_80's 163 KB: fewer stages where the estimate passes 85% of the target's limit (the AOT table checks
    the result against the compiled kernels)."""
    elem = torch.finfo(dtype).bits // 8
    limit = (227 if cc >= 90 else 163) * 1024 * 0.85
    for stages in (3, 2):
        if stages * 2 * block_n * block_d * elem + block_m * block_d * elem <= limit:
            return stages
    return 1


def kv_cache_append_triton(k_cache, v_cache, k_new, v_new, cache_seqlens, cache_leftpad, new_seqlens,
                           rotary_cos, rotary_sin, rotary_interleaved, *, block_m=16):
    """Write rows t < new_seqlens[b] of k_new (rotated) / v_new at cache rows cache_seqlens[b] + t, in place."""
    B, Sq, H, D = k_new.shape
    Tmax = k_cache.shape[1]
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        _inner_contiguous(name, x)
    cos, sin, stride_ro, seqlen_ro, rot_dim = _rotary_args(rotary_cos, rotary_sin, D, k_new)
    if B == 0 or Sq == 0:
        return
    _append_kernel[(B * triton.cdiv(Sq * H, block_m),)](
        k_cache, v_cache, k_new, v_new, cache_seqlens,
        cache_leftpad if cache_leftpad is not None else cache_seqlens,
        new_seqlens if new_seqlens is not None else cache_seqlens, cos, sin,
        *k_cache.stride()[:3], *v_cache.stride()[:3], *k_new.stride()[:3], *v_new.stride()[:3],
        stride_ro, seqlen_ro, Sq, H, Tmax, D,
        HAS_LEFTPAD=cache_leftpad is not None, HAS_NEW_SEQLENS=new_seqlens is not None, ROT_DIM=rot_dim,
        INTERLEAVED=bool(rotary_interleaved), BLOCK_M=block_m, BLOCK_D=_block_d(D))


def _dropout_args(dropout_p, dropout_seed):
    """(seed, threshold, keep scale, on) of the kernels' dropout (the rule of csrc/dropout.h)."""
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if isinstance(dropout_seed, bool) or not isinstance(dropout_seed, int) or not 0 <= dropout_seed < 2 ** 63:
        raise ValueError(f"dropout_seed must be an int in [0, 2^63), got {dropout_seed!r}")
    return dropout_seed, int(p * 16777216.0), 1.0 / (1.0 - p), p > 0.0


def _attention_common(q, k_cache, v_cache, cache_seqlens, cache_leftpad, new_seqlens, rotary_cos, rotary_sin):
    B, Sq, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    if Hq % Hkv != 0:
        raise ValueError(f"q's head count ({Hq}) must be a multiple of k_cache's ({Hkv})")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _inner_contiguous(name, x)
    cos, sin, stride_ro, seqlen_ro, rot_dim = _rotary_args(rotary_cos, rotary_sin, D, q)
    lengths = (cache_seqlens,
               cache_leftpad if cache_leftpad is not None else cache_seqlens,
               new_seqlens if new_seqlens is not None else cache_seqlens, cos, sin)
    return B, Sq, Hq, Hkv, D, lengths, stride_ro, seqlen_ro, rot_dim


# Keys per split at least: below it the combine's extra reads and launch cost more than the parallelism gains.
_MIN_KEYS_PER_SPLIT = 256


def _fwd_tiles(block_m, block_n, rows, block_d):
    """Forward tiles. Query rows are the (t, group head) pairs of one kv head, so at decode (Sq = 1) a block has
    `group` real rows: BLOCK_M is the next power of two of the rows (not 16 as tl.dot's MMA tile: Triton pads a
    short M inside the MMA, so the q/acc registers hold real rows only); keys as in _tiles."""
    big = 64 if block_d <= 128 else 32
    if block_m is None:
        block_m = min(big, triton.next_power_of_2(max(rows, 1)))
    return block_m, big if block_n is None else block_n


def num_kv_splits(programs: int, Tmax: int, sms: int = H100_SMS) -> int:
    """Split count of the key range (flash-decoding) for a grid of `programs` (query blocks x B x Hkv) over a
    cache of capacity Tmax: enough to fill about two waves of `sms` SMs (one program per SM is a wave; two
    keep the tail of uneven lengths short), with at least
    _MIN_KEYS_PER_SPLIT keys of capacity per split (the lengths are on the device; Tmax bounds them)."""
    want = triton.cdiv(2 * sms, max(programs, 1))
    return max(1, min(want, Tmax // _MIN_KEYS_PER_SPLIT))


def latent_attention_fwd_triton(q, k_cache, v_cache, cache_seqlens, cache_leftpad, new_seqlens, rotary_cos,
                                rotary_sin, rotary_interleaved, softmax_scale, causal, dropout_p=0.0, dropout_seed=0, *,
                                block_m=None, block_n=None, num_splits=None):
    """(out, lse): attention of q (B, Sq, Hq, D) to the cache; out in q's dtype, lse fp32 (B, Hq, Sq).

    num_splits: how many programs share each query block's key range (split-KV, merged by a combine kernel);
    None chooses by num_kv_splits (1 when B x Hkv x query blocks already fill the GPU)."""
    B, Sq, Hq, Hkv, D, lengths, stride_ro, seqlen_ro, rot_dim = _attention_common(
        q, k_cache, v_cache, cache_seqlens, cache_leftpad, new_seqlens, rotary_cos, rotary_sin)
    *drop, dropout = _dropout_args(dropout_p, dropout_seed)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    group = Hq // Hkv
    Tmax = k_cache.shape[1]
    block_d = _block_d(D)
    block_m, block_n = _fwd_tiles(block_m, block_n, Sq * group, block_d)
    programs = triton.cdiv(Sq * group, block_m) * B * Hkv
    if num_splits is None:
        num_splits = num_kv_splits(programs, Tmax, sm_count(q.device))
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    split = num_splits > 1
    n_rows = B * Hq * Sq
    # fp32 partials (m, l interleaved; acc) of every split; a 1-element placeholder when not splitting.
    part_acc = torch.empty((num_splits * n_rows * D) if split else 1, dtype=torch.float32, device=q.device)
    part_ml = torch.empty((num_splits * n_rows * 2) if split else 1, dtype=torch.float32, device=q.device)
    _fwd_kernel[(programs * num_splits,)](
        q, k_cache, v_cache, out, lse, part_acc, part_ml, *lengths,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *out.stride()[:3],
        stride_ro, seqlen_ro, B, Sq, Hq, Hkv, Tmax, D, softmax_scale * LOG2E, num_splits, *drop,
        GROUP=group, HAS_LEFTPAD=cache_leftpad is not None, HAS_NEW_SEQLENS=new_seqlens is not None,
        ROT_DIM=rot_dim, INTERLEAVED=bool(rotary_interleaved), CAUSAL=bool(causal), SPLIT=split,
        DROPOUT=dropout, PRECISION=_precision(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_stages=_kv_stages(block_m, block_n, block_d, q.dtype, _capability(q.device)))
    if split:
        block_r = 16 if block_d <= 128 else 8
        _fwd_combine_kernel[(triton.cdiv(n_rows, block_r),)](
            part_acc, part_ml, out, lse, *out.stride()[:3], n_rows, Sq, Hq, D, num_splits,
            BLOCK_R=block_r, BLOCK_D=block_d)
    return out, lse


def latent_attention_bwd_triton(grad_out, q, k_cache, v_cache, out, lse, cache_seqlens, cache_leftpad,
                                new_seqlens, rotary_cos, rotary_sin, rotary_interleaved, softmax_scale, causal,
                                grad_k_cache, grad_v_cache, dropout_p=0.0, dropout_seed=0, *, block_m=None, block_n=None):
    """dq (w.r.t. the un-rotated q, q's dtype); adds the cache gradients into grad_k_cache / grad_v_cache (fp32)."""
    B, Sq, Hq, Hkv, D, lengths, stride_ro, seqlen_ro, rot_dim = _attention_common(
        q, k_cache, v_cache, cache_seqlens, cache_leftpad, new_seqlens, rotary_cos, rotary_sin)
    *drop, dropout = _dropout_args(dropout_p, dropout_seed)
    for name, x in (("grad_k_cache", grad_k_cache), ("grad_v_cache", grad_v_cache)):
        if x.dtype != torch.float32 or x.shape != k_cache.shape:
            raise ValueError(f"{name} must be float32 of k_cache's shape {tuple(k_cache.shape)}, "
                             f"got {x.dtype} {tuple(x.shape)}")
        _inner_contiguous(name, x)
    grad_out = grad_out.contiguous()
    out = out.contiguous()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    if dq.numel() == 0:
        return dq
    group = Hq // Hkv
    block_d = _block_d(D)
    explicit = (block_m, block_n)
    block_m, block_n = _tiles(block_m, block_n, Sq * group, block_d)
    delta = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(Sq * Hq, block_m) * B,)](
        grad_out, out, delta, *grad_out.stride()[:3], *out.stride()[:3], Sq, Hq, D,
        BLOCK_M=block_m, BLOCK_D=block_d)
    lse = lse.contiguous()
    flags = dict(GROUP=group, HAS_LEFTPAD=cache_leftpad is not None, HAS_NEW_SEQLENS=new_seqlens is not None,
                 ROT_DIM=rot_dim, INTERLEAVED=bool(rotary_interleaved), CAUSAL=bool(causal), DROPOUT=dropout,
                 PRECISION=_precision(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
    Tmax = k_cache.shape[1]
    common = (*q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *grad_out.stride()[:3])
    kv_m, kv_n, kv_warps, kv_stages = _dkdv_config(block_d, q.dtype, _capability(q.device))
    if explicit != (None, None):  # explicit tiles (tests) apply to every kernel
        kv_m, kv_n = block_m, block_n
    _bwd_dkdv_kernel[(triton.cdiv(Tmax, kv_n) * B * Hkv,)](
        q, k_cache, v_cache, grad_out, lse, delta, grad_k_cache, grad_v_cache, *lengths, *common,
        *grad_k_cache.stride()[:3], *grad_v_cache.stride()[:3],
        stride_ro, seqlen_ro, Sq, Hq, Hkv, Tmax, D, softmax_scale, *drop,
        **dict(flags, BLOCK_M=kv_m, BLOCK_N=kv_n), num_warps=kv_warps, num_stages=kv_stages)
    dq_rot = torch.empty(dq.shape, dtype=torch.float32, device=q.device) if rot_dim else dq
    _bwd_dq_kernel[(triton.cdiv(Sq * group, block_m) * B * Hkv,)](
        q, k_cache, v_cache, grad_out, lse, delta, dq_rot, *lengths, *common, *dq_rot.stride()[:3],
        stride_ro, seqlen_ro, Sq, Hq, Hkv, Tmax, D, softmax_scale, *drop, **flags,
        num_stages=_kv_stages(block_m, block_n, block_d, q.dtype, _capability(q.device)))
    if rot_dim:
        _unrotate_kernel[(B * triton.cdiv(Sq * Hq, block_m),)](
            dq_rot, dq, lengths[0], lengths[1], lengths[3], lengths[4], *dq_rot.stride()[:3], *dq.stride()[:3],
            stride_ro, seqlen_ro, Sq, Hq, D, HAS_LEFTPAD=cache_leftpad is not None, ROT_DIM=rot_dim,
            INTERLEAVED=bool(rotary_interleaved), BLOCK_M=block_m, BLOCK_D=block_d)
    return dq

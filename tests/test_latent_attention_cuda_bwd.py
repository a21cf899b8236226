"""The tiled CUDA backward of latent_attention (csrc/cuda/latent_attention.cu: bwd_delta_kernel, bwd_dkdv_kernel,
bwd_dq_kernel) replayed on the CPU, against autograd of the fp64 reference.

No GPU runs here, so this module mirrors the three kernels in PyTorch at fp64: the same grid (blocks decoded
from the flat block index), the same tile sizes (read from csrc/cuda/launch_config.h through a compiled C++
harness), the same flat offset arithmetic on flattened tensors, the same lane layout (lane dl of a key or
query row holds the 4-dim chunks dl, dl + TPD, ..., summed over the TPD lanes as the shuffles do), the same
masks, staging loops and fixed-order key-lane sum. Threads of a block are vectorised; the loops a block runs
(query tiles, rows, key tiles, keys) are Python loops in the kernels' order. A change to the kernels' tiling,
masks or index arithmetic must be made here too; benchmarks/gpu_correctness.py checks the kernels themselves
on the first GPU."""
from __future__ import annotations

import math
import os
import shutil
import subprocess

import pytest
import torch

from coconut_kernels import reference as R

from .test_latent_attention import make_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG2E = 1.4426950408889634

HARNESS = r"""
#include <cstdio>
#include "cuda/launch_config.h"
using namespace coconut::launch;
int main() {
  std::printf("threads %d row_tile %d key_split %d\n", kBwdThreads, kBwdRowTile, kBwdKeySplit);
  for (int dmax : {64, 128, 256})
    std::printf("dmax %d %d %d %d\n", dmax, bwd_tpd(dmax), bwd_key_block(dmax), bwd_dq_key_tile(dmax));
  for (int D = 1; D <= 256; ++D) std::printf("tile %d %d\n", D, head_dim_tile(D));
  for (int rows = 1; rows <= 512; ++rows)
    for (int dmax : {64, 128, 256}) std::printf("split %d %d %d\n", rows, dmax, bwd_dq_key_split(rows, dmax));
  return 0;
}
"""


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """The backward's tile constants as launch_config.h defines them."""
    if shutil.which("g++") is None:
        pytest.skip("needs g++ to read csrc/cuda/launch_config.h")
    d = tmp_path_factory.mktemp("tiles")
    (d / "h.cpp").write_text(HARNESS)
    subprocess.run(["g++", "-std=c++17", "-I", os.path.join(ROOT, "csrc"), str(d / "h.cpp"), "-o", str(d / "h")],
                   check=True)
    t = {"dmax": {}, "split": {}, "tile": {}}
    for line in subprocess.run([str(d / "h")], check=True, capture_output=True, text=True).stdout.splitlines():
        w = line.split()
        if w[0] == "threads":
            t["threads"], t["row_tile"], t["key_split"] = int(w[1]), int(w[3]), int(w[5])
        elif w[0] == "tile":
            t["tile"][int(w[1])] = int(w[2])
        elif w[0] == "dmax":
            t["dmax"][int(w[1])] = dict(tpd=int(w[2]), bn=int(w[3]), bnq=int(w[4]))
        else:
            t["split"][int(w[1]), int(w[2])] = int(w[3])
    return t


def lane_dims(tpd, dmax):
    """(TPD, E) dims held by each lane: lane dl, chunk j, element i -> 4 * (dl + TPD * j) + i."""
    chunks = dmax // 4 // tpd
    dl = torch.arange(tpd)[:, None, None]
    j = torch.arange(chunks)[None, :, None]
    i = torch.arange(4)[None, None, :]
    dims = (4 * (dl + tpd * j) + i).reshape(tpd, 4 * chunks)
    assert torch.equal(dims.flatten().sort().values, torch.arange(dmax))  # every dim held by exactly one lane
    return dims


class Rot:
    """rot_coef of the .cu: y[d] = x[d] * c + x[partner] * s on fp32 tables (seqlen, dim / 2)."""

    def __init__(self, cos, sin, interleaved):
        self.dim = 0 if cos is None else 2 * cos.shape[1]
        self.seqlen = 1 if cos is None else cos.shape[0]
        self.cos = None if cos is None else cos.contiguous().view(-1)
        self.sin = None if sin is None else sin.contiguous().view(-1)
        self.interleaved = interleaved

    def coef(self, d, pos, inverse):
        """(partner, c, s) for dims d (tensor) at one position."""
        partner, c, s = d.clone(), torch.ones(d.shape, dtype=torch.float64), torch.zeros(d.shape, dtype=torch.float64)
        on = d < self.dim
        if not on.any():
            return partner, c, s
        half = self.dim // 2
        if self.interleaved:
            p, freq, sign = d ^ 1, d >> 1, torch.where(d & 1 == 1, 1.0, -1.0)
        else:
            low = d < half
            p, freq = torch.where(low, d + half, d - half), torch.where(low, d, d - half)
            sign = torch.where(low, -1.0, 1.0)
        pos = min(max(pos, 0), self.seqlen - 1)
        idx = (pos * half + freq).clamp(0, self.cos.numel() - 1)
        sign = -sign if inverse else sign
        partner = torch.where(on, p, partner)
        c = torch.where(on, self.cos[idx].double(), c)
        s = torch.where(on, sign * self.sin[idx].double(), s)
        return partner, c, s


def flat(x):
    """The storage of x from its first element on, as the kernel's pointer sees it."""
    return x.as_strided((x.untyped_storage().nbytes() // x.element_size() - x.storage_offset(),), (1,),
                        x.storage_offset())


def seq_lengths(cache_seqlens, cache_leftpad, new_seqlens, b, Sq):
    cs = int(cache_seqlens[b])
    lp = int(cache_leftpad[b]) if cache_leftpad is not None else 0
    nn = min(max(int(new_seqlens[b]), 0), Sq) if new_seqlens is not None else Sq
    return cs, lp, nn


def emulate_bwd(tiles, grad_out, q, k_cache, v_cache, out, lse, cache_seqlens, cache_leftpad, new_seqlens,
                rotary_cos, rotary_sin, rotary_interleaved, scale, causal, grad_k, grad_v, vec=4):
    """latent_attention_bwd_cuda's three launches on fp64 CPU tensors: returns dq, adds into grad_k / grad_v.
    `vec` is Vec<T>::N of the dtype mirrored (4 fp32, 8 bf16/fp16): the dQ kernel's K/V staging chunks."""
    B, Sq, Hq, D = q.shape
    Tmax, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    DMAX = tiles["tile"][D]  # head_dim_tile, as dispatch_head_dim instantiates
    cfg = tiles["dmax"][DMAX]
    TPD, BN, BNQ, BM, NT = cfg["tpd"], cfg["bn"], cfg["bnq"], tiles["row_tile"], tiles["threads"]
    dims = lane_dims(TPD, DMAX)
    rot = Rot(rotary_cos, rotary_sin, rotary_interleaved)
    Q, GO, O = flat(q.contiguous()), flat(grad_out.contiguous()), flat(out.contiguous())
    LSE = flat(lse.contiguous())
    K, V = flat(k_cache), flat(v_cache)
    ks, vs = k_cache.stride()[:3], v_cache.stride()[:3]
    GK, GV = flat(grad_k), flat(grad_v)
    scale_log2 = scale * LOG2E
    lengths = lambda b: seq_lengths(cache_seqlens, cache_leftpad, new_seqlens, b, Sq)  # noqa: E731

    def rotated(row, d, pos):  # rotated(q + row, R, d, pos)
        partner, c, s = rot.coef(d, pos, False)
        return Q[row + d] * c + Q[row + partner] * s

    # bwd_delta_kernel: one warp per row (b * Sq + t) * Hq + hq.
    delta = torch.full((B * Hq * Sq,), float("nan"), dtype=torch.float64)
    rows_per_block = NT // 32
    for blk in range(-(-B * Sq * Hq // rows_per_block)):
        for w in range(rows_per_block):
            row = blk * rows_per_block + w
            if row >= B * Sq * Hq:
                continue
            hq, t, b = row % Hq, (row // Hq) % Sq, row // Hq // Sq
            delta[(b * Hq + hq) * Sq + t] = (GO[row * D:row * D + D] * O[row * D:row * D + D]).sum()

    # bwd_dkdv_kernel: block (b, kv head, key block), threads = BN keys x TPD lanes.
    nkb = -(-Tmax // BN)
    d_all = torch.arange(DMAX)
    for blk in range(B * Hkv * nkb):
        kb, bh = blk % nkb, blk // nkb
        hkv, b = bh % Hkv, bh // Hkv
        cs, lp, nn = lengths(b)
        lo, hi, n0 = max(lp, 0), min(cs + nn, Tmax), kb * BN
        if n0 >= hi or n0 + BN <= lo:
            continue
        n = n0 + torch.arange(BN)  # threadIdx.x / TPD
        key_ok = (n >= lo) & (n < hi)
        in_d = key_ok[:, None, None] & (dims < D)[None]
        krow = b * ks[0] + n * ks[1] + hkv * ks[2]
        vrow = b * vs[0] + n * vs[1] + hkv * vs[2]
        kr = torch.where(in_d, K[(krow[:, None, None] + dims[None]).clamp(0, K.numel() - 1)], 0.0)
        vr = torch.where(in_d, V[(vrow[:, None, None] + dims[None]).clamp(0, V.numel() - 1)], 0.0)
        dk = torch.zeros(BN, TPD, dims.shape[1], dtype=torch.float64)
        dv = torch.zeros_like(dk)
        m_lo = max(n0 - cs, 0) * G if causal else 0
        m_hi = nn * G
        for m0 in range(m_lo, m_hi, BM):
            q_s = torch.zeros(BM, DMAX, dtype=torch.float64)
            do_s = torch.zeros(BM, DMAX, dtype=torch.float64)
            lse_s, delta_s, t_s = [None] * BM, [None] * BM, [None] * BM
            for r in range(BM):
                m = m0 + r
                if m >= m_hi:
                    continue
                t = m // G
                d = d_all[d_all < D]
                row = ((b * Sq + t) * Hq + hkv * G + m % G) * D
                q_s[r, :D] = rotated(row, d, cs + t - lp)
                do_s[r, :D] = GO[row + d]
                idx = (b * Hq + hkv * G + m % G) * Sq + t
                lse_s[r], delta_s[r], t_s[r] = float(LSE[idx]) * LOG2E, float(delta[idx]), t
            for r in range(min(BM, m_hi - m0)):
                s = (q_s[r][dims][None] * kr).sum(-1).sum(-1)  # each lane's chunks, then the TPD lanes
                dp = (do_s[r][dims][None] * vr).sum(-1).sum(-1)
                ok = key_ok & ((n <= cs + t_s[r]) if causal else True)
                pr = torch.where(ok, torch.exp2(s * scale_log2 - lse_s[r]), 0.0)
                ds = pr * (dp - delta_s[r])
                dv += pr[:, None, None] * do_s[r][dims][None]
                dk += ds[:, None, None] * q_s[r][dims][None]
        g_off = ((b * Tmax + n) * Hkv + hkv) * D
        idx = (g_off[:, None, None] + dims[None])[in_d]
        GK[idx] += (dk * scale)[in_d]
        GV[idx] += dv[in_d]

    # bwd_dq_kernel: block (b, kv head, row block), threads = KSPLIT key lanes x RB rows x TPD lanes.
    dq_out = torch.full((B * Sq * Hq * D,), float("nan"), dtype=torch.float64)  # torch.empty: every row written
    rows_total = Sq * G
    split = tiles["split"][rows_total, DMAX]  # bwd_dq_key_split
    RB = NT // TPD // split
    assert RB * TPD >= 32 and BNQ % split == 0
    nrb = -(-rows_total // RB)
    NV = DMAX // vec
    for blk in range(B * Hkv * nrb):
        rb, bh = blk % nrb, blk // nrb
        hkv, b = bh % Hkv, bh // Hkv
        cs, lp, nn = lengths(b)
        r = torch.arange(RB)
        m = rb * RB + r
        t = m // G
        hq = hkv * G + m % G
        row_ok = (m < rows_total) & (t < nn)
        row = (b * Sq + t) * Hq + hq
        qr = torch.zeros(RB, TPD, dims.shape[1], dtype=torch.float64)
        gr = torch.zeros_like(qr)
        for i in range(RB):
            if row_ok[i]:
                ok_d = dims < D
                qr[i][ok_d] = rotated(int(row[i]) * D, dims[ok_d], cs + int(t[i]) - lp)
                gr[i][ok_d] = GO[int(row[i]) * D + dims[ok_d]]
        stat = (b * Hq + hq) * Sq + t
        lse2 = torch.where(row_ok, LSE[stat.clamp(0, LSE.numel() - 1)].double() * LOG2E, 0.0)
        dlt = torch.where(row_ok, delta[stat.clamp(0, delta.numel() - 1)], 0.0)
        row_hi = torch.clamp(cs + t + 1 if causal else torch.full_like(t, cs + nn), max=Tmax)
        lo = max(lp, 0)
        t_first = rb * RB // G
        t_last = min((min(rb * RB + RB, rows_total) - 1) // G, nn - 1)
        hi = min(cs + t_last + 1 if causal else cs + nn, Tmax) if t_last >= t_first else lo
        dq = torch.zeros(split, RB, TPD, dims.shape[1], dtype=torch.float64)
        for n0 in range(lo, hi, BNQ):
            k_s = torch.zeros(BNQ * DMAX, dtype=torch.float64)
            v_s = torch.zeros(BNQ * DMAX, dtype=torch.float64)
            i = torch.arange(BNQ * NV)  # the staging loop's iterations (all threads): Vec<T> chunk i
            c, d0 = i // NV, (i % NV) * vec
            nk = n0 + c
            valid = torch.where(nk < hi, (D - d0).clamp(0, vec), 0)  # elements [d0, d0 + valid) of row nk
            for e in range(vec):
                on = e < valid
                k_s[(c * DMAX + d0 + e)[on]] = K[(b * ks[0] + hkv * ks[2] + nk * ks[1] + d0 + e)[on]]
                v_s[(c * DMAX + d0 + e)[on]] = V[(b * vs[0] + hkv * vs[2] + nk * vs[1] + d0 + e)[on]]
            for i in range(BNQ // split):
                c = torch.arange(split) + split * i  # key lane kl takes c = kl + KSPLIT * i
                kc = k_s[c[:, None, None] * DMAX + dims[None]]  # (split, TPD, E)
                vc = v_s[c[:, None, None] * DMAX + dims[None]]
                s = (kc[:, None] * qr[None]).sum(-1).sum(-1)  # (split, RB)
                dp = (vc[:, None] * gr[None]).sum(-1).sum(-1)
                ok = row_ok[None] & ((n0 + c)[:, None] < row_hi[None])
                ds = torch.where(ok, torch.exp2(s * scale_log2 - lse2[None]) * (dp - dlt[None]), 0.0)
                dq += ds[..., None, None] * kc[:, None]
        red = torch.zeros(split, RB, DMAX, dtype=torch.float64)
        red[:, :, dims] = dq
        acc = red[0].clone()
        for k in range(1, split):  # key-lane order
            acc += red[k]
        for rr in range(RB):
            mm = rb * RB + rr
            if mm >= rows_total:
                continue
            tt = mm // G
            d = d_all[d_all < D]
            partner, c, s = rot.coef(d, cs + tt - lp, True)
            val = (acc[rr][d] * c + acc[rr][partner] * s) * scale if tt < nn else torch.zeros(D, dtype=torch.float64)
            dq_out[((b * Sq + tt) * Hq + hkv * G + mm % G) * D + d] = val
    return dq_out.view(B, Sq, Hq, D)


def run_case(tiles, c, vec=4, strided=False):
    """(emulated, reference) dq, dK, dV for case c (make_case's dict, fp64) after its append; the accumulators
    start non-zero (the op adds into them)."""
    if strided:  # caches as a head slice of a wider buffer: non-trivial strides
        for name in ("k_cache", "v_cache"):
            x = c[name]
            wide = torch.randn(x.shape[0], x.shape[1], x.shape[2] + 1, x.shape[3], dtype=torch.float64)
            wide[:, :, : x.shape[2]] = x
            c[name] = wide[:, :, : x.shape[2]]
    lengths = (c["cache_seqlens"], c["cache_leftpad"], c["new_seqlens"])
    rot = (c["rotary_cos"], c["rotary_sin"], c["rotary_interleaved"])
    R.kv_cache_append_reference(c["k_cache"], c["v_cache"], c["k_new"], c["v_new"], *lengths, *rot)
    scale = c["q"].shape[-1] ** -0.5
    out, lse = R.latent_attention_fwd_reference(c["q"], c["k_cache"], c["v_cache"], *lengths, *rot, scale,
                                                c["causal"])
    g = torch.Generator().manual_seed(3)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    gk0 = torch.randn(c["k_cache"].shape, generator=g, dtype=torch.float64)
    gv0 = torch.randn(c["k_cache"].shape, generator=g, dtype=torch.float64)
    gk_ref, gv_ref = gk0.clone(), gv0.clone()
    dq_ref = R.latent_attention_bwd_reference(grad_out, c["q"], c["k_cache"], c["v_cache"], out, lse, *lengths,
                                              *rot, scale, c["causal"], gk_ref, gv_ref)
    gk, gv = gk0.clone(), gv0.clone()
    dq = emulate_bwd(tiles, grad_out, c["q"], c["k_cache"], c["v_cache"], out, lse, *lengths, *rot, scale,
                     c["causal"], gk, gv, vec=vec)
    return (dq, gk, gv), (dq_ref, gk_ref, gv_ref)


CASES = [
    # (B, Sq, Hq, Hkv, D, Tmax, options, vec, strided): query tiles, key blocks and dQ key tiles > 1, both dQ
    # layouts (key split 1 and 8), every head-dim tile with ragged D, rotary both ways, GQA, non-causal.
    (3, 20, 4, 2, 40, 150, dict(rotary_dim=16, leftpad=True, ragged=True), 4, False),
    (2, 3, 6, 2, 100, 90, dict(rotary_dim=100, interleaved=True, leftpad=True, ragged=True), 8, True),
    (2, 5, 2, 1, 130, 70, dict(leftpad=True, ragged=True, causal=False), 4, False),
    (3, 1, 8, 8, 64, 200, dict(rotary_dim=64, ragged=True), 8, False),
    (2, 9, 4, 1, 256, 40, dict(rotary_dim=32, empty_cache=True), 4, True),
    (2, 33, 2, 2, 24, 35, dict(empty_cache=True, causal=False, ragged=True), 8, False),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_tiled_backward_emulation_matches_autograd(tiles, case):
    B, Sq, Hq, Hkv, D, Tmax, opts, vec, strided = CASES[case]
    c = make_case(B, Sq, Hq, Hkv, D, Tmax, seed=case, **opts)
    got, ref = run_case(tiles, c, vec=vec, strided=strided)
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        assert not g.isnan().any(), f"{name}: an element was never written"
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_pad_queries_and_rows_past_new_seqlens(tiles):
    """A left-padded prefix pass writes its own pad rows: queries t < leftpad - cache_seqlens see no key
    (lse = -inf), rows t >= new_seqlens get dq = 0; neither adds to dK/dV."""
    c = make_case(2, 6, 4, 2, 48, 20, rotary_dim=48, empty_cache=True, seed=11)
    c["cache_leftpad"] = torch.tensor([3, 0], dtype=torch.int32)
    c["new_seqlens"] = torch.tensor([6, 4], dtype=torch.int32)
    got, ref = run_case(tiles, c)
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
    assert got[0][1, 4:].abs().max() == 0 and got[0][0, :3].abs().max() == 0


def test_dq_key_split_choice(tiles):
    """The dQ kernel splits the keys of a block over 8 key lanes when one key lane's block would be more than half
    empty (decode-sized passes), else keeps one key lane and the most rows."""
    rows_per_block = {d: tiles["threads"] // v["tpd"] for d, v in tiles["dmax"].items()}
    for (rows, dmax), split in tiles["split"].items():
        assert split == (tiles["key_split"] if 2 * rows <= rows_per_block[dmax] else 1), (rows, dmax)
    assert tiles["split"][1, 128] == 8 and tiles["split"][300, 128] == 1
    # Shared memory (fp32): the dQ kernel's two K/V tiles, the dK/dV kernel's q and dO row tiles, <= 48 KB static.
    for dmax, v in tiles["dmax"].items():
        assert 2 * v["bnq"] * dmax * 4 <= 48 * 1024 and 2 * tiles["row_tile"] * dmax * 4 <= 48 * 1024
        assert math.log2(v["tpd"]).is_integer() and v["tpd"] <= 32


# ---- on a GPU (benchmarks/gpu_check.sh runs `pytest -m cuda`) ---------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(range(len(CASES))) + ["prefix"])
def test_cuda_backward_matches_reference_and_is_deterministic(case, dtype):
    """The compiled kernels themselves: latent_attention_bwd on CUDA tensors against the fp64 reference (within 2x
    PyTorch's own error in the dtype, as the CPU tests) and bitwise equal over two runs."""
    from tests.helpers import assert_within_torch_error

    if case == "prefix":  # a prefix pass of a GQA model: 300 rows x 4 heads per kv head
        B, Sq, Hq, Hkv, D, Tmax, opts = 4, 300, 16, 4, 128, 700, dict(rotary_dim=64, leftpad=True, ragged=True)
    else:
        B, Sq, Hq, Hkv, D, Tmax, opts, _, _ = CASES[case]
    c = make_case(B, Sq, Hq, Hkv, D, Tmax, seed=5, **opts)
    lengths = (c["cache_seqlens"], c["cache_leftpad"], c["new_seqlens"])
    rot = (c["rotary_cos"], c["rotary_sin"], c["rotary_interleaved"])
    R.kv_cache_append_reference(c["k_cache"], c["v_cache"], c["k_new"], c["v_new"], *lengths, *rot)
    scale = D ** -0.5
    grad_out = torch.randn(B, Sq, Hq, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def run(device, dt, bwd):
        cast = lambda x: None if x is None else x.to(device, dt if x.is_floating_point() else x.dtype)  # noqa: E731
        q, kc, vc, go = cast(c["q"]), cast(c["k_cache"]), cast(c["v_cache"]), cast(grad_out)
        lens = tuple(None if x is None else x.to(device) for x in lengths)
        tables = tuple(None if x is None else x.to(device, torch.float32 if dt != torch.float64 else dt)
                       for x in rot[:2])
        out, lse = R.latent_attention_fwd_reference(q, kc, vc, *lens, *tables, rot[2], scale, c["causal"])
        acc = torch.float64 if dt == torch.float64 else torch.float32
        gk = torch.zeros(kc.shape, dtype=acc, device=device)
        gv = torch.zeros_like(gk)
        dq = bwd(go, q, kc, vc, out, lse.to(acc), *lens, *tables, rot[2], scale, c["causal"], gk, gv)
        return dq, gk, gv

    ops = torch.ops.coconut
    ref = run("cpu", torch.float64, R.latent_attention_bwd_reference)
    lowp = run("cuda", dtype, R.latent_attention_bwd_reference)
    first = run("cuda", dtype, ops.latent_attention_bwd)
    second = run("cuda", dtype, ops.latent_attention_bwd)
    for name, g, g2, r, lo in zip(("dq", "dk", "dv"), first, second, ref, lowp):
        assert torch.equal(g, g2), f"{name}: two runs differ"
        assert_within_torch_error(g.cpu(), r, lo.cpu(), atol=1e-4, name=name)

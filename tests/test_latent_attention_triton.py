"""The Triton kernels of latent_attention (append, forward, backward) against a float64 reference.

On CPU they run under TRITON_INTERPRET=1 (set by conftest.py), in fp32 (the interpreter computes in the
tensors' dtype), on tiny shapes. The `cuda` class runs the CUDA C++ op and the Triton path on a GPU
(benchmarks/gpu_check.sh), in fp32 and bf16, and captures a decode step in a CUDA graph.
"""
from __future__ import annotations

import pytest
import torch

from coconut_kernels import reference as R
from tests.helpers import assert_within_torch_error, requires_cuda, requires_triton

pytestmark = requires_triton
# The interpreter takes CPU tensors; compiled Triton (where there is a GPU) takes CUDA ones.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def append_ref(k_cache, v_cache, k_new, v_new, *args):
    """Out-of-place kv_cache_append_reference: the caches after the append."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    R.kv_cache_append_reference(k_cache, v_cache, k_new, v_new, *args)
    return k_cache, v_cache


# ---- inputs ------------------------------------------------------------------------------------------


def make_case(B, Sq, Hq, Hkv, D, Tmax, rot_dim, leftpad, ragged_new, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    cs = torch.randint(0, Tmax - Sq + 1, (B,), generator=g, dtype=torch.int32)
    cs[0] = 0  # an empty cache: the new rows are the only keys
    cs[-1] = Tmax - Sq  # a full one
    lp = (torch.rand(B, generator=g) * cs.double()).to(torch.int32) if leftpad else None
    nn = torch.randint(0, Sq + 1, (B,), generator=g, dtype=torch.int32) if ragged_new else None
    if nn is not None:
        nn[-1] = Sq
    cos = sin = None
    if rot_dim:
        ang = rnd(Tmax + 4, rot_dim // 2).double().cpu() * 3.0
        cos, sin = ang.cos().to(device=device, dtype=dtype), ang.sin().to(device=device, dtype=dtype)
    ints = [x if x is None else x.to(device) for x in (cs, lp, nn)]
    return dict(q=rnd(B, Sq, Hq, D), k_new=rnd(B, Sq, Hkv, D), v_new=rnd(B, Sq, Hkv, D),
                k_cache=rnd(B, Tmax, Hkv, D), v_cache=rnd(B, Tmax, Hkv, D), cache_seqlens=ints[0],
                cache_leftpad=ints[1], new_seqlens=ints[2], cos=cos, sin=sin)


def _f64(x):
    return None if x is None else x.detach().to("cpu", torch.float64)


# (B, Sq, Hq, Hkv, D, Tmax, rot_dim, interleaved, causal, leftpad, ragged_new)
CASES = [
    (3, 1, 4, 2, 16, 70, 0, False, True, True, False),
    (3, 1, 2, 2, 80, 40, 80, True, False, False, True),
    (3, 3, 2, 2, 80, 37, 80, False, True, False, True),
    (2, 3, 4, 1, 16, 70, 8, True, False, True, True),
    (2, 16, 4, 2, 16, 50, 16, False, True, True, True),
    (2, 16, 2, 1, 80, 40, 48, True, True, False, False),
    (2, 16, 2, 2, 16, 33, 0, False, False, True, True),
    (2, 16, 4, 2, 80, 45, 16, False, False, True, True),
    (3, 1, 4, 1, 80, 66, 0, False, False, True, True),
    (2, 3, 4, 1, 16, 29, 16, True, True, True, False),
]
BLOCKS = dict(block_m=16, block_n=16)


def _ids(c):
    B, Sq, Hq, Hkv, D, Tmax, rd, il, causal, lp, rn = c
    return (f"Sq{Sq}-H{Hq}x{Hkv}-D{D}-T{Tmax}-rot{rd}{'i' if il else 'n'}-{'causal' if causal else 'full'}"
            f"{'-leftpad' if lp else ''}{'-ragged' if rn else ''}")


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_append_fwd_bwd_match_reference(case):
    check_against_reference(case)


@pytest.mark.parametrize("case", [CASES[i] for i in (0, 4, 7)], ids=[_ids(CASES[i]) for i in (0, 4, 7)])
def test_dropout_matches_reference_with_the_same_mask(case):
    """Attention dropout: the forward and both backward kernels draw reference.attention_dropout_keep's mask."""
    check_against_reference(case, dropout=(0.3, 2 ** 40 + 17))
    # split-KV forward: each split's partial output carries its keys' dropped weights
    check_against_reference(case, dropout=(0.3, 2 ** 40 + 17), num_splits=3)


def check_against_reference(case, dropout=(0.0, 0), **fwd_options):
    from coconut_kernels.triton.latent_attention import (
        kv_cache_append_triton, latent_attention_bwd_triton, latent_attention_fwd_triton)

    B, Sq, Hq, Hkv, D, Tmax, rd, il, causal, leftpad, ragged = case
    c = make_case(B, Sq, Hq, Hkv, D, Tmax, rd, leftpad, ragged, seed=hash(case) % 1000, device=DEVICE)
    lens = (c["cache_seqlens"], c["cache_leftpad"], c["new_seqlens"])
    rot = (c["cos"], c["sin"], il)
    scale = D ** -0.5 * 1.3

    k_cache, v_cache = c["k_cache"].clone(), c["v_cache"].clone()
    kv_cache_append_triton(k_cache, v_cache, c["k_new"], c["v_new"], *lens, *rot, block_m=16)
    k_ref, v_ref = append_ref(_f64(c["k_cache"]), _f64(c["v_cache"]), _f64(c["k_new"]), _f64(c["v_new"]), *lens,
                              _f64(c["cos"]), _f64(c["sin"]), il)
    torch.testing.assert_close(_f64(k_cache), k_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_f64(v_cache), v_ref)

    out, lse = latent_attention_fwd_triton(c["q"], k_cache, v_cache, *lens, *rot, scale, causal, *dropout, **BLOCKS,
                                           **fwd_options)
    q64 = _f64(c["q"]).requires_grad_()
    k64 = k_ref.clone().requires_grad_()
    v64 = v_ref.clone().requires_grad_()
    out64, lse64 = R.latent_attention_fwd_reference(q64, k64, v64, *lens, _f64(c["cos"]), _f64(c["sin"]), il, scale, causal,
                                                    *dropout)
    torch.testing.assert_close(_f64(out), out64, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(_f64(lse), lse64.detach(), atol=2e-5, rtol=1e-4)

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    out64.backward(_f64(grad_out))
    gk0 = torch.randn(k_cache.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    gv0 = torch.randn(k_cache.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    gk, gv = gk0.clone(), gv0.clone()
    dq = latent_attention_bwd_triton(grad_out, c["q"], k_cache, v_cache, out, lse, *lens, *rot, scale, causal, gk, gv,
                                     *dropout, **BLOCKS)
    torch.testing.assert_close(_f64(dq), q64.grad, atol=5e-5, rtol=1e-4)
    # The accumulators receive the gradient added to what they held.
    torch.testing.assert_close(_f64(gk - gk0), k64.grad, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(_f64(gv - gv0), v64.grad, atol=5e-5, rtol=1e-4)


def test_append_skips_rows_past_tmax():
    from coconut_kernels.triton.latent_attention import kv_cache_append_triton

    c = make_case(2, 3, 2, 2, 16, 10, 0, False, False, seed=3, device=DEVICE)
    cs = torch.tensor([9, 2], dtype=torch.int32, device=DEVICE)  # sequence 0 has room for one row only
    k_cache, v_cache = c["k_cache"].clone(), c["v_cache"].clone()
    kv_cache_append_triton(k_cache, v_cache, c["k_new"], c["v_new"], cs, None, None, None, None, False, block_m=16)
    k_ref, v_ref = append_ref(_f64(c["k_cache"]), _f64(c["v_cache"]), _f64(c["k_new"]), _f64(c["v_new"]), cs, None,
                              None, None, None, False)
    torch.testing.assert_close(_f64(k_cache), k_ref)
    torch.testing.assert_close(_f64(v_cache), v_ref)


def test_rows_past_new_seqlens_give_zero_and_minus_inf():
    from coconut_kernels.triton.latent_attention import latent_attention_fwd_triton

    c = make_case(2, 3, 2, 1, 16, 20, 0, False, False, seed=4, device=DEVICE)
    nn = torch.tensor([1, 0], dtype=torch.int32, device=DEVICE)
    out, lse = latent_attention_fwd_triton(c["q"], c["k_cache"], c["v_cache"], c["cache_seqlens"], None, nn, None,
                                           None, False, 0.25, True)  # the launcher's default tiles
    assert out[0, 1:].abs().max() == 0 and out[1].abs().max() == 0
    assert torch.isneginf(lse[0, :, 1:]).all() and torch.isneginf(lse[1]).all()
    assert torch.isfinite(lse[0, :, 0]).all() and out[0, 0].abs().max() > 0


# Cache lengths of the split-KV cases (Tmax = 64, 16-key blocks): an empty cache, one key, block boundaries
# (15/16/17, 32) and a cache full to its last row after the append.
SPLIT_LENGTHS = [0, 1, 15, 16, 17, 32, 63]


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("num_splits", [1, 2, 3, 5])
@pytest.mark.parametrize("Sq,causal", [(1, True), (3, True), (2, False)])
def test_split_kv_forward_matches_reference(group, num_splits, Sq, causal):
    """Flash-decoding: each split of the key range writes (m, l, acc) and the combine kernel merges them; the
    result equals the reference for every split count, GQA ratio and length (ragged, 0 new rows included)."""
    from coconut_kernels.triton.latent_attention import latent_attention_fwd_triton

    B, Hkv, D, Tmax = len(SPLIT_LENGTHS), 2, 24, 64  # D not a power of two: masked head dims
    c = make_case(B, Sq, Hkv * group, Hkv, D, Tmax, 0, False, True, seed=17 * group + num_splits, device=DEVICE)
    cs = torch.tensor([min(x, Tmax - Sq) for x in SPLIT_LENGTHS], dtype=torch.int32, device=DEVICE)
    nn = c["new_seqlens"]
    nn[1] = 0  # a sequence with no valid new row: out 0, lse -inf
    lp = torch.zeros_like(cs)
    lp[4] = 3  # left padding inside the first key block
    out, lse = latent_attention_fwd_triton(c["q"], c["k_cache"], c["v_cache"], cs, lp, nn, None, None, False,
                                           D ** -0.5, causal, block_n=16, num_splits=num_splits)
    out64, lse64 = R.latent_attention_fwd_reference(_f64(c["q"]), _f64(c["k_cache"]), _f64(c["v_cache"]), cs, lp,
                                                    nn, None, None, False, D ** -0.5, causal)
    torch.testing.assert_close(_f64(out), out64, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(_f64(lse), lse64, atol=2e-5, rtol=1e-4)
    assert torch.isneginf(lse[1]).all() and out[1].abs().max() == 0


def test_split_count_heuristic_fills_two_waves():
    from coconut_kernels.triton.latent_attention import num_kv_splits

    # Decode of one sequence with 8 kv heads over a 4k cache: 8 programs -> 33 splits (264 programs).
    assert num_kv_splits(8, 4096) == 16  # capped by 256 keys per split
    assert num_kv_splits(8, 131072) == 33
    assert num_kv_splits(8 * 64, 131072) == 1  # B * Hkv already past two waves
    assert num_kv_splits(1, 100) == 1  # a short cache is not split
    assert num_kv_splits(4, 1 << 20, sms=108) == 54


def test_decode_block_m_is_the_group():
    """At decode the query block holds the GQA group's heads only: BLOCK_M = next power of two of the group."""
    from coconut_kernels.triton import aot

    for group, block_m in ((1, 1), (4, 4), (6, 8), (8, 8)):
        launches = aot.record_all([("decode", lambda g=group: aot.attention_calls(
            2, 1, 4 * g, 4, 128, 2048, torch.bfloat16, backward=False))])
        (fwd,) = [x for x in launches if x.name == "latent_attention._fwd_kernel"]
        assert fwd.kwargs["BLOCK_M"] == block_m
        assert fwd.kwargs["SPLIT"]  # 8 programs: split to fill the GPU, merged by the combine kernel
        assert any(x.name == "latent_attention._fwd_combine_kernel" for x in launches)


def test_bad_rotary_table_raises():
    from coconut_kernels.triton.latent_attention import latent_attention_fwd_triton

    c = make_case(1, 1, 1, 1, 16, 8, 0, False, False, seed=5, device=DEVICE)
    cos = torch.randn(8, 10, device=DEVICE)
    with pytest.raises(ValueError, match="rotary_dim"):
        latent_attention_fwd_triton(c["q"], c["k_cache"], c["v_cache"], c["cache_seqlens"], None, None, cos, cos,
                                    False, 0.25, True)


# ---- on a GPU (benchmarks/gpu_check.sh) ------------------------------------------------------------------


@pytest.mark.cuda
@requires_cuda
class TestOnGPU:
    """The CUDA C++ kernels and the Triton kernels on an NVIDIA GPU, fp32 and bf16."""

    SHAPES = [  # (B, Sq, Hq, Hkv, D, Tmax, rot_dim, interleaved, causal, leftpad, ragged)
        (4, 1, 8, 2, 128, 700, 64, False, True, True, False),
        (3, 1, 4, 4, 80, 300, 80, True, True, False, True),
        (2, 5, 6, 2, 64, 129, 0, False, False, True, True),
        (2, 16, 4, 1, 256, 90, 32, False, True, True, True),
        (2, 1, 2, 1, 20, 50, 10, True, True, False, False),  # D % 8 != 0: the unvectorised path
    ]

    def _run(self, backend, case, dtype):
        import coconut_kernels  # noqa: F401  (registers torch.ops.coconut.*)
        from coconut_kernels.triton import latent_attention as tla

        B, Sq, Hq, Hkv, D, Tmax, rd, il, causal, leftpad, ragged = case
        c = make_case(B, Sq, Hq, Hkv, D, Tmax, rd, leftpad, ragged, seed=11, dtype=dtype, device="cuda")
        lens = (c["cache_seqlens"], c["cache_leftpad"], c["new_seqlens"])
        rot = (c["cos"], c["sin"], il)
        scale = D ** -0.5
        if backend == "cuda":
            append, fwd, bwd = (torch.ops.coconut.kv_cache_append_, torch.ops.coconut.latent_attention_fwd,
                                torch.ops.coconut.latent_attention_bwd)
        else:
            append, fwd, bwd = tla.kv_cache_append_triton, tla.latent_attention_fwd_triton, \
                tla.latent_attention_bwd_triton
        k_cache, v_cache = c["k_cache"].clone(), c["v_cache"].clone()
        append(k_cache, v_cache, c["k_new"], c["v_new"], *lens, *rot)
        out, lse = fwd(c["q"], k_cache, v_cache, *lens, *rot, scale, causal)
        grad_out = torch.randn_like(out)
        gk = torch.zeros(k_cache.shape, device="cuda")
        gv = torch.zeros_like(gk)
        dq = bwd(grad_out, c["q"], k_cache, v_cache, out, lse, *lens, *rot, scale, causal, gk, gv)

        cpu = {k: _f64(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in c.items()}
        lens_cpu = tuple(None if x is None else x.cpu() for x in lens)
        k_ref, v_ref = append_ref(cpu["k_cache"], cpu["v_cache"], cpu["k_new"], cpu["v_new"], *lens_cpu,
                                  cpu["cos"], cpu["sin"], il)
        q64 = cpu["q"].requires_grad_()
        k64, v64 = k_ref.clone().requires_grad_(), v_ref.clone().requires_grad_()
        out64, lse64 = R.latent_attention_fwd_reference(q64, k64, v64, *lens_cpu, cpu["cos"], cpu["sin"], il, scale, causal)
        out64.backward(grad_out.double().cpu())
        # PyTorch's own error in this dtype: the same reference computed in `dtype` on the GPU.
        ql = c["q"].detach().clone().requires_grad_()
        kl = k_ref.to("cuda", dtype).requires_grad_()
        vl = v_ref.to("cuda", dtype).requires_grad_()
        out_l, _ = R.latent_attention_fwd_reference(ql, kl, vl, *lens, c["cos"], c["sin"], il, scale, causal)
        out_l.backward(grad_out)
        tol = dict(factor=2.0, atol=1e-5 if dtype == torch.float32 else 1e-3)
        assert_within_torch_error(k_cache, k_ref, kl.detach(), name="k_cache", **tol)
        assert_within_torch_error(out, out64, out_l, name="out", **tol)
        torch.testing.assert_close(lse.cpu().double(), lse64.detach(), atol=1e-2 if dtype != torch.float32 else 1e-4,
                                   rtol=1e-3)
        assert_within_torch_error(dq, q64.grad, ql.grad, name="dq", **tol)
        assert_within_torch_error(gk, k64.grad, kl.grad, name="grad_k_cache", **tol)
        assert_within_torch_error(gv, v64.grad, vl.grad, name="grad_v_cache", **tol)

    @pytest.mark.parametrize("backend", ["cuda", "triton"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
    @pytest.mark.parametrize("case", SHAPES, ids=[_ids(c) for c in SHAPES])
    def test_matches_reference(self, backend, dtype, case):
        from coconut_kernels.backend import has_cuda_kernels

        if backend == "cuda" and not has_cuda_kernels("latent_attention_fwd"):
            pytest.skip("the extension was built without CUDA kernels")
        self._run(backend, case, dtype)

    def test_decode_step_captures_in_cuda_graph(self):
        import coconut_kernels  # noqa: F401
        from coconut_kernels.backend import has_cuda_kernels

        if not has_cuda_kernels("latent_attention_fwd"):
            pytest.skip("the extension was built without CUDA kernels")
        B, Hq, Hkv, D, Tmax = 4, 8, 2, 128, 512
        c = make_case(B, 1, Hq, Hkv, D, Tmax, 0, False, False, seed=12, dtype=torch.bfloat16, device="cuda")
        k_cache, v_cache = c["k_cache"].clone(), c["v_cache"].clone()
        cs = torch.tensor([0, 5, 300, Tmax - 4], dtype=torch.int32, device="cuda")

        def step():
            return torch.ops.coconut.latent_attention(c["q"], c["k_new"], c["v_new"], k_cache, v_cache, cs)

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()  # warm-up outside the graph
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, lse = step()
        for _ in range(3):  # the lengths move on between replays: the graph reads them from the device
            cs.add_(1)
            graph.replay()
            torch.cuda.synchronize()
            k_exp, v_exp = k_cache.clone(), v_cache.clone()
            eager_out, eager_lse = torch.ops.coconut.latent_attention_fwd(
                c["q"], k_exp, v_exp, cs, None, None, None, None, False, D ** -0.5, True)
            torch.testing.assert_close(out, eager_out)
            torch.testing.assert_close(lse, eager_lse)
            torch.testing.assert_close(k_cache[torch.arange(B), cs.long()].float(), c["k_new"][:, 0].float())

"""GPU readiness checked on the CPU: launch grids of every Triton launcher at extreme shapes (recorded on meta
tensors), the CUDA C++ launch configurations (a plain C++ harness over csrc/cuda/launch_config.h), the dK/dV
tiles against each target's shared memory (compiled ahead of time), and the default backend."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.helpers import requires_triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (B, Sq, Hq, Hkv, D, Tmax): decode of 2048 sequences with 32 kv heads (B * Hkv = 65,536 programs, one past
# grid axis 1's limit), a 128k-token prefill with 64 query heads, a cache of 128k tokens x 64 heads x 256 dims
# (Tmax * Hkv * D = 2^31: int32 offsets overflow), a training pass of a 70B model, and decode of one sequence
# over a 1M-token cache with one kv head (split-KV at its widest: 264 splits and their combine).
EXTREME_ATTENTION = [(2048, 1, 32, 32, 128, 4096), (2048, 1, 64, 8, 128, 4096), (1, 131072, 64, 8, 128, 131072),
                     (1, 1, 64, 64, 256, 131072), (64, 4096, 64, 8, 128, 4096), (1, 1, 8, 1, 128, 1 << 20)]


def test_default_cuda_backend_is_triton(monkeypatch):
    import coconut_kernels as ck

    monkeypatch.delenv("COCONUT_BACKEND", raising=False)
    ck.set_backend(None)
    assert ck.get_backend("cuda") == "triton"
    assert ck.get_backend("cpu") == "cpu"
    ck.set_backend("cuda")
    try:
        assert ck.get_backend("cuda") == "cuda"
    finally:
        ck.set_backend(None)


def test_cuda_forward_routing():
    """The "cuda" backend keeps its split-KV forward for the few query rows of decode and latent passes and sends
    multi-row passes (prefix passes) to the tiled Triton forward; without Triton everything stays split-KV."""
    from coconut_kernels.ops.latent_attention import SPLIT_KV_MAX_QUERIES, cuda_forward_kernel

    assert SPLIT_KV_MAX_QUERIES == 8
    assert [cuda_forward_kernel(sq, True) for sq in (1, 2, 6, 8)] == ["split_kv"] * 4
    assert [cuda_forward_kernel(sq, True) for sq in (9, 64, 300, 131072)] == ["tiled"] * 4
    assert cuda_forward_kernel(300, False) == "split_kv"


@requires_triton
@pytest.mark.parametrize("Sq", [1, 12])
def test_cuda_backend_routes_multi_row_passes_to_tiled_forward(Sq, monkeypatch):
    """The "cuda" backend's dispatch run on CPU tensors (the ops' CPU kernels stand in for the CUDA ones, Triton
    runs interpreted): Sq = 1 runs the C++ composite op (split-KV on a GPU), Sq = 12 the C++ append then the
    Triton tiled forward; forward and gradients equal the reference either way."""
    from coconut_kernels import reference
    from coconut_kernels.ops import latent_attention as la
    from coconut_kernels.triton import latent_attention as tri

    from tests.test_latent_attention import make_case

    calls = []
    tiled = tri.latent_attention_fwd_triton
    monkeypatch.setattr(tri, "latent_attention_fwd_triton", lambda *a, **k: calls.append(Sq) or tiled(*a, **k))
    monkeypatch.setattr(la, "get_backend", lambda device: "cuda")
    c = make_case(2, Sq, 4, 2, 32, 40, rotary_dim=16, leftpad=True, ragged=True, seed=Sq)

    def run(fn):
        q, kn, vn = (c[n].float().clone().requires_grad_() for n in ("q", "k_new", "v_new"))
        kc, vc = c["k_cache"].float().clone(), c["v_cache"].float().clone()
        out = fn(q, kn, vn, kc, vc, c["cache_seqlens"], cache_leftpad=c["cache_leftpad"],
                 new_seqlens=c["new_seqlens"], rotary_cos=c["rotary_cos"].float(),
                 rotary_sin=c["rotary_sin"].float())
        out.backward(torch.ones_like(out))
        return out, q.grad, kn.grad, vn.grad

    got = run(la.latent_attention)
    assert calls == ([Sq] if Sq > la.SPLIT_KV_MAX_QUERIES else [])
    want = run(lambda *a, **kw: reference.latent_attention_reference(*a, **kw)[0])  # autograd through the copy
    for g, r in zip(got, want):
        assert g is not None and r is not None
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@requires_triton
@pytest.mark.parametrize("shape", EXTREME_ATTENTION, ids=lambda s: "B{}_Sq{}_Hq{}_Hkv{}_D{}_T{}".format(*s))
@pytest.mark.parametrize("cc", [80, 90])
def test_triton_attention_grids_are_legal(shape, cc, monkeypatch):
    from coconut_kernels.triton import aot
    from coconut_kernels.triton import latent_attention as la

    B, Sq, Hq, Hkv, D, Tmax = shape
    monkeypatch.setattr(la, "_capability", lambda device: cc)
    launches = aot.record_all([("extreme", lambda: aot.attention_calls(B, Sq, Hq, Hkv, D, Tmax, torch.bfloat16,
                                                                       rotary=True))])
    assert {x.name.rsplit(".", 1)[-1] for x in launches} >= {"_append_kernel", "_fwd_kernel", "_bwd_dkdv_kernel",
                                                              "_bwd_dq_kernel", "_unrotate_kernel"}
    assert aot.grid_errors(launches) == []
    # Every grid is 1-D: the (b, head) index is folded into axis 0.
    assert all(len(x.grid) == 1 for x in launches if x.name.startswith("latent_attention"))


@requires_triton
def test_grid_check_catches_axis_1_overflow():
    from coconut_kernels.triton import aot

    class K:  # the shape of a recorded launch with the old (blocks, B * Hkv) grid of decode at B=2048, Hkv=32
        fn = type("F", (), {"__module__": "m", "__name__": "k"})

    bad = aot.Launch("decode", K, (), {}, (1, 2048 * 32))
    assert aot.grid_errors([bad]) and "exceeds" in aot.grid_errors([bad])[0]


@requires_triton
def test_triton_feedback_and_soft_embedding_grids_are_legal():
    from coconut_kernels.triton import aot

    launches = aot.record_all([
        ("feedback", lambda: aot.feedback_calls(65536, 64, 4096, 8192, torch.bfloat16, "layernorm")),
        ("soft", lambda: aot.soft_embedding_calls(65536, 128256, 8192, torch.bfloat16, 50, 0.9))])
    names = sorted(x.name.rsplit(".", 1)[-1] for x in launches)
    # The soft-embedding backward reruns the forward pass (fp32 out, for grad_out . out) before its kernels.
    assert names == sorted(["_latent_feedback_fwd_kernel", "_latent_feedback_bwd_kernel", "_threshold_kernel",
                            "_fwd_kernel", "_fwd_kernel", "_bwd_logits_kernel", "_bwd_weight_kernel"]), names
    assert aot.grid_errors(launches) == []


def test_occupancy_model():
    from coconut_kernels.triton import aot

    a100 = aot.TARGETS[80]
    # 128 threads, 24 registers, no shared memory: the 64-warp limit binds (16 blocks of 4 warps).
    assert aot.occupancy(a100, 24, 0, 4) == (64, "warps")
    # 255 registers: 8,192 per warp -> 8 warps per SM.
    assert aot.occupancy(a100, 255, 0, 4) == (8, "registers")
    # 100 KB of shared memory: one block per SM.
    assert aot.occupancy(a100, 32, 100 * 1024, 4) == (4, "shared memory")
    assert aot.occupancy(a100, 32, 200 * 1024, 4)[0] == 0


def test_parse_ptxas():
    from coconut_kernels.triton import aot

    log = textwrap.dedent("""\
        ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
        ptxas info    : Function properties for _Z3fooPf
            16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
        ptxas info    : Used 217 registers, 1024 bytes smem, 380 bytes cmem[0]
        ptxas info    : Compiling entry function 'bar' for 'sm_90a'
        ptxas info    : Used 40 registers, used 1 barriers
        """)
    f = aot.parse_ptxas(log)
    assert [(x["function"], x["regs"], x["spill_stores"], x["spill_loads"], x["stack"], x["static_smem"])
            for x in f] == [("_Z3fooPf", 217, 8, 12, 16, 1024), ("bar", 40, 0, 0, 0, 0)]


# ---- CUDA C++ launch configurations ----------------------------------------------------------------------

HARNESS = r"""
#include <cstdio>
#include "cuda/launch_config.h"
using namespace coconut::launch;
static void show(const char* name, const Shape& s) {
  std::printf("%s %lld %lld %lld %d %d %d\n", name, (long long)s.grid_x, (long long)s.grid_y, (long long)s.grid_z,
              s.block_x, s.block_y, (int)s.in_regs);
}
int main() {
  // latent_feedback: 70B-model rows (d = 8192) and beyond, fp32/bf16 (vec 4/8) and unaligned (vec 1), with the
  // block bounded by registers: 217 registers -> maxThreadsPerBlock 288, 64 registers -> 1024.
  const long long ds[] = {1, 768, 8192, 13000, 17000, 65536};
  const int vecs[] = {1, 4, 8};
  const int maxt[] = {288, 1024};
  for (long long d : ds) for (int v : vecs) for (int m : maxt) {
    char name[64];
    std::snprintf(name, sizeof name, "feedback_d%lld_v%d_m%d", d, v, m);
    show(name, feedback_shape(65536, d, v, m));
  }
  // latent_attention at extreme shapes (B, Sq, Hq, Hkv, Tmax), 132 SMs.
  const long long shapes[][5] = {{2048, 1, 32, 32, 4096}, {2048, 1, 64, 8, 4096}, {1, 131072, 64, 8, 131072},
                                 {1, 1, 64, 64, 131072}, {64, 4096, 64, 8, 4096}};
  for (auto& a : shapes) {
    show("append", append_shape(a[0], a[1]));
    show("fwd_split", fwd_split_shape(a[0], a[1], a[2], a[3], a[4], 132));
    show("per_row", per_query_row_shape(a[0], a[1], a[2], "x"));
    for (long long D : {64, 128, 256}) {  // the backward at every head-dim tile
      show("bwd_delta", bwd_delta_shape(a[0], a[1], a[2]));
      show("bwd_dkdv", bwd_dkdv_shape(a[0], a[3], a[4], D));
      Shape dq = bwd_dq_shape(a[0], a[1], a[2], a[3], D);
      char name[64];
      std::snprintf(name, sizeof name, "bwd_dq_split%d", dq.key_split);
      show(name, dq);
    }
  }
  try {
    per_query_row_shape(1LL << 20, 1LL << 12, 1LL << 10, "too big");
    std::printf("no error\n");
  } catch (const std::invalid_argument& e) {
    std::printf("error %s\n", e.what());
  }
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_cuda_launch_configs_are_legal(tmp_path):
    src = tmp_path / "harness.cpp"
    src.write_text(HARNESS)
    exe = tmp_path / "harness"
    subprocess.run(["g++", "-std=c++17", "-O1", "-I", os.path.join(ROOT, "csrc"), str(src), "-o", str(exe)],
                   check=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()
    assert lines[-1].startswith("error too big: the shape needs a grid of")
    rows = [ln.split() for ln in lines[:-1]]
    assert len(rows) == 6 * 3 * 2 + 5 * (3 + 3 * 3)
    for name, gx, gy, gz, bx, by, in_regs in rows:
        gx, gy, gz, bx, by = map(int, (gx, gy, gz, bx, by))
        assert 0 < gx < 2**31 and 0 < gy <= 65535 and 0 < gz <= 65535, name
        threads = bx * by
        assert threads % 32 == 0 and threads <= 1024, name
        if name.startswith("feedback"):
            d, vec, max_threads = (int(p[1:]) for p in name.split("_")[1:])
            assert threads <= max_threads, name
            # A row in registers holds its d / vec chunks in 32 elements per thread; else the loop path.
            if in_regs == "1":
                lanes = bx
                assert d // vec <= lanes * (32 // vec), name
    # The backward's grids are 1-D (B * heads folded into x); the dQ key split is 8 at decode (Sq = 1), 1 for
    # the 128k-token prefill.
    bwd = [r for r in rows if r[0].startswith("bwd_")]
    assert len(bwd) == 5 * 3 * 3 and all(r[2:4] == ["1", "1"] and r[4] == "256" for r in bwd)
    dq = [r[0] for r in rows if r[0].startswith("bwd_dq")]
    assert dq[:3] == ["bwd_dq_split8"] * 3 and dq[6:9] == ["bwd_dq_split1"] * 3
    by_name = {r[0]: r for r in rows}
    # d = 17000 fp32 (vec 4) at 217 registers: 288 threads, the row re-read in a loop (the launch that failed
    # with 1024 threads before the bound).
    assert by_name["feedback_d17000_v4_m288"][4:] == ["288", "1", "0"]


# ---- ahead-of-time compilation ------------------------------------------------------------------------------

AOT_CHECK = r"""
import sys, torch
from coconut_kernels.triton import aot, latent_attention as la
bad = []
for cc in (80, 90):
    la._capability = lambda device, cc=cc: cc
    for D, dtype in ((256, torch.float32), (128, torch.float32), (128, torch.bfloat16)):
        launches = aot.record_all([("x", lambda: aot.attention_calls(2, 300, 32, 8, D, 1024, dtype, rotary=True))])
        (dkdv,) = [x for x in launches if x.name.endswith("_bwd_dkdv_kernel")]
        row = aot.compile_launch(dkdv, cc)
        print(cc, D, dtype, row["status"], row.get("shared_bytes"), aot.TARGETS[cc].smem_per_block, flush=True)
        if row["status"] not in ("ok", "spills"):
            bad.append(row)
sys.exit(1 if bad else 0)
"""


@requires_triton
def test_dkdv_tiles_fit_each_target_shared_memory():
    """The dK/dV configurations chosen per target compile for sm_80 and sm_90 within each one's shared memory, at
    the tightest cases (fp32 and bf16 with rotary at head dims 128 and 256). Needs Triton's NVIDIA backend (its
    bundled ptxas), not a GPU."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", AOT_CHECK], env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert len([ln for ln in r.stdout.splitlines() if ln.startswith(("80 ", "90 "))]) == 6


NO_SPILL_CHECK = r"""
import sys, torch
from coconut_kernels.triton import aot
cc = int(sys.argv[1])
cases = [("soft bf16", lambda: aot.soft_embedding_calls(8, 50257, 768, torch.bfloat16, 50, 0.9)),
         ("soft fp32", lambda: aot.soft_embedding_calls(8, 50257, 768, torch.float32, 0, 1.0)),
         ("decode bf16", lambda: aot.attention_calls(2, 1, 32, 8, 128, 1024, torch.bfloat16, rotary=True,
                                                     backward=False)),
         ("decode fp32", lambda: aot.attention_calls(1, 1, 8, 8, 256, 4096, torch.float32, backward=False))]
bad = []
for la in aot.unique(aot.record_all(cases, cc), cc):
    if not la.name.endswith(("_fwd_kernel", "_combine_kernel")):
        continue
    row = aot.compile_launch(la, cc)
    print(cc, la.name, la.scenario, row["status"], row.get("regs"), row.get("spill_stores"), flush=True)
    if row["status"] != "ok":
        bad.append(row)
sys.exit(1 if bad else 0)
"""


@requires_triton
@pytest.mark.parametrize("cc", [90])
def test_streaming_kernels_compile_without_spills(cc):
    """The soft-embedding forward (bf16 with a filter and a split vocabulary, fp32 without) and the split-KV
    decode forward (bf16 with rotary, fp32 at head dim 256) with their combine kernels compile for sm_90 with
    no register spills at the tiles the launchers choose (sm_80 is in benchmarks/results/gpu_static.csv)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", NO_SPILL_CHECK, str(cc)], env=env, capture_output=True, text=True,
                       timeout=1500)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert len([ln for ln in r.stdout.splitlines() if ln.startswith(f"{cc} ")]) >= 6

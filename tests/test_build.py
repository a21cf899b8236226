"""The standalone CMake build: CMakeLists.txt builds the op library against libtorch alone, and a process
that never imports coconut_kernels loads it with torch.ops.load_library and gets working ops."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

LOAD_AND_RUN = textwrap.dedent("""
    import sys, torch
    torch.ops.load_library(sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    import importlib.util
    spec = importlib.util.spec_from_file_location("reference", sys.argv[2] + "/coconut_kernels/reference.py")
    ref = importlib.util.module_from_spec(spec); spec.loader.exec_module(ref)
    g = torch.Generator().manual_seed(0)
    embeds, hidden = torch.randn(3, 7, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    w, b = torch.randn(11, generator=g), torch.randn(11, generator=g)
    bi, dst, src = torch.tensor([0, 2, 1]), torch.tensor([4, 6, 0]), torch.tensor([3, 4, 2])
    expected = ref.latent_feedback_reference(embeds, hidden, bi, dst, src, norm="layernorm", weight=w, bias=b)
    torch.ops.coconut.latent_feedback_(embeds, hidden, bi, dst, src, "layernorm", w, b, 1e-5)
    torch.testing.assert_close(embeds, expected)
    q, kn, vn = (torch.randn(2, 3, 4, 16, generator=g) for _ in range(3))
    kc, vc = torch.randn(2, 20, 4, 16, generator=g), torch.randn(2, 20, 4, 16, generator=g)
    lens = torch.tensor([5, 9], dtype=torch.int32)
    kc2, vc2 = kc.clone(), vc.clone()
    out, lse = torch.ops.coconut.latent_attention(q, kn, vn, kc, vc, lens)
    out_ref, lse_ref = ref.latent_attention_reference(q, kn, vn, kc2, vc2, lens)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kc, kc2)
    print("ok", sorted(n for n in dir(torch.ops.coconut) if not n.startswith("_"))[:20])
""")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_loads_with_torch_ops_load_library(tmp_path):
    build = tmp_path / "build"
    prefix = torch.utils.cmake_prefix_path
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}"], check=True,
                   capture_output=True, text=True)
    done = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lib = build / "libcoconut_ops.so"
    assert lib.exists()
    run = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(lib), str(ROOT)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "latent_feedback_" in run.stdout and "latent_attention" in run.stdout

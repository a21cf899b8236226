"""The CPU kernels' instruction-set copies (AVX-512, AVX2+FMA, baseline): the switch, and every kernel test module
run again under each copy the CPU has below its best (the rest of the suite runs the best one)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import coconut_kernels as ck
from coconut_kernels import CoconutError
from coconut_kernels.backend import CPU_ISAS

ROOT = Path(__file__).resolve().parent.parent
# The test modules of the kernels compiled once per instruction set (csrc/cpu/isa_kernels.h) and of skinny_linear's
# AVX2 path, and the model-level tests that run them through the cache.
KERNEL_TESTS = ["tests/test_latent_attention.py", "tests/test_gelu.py", "tests/test_argmax.py",
                "tests/test_skinny_linear.py", "tests/test_deferred_kv_grad.py"]


def _supported() -> str:
    """The best instruction set the CPU has (the cap lifted, then restored)."""
    before = ck.cpu_isa()
    best = ck.set_cpu_isa("avx512")
    ck.set_cpu_isa(before)
    return best


def _below_best() -> list[str]:
    best = _supported()
    return list(CPU_ISAS[:CPU_ISAS.index(best)])


@pytest.fixture
def restore_isa():
    before = ck.cpu_isa()
    yield
    ck.set_cpu_isa(before)


def test_set_cpu_isa_caps_and_never_exceeds_the_cpu(restore_isa):
    best = _supported()
    for name in CPU_ISAS:
        got = ck.set_cpu_isa(name)
        expected = CPU_ISAS[min(CPU_ISAS.index(name), CPU_ISAS.index(best))]
        assert got == expected == ck.cpu_isa()
        assert torch.ops.coconut._cpu_isa("") == expected


@pytest.mark.parametrize("name", ["sse", "", "AVX2", None])
def test_set_cpu_isa_rejects_unknown_names(name, restore_isa):
    before = ck.cpu_isa()
    with pytest.raises(CoconutError, match="name must be one of"):
        ck.set_cpu_isa(name)
    assert ck.cpu_isa() == before


def test_the_op_rejects_unknown_names(restore_isa):
    before = ck.cpu_isa()
    with pytest.raises(ValueError, match="isa must be base, avx2 or avx512, got 'x87'"):
        torch.ops.coconut._cpu_isa("x87")
    assert ck.cpu_isa() == before


def _run(code: str, isa: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COCONUT_CPU_ISA": isa}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


def test_environment_variable_caps_the_isa():
    best = _supported()
    done = _run("import coconut_kernels as ck; print(ck.cpu_isa())", "base")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "base"
    done = _run("import coconut_kernels as ck; print(ck.cpu_isa())", "avx512")
    assert done.stdout.strip() == best


def test_environment_variable_with_an_unknown_name_is_an_error():
    done = _run("import torch, coconut_kernels; torch.ops.coconut.gelu_tanh(torch.randn(8))", "avx1024")
    assert done.returncode != 0
    assert "COCONUT_CPU_ISA must be base, avx2 or avx512, got 'avx1024'" in done.stderr


def test_copies_agree_on_attention_and_gelu(restore_isa):
    """Each copy against the best one on the same inputs (fp32: float rounding apart, as the vector widths
    order the sums differently); the kernel test modules below check each against the fp64 reference."""
    g = torch.Generator().manual_seed(0)
    B, Sq, H, D, prefix = 3, 37, 2, 80, 50
    kc, vc = torch.randn(B, prefix + Sq, H, D, generator=g), torch.randn(B, prefix + Sq, H, D, generator=g)
    q, do = torch.randn(B, Sq, H, D, generator=g), torch.randn(B, Sq, H, D, generator=g)
    seql = torch.tensor([prefix, prefix - 7, 3], dtype=torch.int32)
    x = torch.randn(1000, generator=g) * 4

    def run():
        out, lse = torch.ops.coconut.latent_attention_fwd(q, kc, vc, seql, None, None, None, None, False,
                                                          D ** -0.5, True)
        gk, gv = torch.zeros_like(kc), torch.zeros_like(vc)
        dq = torch.ops.coconut.latent_attention_bwd(do, q, kc, vc, out, lse, seql, None, None, None, None, False,
                                                    D ** -0.5, True, gk, gv)
        gelu = torch.ops.coconut.gelu_tanh(x)
        return [out, lse, dq, gk, gv, gelu, torch.ops.coconut.gelu_tanh_backward(do.flatten()[:1000], x)]

    if not _below_best():
        pytest.skip("this CPU runs the baseline copy only: there is no other copy to compare")
    best = run()
    for name in _below_best():
        assert ck.set_cpu_isa(name) == name
        for a, b in zip(run(), best):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", [i for i in CPU_ISAS if i != "avx512"])
def test_kernel_tests_pass_under_each_lower_isa(isa):
    if isa not in _below_best():
        pytest.skip(f"this CPU's best instruction set is {_supported()}: the suite itself runs it")
    env = {**os.environ, "COCONUT_CPU_ISA": isa}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *KERNEL_TESTS],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1], done.stdout[-2000:]

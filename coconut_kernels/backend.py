"""Which implementation runs an op on CUDA tensors, which instruction set the CPU kernels use, and the debug
switch.

CPU tensors always run the C++ CPU kernels, compiled once per instruction set (AVX-512, AVX2+FMA, the baseline
x86-64 ISA) and run in the best one the CPU has; `set_cpu_isa(...)` or the environment variable COCONUT_CPU_ISA
(base | avx2 | avx512, read at the first kernel call) caps it, `cpu_isa()` says which runs.

For CUDA tensors the choice is `set_backend(...)` or the environment variable COCONUT_BACKEND: "triton" (the
default), "cuda" (the compiled CUDA C++ kernels), or "torch" (the plain-PyTorch reference, for debugging).
COCONUT_DEBUG=1 validates device-side values (indices, lengths) of CUDA tensors as well, at the price of a host
sync; CPU tensors are always validated.
"""
from __future__ import annotations

import os

import torch

from .errors import CoconutError

BACKENDS = ("cuda", "triton", "torch")
CPU_ISAS = ("base", "avx2", "avx512")
_backend: str | None = None


def set_backend(name: str | None) -> None:
    """Select the implementation used for CUDA tensors; None restores the default."""
    global _backend
    if name is not None and name not in BACKENDS:
        raise CoconutError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    _backend = name


def has_cuda_kernels(op: str = "latent_feedback_") -> bool:
    """Whether the compiled extension registered CUDA kernels (it is built without them on machines with
    no CUDA toolkit)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"coconut::{op}", "CUDA")


def get_backend(device: torch.device | str) -> str:
    """The backend that runs on `device`: "cpu" for CPU tensors, else the selected GPU backend.

    Default on CUDA: Triton, the GPU backend whose kernels the test suite exercises (in the interpreter) and CI
    compiles for sm_80/sm_90 (`python -m coconut_kernels.triton.aot`). The CUDA C++ kernels are one
    `set_backend("cuda")` away; they become the default only where benchmarks/gpu_check.sh has measured them
    correct and faster on a GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    name = _backend or os.environ.get("COCONUT_BACKEND") or None
    if name is None:
        return "triton"
    if name not in BACKENDS:
        raise CoconutError(f"COCONUT_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def cpu_info(field: str) -> str:
    """The first value of `field` in /proc/cpuinfo ("vendor_id", "model name", ...), "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_isa() -> str:
    """The instruction set the CPU kernels run: "avx512", "avx2" or "base" (the best the CPU has, capped by
    COCONUT_CPU_ISA or set_cpu_isa)."""
    return torch.ops.coconut._cpu_isa("")


def set_cpu_isa(name: str) -> str:
    """Cap the CPU kernels' instruction set at `name` ("base", "avx2" or "avx512"; never above what the CPU has),
    process-wide; returns the one that now runs. The copies give the same results up to float rounding (vector
    widths differ, so sums are ordered differently); the switch is for tests and A/B timings."""
    if name not in CPU_ISAS:
        raise CoconutError(f"name must be one of {CPU_ISAS}, got {name!r}")
    return torch.ops.coconut._cpu_isa(name)


def debug_checks() -> bool:
    """True when COCONUT_DEBUG is set to a non-empty value other than 0."""
    return os.environ.get("COCONUT_DEBUG", "0") not in ("", "0")


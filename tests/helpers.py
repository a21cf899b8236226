"""Shared test utilities: random inputs and the accuracy rule of the project.

Accuracy rule (flash-attention's): an op's error in a low precision, measured against a float64
reference, must be no more than `factor` times the error of plain PyTorch computing the same thing in
that precision (plus a small absolute floor for outputs that are exactly representable).
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_torch_error(out, ref64, torch_lowp, factor: float = 2.0, atol: float = 1e-6, name: str = "out"):
    """out (low precision) vs ref64 must be within `factor` x the error of torch_lowp vs ref64."""
    err = max_err(out, ref64)
    base = max_err(torch_lowp, ref64)
    assert err <= factor * base + atol, f"{name}: error {err:.3e} > {factor} x PyTorch's {base:.3e} + {atol}"

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

# The transformers GPT-2 that tests compare against runs its eager attention, the same math on every version
# pyproject allows (>= 4.46). Its SDPA path has two bugs in the lowest ones: (1) before 4.52 a padding mask goes
# through AttentionMaskConverter._make_causal_mask, whose torch.full((T, T), torch.finfo(dtype).min) lacks dtype=,
# so the mask is float32 and an fp64 model fails with "value cannot be converted to type float without overflow";
# (2) 4.46's GPT2SdpaAttention calls scaled_dot_product_attention with its default scale, ignoring
# scale_attn_weights and scale_attn_by_inverse_layer_idx.
HF_GPT2_EAGER = {"attn_implementation": "eager"}


def transformers_version() -> tuple[int, int]:
    """(major, minor) of the installed transformers."""
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(minor)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_torch_error(out, ref64, torch_lowp, factor: float = 2.0, atol: float = 1e-6, name: str = "out"):
    """out (low precision) vs ref64 must be within `factor` x the error of torch_lowp vs ref64."""
    err = max_err(out, ref64)
    base = max_err(torch_lowp, ref64)
    assert err <= factor * base + atol, f"{name}: error {err:.3e} > {factor} x PyTorch's {base:.3e} + {atol}"


class CharTokenizer:
    """One character per token id: decoded text and token positions line up."""
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

    def decode(self, ids):
        return "".join(self.chars[t] for t in ids)

    def encode(self, text):
        return [self.chars.index(c) for c in text]


def op_calls(fn, *names: str) -> int:
    """How many times fn() dispatches the ops `names` ("coconut.gelu_tanh", ...), counted below autograd."""
    from coconut_kernels.bench.harness import AtenCalls

    with AtenCalls() as mode:
        fn()
    return sum(mode.calls[name] for name in names)


def loss_and_grads(lm, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step of `lm` on a collated batch: the loss and a copy of every parameter's gradient."""
    lm.zero_grad()
    out = lm(batch["input_ids"], batch["attention_mask"], batch["labels"], batch.get("position_ids"))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}

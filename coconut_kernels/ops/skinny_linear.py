"""skinny_linear: a linear layer on a few rows on the CPU (a latent pass, a decode step: one row per sequence).

At 1-16 rows BLAS packs the weight before it multiplies, which reads and writes the whole weight to use it
against a handful of rows; csrc/cpu/skinny_linear.cpp streams the weight once instead (README, "Skinny
linear", for what it changes). Each output row is summed in the same order whatever the rows beside it are,
so a batch gives every row the values it gets alone.

- `skinny_linear(x, weight, bias=None)`: the op with autograd, for x (..., K) with at most MAX_ROWS rows.
- `linear(x, weight, bias)` and `input_grad(dy, weight)`: what the model layer calls where no autograd graph is
  needed (inference, and inside its own autograd nodes): the kernel where it applies (CPU, float32, at most
  MAX_ROWS rows, not under torch.compile or autocast, switch on), else `F.linear` / `dy @ weight`.
- `kernel_linear(x, weight, bias)`: the kernel without those checks, for a caller that asked `applies` itself.
- `set_enabled(flag)` / COCONUT_SKINNY_LINEAR=0 or 1: the switch (A/B comparisons). Default: on, except on Intel
  CPUs, where MKL's own small-row products beat the kernel (README, "Skinny linear": measured on one Xeon, where
  `generate` at B=8 ran 1.20-1.34x faster with it off in four records; on the AMD EPYC machines of earlier
  records the kernel won 1.6-3.7x).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ..backend import cpu_info
from ..errors import CoconutError
from ..validation import check_tensor_args
from .switch import KernelSwitch

__all__ = ["MAX_ROWS", "skinny_linear", "linear", "kernel_linear", "input_grad", "applies", "set_enabled",
           "enabled"]

MAX_ROWS = 16  # csrc/cpu/skinny_linear.cpp's kMaxRows


def cpu_vendor() -> str:
    """The CPU's vendor string on Linux ("GenuineIntel", "AuthenticAMD", ...), "" where it cannot be read."""
    return cpu_info("vendor_id")


def _default_switch() -> KernelSwitch:
    """COCONUT_SKINNY_LINEAR where it is set, else on except on Intel CPUs (see the module docstring)."""
    return KernelSwitch("COCONUT_SKINNY_LINEAR", default=cpu_vendor() != "GenuineIntel")


_SWITCH = _default_switch()

set_enabled, enabled = _SWITCH.set, _SWITCH.enabled  # the switch (see the module docstring)


@torch.library.register_fake("coconut::skinny_linear")
def _fwd_fake(x, weight, bias=None):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.register_fake("coconut::skinny_linear_input_grad")
def _input_grad_fake(grad_out, weight):
    return grad_out.new_empty(grad_out.shape[0], weight.shape[1])


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dy = dy.contiguous()
    dx = None
    if ctx.needs_input_grad[0]:
        # under create_graph the input gradient must itself be differentiable: the composite, which autograd knows
        dx = dy @ weight if torch.is_grad_enabled() else torch.ops.coconut.skinny_linear_input_grad(dy, weight)
    dw = dy.t() @ x if ctx.needs_input_grad[1] else None
    db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dw, db


torch.library.register_autograd("coconut::skinny_linear", _backward, setup_context=_setup_context)
_LINEAR = torch.ops.coconut.skinny_linear.default
_INPUT_GRAD = torch.ops.coconut.skinny_linear_input_grad.default


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias for x (..., K) of at most MAX_ROWS rows (the product of its leading dims), weight
    (N, K), bias (N,) or None: float32 CPU tensors. Differentiable (the input gradient by the same kernel)."""
    check_tensor_args(("bias",), x=x, weight=weight, bias=bias)
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and (t.device.type != "cpu" or t.dtype != torch.float32):
            raise CoconutError(f"{name} must be a float32 CPU tensor (skinny_linear is a CPU kernel), got {t.dtype} "
                               f"on {t.device}")
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise CoconutError(f"x (..., K) and weight (N, K) must agree on K, got shapes {tuple(x.shape)} and "
                           f"{tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise CoconutError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if x.shape[:-1].numel() > MAX_ROWS:
        raise CoconutError(f"x has {x.shape[:-1].numel()} rows (shape {tuple(x.shape)}); skinny_linear takes at "
                           f"most {MAX_ROWS}: use F.linear, which BLAS serves faster there")
    return _on_rows(x, weight, bias)


def _on_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The op on x (..., K) as (rows, K), its result shaped back to (..., N)."""
    y = _LINEAR(x.reshape(x.shape[:-1].numel(), x.shape[-1]).contiguous(), weight.contiguous(),
                None if bias is None else bias.contiguous())
    return y.view(*x.shape[:-1], weight.shape[0])


# What torch.library's own autograd kernel enters when no graph is recorded: the CPU kernel directly. A decode
# step or a latent pass calls the kernel dozens of times with grad off, and the Python autograd kernel would cost
# as much per call as a small kernel (~7 us). A torch without the guard goes through autograd as usual. (The
# input gradient's op has no autograd kernel: input_grad calls it directly.)
_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", None) or nullcontext


def kernel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel on x (..., K), unchecked and without autograd (no graph is recorded): for callers that have
    checked `applies` (or the arguments) themselves."""
    with _below_autograd():
        return _on_rows(x, weight, bias)


def _rows(t: torch.Tensor) -> int:
    return t.numel() // t.shape[-1] if t.dim() and t.shape[-1] else 0


def _applies(x: torch.Tensor, weight: torch.Tensor, rows: int) -> bool:
    return (_SWITCH.on and 0 < rows <= MAX_ROWS and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and weight.is_contiguous()
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `linear(x, weight, bias)` runs the kernel (see the module docstring)."""
    return _applies(x, weight, _rows(x)) and x.shape[-1] == weight.shape[1] and (bias is None or (
        bias.device.type == "cpu" and bias.dtype == torch.float32 and bias.shape == weight.shape[:1]
        and not (torch.is_grad_enabled() and bias.requires_grad)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), by the kernel where it applies (see the module docstring)."""
    return kernel_linear(x, weight, bias) if applies(x, weight, bias) else F.linear(x, weight, bias)


def input_grad(dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """dy @ weight (the input gradient of a linear layer), by the kernel where it applies."""
    if not _applies(dy, weight, _rows(dy)) or dy.shape[-1] != weight.shape[0]:
        return dy @ weight
    dx = _INPUT_GRAD(dy.reshape(-1, dy.shape[-1]).contiguous(), weight)
    return dx.view(*dy.shape[:-1], weight.shape[1])

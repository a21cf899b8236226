"""gelu_tanh: GPT-2's activation (the tanh approximation of GELU, Hugging Face's `gelu_new`) on the CPU.

torch's CPU kernel for `F.gelu(x, approximate="tanh")` and its backward run several times slower than its erf
GELU on the builds measured here (README, "GELU on the CPU"); csrc/cpu/gelu.cpp computes the same function as
x / (1 + exp(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3), on whole vectors. GPT-2 blocks call it twice per training
step and layer on every (token, 4d) element.

- `gelu_tanh(x)`: `F.gelu(x, approximate="tanh")`, by the kernel where it applies (float32 CPU tensors of at
  least MIN_ELEMENTS elements, not under torch.compile, switch on); differentiable.
- `gelu_tanh_backward(grad, x)`: `aten.gelu_backward(grad, x, approximate="tanh")`, likewise; where a graph is
  recorded (grad mode on and an argument requires grad: a double backward) the aten op, which autograd can
  differentiate.
- `set_enabled(flag)` / COCONUT_GELU_KERNEL=0: the switch (A/B comparisons; default on).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .switch import KernelSwitch

__all__ = ["MIN_ELEMENTS", "gelu_tanh", "gelu_tanh_backward", "applies", "set_enabled", "enabled"]

# Below this many elements (a one-row pass: 4d elements) the op's dispatch costs more than the kernel saves.
MIN_ELEMENTS = 1 << 14
_SWITCH = KernelSwitch("COCONUT_GELU_KERNEL", default=True)

set_enabled, enabled = _SWITCH.set, _SWITCH.enabled  # the switch (see the module docstring)


@torch.library.register_fake("coconut::gelu_tanh")
def _fwd_fake(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("coconut::gelu_tanh_backward")
def _bwd_fake(grad_out, x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return gelu_tanh_backward(grad, x)


torch.library.register_autograd("coconut::gelu_tanh", _backward, setup_context=_setup_context)


def applies(x: torch.Tensor) -> bool:
    """Whether `gelu_tanh(x)` runs the kernel."""
    return (_SWITCH.on and x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() >= MIN_ELEMENTS
            and not torch.compiler.is_compiling())


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh"), by the kernel where it applies (see the module docstring)."""
    return torch.ops.coconut.gelu_tanh(x) if applies(x) else F.gelu(x, approximate="tanh")


def gelu_tanh_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The gradient of gelu_tanh at x given the output gradient `grad`, by the kernel where it applies (see the
    module docstring)."""
    if applies(x) and grad.dtype == torch.float32 and grad.device.type == "cpu" and grad.shape == x.shape \
            and not (torch.is_grad_enabled() and (grad.requires_grad or x.requires_grad)):
        return torch.ops.coconut.gelu_tanh_backward(grad, x)
    return torch.ops.aten.gelu_backward(grad, x, approximate="tanh")

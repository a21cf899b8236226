"""argmax_last: `torch.argmax(x, -1)` on the CPU, the token of every greedy decoding step.

aten's CPU argmax runs at a fraction of the speed of a plain reduction over the same bytes: on a decode step's
(32, 50257) float32 logits, 2 ms with 2 threads against 0.16 ms for `amax` (README, "Greedy argmax on the CPU").
csrc/cpu/argmax.cpp reads each row once in whole vectors, each lane keeping its maximum and where it first saw
it, with torch's rules: the first maximum wins a tie, and a NaN is larger than every number (the first NaN wins).

- `argmax_last(x)`: `x.argmax(-1)` (int64, shape x.shape[:-1]), by the kernel where it applies (float32 or
  float64 contiguous CPU tensors of at least MIN_ELEMENTS elements with a non-empty last dimension, not under
  torch.compile, switch on), else by torch.
- `set_enabled(flag)` / COCONUT_ARGMAX_KERNEL=0: the switch (A/B comparisons; default on).
"""
from __future__ import annotations

import torch

from .switch import KernelSwitch

__all__ = ["MIN_ELEMENTS", "argmax_last", "applies", "set_enabled", "enabled"]

# Below this many elements the op's dispatch costs about what aten's argmax does.
MIN_ELEMENTS = 1 << 12
_SWITCH = KernelSwitch("COCONUT_ARGMAX_KERNEL", default=True)

set_enabled, enabled = _SWITCH.set, _SWITCH.enabled  # the switch (see the module docstring)


@torch.library.register_fake("coconut::argmax_last")
def _fake(x):
    return x.new_empty(x.shape[:-1], dtype=torch.long)


def applies(x: torch.Tensor) -> bool:
    """Whether `argmax_last(x)` runs the kernel."""
    return (_SWITCH.on and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.dim() >= 1
            and x.shape[-1] > 0 and x.numel() >= MIN_ELEMENTS and x.is_contiguous()
            and not torch.compiler.is_compiling())


def argmax_last(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1), by the kernel where it applies (see the module docstring)."""
    return torch.ops.coconut.argmax_last(x) if applies(x) else x.argmax(-1)

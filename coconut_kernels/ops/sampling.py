"""draw_categorical on the CPU: the index a uniform draws from each row of a batch of probabilities, by the inverse
of the row's float64 cumulative sum (`latent_decode.draw_categorical`, behind every sampled token of `generate`
and the engine).

torch's route writes the (n, V) float64 cumulative sums and searches them: 10 ms on a (32, 50257) batch with 2
threads, about half a decode step of the suite's model at 32 rows. csrc/cpu/draw_categorical.cpp sums each row in
float64 in index order (torch's cumsum's partial sums, bit for bit) and again up to the first partial sum above
the target: the same index, 1 ms (README, "Sampling").

- `applies(probs)`: whether `draw_categorical` takes the kernel: float32 or float64 (n, V) CPU tensors, not under
  torch.compile, switch on.
- `set_enabled(flag)` / COCONUT_SAMPLER_KERNEL=0: the switch (A/B comparisons; default on).
"""
from __future__ import annotations

import torch

from .switch import KernelSwitch

__all__ = ["applies", "set_enabled", "enabled"]

_SWITCH = KernelSwitch("COCONUT_SAMPLER_KERNEL", default=True)

set_enabled, enabled = _SWITCH.set, _SWITCH.enabled  # the switch (see the module docstring)


@torch.library.register_fake("coconut::draw_categorical")
def _fake(probs, uniforms):
    n = probs.shape[0]
    return probs.new_empty((n,), dtype=torch.long), probs.new_empty((n,), dtype=torch.bool)


def applies(probs: torch.Tensor) -> bool:
    """Whether `latent_decode.draw_categorical(probs, ...)` runs the kernel."""
    return (_SWITCH.on and probs.device.type == "cpu" and probs.dtype in (torch.float32, torch.float64)
            and probs.dim() == 2 and probs.shape[-1] > 0 and not torch.compiler.is_compiling())

"""What the Triton launchers ask of the GPU they launch on (with an H100's figures where there is none: the
interpreter, the meta tensors of the ahead-of-time compilation), and whether they run in the interpreter."""
from __future__ import annotations

import os

import torch

# An H100 SXM's SMs: a grid of 2 x this many programs is the two waves the split heuristics aim at.
H100_SMS = 132


def sm_count(device) -> int:
    """Streaming multiprocessors of `device`; H100_SMS where it is not a CUDA device."""
    device = torch.device(device)
    if device.type != "cuda":
        return H100_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def interpreted() -> bool:
    """Whether Triton runs its CPU interpreter (TRITON_INTERPRET set) instead of compiling for a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

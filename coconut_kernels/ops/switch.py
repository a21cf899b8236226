"""The on/off switch of a CPU kernel the library routes to (skinny_linear, gelu_tanh, argmax_last, draw_categorical),
for A/B runs: set from an environment variable ("0" or empty: off, anything else: on) or, where it is unset, from a
default, and changed at run time by the op module's `set_enabled` (the switch's `set`; `enabled` reads it)."""
from __future__ import annotations

import os

from ..errors import CoconutError


class KernelSwitch:
    __slots__ = ("on",)

    def __init__(self, env: str, default: bool):
        value = os.environ.get(env)
        self.on = default if value is None else value not in ("", "0")

    def set(self, flag: bool) -> None:
        """Turn the library's use of the kernel on or off (the op itself stays callable)."""
        if not isinstance(flag, bool):
            raise CoconutError(f"flag must be a bool, got {flag!r}")
        self.on = flag

    def enabled(self) -> bool:
        """Whether the library uses the kernel."""
        return self.on

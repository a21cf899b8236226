"""The on/off switch of a CPU kernel the model layer routes to (skinny_linear, gelu_tanh), for A/B runs: set
from an environment variable ("0" or empty: off, anything else: on) or, where it is unset, from a default, and
changed at run time by the op module's `set_enabled`."""
from __future__ import annotations

import os

from ..errors import CoconutError


class KernelSwitch:
    __slots__ = ("on",)

    def __init__(self, env: str, default: bool):
        value = os.environ.get(env)
        self.on = default if value is None else value not in ("", "0")

    def set(self, flag: bool) -> None:
        if not isinstance(flag, bool):
            raise CoconutError(f"flag must be a bool, got {flag!r}")
        self.on = flag

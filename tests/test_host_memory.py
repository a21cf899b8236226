"""host_memory.keep_freed_memory: after it, a large freed block stays in the process's heap, where glibc's default
unmaps it; the console scripts' switch; bad input."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from coconut_kernels import host_memory
from coconut_kernels.errors import CoconutError

# Resident memory (MB) a 64 MB tensor leaves behind once freed, with or without keep_freed_memory() first.
PROBE = textwrap.dedent("""
    import os, sys, torch
    from coconut_kernels import host_memory
    if sys.argv[1] == "kept":
        assert host_memory.keep_freed_memory() and host_memory.kept()
    else:
        assert not host_memory.kept()
    def resident_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    before = resident_mb()
    x = torch.randn(16 << 20)
    del x
    print(resident_mb() - before)
""")


def left_resident(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(host_memory.glibc() is None or not os.path.exists("/proc/self/statm"),
                    reason="keep_freed_memory acts on glibc's malloc; the probe reads Linux's /proc")
def test_a_freed_large_block_stays_in_the_heap():
    """glibc's default maps a 64 MB block on its own and unmaps it when freed (the next one is faulted in and
    zeroed afresh); after keep_freed_memory() the block comes from the heap and stays there for reuse."""
    assert left_resident("default") < 16
    assert left_resident("kept") > 56


def test_switch_and_bad_threshold(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    for off in ("0", ""):
        monkeypatch.setenv("COCONUT_KEEP_FREED_MEMORY", off)
        assert host_memory.keep_unless_disabled() is False
    monkeypatch.setenv("COCONUT_KEEP_FREED_MEMORY", "1")
    assert host_memory.keep_unless_disabled() is True and calls == [1]
    monkeypatch.undo()
    for bad in (-1, 1.5, True, "1G"):
        with pytest.raises(CoconutError, match="threshold"):
            host_memory.keep_freed_memory(bad)

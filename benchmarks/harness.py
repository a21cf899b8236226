"""One definition of every benchmark scenario, shared by the runner (`python -m benchmarks`) and the
pytest-benchmark suite (`pytest benchmarks/ --benchmark-only`).

A scenario yields Cases: one provider (this library, the reference algorithm, the floor, ...) at one point of
the x-axis. A case's `setup()` builds fresh random inputs and returns the step to time, called with no
arguments. Time is the median (p20/p80) of several repetitions, run side by side in one process; memory is
the peak CUDA allocation on a GPU and, on the CPU, the bytes autograd keeps for backward (unique storages
saved by the step's forward), which is what the training step's memory differs by.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch


@dataclass
class Case:
    scenario: str
    provider: str
    x_name: str
    x_value: int | str
    setup: Callable[[], Callable[[], object]]
    role: str = "impl"          # "impl" | "reference" | "floor" | "other"
    reps: int = 5
    warmup: int = 1
    extra: dict = field(default_factory=dict)


@dataclass
class Scenario:
    name: str
    description: str
    cases: Callable[[dict], Iterator[Case]]   # settings -> cases
    x_label: str = "B"


SCENARIOS: dict[str, Scenario] = {}


def register(scenario: Scenario) -> Scenario:
    SCENARIOS[scenario.name] = scenario
    return scenario


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], object], reps: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def saved_bytes(step: Callable[[], object]) -> int:
    """Bytes of the unique storages autograd saves for backward during one call of `step`."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def peak_memory(step: Callable[[], object], device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, "peak CUDA allocation"
    return saved_bytes(step), "saved for backward"


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return q[1], statistics.median(xs), q[7]

"""One definition of every benchmark scenario, shared by the runner (`python -m coconut_kernels.bench`) and the
pytest-benchmark suite (`pytest coconut_kernels/bench/ --benchmark-only`).

A scenario yields Cases: one provider (this library, the reference algorithm, the floor, ...) at one point of
the x-axis. A case's `setup()` builds fresh random inputs and returns the step to time, called with no
arguments. Time is the median (p20/p80) of several repetitions, run side by side in one process; memory is
the peak of the memory the step allocates and holds at once: on a GPU the peak CUDA allocation, on the CPU the
peak of the allocator's live bytes recorded by torch.profiler's memory events (every tensor the step allocates:
activations, saved tensors, cache buffers, index tensors, gradients), in both cases counted from what was
allocated when the step began.
"""
from __future__ import annotations

import collections
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode


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
    # "memory": False skips the memory measurement; "metric:NAME": (amount, unit) adds amount / time as a rate;
    # "observed": {NAME: (unit, value())} adds what the step itself recorded, read after the timing
    extra: dict = field(default_factory=dict)


@dataclass
class Scenario:
    name: str
    description: str
    cases: Callable[[dict], Iterator[Case]]   # settings -> cases
    x_label: str = "B"
    # rows derived from all of the scenario's rows (e.g. a fit over x), and their table
    summarize: Callable[[list[dict]], list[dict]] | None = None
    summary_table: Callable[[list[dict]], list[list[str]]] | None = None


SCENARIOS: dict[str, Scenario] = {}


def register(scenario: Scenario) -> Scenario:
    SCENARIOS[scenario.name] = scenario
    return scenario


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def switched(set_flag: Callable[[bool], None], get_flag: Callable[[], bool], flag: bool,
             step: Callable[[], object]) -> Callable[[], object]:
    """step() with a library switch (skinny_linear.set_enabled, cache.set_deferred_kv_grads) set to flag for the
    call and restored after: both sides of an A/B in one run."""
    def run():
        before = get_flag()
        set_flag(flag)
        try:
            return step()
        finally:
            set_flag(before)
    return run


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


class AtenCalls(TorchDispatchMode):
    """Counts the operator calls (aten and the library's own) made while active, by overload packet."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_aten_calls(step: Callable[[], object]) -> collections.Counter:
    """The operator calls of one call of `step`, forward and backward (the CPU autograd engine runs the
    backward on the calling thread, under the same mode; a CUDA backward runs on the engine's device thread,
    whose calls are not counted)."""
    with AtenCalls() as mode:
        step()
    return mode.calls


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


CPU_MEMORY = "peak allocated during the step, torch.profiler memory events"
CUDA_MEMORY = "peak CUDA allocation during the step"


def cpu_peak_allocated(step: Callable[[], object]) -> int:
    """Peak bytes of CPU memory allocated by one call of `step` and alive at the same time.

    Read from the allocation events of `torch.profiler.profile(profile_memory=True)`: each event carries the
    CPU allocator's running total, and the peak is the largest rise of that total above its lowest point
    before it (the total before the call, or lower where the step first frees what its predecessor left, such
    as the gradients `zero_grad(set_to_none=True)` drops: the profiler reports those frees only when it also
    saw the allocation, and the rise makes both cases read alike). Memory that existed before the call
    (weights, inputs, buffers built in setup) is not counted; the gradients and everything the forward keeps
    until backward ends are."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.total_allocated))
    if not events:
        return 0
    events.sort()
    low = events[0][2] - events[0][1]
    peak = 0
    for _, _, total in events:
        low = min(low, total)
        peak = max(peak, total - low)
    return peak


def peak_memory(step: Callable[[], object], device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, CUDA_MEMORY
    return cpu_peak_allocated(step), CPU_MEMORY


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return q[1], statistics.median(xs), q[7]

"""Timing done so that ratios hold on a noisy, shared machine.

Every contender is loaded, called once (first-call time), warmed up, and then timed
in interleaved blocks (A B C A B C ...) until each has both a minimum number of calls
and a minimum total time, so a burst of load from another process hits all of them
alike. Each call is timed on its own; statistics come from the per-call times.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hxc.manifests.schema import LatencyStats


@dataclass
class Contender:
    """Something to time: an artifact on a device, or a baseline such as torch eager.

    `open()` loads it (timed as load time); `prepare(inputs)` returns the zero-argument
    call that is timed, with inputs already where the call needs them."""

    id: str
    device: str
    open: Callable[[], None]
    prepare: Callable[[list], Callable[[], None]]
    device_time_only: bool
    threads: int | None = None


@dataclass
class Timing:
    contender: Contender
    load_ms: float
    first_call_ms: float
    memory_mb: float | None
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(self.latencies_ms) / 1000

    def stats(self) -> LatencyStats:
        return latency_stats(self.latencies_ms)


@dataclass(frozen=True)
class Budget:
    warmup: int = 3
    min_iterations: int = 20
    min_seconds: float = 1.0
    max_seconds: float = 60.0  # per contender; a very slow one stops at min_iterations or this
    block_seconds: float = 0.1  # how long one contender runs before the next takes over
    # A pause between blocks lets the previous runtime's worker threads (OpenMP,
    # IREE's task system, llvmpipe) go idle before the next contender starts timing;
    # on a 2-core machine their spinning otherwise lands in the next one's numbers.
    settle_seconds: float = 0.02


def measure(contenders: list[Contender], inputs: list, budget: Budget = Budget(),
            on_progress: Callable[[str], None] = lambda s: None) -> list[Timing]:  # fmt: skip
    """Load, warm up and time every contender on `inputs`, interleaved."""
    timings: list[Timing] = []
    calls: list[Callable[[], None]] = []
    for c in contenders:
        on_progress(f"loading {c.id} on {c.device}")
        mem0 = _resident_mb()
        t = time.perf_counter()
        c.open()
        call = c.prepare(inputs)
        load_ms = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        call()
        first_ms = (time.perf_counter() - t) * 1000
        mem1 = _resident_mb()
        for _ in range(budget.warmup):
            call()
        timings.append(Timing(c, load_ms, first_ms, None if mem0 is None or mem1 is None else mem1 - mem0))
        calls.append(call)

    def done(t: Timing) -> bool:
        enough = len(t.latencies_ms) >= budget.min_iterations and t.seconds >= budget.min_seconds
        return enough or (t.seconds >= budget.max_seconds and len(t.latencies_ms) >= 3)

    while not all(done(t) for t in timings):
        for t, call in zip(timings, calls):
            if done(t):
                continue
            time.sleep(budget.settle_seconds)
            block_end = time.perf_counter() + budget.block_seconds
            while True:
                t0 = time.perf_counter_ns()
                call()
                t.latencies_ms.append((time.perf_counter_ns() - t0) / 1e6)
                if time.perf_counter() >= block_end:
                    break
        on_progress(", ".join(f"{t.contender.id}: {len(t.latencies_ms)}" for t in timings))
    return timings


def latency_stats(samples_ms: list[float]) -> LatencyStats:
    xs = sorted(samples_ms)
    return LatencyStats(
        p50_ms=_percentile(xs, 50),
        p90_ms=_percentile(xs, 90),
        p99_ms=_percentile(xs, 99),
        mean_ms=statistics.fmean(xs),
        stdev_ms=statistics.stdev(xs) if len(xs) > 1 else 0.0,
        min_ms=xs[0],
        iterations=len(xs),
    )


def _percentile(sorted_xs: list[float], q: float) -> float:
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = (len(sorted_xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def _resident_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None

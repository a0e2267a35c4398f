"""Timing done so that ratios hold on a noisy, shared machine.

Contenders on one device form a phase: each is loaded, called once (first-call
time), warmed up, and then timed in interleaved blocks (A B C A B C ...) until it has
both a minimum number of calls and a minimum total time, so a burst of load from
another process hits all of them alike. Each call is timed on its own; statistics
come from the per-call times.

Contenders on different devices are never timed side by side in one process: an
IREE Vulkan device on lavapipe keeps ~0.3 of a core busy from the moment it is
created, even with no work queued, and its calls keep the cores busy after they
return. Timed interleaved with it, a CPU artifact's p99 went from 0.40 to 9.8 ms and
PyTorch's batch-32 p50 from 5.2 to 19.5 ms. Nor are two contenders on one device:
runtimes' thread pools (IREE's, ONNX Runtime's, libtorch's OpenMP) spin or wake
after a call in ways that land in the next one's numbers, and even two ONNX Runtime
sessions slow each other (GPT-2 small: 131-136 ms alone, 142-145 ms beside a second
session, twice each; BERT-base's ONNX Runtime artifact measured 126 ms alone and 156 ms
in a process holding two more sessions), enough to turn the ranking around. A deployed
model runs one artifact per process, so that is how `hxc bench` measures each:
`hxc.bench.isolate` gives every contender a worker process of its own and lets only
one run at a time. What else was running (any contenders interleaved with it, the CPU
time other processes used meanwhile) is kept with each timing.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hxc.stats import P99_MIN_ITERATIONS, LatencyStats, latency_stats


@dataclass
class Contender:
    """Something to time: an artifact on a device, or a baseline such as torch eager.

    `open()` loads it (timed as load time); `prepare(inputs)` returns the zero-argument
    call that is timed, with inputs already where the call needs them; `close()`
    releases what `open` loaded."""

    id: str
    device: str
    open: Callable[[], None]
    prepare: Callable[[list], Callable[[], None]]
    device_time_only: bool
    threads: int | None = None
    close: Callable[[], None] = lambda: None
    artifact: str | None = None  # the artifact whose bytes its profile names, when not `id` (a staged chain's stage 0)
    stage: int | None = None  # a staged bundle's stage it times alone


@dataclass
class Timing:
    contender: Contender
    load_ms: float
    first_call_ms: float
    memory_mb: float | None
    latencies_ms: list[float] = field(default_factory=list)
    interleaved_with: tuple[str, ...] = ()  # the other contenders of its phase
    other_load: float | None = None  # cores' worth of CPU other processes used while it was timed
    # Each block's median, in order. Blocks go round by round (A B C A B C ...) and a
    # contender that has enough stops for good, so block i of two contenders ran in
    # the same round for every i both reached: ratios of those pairs cancel load that
    # came and went between rounds (`paired_ratio`).
    block_medians_ms: list[float] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(self.latencies_ms) / 1000

    def stats(self) -> LatencyStats:
        return latency_stats(self.latencies_ms)


def paired_ratio(a: Timing, b: Timing) -> float | None:
    """The median, over the rounds both ran in, of a's block median over b's: a ratio
    that holds when the load on the machine changes between rounds. None without any
    shared round (timings that were not interleaved in one process)."""
    pairs = [x / y for x, y in zip(a.block_medians_ms, b.block_medians_ms) if y > 0]
    return statistics.median(pairs) if pairs and (a is b or b.contender.id in a.interleaved_with) else None


@dataclass(frozen=True)
class Budget:
    warmup: int = 3
    min_iterations: int = P99_MIN_ITERATIONS
    min_seconds: float = 1.0
    max_seconds: float = 60.0  # per contender; a very slow one stops at min_iterations or this
    block_seconds: float = 0.1  # how long one contender runs before the next takes over
    # A pause between blocks lets the previous runtime's worker threads (OpenMP,
    # IREE's task system, llvmpipe) go idle before the next contender starts timing;
    # on a 2-core machine their spinning otherwise lands in the next one's numbers.
    settle_seconds: float = 0.02
    # How long one device's phase runs before the next device's takes over. Phases
    # alternate (CPU, Vulkan, CPU, Vulkan ...) so that load from other processes that
    # comes and goes reaches every device alike.
    phase_seconds: float = 1.0
    # A device that has not finished a phase this long after it was due is stopped
    # (lavapipe can hang in IREE 3.13, and a hung call cannot be interrupted).
    hang_seconds: float = 300.0


def measure(contenders: list[Contender], inputs: list, budget: Budget = Budget(),
            on_progress: Callable[[str], None] = lambda s: None) -> list[Timing]:  # fmt: skip
    """Load, warm up and time contenders that all run on one device, interleaved, in
    this process. `hxc.bench.isolate.measure_devices` measures them apart."""
    devices = {c.device for c in contenders}
    if len(devices) > 1:
        raise ValueError(f"measure() times one device per process, got {sorted(devices)}; use measure_devices()")
    phase = Phase(contenders, inputs, budget, on_progress)
    try:
        while not phase.done:
            phase.run(budget.phase_seconds)
            on_progress(phase.progress)
    finally:
        phase.close()
    return phase.timings


class Phase:
    """One device's contenders on one set of inputs: loaded and warmed up on creation,
    then timed in slices of `run(seconds)` until each has its budget."""

    def __init__(self, contenders: list[Contender], inputs: list, budget: Budget,
                 on_progress: Callable[[str], None] = lambda s: None) -> None:  # fmt: skip
        self.contenders = contenders
        self.budget = budget
        self.timings: list[Timing] = []
        self._calls: list[Callable[[], None]] = []
        self._timed_wall = 0.0  # seconds spent timing, and others' CPU seconds meanwhile
        self._others_cpu = 0.0
        try:
            for c in contenders:
                on_progress(f"loading {c.id} on {c.device}")
                self._open(c, inputs)
        except BaseException:
            self.close()
            raise

    def _open(self, c: Contender, inputs: list) -> None:
        mem0 = _resident_mb()
        t = time.perf_counter()
        c.open()
        call = c.prepare(inputs)
        load_ms = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        call()
        first_ms = (time.perf_counter() - t) * 1000
        mem1 = _resident_mb()
        for _ in range(self.budget.warmup):
            call()
        memory = None if mem0 is None or mem1 is None else mem1 - mem0
        others = tuple(o.id for o in self.contenders if o is not c)
        self.timings.append(Timing(c, load_ms, first_ms, memory, interleaved_with=others))
        self._calls.append(call)

    @property
    def done(self) -> bool:
        return all(self._enough(t) for t in self.timings)

    @property
    def progress(self) -> str:
        return ", ".join(f"{t.contender.id}: {len(t.latencies_ms)}" for t in self.timings)

    def _enough(self, t: Timing) -> bool:
        b = self.budget
        return (len(t.latencies_ms) >= b.min_iterations and t.seconds >= b.min_seconds) or (
            t.seconds >= b.max_seconds and len(t.latencies_ms) >= 3
        )

    def run(self, seconds: float) -> None:
        """Time blocks of every unfinished contender, in turn, for about `seconds`."""
        start = CpuUse.now()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end and not self.done:
            for t, call in zip(self.timings, self._calls):
                if not self._enough(t):
                    self._block(t, call)
        now = CpuUse.now()
        self._timed_wall += now.wall - start.wall
        self._others_cpu += now.others_cpu_since(start)
        load = round(self._others_cpu / self._timed_wall, 2) if self._timed_wall > 0 and now.machine_busy is not None else None
        for t in self.timings:
            t.other_load = load

    def _block(self, t: Timing, call: Callable[[], None]) -> None:
        time.sleep(self.budget.settle_seconds)
        first = len(t.latencies_ms)
        block_end = time.perf_counter() + self.budget.block_seconds
        while True:
            t0 = time.perf_counter_ns()
            call()
            t.latencies_ms.append((time.perf_counter_ns() - t0) / 1e6)
            if time.perf_counter() >= block_end:
                break
        t.block_medians_ms.append(statistics.median(t.latencies_ms[first:]))

    def close(self) -> None:
        self._calls.clear()
        for c in self.contenders:
            c.close()


@dataclass(frozen=True)
class CpuUse:
    """CPU time used by the whole machine and by this process, from /proc."""

    wall: float
    machine_busy: float | None  # seconds of CPU time, all cores, all processes
    this_process: float

    @classmethod
    def now(cls) -> CpuUse:
        busy = None
        try:
            with open("/proc/stat") as f:
                # cpu user nice system idle iowait irq softirq steal ...: busy is all but
                # idle and iowait (steal counts: another VM on our cores is load too).
                fields = [int(x) for x in f.readline().split()[1:9]]
            busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
        cpu = os.times()
        return cls(time.monotonic(), busy, cpu.user + cpu.system)

    def others_cpu_since(self, start: CpuUse) -> float:
        """CPU seconds other processes used between `start` and now."""
        if self.machine_busy is None or start.machine_busy is None:
            return 0.0
        return max((self.machine_busy - start.machine_busy) - (self.this_process - start.this_process), 0.0)


def _resident_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None

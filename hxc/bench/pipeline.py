"""`hxc bench --placement P [--pin split] [--in-flight N]`: a staged bundle's placement
timed on the pipeline of worker processes it runs on (`hxc.pool.pipeline`), from the
caller's side, on the bundle's golden inputs:

- latency: one item in flight, each call from submit to its outputs in the caller's
  hands (p50, p99 over the calls);
- throughput: `in_flight` items in the pipeline at once, a stream of them for the
  budget's time; the steady rate counts the completions after the first `in_flight`
  (the pipeline filling) and before the last `in_flight` (draining), over their time,
  as the simulator counts;
- the caller's own CPU time per item (this process's, every thread: writing inputs,
  passing control messages, copying outputs out of shared memory), at both, and its
  share of one core during the stream: what the pipeline costs the process that feeds it;
- each worker's share of the stream's wall time spent in calls, as the workers measured.

Not recorded in the bundle: a profile names one artifact, not a pipeline of several.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hxc.bench.measure import Budget
from hxc.manifests.schema import Host
from hxc.manifests.signing import TrustPolicy
from hxc.pool.pipeline import Pipeline, load_pipeline
from hxc.runtime.place import StagePlan
from hxc.runtime.probe import probe_host
from hxc.stats import LatencyStats, latency_stats


@dataclass(frozen=True)
class WorkerShare:
    name: str
    calls: int  # during the stream
    busy_share: float  # of the stream's wall time, in calls


@dataclass(frozen=True)
class PipelineBench:
    host: Host
    placement: StagePlan
    pipeline: dict[str, Any]  # `Pipeline.to_json()`: its workers, cores, artifacts
    in_flight: int
    latency: LatencyStats  # one item in flight, as the caller sees it
    items_per_s: float  # steady, with `in_flight` in flight
    items: int  # in the stream
    seconds: float  # the stream's wall time
    caller_cpu_ms_per_item: float  # in the stream
    caller_cpu_share: float  # of one core, in the stream
    caller_cpu_ms_per_item_alone: float  # one in flight
    workers: tuple[WorkerShare, ...]

    def to_json(self) -> dict[str, Any]:
        p = self.placement.placement
        lat = self.latency
        return {
            **self.pipeline, "in_flight": self.in_flight, "items_per_s": self.items_per_s, "items": self.items,
            "seconds": self.seconds,
            "latency_ms": {"p50": lat.p50_ms, "p90": lat.p90_ms, "p99": lat.p99_ms, "samples": lat.iterations},
            "caller_cpu_ms_per_item": self.caller_cpu_ms_per_item, "caller_cpu_share_of_a_core": self.caller_cpu_share,
            "caller_cpu_ms_per_item_one_in_flight": self.caller_cpu_ms_per_item_alone,
            "busy_share": {w.name: w.busy_share for w in self.workers},
            "predicted": p and {"items_per_s": p.items_per_s, "latency_ms": p.latency_ms, "bottleneck": p.bottleneck},
        }  # fmt: skip


def run_pipeline_bench(bundle: str | Path, plan: StagePlan, *, in_flight: int = 4, budget: Budget = Budget(),
                       precision: str | None = None, tolerance: float | None = None, trust: TrustPolicy | None = None,
                       on_progress: Callable[[str], None] = lambda s: None) -> PipelineBench:  # fmt: skip
    """Time `plan` (a `StagePlan`, e.g. `hxc.runtime.place.plan_bundle`'s) on its
    pipeline: latency at one item in flight, throughput at `in_flight` (see the module)."""
    from hxc.manifests.bundle import read_bundle, trust_policy
    from hxc.verify import load_golden

    trust = trust if trust is not None else trust_policy()
    path = Path(bundle)
    inputs, _ = load_golden(path, read_bundle(path, trust).manifest)
    probe = probe_host()
    on_progress(f"starting the pipeline ({plan.describe()})")
    with load_pipeline(path, placement=plan, in_flight=in_flight, precision=precision, tolerance=tolerance, trust=trust,
                       probe=probe) as pipe:  # fmt: skip
        for _ in range(budget.warmup):
            pipe.run_flat(inputs)
        on_progress("latency, one item in flight")
        samples, cpu_alone = _one_at_a_time(pipe, inputs, budget)
        on_progress(f"throughput, {in_flight} in flight")
        rate, done, start, cpu_s = _stream(pipe, inputs, in_flight, budget)
        end = time.monotonic()
        wall = end - start
        shares = []
        for w in pipe.stats().workers:  # its calls within the stream (worker and caller share time.monotonic())
            calls = [(max(a, start), min(b, end)) for a, b in w.intervals if b > start and a < end]
            shares.append(WorkerShare(w.name, len(calls), sum(b - a for a, b in calls) / wall if wall else 0.0))
        described = pipe.to_json()
    return PipelineBench(probe.host(), plan, described, in_flight, latency_stats(samples), rate, done, wall,
                         cpu_s * 1000 / done, cpu_s / wall if wall else 0.0, cpu_alone, tuple(shares))  # fmt: skip


def _one_at_a_time(pipe: Pipeline, inputs: list[np.ndarray], budget: Budget) -> tuple[list[float], float]:
    """ms per call with one item in flight, and the caller's CPU ms per call."""
    samples: list[float] = []
    cpu0 = time.process_time()
    start = time.perf_counter()
    while (len(samples) < budget.min_iterations or time.perf_counter() - start < budget.min_seconds) and (
            not samples or time.perf_counter() - start < budget.max_seconds):  # fmt: skip
        t0 = time.perf_counter()
        pipe.run_flat(inputs)
        samples.append((time.perf_counter() - t0) * 1000)
    return samples, (time.process_time() - cpu0) * 1000 / len(samples)


def _stream(pipe: Pipeline, inputs: list[np.ndarray], in_flight: int, budget: Budget) -> tuple[float, int, float, float]:
    """(steady items/s, items done, the stream's start in time.monotonic(), the caller's
    CPU seconds) of a stream of at least max(min_iterations, 4 x in_flight) items and
    min_seconds, at most max_seconds, `in_flight` of them in the pipeline at once."""
    least = max(budget.min_iterations, 4 * in_flight)
    submitted = 0
    t0 = time.perf_counter()

    def items() -> Iterator[list[np.ndarray]]:
        nonlocal submitted
        while submitted < least or time.perf_counter() - t0 < budget.min_seconds:
            if submitted and time.perf_counter() - t0 >= budget.max_seconds:
                return
            submitted += 1
            yield inputs

    done: list[float] = []
    start = time.monotonic()
    cpu0 = time.process_time()
    for _ in pipe.map(items()):
        done.append(time.perf_counter())
    cpu_s = time.process_time() - cpu0
    warm, last = min(in_flight, len(done) - 1), len(done) - 1 - in_flight
    if last > warm:
        rate = (last - warm) / (done[last] - done[warm])
    else:  # too few items for a steady state: all of them, filling and draining included
        rate = len(done) / (done[-1] - t0)
    return rate, len(done), start, cpu_s

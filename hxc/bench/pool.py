"""`hxc bench --pool`: the device pool measured on this host.

Two things are measured, with the devices as the pool runs them (in worker
processes, pinned if asked):

1. Per device, single-stream latency through its worker: the device time and what
   the caller pays beyond it (input checks, shared-memory copies, the process hop).
   These become profiles with `caller_overhead`, which SLO checks add to device time.
2. Throughput, in interleaved rounds (A B ... A B ...): each device alone, and the
   pool with all of them, each round one call sized to take about `seconds`; plus
   each device's utilisation (busy / wall) in the pool's calls.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hxc.bench.measure import Budget
from hxc.stats import latency_stats
from hxc.bench.run import scenarios
from hxc.manifests import update_manifest
from hxc.manifests.merge import add_profiles
from hxc.manifests.schema import Host, Profile
from hxc.manifests.signing import TrustPolicy
from hxc.pool.pool import Pool, PoolStats
from hxc.runtime.probe import probe_host
from hxc.verify import load_golden


@dataclass(frozen=True)
class DeviceRun:
    """One device in the pool bench: alone, and in the pool's calls."""

    name: str
    device: str
    cpus: tuple[int, ...] | None
    alone_items_per_second: float  # median over rounds
    pool_items: int  # rows it computed in the pool's calls
    utilisation: float  # its busy time / the pool calls' wall time
    left_out: str | None
    health: str
    reason: str | None


@dataclass(frozen=True)
class PoolBench:
    host: Host
    profiles: tuple[Profile, ...]  # single-stream through each worker, with caller overhead
    devices: tuple[DeviceRun, ...]
    pool_items_per_second: float  # median over rounds
    rounds: int
    spread: float  # (max - min) / median of the pool's rounds: how noisy the run was
    pinned: bool
    recorded: bool
    explain: str

    @property
    def sum_alone(self) -> float:
        return sum(d.alone_items_per_second for d in self.devices)

    @property
    def best_alone(self) -> DeviceRun:
        return max(self.devices, key=lambda d: d.alone_items_per_second)


def run_pool_bench(
    bundle: str | Path,
    *,
    devices: str | Sequence[str] = "all",
    pin: str | Mapping[str, Sequence[int]] | None = None,
    budget: Budget = Budget(),
    seconds: float = 2.0,
    rounds: int = 3,
    record: bool = True,
    trust: TrustPolicy | None = None,
    on_progress: Callable[[str], None] = lambda s: None,
) -> PoolBench:
    path = Path(bundle)
    probe = probe_host()
    host = probe.host()
    on_progress("starting the pool's workers")
    with Pool(path, devices, pin=pin, probe=probe, trust=trust) as pool:
        golden, _ = load_golden(path, pool.manifest)
        single = scenarios(pool.manifest, golden, [])[0][2]
        profiles = _single_stream(pool, single, host.id, budget, on_progress)
        alone: dict[str, list[float]] = {m.name: [] for m in pool.members}
        pool_rates: list[float] = []
        delta: PoolStats | None = None  # the pool's calls only, summed over rounds
        row = [a[:1] for a in golden] if pool.splittable else None
        # Warm every device up (and measure its speed) before the timed rounds.
        sized_call(pool, row, single, 0.2 * seconds)
        for r in range(rounds):
            for m in pool.members:
                on_progress(f"round {r + 1}/{rounds}: {m.name} alone")
                # Each measurement starts with every device idle: a copy still computing for
                # an earlier call (lavapipe: up to seconds) would slow it, and its busy time
                # would count in this call's utilisation.
                pool.settle()
                with pool.using(m.name):
                    alone[m.name].append(sized_call(pool, row, single, seconds))
            on_progress(f"round {r + 1}/{rounds}: the pool")
            pool.settle()
            before = pool.stats()
            pool_rates.append(sized_call(pool, row, single, seconds))
            this = _delta(before, pool.stats())
            delta = this if delta is None else _add(delta, this)
        assert delta is not None
        runs = tuple(
            DeviceRun(d.name, d.device, d.cpus, statistics.median(alone[d.name]), d.items,
                      d.busy_s / delta.wall_s if delta.wall_s else 0.0, d.left_out, d.health, d.reason)
            for d in delta.devices
        )  # fmt: skip
        explain = pool.explain()
        pinned = pool.pinned
    median = statistics.median(pool_rates)
    if record and profiles:
        update_manifest(path, lambda m: add_profiles(m, [host], profiles))
    return PoolBench(host, tuple(profiles), runs, median, rounds, (max(pool_rates) - min(pool_rates)) / median if median else 0.0,
                     pinned, record and bool(profiles), explain)  # fmt: skip


def _single_stream(pool: Pool, inputs: list[np.ndarray], host_id: str, budget: Budget,
                   on_progress: Callable[[str], None]) -> list[Profile]:  # fmt: skip
    """Single-stream latency of each worker, one request at a time, interleaved in blocks."""
    members = [m for m in pool.members if m.worker.wait_ready(0)]
    device_ms: dict[str, list[float]] = {m.name: [] for m in members}
    overhead_ms: dict[str, list[float]] = {m.name: [] for m in members}
    spent = {m.name: 0.0 for m in members}

    def done(name: str) -> bool:
        n = len(device_ms[name])
        return (n >= budget.min_iterations and spent[name] >= budget.min_seconds) or (spent[name] >= budget.max_seconds and n >= 3)

    for m in members:
        for _ in range(budget.warmup):
            m.worker.submit(inputs).result()
    while not all(done(m.name) for m in members):
        for m in members:
            if done(m.name):
                continue
            time.sleep(budget.settle_seconds)
            block_end = time.perf_counter() + budget.block_seconds
            while time.perf_counter() < block_end or not device_ms[m.name]:
                t0 = time.perf_counter()
                result = m.worker.submit(inputs).result()
                spent[m.name] += time.perf_counter() - t0
                device_ms[m.name].append(result.device_ms)
                if result.overhead_ms is not None:
                    overhead_ms[m.name].append(max(0.0, result.overhead_ms))
        on_progress("single-stream through the workers: " + ", ".join(f"{n}: {len(v)}" for n, v in device_ms.items()))
    batch = int(inputs[0].shape[0]) if inputs and inputs[0].ndim else 1
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    out = []
    for m in members:
        stats = latency_stats(device_ms[m.name])
        throughput = 1000.0 / stats.mean_ms if stats.mean_ms else 0.0
        threads = len(m.worker.cpus) if m.worker.cpus else (os.cpu_count() if m.candidate.device.kind == "cpu" else None)
        out.append(Profile(
            host_id, m.name, m.candidate.artifact.sha256, m.candidate.device.label, "single-stream", batch, stats,
            throughput, throughput * batch, None, None, None, True, now, threads,
            caller_overhead=latency_stats(overhead_ms[m.name]) if overhead_ms[m.name] else None,
        ))  # fmt: skip
    return out


def sized_call(pool: Pool, row: list[np.ndarray] | None, single: list[np.ndarray], seconds: float) -> float:
    """Items per second of one call sized to take about `seconds` at the current speed
    estimates of the devices that will take part."""
    rate = pool.expected_rate
    if row is not None:
        n = max(1, math.ceil(rate * seconds))
        x = [np.ascontiguousarray(np.broadcast_to(a, (n, *a.shape[1:]))) for a in row]
        t0 = time.perf_counter()
        pool.run_flat(x)
        return n / (time.perf_counter() - t0)
    # No batch to split: a stream of whole requests.
    n = max(1, math.ceil(rate * seconds))
    t0 = time.perf_counter()
    for _ in pool.map(single for _ in range(n)):
        pass
    return n * (int(single[0].shape[0]) if single and single[0].ndim else 1) / (time.perf_counter() - t0)


def _delta(before: PoolStats, after: PoolStats) -> PoolStats:
    from dataclasses import replace

    devices = tuple(
        replace(a, items=a.items - b.items, chunks=a.chunks - b.chunks, busy_s=a.busy_s - b.busy_s)
        for a, b in zip(after.devices, before.devices)
    )
    return PoolStats(after.wall_s - before.wall_s, after.items - before.items, devices)


def _add(x: PoolStats, y: PoolStats) -> PoolStats:
    from dataclasses import replace

    devices = tuple(replace(b, items=a.items + b.items, chunks=a.chunks + b.chunks, busy_s=a.busy_s + b.busy_s)
                    for a, b in zip(x.devices, y.devices))  # fmt: skip
    return PoolStats(x.wall_s + y.wall_s, x.items + y.items, devices)

"""A staged model's pipeline in virtual time (issue 29, item 4): items go through a
placement's steps (`hxc.runtime.placement.Plan.steps`: a worker running a range of
stages, a transfer over a link) with at most `in_flight` of them in the pipeline at
once; each resource serves one item at a time, first come first served. So it shows
what the solver's arithmetic leaves out: how many micro-batches (or sequences) in
flight it takes to reach 1 / bottleneck (one in flight gives 1 / the sum of the steps),
and what noise costs.

Devices that are not here come in through ratios: `--device-ratio cuda=40` makes a
device whose stage times are this CPU's divided by 40 (`scale_times`), and a link
such as `pcie=25GB/s` (`placement.parse_link`) carries what crosses to and from it.

    times = scale_times(measured, stages=4, base="cpu", ratios={"cuda": 40.0})
    placed = solve(stages, devices, times, Links(attached={"cuda": parse_link("pcie=25GB/s")}))
    run = simulate_pipeline(placed.plan, items=1000, in_flight=4, devices=devices)
    run.items_per_s, run.latency_p50_ms, run.cost
"""

from __future__ import annotations

import bisect
import collections
import heapq
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hxc.errors import UsageError
from hxc.runtime.placement import DeviceInfo, Plan, StageTimes
from hxc.stats import latency_stats


@dataclass(frozen=True)
class PipelineRun:
    items: int
    in_flight: int
    makespan_ms: float
    # Steady state: the items finished after the first `in_flight` (the pipeline filling)
    # over the time they took; all items over the makespan when there are too few.
    items_per_s: float
    latency_p50_ms: float  # one item, from entering the pipeline to leaving it
    latency_max_ms: float
    busy_ms: Mapping[str, float]  # per resource, over the run
    cost: float | None  # price per hour x busy time, over the devices used; None: one has no price
    cost_held: float | None  # price per hour x the makespan: the devices rented for the whole run

    @property
    def cost_per_1k(self) -> float | None:
        return self.cost / self.items * 1000 if self.cost is not None else None


def simulate_pipeline(plan: Plan, items: int, in_flight: int, *, devices: Sequence[DeviceInfo] = (),
                      noise: float = 0.0, seed: int = 0) -> PipelineRun:  # fmt: skip
    """Run `items` through `plan` with `in_flight` at most in the pipeline; each step takes
    its predicted time x (1 +- `noise`), uniformly. `devices` give the prices."""
    if items < 1 or in_flight < 1:
        raise UsageError(f"a pipeline run needs items >= 1 and in flight >= 1, not {items} and {in_flight}")
    rng = random.Random(seed)
    steps = plan.steps
    busy = {s.resource: 0.0 for s in steps}
    taken = {s.resource: False for s in steps}
    waiting: dict[str, collections.deque[int]] = {s.resource: collections.deque() for s in steps}
    at_step = [0] * items
    entered = [0.0] * items
    finished = [0.0] * items
    events: list[tuple[float, int, str, int]] = []  # (time, seq, "arrive" | "finish", item)
    seq = 0
    admitted = 0

    def push(t: float, kind: str, item: int) -> None:
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, item))
        seq += 1

    def start(t: float, item: int) -> None:
        step = steps[at_step[item]]
        taken[step.resource] = True
        ms = step.ms * (1 + rng.uniform(-noise, noise)) if noise else step.ms
        busy[step.resource] += ms
        push(t + ms, "finish", item)

    def admit(t: float) -> None:
        nonlocal admitted
        entered[admitted] = t
        push(t, "arrive", admitted)
        admitted += 1

    for _ in range(min(in_flight, items)):
        admit(0.0)
    while events:
        t, _, kind, item = heapq.heappop(events)
        resource = steps[at_step[item]].resource
        if kind == "arrive":
            if taken[resource]:
                waiting[resource].append(item)
            else:
                start(t, item)
            continue
        taken[resource] = False
        if waiting[resource]:
            start(t, waiting[resource].popleft())
        at_step[item] += 1
        if at_step[item] < len(steps):
            push(t, "arrive", item)
            continue
        finished[item] = t
        if admitted < items:
            admit(t)
    done = sorted(finished)
    makespan = done[-1]
    # Steady state: the completions between the first in-flight batch and the last, so
    # neither the filling nor the draining of the pipeline (the last items, no longer
    # queued behind others, finish faster) counts.
    warm = min(in_flight, items - 1)
    last = max(warm, items - 1 - in_flight)
    window = done[last] - done[warm - 1] if warm > 0 else 0.0
    if last > warm and window > 0:
        # Completions in (done[warm - 1], done[last]], counted by time: several items can
        # finish at one instant (steps of no time), and an index would split them.
        count = bisect.bisect_right(done, done[last]) - bisect.bisect_right(done, done[warm - 1])
        rate = count / window * 1e3
    else:
        rate = items / makespan * 1e3 if makespan > 0 else math.inf
    latencies = latency_stats([f - e for f, e in zip(finished, entered)])
    cost, held = _costs(plan, busy, makespan, devices)
    return PipelineRun(items, in_flight, makespan, rate, latencies.p50_ms, max(f - e for f, e in zip(finished, entered)),
                       busy, cost, held)  # fmt: skip


def _costs(plan: Plan, busy: Mapping[str, float], makespan_ms: float,
           devices: Sequence[DeviceInfo]) -> tuple[float | None, float | None]:  # fmt: skip
    price = {d.name: d.price_per_hour for d in devices}
    used = plan.devices
    if any(price.get(d) is None for d in used):
        return None, None
    device_busy = dict.fromkeys(used, 0.0)
    owner = {s.resource: plan.assignment[s.first] for s in plan.steps if not s.transfer}
    for resource, device in owner.items():
        device_busy[device] += busy[resource]
    hours = 1 / 3.6e6
    return (sum(price[d] * ms * hours for d, ms in device_busy.items()),
            sum(price[d] * makespan_ms * hours for d in used))  # fmt: skip


def scale_times(times: StageTimes, stage_count: int, base: str, ratios: Mapping[str, float]) -> dict[tuple[int, str], float | None]:
    """`times` plus a hypothetical device per entry of `ratios`: `{"cuda": 40}` gives
    `cuda` the `base` device's stage times divided by 40."""
    scaled: dict[tuple[int, str], float | None] = dict(times)
    for name, ratio in ratios.items():
        for s in range(stage_count):
            t = times.get((s, base))
            scaled[(s, name)] = None if t is None else t / ratio
    return scaled


def parse_device_ratios(text: str) -> dict[str, float]:
    """`cuda=40,rocm=20` -> {device: how many times faster than the measured device}."""
    ratios: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            ratio = float(value)
        except ValueError:
            ratio = math.nan
        if not sep or not name.strip() or not (math.isfinite(ratio) and ratio > 0):
            raise UsageError(f"--device-ratio: {part!r} is not DEVICE=RATIO (a number > 0)", hint="e.g. cuda=40")
        ratios[name.strip()] = ratio
    if not ratios:
        raise UsageError("--device-ratio: nothing given", hint="e.g. cuda=40")
    return ratios

"""Which device runs which stage of a staged model (issue 29): pure arithmetic over the
stages' measured times, their memory and the links between devices, so that
`hxc select --explain`, the pipeline runtime (`hxc.pool.pipeline`, which takes its
workers from `stage_workers` here) and the simulator (`hxc.pool.pipeline_simulate`)
share one model of a pipeline. It reads plain records, not the manifest
(`hxc.runtime.place` turns a bundle into them).

The model. A placement gives each stage, in order, a device; consecutive stages on one
device form a *range*, and a device may hold several ranges. One item (a micro-batch,
or one step of a sequence) goes through the stages in order. Each stage runs in a
*worker* (a process of the pipeline), by one rule, `stage_workers`:

- without `pin`, a device has one worker holding every stage placed there, so all its
  stages serialise, even in separate ranges;
- with `pin` (`--pin split`), each stage has a worker of its own (the workers on
  CPU-type devices each pinned to their own cores), so two stages on one device run at
  once, as `--placement 0:cpu,1:cpu --pin split` asks. (The pipeline's library also
  takes explicit `ranges`, several stages to a pinned worker; `evaluate` costs them.)

Where stage i and stage i + 1 are in different workers, stage i's output
(`StageCost.out_bytes`) crosses the link between their devices; between two workers of
one device it goes through the host (shared memory, or down and back up the device's
own bus). Every *resource* is busy for some time per item:

- a worker: the sum of the times of the stages it holds;
- a link between two devices: the sum of the transfers that cross it (latency + bytes /
  bandwidth each); a hop between two workers of one device is a resource of its own.

Throughput is 1 / the busiest resource's time per item (items/s): with enough items in
flight every resource works at once, so the slowest one paces the pipeline. Latency is
the sum of one item's stage times and transfers. A device's memory holds the weights of
its stages plus their KV bytes per token x `context_tokens`, within its memory or the
cap given (`--device-memory`). A stage's time is the one measured (`hxc bench`, not
pinned): a pinned worker with fewer cores may be slower than that.

The search is exact: over every assignment of devices to stages when there are at most
`FULL_SEARCH_LIMIT` of them (depth-first, pruned by bounds that never cut off a better
placement), else over the placements that give each device one range
(`ONE_RANGE_LIMIT` at most), the shape llama.cpp's `--n-gpu-layers` and pipeline
planners use; past that it refuses and asks for `--placement`. Ties go to fewer devices,
then fewer cuts between devices, and a split is chosen only when it is predicted
strictly better than the best single device.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from hxc.errors import PlacementError, UsageError
from hxc.ui import human_size

Objective = Literal["throughput", "latency"]
OBJECTIVES: tuple[str, ...] = ("throughput", "latency")
# (stage index, device name) -> ms per item; None or absent: not measured, or cannot run there.
StageTimes = Mapping[tuple[int, str], float | None]

FULL_SEARCH_LIMIT = 2**16  # assignments: 2 devices x 16 stages, 3 x 10, 4 x 8
ONE_RANGE_LIMIT = 2**20


@dataclass(frozen=True)
class StageCost:
    """What one stage needs, from the manifest's `stages` list."""

    index: int
    weights_bytes: int
    kv_bytes_per_token: int = 0
    out_bytes: int = 0  # the tensors crossing to the next stage, per item

    def memory(self, context_tokens: int) -> int:
        return self.weights_bytes + self.kv_bytes_per_token * context_tokens


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    memory_bytes: int | None = None  # None: unknown, taken as unbounded
    price_per_hour: float | None = None
    kind: str = "cpu"


@dataclass(frozen=True)
class Link:
    """A transfer's time: a fixed latency plus bytes / bandwidth."""

    name: str
    latency_ms: float = 0.0
    bytes_per_s: float | None = None  # None: no bandwidth limit

    def ms(self, nbytes: int) -> float:
        return self.latency_ms + (nbytes / self.bytes_per_s * 1e3 if self.bytes_per_s else 0.0)

    def describe(self) -> str:
        rate = f"{self.bytes_per_s / 1e9:g} GB/s" if self.bytes_per_s else "unbounded bandwidth"
        return f"{self.name} ({self.latency_ms:g} ms + bytes at {rate})"


# Two worker processes on one host: issue 29 measured a hidden state's hop at
# 0.08-0.09 ms; 8 GB/s is a modest memcpy rate through shared memory (measure, override).
SHARED_MEMORY = Link("shared memory", latency_ms=0.085, bytes_per_s=8e9)


@dataclass(frozen=True)
class Links:
    """The link between any two devices: `pairs` names one for a pair (either order);
    else a hop to or from a device with a bus of its own (`attached`: a GPU's PCIe)
    crosses it, and one between two such devices crosses both; else `default`."""

    default: Link = SHARED_MEMORY
    attached: Mapping[str, Link] = field(default_factory=dict)
    pairs: Mapping[tuple[str, str], Link] = field(default_factory=dict)

    def route(self, a: str, b: str) -> tuple[Link, ...]:
        """The links a hop from a worker on `a` to a worker on `b` crosses. Two workers
        of one device (`a == b`, pinned) pass it through the host too: down and back up
        the device's own bus where it has one, else `default`. (Stages in one worker
        pass nothing: the model asks for no route then.)"""
        pair = self.pairs.get((a, b)) or self.pairs.get((b, a))
        if pair is not None:
            return (pair,)
        own = tuple(self.attached[d] for d in (a, b) if d in self.attached)
        return own or (self.default,)

    def ms(self, a: str, b: str, nbytes: int) -> float:
        return sum(link.ms(nbytes) for link in self.route(a, b))


def link_name(a: str, b: str) -> str:
    """The resource a hop between `a` and `b` occupies, whichever way it goes."""
    return "<->".join(sorted((a, b)))


Pin = bool | str | None  # True or "split": pinned; False or None: one worker per device
Ranges = Sequence[tuple[int, int]]


@dataclass(frozen=True)
class StageWorker:
    """One worker (process) of a pipeline: its device and the ranges of stages it holds."""

    name: str  # the resource the model costs: `cpu` (the device's one worker), or `cpu[1]`, `cpu[0-1]` (its own)
    device: str
    ranges: tuple[tuple[int, int], ...]

    @property
    def stages(self) -> tuple[int, ...]:
        return tuple(s for a, b in self.ranges for s in range(a, b + 1))


def pinned(pin: Pin) -> bool:
    """Whether `pin` asks for workers of their own (True or "split"), or a one-line UsageError."""
    if pin not in (False, True, "split", None):
        raise UsageError(f"unknown pinning {pin!r} for a pipeline", hint="use pin=True (or 'split'), or no pinning")
    return bool(pin)


def stage_workers(assignment: Sequence[str], pin: Pin = False, ranges: Ranges | None = None) -> tuple[StageWorker, ...]:
    """The workers of a pipeline for `assignment` (a device per stage), in the order of
    their first stage: the one rule the solver costs and the pipeline starts.

    Without `pin`: one per device, holding every stage placed there. With `pin` (True or
    "split"): one per stage, or one per range of `ranges` (consecutive stages on one
    device, covering every stage in order). A one-line UsageError otherwise."""
    n = len(assignment)
    if n < 1:
        raise UsageError("a pipeline needs at least one stage")
    if not pinned(pin):
        if ranges is not None:
            raise UsageError("ranges= gives pinned workers their stages; pass pin=True with it")
        by_device: dict[str, list[tuple[int, int]]] = {}
        for s, d in enumerate(assignment):
            spans = by_device.setdefault(d, [])
            if spans and spans[-1][1] == s - 1:
                spans[-1] = (spans[-1][0], s)
            else:
                spans.append((s, s))
        return tuple(StageWorker(d, d, tuple(spans)) for d, spans in by_device.items())
    spans = list(ranges) if ranges is not None else [(s, s) for s in range(n)]
    expected = 0
    for a, b in spans:
        if a != expected or b < a or b >= n:
            raise UsageError(f"pipeline ranges {list(spans)} do not cover stages 0-{n - 1} in order, once each")
        if len(set(assignment[a:b + 1])) != 1:
            raise UsageError(f"stages {a}-{b} are one worker's range but are placed on {', '.join(assignment[a:b + 1])}")
        expected = b + 1
    if expected != n:
        raise UsageError(f"pipeline ranges {list(spans)} do not cover stages 0-{n - 1}")
    return tuple(StageWorker(_worker(assignment[a], a, b), assignment[a], ((a, b),)) for a, b in spans)


@dataclass(frozen=True)
class Step:
    """One thing an item waits for: a worker running a range of stages, or a transfer."""

    resource: str  # a device, a pinned worker `device[first-last]`, or a link `a<->b`
    ms: float
    first: int  # the stages it runs; for a transfer, the stage whose output crosses
    last: int
    transfer: bool = False


@dataclass(frozen=True)
class Plan:
    """One assignment and what the model predicts for it."""

    assignment: tuple[str, ...]  # the device of each stage
    steps: tuple[Step, ...]  # one item's path, in order
    memory: Mapping[str, int]  # bytes per device used
    loads: Mapping[str, float]  # ms per item each resource is busy
    bottleneck: str
    bottleneck_ms: float
    latency_ms: float

    @property
    def items_per_s(self) -> float:
        return 1e3 / self.bottleneck_ms if self.bottleneck_ms > 0 else math.inf

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.assignment))

    @property
    def split(self) -> bool:
        return len(self.devices) > 1

    @property
    def ranges(self) -> tuple[tuple[int, int, str], ...]:
        """(first, last, device) of each range (consecutive stages on one device), in order."""
        out: list[tuple[int, int, str]] = []
        for k, d in enumerate(self.assignment):
            out[-1:] = [(out[-1][0], k, d)] if out and out[-1][2] == d else [*out[-1:], (k, k, d)]
        return tuple(out)

    @property
    def workers(self) -> tuple[str, ...]:
        """The workers, by name, in the order an item meets them first."""
        return tuple(dict.fromkeys(s.resource for s in self.steps if not s.transfer))

    def describe(self) -> str:
        return ", ".join(f"{_stages(a, b)} on {d}" for a, b, d in self.ranges)


@dataclass(frozen=True)
class Placement:
    """The solver's answer: the plan, the best single device's for comparison (None when
    the model fits no single device), why one was chosen, and the arithmetic."""

    objective: str
    plan: Plan
    single: Plan | None
    reason: str
    search: str
    lines: tuple[str, ...]

    @property
    def assignment(self) -> tuple[str, ...]:
        return self.plan.assignment

    @property
    def items_per_s(self) -> float:
        return self.plan.items_per_s

    @property
    def latency_ms(self) -> float:
        return self.plan.latency_ms

    @property
    def bottleneck(self) -> str:
        return self.plan.bottleneck

    @property
    def memory(self) -> Mapping[str, int]:
        return self.plan.memory

    def explain(self) -> str:
        return "\n".join(self.lines)


@dataclass(frozen=True)
class _Problem:
    """The inputs as index-based tables, checked once; what the search walks."""

    stages: tuple[StageCost, ...]
    devices: tuple[DeviceInfo, ...]
    time: tuple[tuple[float | None, ...], ...]  # [stage][device] ms
    hop: tuple[tuple[tuple[float, ...], ...], ...]  # [stage][from][to] ms for stage's output
    need: tuple[int, ...]  # bytes per stage
    capacity: tuple[float, ...]  # bytes per device (inf: unbounded)
    capped: tuple[bool, ...]
    links: Links
    pin: bool
    context_tokens: int

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.devices)


def _problem(stages: Sequence[StageCost], devices: Sequence[DeviceInfo], times: StageTimes, links: Links | None,
             memory_caps: Mapping[str, int] | None, context_tokens: int, pin: bool) -> _Problem:  # fmt: skip
    if not stages:
        raise ValueError("no stages to place")
    if [s.index for s in stages] != list(range(len(stages))):
        raise ValueError(f"stages must be numbered 0..{len(stages) - 1} in order, not {[s.index for s in stages]}")
    names = [d.name for d in devices]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"devices must be one or more distinct names, not {names}")
    caps = dict(memory_caps or {})
    if unknown := sorted(set(caps) - set(names)):
        raise UsageError(f"--device-memory names {', '.join(unknown)}, not a device here", hint=f"devices: {', '.join(names)}")
    links = links or Links()
    time = []
    for s in stages:
        row = []
        for d in names:
            t = times.get((s.index, d))
            if t is not None and not (math.isfinite(t) and t >= 0):
                raise ValueError(f"stage {s.index} on {d}: time {t!r} is not a finite number of ms >= 0")
            row.append(t)
        time.append(tuple(row))
    hop = tuple(tuple(tuple(links.ms(a, b, s.out_bytes) for b in names) for a in names) for s in stages)
    capacity, capped = [], []
    for d in devices:
        limits = [x for x in (d.memory_bytes, caps.get(d.name)) if x is not None]
        capacity.append(float(min(limits)) if limits else math.inf)
        capped.append(d.name in caps and (d.memory_bytes is None or caps[d.name] < d.memory_bytes))
    need = tuple(s.memory(context_tokens) for s in stages)
    return _Problem(tuple(stages), tuple(devices), tuple(time), hop, need, tuple(capacity), tuple(capped), links, pin,
                    context_tokens)  # fmt: skip


def evaluate(stages: Sequence[StageCost], devices: Sequence[DeviceInfo], times: StageTimes,
             assignment: Sequence[str], links: Links | None = None, *, pin: Pin = False,
             context_tokens: int = 0, ranges: Ranges | None = None) -> Plan:  # fmt: skip
    """What the model predicts for one assignment (a device name per stage), its workers
    as `stage_workers(assignment, pin, ranges)` gives them; a stage without a time on its
    device is a one-line UsageError. Memory is reported, not checked: `solve` checks it."""
    p = _problem(stages, devices, times, links, None, context_tokens, pinned(pin))
    return _plan(p, _indices(p, assignment), ranges)


def _indices(p: _Problem, assignment: Sequence[str]) -> tuple[int, ...]:
    index = {n: i for i, n in enumerate(p.names)}
    if len(assignment) != len(p.stages):
        raise UsageError(f"the placement names {len(assignment)} stage(s); the model has {len(p.stages)}")
    if unknown := sorted(set(assignment) - set(index)):
        raise UsageError(f"the placement names {', '.join(unknown)}, not a device here", hint=f"devices: {', '.join(p.names)}")
    picked = tuple(index[d] for d in assignment)
    for s, d in enumerate(picked):
        if p.time[s][d] is None:
            raise UsageError(f"stage {s} has no measured time on {p.names[d]}", hint="run `hxc bench` on that device first")
    return picked


def _plan(p: _Problem, picked: Sequence[int], ranges: Ranges | None = None) -> Plan:
    names = p.names
    assignment = tuple(names[d] for d in picked)
    worker = {s: w.name for w in stage_workers(assignment, p.pin, ranges) for s in w.stages}
    steps: list[Step] = []
    memory: dict[str, int] = {}
    for s, d in enumerate(picked):
        memory[names[d]] = memory.get(names[d], 0) + p.need[s]
        if s > 0 and worker[s - 1] == worker[s]:  # the same worker runs on
            last = steps[-1]
            steps[-1] = Step(last.resource, last.ms + p.time[s][d], last.first, s)
            continue
        if s > 0:
            a = picked[s - 1]
            # Between devices the link is theirs, whoever the workers; on one device the hop is these two workers'.
            link = link_name(names[a], names[d]) if a != d else link_name(worker[s - 1], worker[s])
            steps.append(Step(link, p.hop[s - 1][a][d], s - 1, s - 1, transfer=True))
        steps.append(Step(worker[s], p.time[s][d], s, s))
    loads: dict[str, float] = {}
    for step in steps:
        loads[step.resource] = loads.get(step.resource, 0.0) + step.ms
    bottleneck = max(loads, key=lambda r: loads[r])  # first of the busiest, in path order
    return Plan(assignment, tuple(steps), memory, loads, bottleneck, loads[bottleneck], sum(s.ms for s in steps))


def _worker(device: str, first: int, last: int) -> str:
    return f"{device}[{first}]" if first == last else f"{device}[{first}-{last}]"


def _stages(first: int, last: int) -> str:
    return f"stage {first}" if first == last else f"stages {first}-{last}"


def _key(objective: str, plan: Plan) -> tuple[float, float, int, int]:
    """What `objective` minimises, then the other metric, then devices, then cuts."""
    primary, secondary = ((plan.bottleneck_ms, plan.latency_ms) if objective == "throughput"
                          else (plan.latency_ms, plan.bottleneck_ms))  # fmt: skip
    return primary, secondary, len(plan.devices), len(plan.ranges) - 1


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _better(a: Sequence[float], b: Sequence[float]) -> bool:
    """Lexicographically smaller, floats equal within rounding counting as equal."""
    for x, y in zip(a, b):
        if not _close(x, y):
            return x < y
    return False


def _search(p: _Problem, objective: str, one_range: bool) -> tuple[int, ...] | None:
    """The best feasible assignment (device indices), exactly: depth-first over the
    stages, cutting a branch only when a lower bound on its best key is already worse
    than the best found."""
    n, m = len(p.stages), len(p.devices)
    fastest = [min((t for t in row if t is not None), default=math.inf) for row in p.time]
    rest_sum = [sum(fastest[i:]) for i in range(n + 1)]  # each later stage takes at least its fastest time
    rest_max = [max(fastest[i:], default=0.0) for i in range(n + 1)]
    throughput = objective == "throughput"
    best: list = [None, None]  # key, assignment
    picked: list[int] = []
    used = [0.0] * m  # memory
    load = [0.0] * m  # per device's worker; with pin, the last stage's (each stage its own worker)
    links: dict[tuple[int, int], float] = {}
    left: set[int] = set()  # devices whose range has ended (one_range)

    def visit(i: int, peak: float, latency: float) -> None:
        if i == n:
            key = (peak, latency) if throughput else (latency, peak)
            full = (*key, len(set(picked)), sum(a != b for a, b in zip(picked, picked[1:])))
            if best[0] is None or _better(full, best[0]):
                best[0], best[1] = full, tuple(picked)
            return
        last = picked[-1] if picked else None
        for d in range(m):
            t = p.time[i][d]
            if t is None or used[d] + p.need[i] > p.capacity[d] or (one_range and d in left):
                continue
            pair = (min(last, d), max(last, d)) if last is not None and last != d else None
            # Without pin one device's stages share its worker: no hop. With pin each
            # stage is a worker of its own: a hop to the next, even on one device.
            hop = p.hop[i - 1][last][d] if last is not None and (pair or p.pin) else 0.0
            new_peak, new_latency = peak, latency + hop + t
            saved_load, saved_link = load[d], links.get(pair, 0.0) if pair else 0.0
            if pair:
                links[pair] = saved_link + hop
                new_peak = max(new_peak, links[pair])
            else:  # two workers of one device: a hop of its own
                new_peak = max(new_peak, hop)
            load[d] = t if p.pin else load[d] + t
            new_peak = max(new_peak, load[d])
            bound_peak = max(new_peak, rest_max[i + 1])
            if not p.pin:  # the remaining work spread evenly over every device at best
                bound_peak = max(bound_peak, (sum(load) + rest_sum[i + 1]) / m)
            bound_latency = new_latency + rest_sum[i + 1]
            bound = (bound_peak, bound_latency) if throughput else (bound_latency, bound_peak)
            if best[0] is None or not _better(best[0][:2], bound):
                used[d] += p.need[i]
                picked.append(d)
                ended = last is not None and last != d and one_range
                if ended:
                    left.add(last)
                visit(i + 1, new_peak, new_latency)
                if ended:
                    left.discard(last)
                picked.pop()
                used[d] -= p.need[i]
            load[d] = saved_load
            if pair:
                links[pair] = saved_link

    visit(0, 0.0, 0.0)
    return best[1]


def one_range_count(stages: int, devices: int) -> int:
    """How many placements give each device at most one range: k devices in order
    (devices! / (devices - k)! ways) cutting the stages in k - 1 places."""
    return sum(math.perm(devices, k) * math.comb(stages - 1, k - 1) for k in range(1, min(stages, devices) + 1))


def solve(stages: Sequence[StageCost], devices: Sequence[DeviceInfo], times: StageTimes, links: Links | None = None,
          objective: str = "throughput", *, memory_caps: Mapping[str, int] | None = None,
          forced: Sequence[str] | None = None, context_tokens: int = 0, pin: Pin = False) -> Placement:  # fmt: skip
    """The placement that maximises throughput or minimises latency within memory, or
    the `forced` one (a device per stage, e.g. from `parse_placement`) checked and
    costed; its workers as `stage_workers` gives them for `pin`. Never a split
    predicted no better than the best single device. Nothing that fits is a one-line
    PlacementError naming the memory needed and available."""
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown placement objective {objective!r}", hint=f"one of {', '.join(OBJECTIVES)}")
    p = _problem(stages, devices, times, links, memory_caps, context_tokens, pinned(pin))
    n, m = len(p.stages), len(p.devices)
    singles = [_plan(p, (d,) * n) for d in range(m)
               if all(row[d] is not None for row in p.time) and sum(p.need) <= p.capacity[d]]  # fmt: skip
    single = min(singles, key=lambda pl: _key(objective, pl), default=None)
    if forced is not None:
        plan = _plan(p, _indices(p, forced))
        for d, used in plan.memory.items():
            i = p.names.index(d)
            if used > p.capacity[i]:
                raise PlacementError(f"the placement puts {human_size(used)} on {d}, which holds {_capacity(p, i)}")
        search, reason = "forced by --placement", "forced by --placement"
        if single is not None and plan.split and _better(_key(objective, single)[:2], _key(objective, plan)[:2]):
            reason += f"; predicted worse than {single.assignment[0]} alone"
    else:
        _check_feasible(p)
        if m**n <= FULL_SEARCH_LIMIT:
            search, one_range = f"exact over all {m**n:,} assignments of {m} device(s) to {n} stage(s)", False
        elif (count := one_range_count(n, m)) <= ONE_RANGE_LIMIT:
            search = (f"exact over the {count:,} placements that give each device one range ({m}^{n} assignments "
                      f"in all: too many to search)")  # fmt: skip
            one_range = True
        else:
            raise PlacementError(f"{n} stages on {m} devices: too many placements to search exactly",
                                 hint="force one with --placement")  # fmt: skip
        found = _search(p, objective, one_range)
        if found is None:
            raise PlacementError(_nothing_fits(p))
        plan = _plan(p, found)
        reason = _why(p, objective, plan, single)
        if single is not None and plan.split and not _better(_key(objective, plan)[:2], _key(objective, single)[:2]):
            plan = single  # the search's ties already prefer one device; this keeps the rule whatever the rounding
    return Placement(objective, plan, single, reason, search, tuple(_explain(p, objective, plan, single, reason, search)))


def _why(p: _Problem, objective: str, plan: Plan, single: Plan | None) -> str:
    if single is None:
        return f"no single device can run it ({_no_single(p)}), so it is split"
    metric = "throughput" if objective == "throughput" else "latency"
    if not plan.split or not _better(_key(objective, plan)[:2], _key(objective, single)[:2]):
        return f"{single.devices[0]} alone is predicted best (no split has better {metric})"
    if objective == "throughput":
        gain = f"{plan.items_per_s / single.items_per_s:.3g}x the throughput of"
    else:
        gain = f"{single.latency_ms - plan.latency_ms:.3g} ms less latency than"
    return f"the split is predicted {gain} {single.devices[0]} alone, the best single device"


def _no_single(p: _Problem) -> str:
    timed = [d for d in range(len(p.devices)) if all(row[d] is not None for row in p.time)]
    if not timed:
        return "no device has a time for every stage"
    return f"the model needs {human_size(sum(p.need))}; " + ", ".join(f"{p.names[d]} holds {_capacity(p, d)}" for d in timed)


def _capacity(p: _Problem, d: int) -> str:
    cap = p.capacity[d]
    return ("unbounded" if math.isinf(cap) else human_size(cap)) + (" (capped)" if p.capped[d] else "")


def _check_feasible(p: _Problem) -> None:
    for s, row in enumerate(p.time):
        if all(t is None for t in row):
            raise PlacementError(f"stage {s} has no measured time on any device", hint="run `hxc bench` first")
    for s, need in enumerate(p.need):
        if not any(need <= p.capacity[d] and p.time[s][d] is not None for d in range(len(p.devices))):
            holds = ", ".join(f"{p.names[d]} {_capacity(p, d)}" for d in range(len(p.devices)))
            raise PlacementError(f"stage {s} alone needs {human_size(need)}, more than any device that runs it holds ({holds})")


def _nothing_fits(p: _Problem) -> str:
    total = sum(p.need)
    kv = sum(s.kv_bytes_per_token for s in p.stages) * p.context_tokens
    parts = f" (weights {human_size(total - kv)} + KV {human_size(kv)} at {p.context_tokens} tokens)" if kv else ""
    holds = ", ".join(f"{p.names[d]} {_capacity(p, d)}" for d in range(len(p.devices)))
    return (f"the model needs {human_size(total)}{parts}; no device holds it and no split of its {len(p.stages)} "
            f"stages fits: {holds}")  # fmt: skip


def _explain(p: _Problem, objective: str, plan: Plan, single: Plan | None, reason: str, search: str) -> list[str]:
    workers = "pinned: each stage has its own worker" if p.pin else "one worker per device"
    if objective == "throughput":
        head = (f"objective: throughput = 1000 / the busiest resource's ms per item (a worker's stages add up; {workers}) "
                "-> items/s; ties: lower latency, fewer devices")  # fmt: skip
    else:
        head = (f"objective: latency = every stage time + every transfer of one item ({workers}); ties: higher "
                "throughput, fewer devices")  # fmt: skip
    lines = [head]
    for d, dev in enumerate(p.devices):
        price = f", {dev.price_per_hour:g}/h" if dev.price_per_hour is not None else ""
        lines.append(f"device {dev.name} ({dev.kind}): memory {_capacity(p, d)}{price}")
    for s, stage in enumerate(p.stages):
        kv = f" + KV {human_size(stage.kv_bytes_per_token)}/token x {p.context_tokens}" if stage.kv_bytes_per_token else ""
        ts = ", ".join(f"{name} {'-' if t is None else f'{t:.4g} ms'}" for name, t in zip(p.names, p.time[s]))
        lines.append(f"stage {s}: {human_size(stage.weights_bytes)} weights{kv}, {human_size(stage.out_bytes)} out; {ts}")
    if single is not None:
        lines.append(f"best single device: {single.devices[0]}: {single.bottleneck_ms:.4g} ms per item -> "
                     f"{single.items_per_s:.4g} items/s, latency {single.latency_ms:.4g} ms")  # fmt: skip
    else:
        lines.append(f"best single device: none ({_no_single(p)})")
    lines.append(f"placement: {plan.describe()}")
    for i, step in enumerate(plan.steps):
        if step.transfer:
            a, b = plan.assignment[step.first], plan.assignment[step.first + 1]
            via = " + ".join(link.describe() for link in p.links.route(a, b))
            ends = (a, b) if a != b else (plan.steps[i - 1].resource, plan.steps[i + 1].resource)  # two workers of a
            lines.append(f"  {ends[0]} -> {ends[1]}: stage {step.first}'s {human_size(p.stages[step.first].out_bytes)} "
                         f"over {via} = {step.ms:.4g} ms")  # fmt: skip
        else:
            d = p.names.index(plan.assignment[step.first])
            parts = " + ".join(f"{p.time[s][d]:.4g}" for s in range(step.first, step.last + 1))
            sums = f"{parts} = " if step.last > step.first else ""
            lines.append(f"  {step.resource}: {_stages(step.first, step.last)}: {sums}{step.ms:.4g} ms")
    shared = [r for r in plan.loads if sum(s.resource == r for s in plan.steps) > 1]
    for r in shared:
        lines.append(f"  {r} is busy {plan.loads[r]:.4g} ms per item in all (its ranges serialise)")
    lines.append(f"bottleneck: {plan.bottleneck} at {plan.bottleneck_ms:.4g} ms -> {plan.items_per_s:.4g} items/s; "
                 f"latency {plan.latency_ms:.4g} ms")  # fmt: skip
    lines.append("memory: " + ", ".join(f"{d} {human_size(b)} of {_capacity(p, p.names.index(d))}" for d, b in plan.memory.items()))
    lines.append(f"why: {reason}")
    lines.append(f"search: {search}")
    return lines


# Sizes: decimal (KB, MB, GB) and binary (KiB, MiB, GiB) units, case as written.
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*")


def parse_size(text: str, what: str = "size") -> int:
    """`2GiB`, `512 MiB`, `1.5GB`, `4096` (bytes) -> bytes; anything else is a one-line UsageError."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise UsageError(f"{what}: {text!r} is not a size", hint="a number with B, KiB, MiB, GiB, KB, MB or GB")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_device_memory(text: str) -> dict[str, int]:
    """`vulkan=2GiB,cpu=512MiB` -> {device: bytes}, for `--device-memory`."""
    caps: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, size = part.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--device-memory: {part!r} is not DEVICE=SIZE", hint="e.g. vulkan=2GiB,cpu=512MiB")
        if name.strip() in caps:
            raise UsageError(f"--device-memory: {name.strip()} is given twice")
        caps[name.strip()] = parse_size(size, f"--device-memory {name.strip()}")
    if not caps:
        raise UsageError("--device-memory: nothing given", hint="e.g. vulkan=2GiB,cpu=512MiB")
    return caps


def parse_placement(text: str, stage_count: int) -> tuple[str, ...]:
    """`0:cpu,1:vulkan` or `0-11:cuda,12-23:cpu` -> the device of each of `stage_count`
    stages; every stage named exactly once, or a one-line UsageError."""
    hint = f"STAGE[-STAGE]:DEVICE,... covering stages 0-{stage_count - 1}, e.g. 0:cpu,1:vulkan"
    devices: list[str | None] = [None] * stage_count
    for part in filter(None, (p.strip() for p in text.split(","))):
        span, sep, device = part.partition(":")
        match = re.fullmatch(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?", span)
        if not sep or not device.strip() or match is None:
            raise UsageError(f"--placement: {part!r} is not STAGE[-STAGE]:DEVICE", hint=hint)
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if first > last or last >= stage_count:
            raise UsageError(f"--placement: {part!r}: the model has stages 0-{stage_count - 1}", hint=hint)
        for s in range(first, last + 1):
            if devices[s] is not None:
                raise UsageError(f"--placement: stage {s} is placed twice ({devices[s]} and {device.strip()})")
            devices[s] = device.strip()
    missing = [s for s, d in enumerate(devices) if d is None]
    if missing:
        raise UsageError(f"--placement: stage(s) {', '.join(map(str, missing))} placed nowhere", hint=hint)
    return tuple(d for d in devices if d is not None)


def parse_link(text: str) -> Link:
    """`pcie=25GB/s` or `pcie=25GB/s+0.01ms` (a latency per transfer) -> a Link."""
    name, sep, spec = text.partition("=")
    rate, plus, latency = spec.partition("+")
    match = re.fullmatch(r"\s*([0-9.]+)\s*ms\s*", latency) if plus else None
    if not sep or not name.strip() or not rate.strip().endswith("/s") or (plus and match is None):
        raise UsageError(f"link {text!r} is not NAME=BANDWIDTH[+LATENCYms]", hint="e.g. pcie=25GB/s+0.01ms")
    try:
        ms = float(match.group(1)) if match else 0.0
    except ValueError:
        raise UsageError(f"link {text!r}: {latency!r} is not a latency in ms") from None
    bandwidth = parse_size(rate.strip()[:-2], f"link {name.strip()}")
    if bandwidth <= 0:
        raise UsageError(f"link {text!r}: the bandwidth must be positive")
    return Link(name.strip(), latency_ms=ms, bytes_per_s=float(bandwidth))

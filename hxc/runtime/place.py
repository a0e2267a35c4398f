"""Which device runs each stage of a staged bundle on this host (issue 29, item 2):
the manifest's `stages`, the per-stage profiles `hxc bench` recorded and the probed
devices turned into the records `hxc.runtime.placement` solves over, and its answer
(or a placement the user forces, `--placement 0:cpu,1:vulkan`) resolved to the
artifact each stage runs on its device.

    plan = place(manifest, probe_host(), selection, device_memory="vulkan=2GiB")
    plan.assignment   # ("cpu", "cpu"): a device name per stage
    plan.explain()    # the devices, the arithmetic, why

The devices. A device is offered for the stages when a whole chain of one target runs
there (the selection's best candidate on it: its stage artifacts are the ones that
device runs); it is named by its family (`cpu`, `vulkan`, `cuda`), and any name
`--device` takes for it (a driver, a URI, a target id) names it too. Its memory is
unknown to the probe, so unbounded unless `--device-memory` caps it.

The times. Stage k's time on a device is the p50 of the newest single-stream profile
of that device's stage-k artifact alone (`Profile.stage`), recorded on this host, else
on a host with the same device. Without any, the solver has nothing to weigh, and the
chain runs on the selection's best single device, as for an unplaced bundle (the
reason says so); a forced placement then runs uncosted.

How it runs. `pin` gives each stage a worker of its own (`--pin split`; the rule is
`hxc.runtime.placement.stage_workers`, and the solver costs it so). A plan that spans
several devices or pins workers is `pipelined`: `hxc run`, `hxc bench` and
`hxc.pool.load_pipeline` run it on a pipeline of worker processes
(`hxc.pool.pipeline`); on one device unpinned, `hxc.runtime.load` runs the stages as
one chain in one process (as it runs any placement: it holds no worker processes).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from hxc.errors import PlacementError, UsageError
from hxc.manifests.bundle import read_bundle, trust_policy
from hxc.manifests.schema import Artifact, Manifest
from hxc.manifests.signing import TrustPolicy
from hxc.runtime.placement import (DeviceInfo, Pin, Placement, StageCost, StageTimes, parse_device_memory,
                                   parse_placement, pinned, solve, stage_workers)  # fmt: skip
from hxc.runtime.probe import HostProbe, probe_host
from hxc.runtime.select import Candidate, Selection, matches_device, profiles_for, select
from hxc.targets import Device
from hxc.ui import human_size

Source = Literal["forced", "solver", "single"]


@dataclass(frozen=True)
class StageDevice:
    """A device that can run every stage: its name in a placement, and the selection's
    best chain on it (whose stage artifacts it runs)."""

    name: str
    candidate: Candidate

    @property
    def device(self) -> Device:
        return self.candidate.device

    @property
    def artifacts(self) -> tuple[Artifact, ...]:
        return self.candidate.stages

    def named_by(self, name: str) -> bool:
        """Whether `name` (as `--placement`, `--device-memory` or `--device` give it) is this device."""
        return name == self.name or any(matches_device(name, self.device, a) for a in self.artifacts)


@dataclass(frozen=True)
class StagePlan:
    """Where each stage runs and why: `source` says who decided (`forced` by the caller,
    the `solver` from per-stage profiles, or the `single` best device for want of them)."""

    devices: tuple[StageDevice, ...]  # every device that can run the stages, best first
    assignment: tuple[str, ...]  # a device name per stage
    source: Source
    reason: str
    placement: Placement | None  # the solver's answer and arithmetic; None: not costed
    objective: str
    caps: Mapping[str, int]
    pin: bool = False  # each stage a worker of its own (`--pin split`), as the solver costed it

    @property
    def pipelined(self) -> bool:
        """Whether it needs a pipeline of worker processes (`hxc.pool.pipeline`): stages on
        several devices, or pinned workers. On one device unpinned, the stages may run as
        one chain in one process (`hxc.runtime.stages.StagedSession`)."""
        return self.split or self.pin

    @property
    def workers(self) -> tuple[str, ...]:
        """The pipeline's workers by name, as the solver costs them: `cpu`, or `cpu[0]`, `cpu[1]`."""
        return tuple(w.name for w in stage_workers(self.assignment, self.pin))

    def device(self, stage: int) -> StageDevice:
        return next(d for d in self.devices if d.name == self.assignment[stage])

    @property
    def artifacts(self) -> tuple[Artifact, ...]:
        """The artifact each stage runs: its device's."""
        return tuple(self.device(k).artifacts[k] for k in range(len(self.assignment)))

    @property
    def split(self) -> bool:
        return len(set(self.assignment)) > 1

    def ranges(self) -> list[tuple[int, int, str]]:
        """(first, last, device) of each run of consecutive stages on one device."""
        out: list[tuple[int, int, str]] = []
        for k, name in enumerate(self.assignment):
            out[-1:] = [(out[-1][0], k, name)] if out and out[-1][2] == name else [*out[-1:], (k, k, name)]
        return out

    def describe(self) -> str:
        """`stages 0-1 on cpu, stage 2 on vulkan`."""
        return ", ".join(f"stage {a} on {d}" if a == b else f"stages {a}-{b} on {d}" for a, b, d in self.ranges())

    @property
    def flag(self) -> str:
        """The placement as `--placement` spells it: `0-1:cpu,2:vulkan`."""
        return ",".join(f"{a}:{d}" if a == b else f"{a}-{b}:{d}" for a, b, d in self.ranges())

    def explain(self) -> str:
        who = {"forced": "forced", "solver": "by the solver", "single": "on the best single device"}[self.source]
        pin = f"; pinned: workers {', '.join(self.workers)}" if self.pin else ""
        lines = [f"stage placement ({who}, objective {self.objective}{pin}): {self.describe()}"]
        for d in self.devices:
            lines.append(f"  device {d.name} = {d.device.label}: runs {d.candidate.id} "
                         f"({', '.join(a.id for a in d.artifacts)})")  # fmt: skip
        if self.placement is not None:  # the solver's arithmetic ends with why
            lines += [f"  {line}" for line in self.placement.lines]
        else:
            lines.append(f"  why: {self.reason}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        p = self.placement
        return {
            "assignment": list(self.assignment), "placement": self.flag, "source": self.source, "reason": self.reason,
            "objective": self.objective, "split": self.split, "pin": self.pin, "workers": list(self.workers),
            "stages": [{"stage": k, "device": name, "artifact": a.id, "uri": self.device(k).device.uri}
                       for k, (name, a) in enumerate(zip(self.assignment, self.artifacts))],
            "devices": [{"name": d.name, "device": d.device.label, "uri": d.device.uri, "chain": d.candidate.id,
                         "memory_cap_bytes": self.caps.get(d.name)} for d in self.devices],
            "predicted": p and {"items_per_s": p.items_per_s, "latency_ms": p.latency_ms, "bottleneck": p.bottleneck,
                                "memory_bytes": dict(p.memory)},
            "single": p and p.single and {"device": p.single.devices[0], "items_per_s": p.single.items_per_s,
                                          "latency_ms": p.single.latency_ms},
            "explain": list(p.lines) if p else [],
        }  # fmt: skip


def stage_devices(selection: Selection) -> tuple[StageDevice, ...]:
    """The devices that run a whole chain, best first: the selection's best candidate on
    each, named by its family (its driver, then its URI, where a family has several)."""
    best: dict[str, Candidate] = {}
    for c in selection.candidates:
        if c.stages:
            best.setdefault(c.device.uri, c)
    names: list[str] = []
    for c in best.values():
        name = next(n for n in (c.artifact.family, c.device.driver, c.device.uri) if n not in names)
        names.append(name)
    return tuple(StageDevice(n, c) for n, c in zip(names, best.values()))


def resolve_device(name: str, devices: Sequence[StageDevice], flag: str) -> str:
    """The placement name of the device `name` names, or a one-line UsageError."""
    found = [d for d in devices if d.named_by(name.strip())]
    if not found:
        raise UsageError(f"{flag}: {name.strip()!r} is not a device that can run this model's stages here",
                         hint=f"devices: {', '.join(f'{d.name} ({d.device.label})' for d in devices) or 'none'}")  # fmt: skip
    return found[0].name


def stage_costs(manifest: Manifest) -> list[StageCost]:
    """Each stage's weights, KV bytes per token and the bytes it hands on, from the manifest."""
    return [StageCost(s.index, s.weights_bytes, s.kv_bytes_per_token, sum(t.bytes for t in s.outputs))
            for s in manifest.stages]  # fmt: skip


def stage_times(manifest: Manifest, devices: Sequence[StageDevice], host_id: str) -> dict[tuple[int, str], float]:
    """ms per call of each stage on each device, from its newest single-stream profile
    (see the module's doc); a pair without one is absent."""
    times: dict[tuple[int, str], float] = {}
    for d in devices:
        for k, art in enumerate(d.artifacts):
            found, _ = profiles_for(manifest, art, d.device, host_id, stage=k)
            single = [p for p in found if p.scenario == "single-stream"] or found
            if single:
                times[(k, d.name)] = single[-1].latency.p50_ms
    return times


def device_infos(devices: Sequence[StageDevice]) -> list[DeviceInfo]:
    # hxc's probe does not report a device's memory: unbounded unless capped.
    return [DeviceInfo(d.name, None, kind=d.device.kind) for d in devices]


def parse_caps(device_memory: str | Mapping[str, int] | None, devices: Sequence[StageDevice]) -> dict[str, int]:
    """`--device-memory` (text or {name: bytes}) by placement name."""
    if device_memory is None:
        return {}
    given = parse_device_memory(device_memory) if isinstance(device_memory, str) else dict(device_memory)
    caps: dict[str, int] = {}
    for name, size in given.items():
        key = resolve_device(name, devices, "--device-memory")
        if key in caps:
            raise UsageError(f"--device-memory: {key} is given twice ({name!r} names it too)")
        caps[key] = size
    return caps


def parse_assignment(placement: str | Sequence[str], stage_count: int, devices: Sequence[StageDevice]) -> tuple[str, ...]:
    """`--placement` (text, or a device name per stage) as placement names, checked."""
    if isinstance(placement, str):
        named = parse_placement(placement, stage_count)
    else:
        named = tuple(placement)
        if len(named) != stage_count:
            raise UsageError(f"the placement names {len(named)} stage(s); the model has {stage_count}")
    return tuple(resolve_device(n, devices, "--placement") for n in named)


def place(manifest: Manifest, selection: Selection, host_id: str, *, objective: str = "latency",
          placement: str | Sequence[str] | None = None, device_memory: str | Mapping[str, int] | None = None,
          context_tokens: int = 0, fallback: bool = False, pin: Pin = False) -> StagePlan:  # fmt: skip
    """Where each stage of `manifest` (a staged bundle) runs on the devices `selection`
    offers: `placement` if given (checked, and costed when every stage has a time on
    its device), else the solver's choice for `objective` from this host's per-stage
    profiles within `device_memory` caps, else the selection's best single device.
    `fallback`: when the profiles place nothing (some stage unmeasured everywhere), run
    on the best single device instead of failing (no flag was given: nothing to honour).
    `pin`: each stage runs in a worker of its own (`hxc.runtime.placement.stage_workers`),
    and the solver costs it so."""
    pin = pinned(pin)
    if not manifest.stages:
        raise UsageError("placing stages needs a staged bundle (`hxc compile --stages`); this one has no stages")
    devices = stage_devices(selection)
    if not devices:
        raise PlacementError("no device here runs every stage of this model", hint="see `hxc select --explain`")
    n = len(manifest.stages)
    caps = parse_caps(device_memory, devices)
    costs, infos = stage_costs(manifest), device_infos(devices)
    times: StageTimes = stage_times(manifest, devices, host_id)
    if placement is not None:
        assignment = parse_assignment(placement, n, devices)
        if all(times.get((k, d)) is not None for k, d in enumerate(assignment)):
            placed = solve(costs, infos, times, objective=objective, memory_caps=caps, forced=assignment,
                           context_tokens=context_tokens, pin=pin)  # fmt: skip
            return StagePlan(devices, assignment, "forced", placed.reason, placed, objective, caps, pin)
        _check_memory(costs, assignment, caps, context_tokens)
        missing = sorted({d for k, d in enumerate(assignment) if times.get((k, d)) is None})
        reason = f"forced by --placement; not costed: no per-stage profiles on {', '.join(missing)} (run `hxc bench`)"
        return StagePlan(devices, assignment, "forced", reason, None, objective, caps, pin)
    if times:
        try:
            placed = solve(costs, infos, times, objective=objective, memory_caps=caps, context_tokens=context_tokens,
                           pin=pin)  # fmt: skip
        except PlacementError:
            if caps or not fallback:
                raise
        else:
            return StagePlan(devices, placed.assignment, "solver", placed.reason, placed, objective, caps, pin)
    best = devices[0]
    _check_memory(costs, (best.name,) * n, caps, context_tokens,
                  hint="run `hxc bench` to record per-stage profiles, or force a split with --placement")  # fmt: skip
    why = ("no per-stage profiles on this host (`hxc bench` records them)" if not times
           else "the per-stage profiles do not cover every stage")  # fmt: skip
    reason = f"{why}: every stage on {best.name}, the selection's best device ({best.candidate.reason})"
    return StagePlan(devices, (best.name,) * n, "single", reason, None, objective, caps, pin)


def placement_objective(policy: str) -> str:
    """What the solver optimises under a selection policy: latency for `latency`; else
    throughput (items per second, which cost divides by)."""
    return "latency" if policy == "latency" else "throughput"


def plan_stages(manifest: Manifest, selection: Selection, host_id: str, *, policy: str = "latency",
                placement: str | Sequence[str] | None = None, device_memory: str | Mapping[str, int] | None = None,
                pin: Pin = False) -> StagePlan | None:  # fmt: skip
    """`load`'s rule: a staged bundle's stages are placed (`place`) unless the selection
    is restricted to one device (`--device`), which then runs them all; the placement
    flags (and `pin`, workers of their own) are for a staged bundle, and exclude a device."""
    given = placement is not None or device_memory is not None
    if given and not manifest.stages:
        raise UsageError("--placement and --device-memory are for a staged bundle (`hxc compile --stages`)")
    if pinned(pin) and not manifest.stages:
        raise UsageError("pinning a worker per stage is for a staged bundle (`hxc compile --stages`)",
                         hint="a pool of devices pins with --devices ... --pin")  # fmt: skip
    if selection.forced and pinned(pin):
        raise UsageError("--device and --pin exclude each other for a staged bundle",
                         hint="--device runs every stage there in one process; --pin split gives each stage a worker")  # fmt: skip
    if not manifest.stages or (selection.forced and not given):
        return None
    if selection.forced:
        raise UsageError("--device and --placement/--device-memory exclude each other",
                         hint="--device runs every stage there; --placement names a device per stage")  # fmt: skip
    return place(manifest, selection, host_id, objective=placement_objective(policy), placement=placement,
                 device_memory=device_memory, fallback=not given, pin=pin)  # fmt: skip


def plan_bundle(bundle: str | os.PathLike[str], *, device: str | None = None, policy: str = "latency",
                precision: str | None = None, tolerance: float | None = None,
                placement: str | Sequence[str] | None = None, device_memory: str | Mapping[str, int] | None = None,
                pin: Pin = False, trust: TrustPolicy | None = None, probe: HostProbe | None = None) -> StagePlan | None:  # fmt: skip
    """Where a staged bundle's stages run (`plan_stages`, `load`'s rule), worked out
    opening no device: to report it, choose between one process and a pipeline
    (`StagePlan.pipelined`), and fail in one line before any worker starts. None: not
    a staged bundle, every stage on `device`, or nothing here runs it (loading says why)."""
    read = read_bundle(bundle, trust if trust is not None else trust_policy())
    probe = probe or probe_host()
    given = placement is not None or device_memory is not None or pinned(pin)
    # With placement flags and no --device, $HXC_DEVICE does not restrict the devices: the flags name them.
    sel = select(read.manifest, probe, policy=policy, device="" if given and not device else device,
                 precision=precision, tolerance=tolerance)  # fmt: skip
    if not sel.candidates:
        return None
    return plan_stages(read.manifest, sel, probe.host().id, policy=policy, placement=placement,
                       device_memory=device_memory, pin=pin)  # fmt: skip


def _check_memory(costs: Sequence[StageCost], assignment: Sequence[str], caps: Mapping[str, int], context_tokens: int,
                  hint: str | None = None) -> None:  # fmt: skip
    """What `solve` checks, for a placement it cannot cost: each capped device holds its stages."""
    used: dict[str, int] = {}
    for cost, d in zip(costs, assignment):
        used[d] = used.get(d, 0) + cost.memory(context_tokens)
    for d, nbytes in used.items():
        if d in caps and nbytes > caps[d]:
            raise PlacementError(f"the placement puts {human_size(nbytes)} on {d}, which holds "
                                 f"{human_size(caps[d])} (capped)", hint=hint)  # fmt: skip

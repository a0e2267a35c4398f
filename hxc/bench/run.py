"""`hxc bench` as a library call: measure, then record profiles in the manifest.

Scenarios follow MLPerf Inference: single-stream latency (one request at a time, at
batch 1 when the batch dimension is dynamic, else at the compiled batch) and, for
models with a dynamic batch dimension, offline throughput at several batch sizes.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hxc.bench.baselines import SkippedBaseline, baseline, is_baseline, resolve
from hxc.bench.contenders import artifact_contenders, stage_contenders
from hxc.bench.gate import GateVerdict, judge
from hxc.bench.isolate import DeviceGroup, measure_devices
from hxc.bench.measure import Budget, Contender, Timing
from hxc.errors import ExitCode, NoCompatibleArtifactError, UsageError
from hxc.manifests import update_manifest
from hxc.manifests.bundle import read_bundle, trust_policy
from hxc.manifests.merge import add_profiles
from hxc.manifests.schema import Conditions, Host, Manifest, Profile
from hxc.manifests.signing import TrustPolicy
from hxc.runtime.probe import probe_host
from hxc.verify import load_golden

DEFAULT_OFFLINE_BATCHES = (8, 32)


@dataclass(frozen=True)
class BenchResult:
    host: Host
    profiles: list[Profile]
    recorded: bool
    gate: GateVerdict | None = None  # with --fail-if-slower-than
    skipped_baselines: tuple[SkippedBaseline, ...] = ()  # `auto` ones this install cannot run
    errors: tuple[str, ...] = ()  # devices that failed or hung during the run

    @property
    def exit_code(self) -> ExitCode:
        return self.gate.exit_code if self.gate is not None else ExitCode.OK


def run_bench(
    bundle: str | Path,
    *,
    baselines: Sequence[str] = ("auto",),
    device: str | None = None,
    offline_batches: Sequence[int] = DEFAULT_OFFLINE_BATCHES,
    budget: Budget = Budget(),
    record: bool = True,
    allow_pickle: bool = False,
    gate: str | None = None,
    margin: float = 0.0,
    trust: TrustPolicy | None = None,
    on_progress: Callable[[str], None] = lambda s: None,
    placement: str | None = None,
    device_memory: str | None = None,
) -> BenchResult:
    """Time every artifact this host can run next to `baselines` (names, `auto` for the
    bundle's frontend's default, `none`). With `gate` (a baseline name), the result's
    exit code says whether the fastest artifact kept up with it within `margin`.
    `trust`: what the bundle must prove (None: as $HXC_TRUSTED_KEYS says), here and in
    every process that times it.

    A staged bundle's stages are also timed alone on each device (profiles with
    `stage`), for `hxc.runtime.place`. `placement` / `device_memory` (as `load` takes
    them) time that placement of a staged bundle end to end instead, in this process,
    not recorded: a profile names one artifact, not a mix."""
    path = Path(bundle)
    trust = trust if trust is not None else trust_policy()
    manifest = read_bundle(path, trust).manifest
    if placement is not None or device_memory is not None:
        if device is not None or gate is not None or any(b not in ("auto", "none") for b in baselines):
            raise UsageError("--placement and --device-memory time one placement alone",
                             hint="leave out --device, --baseline and --fail-if-slower-than")  # fmt: skip
        return _bench_placement(path, manifest, placement, device_memory, offline_batches, budget, trust, on_progress)
    if manifest.language_model is not None:
        if gate is not None or any(b not in ("auto", "none") for b in baselines):
            raise UsageError("hxc bench has no baseline for language models yet (it times the artifacts alone)",
                             hint="leave out --baseline and --fail-if-slower-than")  # fmt: skip
        return _bench_language_model(path, manifest, device, budget, record, trust, on_progress)
    chosen, skipped = resolve(baselines, manifest)
    gate_baseline = baseline(gate) if gate is not None else None
    if gate_baseline is not None and gate_baseline not in chosen:
        gate_baseline.require()  # named on purpose: say what to install, if that is why it is missing
        raise UsageError(f"--fail-if-slower-than {gate}: that baseline is not measured", hint=f"add --baseline {gate}")
    probe = probe_host()
    host = probe.host()
    names = tuple(b.name for b in chosen)
    contenders = bench_contenders(path, names, device, allow_pickle, trust=trust)
    if not contenders:
        raise NoCompatibleArtifactError(f"{path}: no artifact in this bundle can run on this host (see `hxc select --explain`)")
    groups = [
        DeviceGroup(label, cs, functools.partial(bench_contenders, path, names, device, allow_pickle,
                                                 tuple(c.id for c in cs), trust))
        for label, cs in by_process(contenders).items()
    ]  # fmt: skip

    golden_inputs, _ = load_golden(path, manifest)
    cases = scenarios(manifest, golden_inputs, offline_batches)
    run = measure_devices(groups, [inputs for _, _, inputs in cases], budget, on_progress)
    profiles: list[Profile] = []
    for (scenario, batch, _), timings in zip(cases, run.timings):
        profiles += [_profile(host.id, manifest, t, scenario, batch) for t in timings]
    if record and profiles:
        update_manifest(path, lambda m: add_profiles(m, [host], profiles))
    verdict = judge(profiles, gate_baseline, margin) if gate_baseline is not None else None
    return BenchResult(host, profiles, record and bool(profiles), verdict, tuple(skipped), tuple(run.errors))


def _bench_language_model(path: Path, manifest: Manifest, device: str | None, budget: Budget, record: bool,
                          trust: TrustPolicy, on_progress: Callable[[str], None]) -> BenchResult:  # fmt: skip
    """Time to first token and time per output token (at batch 1 and at the bundle's
    slots) of every artifact this host can run, with each one's memory
    (`hxc.bench.llm`), recorded as profiles."""
    from hxc.bench.llm import cases, llm_contenders, with_memory

    assert manifest.language_model is not None
    host = probe_host().host()
    contenders = llm_contenders(path, device, trust=trust)
    if not contenders:
        raise NoCompatibleArtifactError(f"{path}: no artifact in this bundle can run on this host (see `hxc select --explain`)")
    groups = [DeviceGroup(label, cs, functools.partial(llm_contenders, path, device, tuple(c.id for c in cs), trust))
              for label, cs in by_process(contenders).items()]  # fmt: skip
    timed = cases(manifest.language_model)
    run = measure_devices(groups, [c.inputs for c in timed], budget, on_progress)
    profiles = [dataclasses.replace(_profile(host.id, manifest, t, case.scenario, case.batch),
                                    generation=with_memory(case.timing, manifest, t.contender.id))
                for case, timings in zip(timed, run.timings) for t in timings]  # fmt: skip
    if record and profiles:
        update_manifest(path, lambda m: add_profiles(m, [host], profiles))
    return BenchResult(host, profiles, record and bool(profiles), errors=tuple(run.errors))


def _bench_placement(path: Path, manifest: Manifest, placement: str | None, device_memory: str | None,
                     offline_batches: Sequence[int], budget: Budget, trust: TrustPolicy,
                     on_progress: Callable[[str], None]) -> BenchResult:  # fmt: skip
    """A placement of a staged bundle's stages (forced, or the solver's within the caps)
    timed end to end as `load(placement=...)` runs it: every stage in this process, the
    values between stages through the host."""
    from hxc.pool.workers import load_options
    from hxc.runtime.loader import load
    from hxc.runtime.place import place, placement_objective
    from hxc.runtime.select import select

    probe = probe_host()
    host = probe.host()
    selection = select(manifest, probe, device="", tolerance=float("inf"))
    plan = place(manifest, selection, host.id, objective=placement_objective("latency"), placement=placement,
                 device_memory=device_memory)  # fmt: skip
    labels = ", ".join(dict.fromkeys(plan.device(k).device.label for k in range(len(plan.assignment))))
    holder: dict[str, object] = {}
    checks = load_options(trust)

    def open_() -> None:
        holder["model"] = load(path, placement=plan.assignment, strict=True, tolerance=float("inf"), probe=probe, **checks)

    def prepare(inputs: list) -> Callable[[], None]:
        return holder["model"].prepare(inputs)  # type: ignore[attr-defined]

    contender = Contender(f"stages {plan.flag}", labels, open_, prepare, device_time_only=False, close=holder.clear)
    golden_inputs, _ = load_golden(path, manifest)
    cases = scenarios(manifest, golden_inputs, offline_batches)
    run = measure_devices([DeviceGroup(labels, [contender], lambda: [contender])], [inputs for _, _, inputs in cases],
                          budget, on_progress)  # fmt: skip
    profiles = [_profile(host.id, manifest, t, scenario, batch, of_artifact=False)
                for (scenario, batch, _), timings in zip(cases, run.timings) for t in timings]  # fmt: skip
    return BenchResult(host, profiles, False, errors=tuple(run.errors))


def bench_contenders(bundle: Path, baselines: tuple[str, ...], device: str | None, allow_pickle: bool = False,
                     only: tuple[str, ...] | None = None, trust: TrustPolicy | None = None) -> list[Contender]:  # fmt: skip
    """What `hxc bench` times: the artifacts this host can run (on `device`, if given),
    then the named baselines; `only` keeps the named ones (a worker process's share).
    `trust` as run_bench's."""
    path = Path(bundle)
    trust = trust if trust is not None else trust_policy()
    manifest = read_bundle(path, trust).manifest
    probe = probe_host()
    cpu = next((d for d in probe.devices if d.driver == "local-task"), None)
    out = artifact_contenders(path, manifest, probe, device, trust)
    if out and manifest.stages:
        out += stage_contenders(path, manifest, probe, device, trust)
    if out:
        out += [b.make(b, path, manifest, cpu.label if cpu else "cpu", allow_pickle) for b in map(baseline, baselines)]
    return out if only is None else [c for c in out if c.id in only]


def by_process(contenders: list[Contender]) -> dict[str, list[Contender]]:
    """Contenders by the worker process that times them, labelled: one each
    (`hxc.bench.measure` says why)."""
    return {f"{c.id} on {c.device}": [c] for c in contenders}


def scenarios(manifest: Manifest, golden: list[np.ndarray], offline_batches: Sequence[int]) -> list[tuple[str, int, list[np.ndarray]]]:
    """(scenario, batch, inputs): batch-resized copies of the golden inputs."""
    inputs = manifest.signature.inputs
    dynamic_batch = bool(inputs) and all(s.shape and isinstance(s.shape[0], str) for s in inputs)
    if not dynamic_batch:
        batch = int(golden[0].shape[0]) if golden and golden[0].ndim else 1
        return [("single-stream", batch, golden)]
    out = [("single-stream", 1, [_resize_batch(a, 1) for a in golden])]
    out += [("offline", b, [_resize_batch(a, b) for a in golden]) for b in offline_batches]
    return out


def _resize_batch(a: np.ndarray, batch: int) -> np.ndarray:
    reps = -(-batch // a.shape[0])
    return np.ascontiguousarray(np.concatenate([a] * reps, axis=0)[:batch])


def _profile(host_id: str, manifest: Manifest, t: Timing, scenario: str, batch: int, of_artifact: bool = True) -> Profile:
    stats = t.stats()
    sha = None
    if of_artifact and not is_baseline(t.contender.id):
        sha = manifest.artifact(t.contender.artifact or t.contender.id).sha256
    throughput = 1000.0 / stats.mean_ms if stats.mean_ms else 0.0
    return Profile(
        host_id=host_id,
        candidate=t.contender.id,
        artifact_sha256=sha,
        device=t.contender.device,
        scenario=scenario,  # type: ignore[arg-type]
        batch=batch,
        latency=stats,
        throughput=throughput,
        items_per_second=throughput * batch,
        load_ms=round(t.load_ms, 3),
        first_call_ms=round(t.first_call_ms, 3),
        memory_mb=None if t.memory_mb is None else round(t.memory_mb, 1),
        device_time_only=t.contender.device_time_only,
        recorded=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        threads=t.contender.threads,
        conditions=Conditions(interleaved_with=t.interleaved_with, isolated=True, other_load=t.other_load),
        stage=t.contender.stage,
    )

"""`hxc bench` as a library call: measure, then record profiles in the manifest.

Scenarios follow MLPerf Inference: single-stream latency (one request at a time, at
batch 1 when the batch dimension is dynamic, else at the compiled batch) and, for
models with a dynamic batch dimension, offline throughput at several batch sizes.
"""

from __future__ import annotations

import datetime as _dt
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hxc.bench.contenders import BASELINE_IDS, artifact_contenders, baseline_contenders
from hxc.bench.isolate import DeviceGroup, measure_devices
from hxc.bench.measure import Budget, Contender, Timing
from hxc.errors import NoCompatibleArtifactError
from hxc.manifests import read_manifest, update_manifest
from hxc.manifests.merge import add_profiles
from hxc.manifests.schema import Conditions, Host, Manifest, Profile
from hxc.runtime.probe import probe_host
from hxc.runtime.verify import load_golden

DEFAULT_OFFLINE_BATCHES = (8, 32)


@dataclass
class BenchResult:
    host: Host
    profiles: list[Profile]
    recorded: bool
    errors: list[str] = field(default_factory=list)  # devices that failed or hung during the run


def run_bench(
    bundle: str | Path,
    *,
    baselines: Sequence[str] = ("torch",),
    device: str | None = None,
    offline_batches: Sequence[int] = DEFAULT_OFFLINE_BATCHES,
    budget: Budget = Budget(),
    record: bool = True,
    allow_pickle: bool = False,
    on_progress: Callable[[str], None] = lambda s: None,
) -> BenchResult:
    path = Path(bundle)
    manifest = read_manifest(path)
    probe = probe_host()
    host = probe.host()
    contenders = bench_contenders(path, tuple(baselines), device, allow_pickle)
    if not contenders:
        raise NoCompatibleArtifactError(f"{path}: no artifact in this bundle can run on this host (see `hxc select --explain`)")
    groups = [
        DeviceGroup(label, cs, functools.partial(bench_contenders, path, tuple(baselines), device, allow_pickle,
                                                 tuple(c.id for c in cs)))
        for label, cs in by_device(contenders).items()
    ]  # fmt: skip

    golden_inputs, _ = load_golden(path, manifest)
    cases = scenarios(manifest, golden_inputs, offline_batches)
    run = measure_devices(groups, [inputs for _, _, inputs in cases], budget, on_progress)
    profiles: list[Profile] = []
    for (scenario, batch, _), timings in zip(cases, run.timings):
        profiles += [_profile(host.id, manifest, t, scenario, batch) for t in timings]
    if record and profiles:
        update_manifest(path, lambda m: add_profiles(m, [host], profiles))
    return BenchResult(host, profiles, record and bool(profiles), run.errors)


def bench_contenders(bundle: Path, baselines: tuple[str, ...], device: str | None, allow_pickle: bool = False,
                     only: tuple[str, ...] | None = None) -> list[Contender]:  # fmt: skip
    """What `hxc bench` times: the artifacts this host can run (on `device`, if given),
    then the baselines; `only` keeps the named ones (a worker process's share)."""
    path = Path(bundle)
    manifest = read_manifest(path)
    probe = probe_host()
    cpu = next((d for d in probe.devices if d.driver == "local-task"), None)
    out = artifact_contenders(path, manifest, probe, device)
    if out:
        out += baseline_contenders(path, manifest, list(baselines), cpu.label if cpu else "cpu", allow_pickle)
    return out if only is None else [c for c in out if c.id in only]


def by_device(contenders: list[Contender]) -> dict[str, list[Contender]]:
    groups: dict[str, list[Contender]] = {}
    for c in contenders:
        groups.setdefault(c.device, []).append(c)
    return groups


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


def _profile(host_id: str, manifest: Manifest, t: Timing, scenario: str, batch: int) -> Profile:
    stats = t.stats()
    sha = None
    if t.contender.id not in BASELINE_IDS:
        sha = manifest.artifact(t.contender.id).sha256
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
    )

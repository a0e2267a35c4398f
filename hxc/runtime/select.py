"""Choose which artifact to run, and say why: every artifact is accepted or rejected
with a reason, and the accepted ones are ranked.

An artifact is a candidate only where its engine's runtime is installed (ONNX
Runtime, torch for AOTInductor: found without importing them), its target family's
device is present and can run it, and its engine has no objection (an AOTInductor
package built against another torch, a missing execution provider).

Ranking: artifacts measured by `hxc bench` come first, ordered by the policy's
metric (p50 latency, or throughput), using profiles recorded on this very host, else
on a host with the same device; so whichever engine measured fastest here runs.
Unmeasured artifacts follow, in each family's static order (a native GPU, then native
CPU code, then a software Vulkan device), IREE's before other engines'.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from hxc.engines import engine
from hxc.errors import UsageError
from hxc.manifests.schema import Artifact, Manifest, Profile
from hxc.runtime.probe import HostProbe
from hxc.targets import Device, family

Policy = Literal["latency", "throughput"]
POLICIES: tuple[str, ...] = ("latency", "throughput")
DEVICE_ENV = "HXC_DEVICE"


@dataclass(frozen=True)
class Candidate:
    artifact: Artifact
    device: Device
    profile: Profile | None  # the measurement that ranked it, if any
    measured_on: Literal["this host", "same device", None]
    static_rank: int

    @property
    def reason(self) -> str:
        if self.profile is None:
            return f"no profile; static order {self.static_rank}"
        p = self.profile
        return f"measured on {self.measured_on}: p50 {p.latency.p50_ms:.3g} ms, {p.throughput:.4g}/s"


@dataclass(frozen=True)
class Rejection:
    artifact: Artifact
    reason: str


@dataclass(frozen=True)
class Selection:
    candidates: tuple[Candidate, ...]  # best first
    rejected: tuple[Rejection, ...]
    policy: str
    forced: str | None  # the device the caller asked for, if any
    note: str | None = None  # e.g. why a requested device was not honoured

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    def explain(self) -> str:
        lines = [f"policy: {self.policy}" + (f"; device forced to {self.forced!r}" if self.forced else "")]
        if self.note:
            lines.append(f"note: {self.note}")
        for i, c in enumerate(self.candidates):
            mark = "->" if i == 0 else "  "
            lines.append(f"{mark} #{i + 1} {c.artifact.id} on {c.device.label}: {c.reason}")
        for r in self.rejected:
            lines.append(f"   x  {r.artifact.id}: {r.reason}")
        return "\n".join(lines)


def select(
    manifest: Manifest,
    probe: HostProbe,
    *,
    policy: str = "latency",
    device: str | None = None,
    precision: str | None = None,
    tolerance: float | None = None,
) -> Selection:
    """Rank the manifest's artifacts for this host. `device` (or $HXC_DEVICE) restricts
    the choice to a driver (`vulkan`), a device URI, or a family (`cpu`).

    Reduced-precision artifacts are candidates only when allowed: `precision="fp16"`
    allows fp16 ones (and prefers them when nothing is measured); `tolerance=1e-2`
    allows any whose recorded error against fp32 is at most that."""
    if policy not in POLICIES:
        raise UsageError(f"unknown policy {policy!r}", hint=f"choose from: {', '.join(POLICIES)}")
    # device="" means "no restriction", overriding $HXC_DEVICE.
    forced = (device if device is not None else os.environ.get(DEVICE_ENV)) or None
    host_id = probe.host().id
    candidates: list[Candidate] = []
    rejected: list[Rejection] = []
    for art in manifest.artifacts:
        if art.status != "ok":
            rejected.append(Rejection(art, f"failed to compile: {art.error}"))
            continue
        if (why := _precision_refused(art, precision, tolerance)) is not None:
            rejected.append(Rejection(art, why))
            continue
        try:
            eng = engine(art.engine)
        except UsageError:
            rejected.append(Rejection(art, f"built by backend {art.engine!r}, which this hxc does not know"))
            continue
        if (why := eng.missing_at_runtime()) is not None:
            rejected.append(Rejection(art, why))
            continue
        fam = family(art.family)
        devices = [d for d in probe.devices if d.driver in fam.drivers]
        if not devices:
            rejected.append(Rejection(art, _no_driver_reason(probe, fam.drivers)))
            continue
        reasons = {d.label: fam.cannot_run(art, d) or eng.cannot_run(art, d) for d in devices}
        able = [d for d in devices if reasons[d.label] is None]
        if not able:
            rejected.append(Rejection(art, "; ".join(dict.fromkeys(r for r in reasons.values() if r))))
            continue
        if forced:
            matching = [d for d in able if _matches(forced, d, art)]
            if not matching:
                rejected.append(Rejection(art, f"not the requested device {forced!r}"))
                continue
            able = matching
        # Prefer the family's first driver (local-task over local-sync) for this artifact.
        dev = min(able, key=lambda d: fam.drivers.index(d.driver))
        profile, where = _profile_for(manifest, art, dev, host_id, policy)
        preferred = art.precision != "fp32" and art.precision == precision
        rank = fam.rank(art, dev) + eng.static_rank_offset + (2 if preferred else 0)
        candidates.append(Candidate(art, dev, profile, where, rank))

    candidates.sort(key=lambda c: _order(c, policy))
    return Selection(tuple(candidates), tuple(rejected), policy, forced)


def _precision_refused(art: Artifact, precision: str | None, tolerance: float | None) -> str | None:
    if art.precision == "fp32" or art.precision == precision:
        return None
    err = art.precision_error
    if tolerance is not None and err is not None and err <= tolerance:
        return None
    measured = f"error {err:.2g} vs fp32" if err is not None else "error unmeasured"
    return f"{art.precision} variant ({measured}): allow it with precision={art.precision!r} or a tolerance >= its error"


def _order(c: Candidate, policy: str) -> tuple:
    if c.profile is None:
        return (1, 0.0, -c.static_rank)
    # Profiles from this host outrank ones borrowed from a host with the same device.
    where = 0 if c.measured_on == "this host" else 1
    metric = c.profile.latency.p50_ms if policy == "latency" else -c.profile.throughput
    return (0, where, metric, -c.static_rank)


def _profile_for(
    manifest: Manifest, art: Artifact, dev: Device, host_id: str, policy: str
) -> tuple[Profile | None, Literal["this host", "same device", None]]:
    scenario = "single-stream" if policy == "latency" else "offline"
    mine = [p for p in manifest.profiles if p.artifact_sha256 == art.sha256 and p.device == dev.label]
    for where, pool in (("this host", [p for p in mine if p.host_id == host_id]), ("same device", mine)):
        for want in (scenario, None):
            hits = [p for p in pool if want is None or p.scenario == want]
            if hits:
                # The newest measurement wins; the list is in recording order.
                return hits[-1], where  # type: ignore[return-value]
    return None, None


def _matches(forced: str, device: Device, art: Artifact) -> bool:
    return forced in (device.driver, device.uri, art.family, art.id) or device.uri.startswith(forced + "://")


def _no_driver_reason(probe: HostProbe, drivers: tuple[str, ...]) -> str:
    parts = []
    for name in drivers:
        status = probe.driver(name)
        if status is None or status.reason is None:
            parts.append(f"no {name} device")
        else:
            parts.append(f"{name} driver unavailable: {status.reason}")
    return "; ".join(parts)

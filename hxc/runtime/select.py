"""Choose which artifact to run, and say why: every artifact is accepted or rejected
with a reason, and the accepted ones are ranked.

An artifact is a candidate only where its engine's runtime is installed (ONNX
Runtime, torch for AOTInductor: found without importing them), its target family's
device is present and can run it, and its engine has no objection (an AOTInductor
package built against another torch, a missing execution provider).

Ranking: artifacts measured by `hxc bench` come first, ordered by the policy's
metric, using profiles recorded on this very host, else on a host with the same
device; so whichever engine measured fastest here runs. Unmeasured artifacts follow,
in each family's static order (a native GPU, then native CPU code, then a software
Vulkan device), IREE's before other engines'.

A staged bundle (`hxc compile --stages`) is offered as whole chains only: a target is a
candidate when every stage has an artifact of it that compiled and that the device can
run (`Candidate.stages`, stage 0's artifact as `artifact`); a stage is never offered as
the model.

Policies:
  latency     lowest p50 of the single-stream profile
  throughput  most items (batch rows) per second, offline batches preferred
  cost        lowest cost per 1,000 items = device price per hour / items per second
              (prices: hxc.runtime.prices); measured but unpriced ones follow priced ones

With an SLO (`slo_ms`, judged on p99 or p50 of the single-stream profile plus the
caller overhead the pool measured), candidates that meet it rank first, then the
unmeasured (which cannot be judged), then those that miss it; if none meets it, the
fastest is picked and the selection says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from hxc.engines import engine
from hxc.errors import ExitCode, UsageError
from hxc.manifests.schema import Artifact, LatencyStats, Manifest, Profile
from hxc.runtime.prices import Price, PriceTable, cost_per_1k
from hxc.runtime.probe import HostProbe
from hxc.targets import Device, family

Policy = Literal["latency", "throughput", "cost"]
POLICIES: tuple[str, ...] = ("latency", "throughput", "cost")
SloPercentile = Literal["p50", "p99"]
SLO_PERCENTILES: tuple[str, ...] = ("p50", "p99")
# A percentile is a weak estimate below this many timed calls: p99 of 20 calls is just
# the slowest of them. `hxc bench --min-iterations 100` records enough for p99.
MIN_SAMPLES: dict[str, int] = {"p50": 10, "p99": 100}
DEVICE_ENV = "HXC_DEVICE"


@dataclass(frozen=True)
class Slo:
    """A latency target: the `percentile` of a call's latency as the caller sees it."""

    ms: float
    percentile: SloPercentile = "p99"

    def __str__(self) -> str:
        return f"{self.percentile} <= {self.ms:g} ms"


@dataclass(frozen=True)
class SloVerdict:
    met: bool
    estimate_ms: float  # device time at the percentile + caller overhead at the same percentile
    device_ms: float
    overhead_ms: float | None  # None: not measured, so the estimate is device time alone
    samples: int
    caveats: tuple[str, ...] = ()  # why the estimate is weak; empty when it is not

    @property
    def weak(self) -> bool:
        return bool(self.caveats)

    def describe(self, slo: Slo) -> str:
        over = f" + overhead {self.overhead_ms:.3g}" if self.overhead_ms is not None else ""
        text = (f"{slo.percentile} {self.device_ms:.3g}{over} = {self.estimate_ms:.3g} ms "
                f"{'<=' if self.met else '>'} {slo.ms:g} ms: SLO {'met' if self.met else 'missed'}")  # fmt: skip
        return text + (f" (weak: {'; '.join(self.caveats)})" if self.caveats else "")


def judge_slo(slo: Slo, latency: LatencyStats, overhead: LatencyStats | None) -> SloVerdict:
    """Whether a device whose calls took `latency` (device time) and cost a caller
    `overhead` on top meets `slo`. Percentiles of the two are added, which errs on the
    safe side."""
    device_ms = getattr(latency, f"{slo.percentile}_ms")
    overhead_ms = getattr(overhead, f"{slo.percentile}_ms") if overhead is not None else None
    caveats = []
    need = MIN_SAMPLES[slo.percentile]
    if latency.iterations < need:
        caveats.append(f"{slo.percentile} from {latency.iterations} samples, fewer than {need}")
    if overhead is None:
        caveats.append("caller overhead not measured (`hxc bench --pool` records it)")
    estimate = device_ms + (overhead_ms or 0.0)
    return SloVerdict(estimate <= slo.ms, estimate, device_ms, overhead_ms, latency.iterations, tuple(caveats))


@dataclass(frozen=True)
class Candidate:
    artifact: Artifact
    device: Device
    latency: Profile | None  # the single-stream measurement, if any
    throughput: Profile | None  # the measurement with the most items/s, if any
    measured_on: Literal["this host", "same device", None]
    static_rank: int
    price: Price | None = None
    slo: SloVerdict | None = None  # set when the selection has an SLO and a measurement
    preferred: bool = False  # of the reduced precision the caller asked for
    # A staged bundle's candidate: every stage's artifact of `artifact`'s target, in
    # order (`artifact` is stage 0's); empty for a bundle of whole-model artifacts.
    stages: tuple[Artifact, ...] = ()

    @property
    def id(self) -> str:
        """What runs: the artifact's id, or for a staged bundle the target's (`cpu:host`),
        or the targets' of a placement's mixed stages (`cpu:host+vulkan:spirv`)."""
        if not self.stages:
            return self.artifact.id
        return "+".join(dict.fromkeys(a.target_id for a in self.stages))

    @property
    def artifacts(self) -> tuple[Artifact, ...]:
        """The artifacts it loads: every stage's, or the one."""
        return self.stages or (self.artifact,)

    @property
    def profile(self) -> Profile | None:
        return self.latency or self.throughput

    @property
    def items_per_second(self) -> float | None:
        return self.throughput.items_per_second if self.throughput else None

    @property
    def cost_per_1k(self) -> float | None:
        if self.price is None or self.items_per_second is None:
            return None
        return cost_per_1k(self.price, self.items_per_second)

    @property
    def reason(self) -> str:
        if self.profile is None:
            return f"no profile; static order {self.static_rank}"
        parts = [f"measured on {self.measured_on}"]
        if self.latency is not None:
            s = self.latency.latency
            parts.append(f"p50 {s.p50_ms:.3g} ms, p99 {s.p99_ms:.3g} ms ({s.iterations} samples)")
        if self.throughput is not None:
            t = self.throughput
            parts.append(f"{t.items_per_second:.4g} items/s ({t.scenario} batch {t.batch})")
        return ": ".join(parts[:2]) + "".join(f", {p}" for p in parts[2:])

    def arithmetic(self, currency: str = "USD") -> str:
        """The cost arithmetic, for explain()."""
        if self.price is None:
            return "no price for this device (add it to prices.toml)"
        head = f"{self.price.per_hour:.4g} {currency}/h ({self.price.source})"
        if self.items_per_second is None:
            return f"{head}; not measured, so it cannot be costed"
        return f"{head} / ({self.items_per_second:.4g} items/s x 3600) x 1000 = {self.cost_per_1k:.3g} {currency} per 1k items"


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
    slo: Slo | None = None
    currency: str = "USD"
    profiles_note: str | None = None  # profiles ignored (and why), or who signed them

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.OK if self.candidates else ExitCode.NO_COMPATIBLE_ARTIFACT

    def explain(self) -> str:
        head = f"policy: {self.policy}"
        if self.policy == "cost":
            head += " (cost per 1,000 items, i.e. batch rows = price per hour / (items per second x 3600) x 1000)"
        if self.slo:
            head += f"; SLO: {self.slo} per call, device time + caller overhead"
        lines = [head + (f"; device forced to {self.forced!r}" if self.forced else "")]
        if self.note:
            lines.append(f"note: {self.note}")
        if self.profiles_note:
            lines.append(self.profiles_note)
        for i, c in enumerate(self.candidates):
            mark = "->" if i == 0 else "  "
            staged = f" ({len(c.stages)} stages)" if c.stages else ""
            lines.append(f"{mark} #{i + 1} {c.id}{staged} on {c.device.label}: {c.reason}")
            if self.policy == "cost":
                lines.append(f"        cost: {c.arithmetic(self.currency)}")
            if self.slo is not None:
                lines.append("        slo: " + (c.slo.describe(self.slo) if c.slo else "not measured, cannot be judged"))
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
    slo_ms: float | None = None,
    slo_percentile: str = "p99",
    prices: PriceTable | None = None,
    profiles_note: str | None = None,
) -> Selection:
    """Rank the manifest's artifacts for this host. `device` (or $HXC_DEVICE) restricts
    the choice to a driver (`vulkan`), a device URI, or a family (`cpu`).

    Reduced-precision artifacts are candidates only when allowed: `precision="fp16"`
    allows fp16 ones (and prefers them when nothing is measured); `tolerance=1e-2`
    allows any whose recorded error against fp32 is at most that.

    `policy="cost"` prices devices with `prices` (default: `load_prices()`); `slo_ms`
    ranks the candidates that meet that latency target at `slo_percentile` first.
    `profiles_note` (from reading the bundle: profiles ignored, and why) goes into
    explain()."""
    if policy not in POLICIES:
        raise UsageError(f"unknown policy {policy!r}", hint=f"choose from: {', '.join(POLICIES)}")
    slo = _slo(slo_ms, slo_percentile)
    if prices is None and policy == "cost":
        from hxc.runtime.prices import load_prices

        prices = load_prices()
    # device="" means "no restriction", overriding $HXC_DEVICE.
    forced = (device if device is not None else os.environ.get(DEVICE_ENV)) or None
    host_id = probe.host().id
    candidates: list[Candidate] = []
    rejected: list[Rejection] = []
    for art in manifest.artifacts:
        if art.stage:  # a later stage is never the model: it is chosen with its stage 0, as one chain
            continue
        if art.status != "ok":
            rejected.append(Rejection(art, f"failed to compile: {art.error}"))
            continue
        chain = manifest.stage_artifacts(art) if art.stage is not None else ()
        if chain and (why := _incomplete(manifest, art, chain)) is not None:
            rejected.append(Rejection(art, why))
            continue
        if (why := next((w for a in chain or (art,) if (w := _precision_refused(a, precision, tolerance))), None)):
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
        reasons = {d.label: next((r for a in chain or (art,) if (r := fam.cannot_run(a, d) or eng.cannot_run(a, d))), None)
                   for d in devices}  # fmt: skip
        able = [d for d in devices if reasons[d.label] is None]
        if not able:
            rejected.append(Rejection(art, "; ".join(dict.fromkeys(r for r in reasons.values() if r))))
            continue
        if forced:
            matching = [d for d in able if matches_device(forced, d, art)]
            if not matching:
                rejected.append(Rejection(art, f"not the requested device {forced!r}"))
                continue
            able = matching
        # Prefer the family's first driver (local-task over local-sync) for this artifact.
        dev = min(able, key=lambda d: fam.drivers.index(d.driver))
        latency, throughput, where = _profiles_for(manifest, art, dev, host_id)
        preferred = art.precision != "fp32" and art.precision == precision
        price = prices.price(dev, probe.cpu.cores) if prices is not None else None
        verdict = judge_slo(slo, latency.latency, latency.caller_overhead) if slo and latency else None
        candidates.append(Candidate(art, dev, latency, throughput, where, fam.rank(art, dev) + eng.static_rank_offset, price, verdict, preferred,
                                    chain))  # fmt: skip

    note = None
    if slo is not None and any(c.slo for c in candidates) and not any(c.slo and c.slo.met for c in candidates):
        note = f"no candidate meets the SLO ({slo}); the fastest is picked"
    order = _order_key(policy, slo, meets_any=note is None)
    candidates.sort(key=order)
    return Selection(tuple(candidates), tuple(rejected), policy, forced, note, slo, prices.currency if prices else "USD",
                     profiles_note)  # fmt: skip


def _incomplete(manifest: Manifest, art: Artifact, chain: tuple[Artifact, ...]) -> str | None:
    """Why the stages of `art`'s target do not make the whole model, or None."""
    have = {a.stage for a in chain}
    if missing := [s.index for s in manifest.stages if s.index not in have]:
        return f"stage {missing[0]} of {len(manifest.stages)} has no {art.target_id} artifact"
    if failed := [a for a in chain if a.status != "ok"]:
        return f"stage {failed[0].stage} failed to compile: {failed[0].error}"
    return None


def _slo(slo_ms: float | None, percentile: str) -> Slo | None:
    if percentile not in SLO_PERCENTILES:
        raise UsageError(f"unknown SLO percentile {percentile!r}", hint=f"choose from: {', '.join(SLO_PERCENTILES)}")
    if slo_ms is None:
        return None
    if not slo_ms > 0:
        raise UsageError(f"the SLO must be a positive number of milliseconds, not {slo_ms!r}")
    return Slo(float(slo_ms), percentile)  # type: ignore[arg-type]


def _precision_refused(art: Artifact, precision: str | None, tolerance: float | None) -> str | None:
    if art.precision == "fp32" or art.precision == precision:
        return None
    err = art.precision_error
    if tolerance is not None and err is not None and err <= tolerance:
        return None
    measured = f"error {err:.2g} vs fp32" if err is not None else "error unmeasured"
    return f"{art.precision} variant ({measured}): allow it with precision={art.precision!r} or a tolerance >= its error"


def _order_key(policy: str, slo: Slo | None, meets_any: bool):
    def key(c: Candidate) -> tuple:
        if c.profile is None:
            # Unmeasured: after every candidate that meets the SLO (or all measured ones
            # when there is none), before those that miss it. The asked-for precision
            # breaks ties between builds of the same rank (cpu:host over cpu:host@fp16
            # unless fp16 was asked for); it never outranks a better variant.
            return (1, 0, 0.0, -c.static_rank, not c.preferred)
        # Profiles from this host outrank ones borrowed from a host with the same device.
        where = 0 if c.measured_on == "this host" else 1
        if slo is not None and c.slo is not None and not c.slo.met:
            # Missing the SLO: fastest first; first of all when nothing meets it.
            return (0 if not meets_any else 2, where, c.slo.estimate_ms, -c.static_rank)
        return (0, where, *_metric(c, policy), -c.static_rank)

    return key


def _metric(c: Candidate, policy: str) -> tuple[int, float]:
    if policy == "cost":
        cost = c.cost_per_1k
        # Measured but priceless (or without a throughput): after the priced, fastest first.
        return (0, cost) if cost is not None else (1, -(c.items_per_second or 0.0))
    if policy == "throughput":
        return (0, -(c.items_per_second or 0.0))
    assert c.profile is not None
    return (0, c.profile.latency.p50_ms)


def profiles_for(manifest: Manifest, art: Artifact, dev: Device, host_id: str,
                 stage: int | None = None) -> tuple[list[Profile], Literal["this host", "same device", None]]:  # fmt: skip
    """The profiles of `art` on `dev` that speak for this host, in recording order, and
    where they were measured: those recorded on this very host, else those from any host
    with the same device, else none. `stage`: a staged bundle's profiles of that stage
    alone (`art` is its artifact); None: of the whole model (for a staged bundle, of the
    chain whose stage 0 is `art`)."""
    mine = [p for p in manifest.profiles
            if p.artifact_sha256 == art.sha256 and p.device == dev.label and p.stage == stage]  # fmt: skip
    here = [p for p in mine if p.host_id == host_id]
    if here:
        return here, "this host"
    return (mine, "same device") if mine else ([], None)


def _profiles_for(
    manifest: Manifest, art: Artifact, dev: Device, host_id: str
) -> tuple[Profile | None, Profile | None, Literal["this host", "same device", None]]:
    """(latency profile, throughput profile, where measured). Latency: the newest
    single-stream one (else the newest of any scenario); throughput: of the newest
    offline profile per batch (else the newest single-stream one), the one with the
    most items per second."""
    pool, where = profiles_for(manifest, art, dev, host_id)
    if not pool:
        return None, None, None
    # The list is in recording order: the newest measurement wins.
    single = [p for p in pool if p.scenario == "single-stream"]
    latency = (single or pool)[-1]
    newest = {(p.scenario, p.batch): p for p in pool}
    offline = [p for p in newest.values() if p.scenario == "offline"]
    throughput = max(offline or newest.values(), key=lambda p: p.items_per_second)
    return latency, throughput, where


def matches_device(forced: str, device: Device, art: Artifact) -> bool:
    """Whether `forced` (a driver, device URI, family or artifact id, as `device=` takes
    it) names this device and artifact."""
    return forced in (device.driver, device.uri, art.family, art.id, art.target_id) or device.uri.startswith(forced + "://")


def _no_driver_reason(probe: HostProbe, drivers: tuple[str, ...]) -> str:
    parts = []
    for name in drivers:
        status = probe.driver(name)
        if status is None or status.reason is None:
            parts.append(f"no {name} device")
        else:
            parts.append(f"{name} driver unavailable: {status.reason}")
    return "; ".join(parts)

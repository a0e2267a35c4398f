"""The worker processes of one bundle: what a `Pool` and `hxc serve` both stand on.

    with Workers("model.hxc") as workers:          # every usable device; or Workers(bundle, ["cpu", "vulkan"])
        for m in workers.members:                  # one Worker per device, best device first
            print(m.name, m.worker.health)

`Workers` chooses a device and the best artifact for it (as `hxc.runtime.load`
would, once per device), pins them to cores if asked, starts one `Worker` process
each, waits for them to load, and hands on every health change to its listeners.
A worker restarts itself after a failure (`worker.py`). What runs on them is the
caller's: `split.py` splits one batch across them (a `Pool`), `router.py` routes
single requests (a server).

The trust policy the bundle was read with (its trusted keys, minimum sequence,
signed profiles) is handed to every worker process explicitly, in its load options:
a worker checks the bundle exactly as its parent did, whatever its environment says.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hxc.errors import NoCompatibleArtifactError, UsageError
from hxc.manifests.bundle import read_bundle, trust_policy
from hxc.manifests.schema import MAIN, Manifest, Signature
from hxc.manifests.signing import TrustPolicy
from hxc.pool.worker import Backoff, Deadlines, Health, Worker
from hxc.runtime.probe import HostProbe, probe_host
from hxc.runtime.select import Candidate, Selection, matches_device, select

SLOTS = 2  # requests a worker holds at once: one running, the next already there


@dataclass(frozen=True)
class Member:
    """One device of the bundle's workers: the artifact chosen for it and its process."""

    candidate: Candidate
    worker: Worker

    @property
    def name(self) -> str:
        return self.candidate.artifact.id


class Workers:
    """A worker process per chosen device of `bundle`, started and ready.

    `devices`: "all", or a list of selectors as `hxc.runtime.load(device=...)` takes them
    (a driver, a family, an artifact id, a device URI), one device each.
    `policy` ranks the artifacts for a device (as `hxc.runtime.select`); `variants`
    (precisions such as "int8") add a worker per device for its best artifact of each
    (a language model's router offers them to the requests that allow them).
    `pin`: None (workers share every core), "split" (each CPU-type device — the host CPU
    and a software Vulkan device — gets its own share of the cores), or
    {selector: [core ids]}. `deadlines`, `backoff`: per-worker fault handling.
    `trust`: what the bundle must prove (None: as $HXC_TRUSTED_KEYS and its siblings
    say, read once here); every worker gets it explicitly. Raises
    NoCompatibleArtifactError when no worker could start."""

    def __init__(
        self,
        bundle: str | os.PathLike[str],
        devices: str | Sequence[str] = "all",
        *,
        policy: str = "throughput",
        pin: str | Mapping[str, Sequence[int]] | None = None,
        deadlines: Deadlines = Deadlines(),
        backoff: Backoff = Backoff(),
        precision: str | None = None,
        tolerance: float | None = None,
        variants: Sequence[str] = (),
        probe: HostProbe | None = None,
        start_timeout_s: float = 180.0,
        env: Mapping[str, str] | None = None,
        trust: TrustPolicy | None = None,
    ) -> None:
        self.bundle = Path(bundle)
        self.trust = trust if trust is not None else trust_policy()
        self.manifest: Manifest = read_bundle(self.bundle, self.trust).manifest
        main = self.manifest.functions.get(MAIN)
        self.signature: Signature | None = main.signature if main is not None else None  # None: a language model
        probe = probe or probe_host()
        self.selection, chosen = choose_devices(self.manifest, probe, devices, policy, precision, tolerance, variants)
        self.language_model = self.manifest.language_model
        self.batch_dim, self.not_splittable = (batch_dim(self.signature) if self.signature is not None
                                               else (None, "the model has no main function"))  # fmt: skip
        cpus = pinning(pin, chosen)
        self.pinned = any(cpus.values())
        self._listeners: list[Callable[[Worker], None]] = []
        self.members: list[Member] = []
        load = load_options(self.trust)
        for cand in chosen:
            # A profile speaks for a worker only if measured as it will run: a pinned one
            # has fewer cores than the profile had, so it starts unmeasured.
            profile = cand.throughput if not cpus[cand.artifact.id] else None
            rows_per_s = profile.items_per_second if profile else None
            # A language model's worker holds as many generate requests as its batch has slots.
            slots = self.language_model.slots if self.language_model is not None else SLOTS
            worker = Worker(
                self.bundle, cand.artifact.id, cand.device.label, self.signature,
                functions=self.manifest.functions if self.language_model is not None else None,
                cpus=cpus[cand.artifact.id], deadlines=deadlines, backoff=backoff, slots=slots,
                ms_per_item=1000 / rows_per_s if rows_per_s else None, env=dict(env or {}), on_change=self._changed,
                # A reduced-precision variant loads only when asked for by its precision.
                load_options={**load, "precision": cand.artifact.precision} if cand.artifact.precision != "fp32" else load,
            )  # fmt: skip
            self.members.append(Member(cand, worker))
        for m in self.members:
            m.worker.start()
        deadline = time.monotonic() + start_timeout_s
        for m in self.members:
            m.worker.wait_ready(max(0.0, deadline - time.monotonic()))
        if not any(m.worker.health == Health.READY for m in self.members):
            reasons = "; ".join(f"{m.name}: {m.worker.reason or 'did not start in time'}" for m in self.members)
            self.close()
            raise NoCompatibleArtifactError(f"{self.bundle}: no device of the pool could start", hint=reasons)

    @property
    def splittable(self) -> bool:
        """Whether a batch can be split across devices (a dynamic batch dimension)."""
        return self.not_splittable is None

    def ready(self) -> list[Member]:
        return [m for m in self.members if m.worker.health == Health.READY]

    def add_listener(self, callback: Callable[[Worker], None]) -> None:
        """Call `callback(worker)` (in the worker's thread) whenever a worker's health
        changes: how a router re-routes the queue of a device that failed."""
        self._listeners.append(callback)

    def _changed(self, worker: Worker) -> None:
        for callback in list(self._listeners):
            callback(worker)

    def close(self) -> None:
        for m in self.members:
            m.worker.close()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<hxc workers {self.manifest.model.name!r}: {', '.join(m.name for m in self.members)}>"


def load_options(trust: TrustPolicy | None) -> dict[str, Any]:
    """`trust` as `hxc.runtime.load`'s arguments, for a worker process: explicit, so the
    worker checks what its parent checked (None or no keys: nothing), never what its
    environment happens to say."""
    if trust is None or trust.keys is None:
        return {"trusted_keys": False}
    keys = [trust.keys] if isinstance(trust.keys, str) else list(trust.keys)
    keys = [p for k in keys for p in k.split(os.pathsep) if p]
    return {"trusted_keys": keys, "min_sequence": trust.min_sequence, "require_signed_profiles": trust.signed_profiles}


def choose_devices(manifest: Manifest, probe: HostProbe, devices: str | Sequence[str], policy: str, precision: str | None,
                   tolerance: float | None, variants: Sequence[str] = ()) -> tuple[Selection, list[Candidate]]:  # fmt: skip
    """The selection over every device, and the best candidate per device (and per
    device and precision in `variants`)."""
    selection = select(manifest, probe, policy=policy, device="", precision=precision, tolerance=tolerance)
    if devices == "all":
        chosen: dict[str, Candidate] = {}
        for c in selection.candidates:
            chosen.setdefault(c.device.uri, c)
        picked = list(chosen.values())
    else:
        if isinstance(devices, str):
            devices = [d.strip() for d in devices.split(",") if d.strip()]
        picked = []
        for want in devices:
            sel = select(manifest, probe, policy=policy, device=want, precision=precision, tolerance=tolerance)
            if sel.best is None:
                raise UsageError(f"no artifact can run on the requested device {want!r}",
                                 hint="; ".join(f"{r.artifact.id}: {r.reason}" for r in sel.rejected[:4]))  # fmt: skip
            if all(p.device.uri != sel.best.device.uri for p in picked):
                picked.append(sel.best)
        # Best first, whatever order they were listed in: a request that cannot be split
        # goes to the first device with room, which should be the best one.
        rank = {(c.artifact.id, c.device.uri): i for i, c in enumerate(selection.candidates)}
        picked.sort(key=lambda c: rank.get((c.artifact.id, c.device.uri), len(rank)))
    if not picked:
        raise NoCompatibleArtifactError(f"{manifest.model.name}: no artifact in this bundle can run on this host",
                                        hint="; ".join(f"{r.artifact.id}: {r.reason}" for r in selection.rejected[:6]))  # fmt: skip
    for p in dict.fromkeys(variants):
        found = [c for c in select(manifest, probe, policy=policy, device="", precision=p, tolerance=tolerance).candidates
                 if c.artifact.precision == p]  # fmt: skip
        added = [next(c for c in found if c.device.uri == uri) for uri in dict.fromkeys(c.device.uri for c in picked)
                 if any(c.device.uri == uri for c in found)]  # fmt: skip
        if not added:
            raise UsageError(f"no artifact of precision {p!r} in this bundle runs on the chosen devices",
                             hint=f"compile one: hxc compile ... --precision {p}")  # fmt: skip
        picked += [c for c in added if all(c.artifact.id != q.artifact.id for q in picked)]
    return selection, picked


def pinning(pin: str | Mapping[str, Sequence[int]] | None, chosen: list[Candidate]) -> dict[str, tuple[int, ...] | None]:
    """Cores per member (artifact id), or None where it is not pinned."""
    out: dict[str, tuple[int, ...] | None] = {c.artifact.id: None for c in chosen}
    if pin is None:
        return out
    available = sorted(os.sched_getaffinity(0))
    if pin == "split":
        cpu_kind = [c for c in chosen if c.device.kind == "cpu"]
        for c, cores in zip(cpu_kind, split_cores(len(cpu_kind), available, "CPU-type device")):
            out[c.artifact.id] = cores
        return out
    if isinstance(pin, str):
        raise UsageError(f"unknown pinning {pin!r}", hint="use None, 'split', or {device: [cores]}")
    for want, cores in pin.items():
        cores = tuple(int(c) for c in cores)
        bad = [c for c in cores if c not in available]
        if bad or not cores:
            raise UsageError(f"pin {want!r}: cores {bad or cores} are not available (this process may use {available})")
        hits = [c for c in chosen if matches_device(want, c.device, c.artifact)]
        if not hits:
            raise UsageError(f"pin {want!r}: no device of the pool matches it", hint=", ".join(c.artifact.id for c in chosen))
        for c in hits:
            out[c.artifact.id] = cores
    return out


def split_cores(count: int, available: Sequence[int], what: str) -> list[tuple[int, ...]]:
    """`available` cores shared out among `count` workers, in order, the first taking the
    remainder (the pool's host CPU, first and fastest by far); a one-line UsageError when
    there are fewer cores than workers."""
    if count > len(available):
        raise UsageError(f"pinning needs a core per {what}: {count} of them, {len(available)} core(s)")
    share, extra = divmod(len(available), max(1, count))
    out, start = [], 0
    for i in range(count):
        size = share + (extra if i == 0 else 0)
        out.append(tuple(available[start:start + size]))
        start += size
    return out


def batch_dim(signature: Signature) -> tuple[str | None, str | None]:
    """(the batch dimension's name, or None and why batches cannot be split)."""
    names = {s.shape[0] if s.shape else None for s in signature.inputs}
    if len(names) != 1 or not isinstance(next(iter(names)), str):
        return None, "the model has no dynamic batch dimension shared by all inputs"
    dim = next(iter(names))
    bad = [s.name for s in signature.outputs if not s.shape or s.shape[0] != dim]
    if bad:
        return None, f"output(s) {', '.join(bad)} have no batch dimension {dim!r}"
    return dim, None

"""`Pool`: every usable device of this host working on one batch, or one stream.

    with Pool("model.hxc") as pool:     # every usable device; or Pool(bundle, ["cpu", "vulkan"])
        y = pool(x)                     # x's batch split across the devices, y as one call would return it
        for y in pool.map(batches):     # a stream of requests, results in input order
            ...
        print(pool.explain())           # which device got what, and why
        print(pool.stats())             # items, busy time, utilisation, failures per device

Each device runs the best artifact for it in its own worker process (`workers.py`
starts them; `worker.py` is one). A call is split (`split.py`) into chunks that the devices pull from a shared queue
(`schedule.Balancer`), sized from the bench profiles at first and from observed
timings after, so a device 30x slower gets about 1/30 of the work and all finish
together; at a call's end an idle device may compute a backup copy of a slower one's
last chunk, and whichever copy finishes first is stored (the other is dropped). A
device whose worker fails or misses a deadline loses nothing: its chunk
goes back to the queue and the call completes on the others; the worker restarts
after a back-off and rejoins. A device that slows the others more than it helps
(a software Vulkan device competing with the CPU for the same cores) is noticed from
measurements and left out, with the reason in `explain()`.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import numpy as np

from hxc.errors import HxcError, UsageError
from hxc.manifests.schema import Signature
from hxc.manifests.signing import TrustPolicy
from hxc.pool.schedule import Balancer, Chunk, Speed, judge
from hxc.pool.split import Job, SplitMember
from hxc.pool.worker import Backoff, Deadlines, Health, Worker
from hxc.pool.workers import Workers
from hxc.runtime.probe import HostProbe
from hxc.runtime.select import matches_device

JUDGE_SAMPLES = 5  # chunks measured alone, and beside the others, before a judgement
REJUDGE_S = 60.0  # seconds of work after which a judgement is made again (loads change)
CONFIRM_S = 5.0  # the first judgement, made from a few early chunks, is checked again this soon
EMPTY_CALL_TIMEOUT_S = 300.0  # a backstop: the worker's own deadline ends a hung call sooner


@dataclass(frozen=True)
class DeviceStats:
    name: str  # the artifact id, which names the member
    device: str
    health: str
    reason: str | None  # why it is (or last was) unhealthy
    left_out: str | None  # why the judgement left it out of the split
    cpus: tuple[int, ...] | None
    items: int
    chunks: int
    busy_s: float  # worker time on this pool's chunks
    utilisation: float  # busy / the pool's working wall time
    failures: int  # times its worker crashed, was killed or missed a deadline
    requeued: int  # chunks it lost that went back to the queue (and ran elsewhere, or later)
    restarts: int
    queue_depth: int
    items_per_second: float | None  # the current speed estimate
    speed_source: str | None  # "profile" or "measured"
    backups: int = 0  # backup copies it ran of chunks another device held (at a call's end)
    wasted: int = 0  # rows it computed whose results were dropped: another copy was stored first


@dataclass(frozen=True)
class PoolStats:
    wall_s: float  # time spent in calls (and map iterations) over which utilisation is counted
    items: int
    devices: tuple[DeviceStats, ...]

    @property
    def items_per_second(self) -> float:
        return self.items / self.wall_s if self.wall_s else 0.0

    def device(self, name: str) -> DeviceStats:
        return next(d for d in self.devices if d.name == name or d.device == name or d.device.startswith(name))


class Pool:
    """Every usable device of this host as one callable; see the module docstring.

    `devices`: "all", or a list of selectors as `hxc.runtime.load(device=...)` takes them
    (a driver, a family, an artifact id, a device URI), one device each.
    `pin`: None (workers share every core), "split" (each CPU-type device — the host CPU
    and a software Vulkan device — gets its own share of the cores), or
    {selector: [core ids]}.
    `chunk_ms`: about how long one chunk runs on any device; shorter balances more
    finely and costs more process hops. `backups`: at a call's end, let an idle device
    compute a copy of a slower device's chunk it would finish well before it (the first
    copy to finish is stored, the other dropped). `judge`: leave out devices that cost more than
    they add (from measurements). `deadlines`, `backoff`: per-worker fault handling.
    `trust`: what the bundle must prove (None: as $HXC_TRUSTED_KEYS says), handed to
    every worker explicitly. The processes are `self.processes` (a `workers.Workers`)."""

    def __init__(
        self,
        bundle: str | os.PathLike[str],
        devices: str | Sequence[str] = "all",
        *,
        policy: str = "throughput",
        pin: str | Mapping[str, Sequence[int]] | None = None,
        chunk_ms: float = 50.0,
        backups: bool = True,
        judge: bool = True,
        deadlines: Deadlines = Deadlines(),
        backoff: Backoff = Backoff(),
        precision: str | None = None,
        tolerance: float | None = None,
        probe: HostProbe | None = None,
        start_timeout_s: float = 180.0,
        env: Mapping[str, str] | None = None,
        trust: TrustPolicy | None = None,
    ) -> None:
        self.processes = Workers(bundle, devices, policy=policy, pin=pin, deadlines=deadlines, backoff=backoff,
                                 precision=precision, tolerance=tolerance, probe=probe, start_timeout_s=start_timeout_s,
                                 env=env, trust=trust)  # fmt: skip
        self.bundle = self.processes.bundle
        self.manifest = self.processes.manifest
        self.signature: Signature = self.processes.signature
        self.selection = self.processes.selection
        self.batch_dim, self._not_splittable = self.processes.batch_dim, self.processes.not_splittable
        self.pinned = self.processes.pinned
        self._target_s = chunk_ms / 1000
        self._backups = backups
        # Chunks workers still compute for calls that have returned (copies that lost):
        # the next call counts them in those devices' backlogs.
        self._carry: dict[str, list[Chunk]] = {}
        self._judging = judge
        self._judged = False
        self._judged_at = 0.0  # the working time at the judgement: it is made again REJUDGE_S later
        self._judgements = 0
        self._solo_trial: str | None = None  # a member measured alone before judging
        self._only: set[str] | None = None  # members allowed to work, inside `using()`
        self._events: queue.Queue = queue.Queue()
        self._job_lock = threading.Lock()
        self._job_owner: int | None = None
        self._job_id = 0
        self._wall_s = 0.0
        self.members: list[SplitMember] = []
        for m in self.processes.members:
            # A profile speaks for a worker only if measured as it will run: a pinned one
            # has fewer cores than the profile had, so it starts unmeasured.
            profile = m.candidate.throughput if not m.worker.cpus else None
            # Units are rows when batches split, whole requests when they do not.
            prior = (profile.items_per_second if self.splittable else profile.throughput) if profile else None
            self.members.append(SplitMember(m.candidate, m.worker, Speed(prior), Speed(), Speed(), prior))
        self.processes.add_listener(self._worker_changed)

    # --- calls -----------------------------------------------------------------

    @property
    def splittable(self) -> bool:
        """Whether a call's batch can be split across devices (a dynamic batch dimension)."""
        return self._not_splittable is None

    @property
    def not_splittable(self) -> str | None:
        """Why a call's batch cannot be split across devices (None if it can)."""
        return self._not_splittable

    def __call__(self, *inputs: Any) -> Any:
        """Run one batch across every device; outputs as one device would return them."""
        if not self.splittable:
            raise UsageError(f"{self.bundle}: cannot split a batch across devices: {self._not_splittable}",
                             hint="recompile with `hxc compile ... --dynamic-batch` (or use pool.map for whole requests)")  # fmt: skip
        return _first(self._run(iter([inputs]), window=1, last=1))

    def run_flat(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Numpy in, flat numpy out (as `LoadedModel.run_flat`): split across devices when
        the batch can be, else run whole on one device."""
        return _first(self._run(iter([tuple(arrays)]), window=1, flat=True, last=1))

    def map(self, items: Iterable[Any], *, window: int = 64) -> Iterator[Any]:
        """Run a stream of requests, keeping every device busy; yields results in input
        order. An item is the inputs of one call: an array, or a tuple of arrays. With a
        dynamic batch, consecutive items are merged into chunks and split back; without
        one, each item runs whole on one device. At most `window` items are read ahead."""
        last = len(items) if isinstance(items, Sized) else None
        return self._run((x if isinstance(x, (tuple, list)) else (x,) for x in items), window=max(1, window), last=last)

    # --- state -----------------------------------------------------------------

    def stats(self) -> PoolStats:
        """Per device: items, chunks, busy time, utilisation (busy / the wall time of this
        pool's calls), failures, restarts, queue depth, speed."""
        devices = []
        for m in self.members:
            w = m.worker.stats()
            c = m.counts
            devices.append(DeviceStats(
                m.name, m.candidate.device.label, w.health.value, w.reason, m.left_out, w.cpus, int(c["items"]),
                int(c["chunks"]), c["busy_s"], c["busy_s"] / self._wall_s if self._wall_s else 0.0, w.failures,
                int(c["requeued"]), w.restarts, w.queue_depth, m.speed.rate, m.speed.source, int(c["backups"]),
                int(c["wasted"]),
            ))  # fmt: skip
        return PoolStats(self._wall_s, sum(d.items for d in devices), tuple(devices))

    def explain(self) -> str:
        lines = [f"pool of {len(self.members)} device(s) for {self.manifest.model.name}: chunks of about "
                 f"{self._target_s * 1000:g} ms, pulled from a shared queue; backups {'on' if self._backups else 'off'}; "
                 f"judgement {'on' if self._judging else 'off'}"
                 f"{'' if self.splittable else f'; batches are not split ({self._not_splittable})'}"]  # fmt: skip
        for m in self.members:
            w = m.worker
            where = f"cores {','.join(map(str, w.cpus))}" if w.cpus else "all cores"
            speed = f"{m.speed.rate:.4g} items/s ({m.speed.source})" if m.speed.rate else "speed not known yet"
            lines.append(f"  {m.name} on {m.candidate.device.label} [{w.health.value}, pid {w.pid}, {where}]: {speed}")
            if m.solo.samples or m.shared.samples or m.solo_prior:
                solo = m.solo.median if m.solo.samples else m.solo_prior
                lines.append(f"      alone {_rate(solo)} ({'measured' if m.solo.samples else 'profile'}), "
                             f"beside the others {_rate(m.shared.median)} (medians of recent chunks)")  # fmt: skip
            if m.counts["backups"] or m.counts["wasted"]:
                lines.append(f"      backup copies run: {int(m.counts['backups'])}; rows computed but dropped (another copy "
                             f"was first): {int(m.counts['wasted'])}")  # fmt: skip
            overhead = w.stats().overhead
            if overhead is not None:
                lines.append(f"      caller overhead beyond device time: p50 {overhead.p50_ms:.3g} ms, p99 {overhead.p99_ms:.3g} ms "
                             f"({overhead.iterations} calls)")  # fmt: skip
            if w.reason:
                lines.append(f"      {'unhealthy' if w.health == Health.UNHEALTHY else 'last failure'}: {w.reason}")
            if m.left_out:
                lines.append(f"      left out of the split: {m.left_out}")
        if self._judging and not self._judged and len(self.members) > 1:
            lines.append("  not judged yet: needs each device measured alone (or a profile from `hxc bench`) and beside the others")
        lines.append("selection per device:")
        lines += ["  " + line for line in self.selection.explain().splitlines()]
        return "\n".join(lines)

    @property
    def workers(self) -> list[Worker]:
        """The per-device worker handles (submit, queue depth, health, stats); the
        processes as one object are `self.processes`."""
        return [m.worker for m in self.members]

    @property
    def expected_rate(self) -> float:
        """Units per second the devices taking work now should do together, by their
        current speed estimates in chunks of their usual length (1/s for one not
        measured yet). Not the rate of the chunks seen so far: a device with a large
        cost per call (lavapipe: 0.27 s) measured in small calls would then be sized
        small calls forever."""
        rates = Balancer(self._target_s)
        return sum(rates.rate(m.speed) or 1.0 for m in self._kept())

    def add_listener(self, callback: Callable[[Worker], None]) -> None:
        """Call `callback(worker)` (in the worker's thread) whenever a worker's health
        changes: how a router re-routes the queue of a device that failed."""
        self.processes.add_listener(callback)

    def _worker_changed(self, worker: Worker) -> None:
        self._events.put(("state", worker))  # wakes the job loop: the next pump sees it

    def rejudge(self) -> None:
        """Let left-out devices back in; the judgement is made again from new measurements."""
        for m in self.members:
            m.left_out = None
            m.shared = Speed()
        self._judged = False
        self._solo_trial = None

    def settle(self, timeout_s: float = 60.0) -> bool:
        """Wait (at most `timeout_s`) for the copies still computing for calls that have
        returned (backup copies that lost, an unmeasured device's probe): their devices are
        then free and their timings taken, so the next call starts with every device idle
        and pays for none of them (what a measurement needs). True if none is left."""
        if self._job_owner == threading.get_ident():
            raise UsageError("this pool is running a call or map() in this thread; finish it before settle()")
        with self._job_lock:
            job = Job(self, iter(()), window=1)
            try:
                job.settle(time.monotonic() + timeout_s)
            finally:
                job.close()
        return not any(self._carry.values())

    def close(self) -> None:
        self.processes.close()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<hxc pool {self.manifest.model.name!r}: {', '.join(m.name for m in self.members)}>"

    # --- the job loop ----------------------------------------------------------

    @contextlib.contextmanager
    def using(self, *names: str) -> Iterator[None]:
        """Within the block, only these members (artifact ids or device selectors) take
        work and no judgement is made: to measure a device alone, as pinned in the pool."""
        only = {m.name for m in self.members if any(matches_device(n, m.candidate.device, m.candidate.artifact) for n in names)}
        if not only:
            raise UsageError(f"no device of the pool matches {', '.join(names)}", hint=", ".join(m.name for m in self.members))
        previous, self._only = self._only, only
        try:
            yield
        finally:
            self._only = previous

    def _run(self, source: Iterator[Sequence[Any]], window: int, flat: bool = False,
             last: int | None = None) -> Iterator[Any]:  # fmt: skip
        """The job loop over `source`; `last`: how many items it holds, when known (a
        call), so the end of the work is known from the start and chunks shrink toward it."""
        if self._job_owner == threading.get_ident():
            raise UsageError("this pool is already running a call or map() in this thread; finish it first")
        with self._job_lock:
            self._job_owner = threading.get_ident()
            if self._judged and self._wall_s - self._judged_at > (REJUDGE_S if self._judgements > 1 else CONFIRM_S):
                self.rejudge()
            try:
                yield from Job(self, source, window, flat, last).run()
            finally:
                self._job_owner = None

    def _empty_call(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """The outputs of a call where a dynamic dimension is 0 (a zero-row batch): from
        the inputs' shapes when they alone make every output empty (no worker is asked),
        else from one device whose driver runs empty dispatches, called with the whole
        request (there are no rows to split; see TargetFamily.empty_dispatch)."""
        from hxc.engines.base import empty_outputs
        from hxc.targets import family

        answered = empty_outputs(self.signature, arrays)
        if answered is not None:
            return answered
        able = [m for m in self.members if m.worker.health == Health.READY and family(m.candidate.artifact.family).empty_dispatch]
        if not able:
            raise HxcError(f"{self.bundle}: a dimension is 0 in this call and no ready device of the pool can run "
                           "such a call (Vulkan cannot dispatch over empty buffers)", hint="add a CPU device to the pool")  # fmt: skip
        return able[0].worker.run(arrays, timeout=EMPTY_CALL_TIMEOUT_S)

    def _kept(self) -> list[SplitMember]:
        """Members that share the work: ready and not left out — or, if every one of
        those is gone, the left-out ones, which beat nothing."""
        ready = [m for m in self.members if m.worker.health == Health.READY]
        if self._only is not None:
            return [m for m in ready if m.name in self._only]
        return [m for m in ready if m.left_out is None] or ready

    def _active(self) -> list[SplitMember]:
        """Members that take chunks now: the kept ones, or one alone during a solo trial."""
        kept = self._kept()
        return [m for m in kept if m.name == self._solo_trial] or kept

    def _maybe_judge(self) -> None:
        active = self._kept()
        if not self._judging or self._judged or len(active) < 2 or self._only is not None:
            return
        # What a device adds is its rate beside the others (or any measured rate, for a
        # slow one whose few chunks rarely overlap the others' throughout); what it costs
        # needs the others' rates beside it, measured a few times.
        fastest = max(active, key=lambda m: m.speed.rate or 0.0)
        if any(m.speed.source != "measured" for m in active):
            return
        if fastest.solo.samples < JUDGE_SAMPLES:
            # Not measured alone in this pool's chunks: let it work alone for a few (a solo
            # trial). Its profile is no substitute: measured in another process, at other
            # batch sizes (the MLP's said 5x less than its 50 ms chunks do), it would make
            # any cost of the others invisible.
            self._solo_trial = fastest.name
            return
        self._solo_trial = None
        contended = {m.name for m in active if _competes(m, active)}
        if fastest.shared.samples < JUDGE_SAMPLES:
            # Not yet measured beside the others, which can take many calls when a slow
            # device's few chunks rarely overlap the fast one's throughout (each of them
            # costing the fast one meanwhile). A device on the same cores that adds less
            # than the noise of the fastest's own rate cannot show a gain whatever that
            # measurement says: such devices are left out now; otherwise wait for it.
            margin = 2 * fastest.solo.error
            small = {m.name: m.speed.median or 0.0 for m in active if m is not fastest and m.name in contended}
            if len(small) < len(active) - 1 or any(rate > margin for rate in small.values()):
                return
            verdicts = {name: f"adds no more than it may cost: adds {rate:.4g} items/s, within the noise of "
                              f"{fastest.name}'s own rate (+-{margin:.3g})" for name, rate in small.items()}  # fmt: skip
        else:
            solo = {m.name: (m.solo.median if m.solo.samples >= JUDGE_SAMPLES else m.solo_prior) for m in active}
            shared = {m.name: m.shared.median if m.shared.samples else m.speed.median for m in active}
            noise = {m.name: math.hypot(m.solo.error, m.shared.error) for m in active}
            verdicts = judge(solo, shared, noise, contended)
        hint = ("; they compete for the same CPU cores: pin them to separate cores (pin='split') to use both"
                if not self.pinned else "; pinned to separate cores, they still compete (memory, or other load)")  # fmt: skip
        for m in active:
            m.left_out = verdicts[m.name] + hint if m.name in verdicts else None
        self._judged = True
        self._judged_at = self._wall_s
        self._judgements += 1


def _competes(m: SplitMember, members: Sequence[SplitMember]) -> bool:
    """Whether `m` computes on CPU cores another member computes on too (the host CPU
    and a software Vulkan device, unless pinned apart)."""
    if m.candidate.device.kind != "cpu":
        return False
    mine = set(m.worker.cpus or os.sched_getaffinity(0))
    return any(o is not m and o.candidate.device.kind == "cpu" and mine & set(o.worker.cpus or os.sched_getaffinity(0))
               for o in members)  # fmt: skip


def _first(results: Iterator[Any]) -> Any:
    """The one result of a one-request job, closing the job (and its lock) right away."""
    try:
        return next(results)
    finally:
        results.close()  # type: ignore[attr-defined]


def _rate(x: float | None) -> str:
    return f"{x:.4g} items/s" if x else "not measured"

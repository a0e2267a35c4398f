"""`Pool`: every usable device of this host working on one batch, or one stream.

    with Pool("model.hxc") as pool:     # every usable device; or Pool(bundle, ["cpu", "vulkan"])
        y = pool(x)                     # x's batch split across the devices, y as one call would return it
        for y in pool.map(batches):     # a stream of requests, results in input order
            ...
        print(pool.explain())           # which device got what, and why
        print(pool.stats())             # items, busy time, utilisation, failures per device

Each device runs the best artifact for it in its own worker process (`worker.py`).
A call is split into chunks that the devices pull from a shared queue
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

import bisect
import contextlib
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hxc.errors import HxcError, NoCompatibleArtifactError, UsageError
from hxc.manifests import read_manifest
from hxc.manifests.schema import Signature
from hxc.pool.schedule import Balancer, Chunk, Overlap, Speed, judge
from hxc.pool.worker import Backoff, Deadlines, Health, Inputs, RequestFailed, Worker, WorkerFailed
from hxc.runtime.probe import HostProbe, probe_host
from hxc.runtime.select import Candidate, Selection, matches_device, select

SLOTS = 2  # chunks a worker holds at once: one running, the next already there
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


@dataclass
class _Member:
    candidate: Candidate
    worker: Worker
    speed: Speed
    solo: Speed  # measured while no other device worked
    shared: Speed  # measured while every other device worked
    solo_prior: float | None
    left_out: str | None = None
    counts: dict[str, float] = field(default_factory=lambda: {"items": 0, "chunks": 0, "busy_s": 0.0, "requeued": 0,
                                                                      "backups": 0, "wasted": 0})
    last_done: float = 0.0

    @property
    def name(self) -> str:
        return self.candidate.artifact.id


@dataclass
class _Item:
    """One request of a call or stream: its inputs, where its units lie in the job's
    unit space, and its outputs as chunks complete."""

    arrays: list[np.ndarray]
    offset: int
    units: int
    as_torch: bool
    outputs: list[np.ndarray] | None = None
    written: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    done: int = 0


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
    they add (from measurements). `deadlines`, `backoff`: per-worker fault handling."""

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
    ) -> None:
        self.bundle = Path(bundle)
        self.manifest = read_manifest(self.bundle)
        self.signature: Signature = self.manifest.signature
        probe = probe or probe_host()
        self.selection, chosen = _choose(self.manifest, probe, devices, policy, precision, tolerance)
        self.batch_dim, self._not_splittable = _batch_dim(self.signature)
        cpus = _pinning(pin, chosen)
        self.pinned = any(cpus.values())
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
        self._listeners: list[Callable[[Worker], None]] = []
        self.members: list[_Member] = []
        for cand in chosen:
            # A profile speaks for a worker only if measured as it will run: a pinned one
            # has fewer cores than the profile had, so it starts unmeasured.
            profile = cand.throughput if not cpus[cand.artifact.id] else None
            rows_per_s = profile.items_per_second if profile else None
            # Units are rows when batches split, whole requests when they do not.
            prior = (rows_per_s if self.splittable else profile.throughput) if profile else None
            worker = Worker(
                self.bundle, cand.artifact.id, cand.device.label, self.signature, cpus=cpus[cand.artifact.id],
                deadlines=deadlines, backoff=backoff, slots=SLOTS, ms_per_item=1000 / rows_per_s if rows_per_s else None,
                env=dict(env or {}), on_change=self._worker_changed,
            )  # fmt: skip
            self.members.append(_Member(cand, worker, Speed(prior), Speed(), Speed(), prior))
        for m in self.members:
            m.worker.start()
        deadline = time.monotonic() + start_timeout_s
        for m in self.members:
            m.worker.wait_ready(max(0.0, deadline - time.monotonic()))
        if not any(m.worker.health == Health.READY for m in self.members):
            reasons = "; ".join(f"{m.name}: {m.worker.reason or 'did not start in time'}" for m in self.members)
            self.close()
            raise NoCompatibleArtifactError(f"{self.bundle}: no device of the pool could start", hint=reasons)

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
        """The per-device worker handles (submit, queue depth, health, stats): what a
        server routing single requests uses directly."""
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
        self._listeners.append(callback)

    def _worker_changed(self, worker: Worker) -> None:
        self._events.put(("state", worker))
        for callback in self._listeners:
            callback(worker)

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
            job = _Job(self, iter(()), window=1)
            try:
                job.settle(time.monotonic() + timeout_s)
            finally:
                job.close()
        return not any(self._carry.values())

    def close(self) -> None:
        for m in self.members:
            m.worker.close()

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
                yield from _Job(self, source, window, flat, last).run()
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

    def _kept(self) -> list[_Member]:
        """Members that share the work: ready and not left out — or, if every one of
        those is gone, the left-out ones, which beat nothing."""
        ready = [m for m in self.members if m.worker.health == Health.READY]
        if self._only is not None:
            return [m for m in ready if m.name in self._only]
        return [m for m in ready if m.left_out is None] or ready

    def _active(self) -> list[_Member]:
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


class _Job:
    """One call or map(): the event loop in the caller's thread. Workers' reader threads
    write outputs in place and post completions; everything else happens here."""

    def __init__(self, pool: Pool, source: Iterator[Sequence[Any]], window: int, flat: bool = False,
                 last: int | None = None) -> None:  # fmt: skip
        pool._job_id += 1
        self.flat = flat
        self.last = last
        self.pool = pool
        self.id = pool._job_id
        self.source = source
        self.window = window
        self.splittable = pool.splittable
        self.balancer = Balancer(pool._target_s, max_units=None if self.splittable else 1, backups=pool._backups)
        self.balancer.open = True
        self.overlap = Overlap()
        started = time.perf_counter()
        for name, chunks in pool._carry.items():
            for chunk in chunks:
                self.balancer.hold(name, chunk)
            # Still computing for an earlier call: the others' chunks meanwhile are not
            # solo (counted so, they made lavapipe look free and the judgement kept it).
            self.overlap.busy(name, started, bool(chunks))
        self.finished = False  # set when the call returns: a late copy must not write into its outputs
        self.items: list[_Item] = []  # read and not yet yielded
        self.units = 0
        self.read = 0
        self.exhausted = False
        self.alloc = threading.Lock()  # output allocation in reader threads
        self.failures = 0
        self.reasons: list[str] = []

    def run(self) -> Iterator[Any]:
        # Working time counts while this loop runs, not while the consumer holds a result.
        t0: float | None = time.perf_counter()
        try:
            # Copies of earlier calls that finished meanwhile: their devices are free, and
            # measured, before the first chunk is handed out.
            self._drain()
            while True:
                self._refill()
                while self.items and self.items[0].done == self.items[0].units:
                    item = self.items.pop(0)
                    self.pool._wall_s += time.perf_counter() - t0  # type: ignore[operator]
                    t0 = None
                    yield self._result(item)
                    t0 = time.perf_counter()
                if self.exhausted and not self.items:
                    return
                self._pump()
                self._wait()
        finally:
            if t0 is not None:
                self.pool._wall_s += time.perf_counter() - t0
            self.close()

    def close(self) -> None:
        """End the job: nothing more is written into its items' arrays, and what its
        devices still compute carries over into the next job's backlogs."""
        with self.alloc:
            self.finished = True
        b = self.balancer
        self.pool._carry = {m.name: [*b.stale(m.name), *b.in_flight(m.name)] for m in self.pool.members}

    def settle(self, deadline: float) -> None:
        """Handle completions until no device holds a chunk of an earlier job (or the deadline)."""
        self._drain()
        while any(self.balancer.held(m.name) for m in self.pool.members) and (left := deadline - time.monotonic()) > 0:
            try:
                self._handle(self.pool._events.get(timeout=min(0.5, left)))
            except queue.Empty:
                pass

    # reading requests

    def _refill(self) -> None:
        from hxc.dtypes import is_torch
        from hxc.engines.base import empty_at_run_time
        from hxc.runtime.loader import check_inputs

        want = self._lookahead()
        while not self.exhausted and len(self.items) < self.window and (self.balancer.unassigned < want or not self.items):
            try:
                raw = next(self.source)
            except StopIteration:
                self.exhausted = True
                self.balancer.open = False
                break
            arrays = check_inputs(self.pool.signature, raw)
            rows = int(arrays[0].shape[0]) if self.splittable else 1
            outputs = None
            if empty_at_run_time(self.pool.signature, arrays):  # a zero-row batch, or another dimension 0
                outputs, rows = self.pool._empty_call(arrays), 0  # no unit of it goes into the split
            item = _Item(arrays, self.units, rows, bool(raw) and is_torch(raw[0]), outputs=outputs, written=np.zeros(rows, bool))
            self.items.append(item)
            self.balancer.add(self.units, rows)
            self.units += rows
            self.read += 1
            if self.read == self.last:
                self.exhausted = True
                self.balancer.open = False

    def _lookahead(self) -> int:
        # Enough unassigned units for every device to take a full chunk, twice.
        rates = sum(m.speed.rate or 1.0 for m in self.pool.members)
        return max(1, int(2 * SLOTS * rates * self.pool._target_s))

    # handing out chunks

    def _pump(self) -> None:
        active = self.pool._active()
        names = {m.name for m in active}
        speeds = {m.name: m.speed for m in self.pool.members}
        for m in sorted(active, key=lambda m: -(m.speed.rate or 0.0)):
            while self.balancer.held(m.name) < SLOTS:
                copies = self.balancer.copies
                chunk = self.balancer.next_chunk(m.name, speeds, names, time.perf_counter())
                if chunk is None:
                    break
                m.counts["backups"] += self.balancer.copies - copies
                self._submit(m, chunk)

    def _submit(self, m: _Member, chunk: Chunk) -> None:
        segments = self._segments(chunk)
        if self.splittable:
            # A chunk holds rows of one shape: stop at the first item whose rows differ.
            first = segments[0][0].arrays
            cut = next((i for i, (item, _, _) in enumerate(segments)
                        if any(a.shape[1:] != b.shape[1:] for a, b in zip(item.arrays, first))), len(segments))  # fmt: skip
            if cut < len(segments):
                segments = segments[:cut]
                chunk = self.balancer.shrink(m.name, chunk, sum(n for _, _, n in segments))
            shapes = tuple((chunk.count, *a.shape[1:]) for a in first)
        else:
            shapes = tuple(a.shape for a in segments[0][0].arrays)
        rows = chunk.count if self.splittable else int(shapes[0][0]) if shapes and shapes[0] else 1

        def write(views: list[np.ndarray]) -> None:
            if not self.splittable:
                # One whole request (its one unit is the request, not a row).
                for v, a in zip(views, segments[0][0].arrays):
                    v[...] = a
                return
            at = 0
            for item, src, n in segments:
                for v, a in zip(views, item.arrays):
                    v[at:at + n] = a[src:src + n]
                at += n

        stored: list[bool] = []  # whether this copy's rows were stored (set before the future completes)

        def sink(views: list[np.ndarray]) -> None:
            stored.append(self._store(segments, views))

        future = m.worker.submit(Inputs(shapes, write), rows=rows, sink=sink)
        dispatched = time.perf_counter()
        self.overlap.busy(m.name, dispatched, True)
        future.add_done_callback(lambda f: self.pool._events.put(("done", self.id, m, chunk, f, dispatched, stored)))

    def _segments(self, chunk: Chunk) -> list[tuple[_Item, int, int]]:
        """(item, first unit within it, units) for every item the chunk overlaps."""
        offsets = [it.offset for it in self.items]
        i = bisect.bisect_right(offsets, chunk.start) - 1
        out, at = [], chunk.start
        while at < chunk.end:
            item = self.items[i]
            n = min(chunk.end, item.offset + item.units) - at
            if n > 0:
                out.append((item, at - item.offset, n))
                at += n
            i += 1
        return out

    def _store(self, segments: list[tuple[_Item, int, int]], views: list[np.ndarray]) -> bool:
        """Outputs of a finished chunk into their items (a worker's reader thread); False,
        and nothing written, if another copy of the chunk was stored first or the call
        has returned (its arrays belong to the caller now). Rows are claimed under the
        lock, so two copies finishing at once cannot both write."""
        total = sum(n for _, _, n in segments)
        if self.splittable and any(v.shape[:1] != (total,) for v in views):
            raise HxcError(f"an output has {views[0].shape[0]} rows for {total} input rows: this model's batch cannot be split")
        at = 0
        with self.alloc:
            # Copies are of whole chunks, so a chunk's rows are either all stored or none.
            if self.finished or all(item.written[src:src + n].all() for item, src, n in segments):
                return False
            for item, src, n in segments:
                if item.outputs is None:
                    rows = item.units if self.splittable else None
                    item.outputs = [np.empty((rows, *v.shape[1:]) if rows is not None else v.shape, v.dtype) for v in views]
                if item.written[src:src + n].any():
                    raise HxcError(f"internal error: rows {src}..{src + n} of a request were computed twice")
                for out, v in zip(item.outputs, views):
                    if self.splittable:
                        out[src:src + n] = v[at:at + n]
                    else:
                        out[...] = v  # the whole request's outputs, whatever their leading dimension
                item.written[src:src + n] = True
                at += n
        return True

    # waiting for completions

    def _wait(self) -> None:
        try:
            event = self.pool._events.get(timeout=0.5)
        except queue.Empty:
            self._check_progress()
            return
        self._handle(event)
        self._drain()
        self._check_progress()

    def _drain(self) -> None:
        """Handle every event already posted, without waiting."""
        while True:
            try:
                event = self.pool._events.get_nowait()
            except queue.Empty:
                return
            self._handle(event)

    def _handle(self, event: tuple) -> None:
        if event[0] == "state":
            return  # health changed: the next pump sees it
        _, job_id, m, chunk, future, dispatched, stored = event
        now = time.perf_counter()
        error = future.exception()
        if job_id != self.id:
            # A copy still running when an earlier call returned (or of an abandoned
            # call): its device is free of it now; its rows were dropped, its timing is
            # kept (an unmeasured device's probe is always copied, and would otherwise
            # never measure it).
            self.balancer.drop(m.name, chunk, now, stale=True)
            if error is None:
                seconds = future.result().worker_ms / 1000
                m.speed.observe(chunk.count, seconds, chunk.count >= self.balancer.full_size(m.speed))
                m.counts["busy_s"] += seconds
                m.counts["wasted"] += chunk.count
            self.overlap.busy(m.name, now, bool(self.balancer.held(m.name)))
            return
        if error is None and stored != [True]:
            # A copy that finished second: its device was busy, its rows are dropped.
            self.balancer.drop(m.name, chunk, now)
            result = future.result()
            m.speed.observe(chunk.count, result.worker_ms / 1000, chunk.count >= self.balancer.full_size(m.speed))
            m.last_done = now
            m.counts["busy_s"] += result.worker_ms / 1000
            m.counts["wasted"] += chunk.count
        elif error is None:
            result = future.result()
            self.balancer.done(m.name, chunk, now)
            seconds = result.worker_ms / 1000
            started = max(dispatched, m.last_done)
            # Items per second depend on the chunk size (each call has a fixed cost), so
            # rates learn from full chunks only: the short ones at a call's end would make
            # a device look slower than it is (they still inform the fixed-cost fit).
            full = m.speed.rate is None or chunk.count >= self.balancer.full_size(m.speed)
            m.speed.observe(chunk.count, seconds, full)
            if full:
                kind = self.overlap.classify(m.name, started, now, {o.name for o in self.pool.members} - {m.name})
                if kind == "solo":
                    m.solo.observe(chunk.count, seconds)
                elif kind == "shared":
                    m.shared.observe(chunk.count, seconds)
            m.last_done = now
            m.counts["items"] += result.rows
            m.counts["chunks"] += 1
            m.counts["busy_s"] += seconds
            for item, _, n in self._segments(chunk):
                item.done += n
            self.pool._maybe_judge()
        elif isinstance(error, WorkerFailed):
            # Not re-queued when another copy of it still runs (a backup) or it was stale.
            if self.balancer.failed(m.name, chunk, now):
                m.counts["requeued"] += 1
            self.failures += 1
            self.reasons.append(str(error))
        else:
            raise error if isinstance(error, (RequestFailed, HxcError)) else HxcError(f"{m.name}: {error}")
        self.overlap.busy(m.name, now, bool(self.balancer.held(m.name)))

    def _check_progress(self) -> None:
        """Fail the call when no device is left to finish it."""
        if self.balancer.idle or any(self.balancer.in_flight(m.name) for m in self.pool.members):
            return
        workers = [m.worker for m in self.pool.members]
        alive = [w for w in workers if w.health in (Health.READY, Health.STARTING) or w.restart_pending]
        limit = 3 * len(workers)
        if not alive or self.failures > limit:
            why = "; ".join(dict.fromkeys(self.reasons)) or "; ".join(f"{w.name}: {w.reason}" for w in workers)
            raise HxcError(f"{self.pool.bundle}: every device of the pool failed ({self.failures} failures): {why}")

    # results

    def _result(self, item: _Item) -> Any:
        from hxc.dtypes import to_torch
        from hxc.runtime.loader import rebuild

        outputs = item.outputs or []
        if self.flat:
            return outputs
        if item.as_torch:
            outputs = [to_torch(o, s.dtype) for o, s in zip(outputs, self.pool.signature.outputs)]
        return rebuild(self.pool.signature.output_tree, outputs)


def _competes(m: _Member, members: Sequence[_Member]) -> bool:
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


def _choose(manifest, probe: HostProbe, devices: str | Sequence[str], policy: str, precision: str | None,
            tolerance: float | None) -> tuple[Selection, list[Candidate]]:  # fmt: skip
    """The selection over every device, and the best candidate per device."""
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
    return selection, picked


def _pinning(pin: str | Mapping[str, Sequence[int]] | None, chosen: list[Candidate]) -> dict[str, tuple[int, ...] | None]:
    """Cores per member (artifact id), or None where it is not pinned."""
    out: dict[str, tuple[int, ...] | None] = {c.artifact.id: None for c in chosen}
    if pin is None:
        return out
    available = sorted(os.sched_getaffinity(0))
    if pin == "split":
        cpu_kind = [c for c in chosen if c.device.kind == "cpu"]
        if len(cpu_kind) > len(available):
            raise UsageError(f"pin='split' needs a core per CPU-type device: {len(cpu_kind)} devices, {len(available)} cores")
        share, extra = divmod(len(available), max(1, len(cpu_kind)))
        start = 0
        for i, c in enumerate(cpu_kind):
            size = share + (extra if i == 0 else 0)  # the host CPU, first and fastest by far, takes the remainder
            out[c.artifact.id] = tuple(available[start:start + size])
            start += size
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


def _batch_dim(signature: Signature) -> tuple[str | None, str | None]:
    """(the batch dimension's name, or None and why batches cannot be split)."""
    names = {s.shape[0] if s.shape else None for s in signature.inputs}
    if len(names) != 1 or not isinstance(next(iter(names)), str):
        return None, "the model has no dynamic batch dimension shared by all inputs"
    dim = next(iter(names))
    bad = [s.name for s in signature.outputs if not s.shape or s.shape[0] != dim]
    if bad:
        return None, f"output(s) {', '.join(bad)} have no batch dimension {dim!r}"
    return dim, None

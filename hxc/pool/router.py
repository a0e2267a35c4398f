"""Single requests routed across a pool's devices, one at a time, as a server needs them.

`Pool` splits one batch across every device; a server instead gets many small requests
at once, each with its own deadline. `Router` sits on a bundle's worker processes
(`workers.Workers`, the same a `Pool` stands on) and adds what that needs:

- **a queue per device with dynamic batching**, as Triton's dynamic batcher does:
  while a device is busy, requests routed to it wait in its queue; when it has room,
  the waiting requests whose shapes agree are merged along the batch dimension (up to
  `max_batch_size` rows, after waiting at most `max_queue_delay_ms` for more), run as
  one call, and the outputs are split back to their requests. Models without a
  dynamic batch dimension run one request per call.
- **routing per request** by the recorded profiles and live state: each device's
  expected finish time for the request = the work ahead of it (its queue and what its
  worker holds, at the device's measured speed) + the request's own time + the caller
  overhead the worker measured: an `Estimate` per device, which the request's policy
  (a registered module in `policies/`) ranks. `latency` picks the soonest finish;
  `cost` the cheapest device (price per hour / measured items per second) whose finish
  meets the request's `slo_ms`. A request no device can finish in time goes to the
  soonest one and is marked an SLO miss.
- **bounded queues**: beyond `max_queue` requests in the router, `submit` raises
  `Overloaded` with a retry-after estimate instead of queueing.
- **failover**: when a worker fails, every request it held and every request queued
  for it is routed again to the other devices (never to one that failed it); a caller
  sees an error only when no device is left.

Speeds start from the bench profiles (single-stream and offline points seed a fit of
call time = fixed cost + rows / rate) and follow every completed call.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from hxc.errors import HxcError
from hxc.pool import policies
from hxc.pool.policies.base import Estimate, misses
from hxc.pool.pool import Pool
from hxc.pool.schedule import Speed
from hxc.pool.worker import Health, Inputs, RequestFailed, Result, Worker, WorkerFailed
from hxc.pool.workers import SLOTS, Member, Workers
from hxc.runtime.prices import PriceTable, load_prices
from hxc.runtime.probe import probe_host

MAX_TRIES = 3  # devices one request may fail on before it fails


class Overloaded(HxcError):
    """Every queue slot is taken: shed the request; `retry_after_s` says when to retry."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NoDeviceReady(HxcError):
    """No device can take the request now (all failed, starting or restarting)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Admission:
    """A place in a router's queue, taken before the request is parsed (`Router.admit`)."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.used = False
        self.released = False

    def release(self) -> None:
        """Give the place back unless a submitted request holds it (idempotent)."""
        if self.used or self.released:
            return
        self.released = True
        with self.router.lock:
            self.router._outstanding -= 1


@dataclass(frozen=True)
class Routed:
    """A finished request: its outputs and how it was served."""

    outputs: list[np.ndarray]
    device: str  # the artifact id of the device that computed it
    queue_ms: float  # from submit until its call started on the worker
    compute_ms: float  # the worker's time for the whole (batched) call
    batch_rows: int  # rows in the call it was part of
    slo_missed: bool  # predicted at routing time (no device could meet it) or observed
    reroutes: int  # times it was routed again after a device failed


@dataclass(frozen=True)
class DeviceState:
    """One device of a router, now (for readiness and metrics)."""

    name: str
    device: str
    health: str
    reason: str | None
    queued: int  # requests waiting in the router's queue for it
    in_worker: int  # requests its worker holds (running or next)
    requests: int  # completed here
    batches: int
    rerouted: int  # requests that failed here and went elsewhere
    failures: int
    restarts: int
    busy_s: float
    since: float  # time.monotonic() when counting began
    ms_per_row: float | None  # the current speed estimate, at a one-row call
    price_per_hour: float | None


@dataclass(eq=False)  # compared by identity: its arrays have no truth value
class _Request:
    arrays: list[np.ndarray]
    rows: int
    future: Future
    slo_ms: float | None
    policy: str
    only: frozenset[str] | None = None  # the devices it may run on (None: any)
    submitted: float = field(default_factory=time.perf_counter)
    tried: set[str] = field(default_factory=set)
    reroutes: int = 0
    slo_missed: bool = False
    alone: bool = False  # run it in a call of its own (its batch failed as a whole)
    outputs: list[np.ndarray] | None = None

    def trailing(self) -> tuple:
        return tuple(a.shape[1:] for a in self.arrays)


class _Device:
    """One device's queue, its speed and its dispatcher thread."""

    def __init__(self, router: Router, member: Member, speed: Speed, price_per_hour: float | None) -> None:
        self.router = router
        self.candidate = member.candidate
        self.worker: Worker = member.worker
        worker = self.worker
        self.name = worker.artifact
        self.speed = speed
        self.price_per_hour = price_per_hour
        self.queue: collections.deque[_Request] = collections.deque()
        self.wake = threading.Condition(router.lock)
        self.in_flight: list[list[_Request]] = []  # batches the worker holds
        self.counts = {"requests": 0, "batches": 0, "rerouted": 0, "busy_s": 0.0}
        self.since = time.monotonic()
        self.overhead_ms = 0.0
        self.thread = threading.Thread(target=self._dispatch, name=f"hxc-route-{self.name}", daemon=True)

    # --- estimates (router lock held) ---------------------------------------------

    def ready(self) -> bool:
        return self.worker.health == Health.READY

    def finish_ms(self, rows: int) -> float | None:
        """When a request of `rows` routed here now should be done: None for a device
        never measured that is idle (it can take a request to be measured), infinity
        for one that is busy."""
        own = self.speed.seconds_for(rows)
        if own is None:
            return None if not self.queue and not self.in_flight else math.inf
        ahead = sum(self.speed.seconds_for(sum(r.rows for r in b)) or 0.0 for b in self.in_flight)
        queued = sum(r.rows for r in self.queue)
        if queued:
            batch = max(1, self.router.max_batch_size)
            ahead += math.ceil(queued / batch) * (self.speed.seconds_for(min(queued, batch)) or 0.0)
        return (ahead + own) * 1000 + self.overhead_ms

    def cost_per_row(self) -> float | None:
        """The price of one row at the measured speed (None: no price, or not measured)."""
        rate = self.speed.rate
        if self.price_per_hour is None or not rate:
            return None
        return self.price_per_hour / 3600 / rate

    def estimate(self, rows: int) -> Estimate:
        return Estimate(self.finish_ms(rows), price_per_unit=self.cost_per_row())

    # --- the dispatcher thread ----------------------------------------------------

    def _dispatch(self) -> None:
        router = self.router
        while True:
            with router.lock:
                batch = self._next_batch()
                if batch is None:
                    return
                if not batch:
                    continue
                self.in_flight.append(batch)
            self._submit(batch)

    def _next_batch(self) -> list[_Request] | None:
        """The next call's requests ([] to look again), None when the router closes.
        Called with the lock held; waits on it."""
        router = self.router
        if router.closed:
            return None
        if not self.ready():
            if self.queue:  # failed, or restarting: what waits here goes elsewhere
                stranded = list(self.queue)
                self.queue.clear()
                router._reroute_locked(stranded, self.name, f"{self.name} is {self.worker.health.value}: {self.worker.reason}")
            self.wake.wait(0.2)
            return []
        if not self.queue or len(self.in_flight) >= SLOTS:
            self.wake.wait(0.5)
            return []
        first = self.queue[0]
        limit = router.max_batch_size if router.batching and not first.alone else 1
        if limit > 1 and router.max_queue_delay_s > 0:
            rows = sum(r.rows for r in self.queue if r.trailing() == first.trailing() and not r.alone)
            left = first.submitted + router.max_queue_delay_s - time.perf_counter()
            if rows < limit and left > 0:
                self.wake.wait(left)
                return []
        return self._take(limit)

    def dispatch_now(self) -> None:
        """Send what waits here at once when the worker has room and nothing has to wait
        for a batch to fill: a request to an idle device skips the dispatcher thread's
        wake-up (a thread hop that costs most under load)."""
        router = self.router
        with router.lock:
            if router.closed or router.max_queue_delay_s > 0 or not self.ready() or not self.queue or len(self.in_flight) >= SLOTS:
                return
            first = self.queue[0]
            batch = self._take(router.max_batch_size if router.batching and not first.alone else 1)
            self.in_flight.append(batch)
        self._submit(batch)

    def _take(self, limit: int) -> list[_Request]:
        """The first waiting request and those that can join it, up to `limit` rows."""
        first = self.queue[0]
        batch = [self.queue.popleft()]
        rows = first.rows
        keep: list[_Request] = []
        while self.queue and rows < limit:
            r = self.queue.popleft()
            if r.alone or r.trailing() != first.trailing() or rows + r.rows > limit:
                keep.append(r)
                if len(keep) > 64:
                    break
                continue
            batch.append(r)
            rows += r.rows
        self.queue.extendleft(reversed(keep))
        return batch

    def _submit(self, batch: list[_Request]) -> None:
        started = time.perf_counter()
        if len(batch) == 1:
            req = batch[0]

            def sink(views: list[np.ndarray]) -> None:
                req.outputs = [v.copy() for v in views]

            future = self.worker.submit(req.arrays, rows=req.rows if self.router.batching else 1, sink=sink)
        else:
            shapes = tuple((sum(r.rows for r in batch), *a.shape[1:]) for a in batch[0].arrays)

            def write(views: list[np.ndarray]) -> None:
                at = 0
                for r in batch:
                    for v, a in zip(views, r.arrays):
                        v[at:at + r.rows] = a
                    at += r.rows

            def sink(views: list[np.ndarray]) -> None:
                total = sum(r.rows for r in batch)
                if any(v.shape[:1] != (total,) for v in views):
                    raise RequestFailed(f"{self.name}: an output has no batch dimension of {total} rows; cannot split it")
                at = 0
                for r in batch:
                    r.outputs = [v[at:at + r.rows].copy() for v in views]
                    at += r.rows

            future = self.worker.submit(Inputs(shapes, write), rows=shapes[0][0], sink=sink)
        future.add_done_callback(lambda f: self._done(batch, f, started))

    def _done(self, batch: list[_Request], future: Future, started: float) -> None:
        """A call finished (in the worker's reader thread, or at once if it failed)."""
        router = self.router
        error = future.exception()
        with router.lock:
            self.in_flight = [b for b in self.in_flight if b is not batch]
            if error is None:
                result: Result = future.result()
                self.speed.observe(result.rows, result.worker_ms / 1000)
                if result.overhead_ms is not None:
                    self.overhead_ms = 0.8 * self.overhead_ms + 0.2 * max(0.0, result.overhead_ms)
                self.counts["requests"] += len(batch)
                self.counts["batches"] += 1
                self.counts["busy_s"] += result.worker_ms / 1000
            elif isinstance(error, WorkerFailed):
                self.counts["rerouted"] += len(batch)
                router._reroute_locked(batch, self.name, str(error))
            elif len(batch) > 1:
                # The merged call failed: run each request alone, so a bad one fails by itself.
                for r in reversed(batch):
                    r.alone = True
                    self.queue.appendleft(r)
            self.wake.notify_all()
        if router.on_batch is not None and error is None:
            router.on_batch(self.name, result.rows, len(batch))
        if error is None:
            for r in batch:
                queue_ms = (started - r.submitted) * 1000
                total_ms = (time.perf_counter() - r.submitted) * 1000
                missed = r.slo_missed or (r.slo_ms is not None and total_ms > r.slo_ms)
                outputs = r.outputs or []
                r.outputs = None
                _resolve(r.future, Routed(outputs, self.name, queue_ms, result.worker_ms, result.rows, missed, r.reroutes))
        elif not isinstance(error, WorkerFailed) and len(batch) == 1:
            _fail(batch[0].future, error if isinstance(error, HxcError) else RequestFailed(f"{self.name}: {error}"))


class Router:
    """Routes single requests across `workers` (a `Workers`, or a `Pool`'s); see the
    module docstring. The workers are the caller's to close.

    `policy` (a name in `policies.policy_names()`) and `slo_ms` are the defaults a request's own parameters override.
    `max_batch_size` rows per merged call (1 turns batching off); `max_queue_delay_ms`
    how long the oldest request may wait for others to join; `max_queue` requests in
    the router (waiting or running) before `submit` sheds load. `on_batch(device,
    rows, requests)` is called for every completed call (for metrics). `prices`: the
    price table for the cost policy (default: `load_prices()`, as `hxc select`)."""

    def __init__(
        self,
        workers: Workers | Pool,
        *,
        policy: str = "latency",
        slo_ms: float | None = None,
        max_batch_size: int = 32,
        max_queue_delay_ms: float = 0.0,
        max_queue: int = 256,
        prices: PriceTable | None = None,
        on_batch: Callable[[str, int, int], None] | None = None,
    ) -> None:
        policies.policy(policy)  # an unknown name fails here, before any thread starts
        self.workers: Workers = workers.processes if isinstance(workers, Pool) else workers
        self.policy = policy
        self.slo_ms = slo_ms
        splittable = self.workers.splittable
        self.batching = splittable and max_batch_size > 1
        self.max_batch_size = max(1, max_batch_size) if splittable else 1
        self.max_queue_delay_s = max(0.0, max_queue_delay_ms) / 1000
        self.max_queue = max_queue
        self.on_batch = on_batch
        # Reentrant: failing a request's future runs its callbacks, which count it off.
        self.lock = threading.RLock()
        self.closed = False
        self._outstanding = 0  # requests submitted and not yet resolved
        self.shed = 0
        prices = prices or load_prices()
        cores = probe_host().cpu.cores
        self.currency = prices.currency
        self.devices: list[_Device] = []
        for m in self.workers.members:
            price = prices.price(m.candidate.device, cores)
            self.devices.append(_Device(self, m, _seeded_speed(m, splittable), price.per_hour if price else None))
        self.workers.add_listener(self._worker_changed)
        for d in self.devices:
            d.thread.start()

    # --- requests -------------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def admit(self) -> Admission:
        """Take a place in the queue now, before the request is parsed (a server sheds load
        before spending time on it; `hxc serve` does so once the body has arrived, so a
        stalled upload holds no place): raises Overloaded (and counts it shed) when every
        place is taken. Hand the admission to `submit`, or `release()` it."""
        with self.lock:
            self._admit_locked()
            self._outstanding += 1
        return Admission(self)

    def _admit_locked(self) -> None:
        if self._outstanding >= self.max_queue:
            self.shed += 1
            raise Overloaded(f"{self.max_queue} requests are already queued or running", self.retry_after_s())

    def retry_after_s(self) -> float:
        """Seconds until the soonest device should have worked off what it holds."""
        with self.lock:
            finish = [d.finish_ms(1) for d in self.devices if d.ready()]
            known = [f for f in finish if f is not None and math.isfinite(f)]  # a device not measured yet cannot say
            return min(60.0, max(1.0, min(known) / 1000)) if known else 1.0

    def ready(self) -> bool:
        return not self.closed and any(d.ready() for d in self.devices)

    def submit(self, arrays: Sequence[np.ndarray], *, slo_ms: float | None = None, policy: str | None = None,
               device: str | None = None, admission: Admission | None = None) -> Future:  # fmt: skip
        """Route one request (arrays already checked against the signature); the Future
        gives a `Routed`, or raises NoDeviceReady / RequestFailed. Raises Overloaded at
        once when the router is full (unless `admission` holds its place already).
        `device` restricts it to the devices that selector names (as
        `hxc.runtime.load(device=...)` takes it: a driver, family or artifact id)."""
        policies.policy(policy or self.policy)  # an unknown name is the caller's mistake, before a place is taken
        admission = admission or self.admit()
        try:
            arrays = list(arrays)
            rows = int(arrays[0].shape[0]) if self.batching else 1
            only = self.matching(device) if device else None
            only = self._able_for(arrays, only)
            future: Future = Future()
            req = _Request(arrays, rows, future, slo_ms if slo_ms is not None else self.slo_ms, policy or self.policy, only)
            with self.lock:
                if self.closed:
                    raise NoDeviceReady("the server is shutting down")
                if not any(d.ready() for d in self.devices if only is None or d.name in only):
                    raise NoDeviceReady(self._why_not_ready_locked(), self.retry_after_s())
                admission.used = True  # from here on the future's completion gives the place back
                future.add_done_callback(self._resolved)
                chosen = self._route_locked(req)
        finally:
            admission.release()
        if chosen is not None:
            chosen.dispatch_now()
        return future

    def _able_for(self, arrays: list[np.ndarray], only: frozenset[str] | None) -> frozenset[str] | None:
        """`only`, narrowed for a call where a dynamic dimension is 0 and the outputs are
        not empty by their shapes alone, to the devices whose driver runs it (Vulkan
        cannot: TargetFamily.empty_dispatch), when any of them may take it; else as is."""
        from hxc.engines.base import empty_at_run_time, empty_outputs
        from hxc.targets import family

        signature = self.workers.signature
        if not empty_at_run_time(signature, arrays) or empty_outputs(signature, arrays) is not None:
            return only
        able = frozenset(d.name for d in self.devices if family(d.candidate.artifact.family).empty_dispatch)
        return (able if only is None else only & able) or only

    def matching(self, selector: str) -> frozenset[str]:
        """The devices `selector` names; UsageError if none."""
        from hxc.errors import UsageError
        from hxc.runtime.select import matches_device

        names = frozenset(d.name for d in self.devices if matches_device(selector, d.candidate.device, d.candidate.artifact))
        if not names:
            raise UsageError(f"no device of this model matches {selector!r}; it has {', '.join(d.name for d in self.devices)}")
        return names

    def _resolved(self, _future: Future) -> None:
        with self.lock:
            self._outstanding -= 1

    def _route_locked(self, req: _Request) -> _Device | None:
        """Queue `req` on the device its policy ranks first (returned), or fail it (None)."""
        devices = [d for d in self.devices if d.ready() and d.name not in req.tried and (req.only is None or d.name in req.only)]
        if not devices:
            _fail(req.future, NoDeviceReady(self._why_not_ready_locked(req), self.retry_after_s()))
            return None
        request = policies.Request(req.rows, req.slo_ms)
        candidates = [policies.Candidate(d.name, d.estimate(req.rows), len(d.queue) + len(d.in_flight), d) for d in devices]
        best = policies.choose(req.policy, request, candidates)[0]
        if misses(request, best):
            req.slo_missed = True  # no device can meet it: the soonest takes it
        chosen: _Device = best.handle
        chosen.queue.append(req)
        chosen.wake.notify_all()
        return chosen

    def _reroute_locked(self, requests: list[_Request], device: str, why: str) -> None:
        for r in requests:
            r.tried.add(device)
            r.reroutes += 1
            r.alone = False
            if len(r.tried) >= MAX_TRIES:
                _fail(r.future, NoDeviceReady(f"failed on {len(r.tried)} devices; last: {why}"))
            else:
                self._route_locked(r)

    # --- state ----------------------------------------------------------------------

    def states(self) -> list[DeviceState]:
        out = []
        for d in self.devices:
            w = d.worker.stats()
            with self.lock:
                seconds = d.speed.seconds_for(1)
                out.append(DeviceState(
                    d.name, d.worker.device, w.health.value, w.reason, len(d.queue), sum(len(b) for b in d.in_flight),
                    d.counts["requests"], d.counts["batches"], d.counts["rerouted"], w.failures, w.restarts,
                    d.counts["busy_s"], d.since, seconds * 1000 if seconds else None, d.price_per_hour,
                ))  # fmt: skip
        return out

    def close(self) -> None:
        """Stop routing; requests still queued fail. The pool is the caller's to close."""
        with self.lock:
            self.closed = True
            stranded = [r for d in self.devices for r in d.queue]
            for d in self.devices:
                d.queue.clear()
                d.wake.notify_all()
        for r in stranded:
            _fail(r.future, NoDeviceReady("the server is shutting down"))
        for d in self.devices:
            d.thread.join(timeout=5)

    # --- internals --------------------------------------------------------------------

    def _worker_changed(self, worker: Worker) -> None:
        with self.lock:
            for d in self.devices:
                if d.worker is worker:
                    d.wake.notify_all()

    def _why_not_ready_locked(self, req: _Request | None = None) -> str:
        parts = []
        for d in self.devices:
            if req is not None and d.name in req.tried and d.ready():
                parts.append(f"{d.name}: failed this request")
            else:
                parts.append(f"{d.name}: {d.worker.health.value}" + (f" ({d.worker.reason})" if d.worker.reason else ""))
        return "no device is ready: " + "; ".join(parts)


def _seeded_speed(member, splittable: bool) -> Speed:
    """A device's speed before anything ran in this server: the single-stream and best
    offline profiles as two calls, so the fit of fixed cost + rate starts right (a
    pinned worker has fewer cores than the profile had: nothing). Without a batch to
    split, a unit is a whole request: the single-stream call."""
    speed = Speed()
    if member.worker.cpus:
        return speed
    cand = member.candidate
    profiles = (cand.latency, cand.throughput) if splittable else (cand.latency,)
    points = {(p.batch if splittable else 1, p.latency.p50_ms) for p in profiles if p is not None}
    for batch, p50 in sorted(points):
        speed.observe(batch, p50 / 1000)
    return speed


def _resolve(future: Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)

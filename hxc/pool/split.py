"""Splitting one batch, or one stream, across a bundle's worker processes: the job loop
behind `Pool.__call__` and `Pool.map`.

A call's requests become units (rows when the batch dimension is dynamic, whole
requests when it is not) that the devices pull as chunks from a shared queue; the
sizes and the end-of-call backup copies are decided by `schedule.Balancer`, the speeds
by `schedule.Speed`, from what each chunk measured. Outputs are written in place, in
the workers' reader threads, as chunks complete; a chunk a worker loses goes back to
the queue. `pool.py` holds the `Pool` around it (its calls, telemetry and the
judgement of which devices to leave out); `workers.py` the processes.

The balancing itself stays in `schedule.py`: it is pure arithmetic on chunks and
speeds, with no processes, so `simulate.py` and the scheduler's tests run it on
thousands of synthetic devices in milliseconds; this module is what drives it with
real workers.
"""

from __future__ import annotations

import bisect
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hxc.errors import HxcError
from hxc.pool.schedule import Balancer, Chunk, Overlap, Speed
from hxc.pool.worker import Inputs, RequestFailed, Worker, WorkerFailed
from hxc.pool.workers import SLOTS
from hxc.runtime.select import Candidate

if TYPE_CHECKING:
    from hxc.pool.pool import Pool


@dataclass
class SplitMember:
    """One device in the split: its worker, and the speeds and counts that the split
    and the pool's judgement keep of it."""

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
class Item:
    """One request of a call or stream: its inputs, where its units lie in the job's
    unit space, and its outputs as chunks complete."""

    arrays: list[np.ndarray]
    offset: int
    units: int
    as_torch: bool
    outputs: list[np.ndarray] | None = None
    written: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    done: int = 0



class Job:
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
        self.items: list[Item] = []  # read and not yet yielded
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
            item = Item(arrays, self.units, rows, bool(raw) and is_torch(raw[0]), outputs=outputs, written=np.zeros(rows, bool))
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

    def _submit(self, m: SplitMember, chunk: Chunk) -> None:
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

    def _segments(self, chunk: Chunk) -> list[tuple[Item, int, int]]:
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

    def _store(self, segments: list[tuple[Item, int, int]], views: list[np.ndarray]) -> bool:
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
        alive = [w for w in workers if w.may_serve]
        limit = 3 * len(workers)
        if not alive or self.failures > limit:
            why = "; ".join(dict.fromkeys(self.reasons)) or "; ".join(f"{w.name}: {w.reason}" for w in workers)
            raise HxcError(f"{self.pool.bundle}: every device of the pool failed ({self.failures} failures): {why}")

    # results

    def _result(self, item: Item) -> Any:
        from hxc.dtypes import to_torch
        from hxc.runtime.loader import rebuild

        outputs = item.outputs or []
        if self.flat:
            return outputs
        if item.as_torch:
            outputs = [to_torch(o, s.dtype) for o, s in zip(outputs, self.pool.signature.outputs)]
        return rebuild(self.pool.signature.output_tree, outputs)



"""A staged bundle (`hxc compile --stages`) run as a pipeline over worker processes.

    with Pipeline("model.hxc", ("cpu", "vulkan")) as pipe:     # stage 0 on the CPU, stage 1 on Vulkan
        y = pipe(x)                                           # one item, as the model returns it
        for y in pipe.map(items): ...                         # a stream: several in flight, in order
    Pipeline("model.hxc", ("cpu", "cpu"), pin=True)            # a worker per stage, one core each

Workers. `assignment` gives each stage a device (as `hxc.runtime.load(device=...)`
names one). The workers follow the rule the placement solver costs
(`hxc.runtime.placement.stage_workers`): each device gets one worker process holding
all its stages, which then run one after another there; with `pin`, each stage (or
each range in `ranges`) gets a worker of its own, and the workers on CPU-type devices
(the host CPU, software Vulkan) each get their own share of the cores, as the pool's
`pin="split"` does. A worker opens only its own stages' artifacts (`pipeline_child.py`).

From a placement: `load_pipeline(bundle, placement=..., pin=...)` places the stages as
`hxc.runtime.load` does (forced, else the solver's choice from the per-stage profiles,
else the best single device; `hxc.runtime.place`) and starts the pipeline on that
placement; `pipe.placement` and `pipe.explain()` say where and why. It is what
`hxc run` and `hxc bench` use for a placement across devices or with `--pin split`.

Transport. Every tensor lies in shared memory that the pipeline owns: for each item
slot (`in_flight` of them) a buffer per stage boundary that some worker range starts
or ends at. The caller writes an item's inputs into its slot's first buffer; the worker
of the first range reads them in place and writes its outputs into the buffer of the
boundary after its last stage; the next worker reads those in place; the caller reads
the last buffer. Between two workers the caller passes only a small control message
with offsets: no intermediate tensor goes through it. Buffers are handed to each
worker once (file descriptors over its socket) and grow when an item needs more.

Flow. Up to `in_flight` items are in the pipeline at once; an item is sent to the
next worker the moment the previous one answers, so with enough items in flight every
worker is busy. Results come back in submission order from `map`.

Failure. An item's inputs to a stage stay in its slot's buffer until the item leaves
the pipeline, and the buffers belong to the caller, so a worker that dies (or misses
its deadline, and is killed) loses nothing: it is replaced by a new process after a
back-off, and every item it held goes back to the start of its range there, in order.
Outputs are those of an undisturbed run. A worker that fails `max_restarts` times in
a row without finishing an item fails every item in the pipeline (WorkerFailed) and
the pipeline refuses new ones.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hxc.errors import ExitCode, HxcError, UsageError
from hxc.manifests.bundle import read_bundle, trust_policy
from hxc.manifests.schema import Manifest
from hxc.manifests.signing import TrustPolicy
from hxc.pool.channel import ALIGN, ArrayRef, Channel, ChannelClosed, SharedBuffer, layout, write_arrays
from hxc.pool.pipeline_child import BOOTSTRAP, PROTOCOL
from hxc.pool.worker import (CPU_ENV, Backoff, Deadlines, Health, RequestFailed, WorkerFailed, _exit_reason, _reap,
                             read_replies)
from hxc.pool.workers import load_options, split_cores
from hxc.runtime.placement import Pin, Ranges, pinned, stage_workers
from hxc.runtime.probe import HostProbe, probe_host
from hxc.runtime.place import StagePlan, plan_bundle
from hxc.runtime.select import Candidate, select

INTERVALS_KEPT = 10_000  # per worker: the busy intervals `stats()` reports


@dataclass(frozen=True)
class WorkerPlan:
    """One worker of a pipeline: a device and the ranges of stages it holds (first, last)."""

    name: str  # as the placement solver names the resource: `cpu`, or `cpu[0]` for a worker of its own
    device: str
    ranges: tuple[tuple[int, int], ...]
    cpus: tuple[int, ...] | None = None


def plan_workers(assignment: Sequence[str], *, pin: Pin = False, ranges: Ranges | None = None,
                 cpu_type: Sequence[bool] | None = None, cores: Sequence[int] | None = None) -> list[WorkerPlan]:  # fmt: skip
    """The workers for `assignment` (a device per stage), in the order of their first
    stage, by the rule the placement solver costs (`hxc.runtime.placement.stage_workers`):
    without `pin` one per device; with `pin` ("split" or True) one per stage, or per
    range of `ranges`, and the workers on CPU-type devices (`cpu_type[stage]`) each
    pinned to their share of `cores` (default: the cores this process may use). A
    one-line UsageError otherwise."""
    workers = stage_workers(assignment, pin, ranges)
    if not pinned(pin):
        return [WorkerPlan(w.name, w.device, w.ranges) for w in workers]
    kinds = list(cpu_type) if cpu_type is not None else [True] * len(assignment)
    on_cpu = [i for i, w in enumerate(workers) if kinds[w.ranges[0][0]]]
    available = list(cores) if cores is not None else sorted(os.sched_getaffinity(0))
    cpus = dict(zip(on_cpu, split_cores(len(on_cpu), available, "pipeline worker on a CPU-type device")))
    return [WorkerPlan(w.name, w.device, w.ranges, cpus.get(i)) for i, w in enumerate(workers)]


@dataclass(frozen=True)
class PipelineWorkerStats:
    name: str
    device: str  # the device's label, as the worker reported it
    ranges: tuple[tuple[int, int], ...]
    artifacts: tuple[str, ...]  # what it loaded: its stages' artifacts alone
    cpus: tuple[int, ...] | None
    health: Health
    reason: str | None  # why it failed, last
    pid: int | None
    calls: int  # ranges run (an item through one range is one call)
    busy_s: float  # the worker's own time in those calls
    device_s: float
    failures: int
    restarts: int
    # (start, end) of each call, time.monotonic() seconds as the worker measured them
    # (comparable with this process's), the last INTERVALS_KEPT.
    intervals: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class PipelineStats:
    items: int  # completed
    failed: int
    retried: int  # calls sent again to a replacement worker
    workers: tuple[PipelineWorkerStats, ...]

    def worker(self, name: str) -> PipelineWorkerStats:
        return next(w for w in self.workers if w.name == name or w.device == name)


@dataclass
class _Item:
    seq: int
    future: Future
    slot: int | None = None
    inputs: list[np.ndarray] | None = None  # until written into the slot's first buffer
    hop: int = 0  # index into the pipeline's path: the range it is at
    refs: dict[int, list] = field(default_factory=dict)  # boundary -> where its tensors lie
    sent_at: float = 0.0


@dataclass
class _Life:
    """One process of a worker."""

    number: int
    process: subprocess.Popen
    channel: Channel
    reader: threading.Thread | None = None
    sent_buffers: dict[tuple[int, int], int] = field(default_factory=dict)  # (slot, boundary) -> buffer id it holds
    sent: set[int] = field(default_factory=set)  # items sent to this process, not answered


@dataclass
class _Worker:
    index: int
    plan: WorkerPlan
    health: Health = Health.STOPPED
    reason: str | None = None
    life: _Life | None = None
    lives: int = 0
    held: dict[int, _Item] = field(default_factory=dict)  # items at one of its ranges (sent or not), by seq
    last_reply: float = 0.0
    ms: dict[int, float] = field(default_factory=dict)  # range's first stage -> measured ms per call
    consecutive: int = 0  # failures since the last completed call
    failures: int = 0
    restarts: int = 0
    calls: int = 0
    busy_s: float = 0.0
    device_s: float = 0.0
    intervals: collections.deque = field(default_factory=lambda: collections.deque(maxlen=INTERVALS_KEPT))
    ready_info: dict = field(default_factory=dict)
    load_exit_code: int | None = None
    timer: threading.Timer | None = None


class Pipeline:
    """The stages of a staged bundle over worker processes, one device per stage as
    `assignment` says (see the module's docstring). Called like the model: `pipe(x)`.

    `in_flight`: items in the pipeline at once (their slots' buffers are allocated once).
    `pin`, `ranges`: see `plan_workers`. `policy`, `precision`, `tolerance`: how each worker chooses
    its device's chain of stage artifacts, as `hxc.runtime.load` does. `placement`: the
    `StagePlan` that chose `assignment`, if one did (`explain()` shows it).
    `deadlines`, `backoff`, `max_restarts`: fault
    handling, as the pool's. `timeout_s`: the longest the caller waits for the next
    result before giving up with a one-line error. `trust`: what the bundle must prove
    (None: as $HXC_TRUSTED_KEYS and its siblings say), handed to every worker."""

    def __init__(
        self,
        bundle: str | os.PathLike[str],
        assignment: Sequence[str],
        *,
        pin: Pin = False,
        ranges: Ranges | None = None,
        in_flight: int = 4,
        precision: str | None = None,
        tolerance: float | None = None,
        policy: str = "latency",
        placement: StagePlan | None = None,
        deadlines: Deadlines = Deadlines(),
        backoff: Backoff = Backoff(first_s=0.0),
        max_restarts: int = 3,
        timeout_s: float = 600.0,
        start_timeout_s: float = 180.0,
        probe: HostProbe | None = None,
        env: dict[str, str] | None = None,
        trust: TrustPolicy | None = None,
    ) -> None:
        if in_flight < 1:
            raise UsageError(f"a pipeline needs in_flight >= 1, not {in_flight}")
        self.bundle = Path(bundle)
        self.trust = trust if trust is not None else trust_policy()
        self.manifest: Manifest = read_bundle(self.bundle, self.trust).manifest
        stages = self.manifest.stages
        if not stages:
            raise UsageError(f"{self.bundle} has no stages to run as a pipeline",
                             hint="compile it with `hxc compile ... --stages N`")  # fmt: skip
        assignment = tuple(assignment)
        if len(assignment) != len(stages):
            raise UsageError(f"the placement names {len(assignment)} stage(s); {self.bundle} has {len(stages)}")
        if placement is not None and placement.assignment != assignment:
            raise UsageError(f"the placement puts the stages on {', '.join(placement.assignment)}, "
                             f"not {', '.join(assignment)}")  # fmt: skip
        self.assignment = assignment
        self.placement = placement
        self.pin = pinned(pin)
        self.signature = self.manifest.signature
        probe = probe or probe_host()
        self._kind: dict[str, str] = {}
        self._chains: dict[str, Candidate] = {}
        for device in dict.fromkeys(assignment):
            sel = select(self.manifest, probe, policy=policy, device=device, precision=precision, tolerance=tolerance)
            if sel.best is None or not sel.best.stages:
                raise UsageError(f"no staged artifact of {self.bundle.name} can run on {device!r}",
                                 hint="; ".join(f"{r.artifact.id}: {r.reason}" for r in sel.rejected[:4]))  # fmt: skip
            self._kind[device] = sel.best.device.kind
            self._chains[device] = sel.best
        plans = plan_workers(assignment, pin=pin, ranges=ranges,
                             cpu_type=[self._kind[d] == "cpu" for d in assignment])  # fmt: skip
        self.in_flight = in_flight
        self.deadlines = deadlines
        self.backoff = backoff
        self.max_restarts = max_restarts
        self.timeout_s = timeout_s
        self._env = dict(env or {})
        self._load = {**load_options(self.trust), "policy": policy, "precision": precision, "tolerance": tolerance}
        self._workers = [_Worker(i, p) for i, p in enumerate(plans)]
        # The item's path: (worker, first, last) per range, in stage order.
        self._path = sorted(((w.index, a, b) for w in self._workers for a, b in w.plan.ranges), key=lambda r: r[1])
        self._stage_count = len(stages)
        # Bytes a boundary's tensors take at the manifest's example shapes: buffers start there.
        self._boundary_bytes = {0: _packed([t.bytes for t in stages[0].inputs])}
        for _, _, b in self._path:
            self._boundary_bytes[b + 1] = _packed([t.bytes for t in stages[b].outputs])
        from hxc.dtypes import dtype

        self._input_types = [dtype(t.dtype).numpy_dtype() for t in stages[0].inputs]
        self._output_types = [dtype(t.dtype).numpy_dtype() for t in stages[-1].outputs]
        self._lock = threading.Lock()
        self._buffers: dict[tuple[int, int], tuple[int, SharedBuffer]] = {}  # (slot, boundary) -> (id, buffer)
        self._buffer_ids = itertools.count(1)
        self._free_slots = list(range(in_flight))
        self._waiting: collections.deque[_Item] = collections.deque()  # submitted, no slot yet
        self._seq = itertools.count()
        self._counts = {"items": 0, "failed": 0, "retried": 0}
        self._broken: str | None = None
        self._closed = False
        self._changed = threading.Condition(self._lock)
        self._started = False
        try:
            self._start(start_timeout_s)
        except BaseException:
            self.close()
            raise

    # --- lifecycle -----------------------------------------------------------------

    def _start(self, timeout_s: float) -> None:
        with self._lock:
            for w in self._workers:
                self._spawn(w)
        deadline = time.monotonic() + timeout_s
        with self._changed:
            self._changed.wait_for(lambda: all(w.health != Health.STARTING for w in self._workers),
                                   max(0.0, deadline - time.monotonic()))  # fmt: skip
            bad = [w for w in self._workers if w.health != Health.READY]
            self._started = not bad  # from now on a failed worker is replaced (`_failed`)
        if bad:
            w = bad[0]
            error = WorkerFailed(f"{self.bundle.name}: pipeline worker {w.plan.name} "
                                 f"{w.reason or f'did not load within {timeout_s:g} s'}")  # fmt: skip
            if w.load_exit_code:
                error.exit_code = ExitCode(w.load_exit_code)
            raise error

    def close(self) -> None:
        """Stop every worker; items not finished fail with WorkerFailed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            lives = []
            for w in self._workers:
                if w.timer is not None:
                    w.timer.cancel()
                if w.life is not None:
                    lives.append(w.life)
                w.life = None
                w.health = Health.STOPPED
            failed = self._take_all_items()
            self._changed.notify_all()
        for item in failed:
            _fail(item.future, WorkerFailed("the pipeline was closed"))
        for life in lives:
            try:
                life.channel.send({"op": "stop"})
            except ChannelClosed:
                pass
        for life in lives:
            _reap(life.process, grace=2.0)
            life.channel.close()
            if life.reader is not None and life.reader is not threading.current_thread():
                life.reader.join(timeout=5)
        for _, buf in self._buffers.values():
            buf.close()
        self._buffers.clear()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<hxc pipeline {self.manifest.model.name!r}: {', '.join(w.plan.name for w in self._workers)}>"

    @property
    def workers(self) -> list[WorkerPlan]:
        return [w.plan for w in self._workers]

    @property
    def artifacts(self) -> tuple[str, ...]:
        """The artifact each stage runs (`cpu:host#s0`, `vulkan:spirv#s1`)."""
        return tuple(self._chains[d].stages[k].id for k, d in enumerate(self.assignment))

    @property
    def where(self) -> str:
        """`cpu:host#s0 on local-task: ... (worker cpu[0], cores 0), ...`: what runs where."""
        parts = []
        for w in self._workers:
            chain = self._chains[w.plan.device]
            stages = ", ".join(chain.stages[k].id for a, b in w.plan.ranges for k in range(a, b + 1))
            cores = f", cores {','.join(map(str, w.plan.cpus))}" if w.plan.cpus else ""
            parts.append(f"{stages} on {chain.device.label} (worker {w.plan.name}{cores})")
        return "; ".join(parts)

    def explain(self) -> str:
        """Where each stage runs and why (the placement, when one chose it), and the workers."""
        lines = [self.placement.explain()] if self.placement is not None else []
        lines.append(f"runs as a pipeline of {len(self._workers)} worker process(es)"
                     f"{' (pinned: a worker per stage)' if self.pin else ' (one per device)'}, "
                     f"{self.in_flight} item(s) in flight: {self.where}")  # fmt: skip
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """What `--json` reports of the pipeline: its workers, their stages, cores and artifacts."""
        return {"runner": "pipeline", "pin": self.pin, "in_flight": self.in_flight,
                "workers": [{"name": w.plan.name, "device": self._chains[w.plan.device].device.label,
                             "stages": [k for a, b in w.plan.ranges for k in range(a, b + 1)],
                             "artifacts": [self._chains[w.plan.device].stages[k].id
                                           for a, b in w.plan.ranges for k in range(a, b + 1)],
                             "cpus": list(w.plan.cpus) if w.plan.cpus else None} for w in self._workers]}  # fmt: skip

    def pid(self, worker: int | str) -> int | None:
        """The process id of a worker (by index or name): to watch it, or kill it in a test."""
        w = self._worker(worker)
        life = w.life
        return life.process.pid if life is not None else None

    def _worker(self, key: int | str) -> _Worker:
        if isinstance(key, int):
            return self._workers[key]
        found = [w for w in self._workers if key in (w.plan.name, w.plan.device)]
        if len(found) != 1:
            raise UsageError(f"the pipeline has {'several workers' if found else 'no worker'} named {key!r}",
                             hint=", ".join(w.plan.name for w in self._workers))  # fmt: skip
        return found[0]

    # --- calls ---------------------------------------------------------------------

    def submit(self, inputs: Sequence[Any]) -> Future:
        """Queue one item (the model's inputs); the Future gives its outputs, flat, as host
        arrays, or raises WorkerFailed / RequestFailed."""
        from hxc.runtime.loader import check_inputs

        arrays = check_inputs(self.signature, inputs)
        item = _Item(next(self._seq), Future(), inputs=arrays)
        with self._lock:
            if self._closed or self._broken:
                reason = "closed" if self._closed else f"broken: {self._broken}"
                raise WorkerFailed(f"the pipeline is {reason}")
            self._waiting.append(item)
            self._admit()
        return item.future

    def run_flat(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        return self._result(self.submit(inputs))

    def __call__(self, *inputs: Any) -> Any:
        """One item, returned as the model returns it (one array, or its tuple/dict);
        torch tensors in, torch tensors out, as `hxc.runtime.load`'s model."""
        from hxc.dtypes import is_torch, to_torch

        flat = self.run_flat(inputs)
        if inputs and type(inputs[0]) is not np.ndarray and is_torch(inputs[0]):
            flat = [to_torch(a, t.dtype) for a, t in zip(flat, self.signature.outputs)]
        return self._shaped(flat)

    def map(self, items: Iterable[Sequence[Any]]) -> Iterator[Any]:
        """Every item's outputs (as `__call__` returns them), in order; up to `in_flight`
        in the pipeline at once, and the next ones queued as results come back."""
        queued: collections.deque[Future] = collections.deque()
        source = iter(items)
        exhausted = False
        while True:
            while not exhausted and len(queued) < 2 * self.in_flight:
                try:
                    queued.append(self.submit(next(source)))
                except StopIteration:
                    exhausted = True
            if not queued:
                return
            yield self._shaped(self._result(queued.popleft()))

    def _shaped(self, flat: list[np.ndarray]) -> Any:
        from hxc.runtime.loader import rebuild

        tree = self.signature.output_tree
        return flat[tree.index] if tree.kind == "leaf" else rebuild(tree, flat)

    def _result(self, future: Future) -> list[np.ndarray]:
        try:
            return future.result(timeout=self.timeout_s)
        except TimeoutError:
            raise HxcError(f"the pipeline gave no result within {self.timeout_s:g} s",
                           hint=self.explain_workers()) from None  # fmt: skip

    def explain_workers(self) -> str:
        return "; ".join(f"{w.plan.name}: {w.health.value}" + (f" ({w.reason})" if w.reason else "") for w in self._workers)

    # --- internals (with the lock held unless noted) ---------------------------------

    def _admit(self) -> None:
        while self._waiting and self._free_slots and not self._broken:
            item = self._waiting.popleft()
            if item.future.done():  # cancelled while it waited
                continue
            item.slot = self._free_slots.pop(0)
            arrays, item.inputs = item.inputs, None
            assert arrays is not None
            try:
                refs, nbytes = layout([a.shape for a in arrays], [a.dtype.itemsize for a in arrays])
                buf = self._buffer(item.slot, 0, nbytes)
                write_arrays(buf, refs, arrays)
            except Exception as e:  # noqa: BLE001 - this item alone fails
                self._free_slots.append(item.slot)
                _fail(item.future, RequestFailed(f"could not write the inputs into shared memory: {e}"))
                continue
            item.refs[0] = [r.to_json() for r in refs]
            item.hop = 0
            self._hand(item)

    def _buffer(self, slot: int, boundary: int, nbytes: int = 0) -> SharedBuffer:
        """The slot's buffer for a boundary, of at least `nbytes`: a new one (with a new
        id, so every worker is sent it again) when the old one is too small."""
        held = self._buffers.get((slot, boundary))
        if held is not None and held[1].size >= nbytes:
            return held[1]
        if held is not None:
            held[1].close()  # the workers' mappings stay valid until they take the new one
        buf = SharedBuffer.at_least(max(nbytes, self._boundary_bytes.get(boundary, 0)))
        self._buffers[(slot, boundary)] = (next(self._buffer_ids), buf)
        return buf

    def _hand(self, item: _Item) -> None:
        """Give the item to the worker of its next range, and send it there if it can."""
        w = self._workers[self._path[item.hop][0]]
        w.held[item.seq] = item
        if w.life is not None and w.health == Health.READY:
            self._send(w, w.life, item)

    def _send(self, w: _Worker, life: _Life, item: _Item) -> None:
        _, first, last = self._path[item.hop]
        assert item.slot is not None
        self._buffer(item.slot, last + 1)
        fds, announced = [], []
        for boundary in (first, last + 1):
            buf_id, buf = self._buffers[(item.slot, boundary)]
            if life.sent_buffers.get((item.slot, boundary)) != buf_id:
                fds.append(buf.fd)
                announced.append([item.slot, boundary, buf.size])
                life.sent_buffers[(item.slot, boundary)] = buf_id
        message = {"op": "call", "id": item.seq, "first": first, "slot": item.slot, "inputs": item.refs[first],
                   "buffers": announced}  # fmt: skip
        item.sent_at = time.perf_counter()
        life.sent.add(item.seq)
        try:
            life.channel.send(message, fds)
        except ChannelClosed:
            pass  # the reader sees the same closed socket and replaces the worker

    def _spawn(self, w: _Worker) -> None:
        w.lives += 1
        w.timer = None
        w.health = Health.STARTING
        channel, theirs = Channel.pair()
        config = {"bundle": str(self.bundle), "device": w.plan.device, "ranges": [list(r) for r in w.plan.ranges],
                  "fd": theirs.fileno(), "protocol": PROTOCOL, "cpus": list(w.plan.cpus) if w.plan.cpus else None,
                  "load": self._load, "incarnation": w.lives}  # fmt: skip
        env = {**os.environ, **{k: "1" for k in CPU_ENV}, **self._env}
        if w.plan.cpus:
            env["LP_NUM_THREADS"] = str(len(w.plan.cpus))
        process = subprocess.Popen([sys.executable, "-c", BOOTSTRAP, json.dumps(config)], pass_fds=[theirs.fileno()],
                                   env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=None)  # fmt: skip
        theirs.close()
        life = _Life(w.lives, process, channel)
        life.reader = threading.Thread(target=self._read, args=(w, life), name=f"hxc-pipeline-{w.plan.name}", daemon=True)
        w.life = life
        life.reader.start()

    def _read(self, w: _Worker, life: _Life) -> None:
        """A worker process's reader thread (no lock held): its replies, its deadlines, its death."""
        try:
            message, _ = life.channel.receive(timeout=self.deadlines.load_s)
        except TimeoutError:
            self._failed(w, life, f"did not load within {self.deadlines.load_s:g} s")
            return
        except ChannelClosed:
            self._failed(w, life, f"died while loading ({_exit_reason(life.process)})")
            return
        if message.get("op") != "ready" or message.get("protocol") != PROTOCOL:
            w.load_exit_code = message.get("exit_code")
            self._failed(w, life, f"failed to load: {message.get('message', message)}")
            return
        with self._lock:
            if w.life is not life:
                return
            w.ready_info = message
            w.health = Health.READY
            w.last_reply = time.perf_counter()
            for item in sorted(w.held.values(), key=lambda i: i.seq):  # what its predecessor held, in order
                if w.life is life:
                    self._send(w, life, item)
            self._changed.notify_all()

        def handle(message: dict, fds: list[int]) -> bool:
            for fd in fds:  # a pipeline worker never sends buffers
                os.close(fd)
            return self._reply(w, life, message)

        read_replies(life.channel, life.process, lambda: self._next_deadline(w, life),
                     lambda reason: self._failed(w, life, reason), handle)  # fmt: skip

    def _next_deadline(self, w: _Worker, life: _Life) -> tuple[float, str | None]:
        with self._lock:
            if w.life is not life:
                return 0.0, None
            oldest = min((w.held[s] for s in life.sent if s in w.held), key=lambda i: i.sent_at, default=None)
            if oldest is None:
                return 0.5, None
            first = self._path[oldest.hop][1]
            expected = w.ms.get(first)
            allowance = self.deadlines.allowance(expected)
            left = max(oldest.sent_at, w.last_reply) + allowance - time.perf_counter()
        if left > 0:
            return min(left, 0.5), None
        return 0.0, f"missed its deadline: no answer after {allowance:.3g} s; killed"

    def _reply(self, w: _Worker, life: _Life, message: dict) -> bool:
        """Handle one reply; False when this process is no longer the worker's."""
        done: tuple[_Item, SharedBuffer] | None = None
        failed: tuple[_Item, Exception] | None = None
        with self._lock:
            if w.life is not life:
                return False
            now = time.perf_counter()
            w.last_reply = now
            item = w.held.get(message.get("id"))
            if item is None or item.seq not in life.sent:
                return True
            life.sent.discard(item.seq)
            op = message["op"]
            _, first, last = self._path[item.hop]
            if op == "grow":
                assert item.slot is not None
                self._buffer(item.slot, last + 1, int(message["need"]))
                self._send(w, life, item)
                return True
            del w.held[item.seq]
            if op == "error":
                error = RequestFailed(f"pipeline worker {w.plan.name}: {message['message']}")
                error.exit_code = ExitCode(message.get("exit_code", ExitCode.ERROR))
                failed = (item, error)
                self._counts["failed"] += 1
                self._release(item)
            else:
                start, end = float(message["start"]), float(message["end"])
                ms = (end - start) * 1000
                w.ms[first] = ms if first not in w.ms else 0.7 * w.ms[first] + 0.3 * ms
                w.calls += 1
                w.busy_s += end - start
                w.device_s += float(message["device_ms"]) / 1000
                w.intervals.append((start, end))
                w.consecutive = 0
                item.refs[last + 1] = message["outputs"]
                item.hop += 1
                if item.hop < len(self._path):
                    self._hand(item)
                else:
                    # Its slot is its own until released: the outputs are copied out
                    # without the lock, so the other workers' replies are not held up.
                    assert item.slot is not None
                    done = (item, self._buffers[(item.slot, self._stage_count)][1])
        if failed is not None:
            _fail(*failed)
        if done is not None:
            item, buf = done
            outputs = [buf.view(ArrayRef.from_json(r), t).copy()
                       for r, t in zip(item.refs[self._stage_count], self._output_types)]  # fmt: skip
            with self._lock:
                self._counts["items"] += 1
                if item.slot is not None:  # not taken back by close() meanwhile
                    self._release(item)
            if not item.future.done():
                item.future.set_result(outputs)
        return True

    def _release(self, item: _Item) -> None:
        assert item.slot is not None
        if item.slot not in self._free_slots:  # `_take_all_items` may have freed every slot meanwhile
            self._free_slots.append(item.slot)
        item.slot = None
        self._admit()

    def _failed(self, w: _Worker, life: _Life, reason: str) -> None:
        """A worker's process is gone or hung: kill it; its items stay with the worker and
        go to its replacement, unless it has failed too often."""
        if life.process.poll() is None:
            life.process.kill()
        _reap(life.process, grace=5.0)
        life.channel.close()
        doomed: list[_Item] = []
        with self._lock:
            if w.life is not life:
                return
            w.life = None
            w.reason = reason
            w.failures += 1
            w.consecutive += 1
            w.health = Health.UNHEALTHY
            self._counts["retried"] += len(life.sent)
            delay = self.backoff.delay(w.consecutive)
            if self._closed or not self._started:
                pass  # a worker that fails while the pipeline starts fails the start (`_start`)
            elif delay is None or w.consecutive > self.max_restarts:
                self._broken = f"pipeline worker {w.plan.name} {reason} ({w.consecutive} time(s) in a row)"
                doomed = self._take_all_items()
            else:
                w.timer = threading.Timer(delay, self._restart, args=(w,))
                w.timer.daemon = True
                w.timer.start()
            self._changed.notify_all()
        for item in doomed:
            _fail(item.future, WorkerFailed(f"the pipeline is broken: {self._broken}"))

    def _restart(self, w: _Worker) -> None:
        with self._lock:
            if self._closed or self._broken or w.health != Health.UNHEALTHY:
                return
            w.restarts += 1
            self._spawn(w)

    def _take_all_items(self) -> list[_Item]:
        items = {i.seq: i for w in self._workers for i in w.held.values()}
        items.update((i.seq, i) for i in self._waiting)
        for w in self._workers:
            w.held.clear()
        self._waiting.clear()
        for item in items.values():
            item.slot = None
        self._free_slots = list(range(self.in_flight))
        return sorted(items.values(), key=lambda i: i.seq)

    # --- telemetry ---------------------------------------------------------------

    def stats(self) -> PipelineStats:
        with self._lock:
            workers = tuple(
                PipelineWorkerStats(
                    w.plan.name, w.ready_info.get("device", w.plan.device), w.plan.ranges,
                    tuple(w.ready_info.get("artifacts", ())), w.plan.cpus, w.health,
                    w.reason, w.life.process.pid if w.life else None, w.calls, w.busy_s, w.device_s, w.failures,
                    w.restarts, tuple(w.intervals),
                )  # fmt: skip
                for w in self._workers
            )
            c = self._counts
            return PipelineStats(c["items"], c["failed"], c["retried"], workers)


def load_pipeline(bundle: str | os.PathLike[str], *, placement: str | Sequence[str] | StagePlan | None = None,
                  pin: Pin = False, device_memory: str | Mapping[str, int] | None = None, policy: str = "latency",
                  precision: str | None = None, tolerance: float | None = None, in_flight: int = 4,
                  probe: HostProbe | None = None, trust: TrustPolicy | None = None, **options: Any) -> Pipeline:  # fmt: skip
    """A staged bundle on a pipeline of worker processes, its stages placed as
    `hxc.runtime.load` places them: `placement` (`"0:cpu,1:vulkan"`, a device per stage,
    or a `StagePlan` already made, e.g. by `hxc.runtime.place.plan_bundle`), else the
    solver's choice from this host's per-stage profiles within `device_memory`, else the
    best single device; `pin` gives each stage a worker of its own, as the solver
    costs it. Call it like the model (`pipe(x)`, `pipe.map(items)`); `pipe.explain()`
    says where each stage runs and why. `options`: `Pipeline`'s others (deadlines...).

        with load_pipeline("staged.hxc", placement="0:cpu,1:cpu", pin="split") as pipe:
            y = pipe(x)
    """
    trust = trust if trust is not None else trust_policy()
    probe = probe or probe_host()
    if isinstance(placement, StagePlan):
        if pinned(pin) and not placement.pin:
            raise UsageError("the placement given was costed without pinning; make it with pin=True")
        plan: StagePlan | None = placement
    else:
        plan = plan_bundle(bundle, policy=policy, precision=precision, tolerance=tolerance, placement=placement,
                           device_memory=device_memory, pin=pin, trust=trust, probe=probe)  # fmt: skip
    if plan is None:
        raise UsageError(f"{bundle}: no staged chain of this bundle runs here to make a pipeline of",
                         hint="see `hxc select --explain`; a bundle without stages runs with hxc.runtime.load")  # fmt: skip
    return Pipeline(bundle, plan.assignment, pin=plan.pin, in_flight=in_flight, precision=precision, tolerance=tolerance,
                    policy=policy, placement=plan, probe=probe, trust=trust, **options)  # fmt: skip


def _packed(sizes: Sequence[int]) -> int:
    return sum(-(-n // ALIGN) * ALIGN for n in sizes)


def _fail(future: Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


def overlap_s(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]]) -> float:
    """Seconds during which both sets of busy intervals (each sorted, not overlapping
    itself) were busy at once: how much two pipeline workers worked in parallel."""
    total, j = 0.0, 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            total += max(0.0, min(end, b[k][1]) - max(start, b[k][0]))
            k += 1
    return total

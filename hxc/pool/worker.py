"""One device in its own process: the pool's lower layer, and what `hxc serve` routes to.

A `Worker` is the parent's handle on a worker process (`child.py`) that runs one
artifact on one device. `submit(inputs)` returns a Future; inputs go to the worker
through shared memory and outputs come back the same way (`channel.py`). The handle
knows its queue depth, the measured time per item, the caller's overhead beyond
device time, its health and the reason for it, and counts what it did.

IREE calls cannot be interrupted, and a device can hang (lavapipe does, on larger
models) or crash, so every request carries a deadline derived from the worker's
measured speed. A worker that misses one, dies, or is killed is stopped and marked
unhealthy with the reason; every request it held — running or queued — fails with
`WorkerFailed`, so the caller can re-route it, and none of them can complete later.
After a back-off the worker is restarted, and it is healthy again once it has loaded.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hxc.stats import latency_stats
from hxc.errors import ExitCode, HxcError
from hxc.manifests.schema import MAIN, FunctionSpec, LatencyStats, Signature, TensorSpec
from hxc.pool.channel import PROTOCOL, ArrayRef, Channel, ChannelClosed, SharedBuffer, layout, write_arrays

CPU_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class WorkerFailed(HxcError):
    """A worker crashed, was killed, missed a deadline, or is unhealthy: the request
    did not run to completion there and may be sent elsewhere."""


class RequestFailed(HxcError):
    """The worker ran the request and it failed (bad input, an IREE error); the worker
    itself is fine."""


class Health(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Deadlines:
    """How long a request may take before its worker is declared hung and killed:
    `factor` times what the worker's measured speed predicts, at least `floor_s`;
    `unmeasured_s` before anything is measured; `load_s` to start and load."""

    factor: float = 10.0
    floor_s: float = 5.0
    unmeasured_s: float = 120.0
    load_s: float = 180.0

    def allowance(self, expected_ms: float | None) -> float:
        if expected_ms is None:
            return self.unmeasured_s
        return max(self.floor_s, self.factor * expected_ms / 1000)


@dataclass(frozen=True)
class Backoff:
    """Restart delays after consecutive failures: first_s, then x factor, up to max_s.
    `first_s=None` never restarts."""

    first_s: float | None = 1.0
    factor: float = 2.0
    max_s: float = 60.0

    def delay(self, failures: int) -> float | None:
        if self.first_s is None:
            return None
        return min(self.max_s, self.first_s * self.factor ** max(0, failures - 1))


@dataclass(frozen=True)
class Result:
    """One finished request. `outputs` is None when a sink consumed them."""

    outputs: list[np.ndarray] | None
    rows: int
    device_ms: float  # the device call alone, as bench profiles measure it
    worker_ms: float  # everything the worker did for it (device copies included)
    overhead_ms: float | None  # what the caller paid beyond device_ms (None if it queued behind another)
    finish_reason: str | None = None  # a generate request's: stop, length, or cancelled


@dataclass(frozen=True)
class WorkerStats:
    """Counters since the worker handle was created, and its state now."""

    name: str
    artifact: str
    device: str
    health: Health
    reason: str | None  # why it is unhealthy (or was, last)
    pid: int | None
    cpus: tuple[int, ...] | None  # pinned to these, or None
    items: int  # rows (or whole requests, for inputs without a batch) completed
    requests: int
    busy_s: float  # worker time spent on completed requests
    device_s: float
    failures: int
    restarts: int
    queue_depth: int  # queued + running
    ms_per_item: float | None  # the measured estimate
    # What callers paid beyond device time (copies, checks, the process hop), over the
    # recent requests that found the worker idle; None until one has.
    overhead: LatencyStats | None
    since: float  # time.monotonic() when counting began


@dataclass(frozen=True)
class Inputs:
    """Inputs written straight into shared memory by `write(views)`, for callers that
    assemble a request from several sources (the pool's chunks of many items)."""

    shapes: tuple[tuple[int, ...], ...]
    write: Callable[[list[np.ndarray]], None]


Sink = Callable[[list[np.ndarray]], None]


@dataclass
class _Request:
    id: int
    inputs: Sequence[np.ndarray] | Inputs
    rows: int
    sink: Sink | None
    future: Future
    expected_ms: float | None = None
    slot: int | None = None
    dispatched: float = 0.0
    idle_at_dispatch: bool = False
    op: str = "call"  # call | open | drop | export | import (see hxc.pool.child)
    function: str = MAIN
    state: str | None = None  # the state reference the request reads, writes, or moves
    names: tuple[str, ...] = ()  # state values moved by export/import, in order
    on_part: Sink | None = None  # parts of a reply that comes in several (streaming)
    params: dict[str, Any] | None = None  # a generate request's sampling and limits
    on_tokens: Callable[[list[int]], None] | None = None  # a generate request's tokens, as they come


@dataclass
class _Incarnation:
    number: int
    process: subprocess.Popen
    channel: Channel
    reader: threading.Thread | None = None
    inputs: dict[int, SharedBuffer] = field(default_factory=dict)  # slot -> ours
    outputs: dict[int, SharedBuffer] = field(default_factory=dict)  # slot -> the worker's


class Worker:
    """A worker process running `artifact` of `bundle` on one device.

    `cpus` pins it: its process affinity, IREE's task topology (CPU devices) and
    LP_NUM_THREADS (Mesa's lavapipe) all get those cores. `slots` requests may be in
    the worker at once, so it never waits for the next one to arrive."""

    def __init__(
        self,
        bundle: str | os.PathLike[str],
        artifact: str,
        device: str,
        signature: Signature | None,
        *,
        functions: dict[str, FunctionSpec] | None = None,
        cpus: Sequence[int] | None = None,
        deadlines: Deadlines = Deadlines(),
        backoff: Backoff = Backoff(),
        slots: int = 2,
        ms_per_item: float | None = None,
        env: dict[str, str] | None = None,
        name: str | None = None,
        on_change: Callable[[Worker], None] | None = None,
        load_options: dict[str, Any] | None = None,
    ) -> None:
        self.bundle = Path(bundle)
        self.artifact = artifact
        self.device = device
        self.signature = signature
        # Every entry point the worker can call (`main` alone for a plain model) and the
        # state they keep, by name: what requests are laid out by.
        self.functions = functions or {MAIN: FunctionSpec(signature)}  # type: ignore[arg-type]
        self.state_specs = {s.name: s for f in self.functions.values() for s in f.states}
        self.state_bytes = 0  # device memory the worker's states hold, as it last reported
        self.cpus = tuple(cpus) if cpus else None
        self.deadlines = deadlines
        self.backoff = backoff
        self.name = name or f"{artifact} on {device}"
        self._slots = slots
        self._env = env or {}
        self._load_options = load_options or {}  # more keyword arguments for hxc.runtime.load
        self._on_change = on_change
        self._lock = threading.Lock()
        self._pending: collections.deque[_Request] = collections.deque()
        self._running: dict[int, _Request] = {}  # in the worker, oldest first
        self._free_slots = list(range(slots))
        self._unsent: list[tuple[Future, Exception]] = []  # failed while sending, to fail outside the lock
        self._next_id = 0
        self._health = Health.STOPPED
        self._reason: str | None = None
        self._life: _Incarnation | None = None
        self._incarnations = 0
        self._consecutive_failures = 0
        self._restart_timer: threading.Timer | None = None
        self._changed = threading.Condition(self._lock)  # notified on every health change
        self._last_reply = 0.0
        self._ms_per_item = ms_per_item  # a prior (from profiles) until measured here
        self._measured = False
        self._overheads: collections.deque[float] = collections.deque(maxlen=1000)
        self._counts = {"items": 0, "requests": 0, "busy_s": 0.0, "device_s": 0.0, "failures": 0, "restarts": 0}
        self._since = time.monotonic()
        self._closed = False
        self.load_exit_code: int | None = None  # the HxcError exit code of the last failed load
        self.ready_info: dict = {}  # what the worker said when it became ready (pid, load time, threads)

    # --- lifecycle ---------------------------------------------------------------

    def start(self) -> Worker:
        """Start the process (returns at once; `wait_ready` waits for it to load)."""
        with self._lock:
            if self._closed or self._health in (Health.STARTING, Health.READY):
                return self
            self._spawn()
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the worker is ready (True), or failed with no restart coming, or
        `timeout` passes (False)."""
        with self._changed:
            self._changed.wait_for(lambda: self._health == Health.READY or self._closed or (
                self._health == Health.UNHEALTHY and self._restart_timer is None), timeout)  # fmt: skip
            return self._health == Health.READY

    def close(self) -> None:
        """Stop the worker; requests still queued fail with WorkerFailed."""
        with self._lock:
            self._closed = True
            if self._restart_timer:
                self._restart_timer.cancel()
            life, self._life = self._life, None
            failed = self._take_all()
            self._set_health(Health.STOPPED, self._reason)
        for req in failed:
            _fail_future(req.future, WorkerFailed(f"{self.name}: the pool was closed"))
        if life is not None:
            try:
                life.channel.send({"op": "stop"})
            except ChannelClosed:
                pass
            _reap(life.process, grace=2.0)
            life.channel.close()
            if life.reader and life.reader is not threading.current_thread():
                life.reader.join(timeout=5)
            for buf in (*life.inputs.values(), *life.outputs.values()):
                buf.close()
        self._notify()

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- requests ----------------------------------------------------------------

    def submit(
        self, inputs: Sequence[np.ndarray] | Inputs, *, rows: int | None = None, sink: Sink | None = None,
        function: str = MAIN, state: str | None = None, on_part: Sink | None = None,
    ) -> Future:
        """Queue one request; the Future gives a `Result`, or raises WorkerFailed (the
        worker failed: send it elsewhere) or RequestFailed (the request itself failed).

        `rows` is how many items the request holds (for the speed estimate; default:
        dimension 0 of the first input). With `sink`, outputs are handed to
        `sink(views)` in shared memory, valid only during the call, instead of copied.
        `function` names the entry point; `state` a state the worker holds (`open_state`),
        which the call reads and replaces on the worker's device."""
        if function not in self.functions:
            raise RequestFailed(f"{self.name}: the model has no function {function!r}")
        if rows is None:
            shapes = inputs.shapes if isinstance(inputs, Inputs) else [a.shape for a in inputs]
            rows = int(shapes[0][0]) if shapes and shapes[0] else 1
        return self._queue(_Request(0, inputs, rows, sink, Future(), function=function, state=state, on_part=on_part))

    def generate(self, prompt: Sequence[int], params: dict[str, Any], on_tokens: Callable[[list[int]], None]) -> Future:
        """Generate after `prompt` (token ids) on a language model's worker, batched with
        the worker's other sequences (`hxc.runtime.batching`). `params`: max_new_tokens,
        temperature, top_k, top_p, seed, stop_token_ids (None: the model's). Tokens go
        to `on_tokens(tokens)` as each step chooses them (in the worker's reader thread);
        the Future gives a `Result` with `finish_reason` once the sequence ends, or
        raises as `submit`'s does. `cancel(future)` stops it."""
        ids = np.asarray(prompt, np.int32).reshape(-1)
        return self._queue(_Request(0, [ids], 1, None, Future(), op="generate", params=dict(params), on_tokens=on_tokens))

    def cancel(self, future: Future) -> None:
        """Stop the generate request of `future`: one not sent yet ends at once, a running
        one as soon as the worker reads this (its Future then gives finish_reason
        "cancelled"). Nothing happens for a request that has finished."""
        with self._lock:
            waiting = next((r for r in self._pending if r.future is future), None)
            if waiting is not None:
                self._pending.remove(waiting)
            running = next((r for r in self._running.values() if r.future is future), None)
            life = self._life
            if running is not None and life is not None:
                try:
                    life.channel.send({"op": "cancel", "id": running.id})
                except ChannelClosed:
                    pass  # the reader fails it with the rest
        if waiting is not None and not future.done():
            future.set_result(Result(None, waiting.rows, 0.0, 0.0, None, "cancelled"))

    def open_state(self, ref: str) -> Future:
        """Allocate every state of the model on the worker's device, zero, as `ref`."""
        return self._queue(_Request(0, (), 0, None, Future(), op="open", state=ref))

    def drop_state(self, ref: str) -> Future:
        """Free state `ref` on the worker's device."""
        return self._queue(_Request(0, (), 0, None, Future(), op="drop", state=ref))

    def export_state(self, ref: str) -> Future:
        """State `ref` copied to the host: the Future's `Result.outputs` in the order of
        `state_specs` (see `state_arrays`), to import into another worker."""
        return self._queue(_Request(0, (), 0, None, Future(), op="export", state=ref, names=tuple(self.state_specs)))

    def import_state(self, ref: str, arrays: dict[str, np.ndarray]) -> Future:
        """Host arrays (another worker's `export_state`) copied to this worker's device as `ref`."""
        names = tuple(arrays)
        if unknown := [n for n in names if n not in self.state_specs]:
            raise RequestFailed(f"{self.name}: the model keeps no state {', '.join(unknown)}")
        return self._queue(_Request(0, [arrays[n] for n in names], 0, None, Future(), op="import", state=ref, names=names))

    def state_arrays(self, result: Result) -> dict[str, np.ndarray]:
        """An export's outputs by state name."""
        assert result.outputs is not None
        return dict(zip(self.state_specs, result.outputs))

    def _queue(self, req: _Request) -> Future:
        future = req.future
        with self._lock:
            refused = self._health in (Health.UNHEALTHY, Health.STOPPED) or self._closed
            if not refused:
                self._next_id += 1
                req.id = self._next_id
                self._pending.append(req)
                self._pump()
            state = f"{self._health.value}" + (f": {self._reason}" if self._reason else "")
        # Futures complete outside the lock: their callbacks may call back into this worker.
        if refused:
            _fail_future(future, WorkerFailed(f"{self.name} is {state}"))
        self._flush()
        return future

    def run(self, inputs: Sequence[np.ndarray], timeout: float | None = None) -> list[np.ndarray]:
        """Submit and wait: outputs as host arrays."""
        result = self.submit(inputs).result(timeout)
        assert result.outputs is not None
        return result.outputs

    # --- state -------------------------------------------------------------------

    @property
    def health(self) -> Health:
        return self._health

    @property
    def reason(self) -> str | None:
        return self._reason

    @property
    def restart_pending(self) -> bool:
        return self._restart_timer is not None

    @property
    def may_serve(self) -> bool:
        """Ready, starting, or with a restart on its way: not gone for good."""
        return self._health in (Health.READY, Health.STARTING) or self.restart_pending

    @property
    def queue_depth(self) -> int:
        return len(self._pending) + len(self._running)

    @property
    def ms_per_item(self) -> float | None:
        """Measured worker milliseconds per item (the prior until something ran here)."""
        return self._ms_per_item

    @property
    def measured(self) -> bool:
        return self._measured

    def expected_ms(self, rows: int) -> float | None:
        return None if self._ms_per_item is None else self._ms_per_item * rows

    def expected_wait_ms(self) -> float | None:
        """How long a request submitted now would wait before it starts: queue depth x
        measured latency, the number `hxc serve` routes by."""
        with self._lock:
            rows = sum(r.rows for r in (*self._running.values(), *self._pending))
        return self.expected_ms(rows) if rows else 0.0

    def stats(self) -> WorkerStats:
        with self._lock:
            overheads = list(self._overheads)
            c = self._counts
            life = self._life
            return WorkerStats(
                self.name, self.artifact, self.device, self._health, self._reason,
                life.process.pid if life else None, self.cpus, c["items"], c["requests"], c["busy_s"], c["device_s"],
                c["failures"], c["restarts"], self.queue_depth, self._ms_per_item,
                latency_stats(overheads) if overheads else None, self._since,
            )  # fmt: skip

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send the worker process a signal (tests, and `hxc serve`'s drain)."""
        life = self._life
        if life is not None and life.process.poll() is None:
            os.kill(life.process.pid, sig)

    @property
    def pid(self) -> int | None:
        life = self._life
        return life.process.pid if life else None

    # --- internals (called with the lock held unless noted) ------------------------

    def _spawn(self) -> None:
        from hxc.pool.child import BOOTSTRAP

        self._incarnations += 1
        self._restart_timer = None
        self._set_health(Health.STARTING, self._reason)
        channel, theirs = Channel.pair()
        config = {"bundle": str(self.bundle), "artifact": self.artifact, "fd": theirs.fileno(), "protocol": PROTOCOL,
                  "cpus": list(self.cpus) if self.cpus else None, "incarnation": self._incarnations,
                  "load": self._load_options}  # fmt: skip
        env = {**os.environ, **{k: "1" for k in CPU_ENV}, **self._env}
        if self.cpus:
            env["LP_NUM_THREADS"] = str(len(self.cpus))
        process = subprocess.Popen(
            [sys.executable, "-c", BOOTSTRAP, json.dumps(config)], pass_fds=[theirs.fileno()], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=None,
        )  # fmt: skip
        theirs.close()
        life = _Incarnation(self._incarnations, process, channel)
        life.reader = threading.Thread(target=self._read, args=(life,), name=f"hxc-worker-{self.artifact}", daemon=True)
        self._life = life
        life.reader.start()

    def _pump(self) -> None:
        """Send queued requests while the worker has free slots."""
        life = self._life
        while self._pending and self._free_slots and self._health == Health.READY and life is not None:
            req = self._pending.popleft()
            req.slot = self._free_slots.pop(0)
            req.idle_at_dispatch = not self._running
            req.dispatched = time.perf_counter()
            # A generate request replies at every step, however long it runs: each reply restarts
            # its deadline, so it gets the allowance of a request whose time is unknown.
            req.expected_ms = self.expected_ms(req.rows) if req.op != "generate" else None
            try:
                self._send(life, req)
            except ChannelClosed:
                # The reader sees the same closed socket and fails everything, this included.
                self._running[req.id] = req
                return
            except Exception as e:  # noqa: BLE001 - e.g. inputs that do not fit their declared shapes
                self._free_slots.append(req.slot)
                self._unsent.append((req.future, RequestFailed(f"{self.name}: {e}")))
                continue
            self._running[req.id] = req

    def _send(self, life: _Incarnation, req: _Request) -> None:
        from hxc.dtypes import dtype

        specs = self._input_specs(req)
        dtypes = [dtype(s.dtype).numpy_dtype() for s in specs]
        shapes = req.inputs.shapes if isinstance(req.inputs, Inputs) else tuple(a.shape for a in req.inputs)
        refs, nbytes = layout(shapes, [d.itemsize for d in dtypes])
        slot = req.slot
        assert slot is not None
        fds: list[int] = []
        buf = life.inputs.get(slot)
        if buf is None or buf.size < nbytes:
            if buf is not None:
                buf.close()
            buf = life.inputs[slot] = SharedBuffer.at_least(nbytes)
            fds = [buf.fd]
        views = [buf.view(r, d) for r, d in zip(refs, dtypes)]
        if isinstance(req.inputs, Inputs):
            req.inputs.write(views)
        else:
            write_arrays(buf, refs, [np.asarray(a, d) for a, d in zip(req.inputs, dtypes)])
        del views
        message = {"op": req.op, "id": req.id, "slot": slot, "size": buf.size, "function": req.function, "state": req.state,
                   "names": list(req.names), "inputs": [r.to_json() for r in refs]}  # fmt: skip
        if req.params is not None:
            message["params"] = req.params
        life.channel.send(message, fds)

    def _input_specs(self, req: _Request) -> Sequence[Any]:
        if req.op == "call":
            return self.functions[req.function].signature.inputs
        if req.op == "generate":
            return [TensorSpec("prompt", "i32", ("n",))]
        return [self.state_specs[n].tensor() for n in req.names] if req.op == "import" else ()

    def _output_specs(self, req: _Request) -> Sequence[Any]:
        if req.op == "call":
            return self.functions[req.function].signature.outputs
        return [self.state_specs[n].tensor() for n in req.names] if req.op == "export" else ()

    def _read(self, life: _Incarnation) -> None:
        """The incarnation's reader thread (no lock held): waits for replies, enforces
        deadlines, notices death."""
        try:
            message, _ = life.channel.receive(timeout=self.deadlines.load_s)
        except TimeoutError:
            self._fail(life, f"did not load within {self.deadlines.load_s:g} s")
            return
        except ChannelClosed:
            self._fail(life, f"died while loading ({_exit_reason(life.process)})")
            return
        if message.get("op") == "ready" and message.get("protocol") != PROTOCOL:
            self._fail(life, f"speaks worker protocol {message.get('protocol')}; this hxc speaks {PROTOCOL}")
            return
        if message.get("op") != "ready":
            # An expected failure (integrity, no compatible artifact) keeps its exit code.
            self.load_exit_code = message.get("exit_code")
            self._fail(life, f"failed to load: {message.get('message', message)}")
            return
        with self._lock:
            if self._life is not life:
                return
            self.ready_info = message
            self._last_reply = time.perf_counter()
            self._set_health(Health.READY, self._reason)
            self._pump()
        self._flush()
        self._notify()

        def handle(message: dict, fds: list[int]) -> bool:
            self._complete(life, message, fds)
            return self._life is life

        read_replies(life.channel, life.process, self._next_deadline, lambda reason: self._fail(life, reason), handle)

    def _next_deadline(self) -> tuple[float, str | None]:
        """(seconds to wait for a reply, or a reason if the oldest request is overdue)."""
        with self._lock:
            if not self._running:
                return 0.5, None  # idle: look again soon, a request may be sent meanwhile
            req = next(iter(self._running.values()))
            started = max(req.dispatched, self._last_reply)  # it waited for the one before it
            allowance = self.deadlines.allowance(req.expected_ms)
            left = started + allowance - time.perf_counter()
        if left > 0:
            return min(left, 0.5), None
        expected = f"; expected {req.expected_ms:.0f} ms" if req.expected_ms is not None else ""
        return 0.0, f"missed its deadline: no answer after {allowance:.3g} s for {req.rows} item(s){expected}; killed"

    def _complete(self, life: _Incarnation, message: dict, fds: list[int]) -> None:
        now = time.perf_counter()
        if "state_bytes" in message:
            self.state_bytes = int(message["state_bytes"])
        if message.get("more"):  # one part of a reply in several: the request goes on
            self._part(life, message, fds)
            return
        with self._lock:
            req = self._running.pop(message.get("id"), None)
            if req is None or self._life is not life:
                for fd in fds:
                    os.close(fd)
                return
            self._adopt_outputs(life, req, message, fds)
            self._last_reply = now
        error: Exception | None = None
        result = None
        if message["op"] == "error":
            error = RequestFailed(f"{self.name}: {message['message']}")
            # A usage mistake the loader found (an input beyond an artifact's range) keeps its code.
            error.exit_code = ExitCode(message.get("exit_code", ExitCode.ERROR))
        else:
            try:
                result = self._deliver(life, req, message, now)
            except Exception as e:  # noqa: BLE001 - a sink's failure belongs to its request
                error = e
        with self._lock:
            self._free_slots.append(req.slot)
            if result is not None:
                self._account(req, result, message)
            self._pump()
        self._flush()
        if error is not None:
            _fail_future(req.future, error)
        elif not req.future.done():  # a caller may have cancelled it meanwhile
            req.future.set_result(result)

    def _deliver(self, life: _Incarnation, req: _Request, message: dict, received: float) -> Result:
        if req.on_tokens is not None:
            if message.get("tokens"):
                req.on_tokens(message["tokens"])
            self._consecutive_failures = 0
            return Result(None, req.rows, float(message["device_ms"]), float(message["worker_ms"]), None,
                          message.get("finish_reason"))  # fmt: skip
        views = self._output_views(life, req, message)
        if req.sink is not None:
            req.sink(views)
            outputs = None
        else:
            outputs = [v.copy() for v in views]
        del views
        device_ms = float(message["device_ms"])
        overhead = (time.perf_counter() - req.dispatched) * 1000 - device_ms if req.idle_at_dispatch else None
        return Result(outputs, req.rows, device_ms, float(message["worker_ms"]), overhead)

    def _part(self, life: _Incarnation, message: dict, fds: list[int]) -> None:
        """A part of a streamed reply: its outputs, in the worker's buffer for the slot
        (sent with it when new), handed to the request's `on_part` before the next is read."""

        with self._lock:
            req = self._running.get(message.get("id"))
            if req is None or self._life is not life:
                for fd in fds:
                    os.close(fd)
                return
            self._adopt_outputs(life, req, message, fds)
            self._last_reply = time.perf_counter()  # a part is progress: the deadline restarts
        if req.on_tokens is not None:
            req.on_tokens(message.get("tokens", []))
        elif req.on_part is not None:
            req.on_part(self._output_views(life, req, message))

    @staticmethod
    def _adopt_outputs(life: _Incarnation, req: _Request, message: dict, fds: list[int]) -> None:
        """The worker's buffer for the request's slot: replaced when the reply hands over a
        new (larger) one. Called with the lock held."""
        assert req.slot is not None
        if fds:
            old = life.outputs.get(req.slot)
            if old is not None:
                old.close()
            life.outputs[req.slot] = SharedBuffer(message["size"], fds[0])

    def _output_views(self, life: _Incarnation, req: _Request, message: dict) -> list[np.ndarray]:
        """The reply's outputs, viewed in place in the worker's buffer for the slot."""
        from hxc.dtypes import dtype

        assert req.slot is not None
        buf = life.outputs[req.slot]
        return [buf.view(ArrayRef.from_json(r), dtype(s.dtype).numpy_dtype())
                for r, s in zip(message["outputs"], self._output_specs(req))]  # fmt: skip

    def _account(self, req: _Request, result: Result, message: dict) -> None:
        if req.op != "call":
            return  # state bookkeeping says nothing of the device's speed
        c = self._counts
        c["items"] += req.rows
        c["requests"] += 1
        c["busy_s"] += result.worker_ms / 1000
        c["device_s"] += result.device_ms / 1000
        per_item = result.worker_ms / max(1, req.rows)
        # A moving average that forgets the prior fast and noise slowly.
        self._ms_per_item = per_item if not self._measured else 0.7 * self._ms_per_item + 0.3 * per_item  # type: ignore[operator]
        self._measured = True
        if result.overhead_ms is not None:
            self._overheads.append(max(0.0, result.overhead_ms))
        self._consecutive_failures = 0

    def _fail(self, life: _Incarnation, reason: str) -> None:
        """Stop this incarnation for good, fail everything it held, schedule a restart."""
        if life.process.poll() is None:
            life.process.kill()
        _reap(life.process, grace=5.0)
        with self._lock:
            if self._life is not life:
                return
            self._life = None
            failed = self._take_all()
            self._counts["failures"] += 1
            self._consecutive_failures += 1
            self._set_health(Health.UNHEALTHY, reason)
            delay = None if self._closed else self.backoff.delay(self._consecutive_failures)
            if delay is not None:
                self._restart_timer = threading.Timer(delay, self._restart)
                self._restart_timer.daemon = True
                self._restart_timer.start()
        life.channel.close()
        for buf in (*life.inputs.values(), *life.outputs.values()):
            buf.close()
        for req in failed:
            _fail_future(req.future, WorkerFailed(f"{self.name} {reason}"))
        self._notify()

    def _restart(self) -> None:
        with self._lock:
            if self._closed or self._health != Health.UNHEALTHY:
                return
            self._counts["restarts"] += 1
            self._spawn()
        self._notify()

    def _flush(self) -> None:
        """Fail the requests `_pump` could not send (called without the lock)."""
        with self._lock:
            unsent, self._unsent = self._unsent, []
        for future, error in unsent:
            _fail_future(future, error)

    def _take_all(self) -> list[_Request]:
        failed = [*self._running.values(), *self._pending]
        self._running.clear()
        self._pending.clear()
        self._free_slots = list(range(self._slots))
        return failed

    def _set_health(self, health: Health, reason: str | None) -> None:
        self._health = health
        self._reason = reason
        self._changed.notify_all()

    def _notify(self) -> None:
        if self._on_change is not None:
            self._on_change(self)


def read_replies(channel: Channel, process: subprocess.Popen, next_deadline: Callable[[], tuple[float, str | None]],
                 fail: Callable[[str], None], handle: Callable[[dict, list[int]], bool]) -> None:  # fmt: skip
    """A reader thread's loop over a worker process's replies: `handle(message, fds)`
    each (False: stop reading); `fail(reason)` and stop when `next_deadline()` says the
    oldest request is overdue (its second item) or the process is gone. Between
    replies it waits at most the seconds `next_deadline()` gives."""
    while True:
        timeout, overdue = next_deadline()
        if overdue is not None:
            fail(overdue)
            return
        try:
            message, fds = channel.receive(timeout=timeout)
        except TimeoutError:
            continue
        except ChannelClosed:
            fail(_exit_reason(process))
            return
        if not handle(message, fds):
            return


def _fail_future(future: Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


def _reap(process: subprocess.Popen, grace: float) -> None:
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _exit_reason(process: subprocess.Popen) -> str:
    try:
        code = process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return "closed its connection"
    if code < 0:
        name = signal.Signals(-code).name
        return f"was killed by {name}" if -code in (signal.SIGKILL, signal.SIGTERM) else f"crashed ({name})"
    return f"exited with code {code}"


@dataclass(frozen=True)
class IsolatedRun:
    outputs: list[np.ndarray]
    artifact: str  # what the worker chose and ran
    device: str


def run_isolated(
    bundle: str | os.PathLike[str],
    artifact: str,
    inputs: Sequence[np.ndarray],
    *,
    timeout_s: float = 120.0,
    load_options: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> IsolatedRun:
    """Run `artifact` of `bundle` once on `inputs` in a throwaway worker process, so a
    crash inside IREE (a segfault) comes back as a one-line WorkerFailed instead of
    taking the caller down. `artifact` is anything `hxc.runtime.load(device=...)`
    takes ("" lets the worker choose); `load_options` are load's other arguments."""
    with isolated_worker(bundle, artifact, timeout_s=timeout_s, load_options=load_options, env=env) as w:
        outputs = w.run(inputs)
        return IsolatedRun(outputs, w.ready_info["artifact"], w.ready_info["device"])


@contextlib.contextmanager
def isolated_worker(
    bundle: str | os.PathLike[str],
    artifact: str,
    *,
    timeout_s: float = 120.0,
    load_options: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Worker]:
    """A throwaway worker process with `artifact` of `bundle` loaded and ready, for
    several runs (`Worker.run`, each within `timeout_s`) of one loaded model; it never
    restarts, so a crash fails the run it happened in and every later one."""
    from hxc.manifests import read_manifest

    manifest = read_manifest(bundle, profiles=False)  # the signature; the worker's load() reads the profiles
    # Every run gets the whole `timeout_s`: runs of one worker may differ in size (a
    # longer sequence), so the first one's speed predicts nothing for the next.
    deadlines = Deadlines(floor_s=timeout_s, unmeasured_s=timeout_s, load_s=timeout_s)
    worker = Worker(bundle, artifact, "its device", manifest.signature if manifest.stateless_main else None,
                    functions=manifest.functions, deadlines=deadlines, backoff=Backoff(None), slots=1,
                    name=artifact or "the bundle", env=env, load_options=load_options)  # fmt: skip
    with worker as w:
        if not w.wait_ready(timeout_s + 5):
            error = WorkerFailed(f"{w.name} {w.reason or 'did not start'}")
            if w.load_exit_code:
                error.exit_code = ExitCode(w.load_exit_code)
            raise error
        yield w

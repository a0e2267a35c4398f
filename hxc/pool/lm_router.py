"""Generation requests routed across a language model's devices: what `hxc serve` runs
its OpenAI and generate endpoints on.

Each device's worker process batches its sequences continuously (`hxc.pool.child`,
`hxc.runtime.batching`): a sequence takes one of the cache's slots, joins the next
decode step, and leaves it when it ends. `LMRouter` sits above the workers and decides
which sequence runs where and when:

- **admission by KV cache**: each device has a budget of cached tokens (its whole
  cache, `slots x max_context`, or less with `kv_cache_bytes`); a sequence is sent to a
  device with a free slot whose cached tokens plus its prompt (and a little headroom)
  fit, the one with the most room first. Sequences no device can take now wait in
  order; beyond `max_queue` waiting, `submit` raises `Overloaded` with a retry-after.
- **preemption**: as sequences grow, a device's cached tokens may pass its budget; the
  youngest sequence there is then stopped and put back at the head of the queue, to be
  resumed by prefilling its prompt and every token it already produced (as vLLM's
  recompute preemption does). A sequence alone on its device that fills the budget
  ends with "length".
- **failover**: a sequence whose worker dies or hangs is resumed the same way, on
  any device that is ready (the restarted worker included), up to `MAX_TRIES` times.

Either way the tokens a caller has received stand: a resumed sequence continues after
them and never sends them again. Greedy continuations are the ones the uninterrupted
sequence would have produced (up to the float rounding of a prefill against decode
steps); a sampled one draws from its seed afresh.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from hxc.errors import UsageError
from hxc.pool.router import NoDeviceReady, Overloaded
from hxc.pool.worker import Health, RequestFailed, Worker, WorkerFailed
from hxc.pool.workers import Member, Workers

MAX_TRIES = 3  # device failures one sequence may see before it fails
HEADROOM_TOKENS = 16  # cached tokens a new sequence needs beyond its prompt to be admitted


@dataclass(frozen=True)
class GenerateParams:
    """How one sequence is generated (what `Worker.generate` sends to the worker)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's end-of-sequence tokens

    def to_json(self, max_new_tokens: int) -> dict[str, Any]:
        return {"max_new_tokens": max_new_tokens, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "seed": self.seed, "stop_token_ids": None if self.stop_token_ids is None else list(self.stop_token_ids)}  # fmt: skip


@dataclass(eq=False)
class RoutedSequence:
    """One sequence in the router. `tokens` are those handed to `on_tokens` so far;
    once `done`, `finish_reason` (stop, length, cancelled) or `error` says how it ended."""

    id: int
    prompt: list[int]
    params: GenerateParams
    on_tokens: Callable[[RoutedSequence, list[int]], None]
    on_done: Callable[[RoutedSequence], None]
    tokens: list[int] = field(default_factory=list)
    device: str | None = None  # the artifact id of the device it runs (or last ran) on
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None  # first sent to a device
    finish_reason: str | None = None
    error: Exception | None = None
    done: bool = False
    preemptions: int = 0
    failures: int = 0
    # This run on its device: its prompt (the original one and every token received
    # before it started) and its Future; what to do when it ends early.
    run_prompt: list[int] = field(default_factory=list)
    future: Future | None = None
    worker: Worker | None = None
    stopping: str | None = None  # cancelled | preempted | length

    @property
    def cached_tokens(self) -> int:
        """Tokens of its device's cache it holds now (its prompt, then one per token)."""
        return len(self.prompt) + len(self.tokens) if self.future is not None else 0


@dataclass(frozen=True)
class LMDeviceState:
    """One device of an LM router, now (for readiness and metrics)."""

    name: str
    device: str
    health: str
    reason: str | None
    running: int
    slots: int
    kv_tokens: int  # cached tokens its running sequences hold
    kv_budget_tokens: int
    kv_bytes_per_token: int
    sequences: int  # completed here
    tokens: int  # generated here
    preemptions: int
    failures: int
    restarts: int
    since: float

    # The names the tensor router's DeviceState has, for what reads both (readiness, metrics).
    @property
    def queued(self) -> int:
        return 0

    @property
    def in_worker(self) -> int:
        return self.running


class _Device:
    def __init__(self, member: Member, budget_tokens: int) -> None:
        self.member = member
        self.worker: Worker = member.worker
        self.name = member.name
        self.budget = budget_tokens
        self.running: list[RoutedSequence] = []  # oldest first
        self.counts = {"sequences": 0, "tokens": 0, "preemptions": 0}
        self.since = time.monotonic()

    def ready(self) -> bool:
        return self.worker.health == Health.READY

    @property
    def used(self) -> int:
        return sum(s.cached_tokens for s in self.running)


class LMRouter:
    """Routes generation requests across a language model's `workers` (see the module
    docstring); the workers are the caller's to close. `kv_cache_bytes` caps each
    device's cached tokens below its whole cache; `max_queue` sequences may wait."""

    def __init__(self, workers: Workers, *, kv_cache_bytes: int | None = None, max_queue: int = 256) -> None:
        lm = workers.language_model
        if lm is None:
            raise UsageError(f"{workers.bundle}: not a language model")
        self.workers = workers
        self.lm = lm
        whole = lm.slots * lm.max_context
        budget = whole if kv_cache_bytes is None else min(whole, kv_cache_bytes // lm.kv_bytes_per_token)
        if budget < 1 + HEADROOM_TOKENS:
            raise UsageError(f"a KV cache of {(kv_cache_bytes or 0) / 2**20:g} MiB holds {budget} tokens of this model "
                             f"({lm.kv_bytes_per_token} bytes each): too few to generate")  # fmt: skip
        self.max_queue = max_queue
        self.lock = threading.RLock()  # reentrant: a Future's callbacks may run in the thread that resolves it
        self.devices = [_Device(m, budget) for m in workers.members]
        self.waiting: collections.deque[RoutedSequence] = collections.deque()
        self.closed = False
        self.shed = 0
        self._ids = itertools.count(1)
        workers.add_listener(self._worker_changed)

    # --- requests -------------------------------------------------------------------

    @property
    def kv_budget_tokens(self) -> int:
        return max(d.budget for d in self.devices)

    @property
    def outstanding(self) -> int:
        with self.lock:
            return len(self.waiting) + sum(len(d.running) for d in self.devices)

    def ready(self) -> bool:
        return not self.closed and any(d.ready() for d in self.devices)

    def submit(self, prompt: Sequence[int], params: GenerateParams, on_tokens: Callable[[RoutedSequence, list[int]], None],
               on_done: Callable[[RoutedSequence], None]) -> RoutedSequence:  # fmt: skip
        """Queue a sequence: `on_tokens(seq, tokens)` hears its tokens as they come and
        `on_done(seq)` once, when it ends (both in a worker's thread: keep them short).
        Raises Overloaded when `max_queue` sequences already wait, NoDeviceReady when
        no device can start, UsageError for a prompt no device's KV budget can hold."""
        prompt = [int(t) for t in prompt]
        if len(prompt) + 1 > self.kv_budget_tokens:
            raise UsageError(f"the prompt has {len(prompt)} tokens; the KV cache budget of a device holds "
                             f"{self.kv_budget_tokens}")  # fmt: skip
        seq = RoutedSequence(next(self._ids), prompt, params, on_tokens, on_done)
        with self.lock:
            if self.closed:
                raise NoDeviceReady("the server is shutting down")
            if not any(d.ready() or d.worker.restart_pending or d.worker.health == Health.STARTING for d in self.devices):
                raise NoDeviceReady(self._why_not_ready_locked())
            if len(self.waiting) >= self.max_queue:
                self.shed += 1
                raise Overloaded(f"{self.max_queue} sequences are already waiting for a device", self.retry_after_s())
            self.waiting.append(seq)
            self._dispatch_locked()
        return seq

    def cancel(self, seq: RoutedSequence) -> None:
        """Stop `seq` now (its client went away, or a stop string ended it): a waiting one
        ends at once, a running one frees its slot as soon as its worker reads this."""
        with self.lock:
            if seq.done:
                return
            if seq in self.waiting:
                self.waiting.remove(seq)
                self._finish_locked(seq, "cancelled")
                return
            seq.stopping = "cancelled"
            worker, future = seq.worker, seq.future
        if worker is not None and future is not None:
            worker.cancel(future)

    def retry_after_s(self) -> float:
        return 1.0

    # --- state ------------------------------------------------------------------------

    def states(self) -> list[LMDeviceState]:
        out = []
        for d in self.devices:
            w = d.worker.stats()
            with self.lock:
                out.append(LMDeviceState(d.name, d.worker.device, w.health.value, w.reason, len(d.running), self.lm.slots,
                                         d.used, d.budget, self.lm.kv_bytes_per_token, d.counts["sequences"],
                                         d.counts["tokens"], d.counts["preemptions"], w.failures, w.restarts, d.since))  # fmt: skip
        return out

    @property
    def preemptions(self) -> int:
        return sum(d.counts["preemptions"] for d in self.devices)

    def close(self) -> None:
        """Stop routing: waiting sequences fail; running ones are the workers' to end."""
        with self.lock:
            self.closed = True
            stranded = list(self.waiting)
            self.waiting.clear()
            for seq in stranded:
                self._fail_locked(seq, NoDeviceReady("the server is shutting down"))

    # --- internals (lock held unless noted) ------------------------------------------------

    def _dispatch_locked(self) -> None:
        """Send waiting sequences, oldest first, while a device has room for the next."""
        while self.waiting and not self.closed:
            seq = self.waiting[0]
            need = len(seq.prompt) + len(seq.tokens) + HEADROOM_TOKENS
            fits = [d for d in self.devices if d.ready() and len(d.running) < self.lm.slots and d.used + need <= d.budget]
            if not fits:
                # One alone on an idle device always goes (its own budget check ends it).
                fits = [d for d in self.devices if d.ready() and not d.running]
                if not fits:
                    return
            device = max(fits, key=lambda d: (self.lm.slots - len(d.running), d.budget - d.used))
            self.waiting.popleft()
            self._start_locked(seq, device)

    def _start_locked(self, seq: RoutedSequence, device: _Device) -> None:
        seq.run_prompt = seq.prompt + seq.tokens
        seq.device, seq.worker, seq.stopping = device.name, device.worker, None
        if seq.started is None:
            seq.started = time.perf_counter()
        left = seq.params.max_new_tokens - len(seq.tokens)
        device.running.append(seq)

        def on_tokens(tokens: list[int]) -> None:
            if tokens:  # an empty part says a long prefill is still going
                self._tokens(seq, device, tokens)

        seq.future = device.worker.generate(seq.run_prompt, seq.params.to_json(left), on_tokens)
        future = seq.future
        future.add_done_callback(lambda f: self._ended(seq, device, f))

    def _tokens(self, seq: RoutedSequence, device: _Device, tokens: list[int]) -> None:
        """A part of `seq`'s reply (a worker's reader thread)."""
        with self.lock:
            if seq.done or seq.worker is not device.worker:
                return
            seq.tokens.extend(tokens)
            device.counts["tokens"] += len(tokens)
            over = device.used - device.budget
            victim = None
            if over > 0:
                if len(device.running) > 1:
                    victim = device.running[-1]  # the youngest goes back to the queue
                    if victim.stopping is None:
                        victim.stopping = "preempted"
                        device.counts["preemptions"] += 1
                    else:
                        victim = None
                elif seq.stopping is None:
                    victim, seq.stopping = seq, "length"
        try:
            seq.on_tokens(seq, tokens)
        finally:
            if victim is not None and victim.future is not None and victim.worker is not None:
                victim.worker.cancel(victim.future)

    def _ended(self, seq: RoutedSequence, device: _Device, future: Future) -> None:
        """`seq`'s run on `device` ended (the Future's callback, in whatever thread resolved it)."""
        with self.lock:
            if seq in device.running:
                device.running.remove(seq)
            seq.future = seq.worker = None
            error = future.exception()
            if error is None:
                reason = future.result().finish_reason
                if seq.stopping == "preempted" and reason == "cancelled" and not self.closed:
                    seq.preemptions += 1
                    self.waiting.appendleft(seq)  # resumed first
                elif seq.stopping == "length" and reason == "cancelled":
                    device.counts["sequences"] += 1
                    self._finish_locked(seq, "length")
                else:
                    device.counts["sequences"] += 1
                    self._finish_locked(seq, reason or "stop")
            elif (isinstance(error, WorkerFailed) and seq.stopping != "cancelled" and seq.failures + 1 < MAX_TRIES
                  and not self.closed):  # fmt: skip
                seq.failures += 1
                self.waiting.appendleft(seq)  # resumed on whichever device is ready first
            elif seq.stopping == "cancelled":
                self._finish_locked(seq, "cancelled")
            else:
                self._fail_locked(seq, error if isinstance(error, (WorkerFailed, RequestFailed)) else RequestFailed(str(error)))
            self._dispatch_locked()

    def _finish_locked(self, seq: RoutedSequence, reason: str) -> None:
        if seq.done:
            return
        seq.done, seq.finish_reason = True, reason
        seq.on_done(seq)

    def _fail_locked(self, seq: RoutedSequence, error: Exception) -> None:
        if seq.done:
            return
        seq.done, seq.error = True, error
        seq.on_done(seq)

    def _worker_changed(self, worker: Worker) -> None:
        with self.lock:
            self._dispatch_locked()
            if not any(d.ready() or d.worker.restart_pending or d.worker.health == Health.STARTING for d in self.devices):
                stranded = list(self.waiting)
                self.waiting.clear()
                for seq in stranded:
                    self._fail_locked(seq, NoDeviceReady(self._why_not_ready_locked()))

    def _why_not_ready_locked(self) -> str:
        return "no device is ready: " + "; ".join(
            f"{d.name}: {d.worker.health.value}" + (f" ({d.worker.reason})" if d.worker.reason else "") for d in self.devices)

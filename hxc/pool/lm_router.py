"""Generation requests routed across a language model's devices: what `hxc serve` runs
its OpenAI and generate endpoints on.

Each device's worker process batches its sequences continuously (`hxc.pool.child`,
`hxc.runtime.batching`): a sequence takes one of the cache's slots, joins the next
decode step, and leaves it when it ends. `LMRouter` sits above the workers and decides
which sequence runs where and when:

- **routing by targets and cost**: each sequence is routed when it arrives, by an
  `Estimate` per device (`hxc.pool.lm_estimate`: its time to first token behind the
  prompts queued there, its time per output token at the batch it joins, the KV cache
  left, its price per 1,000 output tokens), which the request's policy ranks
  (`latency`: the soonest first token that keeps the time per token within target;
  `cost`: the cheapest device and precision variant that meets the targets). One no
  device can serve in time goes to the soonest and is marked `slo_missed`. Estimates
  start from the bench profiles and follow every first token and decode step measured.
- **admission by KV cache**: each device has a budget of cached tokens (its whole
  cache, `slots x max_context`, or less with `kv_cache_bytes`); a sequence routed to a
  device starts there, in order, once a slot is free and its cached tokens plus its
  prompt (and a little headroom) fit. Beyond `max_queue` waiting, `submit` raises
  `Overloaded` with a retry-after.
- **preemption**: as sequences grow, a device's cached tokens may pass its budget; the
  youngest sequence there is then stopped and put back at the head of its queue, to be
  resumed by prefilling its prompt and every token it already produced (as vLLM's
  recompute preemption does). A sequence alone on its device that fills the budget
  ends with "length".
- **failover**: a sequence whose worker dies or hangs is resumed the same way, routed
  again to a device that is ready (the restarted worker included), up to `MAX_TRIES`
  times; so are the sequences queued for a device that goes down.

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
from hxc.lm_calls import MIXED
from hxc.pool import policies
from hxc.pool.lm_estimate import Breakdown, Calibration, DeviceLoad, LMSpeed, estimate
from hxc.pool.policies.base import Estimate, misses
from hxc.pool.router import NoDeviceReady, Overloaded
from hxc.pool.worker import Health, RequestFailed, Worker, WorkerFailed
from hxc.pool.workers import Member, Workers
from hxc.runtime.prices import PriceTable, load_prices
from hxc.runtime.probe import probe_host
from hxc.runtime.select import profiles_for

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


QUANTISED = ("int8", "int4")  # precision variants a request gets only when it allows them


@dataclass(frozen=True)
class Targets:
    """What one request asks of its routing; None: the router's default."""

    ttft_ms: float | None = None  # time to the first token, at most
    tpot_ms: float | None = None  # time per output token after it, at most
    slo_ms: float | None = None  # the whole request, at most
    policy: str | None = None  # a name in hxc.pool.policies.policy_names()
    precisions: tuple[str, ...] | None = None  # the variants it may run on (fp32, int8, ...)

    def over(self, default: Targets) -> Targets:
        """These targets, with `default`'s where these have none."""
        return Targets(*(mine if mine is not None else theirs for mine, theirs in
                         ((self.ttft_ms, default.ttft_ms), (self.tpot_ms, default.tpot_ms), (self.slo_ms, default.slo_ms),
                          (self.policy, default.policy), (self.precisions, default.precisions))))  # fmt: skip


@dataclass(frozen=True)
class Choice:
    """One device as the router saw it for a request: its estimate, the arithmetic
    behind it, and whether it was eligible (ready, of an allowed precision)."""

    name: str
    device: str
    precision: str
    estimate: Estimate
    breakdown: Breakdown | None
    eligible: str | None  # None: eligible; else why not
    meets: bool
    rank: int | None  # 0: chosen
    speed: LMSpeed | None = None  # the device's speed as estimated now (profiles or start-up timing, corrected live)


@dataclass(eq=False)
class RoutedSequence:
    """One sequence in the router. `tokens` are those handed to `on_tokens` so far;
    once `done`, `finish_reason` (stop, length, cancelled) or `error` says how it ended."""

    id: int
    prompt: list[int]
    params: GenerateParams
    on_tokens: Callable[[RoutedSequence, list[int]], None]
    on_done: Callable[[RoutedSequence], None]
    targets: Targets = Targets()  # with the router's defaults filled in
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
    # Routing: the estimate it was routed by (the first time), whether that estimate
    # already missed its targets, and the device whose queue it waits in.
    estimate: Estimate | None = None
    predicted_miss: bool = False
    queued_on: _Device | None = None
    front: bool = False  # resumed: goes to the head of its next device's queue
    # This run's timing, which calibrates its device: when it reached the device, the
    # first token's expected and actual arrival, the last part's.
    run_started: float = 0.0
    run_ttft_ms: float | None = None
    run_first: float | None = None
    last_part: float = 0.0

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
    precision: str
    waiting: int  # sequences routed here, waiting for a slot or KV room
    price_per_hour: float | None
    busy_s: float  # time with at least one sequence running
    sequences: int  # completed here
    tokens: int  # generated here
    preemptions: int
    failures: int
    restarts: int
    since: float
    ms_per_step: float | None  # the current estimate of a decode step alone (None: unmeasured)

    @property
    def cost_per_1k_tokens(self) -> float | None:
        """What its tokens cost so far, per 1,000: busy time x price / tokens."""
        if self.price_per_hour is None or not self.tokens:
            return None
        return self.busy_s * self.price_per_hour / 3600 / self.tokens * 1000

    # The names the tensor router's DeviceState has, for what reads both (readiness, metrics).
    @property
    def queued(self) -> int:
        return 0

    @property
    def in_worker(self) -> int:
        return self.running


class _Device:
    def __init__(self, member: Member, budget_tokens: int, speed: LMSpeed | None, price_per_hour: float | None) -> None:
        self.member = member
        self.worker: Worker = member.worker
        self.name = member.name
        self.precision = member.candidate.artifact.precision
        self.budget = budget_tokens
        self.calibration = Calibration(speed)
        self.price_per_hour = price_per_hour
        self.running: list[RoutedSequence] = []  # oldest first
        self.queue: collections.deque[RoutedSequence] = collections.deque()  # routed here, not started
        self.counts = {"sequences": 0, "tokens": 0, "preemptions": 0}
        self.since = time.monotonic()
        self.busy_s = 0.0
        self.busy_since: float | None = None

    def ready(self) -> bool:
        return self.worker.health == Health.READY

    @property
    def used(self) -> int:
        return sum(s.cached_tokens for s in self.running)

    def calibrate_from_start(self) -> None:
        """Take the worker's own timing at start-up (a prefill and a decode step, timed
        once warm) as the first measurements: a device without profiles is then
        estimated from the start, one with profiles corrected to how it runs now."""
        timing = self.worker.ready_info.get("lm_timing") or {}
        try:
            n, prefill, step = int(timing["prefill_tokens"]), float(timing["prefill_ms"]), float(timing["step_ms"])
        except (KeyError, TypeError, ValueError):
            return
        speed = self.calibration.speed
        self.calibration.observe_ttft(speed.prefill_ms(n) if speed is not None else None, prefill, n)
        self.calibration.observe_step(1, step)

    def busy(self) -> float:
        return self.busy_s + (time.monotonic() - self.busy_since if self.busy_since is not None else 0.0)

    def load(self, slots: int) -> DeviceLoad:
        queued = sum(len(s.prompt) + len(s.tokens) for s in self.queue)
        readers = [s for s in self.running if s.run_first is None]  # still reading their prompt
        remaining = tuple(max(0, s.params.max_new_tokens - len(s.tokens)) for s in self.running)
        free = self.budget - self.used - sum(len(s.prompt) + len(s.tokens) + HEADROOM_TOKENS for s in self.queue)
        return DeviceLoad(len(self.running), slots, len(self.queue), queued + sum(len(s.run_prompt) for s in readers),
                          remaining, free, len(readers))  # fmt: skip


class LMRouter:
    """Routes generation requests across a language model's `workers` (see the module
    docstring); the workers are the caller's to close. `kv_cache_bytes` caps each
    device's cached tokens below its whole cache; `max_queue` sequences may wait."""

    def __init__(self, workers: Workers, *, kv_cache_bytes: int | None = None, max_queue: int = 256,
                 targets: Targets = Targets(), prices: PriceTable | None = None) -> None:  # fmt: skip
        lm = workers.language_model
        if lm is None:
            raise UsageError(f"{workers.bundle}: not a language model")
        self.workers = workers
        self.lm = lm
        self.mixed = MIXED in workers.manifest.functions  # a chunk read beside decoding rides in its call
        whole = lm.slots * lm.max_context
        budget = whole if kv_cache_bytes is None else min(whole, kv_cache_bytes // lm.kv_bytes_per_token)
        if budget < 1 + HEADROOM_TOKENS:
            raise UsageError(f"a KV cache of {(kv_cache_bytes or 0) / 2**20:g} MiB holds {budget} tokens of this model "
                             f"({lm.kv_bytes_per_token} bytes each): too few to generate")  # fmt: skip
        self.max_queue = max_queue
        self.lock = threading.RLock()  # reentrant: a Future's callbacks may run in the thread that resolves it
        prices = prices or load_prices()
        self.currency = prices.currency
        host = probe_host()
        self.devices = []
        for m in workers.members:
            # A profile speaks for a worker only if measured as it runs: a pinned one starts unmeasured.
            speed = None if m.worker.cpus else LMSpeed.from_profiles(
                profiles_for(workers.manifest, m.candidate.artifact, m.candidate.device, host.host().id)[0])
            price = prices.price(m.candidate.device, len(m.worker.cpus) if m.worker.cpus else host.cpu.cores)
            device = _Device(m, budget, speed, price.per_hour if price else None)
            device.calibrate_from_start()
            self.devices.append(device)
        self.precisions = tuple(dict.fromkeys(d.precision for d in self.devices))
        full = tuple(p for p in self.precisions if p not in QUANTISED)
        # A request that names no precision runs on the full-precision variants (all, if none is loaded).
        self.targets = targets.over(Targets(policy=policies.DEFAULT_POLICY, precisions=full or self.precisions))
        policies.policy(self.targets.policy)  # type: ignore[arg-type]  # an unknown name fails here
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
               on_done: Callable[[RoutedSequence], None], targets: Targets = Targets()) -> RoutedSequence:  # fmt: skip
        """Route and queue a sequence: `on_tokens(seq, tokens)` hears its tokens as they
        come and `on_done(seq)` once, when it ends (both in a worker's thread: keep them
        short). `targets` override the router's defaults. Raises Overloaded when
        `max_queue` sequences already wait, NoDeviceReady when no device can start,
        UsageError for a prompt no device's KV budget can hold, an unknown policy or a
        precision no device runs."""
        prompt = [int(t) for t in prompt]
        if len(prompt) + 1 > self.kv_budget_tokens:
            raise UsageError(f"the prompt has {len(prompt)} tokens; the KV cache budget of a device holds "
                             f"{self.kv_budget_tokens}")  # fmt: skip
        targets = self.check(targets)
        seq = RoutedSequence(next(self._ids), prompt, params, on_tokens, on_done, targets)
        with self.lock:
            if self.closed:
                raise NoDeviceReady("the server is shutting down")
            if not any(d.worker.may_serve for d in self.devices):
                raise NoDeviceReady(self._why_not_ready_locked())
            if self._waiting_locked() >= self.max_queue:
                self.shed += 1
                raise Overloaded(f"{self.max_queue} sequences are already waiting for a device", self.retry_after_s())
            self.waiting.append(seq)
            self._dispatch_locked()
        return seq

    def check(self, targets: Targets) -> Targets:
        """`targets` over the router's defaults; a UsageError for an unknown policy or a
        precision no device of this model runs."""
        targets = targets.over(self.targets)
        policies.policy(targets.policy)  # type: ignore[arg-type]
        unknown = [p for p in targets.precisions or () if p not in self.precisions]
        if unknown:
            raise UsageError(f"no device of this model runs precision {unknown[0]!r}; it has {', '.join(self.precisions)}")
        return targets

    def cancel(self, seq: RoutedSequence) -> None:
        """Stop `seq` now (its client went away, or a stop string ended it): a waiting one
        ends at once, a running one frees its slot as soon as its worker reads this."""
        with self.lock:
            if seq.done:
                return
            queue = seq.queued_on.queue if seq.queued_on is not None else self.waiting
            if seq in queue:
                queue.remove(seq)
                seq.queued_on = None
                self._finish_locked(seq, "cancelled")
                return
            seq.stopping = "cancelled"
            worker, future = seq.worker, seq.future
        if worker is not None and future is not None:
            worker.cancel(future)

    def explain(self, prompt_tokens: int, max_tokens: int, targets: Targets = Targets()) -> list[Choice]:
        """How a request of `prompt_tokens` and `max_tokens` would be routed now: every
        device, best first, the chosen one first of all (the `/routing` debug view)."""
        targets = self.check(targets)
        with self.lock:
            return self._choices_locked(prompt_tokens, max_tokens, targets)

    def _choices_locked(self, prompt_tokens: int, max_tokens: int, targets: Targets) -> list[Choice]:
        max_tokens = max(1, min(max_tokens, self.lm.max_context - prompt_tokens))
        request = policies.Request(max_tokens, targets.slo_ms, targets.ttft_ms, targets.tpot_ms)
        seen: list[tuple[_Device, Estimate, Breakdown | None, str | None]] = []
        for d in self.devices:
            est, why = self._estimate(d, prompt_tokens, max_tokens, d.price_per_hour)
            eligible = (None if d.ready() and d.precision in (targets.precisions or ()) else
                        f"precision {d.precision} not allowed" if d.ready() else f"{d.worker.health.value}")  # fmt: skip
            seen.append((d, est, why, eligible))
        ranked = policies.choose(targets.policy, request,  # type: ignore[arg-type]
                                 [policies.Candidate(d.name, est, len(d.running) + len(d.queue), d)
                                  for d, est, _, eligible in seen if eligible is None])  # fmt: skip
        order = {c.name: i for i, c in enumerate(ranked)}
        out = [Choice(d.name, d.worker.device, d.precision, est, why, eligible, policies.base.expected_to_meet(request, est),
                      order.get(d.name), d.calibration.speed) for d, est, why, eligible in seen]  # fmt: skip
        return sorted(out, key=lambda c: (c.rank is None, c.rank or 0))

    def retry_after_s(self) -> float:
        return 1.0

    # --- state ------------------------------------------------------------------------

    def states(self) -> list[LMDeviceState]:
        out = []
        for d in self.devices:
            w = d.worker.stats()
            with self.lock:
                speed = d.calibration.speed
                out.append(LMDeviceState(d.name, d.worker.device, w.health.value, w.reason, len(d.running), self.lm.slots,
                                         d.used, d.budget, self.lm.kv_bytes_per_token, d.precision, len(d.queue),
                                         d.price_per_hour, d.busy(), d.counts["sequences"], d.counts["tokens"],
                                         d.counts["preemptions"], w.failures, w.restarts, d.since,
                                         speed.step_ms(1) if speed is not None else None))  # fmt: skip
        return out

    @property
    def waiting_count(self) -> int:
        with self.lock:
            return self._waiting_locked()

    def _waiting_locked(self) -> int:
        return len(self.waiting) + sum(len(d.queue) for d in self.devices)

    @property
    def preemptions(self) -> int:
        return sum(d.counts["preemptions"] for d in self.devices)

    def close(self) -> None:
        """Stop routing: waiting sequences fail; running ones are the workers' to end."""
        with self.lock:
            self.closed = True
            for seq in self._take_waiting_locked():
                self._fail_locked(seq, NoDeviceReady("the server is shutting down"))

    # --- internals (lock held unless noted) ------------------------------------------------

    def _take_waiting_locked(self) -> list[RoutedSequence]:
        """Every sequence not started yet (unrouted, or queued on a device), out of the queues."""
        taken = list(self.waiting) + [s for d in self.devices for s in d.queue]
        self.waiting.clear()
        for d in self.devices:
            d.queue.clear()
        return taken

    def _estimate(self, d: _Device, prompt_tokens: int, max_tokens: int, price_per_hour: float | None = None,
                  ) -> tuple[Estimate, Breakdown | None]:  # fmt: skip
        """`lm_estimate.estimate` of a request on device `d` as it is now, with this model's chunks."""
        return estimate(d.calibration.speed, d.load(self.lm.slots), prompt_tokens, max_tokens, min(self.lm.chunks),
                        price_per_hour, self.lm.kv_bytes_per_token, largest_chunk=max(self.lm.chunks),
                        mixed=self.mixed)  # fmt: skip

    def _dispatch_locked(self) -> None:
        """Route the sequences that have no device yet (new, resumed, or queued on a
        device that went down), then start each device's queue, in order, while it has
        a slot and the KV room for the next."""
        if self.closed:
            return
        for d in self.devices:
            if d.queue and not d.ready():
                self.waiting.extendleft(reversed([s for s in d.queue if not s.front]))
                self.waiting.extendleft(reversed([s for s in d.queue if s.front]))
                for s in d.queue:
                    s.queued_on, s.front = None, True
                d.queue.clear()
        unrouted = collections.deque()
        while self.waiting:
            seq = self.waiting.popleft()
            device = self._route_locked(seq)
            if device is None:
                unrouted.append(seq)
                continue
            seq.queued_on = device
            (device.queue.appendleft if seq.front else device.queue.append)(seq)
            seq.front = False
        self.waiting = unrouted
        for d in self.devices:
            while d.queue and d.ready() and len(d.running) < self.lm.slots:
                seq = d.queue[0]
                need = len(seq.prompt) + len(seq.tokens) + HEADROOM_TOKENS
                # One alone on an idle device always goes (its own budget check ends it).
                if d.running and d.used + need > d.budget:
                    break
                d.queue.popleft()
                seq.queued_on = None
                self._start_locked(seq, d)

    def _route_locked(self, seq: RoutedSequence) -> _Device | None:
        """The device `seq` goes to, by its policy (None: no eligible device is ready);
        the first routing's estimate is the one its predicted miss is judged by."""
        t = seq.targets
        eligible = [d for d in self.devices if d.ready() and d.precision in (t.precisions or ())]
        if not eligible:
            return None
        made = len(seq.tokens)
        prompt, left = len(seq.prompt) + made, max(1, min(seq.params.max_new_tokens, self.lm.max_context - len(seq.prompt)) - made)
        request = policies.Request(left, t.slo_ms, t.ttft_ms, t.tpot_ms)
        candidates = []
        for d in eligible:
            est, _ = self._estimate(d, prompt, left, d.price_per_hour)
            candidates.append(policies.Candidate(d.name, est, len(d.running) + len(d.queue), d))
        chosen = policies.choose(t.policy, request, candidates)[0]  # type: ignore[arg-type]
        if seq.estimate is None:
            seq.estimate, seq.predicted_miss = chosen.estimate, misses(request, chosen)
        return chosen.handle

    def _start_locked(self, seq: RoutedSequence, device: _Device) -> None:
        seq.run_prompt = seq.prompt + seq.tokens
        seq.device, seq.worker, seq.stopping, seq.front = device.name, device.worker, None, False
        now = time.perf_counter()
        if seq.started is None:
            seq.started = now
        left = seq.params.max_new_tokens - len(seq.tokens)
        # What its first token should take from here, on the device as it is now (for calibration).
        est, _ = self._estimate(device, len(seq.run_prompt), max(1, left))
        seq.run_started, seq.run_first, seq.run_ttft_ms = now, None, est.ttft_ms
        if not device.running:
            device.busy_since = time.monotonic()
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
            now = time.perf_counter()
            if seq.run_first is None:
                seq.run_first = now
                device.calibration.observe_ttft(seq.run_ttft_ms, (now - seq.run_started) * 1000, len(seq.run_prompt))
            else:
                device.calibration.observe_step(len(device.running), (now - seq.last_part) * 1000 / len(tokens))
            seq.last_part = now
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
                if not device.running and device.busy_since is not None:
                    device.busy_s += time.monotonic() - device.busy_since
                    device.busy_since = None
            seq.future = seq.worker = None
            error = future.exception()
            if error is None:
                reason = future.result().finish_reason
                if seq.stopping == "preempted" and reason == "cancelled" and not self.closed:
                    seq.preemptions += 1
                    seq.front, seq.queued_on = True, device  # resumed first, where it was
                    device.queue.appendleft(seq)
                elif seq.stopping == "length" and reason == "cancelled":
                    device.counts["sequences"] += 1
                    self._finish_locked(seq, "length")
                else:
                    device.counts["sequences"] += 1
                    self._finish_locked(seq, reason or "stop")
            elif (isinstance(error, WorkerFailed) and seq.stopping != "cancelled" and seq.failures + 1 < MAX_TRIES
                  and not self.closed):  # fmt: skip
                seq.failures += 1
                seq.front = True
                self.waiting.appendleft(seq)  # routed again, first
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
            # A sequence whose allowed precisions only devices gone for good run cannot start.
            alive = {d.precision for d in self.devices if d.worker.may_serve}
            for seq in [s for s in self.waiting if not alive & set(s.targets.precisions or ())]:
                self.waiting.remove(seq)
                self._fail_locked(seq, NoDeviceReady(f"no device of precision {', '.join(seq.targets.precisions or ())} "
                                                     f"is left: {self._why_not_ready_locked()}"))  # fmt: skip
            if not any(d.worker.may_serve for d in self.devices):
                for seq in self._take_waiting_locked():
                    self._fail_locked(seq, NoDeviceReady(self._why_not_ready_locked()))

    def _why_not_ready_locked(self) -> str:
        return "no device is ready: " + "; ".join(
            f"{d.name}: {d.worker.health.value}" + (f" ({d.worker.reason})" if d.worker.reason else "") for d in self.devices)

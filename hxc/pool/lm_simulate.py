"""Language-model serving on simulated devices in virtual time: each device batches its
sequences continuously, as `hxc.runtime.batching.Batch.step` does, at a true speed
(optionally noisy) that the router only learns through its profiles and what it
measures; every arrival is routed by exactly the code the server's router runs
(`lm_estimate.estimate` on each device's `Calibration`, ranked by a registered policy),
so what the simulation shows of routing holds for the router too
(`benchmarks/route_cost.py` runs a fleet and this host).

    arrivals = trace(INTERACTIVE_AND_BATCH, rate_per_s=4.0, duration_s=3600, seed=0)
    result = simulate([gpu, cpu], arrivals, policy="cost")
    result.attainment, result.cost_per_million, result.utilisation

A device's step is one prefill chunk of the oldest sequence still reading its prompt
(the smallest chunk while others decode, else the largest the prompt fills:
`lm_calls.next_chunk`) and one decode call for every sequence with a token to extend,
the one just prefilled included, so its first two tokens come with the same step. A
chunk of c tokens after f already read takes prefill(f + c) - prefill(f): the true
speed's prefill points are the time to the first token of a prompt alone, so a prompt
read in any chunks costs its prefill time, and the estimate's formula is the truth's
when nothing is noisy. A decode call of b sequences takes step(b), whatever their
positions. Sequences wait for a slot in order (first come, first served per device)
and are admitted when a slot is free and their prompt plus `max_tokens` fit the KV
tokens not yet reserved; each generates exactly `max_tokens` tokens (no early stop).

The router learns as the live one does: a sequence's time from its admission to its
first token against the estimate made at its admission (`observe_ttft`), and each gap
between two of its tokens as a decode step at the batch of that step (`observe_step`;
the gap includes the prefill chunk the step read, as a measured gap does).
"""

from __future__ import annotations

import bisect
import collections
import heapq
import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hxc.errors import UsageError
from hxc.lm_calls import next_chunk
from hxc.pool import policies
from hxc.pool.lm_estimate import Calibration, DeviceLoad, LMSpeed, estimate
from hxc.pool.policies.base import misses

BASELINES = ("fastest", "round_robin")  # routings beside the registered policies


@dataclass(frozen=True)
class LMDevice:
    """A simulated device running one model: its true `speed`, what its profiles say
    (`profiled`, default the truth; the router starts from it), its cache (`slots`
    sequences, `kv_tokens` tokens of context in all), its price and prefill chunks."""

    name: str
    speed: LMSpeed
    slots: int
    kv_tokens: int
    price_per_hour: float
    chunks: tuple[int, ...] = (128,)  # prefill chunk sizes the bundle has (`LanguageModel.chunks`)
    profiled: LMSpeed | None = None
    noise: float = 0.0  # each step takes (1 +- noise) x its true time, uniformly
    # Batch.step reads the smallest chunk while others decode (their next token waits the
    # least); False: always the largest the prompt fills (what-if: fewer, longer steps).
    smallest_while_decoding: bool = True

    @property
    def chunk_while_decoding(self) -> int:
        """The chunk a prompt is read in while others decode (the estimate's `chunk`)."""
        return min(self.chunks) if self.smallest_while_decoding else max(self.chunks)

    def __post_init__(self) -> None:
        if self.slots < 1 or self.kv_tokens < 1 or not self.chunks or min(self.chunks) < 1:
            raise UsageError(f"device {self.name!r}: slots, KV tokens and prefill chunks must be positive")


@dataclass(frozen=True)
class RequestClass:
    """A kind of request in a trace: its share of the arrivals, prompt and output tokens
    drawn uniformly from the inclusive ranges, and its targets (ms; None: none)."""

    name: str
    share: float
    prompt_tokens: tuple[int, int]
    output_tokens: tuple[int, int]
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    slo_ms: float | None = None  # end to end, from arrival


# Issue 28's trace: 70% interactive with first-token and per-token targets, 30% batch jobs with a deadline.
INTERACTIVE_AND_BATCH = (
    RequestClass("interactive", 0.7, (128, 512), (64, 128), ttft_ms=300.0, tpot_ms=50.0),
    RequestClass("batch", 0.3, (1024, 2048), (256, 256), slo_ms=60_000.0),
)


@dataclass(frozen=True)
class Arrival:
    """One request of a trace: when it arrives (s), its class, its sizes and targets."""

    at_s: float
    kind: str
    prompt_tokens: int
    max_tokens: int
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    slo_ms: float | None = None

    @property
    def request(self) -> policies.Request:
        return policies.Request(units=self.max_tokens, slo_ms=self.slo_ms, ttft_ms=self.ttft_ms, tpot_ms=self.tpot_ms)


def trace(classes: Sequence[RequestClass], rate_per_s: float, duration_s: float, seed: int = 0) -> list[Arrival]:
    """Poisson arrivals at `rate_per_s` for `duration_s`, each of a class drawn by share.
    The random draws do not depend on the rate (a gap is a unit exponential / rate), so
    two rates with one seed give the same requests, closer together or further apart."""
    if rate_per_s <= 0 or duration_s <= 0:
        raise UsageError(f"a trace needs a positive rate and duration, not {rate_per_s}/s for {duration_s} s")
    total = sum(c.share for c in classes)
    if not classes or total <= 0:
        raise UsageError("a trace needs at least one request class with a positive share")
    bounds = list(itertools.accumulate(c.share / total for c in classes))
    rng = random.Random(seed)
    out: list[Arrival] = []
    t = rng.expovariate(1.0) / rate_per_s
    while t < duration_s:  # bounded: every gap is positive (expovariate never returns 0 in practice; see the max)
        c = classes[min(bisect.bisect_right(bounds, rng.random()), len(classes) - 1)]
        prompt = rng.randint(*c.prompt_tokens)
        output = rng.randint(*c.output_tokens)
        out.append(Arrival(t, c.name, prompt, output, c.ttft_ms, c.tpot_ms, c.slo_ms))
        t += max(rng.expovariate(1.0), 1e-12) / rate_per_s
    return out


@dataclass(frozen=True)
class Served:
    """What happened to one request: where it ran, when its tokens came (ms from its
    arrival; `tpot_ms` is the mean gap after the first token) and whether it met every
    target it had; `expected_miss`: the router knew when it chose (no device could)."""

    index: int
    kind: str
    device: str
    output_tokens: int
    ttft_ms: float
    tpot_ms: float
    e2e_ms: float
    met: bool
    expected_miss: bool


@dataclass(frozen=True)
class DeviceUse:
    name: str
    busy_s: float  # time a step was running
    cost: float  # busy_s x its price per hour / 3600
    sequences: int
    output_tokens: int
    utilisation: float  # busy_s / the simulation's span


@dataclass(frozen=True)
class LMSimResult:
    policy: str
    span_s: float  # from 0 to the last token (at least the trace's duration)
    served: tuple[Served, ...] = field(repr=False)
    devices: tuple[DeviceUse, ...]

    @property
    def output_tokens(self) -> int:
        return sum(s.output_tokens for s in self.served)

    @property
    def attainment(self) -> float:
        """Share of requests that met every target they had."""
        return sum(s.met for s in self.served) / len(self.served) if self.served else 1.0

    def attainment_of(self, kind: str) -> float:
        mine = [s for s in self.served if s.kind == kind]
        return sum(s.met for s in mine) / len(mine) if mine else 1.0

    @property
    def throughput(self) -> float:
        """Output tokens per second over the span."""
        return self.output_tokens / self.span_s

    @property
    def cost(self) -> float:
        return sum(d.cost for d in self.devices)

    @property
    def cost_per_million(self) -> float:
        """Cost of 1M output tokens: busy device-seconds x prices / output tokens."""
        return self.cost / self.output_tokens * 1e6 if self.output_tokens else math.nan

    @property
    def utilisation(self) -> dict[str, float]:
        return {d.name: d.utilisation for d in self.devices}


@dataclass(eq=False)
class _Seq:
    index: int
    arrival: Arrival
    filled: int = 0  # prompt tokens read
    first_step: int = -1  # the device step that gave its first token
    first_s: float = math.nan
    admitted_s: float = math.nan
    predicted_ttft_ms: float | None = None

    @property
    def reserved(self) -> int:
        return self.arrival.prompt_tokens + self.arrival.max_tokens


class _Device:
    """One device's state: its slots, the sequences waiting for one, its steps."""

    def __init__(self, spec: LMDevice, kv_bytes_per_token: int) -> None:
        self.spec = spec
        self.kv_bytes_per_token = kv_bytes_per_token
        self.calibration = Calibration(spec.profiled if spec.profiled is not None else spec.speed)
        self.waiting: collections.deque[_Seq] = collections.deque()
        self.running: list[_Seq] = []  # admitted, oldest first
        self.reserved = 0  # KV tokens the running sequences may fill
        self.steps = 0  # steps completed
        self.stepping = False
        self.busy_s = 0.0
        self.sequences = 0
        self.tokens = 0

    def out(self, seq: _Seq) -> int:
        """Tokens `seq` has produced by now (2 with its first step: first token and one decode)."""
        if seq.first_step < 0:
            return 0
        return min(seq.arrival.max_tokens, 1 + (self.steps - seq.first_step))

    def load(self, *, queue: bool = True) -> DeviceLoad:
        """What the estimate needs of this device now; without `queue`, as the sequence
        at the head of the queue finds it when it is admitted (nobody waiting before it)."""
        unread = sum(s.arrival.prompt_tokens - s.filled for s in self.running)
        remaining = tuple(s.arrival.max_tokens - self.out(s) for s in self.running)
        kv_free = self.spec.kv_tokens - self.reserved
        waiting = 0
        if queue:
            waiting = len(self.waiting)
            unread += sum(s.arrival.prompt_tokens for s in self.waiting)
            kv_free -= sum(s.reserved for s in self.waiting)
        readers = sum(1 for s in self.running if s.first_step < 0)
        return DeviceLoad(len(self.running), self.spec.slots, waiting, unread, remaining, kv_free, readers)

    def chunk_ms(self, filled: int, chunk: int, size: int) -> float:
        """True ms of the prefill call reading tokens `filled`..`filled + chunk` in a call of
        `size` (padded to it): a fixed part and a part per token, fitted to the true
        speed's prefill points (`LMSpeed.call_costs`); where they cannot be told apart,
        the points' difference prefill(filled + chunk) - prefill(filled)."""
        costs = self.spec.speed.call_costs(self.spec.chunks)
        if costs is not None:
            fixed, per = costs
            return fixed + per * size
        before = self.spec.speed.prefill_ms(filled) if filled > 0 else 0.0
        return self.spec.speed.prefill_ms(filled + chunk) - before


def simulate(devices: Sequence[LMDevice], arrivals: Sequence[Arrival], policy: str = "cost", *, seed: int = 0,
             kv_bytes_per_token: int = 1, duration_s: float | None = None, max_events: int = 50_000_000) -> LMSimResult:  # fmt: skip
    """Serve `arrivals` (sorted by time) on `devices`, each routed when it arrives by
    `policy`: a registered routing policy (`policies.policy_names()`), `fastest` (every
    request to the device or devices with the highest decode rate at batch 1, among them
    by `latency`) or `round_robin`. `duration_s`: the span utilisation is measured over,
    at least (default the last arrival). Deterministic for a seed (it draws the noise)."""
    if not devices:
        raise UsageError("simulate needs at least one device")
    if policy not in BASELINES:
        policies.policy(policy)  # a UsageError for an unknown name
    names = [d.name for d in devices]
    if len(set(names)) != len(names):
        raise UsageError(f"device names must differ: {names}")
    rng = random.Random(seed)
    devs = [_Device(d, kv_bytes_per_token) for d in devices]
    choose = _router(policy, devs)
    seqs = [_Seq(i, a) for i, a in enumerate(arrivals)]
    served: list[Served | None] = [None] * len(seqs)
    expected_miss = [False] * len(seqs)
    events: list[tuple[float, int, int, int]] = []  # (time, order, kind 0 = step ends / 1 = arrival, index)
    order = itertools.count()
    for s in seqs:
        heapq.heappush(events, (s.arrival.at_s, next(order), 1, s.index))
    step_of: dict[int, tuple[float, float, _Seq | None, int, list[_Seq]]] = {}  # device -> (start, duration, prefilled, chunk, decoding)
    last = 0.0

    def admit(d: _Device, now: float) -> None:
        # In order: the head waits for a slot and for its KV, and those behind it wait for it.
        while d.waiting and len(d.running) < d.spec.slots and d.reserved + d.waiting[0].reserved <= d.spec.kv_tokens:
            s = d.waiting[0]
            speed = d.calibration.speed
            e, _ = estimate(speed, d.load(queue=False), s.arrival.prompt_tokens, s.arrival.max_tokens, d.spec.chunk_while_decoding,
                            d.spec.price_per_hour, d.kv_bytes_per_token, largest_chunk=max(d.spec.chunks))  # fmt: skip
            d.waiting.popleft()
            s.admitted_s, s.predicted_ttft_ms = now, e.ttft_ms
            d.running.append(s)
            d.reserved += s.reserved
            d.sequences += 1

    def start(di: int, now: float) -> None:
        d = devs[di]
        if d.stepping or not d.running:
            return
        decoding = [s for s in d.running if s.first_step >= 0]
        prefilled = next((s for s in d.running if s.filled < s.arrival.prompt_tokens), None)
        chunk, ms = 0, 0.0
        if prefilled is not None:
            left = prefilled.arrival.prompt_tokens - prefilled.filled
            size = next_chunk(d.spec.chunks, left, smallest=bool(decoding) and d.spec.smallest_while_decoding)
            chunk = min(left, size)
            ms = d.chunk_ms(prefilled.filled, chunk, size)
            if chunk == left and prefilled.arrival.max_tokens > 1:
                decoding.append(prefilled)  # its first token comes from the chunk; it decodes in the same step
        if decoding:
            ms += d.spec.speed.step_ms(len(decoding))
        if d.spec.noise:
            ms *= 1 + rng.uniform(-d.spec.noise, d.spec.noise)
        d.stepping = True
        step_of[di] = (now, ms / 1000, prefilled, chunk, decoding)
        heapq.heappush(events, (now + ms / 1000, next(order), 0, di))

    def finish(s: _Seq, d: _Device, now: float) -> None:
        a = s.arrival
        ttft = (s.first_s - a.at_s) * 1000
        e2e = (now - a.at_s) * 1000
        tpot = (e2e - ttft) / (a.max_tokens - 1) if a.max_tokens > 1 else 0.0
        met = all(t is None or v <= t for t, v in ((a.ttft_ms, ttft), (a.tpot_ms, tpot), (a.slo_ms, e2e)))
        served[s.index] = Served(s.index, a.kind, d.spec.name, a.max_tokens, ttft, tpot, e2e, met, expected_miss[s.index])
        d.tokens += a.max_tokens

    for _ in range(max_events):  # bounded: each event is an arrival or a step, and each step reads or emits a token
        if not events:
            break
        now, _, kind, index = heapq.heappop(events)
        last = max(last, now)
        if kind == 1:
            s = seqs[index]
            di, expected_miss[index] = choose(s.arrival)
            devs[di].waiting.append(s)
            admit(devs[di], now)
            start(di, now)
            continue
        d = devs[index]
        t0, duration, prefilled, chunk, decoding = step_of.pop(index)
        d.stepping = False
        d.busy_s += duration
        if prefilled is not None:
            prefilled.filled += chunk
            if prefilled.filled >= prefilled.arrival.prompt_tokens:
                prefilled.first_step, prefilled.first_s = d.steps, now
                d.calibration.observe_ttft(prefilled.predicted_ttft_ms, (now - prefilled.admitted_s) * 1000,
                                           prefilled.arrival.prompt_tokens)  # fmt: skip
        # Each sequence that had a token before this step saw a gap of one step at this batch.
        for s in decoding:
            if s is not prefilled:
                d.calibration.observe_step(len(decoding), duration * 1000)
        d.steps += 1
        ended = [s for s in d.running if s.first_step >= 0 and d.out(s) >= s.arrival.max_tokens]
        for s in ended:
            d.running.remove(s)
            d.reserved -= s.reserved
            finish(s, d, now)
        admit(d, now)
        start(index, now)
    else:
        raise RuntimeError(f"the simulation did not end within {max_events} events")
    if any(s is None for s in served):
        raise RuntimeError("a request was never served")  # every admitted sequence ends, every waiting one is admitted
    span = max(last, duration_s if duration_s is not None else (arrivals[-1].at_s if arrivals else 0.0), 1e-9)
    uses = tuple(DeviceUse(d.spec.name, d.busy_s, d.busy_s * d.spec.price_per_hour / 3600, d.sequences, d.tokens,
                           d.busy_s / span) for d in devs)  # fmt: skip
    return LMSimResult(policy, span, tuple(served), uses)  # type: ignore[arg-type]


def _router(policy: str, devs: list[_Device]) -> Callable[[Arrival], tuple[int, bool]]:
    """The routing decision per arrival: (device index, expected to miss)."""
    if policy == "round_robin":
        turn = itertools.cycle(range(len(devs)))
        return lambda a: (next(turn), False)
    among = range(len(devs))
    rank_by = policy
    if policy == "fastest":
        best = min(d.spec.speed.step_ms(1) for d in devs)
        among = [i for i, d in enumerate(devs) if d.spec.speed.step_ms(1) <= best * (1 + 1e-9)]
        rank_by = "latency"
    among = list(among)

    def route(a: Arrival) -> tuple[int, bool]:
        request = a.request
        candidates = []
        for i in among:
            d = devs[i]
            e, _ = estimate(d.calibration.speed, d.load(), a.prompt_tokens, a.max_tokens, d.spec.chunk_while_decoding,
                            d.spec.price_per_hour, d.kv_bytes_per_token, largest_chunk=max(d.spec.chunks))  # fmt: skip
            candidates.append(policies.Candidate(d.spec.name, e, len(d.running) + len(d.waiting), i))
        chosen = policies.choose(rank_by, request, candidates)[0]
        return chosen.handle, misses(request, chosen)

    return route

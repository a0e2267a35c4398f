"""What one language-model request is expected to cost on one device now: its time to
the first token, its time per output token, the KV cache left for it, and its price per
1,000 output tokens, as an `Estimate` the routing policies rank.

One model of a device's work, shared by the server's router (`lm_router.LMRouter`) and
the fleet simulator (`lm_simulate`), so what the simulator shows of routing is what
the router does. A device runs its sequences as `hxc.runtime.batching.Batch` does:
each step is one prefill chunk of the oldest prompt still being read (the smallest
chunk while anyone decodes, else the largest) and one decode call for every sequence
that has a token to extend; a step hands out its tokens when its decode call ends. So
for a request of `n` prompt tokens and `m` output tokens arriving at a device with `q`
prompt tokens already waiting to be read, `b` sequences decoding now and `b'` running
once the prompts ahead are read:

    ttft = slot wait + prefill(q + n)
           + ceil(q / chunk) x step(b) + (ceil(n / chunk) - 1) x step(b') + step(b' + 1)
    tpot = step(b' + 1)
    price per 1k output tokens = price per second x (prefill(n) + the decode time it adds) / m x 1000

(with the mixed step, `estimate(mixed=True)`, a chunk read beside decoding sequences rides
in their decode call and costs its tokens only, the fixed part of a call being the
decode call's), where prefill(n) is the time to the first token of an n-token prompt alone and step(b)
one decode call of b sequences, from the device's bench profiles (`hxc bench` on the
bundle: prompts of 32/128/512 tokens, decode at batch 1 and at every slot), or the
worker's own timing at start-up, corrected by what the router measures live
(`Calibration`). The price charges a sequence the device-seconds it adds: its own
prefill, and for each of its tokens step(b + 1) - step(b) while b others still decode
beside it, a whole step(1) once none does. A device busy anyway serves one more
sequence for little; one that would otherwise be idle charges it all: which is what
"busy device-seconds x price" makes it cost.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hxc.manifests.schema import Profile
from hxc.pool.policies.base import Estimate

EWMA = 0.3  # weight of the newest live measurement in a correction
CLAMP = (0.05, 50.0)  # a correction factor stays in this range (one wild measurement cannot zero a device)


@dataclass(frozen=True)
class LMSpeed:
    """A device's speed on one artifact: points (prompt tokens, ms to the first token)
    and (batch, ms per decode step), each sorted; read between points linearly and
    beyond them along the last segment's slope (never below the nearest point)."""

    prefill: tuple[tuple[int, float], ...]
    step: tuple[tuple[int, float], ...]

    @classmethod
    def from_profiles(cls, profiles: Iterable[Profile]) -> LMSpeed | None:
        """The speed the language-model profiles in `profiles` (one artifact on one
        device) record, the newest per point; None without both a prefill and a decode one."""
        prefill: dict[int, float] = {}
        step: dict[int, float] = {}
        for p in profiles:  # recording order: the newest wins
            g = p.generation
            if g is None:
                continue
            if g.phase == "prefill":
                prefill[g.prompt_tokens] = p.latency.p50_ms
            else:
                step[p.batch] = p.latency.p50_ms
        if not prefill or not step:
            return None
        return cls(tuple(sorted(prefill.items())), tuple(sorted(step.items())))

    def prefill_ms(self, tokens: int) -> float:
        return _read(self.prefill, tokens)

    def step_ms(self, batch: int) -> float:
        return _read(self.step, max(1, batch))

    def call_costs(self, chunks: Sequence[int]) -> tuple[float, float] | None:
        """(ms every prefill call costs, ms per token of its chunk), fitted by least
        squares to the prefill points, each prompt read alone in the calls a device makes
        (`lm_calls.next_chunk`: the largest chunk the rest fills, else the smallest, padded
        to it). A small chunk's call costs more per token than a large one's (each reads
        all the weights), which the points' differences alone would miss. None when the
        points cannot tell the two apart (one chunk size: calls and tokens move together)
        or the fit is not physical: then a prompt costs what the points say, read in any chunks."""
        return _fit_calls(self.prefill, tuple(chunks))

    def read_ms(self, tokens: int, chunk: int | None, chunks: Sequence[int], *, riding: bool = False) -> float:
        """Time to read `tokens` of prompt in calls of `chunk` tokens (the last one padded;
        None: alone, the largest chunk the rest fills each time). `riding`: each chunk
        rides in a decode call (the `mixed` step), which pays the call's fixed part."""
        if tokens <= 0:
            return 0.0
        costs = self.call_costs(chunks)
        if costs is None:
            return self.prefill_ms(tokens)
        fixed, per = costs
        sizes = _calls(tokens, chunks) if chunk is None else [chunk] * math.ceil(tokens / chunk)
        return sum((0.0 if riding and chunk is not None else fixed) + per * c for c in sizes)

    def scaled(self, prefill: float, step: float) -> LMSpeed:
        return LMSpeed(tuple((n, ms * prefill) for n, ms in self.prefill), tuple((b, ms * step) for b, ms in self.step))


@functools.lru_cache(maxsize=1024)  # an estimate asks several times; the router and simulator per request and device
def _fit_calls(prefill: tuple[tuple[int, float], ...], chunks: tuple[int, ...]) -> tuple[float, float] | None:
    """`LMSpeed.call_costs` of these prefill points."""
    rows = []
    for n, ms in prefill:
        sizes = _calls(n, chunks)
        rows.append((len(sizes), sum(sizes), ms))
    k = [r[0] for r in rows]
    t = [r[1] for r in rows]
    y = [r[2] for r in rows]
    skk, stt, skt = sum(a * a for a in k), sum(b * b for b in t), sum(a * b for a, b in zip(k, t))
    sky, sty = sum(a * c for a, c in zip(k, y)), sum(b * c for b, c in zip(t, y))
    det = skk * stt - skt * skt
    if len(rows) > 1 and det > 1e-6 * skk * stt:
        fixed, per = (sky * stt - sty * skt) / det, (sty * skk - sky * skt) / det
        if fixed >= 0 and per > 0:
            return fixed, per
    return None


def _calls(tokens: int, chunks: Sequence[int]) -> list[int]:
    """The chunk sizes of the calls that read a prompt of `tokens` alone."""
    from hxc.lm_calls import next_chunk

    out, left = [], tokens
    while left > 0:  # bounded: every call reads at least one token
        c = next_chunk(chunks, left)
        out.append(c)
        left -= c
    return out


def _read(points: Sequence[tuple[int, float]], x: int) -> float:
    if len(points) == 1 or x <= points[0][0]:
        (x0, y0) = points[0]
        # One point: proportional above it (a prompt twice as long takes twice as long).
        return y0 if x <= x0 else y0 * x / x0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return max(y1, y1 + (y1 - y0) * (x - x1) / (x1 - x0))


class Calibration:
    """A device's speed as the profiles say and as it is measured live: each
    measurement moves a correction factor (prefill, decode) towards measured / predicted.
    Without a profile, the first measurements become the speed (proportional prefill,
    the same step at every batch) and the factors follow later ones. Not thread-safe:
    the router calls it under its lock."""

    def __init__(self, profiled: LMSpeed | None) -> None:
        self.profiled = profiled
        self._ttft: tuple[int, float] | None = None  # a measured (prompt tokens, ms) when there is no profile
        self._step: tuple[int, float] | None = None
        self.prefill_factor = 1.0
        self.step_factor = 1.0
        self.measured = {"ttft": 0, "step": 0}

    @property
    def speed(self) -> LMSpeed | None:
        """The corrected speed; None while unmeasured (no profile, nothing timed yet)."""
        base = self.profiled
        if base is None:
            if self._ttft is None or self._step is None:
                return None
            base = LMSpeed((self._ttft,), (self._step,))
        return base.scaled(self.prefill_factor, self.step_factor)

    def observe_ttft(self, predicted_ms: float | None, measured_ms: float, prompt_tokens: int) -> None:
        """A sequence's first token came `measured_ms` after it reached the device,
        where `predicted_ms` (with the correction then) was expected."""
        self.measured["ttft"] += 1
        if self.profiled is None and self._ttft is None:
            self._ttft = (max(1, prompt_tokens), measured_ms)
            return
        if predicted_ms is not None and predicted_ms > 0:
            self.prefill_factor = _moved(self.prefill_factor, self.prefill_factor * measured_ms / predicted_ms)

    def observe_step(self, batch: int, measured_ms: float) -> None:
        """A decode step of `batch` sequences took `measured_ms` (between two tokens of one sequence)."""
        self.measured["step"] += 1
        if self.profiled is None and self._step is None:
            self._step = (max(1, batch), measured_ms)
            return
        base = self.profiled.step_ms(batch) if self.profiled is not None else self._step[1]  # type: ignore[index]
        if base > 0:
            self.step_factor = _moved(self.step_factor, measured_ms / base)


def _moved(current: float, towards: float) -> float:
    return min(CLAMP[1], max(CLAMP[0], (1 - EWMA) * current + EWMA * towards))


@dataclass(frozen=True)
class DeviceLoad:
    """What a device holds now, as the estimate needs it."""

    decoding: int  # sequences running on it (holding a slot: decoding, or reading their prompt)
    slots: int  # sequences its cache holds at once
    waiting: int  # sequences routed to it, waiting for a slot
    prefill_tokens: int  # prompt tokens routed to it not yet read (waiting and running sequences)
    remaining: tuple[int, ...]  # output tokens each running sequence may still produce
    kv_free_tokens: int  # cached tokens its budget still has room for
    reading: int = 0  # of the running ones, those still reading their prompt (no decode call for them yet)


@dataclass(frozen=True)
class Breakdown:
    """The arithmetic of one estimate, for `hxc select --explain` and the routing view."""

    slot_wait_ms: float
    prefill_ms: float  # reading the prompts ahead and this one
    interleave_ms: float  # the decode calls in the steps that read it, the one its first token comes with included
    step_ms: float  # one decode step once it runs
    batch: int  # sequences in that step, itself included
    device_s: float  # device-seconds charged to it
    price_per_hour: float | None


def _marginal_decode_ms(speed: LMSpeed, remaining: Sequence[int], others: int, m: int) -> float:
    """The device time `m` decode steps of a new sequence add beside the running ones:
    while b others still decode, each step takes step(b + 1) instead of step(b); once
    they are done (or on an idle device) it pays whole steps, step(1), itself."""
    ends = sorted(remaining, reverse=True)[:others]  # the ones that still run beside it, longest first
    total, t = 0.0, 0
    for b in range(len(ends), -1, -1):  # b others decode until the b-th longest ends
        until = m if b == 0 else min(m, ends[b - 1])
        if until > t:
            total += (until - t) * (speed.step_ms(b + 1) - (speed.step_ms(b) if b else 0.0))
            t = until
    return total


def estimate(speed: LMSpeed | None, load: DeviceLoad, prompt_tokens: int, max_tokens: int, chunk: int,
             price_per_hour: float | None, kv_bytes_per_token: int, *, largest_chunk: int | None = None,
             mixed: bool = False) -> tuple[Estimate, Breakdown | None]:  # fmt: skip
    """The `Estimate` of a request of `prompt_tokens` and up to `max_tokens` output
    tokens on a device with `load`, and how it was reached (None when unmeasured: the
    estimate then has finish_ms None if the device is idle, infinity if it is busy).
    `chunk`: the prefill chunk a device reads while others decode; `largest_chunk` the
    one it reads when none does (default `chunk`). `mixed`: the model has the mixed
    step, so a chunk read while others decode rides in their decode call (its fixed
    part is the decode call's)."""
    headroom = (load.kv_free_tokens - prompt_tokens - max_tokens) * kv_bytes_per_token
    if speed is None:
        busy = load.decoding + load.waiting > 0
        return Estimate(math.inf if busy else None, kv_headroom_bytes=headroom), None
    m = max(1, max_tokens)
    big = max(chunk, largest_chunk or chunk)
    running, decoders = load.decoding, max(0, load.decoding - load.reading)
    # The slot: free now, or the soonest a running sequence can end after those already waiting take theirs.
    free = load.slots - running
    ahead = load.waiting - free
    wait = 0.0
    if ahead >= 0:
        ends = sorted(load.remaining)
        wait = (ends[min(ahead, len(ends) - 1)] if ends else 0) * speed.step_ms(running)
        running = decoders = load.slots - 1  # it starts beside a full batch less the one that ended
    # The prompts ahead of it are read first: a chunk a step, beside a decode call of those
    # decoding (in the smallest chunk then, else in the largest); by the time its own
    # prompt is read, every sequence ahead of it decodes.
    queued = load.prefill_tokens
    chunks = (chunk, big)
    ahead_steps = math.ceil(queued / (chunk if decoders else big)) if queued else 0
    others = min(running, load.slots - 1)
    own_steps = math.ceil(prompt_tokens / (chunk if others else big))
    # Reading in small chunks beside others costs each call's fixed part again (call_costs).
    if speed.call_costs(chunks) is None:
        own, prefill = speed.prefill_ms(prompt_tokens), speed.prefill_ms(queued + prompt_tokens)
    else:
        own = speed.read_ms(prompt_tokens, chunk if others else None, chunks, riding=mixed)
        prefill = speed.read_ms(queued, chunk if decoders else None, chunks, riding=mixed) + own
    # The last step's decode call (itself included, unless it wants one token) returns the
    # step's tokens, its first among them.
    last = speed.step_ms(others + 1) if m > 1 else speed.step_ms(others) if others else 0.0
    interleave = ((ahead_steps * speed.step_ms(decoders) if decoders else 0.0)
                  + ((own_steps - 1) * speed.step_ms(others) if others else 0.0) + last)  # fmt: skip
    ttft = wait + prefill + interleave
    batch = others + 1
    step = speed.step_ms(batch)
    # Prompts routed here after it are not known; those ahead of it are read before it decodes.
    tpot = step
    device_s = (own + _marginal_decode_ms(speed, load.remaining, others, m)) / 1000
    price = None if price_per_hour is None else price_per_hour / 3600 * device_s / m * 1000
    finish = ttft + (m - 1) * tpot
    return (Estimate(finish, ttft_ms=ttft, tpot_ms=tpot, kv_headroom_bytes=headroom, price_per_unit=price),
            Breakdown(wait, prefill, interleave, step, batch, device_s, price_per_hour))  # fmt: skip

"""Splitting work across devices of different speeds, and deciding which devices are
worth using. Pure bookkeeping, no processes and no clock of its own: the pool drives
it with real workers, `simulate.py` with simulated ones in virtual time.

Work is a sequence of units (batch rows, or whole requests for models without a batch
dimension) in a shared queue. Devices pull chunks as they have room (guided
self-scheduling weighted by speed): a chunk is what the device does in about
`target_s` at its estimated speed, but never more than it can finish before the
whole job should end with every device working (the horizon), so all devices finish
together, within about one chunk. A device too slow to finish even one unit before
that horizon gets nothing. Speeds start from the bench profiles and follow observed
timings from then on.
"""

from __future__ import annotations

import bisect
import collections
import math
import statistics
from collections.abc import Collection, Mapping
from dataclasses import dataclass


# Near the end a chunk is at most this fraction of the time left: guided
# self-scheduling's 1/k, which bounds the finish-time skew by a shrinking chunk.
TAIL_CHUNKS = 4


class Speed:
    """Items per second of one device: a prior (from profiles) until measured, then a
    moving average of observed chunks that forgets the prior at once."""

    def __init__(self, prior: float | None = None, alpha: float = 0.3) -> None:
        self.rate = prior if prior and prior > 0 else None
        self.source = "profile" if self.rate else None
        self.samples = 0
        self._alpha = alpha
        self._recent: collections.deque[float] = collections.deque(maxlen=16)

    def observe(self, items: int, seconds: float) -> None:
        if seconds <= 0 or items <= 0:
            return
        rate = items / seconds
        self.rate = rate if self.samples == 0 or self.rate is None else (1 - self._alpha) * self.rate + self._alpha * rate
        self.samples += 1
        self.source = "measured"
        self._recent.append(rate)

    @property
    def median(self) -> float | None:
        """The median of the recent observations: robust to a stall, for judgements."""
        return statistics.median(self._recent) if self._recent else self.rate

    def __repr__(self) -> str:
        return f"Speed({self.rate!r}, {self.source}, n={self.samples})"


@dataclass(frozen=True)
class Chunk:
    start: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count


class Balancer:
    """The shared queue of units and the rule for how many a device may take."""

    def __init__(self, target_s: float = 0.05, min_chunk_s: float = 0.005, probe_units: int = 1,
                 max_units: int | None = None) -> None:  # fmt: skip
        self.target_s = target_s
        self.max_units = max_units  # per chunk (1 for requests that cannot be merged)
        # A chunk costs a process hop and copies (~0.5 ms); shorter chunks would be mostly that.
        self.min_chunk_s = min_chunk_s
        self.probe_units = probe_units
        self._queue: list[tuple[int, int]] = []  # unassigned [start, end) ranges, sorted
        self._in_flight: dict[str, list[Chunk]] = {}
        self.open = False  # more units may still be added (a stream)

    def add(self, start: int, count: int) -> None:
        if count > 0:
            self._push(start, start + count)

    @property
    def unassigned(self) -> int:
        return sum(e - s for s, e in self._queue)

    def in_flight(self, device: str) -> list[Chunk]:
        return self._in_flight.get(device, [])

    @property
    def idle(self) -> bool:
        """Nothing left to assign or waiting on a device."""
        return not self._queue and not any(self._in_flight.values())

    def next_chunk(self, device: str, speeds: Mapping[str, Speed], active: Collection[str]) -> Chunk | None:
        """The next chunk for `device`, or None if it should take nothing now. `active`
        are the devices sharing this work (those healthy and not left out)."""
        if not self._queue:
            return None
        backlog = sum(c.count for c in self.in_flight(device))
        rate = speeds[device].rate
        if rate is None:
            # Unmeasured and no profile: one small probe, then sizes follow its timing.
            return None if backlog else self._take(device, self.probe_units)
        known = {d: speeds[d].rate for d in active if speeds[d].rate}
        fastest = max(known.values(), default=rate)
        target = self.target_s
        if self.open:
            budget = math.inf
        else:
            pending = self.unassigned + sum(c.count for d in active for c in self.in_flight(d))
            horizon = pending / sum(known.values() or [rate])
            budget = rate * horizon - backlog  # units it can still finish before the horizon
            # Chunks shrink as the end nears, so the last ones are short everywhere.
            target = max(self.min_chunk_s, min(target, horizon / TAIL_CHUNKS))
        # About `target` of work, at least one unit, and no more than fits before the horizon.
        size = min(max(1, int(rate * target)), self.unassigned, budget)  # type: ignore[call-overload]
        size = math.floor(size)
        if size < 1:
            # Only the fastest device (when free) must take a unit it cannot finish in time:
            # someone has to, and nobody would finish it sooner.
            if rate < fastest or backlog:
                return None
            size = 1
        return self._take(device, size)

    def done(self, device: str, chunk: Chunk) -> None:
        self._in_flight[device].remove(chunk)

    def shrink(self, device: str, chunk: Chunk, count: int) -> Chunk:
        """Keep only the first `count` units of a chunk just taken; the rest go back."""
        if count >= chunk.count:
            return chunk
        kept = Chunk(chunk.start, count)
        flight = self._in_flight[device]
        flight[flight.index(chunk)] = kept
        self._push(kept.end, chunk.end)
        return kept

    def failed(self, device: str, chunk: Chunk) -> None:
        """`chunk` did not complete on `device`: its units go back to the front."""
        self._in_flight[device].remove(chunk)
        self._push(chunk.start, chunk.end)

    def _take(self, device: str, size: int) -> Chunk:
        if self.max_units is not None:
            size = min(size, self.max_units)
        start, end = self._queue[0]
        count = min(size, end - start)
        if start + count == end:
            self._queue.pop(0)
        else:
            self._queue[0] = (start + count, end)
        chunk = Chunk(start, count)
        self._in_flight.setdefault(device, []).append(chunk)
        return chunk

    def _push(self, start: int, end: int) -> None:
        i = bisect.bisect(self._queue, (start, end))
        self._queue.insert(i, (start, end))
        # Merge neighbours so chunks can span what was split by a failure.
        merged: list[tuple[int, int]] = []
        for s, e in self._queue:
            if merged and merged[-1][1] == s:
                merged[-1] = (merged[-1][0], e)
            else:
                merged.append((s, e))
        self._queue = merged


class Overlap:
    """Classifies each finished chunk as run alone (no other device busy at any point
    of it) or shared (every other device busy throughout), for the judgement below."""

    def __init__(self) -> None:
        self._busy_since: dict[str, float | None] = {}
        self._idle_since: dict[str, float] = {}

    def busy(self, device: str, now: float, busy: bool) -> None:
        """Record that `device` has (or no longer has) work in flight."""
        was = self._busy_since.get(device)
        if busy and was is None:
            self._busy_since[device] = now
        elif not busy and was is not None:
            self._busy_since[device] = None
            self._idle_since[device] = now

    def classify(self, device: str, started: float, ended: float, others: Collection[str]) -> str | None:
        """"solo", "shared", or None (partly overlapped) for a chunk on `device`."""
        if not others:
            return "solo"
        alone = all(self._busy_since.get(o) is None and self._idle_since.get(o, -math.inf) <= started for o in others)
        if alone:
            return "solo"
        together = all((since := self._busy_since.get(o)) is not None and since <= started for o in others)
        return "shared" if together else None


def judge(solo: Mapping[str, float | None], shared: Mapping[str, float | None]) -> dict[str, str]:
    """Devices that cost more than they add, each with the reason.

    A device adds its own rate while sharing the work; it costs what the others lose
    while it runs (their rate alone minus their rate beside it: CPU cores or memory it
    competes for). It is left out when the cost is larger. The fastest device alone is
    never left out; a device without a rate beside the others is not judged, and one
    never measured alone adds nothing to the cost of the others."""
    alone = {d: r for d, r in solo.items() if r}
    if not alone:
        return {}
    best = max(alone, key=lambda d: alone[d])
    out: dict[str, str] = {}
    for d in sorted((d for d in shared if d != best and shared[d]), key=lambda d: shared[d]):  # type: ignore[arg-type,return-value]
        adds = shared[d]
        losses = {o: alone[o] - shared[o] for o in alone if o != d and o not in out and shared.get(o) and alone[o] > shared[o]}  # type: ignore[operator]
        cost = sum(losses.values())
        if cost > adds:  # type: ignore[operator]
            worst = max(losses, key=lambda o: losses[o])
            out[d] = (f"adds {adds:.4g} items/s but costs {cost:.4g}: {worst} does {shared[worst]:.4g} items/s "
                      f"beside it against {alone[worst]:.4g} alone")  # fmt: skip
    return out

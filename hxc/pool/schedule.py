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

At the end of a call (nothing left unassigned), a device with room may compute a
backup copy of a chunk another device holds, when it would finish the copy well before
the holder is predicted to finish the original (MapReduce's backup tasks): a slow
device's last chunk no longer keeps the fast ones idle. A chunk held by a device not
measured yet (its one-unit probe) is always copied: nothing predicts when it ends. The
first copy to finish counts; the other becomes stale: its device is still busy with it
(it counts in that device's backlog, also in the next call, via `hold`), and its result
is dropped.
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
# A chunk runs at least this many times its device's fixed cost per call (so that cost
# stays under a fifth of the device's time).
FIXED_COST_SHARE = 5.0
# A backup copy is made only if the idle device would finish it within this fraction of
# the time the holder still needs: a copy that saves little still costs a slot (and,
# on devices sharing cores, the original's speed).
BACKUP_GAIN = 0.5
# The fixed-cost fit needs chunk sizes at least this far apart (largest / smallest).
FIT_SPREAD = 1.5
# Chunk-size search (`Speed.next_scale`): chunks per size in a trial, how much faster per
# item the smaller size must be to be adopted, and the shortest chunk it may try (a
# chunk also costs the caller a process hop and copies, which device time leaves out).
TUNE_TRIALS = 3
TUNE_GAIN = 1.05
TUNE_MIN_S = 0.02


class Speed:
    """How fast one device works: a prior (from profiles) until measured, then a moving
    average of items per second over full-sized chunks that forgets the prior at once,
    and a fit of chunk time = fixed cost per call + items / marginal rate over the recent
    chunks of every size (a call's fixed cost dominates small chunks on some devices:
    lavapipe spends ~100 ms on any call).

    It also finds how long the device's chunks should be to work fastest (`scale`, a
    fraction of the pool's chunk time). Time per item is not constant in the chunk
    size: past a model-specific size IREE's CPU code gets much slower per row (the
    example CNN on this 2-core host: 0.19-0.23 ms per row in chunks of 64-224 rows,
    0.28-0.31 ms from 256 up; the MLP past ~100,000 rows), and a chunk sized by time
    alone can sit past that cliff. So once measured, chunks of half the time are tried,
    in turn with full ones; the half is kept if it is clearly faster per item, and then
    its half is tried, down to TUNE_MIN_S. A device with a large fixed cost per call
    measures its half-time chunks slower and keeps its size."""

    def __init__(self, prior: float | None = None, alpha: float = 0.3) -> None:
        self.rate = prior if prior and prior > 0 else None
        self.source = "profile" if self.rate else None
        self.samples = 0
        self._alpha = alpha
        self._recent: collections.deque[float] = collections.deque(maxlen=16)  # items/s of full chunks
        self._chunks: collections.deque[tuple[int, float]] = collections.deque(maxlen=16)  # (items, seconds), all
        self._fit: tuple[float, float] | None | bool = False  # cached fit(); False: not computed since the last chunk
        self._good_fit: tuple[float, float] | None = None  # the last fit made from sizes that differed enough
        self.scale = 1.0  # the best fraction of the chunk time found so far
        self.tuned = False  # the search has ended
        self._trial: dict[float, list[float]] | None = None  # {scale: items/s} for the scale and its half
        self._handed: dict[int, float] = {}  # chunk size -> the scale it was handed out at, during a trial
        self._turn = 0

    def next_scale(self, min_scale: float) -> float:
        """The fraction of the chunk time for the next full chunk: the best found, or
        during a trial, it and its half in turn (no half below `min_scale`)."""
        if self.tuned or self.samples < TUNE_TRIALS:
            return self.scale
        if self._trial is None:
            if self.scale / 2 < min_scale:
                self.tuned = True
                return self.scale
            self._trial = {self.scale: [], self.scale / 2: []}
            self._handed = {}
        # In turn, so both see the same conditions (the other devices, other load).
        self._turn += 1
        return self.scale if self._turn % 2 else self.scale / 2

    def handed(self, items: int, scale: float) -> None:
        """A chunk of `items` was handed out at `scale` (so its timing counts for it)."""
        if self._trial is not None:
            # A size both arms produced would say nothing about either.
            self._handed[items] = scale if self._handed.get(items, scale) == scale else math.nan

    def _tune(self, items: int, seconds: float) -> None:
        trial = self._trial
        scale = self._handed.get(items)
        if trial is None or scale not in trial:
            return
        trial[scale].append(items / seconds)
        if min(len(v) for v in trial.values()) < TUNE_TRIALS:
            return
        self._trial = None
        half = self.scale / 2
        if statistics.median(trial[half]) >= TUNE_GAIN * statistics.median(trial[self.scale]):
            self.scale = half
        else:
            self.tuned = True

    def observe(self, items: int, seconds: float, full: bool = True) -> None:
        """A chunk of `items` took `seconds`; `full=False` for one cut short (a call's
        last chunks), which only informs the fixed-cost fit."""
        if seconds <= 0 or items <= 0:
            return
        self._chunks.append((items, seconds))
        self._fit = False
        self._tune(items, seconds)
        if not full and self.samples:
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

    @property
    def error(self) -> float:
        """The standard error of `median`, in items/s, from the spread of the recent
        rates (MAD-based, so one stall does not inflate it); 0 before two."""
        if len(self._recent) < 2:
            return 0.0
        med = statistics.median(self._recent)
        mad = statistics.median(abs(r - med) for r in self._recent)
        return 1.2533 * 1.4826 * mad / math.sqrt(len(self._recent))

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds per call, items per second beyond it), by least squares over the
        recent chunks, once their sizes differ; None before. The scheduler asks for it
        several times per chunk handed out, so it is computed once per observed chunk."""
        if self._fit is False:
            self._fit = self._least_squares()
        return self._fit  # type: ignore[return-value]

    def _least_squares(self) -> tuple[float, float] | None:
        xs = [float(n) for n, _ in self._chunks]
        if not xs or max(xs) < FIT_SPREAD * min(xs):
            # Sizes too alike to tell a fixed cost from noise (a device at a steady size):
            # keep the last fit. A fit through them could put the fixed cost anywhere up
            # to a whole chunk's time, and chunks would then grow 5x for no reason.
            return self._good_fit
        ys = [t for _, t in self._chunks]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        if slope <= 0:
            return self._good_fit
        self._good_fit = min(max(0.0, my - slope * mx), min(ys)), 1 / slope
        return self._good_fit

    @property
    def fixed_s(self) -> float:
        """The fixed cost of a call: from the fit, else at most the quickest chunk seen.
        (An estimate too high costs only coarser chunks, one too low costs throughput:
        lavapipe pinned to one core spends 0.2-1.5 s on any call.)"""
        fit = self.fit()
        if fit is not None:
            return fit[0]
        return min((t for _, t in self._chunks), default=0.0)

    def units_for(self, seconds: float) -> float:
        """How many items fit in a chunk of `seconds`."""
        fit = self.fit()
        if fit is not None:
            return (seconds - fit[0]) * fit[1]
        return (self.rate or 0.0) * seconds

    def seconds_for(self, items: int) -> float | None:
        """How long one call of `items` should take (None before anything is known)."""
        fit = self.fit()
        if fit is not None:
            return fit[0] + items / fit[1]
        return items / self.rate if self.rate else None

    def __repr__(self) -> str:
        return f"Speed({self.rate!r}, {self.source}, n={self.samples}, fixed={self.fixed_s:.3g} s)"


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
                 max_units: int | None = None, backups: bool = True, tune: bool = True) -> None:  # fmt: skip
        self.target_s = target_s
        self.backups = backups
        self.tune = tune  # look for a shorter chunk time a device works faster at (`Speed.next_scale`)
        self.max_units = max_units  # per chunk (1 for requests that cannot be merged)
        # A chunk costs a process hop and copies (~0.5 ms); shorter chunks would be mostly that.
        self.min_chunk_s = min_chunk_s
        self.probe_units = probe_units
        self._queue: list[tuple[int, int]] = []  # unassigned [start, end) ranges, sorted
        self._in_flight: dict[str, list[Chunk]] = {}
        # Copies whose result will be dropped (another copy finished first), still running.
        self._stale: dict[str, list[Chunk]] = {}
        # Everything a device holds, in the order it runs them, and when the first started.
        self._order: dict[str, list[Chunk]] = {}
        self._since: dict[str, float] = {}
        self.open = False  # more units may still be added (a stream)
        self.copies = 0  # backup copies handed out
        self.wasted = 0  # units of copies that lost (their results dropped)

    def add(self, start: int, count: int) -> None:
        if count > 0:
            self._push(start, start + count)

    @property
    def unassigned(self) -> int:
        return sum(e - s for s, e in self._queue)

    def in_flight(self, device: str) -> list[Chunk]:
        return self._in_flight.get(device, [])

    def stale(self, device: str) -> list[Chunk]:
        """Chunks `device` is still computing whose results will be dropped."""
        return self._stale.get(device, [])

    def held(self, device: str) -> int:
        """How many chunks `device` holds, stale ones included: what fills its slots."""
        return len(self.in_flight(device)) + len(self.stale(device))

    def hold(self, device: str, chunk: Chunk) -> None:
        """`device` is still busy with `chunk` of an earlier call (a stale copy): count it
        in its backlog until `drop(device, chunk, stale=True)`."""
        self._stale.setdefault(device, []).append(chunk)
        self._order.setdefault(device, []).append(chunk)

    @property
    def idle(self) -> bool:
        """Nothing left to assign or waiting on a device."""
        return not self._queue and not any(self._in_flight.values())

    def next_chunk(self, device: str, speeds: Mapping[str, Speed], active: Collection[str],
                   now: float | None = None) -> Chunk | None:  # fmt: skip
        """The next chunk for `device`, or None if it should take nothing now. `active`
        are the devices sharing this work (those healthy and not left out). `now` (any
        clock, the same in every call) lets it predict when devices finish, for backups."""
        if not self._queue:
            return self._backup(device, speeds, active, now)
        backlog = sum(c.count for c in self._order.get(device, []))
        speed = speeds[device]
        rate = self.rate(speed)
        if rate is None:
            # Unmeasured and no profile: one small probe, then sizes follow its timing.
            return None if backlog else self._take(device, self.probe_units)
        known = {d: r for d in active if (r := self.rate(speeds[d]))}
        fastest = max(known.values(), default=rate)
        target = self.chunk_s(speed)
        if self.open or set(known) <= {device}:
            # A stream has no known end; a device working alone has nobody to finish
            # together with, so shrinking its last chunks would only add hops. Devices
            # not measured yet do not count: they take a one-unit probe at most, and a
            # probe is copied at the call's end rather than waited for.
            budget = math.inf
        else:
            pending = self.unassigned + sum(c.count for d in active for c in self.in_flight(d))
            horizon = pending / sum(known.values() or [rate])
            # Units it can still finish before the horizon, after what it already holds.
            budget = max(0.0, speed.units_for(horizon) if speed.fit() else rate * horizon) - backlog
            # Chunks shrink as the end nears, so the last ones are short everywhere.
            target = max(self.min_chunk_s, min(target, horizon / TAIL_CHUNKS))
        scale, full = 1.0, self.chunk_s(speed)
        if self.tune and self.max_units is None and target >= full * speed.scale:
            # Not cut by a call's tail: the fraction of the time this device works fastest at.
            # Down to TUNE_MIN_S: the measured rates, not the fixed-cost estimate, decide.
            scale = speed.next_scale(TUNE_MIN_S / full)
            target = full * scale
        # About `target` of work, at least one unit, and no more than fits before the horizon.
        size = min(max(1, int(speed.units_for(target))), self.unassigned, budget)  # type: ignore[call-overload]
        size = math.floor(size)
        speed.handed(size, scale)
        if size < 1:
            # Only the fastest device (when free) must take a unit it cannot finish in time:
            # someone has to, and nobody would finish it sooner.
            if rate < fastest or backlog:
                return None
            size = 1
        return self._take(device, size, now)

    def _backup(self, device: str, speeds: Mapping[str, Speed], active: Collection[str], now: float | None) -> Chunk | None:
        """A copy of the chunk held elsewhere whose copy here would gain the most, if any
        gains enough (see BACKUP_GAIN); only once nothing is left to assign in a call."""
        if not self.backups or self.open or now is None or device not in active:
            return None
        mine = self._ends(device, speeds[device], now)
        if mine is None:
            return None
        free = mine[-1] if mine else now
        best: tuple[float, Chunk] | None = None
        for other, chunks in self._in_flight.items():
            if other == device or not chunks:
                continue
            # A holder not measured yet may take any time (lavapipe's first call: 0.2-2.6 s
            # for one row), so its chunks are always worth a copy: a call never waits on
            # a device before it is measured, and the holder is measured all the same.
            ends = self._ends(other, speeds[other], now)
            held = self._order[other]
            for chunk in chunks:
                if any(chunk in self.in_flight(d) for d in self._in_flight if d != other):
                    continue  # already has a copy
                theirs = math.inf if ends is None else ends[held.index(chunk)] - now
                ours = speeds[device].seconds_for(chunk.count)
                if ours is None or free + ours - now > BACKUP_GAIN * theirs:
                    continue
                if best is None or theirs > best[0]:
                    best = (theirs, chunk)
        if best is None:
            return None
        chunk = best[1]
        self._in_flight.setdefault(device, []).append(chunk)
        self._add_order(device, chunk, now)
        self.copies += 1
        return chunk

    def _ends(self, device: str, speed: Speed, now: float) -> list[float] | None:
        """When each chunk `device` holds should finish, in the order it runs them (None
        if its speed is not known). A head chunk already past its prediction (a stall,
        a hang its deadline has not caught yet) is given half its predicted time again:
        how late it will be is unknown, and such stragglers are what backups are for."""
        ends, at = [], now
        for i, chunk in enumerate(self._order.get(device, [])):
            seconds = speed.seconds_for(chunk.count)
            if seconds is None:
                return None
            if i == 0:
                predicted = self._since.get(device, now) + seconds
                at = predicted if predicted > now else now + seconds / 2
            else:
                at += seconds
            ends.append(at)
        return ends

    def rate(self, speed: Speed) -> float | None:
        """Items per second a device does in chunks of its usual length, its fixed cost
        per call included."""
        if speed.fit() is None:
            return speed.rate
        chunk = self.chunk_s(speed) * speed.scale
        return speed.units_for(chunk) / chunk

    def chunk_s(self, speed: Speed) -> float:
        """How long a device's chunks should run: `target_s`, or long enough that its
        fixed cost per call stays a small part of them."""
        return max(self.target_s, FIXED_COST_SHARE * speed.fixed_s)

    def full_size(self, speed: Speed) -> int:
        """Chunks at least this big are full-sized for `speed` (not cut short at the end)."""
        # Above half: the half-time chunks of a size trial are not full-sized either.
        return max(1, int(0.6 * speed.units_for(self.chunk_s(speed) * speed.scale)))

    def done(self, device: str, chunk: Chunk, now: float | None = None) -> bool:
        """`device` finished `chunk`: True if this copy counts (the first to finish),
        False for a stale copy whose result must be dropped. Other copies become stale."""
        self._finished(device, chunk, now)
        if chunk in self.stale(device):
            self._stale[device].remove(chunk)
            return False
        self._in_flight[device].remove(chunk)
        for other, chunks in self._in_flight.items():
            if chunk in chunks:
                chunks.remove(chunk)
                self._stale.setdefault(other, []).append(chunk)
                self.wasted += chunk.count
        return True

    def drop(self, device: str, chunk: Chunk, now: float | None = None, *, stale: bool = False) -> None:
        """A copy on `device` ended without counting (another copy's result was stored
        first); `stale=True` for one held over from an earlier call (`hold`)."""
        self._finished(device, chunk, now)
        if not stale and chunk in self.in_flight(device):
            self._in_flight[device].remove(chunk)
        elif chunk in self.stale(device):
            self._stale[device].remove(chunk)

    def _finished(self, device: str, chunk: Chunk, now: float | None) -> None:
        order = self._order.get(device, [])
        if chunk in order:
            order.remove(chunk)
        if now is not None:
            self._since[device] = now  # the next one it holds starts now

    def shrink(self, device: str, chunk: Chunk, count: int) -> Chunk:
        """Keep only the first `count` units of a chunk just taken; the rest go back."""
        if count >= chunk.count:
            return chunk
        kept = Chunk(chunk.start, count)
        flight = self._in_flight[device]
        flight[flight.index(chunk)] = kept
        order = self._order[device]
        order[order.index(chunk)] = kept
        self._push(kept.end, chunk.end)
        return kept

    def failed(self, device: str, chunk: Chunk, now: float | None = None) -> bool:
        """`chunk` did not complete on `device`: its units go back to the front, unless
        another copy of it still runs (or it was stale). True if they went back."""
        self._finished(device, chunk, now)
        if chunk in self.in_flight(device):
            self._in_flight[device].remove(chunk)
            if not any(chunk in chunks for chunks in self._in_flight.values()):
                self._push(chunk.start, chunk.end)
                return True
        elif chunk in self.stale(device):
            self._stale[device].remove(chunk)
        return False

    def _add_order(self, device: str, chunk: Chunk, now: float | None) -> None:
        order = self._order.setdefault(device, [])
        if not order and now is not None:
            self._since[device] = now
        order.append(chunk)

    def _take(self, device: str, size: int, now: float | None = None) -> Chunk:
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
        self._add_order(device, chunk, now)
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


def judge(solo: Mapping[str, float | None], shared: Mapping[str, float | None],
          noise: Mapping[str, float] | None = None, contended: Collection[str] = ()) -> dict[str, str]:  # fmt: skip
    """Devices that cost more than they add, each with the reason.

    A device adds its own rate while sharing the work; it costs what the others lose
    while it runs (their rate alone minus their rate beside it: CPU cores or memory it
    competes for). The fastest device alone is never left out; a device without a rate
    beside the others is not judged, and one never measured alone adds nothing to the
    cost of the others.

    Rates are noisy (the example MLP's swing 2x from one second to the next), so the
    cost is known only within `noise`: each device's standard error of (rate alone -
    rate beside), in items/s. Who must prove what depends on whether a device competes
    for the others' cores (`contended`: a software device on the CPU's cores). Such a
    device is left out unless it adds more than it costs by twice the noise: it is
    expected to cost, and a gain lost in the noise is not worth a process and a share
    of the cores. Any other device (a GPU; one pinned to cores of its own) is expected
    to cost nothing and is left out only when it costs more than it adds by twice the
    noise."""
    alone = {d: r for d, r in solo.items() if r}
    if not alone:
        return {}
    noise = noise or {}
    best = max(alone, key=lambda d: alone[d])
    out: dict[str, str] = {}
    for d in sorted((d for d in shared if d != best and shared[d]), key=lambda d: shared[d]):  # type: ignore[arg-type,return-value]
        adds: float = shared[d]  # type: ignore[assignment]
        others = [o for o in alone if o != d and o not in out and shared.get(o)]
        losses = {o: alone[o] - shared[o] for o in others}  # type: ignore[operator]
        cost = sum(max(0.0, x) for x in losses.values())
        margin = 2 * math.sqrt(sum(noise.get(o, 0.0) ** 2 for o in others))
        if d in contended and adds - cost <= margin:
            worst = max(losses, key=lambda o: losses[o], default=None)
            beside = (f": {worst} does {shared[worst]:.4g} items/s beside it against {alone[worst]:.4g} alone"
                      if worst is not None else "")  # fmt: skip
            verdict = "costs more than it adds" if cost > adds else "adds no more than it may cost"
            out[d] = f"{verdict}: adds {adds:.4g} items/s, costs {cost:.4g} (+-{margin:.3g}){beside}"
        elif d not in contended and cost - margin > adds:
            worst = max(losses, key=lambda o: losses[o])
            out[d] = (f"adds {adds:.4g} items/s but costs {cost:.4g}: {worst} does {shared[worst]:.4g} items/s "
                      f"beside it against {alone[worst]:.4g} alone")  # fmt: skip
    return out

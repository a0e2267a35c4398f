"""The pool's scheduler on simulated devices in virtual time: speeds of any ratio, noisy
chunk times, profiles that are off, a device that dies mid-run. It exercises exactly
the `Balancer` and `Speed` the real pool uses, so what it shows about balancing holds
for the real pool too (`benchmarks/pool.py` runs both)."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from hxc.pool.schedule import Balancer, Chunk, Speed


@dataclass(frozen=True)
class SimDevice:
    name: str
    speed: float  # items per second, true mean
    prior_error: float = 1.0  # the profile says speed x this
    per_chunk_s: float = 0.0005  # fixed cost of a chunk (the process hop, copies)
    noise: float = 0.1  # each chunk takes (1 +- noise) x its mean time, uniformly
    fails_at: float | None = None  # virtual time at which it dies
    detect_s: float = 0.0  # how long until the pool notices (0: a crash; a deadline for a hang)
    # Chunks of more than `cliff` units run `cliff_slowdown` x slower per unit (caches:
    # IREE's CPU code on the example CNN past ~250 rows); `speed` is the speed below it.
    cliff: int | None = None
    cliff_slowdown: float = 1.5

    def seconds(self, units: int) -> float:
        slow = self.cliff_slowdown if self.cliff is not None and units > self.cliff else 1.0
        return self.per_chunk_s + units * slow / self.speed


@dataclass
class SimResult:
    units: int
    makespan_s: float
    ideal_s: float  # all devices busy until the end, at their true mean speeds
    finish_s: dict[str, float]  # when each device finished its last chunk
    units_done: dict[str, int]
    chunks: dict[str, int]
    chunk_s: float  # one chunk: the target, or one unit of the slowest device if longer
    lost: int  # units assigned to a device that died (re-queued)
    dead: frozenset[str]
    done: list[int] = field(repr=False, default_factory=list)  # completions per unit: all 1 if nothing was lost or doubled
    backups: int = 0  # backup copies handed out
    wasted: int = 0  # units computed by a copy that finished second (dropped)

    @property
    def efficiency(self) -> float:
        return self.ideal_s / self.makespan_s

    @property
    def skew_s(self) -> float:
        """Spread of the finish times of the devices that worked and stayed alive."""
        alive = [t for d, t in self.finish_s.items() if self.units_done[d] and d not in self.dead]
        return max(alive) - min(alive) if alive else 0.0


def simulate(devices: list[SimDevice], units: int, *, target_s: float = 0.05, slots: int = 2, seed: int = 0,
             backups: bool = True, warmup: int = 0, tune: bool = True) -> SimResult:  # fmt: skip
    """Run `units` across `devices`; `warmup` units first, in a call of their own, so
    that speeds (and fixed costs) are measured as in a pool's later calls (the result
    is for the second call only; a copy still running from the first keeps its device
    busy into it, as in the pool)."""
    rng = random.Random(seed)
    speeds = {d.name: Speed(d.speed * d.prior_error) for d in devices}
    start_at = 0.0
    carried: dict[str, list[tuple[float, Chunk, float]]] = {}
    free_at = {d.name: 0.0 for d in devices}
    if warmup:
        first = _run(devices, warmup, speeds, free_at, {}, 0.0, target_s, slots, rng, backups, tune)
        start_at, carried = first[0].makespan_s, first[1]
    return _run(devices, units, speeds, free_at, carried, start_at, target_s, slots, rng, backups, tune)[0]


def _run(devices: list[SimDevice], units: int, speeds: dict[str, Speed], free_at: dict[str, float],
         carried: dict[str, list[tuple[float, Chunk, float]]], t0: float, target_s: float, slots: int,
         rng: random.Random, backups: bool, tune: bool) -> tuple[SimResult, dict[str, list[tuple[float, Chunk, float]]]]:  # fmt: skip
    balancer = Balancer(target_s, backups=backups, tune=tune)
    balancer.add(0, units)
    by_name = {d.name: d for d in devices}
    active = {d.name for d in devices}
    finish = {d.name: t0 for d in devices}
    done_units = {d.name: 0 for d in devices}
    chunks = {d.name: 0 for d in devices}
    done = [0] * units
    events: list[tuple[float, int, str, str, Chunk | None, float]] = []  # (time, seq, kind, device, chunk, duration)
    seq = 0
    lost = 0
    # (end, chunk, duration) of every chunk handed out: copies still running when the call ends carry over.
    stale_ends: dict[str, list[tuple[float, Chunk, float]]] = {}
    for name, held in carried.items():
        for end, chunk, duration in held:
            balancer.hold(name, chunk)
            heapq.heappush(events, (end, seq, "stale", name, chunk, duration))
            seq += 1
    for d in devices:
        if d.fails_at is not None:
            heapq.heappush(events, (d.fails_at + d.detect_s, seq, "fail", d.name, None, 0.0))
            seq += 1

    def pump(now: float) -> None:
        nonlocal seq
        for name in sorted(active):
            dev = by_name[name]
            while balancer.held(name) < slots:
                chunk = balancer.next_chunk(name, speeds, active, now)
                if chunk is None:
                    break
                mean = dev.seconds(chunk.count)
                duration = mean * (1 + rng.uniform(-dev.noise, dev.noise))
                start = max(now, free_at[name])
                free_at[name] = start + duration
                heapq.heappush(events, (start + duration, seq, "done", name, chunk, duration))
                stale_ends.setdefault(name, []).append((start + duration, chunk, duration))
                seq += 1

    pump(t0)
    now = t0
    while events and not (balancer.idle and all(done)):
        now, _, kind, name, chunk, duration = heapq.heappop(events)
        dev = by_name[name]
        if kind == "stale":
            # As the pool: the copy's result is dropped, its timing kept.
            balancer.drop(name, chunk, now, stale=True)
            speeds[name].observe(chunk.count, duration, chunk.count >= balancer.full_size(speeds[name]))
            pump(now)
            continue
        if kind == "fail":
            active.discard(name)
            for c in [*balancer.in_flight(name), *balancer.stale(name)]:
                if balancer.failed(name, c):
                    lost += c.count
            pump(now)
            continue
        if name not in active or (chunk not in balancer.in_flight(name) and chunk not in balancer.stale(name)):
            continue  # finished after the device died: never delivered
        if dev.fails_at is not None and now > dev.fails_at:
            continue  # the device was dead by then; the failure event re-queues it
        stale_ends[name].remove((now, chunk, duration))
        speeds[name].observe(chunk.count, duration, chunk.count >= balancer.full_size(speeds[name]))
        if not balancer.done(name, chunk, now):
            pump(now)
            continue
        for u in range(chunk.start, chunk.end):
            done[u] += 1
        done_units[name] += chunk.count
        chunks[name] += 1
        finish[name] = now
        pump(now)
    dead = frozenset(d.name for d in devices if d.fails_at is not None and d.fails_at < max(finish.values()))
    chunk_s = max(target_s, max(1 / d.speed for d in devices if done_units[d.name]))
    # The call ends when every unit is done; copies still running carry into the next.
    end = max(finish.values())
    carry = {n: [(e, c, s) for e, c, s in held if e > end] for n, held in stale_ends.items() if n in active}
    result = SimResult(units, end - t0, _ideal(devices, units), {n: f - t0 for n, f in finish.items()}, done_units, chunks,
                       chunk_s, lost, dead, done, balancer.copies, balancer.wasted)  # fmt: skip
    return result, carry


def _ideal(devices: list[SimDevice], units: int) -> float:
    """The time T at which sum(speed x time alive before T) reaches `units`."""
    lo, hi = 0.0, units / min(d.speed for d in devices) * 2 + max((d.fails_at or 0) for d in devices)
    for _ in range(100):
        mid = (lo + hi) / 2
        work = sum(d.speed * (mid if d.fails_at is None else min(mid, d.fails_at)) for d in devices)
        lo, hi = (mid, hi) if work < units else (lo, mid)
    return hi

"""The records every routing policy shares: what a request asks for, what is known of
each place it may go (an `Estimate`), and the ranking rules that do not depend on the
policy (an unmeasured device is measured, a deadline no one meets goes to the soonest).

`Estimate` has room for what the language-model router (time to first token, time
per output token, KV-cache headroom) and the fleet router (price per unit on other
hosts) will know; a field nobody filled is None and a policy that needs it treats the
candidate as unknown there, never as free or instant.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Estimate:
    """What routing a request to one candidate now is expected to cost."""

    # When the request would be done, in ms from now: None for a candidate never measured
    # that is idle (it may take a request, to be measured); infinity for one never
    # measured that is busy (nobody can say).
    finish_ms: float | None
    ttft_ms: float | None = None  # time to the first output token (language models)
    tpot_ms: float | None = None  # time per output token after the first
    kv_headroom_bytes: int | None = None  # KV-cache bytes still free for a new sequence
    price_per_unit: float | None = None  # in the price table's currency, per unit of work (a row here)


@dataclass(frozen=True)
class Request:
    """What a policy may know of the request being routed."""

    units: int  # rows of a batch, or 1 for a whole request (a sequence's output tokens for a language model)
    slo_ms: float | None = None  # the request's deadline from now, if it has one
    ttft_ms: float | None = None  # a language model's: time to the first token, at most
    tpot_ms: float | None = None  # ... and time per output token after it, at most


@dataclass(frozen=True)
class Candidate:
    """A place the request may go: its name (an artifact id, which names a device), its
    estimate, how many requests it already holds (a tie-break when nothing is known),
    and the caller's own handle on it, which policies pass through untouched."""

    name: str
    estimate: Estimate
    load: int = 0
    handle: Any = None


def rank(request: Request, candidates: Sequence[Candidate], among_meeting: Callable[[Candidate], Any]) -> list[Candidate]:
    """The ranking every policy shares, best first; `among_meeting` orders the
    candidates expected to meet the request's deadline (all measured ones, without a
    deadline), which is where policies differ.

    A candidate never measured that is idle comes first when there is no deadline or no
    measured one meets it: it has to take a request to be measured, and a deadline a
    measured candidate meets is not risked on it. Then those meeting the deadline, then
    the measured ones that miss it, soonest first, then the busy unmeasured, least
    loaded first. Sorts are stable: among equals, the caller's order (best device
    first) decides."""
    finish = {id(c): c.estimate.finish_ms for c in candidates}
    known = [c for c in candidates if finish[id(c)] is not None and math.isfinite(finish[id(c)])]  # type: ignore[arg-type]
    unmeasured = [c for c in candidates if finish[id(c)] is None]
    busy = sorted((c for c in candidates if finish[id(c)] is not None and not math.isfinite(finish[id(c)])),  # type: ignore[arg-type]
                  key=lambda c: c.load)  # fmt: skip
    meets = [c for c in known if expected_to_meet(request, c.estimate)]
    met = {id(c) for c in meets}
    # Those that miss: soonest first (the first token, for a language model with a TTFT target).
    # Either way a candidate with the KV cache for the request goes before one without.
    late = sorted((c for c in known if id(c) not in met), key=lambda c: (not _fits(c.estimate), soonest(request, c.estimate)))
    meets = sorted(meets, key=lambda c: (not _fits(c.estimate), among_meeting(c)))
    if unmeasured and (not has_targets(request) or not meets):
        return [*unmeasured, *meets, *late, *busy]
    return [*meets, *unmeasured, *late, *busy]


def has_targets(request: Request) -> bool:
    return request.slo_ms is not None or request.ttft_ms is not None or request.tpot_ms is not None


def soonest(request: Request, e: Estimate) -> float:
    """What "soonest" means for this request: its first token when it has a TTFT target,
    else its finish."""
    if request.ttft_ms is not None and e.ttft_ms is not None:
        return e.ttft_ms
    return e.finish_ms if e.finish_ms is not None else math.inf


def _fits(e: Estimate) -> bool:
    return e.kv_headroom_bytes is None or e.kv_headroom_bytes >= 0


def expected_to_meet(request: Request, e: Estimate) -> bool:
    """Whether a measured estimate meets every target the request has; a target the
    estimate cannot judge (no TTFT estimate for a TTFT target) is not met. KV room is
    not a target: a sequence may stop long before its `max_tokens`, so a device short of
    room for all of them ranks after those with it but still meets the deadlines."""
    if e.finish_ms is None or not math.isfinite(e.finish_ms):
        return False
    checks = ((request.slo_ms, e.finish_ms), (request.ttft_ms, e.ttft_ms), (request.tpot_ms, e.tpot_ms))
    return all(target is None or (value is not None and value <= target) for target, value in checks)


def misses(request: Request, chosen: Candidate) -> bool:
    """Whether `chosen` is expected to miss the request's targets (known only for a
    measured candidate)."""
    f = chosen.estimate.finish_ms
    if f is None or not math.isfinite(f):
        return False
    return has_targets(request) and not expected_to_meet(request, chosen.estimate)

"""`latency`: the soonest expected finish (the work queued ahead, the request's own
time at the device's measured speed, and the caller overhead the worker measured)."""

from __future__ import annotations

from collections.abc import Sequence

from hxc.pool.policies.base import Candidate, Request, rank


def choose(request: Request, candidates: Sequence[Candidate]) -> list[Candidate]:
    return rank(request, candidates, lambda c: c.estimate.finish_ms)

"""`latency`: the soonest expected finish (the work queued ahead, the request's own
time at the device's measured speed, and the caller overhead the worker measured); for
a language model, the soonest first token among the devices that keep its time per
output token within target."""

from __future__ import annotations

from collections.abc import Sequence

from hxc.pool.policies.base import Candidate, Request, rank


def choose(request: Request, candidates: Sequence[Candidate]) -> list[Candidate]:
    def key(c: Candidate) -> float:
        e = c.estimate
        return e.ttft_ms if e.ttft_ms is not None else e.finish_ms  # type: ignore[return-value]

    return rank(request, candidates, key)

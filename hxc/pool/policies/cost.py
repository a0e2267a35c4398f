"""`cost`: the cheapest candidate (price per hour / measured units per second; for a
language model, the price of 1,000 of its output tokens) whose estimate meets the
request's targets; the sooner one among equal prices. A candidate without a price or a
measured speed costs more than any priced one."""

from __future__ import annotations

import math
from collections.abc import Sequence

from hxc.pool.policies.base import Candidate, Request, rank


def choose(request: Request, candidates: Sequence[Candidate]) -> list[Candidate]:
    def key(c: Candidate) -> tuple[float, float]:
        price = c.estimate.price_per_unit
        return (math.inf if price is None else price, c.estimate.finish_ms)  # type: ignore[return-value]

    return rank(request, candidates, key)

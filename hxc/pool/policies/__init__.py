"""The routing policy registry: every module in this package (except `base`) is one
policy, a function `choose(request, candidates) -> ranked candidates` that orders the
devices (or, later, whole hosts) a single request may go to by their `Estimate`s.
Policies are found by file name and imported only when asked for, like target
families and engines; listing their names imports none of them, so the CLI's
`--policy` choices, the serving protocol's `policy` parameter and the router all take
their names from here.

Not the same thing as `hxc.runtime.select.POLICIES`: those rank a bundle's artifacts
when a model is loaded (latency, throughput, cost by recorded profiles); these rank
live devices for one request by the work queued on them now.
"""

from __future__ import annotations

import difflib
import functools
import importlib
from collections.abc import Callable, Sequence

from hxc.errors import UsageError
from hxc.pool.policies.base import Candidate, Estimate, Request
from hxc.registry import member_names

__all__ = ["DEFAULT_POLICY", "Candidate", "Chooser", "Estimate", "Request", "choose", "policy", "policy_names"]

DEFAULT_POLICY = "latency"
Chooser = Callable[[Request, Sequence[Candidate]], list[Candidate]]


@functools.cache
def policy_names() -> tuple[str, ...]:
    """Every registered policy, the default first."""
    names = member_names(__file__)
    return (DEFAULT_POLICY, *(n for n in names if n != DEFAULT_POLICY))


@functools.cache
def policy(name: str) -> Chooser:
    """The `choose` function of the policy `name`; a UsageError for an unknown name."""
    if name not in policy_names():
        close = difflib.get_close_matches(name, policy_names(), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"unknown routing policy {name!r}{hint}; choose from {', '.join(policy_names())}")
    return importlib.import_module(f"hxc.pool.policies.{name}").choose


def choose(name: str, request: Request, candidates: Sequence[Candidate]) -> list[Candidate]:
    """`candidates` ranked for `request` by the policy `name`, best first."""
    return policy(name)(request, candidates)

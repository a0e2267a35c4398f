"""Routing policies (`hxc.pool.policies`): registered by file name, one `choose`
function each, ranking candidates by their `Estimate`s. Pure functions of described
devices: no worker runs here."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from hxc.errors import UsageError
from hxc.pool import policies
from hxc.pool.policies import Candidate, Estimate, Request, policy, policy_names
from hxc.pool.policies.base import misses


def _c(name: str, finish_ms: float | None, price: float | None = None, load: int = 0) -> Candidate:
    return Candidate(name, Estimate(finish_ms, price_per_unit=price), load)


def _order(name: str, candidates: list[Candidate], slo_ms: float | None = None) -> list[str]:
    return [c.name for c in policies.choose(name, Request(1, slo_ms), candidates)]


def test_policy_names_come_from_the_files_and_feed_every_user():
    from hxc.cli import ROUTING_POLICIES
    from hxc.serve.protocol import POLICIES

    assert policy_names() == ("latency", "cost")  # the default first
    assert ROUTING_POLICIES == POLICIES == policy_names()
    with pytest.raises(UsageError, match="unknown routing policy 'latncy' \\(did you mean 'latency'\\?\\)"):
        policy("latncy")


def test_listing_policy_names_starts_no_process_machinery():
    code = "import sys, hxc.pool.policies as p; p.policy_names(); print('hxc.pool.pool' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_latency_takes_the_soonest_and_cost_the_cheapest_that_meets_the_deadline():
    fast = _c("cpu", 10.0, price=2.0)
    slow_free = _c("vulkan", 300.0, price=0.0)
    assert _order("latency", [slow_free, fast]) == ["cpu", "vulkan"]
    assert _order("cost", [fast, slow_free], slo_ms=1000) == ["vulkan", "cpu"]
    assert _order("cost", [fast, slow_free], slo_ms=50) == ["cpu", "vulkan"]  # only the CPU meets 50 ms
    unpriced = _c("gpu", 5.0)  # no price known: never cheaper than a priced device
    assert _order("cost", [unpriced, fast], slo_ms=1000) == ["cpu", "gpu"]


def test_an_unmeasured_device_is_measured_unless_a_measured_one_meets_the_deadline():
    measured, new = _c("cpu", 10.0), _c("vulkan", None)
    for name in policy_names():
        assert _order(name, [measured, new])[0] == "vulkan"  # no deadline: take it, to measure it
        assert _order(name, [measured, new], slo_ms=50)[0] == "cpu"  # a deadline met is not risked
        assert _order(name, [measured, new], slo_ms=5)[0] == "vulkan"  # nobody meets it: measure


def test_a_deadline_nobody_meets_goes_to_the_soonest_and_is_a_miss():
    late, later = _c("cpu", 80.0), _c("vulkan", 400.0)
    request = Request(1, 50.0)
    for name in policy_names():
        best = policy(name)(request, [later, late])[0]
        assert best.name == "cpu" and misses(request, best)
    busy = [_c("a", math.inf, load=3), _c("b", math.inf, load=1)]  # busy and never measured
    assert _order("latency", busy, slo_ms=50) == ["b", "a"]
    assert not misses(request, busy[0])  # nobody can say

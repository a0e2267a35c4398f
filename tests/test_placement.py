"""Placing a staged model's stages on devices (issue 29): the solver against brute force
over every assignment, memory caps, the rule that a split must beat the best single
device, forced placements, the flags' parsers, and the pipeline simulator agreeing
with the solver's arithmetic. Pure arithmetic: no model, no device."""

from __future__ import annotations

import itertools
import math
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hxc.errors import ExitCode, PlacementError, UsageError
from hxc.pool.pipeline_simulate import parse_device_ratios, scale_times, simulate_pipeline
from hxc.runtime import placement
from hxc.runtime.placement import (DeviceInfo, Link, Links, StageCost, evaluate, one_range_count, parse_device_memory,
                                   parse_link, parse_placement, parse_size, solve)  # fmt: skip

GiB = 2**30


def _key(objective: str, plan: placement.Plan) -> tuple[float, float]:
    return (plan.bottleneck_ms, plan.latency_ms) if objective == "throughput" else (plan.latency_ms, plan.bottleneck_ms)


def _close_key(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9) for x, y in zip(a, b))


def _brute_force(stages, devices, times, links, objective, caps, context_tokens, pin, one_range=False):
    """The best (primary, secondary) over every feasible assignment, or None."""
    capacity = {d.name: min([x for x in (d.memory_bytes, caps.get(d.name)) if x is not None], default=math.inf)
                for d in devices}  # fmt: skip
    best = None
    for assignment in itertools.product([d.name for d in devices], repeat=len(stages)):
        if any(times.get((s, d)) is None for s, d in enumerate(assignment)):
            continue
        runs = [d for d, _ in itertools.groupby(assignment)]
        if one_range and len(runs) != len(set(runs)):
            continue
        plan = evaluate(stages, devices, times, assignment, links, pin=pin, context_tokens=context_tokens)
        if any(used > capacity[d] for d, used in plan.memory.items()):
            continue
        key = _key(objective, plan)
        if best is None or key < best:
            best = key
    return best


@st.composite
def instances(draw, max_stages=5, max_devices=3):
    n = draw(st.integers(1, max_stages))
    m = draw(st.integers(1, max_devices))
    names = [f"d{i}" for i in range(m)]
    stages = [StageCost(i, draw(st.integers(0, 8)) * GiB, draw(st.integers(0, 3)) * 2**20, draw(st.integers(0, 2**24)))
              for i in range(n)]  # fmt: skip
    devices = [DeviceInfo(name, draw(st.one_of(st.none(), st.integers(1, 24).map(lambda g: g * GiB)))) for name in names]
    # One time in six unmeasured.
    ms = st.tuples(st.integers(0, 5), st.floats(0.0, 50.0)).map(lambda x: None if x[0] == 0 else round(x[1], 2))
    times = {(s, d): draw(ms) for s in range(n) for d in names}
    slow = Link("slow", latency_ms=draw(st.floats(0.0, 5.0)), bytes_per_s=draw(st.sampled_from([1e8, 1e9, None])))
    attached = {names[0]: slow} if draw(st.booleans()) else {}
    links = Links(default=Link("fast", draw(st.floats(0.0, 1.0)), 8e9), attached=attached)
    caps = {names[-1]: draw(st.integers(1, 16)) * GiB} if draw(st.booleans()) else {}
    return stages, devices, times, links, caps, draw(st.integers(0, 1024)), draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(instances(), st.sampled_from(["throughput", "latency"]))
def test_the_solver_is_exact_against_brute_force(instance, objective):
    stages, devices, times, links, caps, context, pin = instance
    best = _brute_force(stages, devices, times, links, objective, caps, context, pin)
    if best is None:
        with pytest.raises(PlacementError) as e:
            solve(stages, devices, times, links, objective, memory_caps=caps, context_tokens=context, pin=pin)
        assert "\n" not in str(e.value)
        return
    placed = solve(stages, devices, times, links, objective, memory_caps=caps, context_tokens=context, pin=pin)
    assert _close_key(_key(objective, placed.plan), best)
    # What it reports is what evaluating its assignment gives.
    again = evaluate(stages, devices, times, placed.assignment, links, pin=pin, context_tokens=context)
    assert again == placed.plan
    if placed.single is not None:  # never a split that is not strictly better than one device
        assert not placed.plan.split or _key(objective, placed.plan) < _key(objective, placed.single)
        assert not _close_key(_key(objective, placed.plan), _key(objective, placed.single)) or not placed.plan.split


@settings(max_examples=100, deadline=None)
@given(instances(max_stages=6), st.sampled_from(["throughput", "latency"]))
def test_the_one_range_search_is_exact_among_one_range_placements(instance, objective):
    stages, devices, times, links, caps, context, pin = instance
    best = _brute_force(stages, devices, times, links, objective, caps, context, pin, one_range=True)
    with mock.patch.object(placement, "FULL_SEARCH_LIMIT", 0):  # as if every instance were large
        if best is None:
            with pytest.raises(PlacementError):
                solve(stages, devices, times, links, objective, memory_caps=caps, context_tokens=context, pin=pin)
            return
        placed = solve(stages, devices, times, links, objective, memory_caps=caps, context_tokens=context, pin=pin)
    assert _close_key(_key(objective, placed.plan), best)
    assert len(placed.plan.ranges) == len(placed.plan.devices)
    assert "one range" in placed.search


def test_the_search_space_is_bounded():
    assert one_range_count(2, 2) == 2 + 2  # one device alone (2 ways) or a cut with the two in either order
    assert one_range_count(24, 3) == 3 + 6 * 23 + 6 * 253
    stages = [StageCost(i, 0) for i in range(200)]
    devices = [DeviceInfo(f"d{i}") for i in range(8)]
    times = {(s, d.name): 1.0 for s in range(200) for d in devices}
    with pytest.raises(PlacementError, match="too many placements to search exactly"):
        solve(stages, devices, times)
    # 24 stages on 2 devices: the one-range search, in well under a second.
    two = devices[:2]
    ms = {(s, "d0"): 1.0 + s % 3 for s in range(24)} | {(s, "d1"): 2.0 for s in range(24)}
    placed = solve(stages[:24], two, ms, memory_caps=None)
    assert "one range" in placed.search and placed.plan.bottleneck_ms <= 24.0


# Two devices as on this host: lavapipe 15x slower than the CPU.
STAGES = [StageCost(0, 1 * GiB, out_bytes=16 * 1024), StageCost(1, 1 * GiB, out_bytes=16 * 1024)]
HERE = {(0, "cpu"): 4.0, (1, "cpu"): 4.0, (0, "vulkan"): 60.0, (1, "vulkan"): 60.0}
CPU_VULKAN = [DeviceInfo("cpu", 16 * GiB), DeviceInfo("vulkan", 16 * GiB, kind="gpu")]


def test_on_this_host_it_picks_the_single_device_and_says_why():
    placed = solve(STAGES, CPU_VULKAN, HERE)
    assert placed.assignment == ("cpu", "cpu") and not placed.plan.split
    assert placed.reason == "cpu alone is predicted best (no split has better throughput)"
    assert placed.items_per_s == pytest.approx(125.0) and placed.latency_ms == pytest.approx(8.0)
    text = placed.explain()
    assert "best single device: cpu: 8 ms per item -> 125 items/s, latency 8 ms" in text
    assert "bottleneck: cpu at 8 ms -> 125 items/s" in text and "\nwhy: cpu alone" in text


def test_a_split_equal_to_the_best_single_device_is_not_chosen():
    # Stage 1 takes no time, so a split gains nothing; over a free link it ties one device exactly.
    free = Links(default=Link("free"))
    times = {(0, "cpu"): 4.0, (1, "cpu"): 0.0, (0, "vulkan"): 4.0, (1, "vulkan"): 0.0}
    placed = solve(STAGES, CPU_VULKAN, times, free)
    assert placed.assignment == ("cpu", "cpu")
    placed = solve(STAGES, CPU_VULKAN, times, free, "latency")
    assert placed.assignment == ("cpu", "cpu")


def test_a_split_that_beats_every_single_device_is_chosen_with_the_gain():
    times = {(0, "cpu"): 4.0, (1, "cpu"): 4.0, (0, "vulkan"): 1.0, (1, "vulkan"): 9.0}
    placed = solve(STAGES, CPU_VULKAN, times)
    assert placed.assignment == ("vulkan", "cpu")
    assert placed.bottleneck == "cpu" and placed.items_per_s == pytest.approx(250.0)
    assert placed.reason.startswith("the split is predicted 2x the throughput of cpu alone")
    transfer = Link("shared memory", 0.085, 8e9).ms(16 * 1024)
    assert placed.latency_ms == pytest.approx(1.0 + transfer + 4.0)
    assert any(line.startswith("  vulkan -> cpu: stage 0's 16.0 KiB over shared memory") for line in placed.lines)


def test_the_latency_objective_counts_transfers():
    times = {(0, "cpu"): 4.0, (1, "cpu"): 4.0, (0, "vulkan"): 1.0, (1, "vulkan"): 9.0}
    slow = Links(default=Link("slow", latency_ms=5.0))
    assert solve(STAGES, CPU_VULKAN, times, slow, "throughput").assignment == ("vulkan", "cpu")  # 5 ms link < 8 ms cpu
    placed = solve(STAGES, CPU_VULKAN, times, slow, "latency")
    assert placed.assignment == ("cpu", "cpu") and placed.latency_ms == pytest.approx(8.0)  # 1 + 5 + 4 = 10 > 8


def test_stages_on_one_device_serialise_unless_pinned():
    times = {(0, "cpu"): 4.0, (1, "cpu"): 4.0}
    cpu = [DeviceInfo("cpu")]
    assert solve(STAGES, cpu, times).plan.bottleneck_ms == pytest.approx(8.0)
    # --placement 0:cpu,1:cpu --pin split: a worker per stage, the hop between them through shared memory.
    pinned = solve(STAGES, cpu, times, pin=True)
    hop = Link("shared memory", 0.085, 8e9).ms(16 * 1024)
    assert pinned.plan.loads == pytest.approx({"cpu[0]": 4.0, "cpu[0]<->cpu[1]": hop, "cpu[1]": 4.0})
    assert pinned.plan.bottleneck_ms == pytest.approx(4.0) and pinned.latency_ms == pytest.approx(8.0 + hop)
    assert pinned.plan.workers == ("cpu[0]", "cpu[1]") and pinned.plan.ranges == ((0, 1, "cpu"),)
    assert any(line.startswith("  cpu[0] -> cpu[1]: stage 0's 16.0 KiB over shared memory") for line in pinned.lines)
    assert "pinned: each stage has its own worker" in pinned.lines[0]
    # Two ranges on one device: the device's one worker holds both unpinned, a worker each pinned.
    three = [StageCost(i, 0) for i in range(3)]
    two = [DeviceInfo("cpu"), DeviceInfo("vulkan")]
    ms = {(0, "cpu"): 3.0, (1, "vulkan"): 1.0, (2, "cpu"): 3.0}
    assert evaluate(three, two, ms, ("cpu", "vulkan", "cpu")).loads["cpu"] == pytest.approx(6.0)
    pinned = evaluate(three, two, ms, ("cpu", "vulkan", "cpu"), pin=True)
    assert pinned.loads == pytest.approx({"cpu[0]": 3.0, "cpu<->vulkan": 2 * Links().ms("cpu", "vulkan", 0), "vulkan[1]": 1.0,
                                          "cpu[2]": 3.0})  # fmt: skip
    assert pinned.bottleneck == "cpu[0]"
    # The pipeline library's explicit ranges: two stages to a pinned worker, costed as one.
    four = [StageCost(i, 0) for i in range(4)]
    ranged = evaluate(four, cpu, {(i, "cpu"): 1.0 for i in range(4)}, ("cpu",) * 4, pin=True, ranges=[(0, 1), (2, 3)])
    assert ranged.workers == ("cpu[0-1]", "cpu[2-3]") and ranged.loads["cpu[0-1]"] == pytest.approx(2.0)


def test_the_solver_and_the_pipeline_start_the_same_workers():
    """One rule (`stage_workers`): the resources the solver costs are the workers the
    pipeline starts, pinned or not."""
    from hxc.pool.pipeline import plan_workers

    times = {(s, d): 1.0 for s in range(3) for d in ("cpu", "vulkan")}
    three = [StageCost(i, 0) for i in range(3)]
    for assignment in (("cpu", "cpu", "vulkan"), ("cpu", "vulkan", "cpu"), ("vulkan",) * 3):
        for pin in (False, True):
            plan = evaluate(three, CPU_VULKAN, times, assignment, pin=pin)
            workers = plan_workers(assignment, pin=pin, cores=[0, 1, 2])
            assert plan.workers == tuple(w.name for w in workers), (assignment, pin)
            assert placement.stage_workers(assignment, pin) == tuple(
                placement.StageWorker(w.name, w.device, w.ranges) for w in workers)  # fmt: skip


def test_a_model_that_fits_nowhere_whole_is_split():
    caps = {"cpu": int(1.5 * GiB), "vulkan": int(1.5 * GiB)}
    placed = solve(STAGES, CPU_VULKAN, HERE, memory_caps=caps)
    assert placed.plan.split and placed.single is None
    assert placed.memory == {"cpu": GiB, "vulkan": GiB}
    assert placed.reason.startswith("no single device can run it (the model needs 2.0 GiB; cpu holds 1.5 GiB (capped)")
    memory = next(line for line in placed.lines if line.startswith("memory: "))
    assert "cpu 1.0 GiB of 1.5 GiB (capped)" in memory and "vulkan 1.0 GiB of 1.5 GiB (capped)" in memory


def test_the_kv_cache_counts_against_memory():
    stages = [StageCost(0, GiB, kv_bytes_per_token=2**20), StageCost(1, GiB, kv_bytes_per_token=2**20)]
    devices = [DeviceInfo("cpu", 3 * GiB), DeviceInfo("vulkan", 3 * GiB)]
    assert not solve(stages, devices, HERE, context_tokens=512).plan.split  # 2 GiB + 1 GiB of KV fits the CPU
    assert solve(stages, devices, HERE, context_tokens=1024).plan.split  # 2 GiB + 2 GiB does not


def test_nothing_that_fits_is_a_one_line_error_naming_needed_and_available():
    caps = {"cpu": 512 * 2**20, "vulkan": int(1.5 * GiB)}
    stages = STAGES + [StageCost(2, GiB)]
    times = HERE | {(2, "cpu"): 4.0, (2, "vulkan"): 60.0}
    with pytest.raises(PlacementError) as e:
        solve(stages, CPU_VULKAN, times, memory_caps=caps)
    assert str(e.value) == ("the model needs 3.0 GiB; no device holds it and no split of its 3 stages fits: "
                            "cpu 512.0 MiB (capped), vulkan 1.5 GiB (capped)")  # fmt: skip
    assert e.value.exit_code == ExitCode.NO_COMPATIBLE_ARTIFACT
    with pytest.raises(PlacementError, match=r"^stage 0 alone needs 1.0 GiB, more than any device that runs it holds"):
        solve(STAGES, CPU_VULKAN, HERE, memory_caps={"cpu": 2**20, "vulkan": 2**20})
    with pytest.raises(PlacementError, match="^stage 1 has no measured time on any device"):
        solve(STAGES, CPU_VULKAN, {(0, "cpu"): 1.0})


def test_a_forced_placement_is_checked_and_costed():
    forced = parse_placement("0:vulkan,1:cpu", 2)
    placed = solve(STAGES, CPU_VULKAN, HERE, forced=forced)
    assert placed.assignment == ("vulkan", "cpu") and placed.bottleneck == "vulkan"
    assert placed.reason == "forced by --placement; predicted worse than cpu alone"
    with pytest.raises(UsageError, match="^the placement names 1 stage"):
        solve(STAGES, CPU_VULKAN, HERE, forced=("cpu",))
    with pytest.raises(UsageError, match="^the placement names cuda, not a device here"):
        solve(STAGES, CPU_VULKAN, HERE, forced=("cuda", "cpu"))
    with pytest.raises(UsageError, match="^stage 1 has no measured time on vulkan"):
        solve(STAGES, CPU_VULKAN, {(0, "cpu"): 1.0, (1, "cpu"): 1.0, (0, "vulkan"): 1.0}, forced=("cpu", "vulkan"))
    with pytest.raises(PlacementError, match=r"^the placement puts 2.0 GiB on vulkan, which holds 1.0 GiB \(capped\)"):
        solve(STAGES, CPU_VULKAN, HERE, forced=("vulkan", "vulkan"), memory_caps={"vulkan": GiB})
    with pytest.raises(UsageError, match="^--device-memory names tpu, not a device here"):
        solve(STAGES, CPU_VULKAN, HERE, memory_caps={"tpu": GiB})
    with pytest.raises(UsageError, match="^unknown placement objective"):
        solve(STAGES, CPU_VULKAN, HERE, None, "cost")


def test_parse_placement():
    assert parse_placement("0:cpu,1:vulkan", 2) == ("cpu", "vulkan")
    assert parse_placement("0-11:cuda,12-23:cpu", 24) == ("cuda",) * 12 + ("cpu",) * 12
    assert parse_placement(" 1 : vulkan:1 , 0:cpu ", 2) == ("cpu", "vulkan:1")  # any order; a device name may hold ':'
    for text, message in [("0:cpu", r"stage\(s\) 1 placed nowhere"), ("0-1:cpu,1:vulkan", "stage 1 is placed twice"),
                          ("0:cpu,2:vulkan", "the model has stages 0-1"), ("1-0:cpu", "the model has stages 0-1"),
                          ("cpu", "is not STAGE"), ("0:", "is not STAGE"), ("a:cpu", "is not STAGE"), ("", "placed nowhere")]:  # fmt: skip
        with pytest.raises(UsageError, match=message) as e:
            parse_placement(text, 2)
        assert "\n" not in str(e.value)


def test_parse_device_memory_and_sizes():
    assert parse_device_memory("vulkan=2GiB,cpu=512MiB") == {"vulkan": 2 * GiB, "cpu": 512 * 2**20}
    assert parse_device_memory("cuda=1.5GB, cpu = 64 KiB") == {"cuda": 1_500_000_000, "cpu": 65536}
    assert [parse_size(s) for s in ("4096", "10B", "1KB", "1kib", "2MB", "3 GB")] == [4096, 10, 1000, 1024, 2 * 10**6, 3 * 10**9]
    for text, message in [("vulkan", "is not DEVICE=SIZE"), ("vulkan=2XB", "'2XB' is not a size"), ("=1GiB", "DEVICE=SIZE"),
                          ("cpu=1GiB,cpu=2GiB", "cpu is given twice"), (",", "nothing given"), ("cpu=-1GiB", "not a size")]:  # fmt: skip
        with pytest.raises(UsageError, match=message):
            parse_device_memory(text)


def test_parse_link_and_ratios():
    assert parse_link("pcie=25GB/s") == Link("pcie", 0.0, 25e9)
    assert parse_link("nvlink=450 GB/s+0.005ms") == Link("nvlink", 0.005, 450e9)
    for text in ("pcie", "pcie=25GB", "pcie=25GB/s+1s", "pcie=0GB/s"):
        with pytest.raises(UsageError, match="link"):
            parse_link(text)
    assert parse_device_ratios("cuda=40, rocm=20.5") == {"cuda": 40.0, "rocm": 20.5}
    for text in ("cuda", "cuda=0", "cuda=fast", "cuda=inf", ""):
        with pytest.raises(UsageError, match="--device-ratio"):
            parse_device_ratios(text)


# The simulator.
TWO_STAGE = [StageCost(0, GiB, out_bytes=2**20), StageCost(1, GiB, out_bytes=2**20)]
A_B = [DeviceInfo("a", price_per_hour=1.0), DeviceInfo("b", price_per_hour=3.0)]
A_B_TIMES = {(0, "a"): 10.0, (1, "b"): 6.0}


def test_in_flight_micro_batches_fill_the_pipeline():
    plan = solve(TWO_STAGE, A_B, A_B_TIMES).plan
    assert plan.items_per_s == pytest.approx(100.0)
    one = simulate_pipeline(plan, items=100, in_flight=1)
    assert one.items_per_s == pytest.approx(1e3 / plan.latency_ms)  # 1 / (10 + transfer + 6)
    assert one.latency_p50_ms == pytest.approx(plan.latency_ms)
    four = simulate_pipeline(plan, items=100, in_flight=4)
    assert four.items_per_s == pytest.approx(plan.items_per_s, rel=1e-9)  # 1 / bottleneck
    assert four.items_per_s > 1.5 * one.items_per_s
    noisy = simulate_pipeline(plan, items=2000, in_flight=4, noise=0.2, seed=1)
    assert noisy.items_per_s == pytest.approx(plan.items_per_s, rel=0.03)


def test_the_simulated_cost_is_price_times_busy_time():
    plan = solve(TWO_STAGE, A_B, A_B_TIMES).plan
    run = simulate_pipeline(plan, items=360, in_flight=4, devices=A_B)
    assert run.busy_ms["a"] == pytest.approx(3600.0) and run.busy_ms["b"] == pytest.approx(2160.0)
    assert run.cost == pytest.approx((1.0 * 3600 + 3.0 * 2160) / 3.6e6)
    assert run.cost_held == pytest.approx(4.0 * run.makespan_ms / 3.6e6)
    assert run.cost_per_1k == pytest.approx(run.cost / 360 * 1000)
    assert simulate_pipeline(plan, items=10, in_flight=2).cost is None  # no prices given


@settings(max_examples=60, deadline=None)
@given(instances(max_stages=4), st.sampled_from(["throughput", "latency"]))
def test_the_simulator_agrees_with_the_solver_in_steady_state(instance, objective):
    stages, devices, times, links, caps, context, pin = instance
    try:
        placed = solve(stages, devices, times, links, objective, memory_caps=caps, context_tokens=context, pin=pin)
    except PlacementError:
        return
    plan = placed.plan
    run = simulate_pipeline(plan, items=400, in_flight=2 * len(plan.steps))
    if math.isinf(plan.items_per_s):
        return
    # 2%: with steps of (almost) no time, items finish microseconds or less apart, and the
    # steady-state window's edges fall among float-rounded instants.
    assert run.items_per_s == pytest.approx(plan.items_per_s, rel=0.02)
    assert simulate_pipeline(plan, items=50, in_flight=1).items_per_s == pytest.approx(
        1e3 / plan.latency_ms if plan.latency_ms else math.inf, rel=1e-6)


def test_device_ratios_make_a_hypothetical_device():
    # A CPU measured here, an H100-class device 40x faster behind PCIe at 25 GB/s.
    stages = [StageCost(i, 4 * GiB, out_bytes=8 * 2**20) for i in range(4)]
    measured = {(s, "cpu"): 80.0 for s in range(4)}
    times = scale_times(measured, 4, "cpu", {"cuda": 40.0})
    assert times[(3, "cuda")] == pytest.approx(2.0) and times[(3, "cpu")] == 80.0
    devices = [DeviceInfo("cpu", 64 * GiB, 0.36), DeviceInfo("cuda", 10 * GiB, 2.99, kind="gpu")]
    links = Links(attached={"cuda": parse_link("pcie=25GB/s")})
    placed = solve(stages, devices, times, links)
    # 16 GiB of weights: two stages fit the GPU; the CPU's two stages (160 ms) pace the pipeline.
    assert placed.single is not None and placed.single.devices == ("cpu",)
    assert placed.assignment.count("cuda") == 2 and placed.bottleneck == "cpu"
    assert placed.items_per_s == pytest.approx(1e3 / 160.0)
    run = simulate_pipeline(placed.plan, items=200, in_flight=4, devices=devices)
    assert run.items_per_s == pytest.approx(placed.items_per_s, rel=1e-6)
    assert run.cost is not None and run.cost < run.cost_held

"""A staged bundle run as a pipeline over worker processes (`hxc.pool.pipeline`): on two
pinned CPU workers, and on the CPU then lavapipe Vulkan (in the workers only), the
outputs are PyTorch's; a worker SIGKILLed while items are in flight is replaced and
nothing is lost; several items in flight keep the stages busy at once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hxc.errors import ExitCode, HxcError, SignatureError, UsageError
from hxc.examples import mlp
from hxc.pool import Deadlines, Health
from hxc.pool.pipeline import Pipeline, overlap_s, plan_workers
from test_stages import _assert_close, _torch_outputs, staged_models  # noqa: F401 - a fixture

WAIT = 120  # seconds a pipeline may take for any one result here before the test fails


@pytest.fixture(scope="module")
def bundles(staged_models, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    """The example MLP in 2 stages (a dynamic batch, CPU) and test_stages' encoder in 3
    (CPU and portable Vulkan)."""
    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions

    _, path = staged_models
    d = tmp_path_factory.mktemp("pipeline-bundles")
    out = {"mlp": d / "mlp.hxc", "encoder": d / "encoder.hxc"}
    for source, target, stages, dynamic, bundle in [("hxc.examples:mlp", "cpu:host", "2", True, out["mlp"]),
                                                    (f"{path}:encoder", "cpu:host,vulkan:spirv", "at:blocks.1,blocks.3",
                                                     False, out["encoder"])]:  # fmt: skip
        result = build_bundle(source, bundle, target, options=ImportOptions(stages=stages, dynamic_batch=dynamic))
        assert result.written, [b.error for b in result.failed]
    return out


def _mlp_items(n: int, batch: int = 4) -> tuple[list[np.ndarray], list[np.ndarray]]:
    model, args = mlp()
    xs = [np.random.default_rng(i).standard_normal((batch, *args[0].shape[1:]), dtype=np.float32) for i in range(n)]
    with torch.no_grad():
        return xs, [model(torch.from_numpy(x)).numpy() for x in xs]


def test_two_stages_on_two_pinned_cpu_workers_equal_pytorch(bundles):
    xs, expected = _mlp_items(12)
    with Pipeline(bundles["mlp"], ("cpu", "cpu"), pin=True, in_flight=4, timeout_s=WAIT) as pipe:
        got = list(pipe.map([[x] for x in xs]))
        # A batch past the buffers' first size: the stage's output buffer grows.
        big = np.random.default_rng(99).standard_normal((3000, xs[0].shape[1]), dtype=np.float32)
        y_big = pipe(big)
        stats = pipe.stats()
    for g, e in zip(got, expected, strict=True):
        _assert_close([g], [e])
    model, _ = mlp()
    with torch.no_grad():
        _assert_close([y_big], [model(torch.from_numpy(big)).numpy()])
    cpu0, cpu1 = stats.workers
    # A worker per stage, one core each, each holding its own stage's artifact alone.
    assert (cpu0.name, cpu1.name) == ("cpu[0]", "cpu[1]") and cpu0.cpus != cpu1.cpus and len(cpu0.cpus) == 1
    assert cpu0.artifacts == ("cpu:host#s0",) and cpu1.artifacts == ("cpu:host#s1",)
    assert stats.items == 13 and cpu0.calls == cpu1.calls == 13 and stats.retried == 0


def test_three_stages_on_the_cpu_then_vulkan_equal_pytorch(bundles, staged_models):  # noqa: F811
    module, _ = staged_models
    expected, args, _ = _torch_outputs(module.encoder)
    x = args[0].numpy()
    with Pipeline(bundles["encoder"], ("cpu", "cpu", "vulkan"), in_flight=2, timeout_s=WAIT) as pipe:
        assert [(w.name, w.ranges) for w in pipe.workers] == [("cpu", ((0, 1),)), ("vulkan", ((2, 2),))]
        got = list(pipe.map([[x], [x * 0.5]]))
        stats = pipe.stats()
    _assert_close(list(got[0]), expected)
    model, _ = module.encoder()
    with torch.no_grad():
        _assert_close(list(got[1]), [o.numpy() for o in model(args[0] * 0.5)])
    assert stats.worker("vulkan").artifacts == ("vulkan:spirv#s2",)
    assert stats.worker("cpu").artifacts == ("cpu:host#s0", "cpu:host#s1")


@pytest.mark.parametrize("victim", [0, 1])
def test_a_worker_killed_mid_pipeline_loses_nothing(bundles, victim):
    xs, expected = _mlp_items(16)
    # Each stage's calls take 40 ms more, so that items are surely in flight at the kill.
    env = {"HXC_POOL_FAULT": "cpu:host#s0:slowstep@40,cpu:host#s1:slowstep@40"}
    with Pipeline(bundles["mlp"], ("cpu", "cpu"), pin=True, in_flight=4, env=env, timeout_s=WAIT) as pipe:
        futures = [pipe.submit([x]) for x in xs]
        futures[2].result(WAIT)
        pid = pipe.pid(victim)
        os.kill(pid, signal.SIGKILL)
        got = [f.result(WAIT) for f in futures]
        stats = pipe.stats()
        killed = stats.workers[victim]
        assert killed.pid != pid and killed.health == Health.READY
    for g, e in zip(got, expected, strict=True):
        _assert_close(g, [e])
    assert killed.failures == 1 and killed.restarts == 1 and "SIGKILL" in killed.reason
    assert stats.items == 16 and stats.failed == 0 and stats.retried >= 1


def test_a_hung_worker_misses_its_deadline_and_its_items_run_on_a_replacement(bundles):
    xs, expected = _mlp_items(6)
    env = {"HXC_POOL_FAULT": "cpu:host#s1:hang@3"}  # stage 1's third call never returns
    with Pipeline(bundles["mlp"], ("cpu", "cpu"), pin=True, in_flight=2, env=env, timeout_s=WAIT,
                  deadlines=Deadlines(floor_s=2.0)) as pipe:  # fmt: skip
        got = list(pipe.map([[x] for x in xs]))
        stage1 = pipe.stats().workers[1]
    for g, e in zip(got, expected, strict=True):
        _assert_close([g], [e])
    assert stage1.restarts == 1 and "missed its deadline" in stage1.reason


def test_a_worker_that_cannot_load_fails_the_start_in_one_line(bundles, tmp_path):
    import shutil

    broken = tmp_path / "broken.hxc"
    shutil.copytree(bundles["mlp"], broken)
    [stage1] = broken.glob("artifacts/*-s1.vmfb")
    data = bytearray(stage1.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stage1.write_bytes(bytes(data))
    t0 = time.monotonic()
    with pytest.raises(HxcError) as e:
        Pipeline(broken, ("cpu", "cpu"), pin=True)
    message = str(e.value)
    assert "pipeline worker cpu[1] failed to load" in message and "sha256" in message and "\n" not in message
    assert e.value.exit_code == ExitCode.INTEGRITY and time.monotonic() - t0 < 60  # not retried


def test_items_in_flight_keep_both_stages_busy_at_once(bundles):
    """Busy intervals, as each worker measured them: with one item in flight the stages
    never work at once; with four, stage 1 works on an item while stage 0 runs the next.
    (Each call is slowed by a sleep, so the overlap does not depend on free cores.)"""
    xs, _ = _mlp_items(12)
    env = {"HXC_POOL_FAULT": "cpu:host#s0:slowstep@20,cpu:host#s1:slowstep@20"}
    overlap = {}
    for in_flight in (1, 4):
        with Pipeline(bundles["mlp"], ("cpu", "cpu"), pin=True, in_flight=in_flight, env=env, timeout_s=WAIT) as pipe:
            t0 = time.monotonic()
            list(pipe.map([[x] for x in xs]))
            wall = time.monotonic() - t0
            s0, s1 = (w.intervals for w in pipe.stats().workers)
        busy = sum(b - a for a, b in (*s0, *s1))
        overlap[in_flight] = (overlap_s(s0, s1) / min(sum(b - a for a, b in s0), sum(b - a for a, b in s1)), busy / wall)
    assert overlap[1][0] == 0.0 and overlap[1][1] <= 1.0
    # Ideally 11/12 of a stage's time overlaps the other's; half is a margin for a busy host.
    assert overlap[4][0] > 0.5 and overlap[4][1] > 1.3, overlap


def test_overlap_of_interval_lists():
    assert overlap_s([(0, 2), (3, 5)], [(1, 4)]) == 2.0
    assert overlap_s([(0, 1)], [(1, 2)]) == 0.0 and overlap_s([], [(0, 1)]) == 0.0


# --- workers, and one-line errors ----------------------------------------------------


def test_workers_per_device_or_per_pinned_range():
    assert [(w.name, w.ranges, w.cpus) for w in plan_workers(("cpu", "vulkan", "cpu"))] == [
        ("cpu", ((0, 0), (2, 2)), None), ("vulkan", ((1, 1),), None)]  # fmt: skip
    pinned = plan_workers(("cpu", "cpu", "cuda"), pin="split", cpu_type=[True, True, False], cores=[0, 1, 2])
    assert [(w.name, w.cpus) for w in pinned] == [("cpu[0]", (0, 1)), ("cpu[1]", (2,)), ("cuda[2]", None)]
    ranged = plan_workers(("cpu",) * 4, pin=True, ranges=[(0, 1), (2, 3)], cores=[0, 1])
    assert [(w.name, w.ranges, w.cpus) for w in ranged] == [("cpu[0-1]", ((0, 1),), (0,)), ("cpu[2-3]", ((2, 3),), (1,))]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"pin": True, "cores": [0]}, "pinning needs a core per pipeline worker on a CPU-type device: 2 of them, 1 core(s)"),
        ({"pin": True, "ranges": [(0, 0)]}, "do not cover stages 0-1"),
        ({"pin": True, "ranges": [(1, 1), (0, 0)]}, "do not cover stages 0-1 in order"),
        ({"ranges": [(0, 1)]}, "pass pin=True with it"),
        ({"pin": "cores"}, "unknown pinning 'cores'"),
    ],
)
def test_bad_worker_plans_are_one_line_usage_errors(kwargs, fragment):
    with pytest.raises(UsageError) as e:
        plan_workers(("cpu", "cpu"), **kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_a_placement_that_does_not_fit_the_bundle_is_refused_before_any_worker(bundles, tmp_path):
    with pytest.raises(UsageError, match="the placement names 3 stage"):
        Pipeline(bundles["mlp"], ("cpu", "cpu", "cpu"))
    with pytest.raises(UsageError, match="no staged artifact of mlp.hxc can run on 'cuda'"):
        Pipeline(bundles["mlp"], ("cpu", "cuda"))
    from hxc.build import build_bundle

    whole = tmp_path / "whole.hxc"
    assert build_bundle("hxc.examples:mlp", whole, "cpu:host").written
    with pytest.raises(UsageError, match="has no stages to run as a pipeline"):
        Pipeline(whole, ("cpu",))


def test_bad_inputs_fail_in_the_caller(bundles):
    with Pipeline(bundles["mlp"], ("cpu", "cpu"), timeout_s=WAIT) as pipe:
        with pytest.raises(SignatureError, match="expected 1 input"):
            pipe.submit([])
        with pytest.raises(SignatureError, match="has dtype"):
            pipe(np.zeros((2, 64), np.float64))
        assert pipe(np.zeros((2, 64), np.float32)).shape == (2, 10)  # and it goes on

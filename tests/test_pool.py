"""The device pool on the real CPU (local-task, and local-sync as a second CPU device)
and lavapipe Vulkan: one batch split across devices equals one device's result (and
PyTorch's), streams come back in order, and a worker that is SIGKILLed or hangs mid-run
loses nothing: the call completes, correctly, and the device is reported unhealthy."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import hxc.runtime
from hxc.errors import HxcError, UsageError
from hxc.examples import convnet, mlp
from hxc.manifests import read_manifest
from hxc.pool import Backoff, Deadlines, Pool
from hxc.golden import compare

WAIT = 120  # seconds any one pool call may take here before the test fails


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """The example CNN and MLP with a dynamic batch, for the CPU and portable Vulkan."""
    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions

    out = {}
    d = tmp_path_factory.mktemp("pool-bundles")
    for name in ("convnet", "mlp"):
        result = build_bundle(f"hxc.examples:{name}", d / f"{name}.hxc", "cpu:host,vulkan:spirv",
                              options=ImportOptions(dynamic_batch=True))  # fmt: skip
        assert result.written, [r.error for r in result.failed]
        out[name] = d / f"{name}.hxc"
    return out


def _torch(factory, x: np.ndarray) -> np.ndarray:
    model, _ = factory()
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _cnn_input(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 32, 32), dtype=np.float32)


def _run(fn, timeout: float = WAIT):
    """Run fn() in a thread and fail (rather than hang the suite) if it takes too long."""
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(result=_catch(fn)), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"pool call did not finish within {timeout} s"
    if isinstance(box["result"], BaseException):
        raise box["result"]
    return box["result"]


def _catch(fn):
    try:
        return fn()
    except BaseException as e:  # noqa: BLE001 - handed back to the test thread
        return e


def test_one_batch_across_cpu_and_vulkan_equals_one_device_and_pytorch(bundles):
    cnn = bundles["convnet"]
    single = hxc.runtime.load(cnn, device="cpu:host", strict=True)
    # Without backup copies, so that lavapipe's probe rows are stored however long it takes.
    with Pool(cnn, backups=False) as pool:  # devices="all"
        assert {m.name for m in pool.members} == {"cpu:host", "vulkan:spirv"}
        elapsed = 0.0
        for batch in (33, 7, 1):  # unmeasured at first: each device gets a probe chunk
            x = _cnn_input(batch, seed=batch)
            t0 = time.perf_counter()
            y = _run(lambda: pool(x))
            elapsed += time.perf_counter() - t0
            assert y.shape == (batch, 10)
            assert compare(y, single.run_flat([x])[0], "f32").ok
            assert compare(y, _torch(convnet, x), "f32").ok
        stats = pool.stats()
        assert stats.items == 33 + 7 + 1 and all(d.items > 0 for d in stats.devices)  # both devices computed rows
        assert 0 < stats.wall_s <= elapsed  # utilisation is over the calls' own time, counted once
        assert all(0 < d.utilisation <= 1 for d in stats.devices)
        assert all(d.failures == 0 and d.health == "ready" for d in stats.devices)
        assert isinstance(pool(torch.from_numpy(_cnn_input(3))), torch.Tensor)  # torch in, torch out
        assert _run(lambda: pool(_cnn_input(0))).shape == (0, 10)  # zero rows in, zero rows out (test_zero_size.py)
        assert "caller overhead beyond device time: p50" in pool.explain()


def test_map_streams_results_in_input_order(bundles):
    rng = np.random.default_rng(1)
    items = [rng.standard_normal((int(n), 64), dtype=np.float32) for n in rng.integers(1, 9, size=40)]
    with Pool(bundles["mlp"], ["cpu", "vulkan"]) as pool:
        results = _run(lambda: list(pool.map(items, window=8)))
        stats = pool.stats()
    assert len(results) == len(items)
    for x, y in zip(items, results):
        assert y.shape == (x.shape[0], 10) and compare(y, _torch(mlp, x), "f32").ok
    assert stats.items == sum(len(x) for x in items)


def test_a_model_without_a_dynamic_batch_is_explained(example_bundle):
    with Pool(example_bundle, ["cpu:host"]) as pool:
        assert not pool.splittable
        with pytest.raises(UsageError, match=r"no dynamic batch dimension.*--dynamic-batch"):
            pool(_cnn_input(1))
        # Whole requests still stream through the pool, one device each.
        xs = [_cnn_input(1, seed=i) for i in range(5)]
        for x, y in zip(xs, _run(lambda: list(pool.map(xs)))):
            assert compare(y, _torch(convnet, x), "f32").ok


@pytest.fixture(scope="module")
def static_mlp(tmp_path_factory) -> Path:
    """The example MLP with its static batch of 4, for the CPU and portable Vulkan."""
    from hxc.build import build_bundle

    out = tmp_path_factory.mktemp("static") / "mlp.hxc"
    result = build_bundle("hxc.examples:mlp", out, "cpu:host,vulkan:spirv")
    assert result.written, [r.error for r in result.failed]
    return out


@pytest.mark.parametrize("devices", ["all", "vulkan,cpu", "cpu"])
def test_a_static_batch_runs_whole_on_the_best_listed_device(static_mlp, cli, tmp_path, devices):
    # A batch of 4 rows that cannot be split is one request: it runs whole, on the best
    # device listed (the CPU, even when listed last), and that is not an error.
    x = np.random.default_rng(7).standard_normal((4, 64), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    result = cli("run", static_mlp, "-i", tmp_path / "x.npy", "--devices", devices, "--json", "-o", tmp_path / "y.npz")
    assert result.exit_code == 0, result.output
    assert compare(np.load(tmp_path / "y.npz")["output_0"], _torch(mlp, x), "f32").ok
    ran = {d["name"]: d["items"] for d in json.loads(result.stdout)["telemetry"]["devices"]}
    assert ran["cpu:host"] == 4 and sum(ran.values()) == 4
    text = cli("run", static_mlp, "-i", tmp_path / "x.npy", "--devices", devices)
    assert text.exit_code == 0 and "the batch was not split" in text.stderr and "ran whole on cpu:host" in text.stderr


def test_a_stream_of_static_batches_runs_each_whole_on_some_device(static_mlp):
    xs = [np.random.default_rng(i).standard_normal((4, 64), dtype=np.float32) for i in range(12)]
    with Pool(static_mlp, ["cpu", "vulkan"], judge=False) as pool:
        results = _run(lambda: list(pool.map(xs, window=4)))
        assert compare(_run(lambda: pool.run_flat([xs[0]]))[0], _torch(mlp, xs[0]), "f32").ok
    for x, y in zip(xs, results):
        assert y.shape == (4, 10) and compare(y, _torch(mlp, x), "f32").ok


def _kill_after_first_chunk(pool: Pool, name: str, call_done: threading.Event) -> threading.Thread:
    member = next(m for m in pool.members if m.name == name or m.candidate.device.driver == name)
    start = member.counts["chunks"]

    def kill() -> None:
        # After its first chunk, and while it holds another: killed mid-run, not after
        # the call (then nothing is killed and the test fails on the device's health).
        while member.counts["chunks"] <= start or not member.worker.queue_depth:
            if call_done.wait(0.001):
                return
        member.worker.kill(signal.SIGKILL)

    t = threading.Thread(target=kill, daemon=True)
    t.start()
    return t


def _wait_unhealthy(pool: Pool, device: str) -> None:
    """Until the pool has seen `device`'s worker die (its reader thread notices it)."""
    deadline = time.monotonic() + WAIT
    while pool.stats().device(device).health != "unhealthy" and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("victim", ["local-task", "vulkan"])
def test_a_worker_sigkilled_mid_run_loses_nothing(bundles, victim):
    x = _cnn_input(2400, seed=3)  # ~0.6 s of the CPU
    if victim == "local-task":
        # Two CPU devices, so the rest of the batch is not left to the 30x slower
        # lavapipe; the CPU takes a chunk every ~50 ms, so it is killed mid-run.
        env, devices = {}, ["local-task", "local-sync"]
    else:
        # Lavapipe may get no chunk but its probe in a call (on a busy host it measures
        # too slow for any): it SIGKILLs itself on that probe, which every device not
        # measured yet gets at the start of its first call, while the CPU works on.
        env, devices = {"HXC_POOL_FAULT": "vulkan:crash@1"}, ["cpu:host", "vulkan"]
    # No judgement: lavapipe must keep taking chunks however little it adds here.
    with Pool(bundles["convnet"], devices, backoff=Backoff(first_s=300), judge=False, env=env) as pool:
        if victim == "local-task":
            pool(x[:64])  # measured
        before = pool.stats().items
        call_done = threading.Event()
        killer = _kill_after_first_chunk(pool, victim, call_done) if victim == "local-task" else None
        try:
            y = _run(lambda: pool(x))
        finally:
            call_done.set()
        if killer is not None:
            killer.join()
        _wait_unhealthy(pool, victim)
        stats = pool.stats()
    assert compare(y, _torch(convnet, x), "f32").ok  # complete and correct
    dead = next(d for d in stats.devices if d.device.startswith(victim))
    assert dead.health == "unhealthy" and dead.reason == "was killed by SIGKILL" and dead.failures == 1
    assert stats.items - before == len(x)  # every row once: the lost chunk counted only where it finished


def test_a_hung_worker_is_killed_at_its_deadline_and_its_rows_rerun(bundles):
    x = _cnn_input(300, seed=4)
    # Its first chunk (a one-row probe: nothing is measured yet) hangs; an unmeasured
    # device is given `unmeasured_s`. Without backup copies the call waits for it.
    deadlines = Deadlines(factor=5, floor_s=1.0, unmeasured_s=5.0)
    with Pool(bundles["convnet"], ["cpu:host", "vulkan"], deadlines=deadlines, backoff=Backoff(first_s=300),
              backups=False, env={"HXC_POOL_FAULT": "vulkan:hang@1"}) as pool:  # fmt: skip
        y = _run(lambda: pool(x))
        stats = pool.stats()
        explained = pool.explain()
    assert compare(y, _torch(convnet, x), "f32").ok
    vk = stats.device("vulkan:spirv")
    assert vk.health == "unhealthy" and "missed its deadline" in vk.reason and vk.failures == 1
    assert stats.items == 300
    assert "unhealthy: missed its deadline" in explained


def test_a_backup_copy_ends_a_call_whose_slow_device_stalls_and_the_stalled_original_changes_nothing(bundles):
    # lavapipe, not measured yet, gets a one-row probe, which hangs here (on a busy host
    # its first call took 2.6 s, against 0.06 s for the CPU's other 63 rows). Nothing
    # predicts when it ends, so the CPU copies it once it has done the rest, and the call
    # returns without it, long before lavapipe's deadline. When the stalled original is
    # killed at its deadline, nothing is re-run or written again.
    cnn = bundles["convnet"]
    x = _cnn_input(64, seed=8)
    with Pool(cnn, ["cpu:host", "vulkan"], deadlines=Deadlines(unmeasured_s=20.0), backoff=Backoff(first_s=300),
              env={"HXC_POOL_FAULT": "vulkan:hang@1"}) as pool:  # fmt: skip
        y = _run(lambda: pool(x))
        stats = pool.stats()
        assert compare(y, _torch(convnet, x), "f32").ok
        cpu, vk = stats.device("cpu:host"), stats.device("vulkan:spirv")
        assert cpu.items == 64 and cpu.backups == 1
        assert vk.items == 0 and vk.queue_depth == 1 and vk.failures == 0 and vk.health == "ready"
        assert "backup copies run: 1" in pool.explain()
        assert pool.settle(WAIT)  # until the stalled copy ends: killed at its deadline
        vk = pool.stats().device("vulkan:spirv")
        assert vk.health == "unhealthy" and "missed its deadline" in vk.reason and vk.failures == 1
        assert vk.requeued == 0 and vk.queue_depth == 0  # its rows were stored already: nothing goes back
        x2 = _cnn_input(33, seed=99)
        assert compare(_run(lambda: pool(x2)), _torch(convnet, x2), "f32").ok
        assert pool.stats().items == 64 + 33  # each row stored once, by whichever copy came first


def test_an_unmeasured_devices_dropped_probe_still_measures_it(bundles):
    # lavapipe answers its probe 5 s late: the CPU's copy is stored, lavapipe's dropped
    # when it comes, after the call, and its timing measures lavapipe all the same.
    x = np.random.default_rng(2).standard_normal((64, 64), dtype=np.float32)
    with Pool(bundles["mlp"], ["cpu:host", "vulkan"], judge=False, env={"HXC_POOL_FAULT": "vulkan:slow@1"}) as pool:
        assert compare(_run(lambda: pool(x)), _torch(mlp, x), "f32").ok
        assert pool.stats().device("vulkan").speed_source is None
        assert pool.settle(WAIT)
        vk = pool.stats().device("vulkan")
        assert vk.speed_source == "measured" and vk.items == 0 and vk.wasted == 1 and vk.failures == 0


def test_an_unhealthy_device_restarts_and_rejoins(bundles):
    x = _cnn_input(64, seed=5)
    with Pool(bundles["convnet"], ["local-task", "local-sync"], backoff=Backoff(first_s=0.2)) as pool:
        sync = next(m for m in pool.members if m.candidate.device.driver == "local-sync")
        first = sync.worker.pid
        sync.worker.kill()
        deadline = time.monotonic() + WAIT
        while sync.worker.stats().restarts < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sync.worker.wait_ready(WAIT) and sync.worker.pid != first
        assert sync.worker.stats().failures == 1 and sync.worker.reason == "was killed by SIGKILL"
        y = _run(lambda: pool(x))
        assert compare(y, _torch(convnet, x), "f32").ok


def test_every_device_failing_is_an_error_not_a_hang(bundles):
    with Pool(bundles["convnet"], ["cpu:host"], backoff=Backoff(None), env={"HXC_POOL_FAULT": "cpu:host:crash@1"}) as pool:
        with pytest.raises(HxcError, match="every device of the pool failed.*killed by SIGKILL"):
            _run(lambda: pool(_cnn_input(4)))


def test_pinning_gives_each_device_its_own_cores(bundles):
    import os

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores")
    with Pool(bundles["convnet"], ["cpu:host", "vulkan"], pin="split") as pool:
        info = {m.name: m.worker.ready_info for m in pool.members}
        cpus = {m.name: m.worker.cpus for m in pool.members}
        threads = {m.name: _thread_cpus(m.worker.pid) for m in pool.members}
        names = {m.name: _thread_names(m.worker.pid) for m in pool.members}
        x = _cnn_input(16)
        assert compare(_run(lambda: pool(x)), _torch(convnet, x), "f32").ok
    assert set(cpus["cpu:host"]).isdisjoint(cpus["vulkan:spirv"])
    for name in cpus:
        assert info[name]["cpus"] == list(cpus[name])  # the process's affinity
        assert threads[name] == {tuple(cpus[name])}  # and every thread's, IREE's and Mesa's included
    # IREE's task system runs one worker per given core; lavapipe one thread per core (LP_NUM_THREADS).
    assert sum(n.startswith("iree-worker") for n in names["cpu:host"]) == len(cpus["cpu:host"])
    assert sum(n.startswith("llvmpipe") for n in names["vulkan:spirv"]) == len(cpus["vulkan:spirv"])
    with pytest.raises(UsageError, match="not available"):
        Pool(bundles["convnet"], ["cpu:host"], pin={"cpu": [4096]})


def test_lavapipe_on_the_cpus_cores_is_left_out_from_measurements(bundles, monkeypatch):
    # Unpinned, lavapipe computes on the CPU device's own two cores and adds ~1% of its
    # rate: it cannot show a gain beyond the noise, and the judgement, made from
    # chunks timed alone and side by side, leaves it out and says why. The first
    # judgement is made again after 5 s of work, which a busy host reaches within one
    # call (then lavapipe is let back in to be measured): held off here.
    monkeypatch.setattr("hxc.pool.pool.CONFIRM_S", 3600.0)
    with Pool(bundles["convnet"], ["cpu:host", "vulkan"]) as pool:
        x = _cnn_input(1000)
        expected = _torch(convnet, x)
        for _ in range(30):  # calls, not seconds: each takes longer on a busy host
            if pool.members[1].left_out is not None:
                break
            assert compare(_run(lambda: pool(x)), expected, "f32").ok
        vk = pool.stats().device("vulkan")
        assert vk.left_out is not None and "items/s" in vk.left_out, pool.explain()
        assert "left out of the split: " in pool.explain()
        before = vk.items
        assert compare(_run(lambda: pool(x)), expected, "f32").ok
        assert pool.stats().device("vulkan").items == before  # it takes no more work
        assert pool.stats().device("cpu:host").left_out is None


def _thread_cpus(pid: int) -> set[tuple[int, ...]]:
    import os

    return {tuple(sorted(os.sched_getaffinity(int(tid)))) for tid in os.listdir(f"/proc/{pid}/task")}


def _thread_names(pid: int) -> list[str]:
    import os

    return [Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip() for tid in os.listdir(f"/proc/{pid}/task")]


def test_run_command_on_a_pool_prints_telemetry(bundles, cli, tmp_path):
    x = _cnn_input(9, seed=6)
    np.save(tmp_path / "x.npy", x)
    result = cli("run", bundles["convnet"], "-i", tmp_path / "x.npy", "--devices", "all", "--json", "-o", tmp_path / "y.npz")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out["pool"]) == {"cpu:host", "vulkan:spirv"}
    assert compare(np.load(tmp_path / "y.npz")["output_0"], _torch(convnet, x), "f32").ok
    telemetry = out["telemetry"]
    assert telemetry["items"] == 9 and {d["name"] for d in telemetry["devices"]} == {"cpu:host", "vulkan:spirv"}
    for d in telemetry["devices"]:
        assert {"items", "chunks", "busy_s", "utilisation", "failures", "queue_depth", "health", "left_out"} <= set(d)
    text = cli("run", bundles["convnet"], "-i", tmp_path / "x.npy", "--devices", "cpu,vulkan", "--pin", "split")
    assert text.exit_code == 0 and "Pool telemetry (9 items" in text.stdout and "utilisation" in text.stdout
    bad = cli("run", bundles["convnet"], "-i", tmp_path / "x.npy", "--devices", "all", "--pin", "cpu:zero")
    assert bad.exit_code == 2 and "expected `split` or DEVICE=CORES" in bad.stderr
    unknown = cli("run", bundles["convnet"], "-i", tmp_path / "x.npy", "--devices", "cuda")
    assert unknown.exit_code == 2 and "no artifact can run on the requested device 'cuda'" in unknown.stderr


def test_pool_bench_records_caller_overhead_that_slo_checks_then_add(bundles, cli, tmp_path):
    bundle = Path(shutil.copytree(bundles["convnet"], tmp_path / "b.hxc"))
    result = cli("bench", bundle, "--pool", "--min-time", "0.1", "--min-iterations", "5", "--max-time", "20",
                 "--rounds", "1", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["recorded"] and out["pool_items_per_second"] > 0 and out["sum_alone_items_per_second"] > 0
    assert {d["name"] for d in out["devices"]} == {"cpu:host", "vulkan:spirv"}
    assert all(0 <= d["utilisation"] <= 1.05 for d in out["devices"])
    profiles = read_manifest(bundle).profiles
    assert {p.candidate for p in profiles} == {"cpu:host", "vulkan:spirv"}
    assert all(p.caller_overhead is not None and p.caller_overhead.iterations >= 1 for p in profiles)
    chosen = json.loads(cli("select", bundle, "--slo-ms", "1000", "--json").stdout)
    verdicts = [c["slo"] for c in chosen["candidates"]]
    assert all(v["overhead_ms"] is not None for v in verdicts)
    assert all(v["estimate_ms"] == pytest.approx(v["device_ms"] + v["overhead_ms"]) for v in verdicts)
    assert not any("overhead not measured" in c for v in verdicts for c in v["caveats"])

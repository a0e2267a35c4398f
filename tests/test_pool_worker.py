"""Device worker processes on the real CPU and lavapipe devices: results through shared
memory equal in-process ones, and a worker that is SIGKILLed, hangs, segfaults or fails
to load is reported with the reason while its callers get a WorkerFailed to re-route."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import hxc.runtime
from hxc.examples import convnet
from hxc.manifests import read_manifest
from hxc.pool import Backoff, Deadlines, Health, RequestFailed, Worker, WorkerFailed, run_isolated
from hxc.golden import compare

# Bounds every wait on a worker, so a hung device fails the test instead of the suite.
WAIT = 120


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> Path:
    """The example CNN with a dynamic batch, for the CPU and the portable Vulkan target."""
    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions

    out = tmp_path_factory.mktemp("pool") / "cnn.hxc"
    result = build_bundle("hxc.examples:convnet", out, "cpu:host,vulkan:spirv", options=ImportOptions(dynamic_batch=True))
    assert result.written, [r.error for r in result.failed]
    return out


def _worker(bundle: Path, artifact: str, **kw) -> Worker:
    kw.setdefault("backoff", Backoff(None))
    w = Worker(bundle, artifact, artifact, read_manifest(bundle).signature, **kw).start()
    assert w.wait_ready(WAIT), w.reason
    return w


def _x(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 32, 32), dtype=np.float32)


def _torch(x: np.ndarray) -> np.ndarray:
    model, _ = convnet()
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("artifact", ["cpu:host", "vulkan:spirv"])
def test_a_worker_returns_what_the_model_returns_in_process(cnn, artifact):
    x = _x(5)
    with _worker(cnn, artifact) as w:
        assert w.ready_info["artifact"] == artifact and w.ready_info["pid"] == w.pid
        results = [w.submit([x]).result(WAIT) for _ in range(3)]  # two slots: the third waits for a free one
        stats = w.stats()
    local = hxc.runtime.load(cnn, device=artifact, strict=True).run_flat([x])[0]
    for r in results:
        np.testing.assert_array_equal(r.outputs[0], local)  # same artifact, same device: same bits
        assert r.rows == 5 and 0 < r.device_ms <= r.worker_ms
    assert compare(results[0].outputs[0], _torch(x), "f32").ok
    assert stats.items == 15 and stats.requests == 3 and stats.failures == 0 and stats.busy_s > 0
    assert stats.ms_per_item is not None and stats.overhead.iterations >= 1 and stats.overhead.p50_ms >= 0
    assert w.health == Health.STOPPED


def test_outputs_can_go_straight_into_the_callers_array(cnn):
    x = _x(4)
    out = np.full((4, 10), np.nan, np.float32)
    with _worker(cnn, "cpu:host") as w:
        result = w.submit([x], sink=lambda views: out.__setitem__(slice(None), views[0])).result(WAIT)
    assert result.outputs is None and not np.isnan(out).any()
    assert compare(out, _torch(x), "f32").ok


def test_a_bad_request_fails_alone(cnn):
    with _worker(cnn, "cpu:host") as w:
        with pytest.raises(RequestFailed, match="has shape 2x3x8x8"):
            w.submit([np.zeros((2, 3, 8, 8), np.float32)]).result(WAIT)
        assert w.health == Health.READY
        assert w.submit([_x(1)]).result(WAIT).rows == 1


def test_futures_complete_outside_the_workers_lock(cnn):
    # A callback that calls back into the worker (as a server re-routing a failed
    # request does) must not deadlock. Submitted while the worker starts, the request is
    # sent (and fails) from the worker's reader thread, after the callback is attached.
    import threading

    from hxc.pool.worker import Inputs

    def broken(views):
        raise ValueError("cannot fill the inputs")

    seen = []
    done = threading.Event()
    w = Worker(cnn, "cpu:host", "cpu", read_manifest(cnn).signature, backoff=Backoff(None)).start()
    f = w.submit(Inputs(((1, 3, 32, 32),), broken))
    f.add_done_callback(lambda f: (seen.append(w.stats().queue_depth), done.set()))
    # On a deadlock the worker cannot even be closed: fail without trying to.
    assert done.wait(WAIT), "the callback never ran: deadlocked on the worker's lock"
    with pytest.raises(RequestFailed, match="cannot fill the inputs"):
        f.result(WAIT)
    assert seen == [0] and w.health == Health.READY
    w.close()


def test_a_sigkilled_worker_fails_its_requests_is_unhealthy_and_restarts(cnn):
    x = _x(16)
    with _worker(cnn, "cpu:host", backoff=Backoff(first_s=0.2)) as w:
        first_pid = w.pid
        futures = [w.submit([x]) for _ in range(40)]
        while w.stats().requests < 2:
            time.sleep(0.001)
        w.kill(signal.SIGKILL)
        done = failed = 0
        for f in futures:
            try:
                f.result(WAIT)
                done += 1
            except WorkerFailed as e:
                assert "was killed by SIGKILL" in str(e)
                failed += 1
        assert done >= 2 and failed >= 1 and done + failed == 40  # each finished exactly once, or failed
        stats = w.stats()
        assert stats.failures == 1 and stats.items == 16 * done and stats.reason == "was killed by SIGKILL"
        assert w.wait_ready(WAIT) and w.pid != first_pid  # restarted after the back-off
        assert w.stats().restarts == 1 and w.reason == "was killed by SIGKILL"  # the last reason stays visible
        assert w.submit([x]).result(WAIT).rows == 16


@pytest.mark.parametrize("artifact", ["cpu:host", "vulkan:spirv"])
def test_a_hung_worker_misses_its_deadline_and_is_killed(cnn, artifact):
    deadlines = Deadlines(factor=10, floor_s=1.0)
    with _worker(cnn, artifact, deadlines=deadlines, env={"HXC_POOL_FAULT": f"{artifact}:hang@2"}) as w:
        assert w.submit([_x(2)]).result(WAIT).rows == 2  # measured: the next deadline derives from it
        # Failing with WorkerFailed (not result()'s TimeoutError) shows the worker's own
        # deadline ended the wait, not the test's WAIT; no wall-clock assertion needed.
        with pytest.raises(WorkerFailed, match=r"missed its deadline: no answer after .* for 2 item\(s\); expected"):
            w.submit([_x(2)]).result(WAIT)
        assert w.health == Health.UNHEALTHY and "missed its deadline" in w.reason
        with pytest.raises(WorkerFailed, match="is unhealthy: missed its deadline"):
            w.submit([_x(1)]).result(WAIT)


def test_a_segfault_comes_back_as_one_line(cnn):
    # What `hxc verify`/`hxc run` can use so a crashing artifact cannot take them down.
    x = _x(3)
    np.testing.assert_allclose(run_isolated(cnn, "cpu:host", [x]).outputs[0], _torch(x), atol=1e-4, rtol=1e-3)
    import os

    os.environ["HXC_POOL_FAULT"] = "cpu:host:segv@1"
    try:
        with pytest.raises(WorkerFailed) as e:
            run_isolated(cnn, "cpu:host", [x])
    finally:
        del os.environ["HXC_POOL_FAULT"]
    assert str(e.value) == "cpu:host crashed (SIGSEGV)"


def test_a_worker_that_cannot_load_says_why(cnn, tmp_path):
    w = Worker(cnn, "cuda:sm_90", "cuda", read_manifest(cnn).signature, backoff=Backoff(None)).start()
    assert not w.wait_ready(WAIT)
    assert w.health == Health.UNHEALTHY and w.reason.startswith("failed to load:") and "cuda:sm_90" in w.reason
    with pytest.raises(WorkerFailed):
        w.submit([_x(1)]).result(WAIT)
    w.close()

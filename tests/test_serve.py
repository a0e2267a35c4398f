"""`hxc serve` as a client sees it: a real server process on a free port, the official
`tritonclient[http]` (and raw HTTP for what that client refuses to send), the real CPU
and lavapipe Vulkan devices, and outputs compared with PyTorch's own.

Every wait is bounded (WAIT), so a device that hangs fails a test instead of the suite."""

from __future__ import annotations

import functools
import http.client
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from hxc.examples import convnet, mlp
from hxc.runtime.verify import compare

WAIT = 120


# --- a real server ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`hxc serve ARGS` in a subprocess on a free port; `start()` waits for its ready event."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "hxc.cli", "serve", *map(str, args), "--port", str(self.port), "--json"]
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None
        self.events: list[dict] = []

    def start(self, wait_ready: bool = True) -> Server:
        self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env, text=True)
        if wait_ready:
            self.wait_event("ready")
        return self

    def wait_event(self, kind: str, timeout: float = WAIT) -> dict:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.5)
            if ready:
                line = self.process.stdout.readline()
                if not line:
                    break
                event = json.loads(line)
                self.events.append(event)
                if event["event"] == kind:
                    return event
        raise AssertionError(f"no {kind!r} event from hxc serve; stderr: {self.stderr_tail()}")

    def stderr_tail(self) -> str:
        p = self.process
        if p is None or p.poll() is None:
            return "(still running)"
        return (p.stderr.read() if p.stderr else "")[-2000:]

    def client(self) -> th.InferenceServerClient:
        return th.InferenceServerClient(self.url, network_timeout=WAIT, connection_timeout=WAIT)

    def http(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, Any, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.headers, r.read()  # headers: case-insensitive
        finally:
            conn.close()

    def workers(self) -> dict[str, int]:
        """{artifact id: pid} of the server's device worker processes."""
        assert self.process is not None
        out = {}
        for proc in Path("/proc").iterdir():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except (OSError, ValueError, IndexError):
                continue
            m = re.search(r'"artifact": "([^"]+)"', cmdline)
            if ppid == self.process.pid and m:
                out[m.group(1)] = int(proc.name)
        return out

    def metrics(self) -> str:
        status, _, body = self.http("GET", "/metrics")
        assert status == 200
        return body.decode()

    def stop(self) -> int:
        p = self.process
        if p is None:
            return 0
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return p.returncode

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


# --- models ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """The example CNN with a dynamic batch and the example MLP (static batch of 4), both
    for the CPU and the portable Vulkan target."""
    from hxc.compiler.build import build_bundle
    from hxc.compiler.imported import ImportOptions

    d = tmp_path_factory.mktemp("serve")
    out = {"cnn": d / "cnn.hxc", "mlp": d / "mlp.hxc"}
    for factory, path, dynamic in (("convnet", out["cnn"], True), ("mlp", out["mlp"], False)):
        result = build_bundle(f"hxc.examples:{factory}", path, "cpu:host,vulkan:spirv", options=ImportOptions(dynamic_batch=dynamic))
        assert result.written, [r.error for r in result.failed]
    return out


@pytest.fixture(scope="module")
def server(bundles, tmp_path_factory):
    """One server for the protocol tests: the CNN (named from its manifest) and the MLP
    (renamed) on both devices, with a 1 MiB body limit, and prices that make the
    software Vulkan device free (so the cost policy has a reason to use it)."""
    prices = tmp_path_factory.mktemp("prices") / "prices.toml"
    prices.write_text('[devices]\n"vulkan: *" = 0.0\n')
    with Server(bundles["cnn"], f"tiny-mlp={bundles['mlp']}", "--max-body-mb", "1", "--prices", prices) as s:
        yield s


@functools.cache
def _eager(factory):
    return factory()[0]


def torch_cnn(x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return _eager(convnet)(torch.from_numpy(x)).numpy()


def torch_mlp(x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return _eager(mlp)(torch.from_numpy(x)).numpy()


def check_all(xs: list[np.ndarray], ys: list[np.ndarray]) -> None:
    """Each output equals PyTorch's for its input (one eager call for all of them)."""
    ref = torch_cnn(np.concatenate(xs))
    at = 0
    for x, y in zip(xs, ys):
        assert compare(y, ref[at:at + len(x)], "f32").ok
        at += len(x)


def images(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 32, 32), dtype=np.float32)


def infer(client, model: str, x: np.ndarray, *, binary: bool = True, binary_out: bool | None = None, **parameters):
    t = th.InferInput("x" if model == "convnet" else "input", list(x.shape), "FP32")
    t.set_data_from_numpy(x, binary_data=binary)
    outputs = None if binary_out is None else [th.InferRequestedOutput("output_0", binary_data=binary_out)]
    return client.infer(model, [t], outputs=outputs, parameters=parameters or None)


# --- metadata and readiness ------------------------------------------------------------------


def test_server_and_model_metadata_and_readiness(server, bundles):
    c = server.client()
    assert c.is_server_live() and c.is_server_ready()
    meta = c.get_server_metadata()
    assert meta["name"] == "hxc" and "binary_tensor_data" in meta["extensions"]
    cnn = c.get_model_metadata("convnet")
    assert cnn["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert cnn["outputs"] == [{"name": "output_0", "datatype": "FP32", "shape": [-1, 10]}] and cnn["versions"] == ["1"]
    small = c.get_model_metadata("tiny-mlp", "1")
    assert small["inputs"][0]["shape"] == [4, 64] and small["name"] == "tiny-mlp"
    assert c.is_model_ready("convnet") and c.is_model_ready("tiny-mlp", "1")
    assert c.get_model_config("convnet")["max_batch_size"] == 32 and c.get_model_config("tiny-mlp")["max_batch_size"] == 0
    ready = server.events[-1]
    assert {d["device"] for m in ready["models"] for d in m["devices"]} == {"cpu:host", "vulkan:spirv"}
    assert all(d["health"] == "ready" for m in ready["models"] for d in m["devices"])


def test_connections_have_nagle_off():
    """asyncio turns Nagle's algorithm off only on sockets whose protocol says TCP; with it
    on, every request on a kept-alive connection waits ~40 ms for a delayed ACK."""
    import asyncio

    from hxc.serve.server import listen

    sock = listen("127.0.0.1", 0)

    async def nodelay() -> int:
        seen = asyncio.get_running_loop().create_future()

        def accepted(reader, writer) -> None:
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(seen, WAIT)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(nodelay()) != 0


# --- inference on each device ------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "vulkan"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_pytorch_on_each_device(server, device, binary):
    c = server.client()
    x = images(3, seed=1)
    r = infer(c, "convnet", x, binary=binary, binary_out=binary, device=device)
    y = r.as_numpy("output_0")
    assert y.shape == (3, 10) and compare(y, torch_cnn(x), "f32").ok
    assert r.get_response()["parameters"]["device"].startswith(device)
    assert ("data" in r.get_response()["outputs"][0]) != binary
    x4 = np.random.default_rng(2).standard_normal((4, 64), dtype=np.float32)
    y4 = infer(c, "tiny-mlp", x4, binary=binary, device=device).as_numpy("output_0")
    assert compare(y4, torch_mlp(x4), "f32").ok


@pytest.mark.parametrize("device", ["cpu", "vulkan"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_a_zero_row_request_gets_zero_rows_on_each_device(server, device, binary):
    # KServe v2 allows a 0 in a shape (0 bytes of binary data); Vulkan's answer comes from
    # the output's shape (see test_zero_size.py).
    r = infer(server.client(), "convnet", images(0), binary=binary, binary_out=binary, device=device)
    assert r.as_numpy("output_0").shape == (0, 10)
    assert r.get_response()["parameters"]["device"].startswith(device)


def test_bf16_travels_as_binary_data_and_equals_pytorch(tmp_path):
    """BF16 is Triton's extension: tritonclient sends and reads it only as binary data
    (as ml_dtypes.bfloat16 arrays); asking for it as JSON is a protocol error."""
    import ml_dtypes

    from hxc.compiler.build import build_bundle
    from hxc.examples.zoo import mlp_bf16

    bundle = tmp_path / "mlp_bf16.hxc"
    assert build_bundle("hxc.examples.zoo:mlp_bf16", bundle, "cpu:host").written
    model, (example,) = mlp_bf16()
    x = torch.randn_like(example)
    with torch.no_grad():
        expected = model(x).float().numpy()
    with Server(bundle) as s:
        c = s.client()
        [meta] = c.get_model_metadata("mlp_bf16")["inputs"]
        assert meta["datatype"] == "BF16"
        t = th.InferInput(meta["name"], list(x.shape), "BF16")
        t.set_data_from_numpy(x.float().numpy().astype(ml_dtypes.bfloat16), binary_data=True)
        y = c.infer("mlp_bf16", [t]).as_numpy(c.get_model_metadata("mlp_bf16")["outputs"][0]["name"])
        assert y.dtype == ml_dtypes.bfloat16 and compare(y.astype(np.float32), expected, "bf16").ok
        out = th.InferRequestedOutput("output_0", binary_data=False)
        with pytest.raises(InferenceServerException) as e:
            c.infer("mlp_bf16", [t], outputs=[out])
        assert e.value.status() == "400" and "only as binary" in e.value.message()


def test_request_ids_and_parameters_come_back(server):
    c = server.client()
    t = th.InferInput("x", [1, 3, 32, 32], "FP32")
    t.set_data_from_numpy(images(1))
    r = c.infer("convnet", [t], request_id="my-id-7", parameters={"slo_ms": 10000, "policy": "cost"})
    response = r.get_response()
    assert response["id"] == "my-id-7" and response["model_name"] == "convnet" and response["model_version"] == "1"
    assert response["parameters"]["slo_missed"] is False


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(server):
    xs = [images(1 + i % 3, seed=i) for i in range(48)]

    def one(x):
        return infer(server.client(), "convnet", x, device="cpu")

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, xs))
    check_all(xs, [r.as_numpy("output_0") for r in results])
    batches = [r.get_response()["parameters"]["batch_rows"] for r in results]
    assert max(batches) > 3, batches  # some calls merged several requests
    text = server.metrics()
    assert metric(text, "hxc_inference_batch_size_count", model="convnet") < metric(text, "hxc_inference_requests_total", model="convnet")


# --- bad input: each a protocol error, and the server keeps serving ---------------------------


def _post(server, path: str, doc=None, body: bytes | None = None, headers: dict | None = None):
    data = body if body is not None else json.dumps(doc).encode()
    status, hdrs, content = server.http("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    return status, hdrs, json.loads(content)


def _x_json(shape=(1, 3, 32, 32), datatype="FP32", data=None):
    n = int(np.prod(shape))
    return {"name": "x", "datatype": datatype, "shape": list(shape), "data": data if data is not None else [0.5] * n}


BAD = [
    ("unknown model", "/v2/models/nope/infer", {"inputs": [_x_json()]}, None, {}, 404, "unknown model"),
    ("unknown version", "/v2/models/convnet/versions/9/infer", {"inputs": [_x_json()]}, None, {}, 404, "no version"),
    ("malformed JSON", "/v2/models/convnet/infer", None, b'{"inputs": [', {}, 400, "not valid JSON"),
    ("wrong datatype", "/v2/models/convnet/infer", {"inputs": [_x_json(datatype="INT32", data=[1] * 3072)]}, None, {}, 400, "expects FP32"),
    ("wrong shape", "/v2/models/convnet/infer", {"inputs": [_x_json(shape=(1, 3, 16, 16))]}, None, {}, 400, "expects"),
    ("wrong element count", "/v2/models/convnet/infer", {"inputs": [_x_json(data=[0.5] * 100)]}, None, {}, 400, "holds 100 elements"),
    ("missing input", "/v2/models/convnet/infer", {"inputs": [{**_x_json(), "name": "y"}]}, None, {}, 400, "unknown input"),
    ("no inputs", "/v2/models/convnet/infer", {"outputs": []}, None, {}, 400, "'inputs'"),
    ("BYTES for a numeric model", "/v2/models/convnet/infer", {"inputs": [_x_json(datatype="BYTES", data=["a"] * 3072)]}, None, {}, 400, "BYTES"),
    ("BF16 as JSON", "/v2/models/convnet/infer", {"inputs": [_x_json(datatype="BF16")]}, None, {}, 400, "only as binary"),
    ("binary header length past the body", "/v2/models/convnet/infer", None, b'{"inputs": []}', {"Inference-Header-Content-Length": "500"}, 400, "the body has"),
    ("body over the limit", "/v2/models/convnet/infer", None, b"[" * (1024**2 + 10), {}, 413, "limit"),
    ("unknown device", "/v2/models/convnet/infer", {"inputs": [_x_json()], "parameters": {"device": "cuda"}}, None, {}, 400, "no device"),
    ("unknown encoding", "/v2/models/convnet/infer", {"inputs": [_x_json()]}, None, {"Content-Encoding": "br"}, 415, "Content-Encoding"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_protocol_error_and_the_server_keeps_serving(server, case):
    _, path, doc, body, headers, status, message = case
    got, _, reply = _post(server, path, doc, body, headers)
    assert got == status and set(reply) == {"error"} and message in reply["error"], reply
    x = images(1)
    assert compare(infer(server.client(), "convnet", x).as_numpy("output_0"), torch_cnn(x), "f32").ok


def test_binary_data_that_does_not_match_its_header(server):
    x = images(1)
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()  # fmt: skip
    for data, message in ((x.tobytes()[:-4], "runs past the end"), (x.tobytes() + b"xx", "add up to")):
        status, _, reply = _post(server, "/v2/models/convnet/infer", body=header + data,
                                 headers={"Inference-Header-Content-Length": str(len(header))})  # fmt: skip
        assert status == 400 and message in reply["error"]
    status, hdrs, content = server.http("POST", "/v2/models/convnet/infer", header + x.tobytes(),
                                        {"Inference-Header-Content-Length": str(len(header))})  # fmt: skip
    assert status == 200 and "Inference-Header-Content-Length" not in hdrs  # JSON outputs unless asked otherwise
    assert compare(np.array(json.loads(content)["outputs"][0]["data"], np.float32).reshape(1, 10), torch_cnn(x), "f32").ok


def test_tritonclient_sees_protocol_errors_with_their_status(server):
    c = server.client()
    t = th.InferInput("x", [1, 3, 32, 32], "FP16")
    t.set_data_from_numpy(images(1).astype(np.float16))
    with pytest.raises(InferenceServerException) as e:
        c.infer("convnet", [t])
    assert e.value.status() == "400" and "FP32" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        c.get_model_metadata("nope")
    assert e.value.status() == "404"
    status, _, body = server.http("GET", "/v2/no/such/path")
    assert status == 404 and "error" in json.loads(body)


def test_metrics_count_requests_by_model_device_and_status(server):
    for device in ("cpu", "vulkan"):
        infer(server.client(), "convnet", images(1), device=device)
    _post(server, "/v2/models/convnet/infer", {"inputs": []})
    _post(server, "/v2/models/nope/infer", {"inputs": []})
    text = server.metrics()
    assert metric(text, "hxc_inference_requests_total", model="convnet", device="cpu:host", status="ok") > 0
    assert metric(text, "hxc_inference_requests_total", model="convnet", device="vulkan:spirv", status="ok") > 0
    assert metric(text, "hxc_inference_requests_total", status="400") > 0
    assert metric(text, "hxc_inference_requests_total", status="404") > 0
    assert metric(text, "hxc_device_healthy", model="convnet", device="vulkan:spirv") == 1
    assert metric(text, "hxc_queue_limit", model="convnet") == 256
    for name in ("hxc_inference_queue_seconds_bucket", "hxc_inference_compute_seconds_bucket", "hxc_inference_batch_size_bucket",
                 "hxc_queue_depth", "hxc_device_utilisation", "hxc_device_failures_total", "hxc_inference_slo_misses_total"):  # fmt: skip
        assert name in text, name


# --- routing -----------------------------------------------------------------------------------


def test_a_deadline_no_device_can_meet_is_served_and_counted_as_missed(server):
    before = metric(server.metrics(), "hxc_inference_slo_misses_total", model="convnet")
    r = infer(server.client(), "convnet", images(2), slo_ms=0.001)
    assert r.get_response()["parameters"]["slo_missed"] is True
    assert metric(server.metrics(), "hxc_inference_slo_misses_total", model="convnet") == before + 1


def test_cost_policy_takes_the_cheapest_device_that_meets_the_deadline(server):
    c = server.client()
    for device in ("vulkan", "cpu", "vulkan", "cpu"):  # both measured
        infer(c, "convnet", images(1), device=device)

    def where(**parameters) -> str:
        return infer(c, "convnet", images(1), **parameters).get_response()["parameters"]["device"]

    assert where(policy="cost", slo_ms=60000) == "vulkan:spirv"  # free here, and well within a minute
    assert where(policy="latency") == "cpu:host"  # ~35x faster
    # lavapipe cannot answer in 5 ms: the CPU is the only device that can (or, on a busy
    # machine, the one that misses by least).
    assert where(policy="cost", slo_ms=5) == "cpu:host"


# --- failures, shutdown, overload (servers of their own) ------------------------------------------


def test_a_worker_killed_under_load_loses_no_request(bundles):
    with Server(bundles["cnn"]) as s:
        xs = [images(1 + i % 4, seed=i) for i in range(160)]
        killed = threading.Event()

        def one(i):
            if i == 40:
                os.kill(s.workers()["cpu:host"], signal.SIGKILL)
                killed.set()
            return infer(s.client(), "convnet", xs[i])

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(len(xs))))
        assert killed.is_set()
        check_all(xs, [r.as_numpy("output_0") for r in results])
        devices = {r.get_response()["parameters"]["device"] for r in results}
        assert devices == {"cpu:host", "vulkan:spirv"}, devices  # the other device took over
        text = s.metrics()
        assert metric(text, "hxc_device_failures_total", device="cpu:host") == 1
        assert metric(text, "hxc_inference_requests_total", model="convnet", status="ok") == len(xs)
        assert s.client().is_model_ready("convnet")  # the other device kept it ready


def test_a_worker_that_hangs_is_killed_and_its_requests_rerouted(bundles):
    # The CPU worker's 3rd call never answers: its deadline (10x its measured time, at
    # least 5 s) kills it, and what it held is served by the Vulkan device instead.
    with Server(bundles["cnn"], env={"HXC_POOL_FAULT": "cpu:host:hang@3"}) as s:
        xs = [images(1 + i % 2, seed=i) for i in range(24)]
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda x: infer(s.client(), "convnet", x), xs))
        check_all(xs, [r.as_numpy("output_0") for r in results])
        text = s.metrics()
        assert metric(text, "hxc_device_failures_total", device="cpu:host") == 1
        assert metric(text, "hxc_inference_rerouted_total", device="cpu:host") >= 1
        assert metric(text, "hxc_inference_requests_total", model="convnet", status="ok") == len(xs)
        assert any(r.get_response()["parameters"]["device"] == "vulkan:spirv" for r in results)


def test_no_device_ready_is_503_with_retry_after(bundles):
    # One device, whose worker crashes on its first request and restarts after 30 s.
    with Server(bundles["cnn"], "--devices", "cpu", env={"HXC_POOL_FAULT": "cpu:host:crash@1"}) as s:
        status, hdrs, reply = _post(s, "/v2/models/convnet/infer", {"inputs": [_x_json()]})
        assert status == 503 and "no device" in reply["error"] and int(hdrs["Retry-After"]) >= 1
        status, hdrs, reply = _post(s, "/v2/models/convnet/infer", {"inputs": [_x_json()]})
        if status == 503:  # still restarting (1 s back-off, then a load)
            assert "no device ready" in reply["error"] and "Retry-After" in hdrs
            assert not s.client().is_model_ready("convnet") and not s.client().is_server_ready()
            assert metric(s.metrics(), "hxc_device_healthy", device="cpu:host") == 0
        deadline = time.monotonic() + WAIT
        while not s.client().is_model_ready("convnet") and time.monotonic() < deadline:
            time.sleep(0.2)
        x = images(1)
        assert compare(infer(s.client(), "convnet", x).as_numpy("output_0"), torch_cnn(x), "f32").ok  # back in rotation


def test_sigterm_drains_requests_in_flight_then_exits(bundles):
    s = Server(bundles["cnn"], "--drain-timeout", "120").start()
    try:
        xs = [images(16, seed=i) for i in range(4)]
        with ThreadPoolExecutor(len(xs)) as pool:
            # On lavapipe each of these takes a good fraction of a second: still queued or running at SIGTERM.
            futures = [pool.submit(infer, s.client(), "convnet", x, device="vulkan") for x in xs]
            deadline = time.monotonic() + 30
            while metric(s.metrics(), "hxc_queue_outstanding", model="convnet") < len(xs) and time.monotonic() < deadline:
                time.sleep(0.02)
            s.process.send_signal(signal.SIGTERM)
            results = [f.result(WAIT) for f in futures]
        check_all(xs, [r.as_numpy("output_0") for r in results])
        assert s.process.wait(WAIT) == 0
        assert s.wait_event("stopped", timeout=5)["event"] == "stopped"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", s.port), timeout=2)
        assert not s.workers()  # worker processes are gone with it
    finally:
        s.stop()


def _rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def test_overload_sheds_with_503_and_retry_after_in_bounded_memory(bundles):
    # The batcher holds the first requests for up to 3 s waiting for a batch that never fills,
    # so the queue (4) stays full while the burst arrives.
    args = ("--devices", "cpu", "--max-queue", "4", "--max-batch-size", "4096", "--max-queue-delay-ms", "3000")
    with Server(bundles["cnn"], *args) as s:
        x = images(48)  # 576 KiB a request: 128 of them would be 72 MiB if the server took them all in
        header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                                         "parameters": {"binary_data_size": x.nbytes}}]}).encode()  # fmt: skip
        body = header + x.tobytes()
        before = _rss_kb(s.process.pid, "VmRSS")
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak.append(_rss_kb(s.process.pid, "VmRSS"))
                time.sleep(0.01)

        def one(_):
            return s.http("POST", "/v2/models/convnet/infer", body, {"Inference-Header-Content-Length": str(len(header))})

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            with ThreadPoolExecutor(128) as pool:
                replies = list(pool.map(one, range(128)))
        finally:
            done.set()
            sampler.join()
        statuses = [r[0] for r in replies]
        shed = [r for r in replies if r[0] == 503]
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 4 and len(shed) >= 64, statuses
        for _, hdrs, content in shed:
            assert int(hdrs["Retry-After"]) >= 1 and "overloaded" in json.loads(content)["error"]
        grew_mib = (max(peak) - before) / 1024
        assert grew_mib < 32, f"server grew {grew_mib:.0f} MiB"
        text = s.metrics()
        assert metric(text, "hxc_inference_shed_total", model="convnet") == len(shed)
        assert metric(text, "hxc_queue_limit", model="convnet") == 4
        # Still serving once the burst is over.
        y = infer(s.client(), "convnet", images(2))
        assert compare(y.as_numpy("output_0"), torch_cnn(images(2)), "f32").ok

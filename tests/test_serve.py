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
from hxc.golden import compare
from tls_certs import make_tls_files

WAIT = 120


# --- a real server ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`hxc serve ARGS` in a subprocess on a free port; `start()` waits for its ready event."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, log: Path | None = None, verbose: bool = False) -> None:
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "hxc.cli", *(["-v"] if verbose else []), "serve", *map(str, args),
                     "--port", str(self.port), "--json"]  # fmt: skip
        self.env = {**os.environ, **(env or {})}
        self.log = log  # stderr goes there, readable while the server runs (else a pipe read at exit)
        self.process: subprocess.Popen | None = None
        self.events: list[dict] = []

    def start(self, wait_ready: bool = True) -> Server:
        stderr = self.log.open("w") if self.log is not None else subprocess.PIPE
        self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=stderr, env=self.env, text=True)
        if self.log is not None:
            stderr.close()  # the child has its own copy
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
        if self.log is not None:
            return self.log.read_text()[-2000:]
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

    def metrics(self, headers: dict | None = None) -> str:
        status, _, body = self.http("GET", "/metrics", headers=headers)
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
    from hxc.build import build_bundle
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

    from hxc.build import build_bundle
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
    ("NaN in JSON", "/v2/models/convnet/infer", {"inputs": [_x_json(data=[float("nan")] * 3072)]}, None, {}, 400, "binary tensor data"),
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


# --- start-up ---------------------------------------------------------------------------------


def _hxc_serve(*args: str, timeout: float = WAIT) -> subprocess.CompletedProcess:
    """`hxc serve ARGS` expected to stop before it serves (bounded: a server that starts
    anyway fails the test with TimeoutExpired instead of hanging)."""
    return subprocess.run([sys.executable, "-m", "hxc.cli", "serve", *map(str, args), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.mark.parametrize("name", ["..", ".", "a b", "caf\u00e9", "x%2F"])
def test_a_model_name_that_is_not_a_safe_url_segment_is_refused(bundles, name):
    r = _hxc_serve(f"{name}={bundles['mlp']}", timeout=60)
    assert r.returncode == 2 and "cannot be used in a URL path" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def _with_header_field(archive: bytes, offset: int, width: int, value: bytes) -> bytes:
    """The archive with one field of its first tar header replaced and the header's
    checksum recomputed, so only that field is wrong."""
    header = bytearray(archive[:512])
    header[offset:offset + width] = value.ljust(width, b"\0")
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + archive[512:]


def test_a_bad_bundle_in_a_served_directory_is_skipped_and_the_others_served(bundles, tmp_path):
    from hxc.manifests.bundle import pack_bundle

    served = tmp_path / "models"
    served.mkdir()
    pack_bundle(bundles["mlp"], served / "good.hxcb")
    good = (served / "good.hxcb").read_bytes()
    (served / "garbage.hxcb").write_bytes(b"not an archive" * 100)
    (served / "truncated.hxcb").write_bytes(good[:len(good) // 2])
    (served / "negative-size.hxcb").write_bytes(_with_header_field(good, 124, 12, b"-0000001"))
    with Server(served, "--devices", "cpu") as s:
        assert [m["name"] for m in s.events[-1]["models"]] == ["mlp"]
        x = np.random.default_rng(3).standard_normal((4, 64), dtype=np.float32)
        t = th.InferInput("input", [4, 64], "FP32")
        t.set_data_from_numpy(x)
        assert compare(s.client().infer("mlp", [t]).as_numpy("output_0"), torch_mlp(x), "f32").ok
        assert s.stop() == 0
        stderr = s.process.stderr.read()
    skipped = [line for line in stderr.splitlines() if "skipping" in line]
    assert sorted(line.split(":")[1].strip().rsplit("/", 1)[1] for line in skipped) == \
        ["garbage.hxcb", "negative-size.hxcb", "truncated.hxcb"], stderr  # fmt: skip
    assert "Traceback" not in stderr
    # Named on the command line, the same bundle is an error, not a skip.
    r = _hxc_serve(served / "truncated.hxcb", timeout=60)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr


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
    # Bodies are read before a queue slot is taken: what arrives at once is bounded by
    # --max-receiving-mb (4 MiB here), and shed with 503 beyond it too.
    args = ("--devices", "cpu", "--max-queue", "4", "--max-batch-size", "4096", "--max-queue-delay-ms", "3000",
            "--max-body-mb", "1", "--max-receiving-mb", "4")  # fmt: skip
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
        shed_here = metric(text, "hxc_inference_shed_total", model="convnet") + metric(text, "hxc_http_refused_total", reason="receiving_full")
        assert shed_here == len(shed)
        assert metric(text, "hxc_queue_limit", model="convnet") == 4
        # Still serving once the burst is over.
        y = infer(s.client(), "convnet", images(2))
        assert compare(y.as_numpy("output_0"), torch_cnn(images(2)), "f32").ok


# --- slow, stalled and vanishing clients -------------------------------------------------------------


def _send_head(port: int, path: str, declared: int, body: bytes = b"", headers: dict | None = None) -> socket.socket:
    """A POST that declares `declared` bytes of body, sends `body` and then stalls."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n"
                 f"{extra}\r\n".encode() + body)  # fmt: skip
    return sock


def _response(sock: socket.socket) -> tuple[int, Any, Any]:
    r = http.client.HTTPResponse(sock)
    r.begin()
    return r.status, r.headers, json.loads(r.read())


def _wait_metric(s: Server, name: str, value: float, headers: dict | None = None, **labels: str) -> None:
    deadline = time.monotonic() + WAIT
    while metric(s.metrics(headers), name, **labels) != value:
        assert time.monotonic() < deadline, f"{name}{labels} never reached {value}"
        time.sleep(0.05)


def _mlp_x(seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((4, 64), dtype=np.float32)


def _infer_mlp(client, x: np.ndarray, headers: dict | None = None) -> np.ndarray:
    t = th.InferInput("input", [4, 64], "FP32")
    t.set_data_from_numpy(x)
    return client.infer("mlp", [t], headers=headers).as_numpy("output_0")


def test_stalled_uploads_hold_no_queue_slot_and_time_out(bundles):
    """20 uploads that declare 100000 bytes, send 10 and stall, against a queue of 16:
    a complete request is still answered at once, and each stalled one gets 408."""
    with Server(bundles["mlp"], "--devices", "cpu", "--max-queue", "16", "--body-timeout-s", "6") as s:
        stalled = [_send_head(s.port, "/v2/models/mlp/infer", 100000, b'{"inputs":') for _ in range(20)]
        try:
            _wait_metric(s, "hxc_http_receiving_bytes", 200)
            x = _mlp_x()
            assert compare(_infer_mlp(s.client(), x), torch_mlp(x), "f32").ok
            assert metric(s.metrics(), "hxc_http_receiving_bytes") == 200  # answered while all 20 still stalled
            assert metric(s.metrics(), "hxc_queue_outstanding", model="mlp") == 0
            for sock in stalled:
                status, hdrs, reply = _response(sock)
                assert status == 408 and "did not arrive within 6 s" in reply["error"] and hdrs["Connection"] == "close"
        finally:
            for sock in stalled:
                sock.close()
        assert metric(s.metrics(), "hxc_http_refused_total", reason="body_timeout") == 20
        assert metric(s.metrics(), "hxc_http_receiving_bytes") == 0


def test_bodies_still_arriving_are_bounded_together(bundles):
    path = "/v2/models/mlp/infer"
    with Server(bundles["mlp"], "--devices", "cpu", "--max-body-mb", "1", "--max-receiving-mb", "1") as s:
        big = _send_head(s.port, path, 900_000, b"[" * 600_000)  # holds 600 kB, then stalls
        try:
            _wait_metric(s, "hxc_http_receiving_bytes", 600_000)
            status, hdrs, reply = _post(s, path, body=b"[" * 600_000)  # would not fit: refused unread
            assert status == 503 and int(hdrs["Retry-After"]) >= 1 and "overloaded" in reply["error"]
            x = _mlp_x()
            assert compare(_infer_mlp(s.client(), x), torch_mlp(x), "f32").ok  # a small one fits
        finally:
            big.close()
        _wait_metric(s, "hxc_http_receiving_bytes", 0)
        status, _, reply = _post(s, path, body=b"[" * 600_000)  # fits now: read, and refused by the parser
        assert status == 400 and "not valid JSON" in reply["error"]
        assert metric(s.metrics(), "hxc_http_refused_total", reason="receiving_full") == 1


def test_a_client_gone_mid_body_is_no_error_in_the_log(bundles):
    s = Server(bundles["mlp"], "--devices", "cpu").start()
    try:
        for _ in range(5):
            sock = _send_head(s.port, "/v2/models/mlp/infer", 100000, b'{"inputs":')
            _wait_metric(s, "hxc_http_receiving_bytes", 10)
            sock.close()
            _wait_metric(s, "hxc_http_receiving_bytes", 0)
        assert metric(s.metrics(), "hxc_http_refused_total", reason="client_gone") == 5
        x = _mlp_x()
        assert compare(_infer_mlp(s.client(), x), torch_mlp(x), "f32").ok
    finally:
        assert s.stop() == 0
    stderr = s.process.stderr.read()
    assert "Traceback" not in stderr and "ClientDisconnect" not in stderr and "internal error" not in stderr, stderr


def test_a_connection_that_never_finishes_its_headers_is_closed(bundles):
    with Server(bundles["mlp"], "--devices", "cpu", "--header-timeout-s", "1") as s:
        silent = socket.create_connection(("127.0.0.1", s.port), timeout=WAIT)
        partial = socket.create_connection(("127.0.0.1", s.port), timeout=WAIT)
        partial.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: test\r\n")
        with silent, partial:
            assert silent.recv(1) == b"" and partial.recv(1) == b""  # closed by the server
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=WAIT)  # kept alive across requests
        try:
            for _ in range(3):
                conn.request("GET", "/v2/health/live")
                assert conn.getresponse().read() == b'{"live":true}'
        finally:
            conn.close()


# --- API keys and TLS ------------------------------------------------------------------------------

KEYS = ("k1-" + os.urandom(12).hex(), "k2-" + os.urandom(12).hex())
WRONG = "wrong-" + os.urandom(12).hex()


@pytest.fixture(scope="module")
def keyed(bundles, tmp_path_factory):
    """The MLP on the CPU behind two keys: one in $HXC_API_KEY, one in a key file; its
    log (at -v) in a file, for the tests that look for keys in it."""
    d = tmp_path_factory.mktemp("keyed")
    key_file = d / "keys.txt"
    key_file.write_text(f"# rotated in on Monday\n{KEYS[1]}\n")
    with Server(bundles["mlp"], "--devices", "cpu", "--api-key-file", key_file, env={"HXC_API_KEY": KEYS[0]},
                log=d / "serve.log", verbose=True) as s:  # fmt: skip
        yield s


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_api_keys_gate_every_route_but_the_health_probes(keyed):
    c = keyed.client()
    assert c.is_server_live() and c.is_server_ready()  # open by default, for probes
    with pytest.raises(InferenceServerException) as e:
        c.get_model_metadata("mlp")
    assert e.value.status() == "401" and "API key" in e.value.message()
    x = _mlp_x()
    for headers in (_bearer(KEYS[0]), {"api-key": KEYS[1]}, {"authorization": f"bearer {KEYS[1]}"}):
        assert compare(_infer_mlp(c, x, headers), torch_mlp(x), "f32").ok
    with pytest.raises(InferenceServerException) as e:
        _infer_mlp(c, x, _bearer(WRONG))
    assert e.value.status() == "401" and "invalid API key" in e.value.message()
    # Plain HTTP: each route, without and with a key.
    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [4, 64], "data": x.ravel().tolist()}]}
    status, hdrs, reply = _post(keyed, "/v2/models/mlp/infer", doc)
    assert status == 401 and set(reply) == {"error"} and hdrs["WWW-Authenticate"] == "Bearer"
    status, _, reply = _post(keyed, "/v2/models/mlp/infer", doc, headers={"api-key": KEYS[0]})
    assert status == 200 and compare(np.array(reply["outputs"][0]["data"], np.float32).reshape(4, 10), torch_mlp(x), "f32").ok
    for path in ("/v2", "/v2/models/mlp", "/v2/models/mlp/ready", "/metrics", "/v2/no/such/path"):
        assert keyed.http("GET", path)[0] == 401, path
        assert keyed.http("GET", path, headers=_bearer(KEYS[1]))[0] in (200, 404), path
    # Checked before the body is read: an upload that never sends its body gets 401 at once.
    sock = _send_head(keyed.port, "/v2/models/mlp/infer", 100000)
    with sock:
        status, _, reply = _response(sock)
    assert status == 401
    # Under /v1/ (the OpenAI API's prefix), errors take OpenAI's shape.
    status, _, body = keyed.http("POST", "/v1/chat/completions", b"{}")
    error = json.loads(body)["error"]
    assert status == 401 and error["code"] == "invalid_api_key" and error["type"] and "API key" in error["message"]
    status, _, body = keyed.http("POST", "/v1/chat/completions", b"{}", _bearer(KEYS[0]))
    assert status == 400 and set(json.loads(body)["error"]) == {"message", "type", "param", "code"}


def test_a_wrong_key_among_200_concurrent_requests_gets_401_and_nothing_else_changes(keyed):
    good = _bearer(KEYS[0])
    before = keyed.metrics(good)
    xs = [_mlp_x(seed) for seed in range(200)]
    jobs = [(x, good) for x in xs]
    for i in (3, 50, 97, 150, 199):
        jobs.insert(i, (xs[0], _bearer(WRONG)))

    def one(job):
        x, headers = job
        try:
            return _infer_mlp(keyed.client(), x, headers)
        except InferenceServerException as e:
            return e

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, jobs))
    wrong = [r for r, (_, h) in zip(results, jobs) if h is not good]
    right = [(r, x) for r, (x, h) in zip(results, jobs) if h is good]
    assert len(wrong) == 5 and all(isinstance(r, InferenceServerException) and r.status() == "401" for r in wrong)
    assert len(right) == 200 and all(not isinstance(r, Exception) and compare(r, torch_mlp(x), "f32").ok for r, x in right)
    after = keyed.metrics(good)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("hxc_inference_requests_total") == delta("hxc_inference_requests_total", model="mlp", status="ok") == 200
    assert delta("hxc_http_refused_total") == delta("hxc_http_refused_total", reason="unauthorized") == 5
    assert delta("hxc_inference_shed_total") == 0 and metric(after, "hxc_device_failures_total") == 0


def test_keys_never_appear_in_logs_events_or_process_titles(keyed):
    c = keyed.client()
    x = _mlp_x()
    _infer_mlp(c, x, _bearer(KEYS[0]))
    _infer_mlp(c, x, {"api-key": KEYS[1]})
    for headers in (_bearer(WRONG), {"api-key": WRONG}):
        with pytest.raises(InferenceServerException):
            _infer_mlp(c, x, headers)
    keyed.http("GET", f"/v2/models/{WRONG}", headers=_bearer(KEYS[0]))  # a 404 that names what it was asked for
    log = keyed.log.read_text()
    assert "loaded on" in log  # the log at -v is not empty
    texts = {"log": log, "events": json.dumps(keyed.events)}
    for pid in [keyed.process.pid, *keyed.workers().values()]:
        texts[f"/proc/{pid}/cmdline"] = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    for pid in keyed.workers().values():  # workers do not even inherit the variable
        texts[f"/proc/{pid}/environ"] = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        assert "HXC_API_KEY" not in texts[f"/proc/{pid}/environ"]
    for where, text in texts.items():
        for key in (*KEYS, WRONG):
            if key == WRONG and where == "log":
                continue  # the 404 above names its path; the key checks never log anything
            assert key not in text, where
    assert WRONG not in log.replace(f"/v2/models/{WRONG}", "")


def test_auth_health_and_open_metrics_flip_the_defaults(bundles):
    with Server(bundles["mlp"], "--devices", "cpu", "--auth-health", "--open-metrics", env={"HXC_API_KEY": KEYS[0]}) as s:
        for path in ("/v2/health/live", "/v2/health/ready"):
            assert s.http("GET", path)[0] == 401 and s.http("GET", path, headers=_bearer(KEYS[0]))[0] == 200
        assert s.http("GET", "/metrics")[0] == 200


def test_listening_beyond_loopback_without_a_key_warns(bundles, server, keyed):
    assert "warning" not in server.events[0] and server.events[0]["auth"] is False  # loopback: no warning
    assert "warning" not in keyed.events[0] and keyed.events[0]["auth"] is True
    s = Server(bundles["mlp"], "--devices", "cpu", "--host", "0.0.0.0").start(wait_ready=False)
    try:
        event = s.wait_event("listening")
        assert event["auth"] is False and "without an API key" in event["warning"]
    finally:
        # SIGTERM at once, while the devices still load: it stops the server (a handler
        # installed before uvicorn's used to swallow it, and the server ran on).
        assert s.stop() == 0
    warnings = [line for line in s.process.stderr.read().splitlines() if "warning" in line]
    assert len(warnings) == 1 and "without an API key" in warnings[0], warnings


def _https(port: int, context, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    import http.client as hc

    conn = hc.HTTPSConnection("127.0.0.1", port, context=context, timeout=WAIT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_tls_with_api_keys_through_ssl_and_tritonclient(bundles, tmp_path):
    import ssl

    f = make_tls_files(tmp_path)
    with Server(bundles["mlp"], "--devices", "cpu", "--ssl-certfile", f["server.pem"], "--ssl-keyfile", f["server.key"],
                env={"HXC_API_KEY": KEYS[0]}) as s:  # fmt: skip
        assert s.events[0]["tls"] is True and s.events[-1]["url"].startswith("https://")
        trusting = ssl.create_default_context(cafile=str(f["ca.pem"]))
        assert _https(s.port, trusting, "GET", "/v2/health/ready") == (200, {"ready": True})
        x = _mlp_x()
        doc = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [4, 64], "data": x.ravel().tolist()}]}).encode()
        status, reply = _https(s.port, trusting, "POST", "/v2/models/mlp/infer", doc, _bearer(KEYS[0]))
        assert status == 200 and compare(np.array(reply["outputs"][0]["data"], np.float32).reshape(4, 10), torch_mlp(x), "f32").ok
        assert _https(s.port, trusting, "POST", "/v2/models/mlp/infer", doc)[0] == 401
        c = th.InferenceServerClient(s.url, ssl=True, ssl_options={"ca_certs": str(f["ca.pem"])}, network_timeout=WAIT,
                                     connection_timeout=WAIT)  # fmt: skip
        assert compare(_infer_mlp(c, x, _bearer(KEYS[0])), torch_mlp(x), "f32").ok
        with pytest.raises(InferenceServerException) as e:
            _infer_mlp(c, x)
        assert e.value.status() == "401"
        # Its keep-alive connection would hold the server's drain on exit for --drain-timeout (30 s).
        c.close()
        with pytest.raises(ssl.SSLCertVerificationError):  # a client that does not trust the CA
            _https(s.port, ssl.create_default_context(), "GET", "/v2/health/live")
        with pytest.raises((http.client.HTTPException, OSError)):  # plain HTTP is not served
            s.http("GET", "/v2/health/live")


def test_mutual_tls_needs_a_client_certificate(bundles, tmp_path):
    import ssl

    f = make_tls_files(tmp_path)
    with Server(bundles["mlp"], "--devices", "cpu", "--ssl-certfile", f["server.pem"], "--ssl-keyfile", f["server.key"],
                "--ssl-ca-certs", f["ca.pem"]) as s:  # fmt: skip
        context = ssl.create_default_context(cafile=str(f["ca.pem"]))
        with pytest.raises((ssl.SSLError, OSError)):
            _https(s.port, context, "GET", "/v2/health/live")
        context.load_cert_chain(f["client.pem"], f["client.key"])
        assert _https(s.port, context, "GET", "/v2/health/live") == (200, {"live": True})


def test_bad_certificates_and_key_files_are_one_line_before_anything_loads(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    f = make_tls_files(tmp_path)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pass")))
    empty_keys = tmp_path / "empty.txt"
    empty_keys.write_text("# nothing yet\n\n")
    bad_key = tmp_path / "bad.txt"
    bad_key.write_text(f"{KEYS[0]} with spaces\n")
    nowhere = tmp_path / "missing.pem"
    cases = [
        (("--ssl-certfile", nowhere), "no such file"),
        (("--ssl-certfile", garbage), "not a PEM certificate"),
        (("--ssl-certfile", f["server.pem"], "--ssl-keyfile", f["client.key"]), "not a PEM certificate and its"),  # not its key
        (("--ssl-certfile", f["server.pem"], "--ssl-keyfile", encrypted), "unencrypted private key"),
        (("--ssl-keyfile", f["server.key"]), "need --ssl-certfile"),
        (("--ssl-certfile", f["server.pem"], "--ssl-keyfile", f["server.key"], "--ssl-ca-certs", garbage), "not PEM CA"),
        (("--api-key-file", nowhere), "cannot read"),
        (("--api-key-file", empty_keys), "holds no API key"),
        (("--api-key-file", bad_key), "API key 1 holds a character"),
        (("--auth-health",), "needs API keys"),
        (("--max-receiving-mb", "1", "--max-body-mb", "2"), "at least --max-body-mb"),
    ]  # fmt: skip
    for args, message in cases:
        # The bundle does not exist either: these must be found before it is looked for.
        r = subprocess.run([sys.executable, "-m", "hxc.cli", "serve", str(tmp_path / "no-such.hxc"), *map(str, args)],
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
        assert KEYS[0] not in r.stderr + r.stdout
    # A key on the command line works, but says it is visible to every user.
    r = subprocess.run([sys.executable, "-m", "hxc.cli", "serve", str(tmp_path / "no-such.hxc"), "--api-key", KEYS[0]],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "visible to every user" in r.stderr and "no such bundle" in r.stderr and KEYS[0] not in r.stderr

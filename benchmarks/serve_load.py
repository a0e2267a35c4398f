"""`hxc serve` under load on loopback, against calling the model in process.

    python benchmarks/serve_load.py [--requests 3000] [--concurrency 32] [--rounds 3]

The example CNN with a dynamic batch, compiled for the CPU (llvm-cpu) and lavapipe
(vulkan), served by a real `hxc serve` process on every device (default options:
latency routing, dynamic batching up to 32 rows, no queue delay). In interleaved
rounds (A B C A B C ..., medians):

  A  in process: `hxc.runtime.load(bundle, device="cpu:host")`, one batch-1 call at a time
  B  the server, one request at a time (tritonclient, binary tensors): the per-request
     overhead of HTTP + parsing + routing + the worker process hop, as B's p50 / A's p50
  C  the server under load: `--requests` batch-1 requests at `--concurrency` in flight
     (tritonclient.http.aio), throughput, p50/p99, per-device share, the batch sizes
     the dynamic batcher formed (from /metrics), errors, and lost or wrong responses
     (every output is checked against the in-process output for its input)

The client runs on the same 2 cores as the server and its workers, so C measures the
whole loopback system, client included. Writes benchmarks/results/serve_load.json.

    python benchmarks/serve_load.py --security [--sequential 500] [--rounds 5]

What API keys and TLS cost per request: three servers of the same bundle on the CPU
(plain; with an API key; with an API key and TLS, a certificate made on the spot), each
taking `--sequential` batch-1 requests one at a time, interleaved request by request
(plain, key, key+TLS, key, key+TLS, plain, ...; one kept-alive connection each, so TLS
costs its record layer, not a handshake per request), in `--rounds` rounds. Reports
each one's p50 latency and server CPU time per request (from /proc: robust on a shared
machine), the medians of the per-round differences from plain, and what the guard
itself takes in process (microseconds, with and without a key to check). Writes
benchmarks/results/serve_security.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _harness import save  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sequential", type=int, default=300, help="requests per round in A and B")
    ap.add_argument("--devices", default="all")
    ap.add_argument("--security", action="store_true", help="measure what API keys and TLS add per request instead")
    args = ap.parse_args()
    if args.security:
        _security(args)
        return

    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions
    import hxc.runtime

    work = Path(tempfile.mkdtemp(prefix="hxc-serve-load-"))
    bundle = work / "cnn.hxc"
    result = build_bundle("hxc.examples:convnet", bundle, "cpu:host,vulkan:spirv", options=ImportOptions(dynamic_batch=True))
    assert result.written, [r.error for r in result.failed]
    inputs = [np.random.default_rng(i).standard_normal((1, 3, 32, 32), dtype=np.float32) for i in range(64)]
    local = hxc.runtime.load(bundle, device="cpu:host", strict=True)
    expected = [local(x) for x in inputs]

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "hxc.cli", "serve", str(bundle), "--port", str(port), "--json",
                               "--devices", args.devices], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        for line in server.stdout:  # type: ignore[union-attr]
            if json.loads(line)["event"] == "ready":
                break
        url = f"127.0.0.1:{port}"
        rounds: dict[str, list] = {"in_process": [], "server_sequential": [], "server_load": []}
        for r in range(args.rounds):
            rounds["in_process"].append(_in_process(local, inputs, args.sequential))
            rounds["server_sequential"].append(asyncio.run(_load(url, inputs, expected, args.sequential, 1)))
            before = _metrics(url)
            load = asyncio.run(_load(url, inputs, expected, args.requests, args.concurrency))
            load["batches"] = _batch_histogram(before, _metrics(url))
            rounds["server_load"].append(load)
            print(f"round {r + 1}/{args.rounds}: in process p50 {rounds['in_process'][-1]['p50_ms']:.3f} ms; "
                  f"server sequential p50 {rounds['server_sequential'][-1]['p50_ms']:.3f} ms; "
                  f"server c={args.concurrency}: {load['requests_per_s']:.0f} req/s, p50 {load['p50_ms']:.2f} ms, "
                  f"p99 {load['p99_ms']:.2f} ms, errors {load['errors']}, wrong {load['wrong']}, share {load['device_share']}",
                  file=sys.stderr, flush=True)  # fmt: skip
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)

    def med(kind: str, key: str) -> float:
        return float(np.median([x[key] for x in rounds[kind]]))

    summary = {
        "in_process_p50_ms": med("in_process", "p50_ms"),
        "in_process_requests_per_s": med("in_process", "requests_per_s"),
        "server_sequential_p50_ms": med("server_sequential", "p50_ms"),
        "server_sequential_p99_ms": med("server_sequential", "p99_ms"),
        "overhead_per_request_ms": med("server_sequential", "p50_ms") - med("in_process", "p50_ms"),
        "sequential_latency_ratio": med("server_sequential", "p50_ms") / med("in_process", "p50_ms"),
        "load_requests_per_s": med("server_load", "requests_per_s"),
        "load_p50_ms": med("server_load", "p50_ms"),
        "load_p99_ms": med("server_load", "p99_ms"),
        "load_throughput_vs_in_process": med("server_load", "requests_per_s") / med("in_process", "requests_per_s"),
        "errors": sum(x["errors"] for x in rounds["server_load"] + rounds["server_sequential"]),
        "lost_or_wrong": sum(x["wrong"] + x["lost"] for x in rounds["server_load"] + rounds["server_sequential"]),
        "spread_load_requests_per_s": [x["requests_per_s"] for x in rounds["server_load"]],
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    path = save("serve_load", {"config": vars(args), "summary": summary, "rounds": rounds})
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}", file=sys.stderr)


def _in_process(model, inputs: list[np.ndarray], n: int) -> dict:
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        model(inputs[i % len(inputs)])
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return {"requests": n, "requests_per_s": n / wall, **_percentiles(lat)}


async def _load(url: str, inputs: list[np.ndarray], expected: list[np.ndarray], n: int, concurrency: int,
                headers: dict | None = None, ssl_context=None) -> dict:  # fmt: skip
    import tritonclient.http.aio as tha

    from hxc.golden import compare

    client = tha.InferenceServerClient(url, conn_limit=concurrency, ssl=ssl_context is not None, ssl_context=ssl_context)
    lat: list[float] = []
    devices: dict[str, int] = {}
    counts = {"errors": 0, "wrong": 0, "answered": 0}
    errors: list[str] = []
    next_i = iter(range(n))

    async def worker() -> None:
        for i in next_i:
            x = inputs[i % len(inputs)]
            t = tha.InferInput("x", list(x.shape), "FP32")
            t.set_data_from_numpy(x)
            start = time.perf_counter()
            try:
                r = await client.infer("convnet", [t], headers=headers)
            except Exception as e:  # noqa: BLE001 - counted and reported
                counts["errors"] += 1
                errors.append(str(e)[:200])
                continue
            lat.append(time.perf_counter() - start)
            counts["answered"] += 1
            y = r.as_numpy("output_0")
            if y is None or not compare(y, expected[i % len(inputs)], "f32").ok:
                counts["wrong"] += 1
            device = r.get_response()["parameters"]["device"]
            devices[device] = devices.get(device, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    total = sum(devices.values())
    return {
        "requests": n, "concurrency": concurrency, "wall_s": wall, "requests_per_s": counts["answered"] / wall,
        **_percentiles(lat), "errors": counts["errors"], "error_samples": errors[:5], "wrong": counts["wrong"],
        "lost": n - counts["answered"] - counts["errors"],
        "device_share": {d: round(c / total, 4) for d, c in sorted(devices.items())},
    }  # fmt: skip


def _security(args: argparse.Namespace) -> None:
    import ssl

    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions
    import hxc.runtime

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tls_certs import make_tls_files

    work = Path(tempfile.mkdtemp(prefix="hxc-serve-security-"))
    bundle = work / "cnn.hxc"
    assert build_bundle("hxc.examples:convnet", bundle, "cpu:host", options=ImportOptions(dynamic_batch=True)).written
    inputs = [np.random.default_rng(i).standard_normal((1, 3, 32, 32), dtype=np.float32) for i in range(64)]
    local = hxc.runtime.load(bundle, device="cpu:host", strict=True)
    expected = [local(x) for x in inputs]
    del local
    tls = make_tls_files(work)
    key = os.urandom(24).hex()
    bearer = {"Authorization": f"Bearer {key}"}
    context = ssl.create_default_context(cafile=str(tls["ca.pem"]))
    setups = {  # name: (extra arguments, environment, request headers, client TLS context)
        "plain": ([], {}, None, None),
        "api_key": ([], {"HXC_API_KEY": key}, bearer, None),
        "api_key_tls": (["--ssl-certfile", str(tls["server.pem"]), "--ssl-keyfile", str(tls["server.key"])],
                        {"HXC_API_KEY": key}, bearer, context),
    }  # fmt: skip
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    load_before = os.getloadavg()
    guard_us = _guard_cost(key)
    try:
        for name, (extra, env, _, _) in setups.items():
            port = _free_port()
            p = subprocess.Popen([sys.executable, "-m", "hxc.cli", "serve", str(bundle), "--port", str(port), "--json",
                                  "--devices", "cpu", *extra], stdout=subprocess.PIPE, text=True, env={**os.environ, **env})  # fmt: skip
            servers[name] = (p, f"127.0.0.1:{port}")
            for line in p.stdout:  # type: ignore[union-attr]
                if json.loads(line)["event"] == "ready":
                    break
        targets = {name: (servers[name][0].pid, servers[name][1], headers, ctx) for name, (_, _, headers, ctx) in setups.items()}
        rounds: dict[str, list] = {name: [] for name in setups}
        for r in range(args.rounds):
            for name, result in asyncio.run(_interleaved(targets, inputs, expected, args.sequential)).items():
                rounds[name].append(result)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} p50 {v[-1]['p50_ms']:.3f} ms ({v[-1]['server_cpu_ms_per_request']:.3f} ms server CPU)"
                for k, v in rounds.items()), file=sys.stderr, flush=True)  # fmt: skip
    finally:
        for p, _ in servers.values():
            p.send_signal(signal.SIGTERM)
            p.wait(60)

    def med(name: str, key: str) -> float:
        return float(np.median([x[key] for x in rounds[name]]))

    def added(name: str, key: str) -> float:
        return float(np.median([a[key] - b[key] for a, b in zip(rounds[name], rounds["plain"])]))

    summary = {
        **{f"{name}_p50_ms": med(name, "p50_ms") for name in setups},
        "api_key_added_p50_ms": added("api_key", "p50_ms"),
        "api_key_tls_added_p50_ms": added("api_key_tls", "p50_ms"),
        **{f"{name}_server_cpu_ms_per_request": med(name, "server_cpu_ms_per_request") for name in setups},
        "api_key_added_server_cpu_ms": added("api_key", "server_cpu_ms_per_request"),
        "api_key_tls_added_server_cpu_ms": added("api_key_tls", "server_cpu_ms_per_request"),
        "guard_us_per_request": guard_us,
        "errors": sum(x["errors"] for v in rounds.values() for x in v),
        "wrong": sum(x["wrong"] for v in rounds.values() for x in v),
        "load_average_1min_before": load_before[0],
        "load_average_1min_after": os.getloadavg()[0],
    }
    path = save("serve_security", {"config": vars(args), "summary": summary, "rounds": rounds})
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}", file=sys.stderr)


async def _interleaved(targets: dict, inputs: list[np.ndarray], expected: list[np.ndarray], n: int) -> dict:
    """`n` batch-1 requests to each server, one at a time, taking turns request by
    request (the order rotating), so load that comes and goes on a shared machine
    hits every server alike; each server's CPU time per request from /proc."""
    import tritonclient.http.aio as tha

    from hxc.golden import compare

    names = list(targets)
    clients = {name: tha.InferenceServerClient(url, conn_limit=1, ssl=ctx is not None, ssl_context=ctx)
               for name, (_, url, _, ctx) in targets.items()}  # fmt: skip
    lat: dict[str, list[float]] = {name: [] for name in names}
    counts = {name: {"errors": 0, "wrong": 0} for name in names}

    async def one(name: str, i: int, timed: bool) -> None:
        x = inputs[i % len(inputs)]
        t = tha.InferInput("x", list(x.shape), "FP32")
        t.set_data_from_numpy(x)
        start = time.perf_counter()
        try:
            r = await clients[name].infer("convnet", [t], headers=targets[name][2])
        except Exception:  # noqa: BLE001 - counted and reported
            counts[name]["errors"] += 1
            return
        if timed:
            lat[name].append(time.perf_counter() - start)
        y = r.as_numpy("output_0")
        if y is None or not compare(y, expected[i % len(inputs)], "f32").ok:
            counts[name]["wrong"] += 1

    for i in range(20):  # connections (and TLS sessions) open, caches warm
        for name in names:
            await one(name, i, timed=False)
    cpu0 = {name: _cpu_s(targets[name][0]) for name in names}
    for i in range(n):
        for k in range(len(names)):
            await one(names[(i + k) % len(names)], i, timed=True)
    cpu = {name: _cpu_s(targets[name][0]) - cpu0[name] for name in names}
    for c in clients.values():
        await c.close()
    return {name: {"requests": n, **_percentiles(lat[name]), "server_cpu_ms_per_request": cpu[name] * 1000 / n, **counts[name]}
            for name in names}  # fmt: skip


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _guard_cost(key: str, calls: int = 20000, rounds: int = 5) -> dict:
    """Microseconds per request the guard itself takes (in process, no HTTP), with and
    without an API key to check, in interleaved rounds (medians)."""
    from hxc.serve.guard import Guard, key_digests

    async def app(scope, receive, send) -> None:
        await receive()

    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message) -> None:
        pass

    headers = [(b"host", b"x"), (b"content-type", b"application/json"), (b"content-length", b"2"),
               (b"authorization", f"Bearer {key}".encode())]  # fmt: skip
    scope = {"type": "http", "path": "/v2/models/convnet/infer", "method": "POST", "headers": headers}
    guards = {"without_key": Guard(app), "with_key": Guard(app, api_key_digests=key_digests([key, "another-key"]))}

    async def run(guard: Guard) -> float:
        t = time.perf_counter()
        for _ in range(calls):
            await guard(scope, receive, send)
        return (time.perf_counter() - t) / calls * 1e6

    times: dict[str, list[float]] = {name: [] for name in guards}
    for _ in range(rounds):
        for name, guard in guards.items():
            times[name].append(asyncio.run(run(guard)))
    return {name: float(np.median(v)) for name, v in times.items()}


def _percentiles(lat: list[float]) -> dict:
    a = np.array(lat) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


def _metrics(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://{url}/metrics", timeout=30) as r:
        return r.read().decode()


def _batch_histogram(before: str, after: str) -> dict:
    """Device calls per batch-size bucket (upper bound, rows) formed during the run, per device."""

    def buckets(text: str) -> dict[tuple[str, str], float]:
        out = {}
        for m in re.finditer(r'hxc_inference_batch_size_bucket\{device="([^"]+)",le="([^"]+)",model="[^"]+"\} (\S+)', text):
            out[(m.group(1), m.group(2))] = float(m.group(3))
        return out

    b, a = buckets(before), buckets(after)
    hist: dict[str, dict[str, int]] = {}
    for (device, le), value in sorted(a.items(), key=lambda kv: (kv[0][0], float(kv[0][1]))):
        hist.setdefault(device, {})[le] = int(value - b.get((device, le), 0.0))
    # cumulative -> per bucket
    out: dict[str, dict[str, int]] = {}
    for device, cum in hist.items():
        prev = 0
        out[device] = {}
        for le, c in cum.items():
            if c - prev:
                out[device][f"<={le}"] = c - prev
            prev = c
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()

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
    args = ap.parse_args()

    from hxc.compiler.build import build_bundle
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


async def _load(url: str, inputs: list[np.ndarray], expected: list[np.ndarray], n: int, concurrency: int) -> dict:
    import tritonclient.http.aio as tha

    from hxc.runtime.verify import compare

    client = tha.InferenceServerClient(url, conn_limit=concurrency)
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
                r = await client.infer("convnet", [t])
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

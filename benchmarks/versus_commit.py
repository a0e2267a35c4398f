"""This checkout against an earlier commit, interleaved in one run: what a change to
hxc's own code costs per call (issue 24's contract: functions, state and the worker
protocol must not slow the plain call down).

Both versions run side by side as long-lived processes (each with its own checkout on
PYTHONPATH, the same installed toolchain) over the same bundles, built by the earlier
commit (a newer hxc reads older bundles; the reverse is refused). Each round asks
every process in turn to time a block of calls and keeps the block's median, so a
burst of load from elsewhere reaches both alike; figures are medians over rounds, and
the ratio is this checkout / the earlier one.

Measured, for the suite's MLP (4x512, batch 8) and the example CNN on `cpu:host`:
- `call`: `m(x)`, the user's call through `hxc.runtime.load` (the call_overhead.py path);
- `pool`: one 64-row batch through `hxc.pool.Pool(devices="cpu")` (worker processes,
  the worker protocol, shared memory), as benchmarks/pool.py drives it.

    python benchmarks/versus_commit.py 3d7c386 [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import save  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"mlp": ("hxc.examples.zoo:mlp_large", (8, 512)), "cnn": ("hxc.examples:convnet", (1, 3, 32, 32))}
POOL_ROWS = 64

# The process each version runs: build nothing, load what it is told, time on request.
SERVER = r"""
import json, statistics, sys, time, warnings
warnings.filterwarnings("ignore")
import numpy as np
import hxc.runtime
from hxc.pool import Pool
models, pools, inputs = {}, {}, {}
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "open":
        x = np.random.default_rng(0).standard_normal(cmd["shape"]).astype(np.float32)
        m = models[cmd["name"]] = hxc.runtime.load(cmd["bundle"], device="cpu:host", strict=True)
        inputs[cmd["name"]] = x
        batch = np.repeat(x[:1], cmd["rows"], axis=0)
        p = pools[cmd["name"]] = Pool(cmd["bundle"], devices="cpu")
        inputs[cmd["name"] + "/pool"] = batch
        for _ in range(20):
            m(x)
        for _ in range(3):
            p(batch)
        print(json.dumps({"ok": True}), flush=True)
    elif cmd["op"] == "time":
        name, kind, n = cmd["name"], cmd["kind"], cmd["calls"]
        f = models[name] if kind == "call" else pools[name]
        x = inputs[name] if kind == "call" else inputs[name + "/pool"]
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            f(x)
            times.append((time.perf_counter() - t0) * 1e6)
        print(json.dumps({"us": statistics.median(times)}), flush=True)
    elif cmd["op"] == "stop":
        for p in pools.values():
            p.close()
        break
"""


def checkout(commit: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(where), commit], check=True,
                   capture_output=True)  # fmt: skip
    return where


def start(tree: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env, cwd=str(tree))  # fmt: skip


def ask(p: subprocess.Popen, cmd: dict) -> dict:
    assert p.stdin and p.stdout
    p.stdin.write(json.dumps(cmd) + "\n")
    p.stdin.flush()
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"the process for {cmd} ended (exit {p.wait(30)})")
    return json.loads(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("commit", help="the earlier commit (e.g. the last one before a change)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=100, help="user calls per block (pool blocks take a fifth)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hxc-versus-") as tmp:
        old = checkout(args.commit, Path(tmp) / "old")
        try:
            bundles = {}
            for name, (source, _) in MODELS.items():
                out = Path(tmp) / f"{name}.hxc"
                subprocess.run([sys.executable, "-m", "hxc.cli", "compile", source, "-t", "cpu:host", "--dynamic-batch", "-o", str(out)],
                               env={**os.environ, "PYTHONPATH": str(old)}, cwd=str(old), check=True,
                               capture_output=True)  # fmt: skip
                bundles[name] = str(out)
            procs = {"before": start(old), "after": start(ROOT)}
            try:
                for p in procs.values():
                    for name, (_, shape) in MODELS.items():
                        ask(p, {"op": "open", "name": name, "bundle": bundles[name], "shape": shape, "rows": POOL_ROWS})
                samples: dict[tuple[str, str, str], list[float]] = {}
                for r in range(args.rounds):
                    order = list(procs.items()) if r % 2 == 0 else list(reversed(procs.items()))
                    for name in MODELS:
                        for kind, calls in (("call", args.calls), ("pool", max(5, args.calls // 5))):
                            for version, p in order:
                                us = ask(p, {"op": "time", "name": name, "kind": kind, "calls": calls})["us"]
                                samples.setdefault((name, kind, version), []).append(us)
            finally:
                for p in procs.values():
                    try:
                        ask(p, {"op": "stop"})
                    except Exception:  # noqa: BLE001 - it may be gone already
                        pass
                    p.wait(60)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
    rows = []
    for name in MODELS:
        for kind in ("call", "pool"):
            before = statistics.median(samples[(name, kind, "before")])
            after = statistics.median(samples[(name, kind, "after")])
            rows.append({"model": name, "path": kind, "before_us": round(before, 1), "after_us": round(after, 1),
                         "ratio": round(after / before, 3)})  # fmt: skip
            print(f"{name:4} {kind:5} before {before:10.1f} µs  after {after:10.1f} µs  after/before {after / before:.3f}")
    save("versus_commit", {"commit": args.commit, "rounds": args.rounds, "calls": args.calls, "rows": rows})


if __name__ == "__main__":
    main()

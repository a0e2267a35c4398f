"""What an idle lavapipe device costs other work on the same host.

    python benchmarks/lavapipe_idle.py [--rounds 5] [--seconds 1]

IREE 3.13's Vulkan driver leaves two threads per device polling lavapipe's semaphores,
idle or not; the loader moves them to SCHED_IDLE. This measures, in interleaved rounds
(medians), the example CNN on the CPU (llvm-cpu, local-task, in this process) with:

  - nothing else running
  - another process holding an idle lavapipe device, as the loader leaves it (pollers
    SCHED_IDLE)
  - the same with the pollers put back at normal policy (what IREE alone would do)

and, for each holder, the CPU seconds per second its threads used meanwhile (the
pollers' spin, which SCHED_IDLE does not stop: it only yields to other work).
`tests/test_vulkan.py` checks the policy and state of the pollers, which hold on a busy
host too; these numbers need a quiet one.

Writes benchmarks/results/lavapipe_idle.json (or --out PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _harness import save  # noqa: E402

import hxc.runtime  # noqa: E402
from hxc.build import build_bundle  # noqa: E402

# Loads lavapipe, makes one call, then holds the idle device until stdin closes;
# argv[2] == "normal" puts the threads the loader made SCHED_IDLE back at SCHED_OTHER.
HOLDER = r"""
import os, sys
import numpy as np
import hxc.runtime
m = hxc.runtime.load(sys.argv[1], device="vulkan:spirv", strict=True)
m.run_flat([np.zeros((1, 3, 32, 32), np.float32)])
if sys.argv[2] == "normal":
    for t in os.listdir("/proc/self/task"):
        if os.sched_getscheduler(int(t)) == os.SCHED_IDLE:
            os.sched_setscheduler(int(t), os.SCHED_OTHER, os.sched_param(0))
print("ready", flush=True)
sys.stdin.read()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0, help="how long each measurement runs")
    ap.add_argument("--out", type=Path, help="write the results here instead of benchmarks/results/lavapipe_idle.json")
    args = ap.parse_args()
    os.environ.setdefault("HXC_CACHE_DIR", str(Path(tempfile.gettempdir()) / "hxc-bench-cache"))
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "convnet.hxc"
        built = build_bundle("hxc.examples:convnet", bundle, "cpu:host,vulkan:spirv")
        if not built.written:
            raise SystemExit(f"compile failed: {[r.error for r in built.failed]}")
        cpu = hxc.runtime.load(bundle, device="cpu:host", strict=True)
        x = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
        arms = {"alone": None, "beside idle lavapipe (SCHED_IDLE pollers)": "idle",
                "beside idle lavapipe (pollers at normal policy)": "normal"}
        rates: dict[str, list[float]] = {a: [] for a in arms}
        spin: dict[str, list[float]] = {a: [] for a, mode in arms.items() if mode}
        load_before = os.getloadavg()
        for r in range(args.rounds):
            for arm, mode in arms.items():
                holder = _hold(bundle, mode) if mode else None
                try:
                    before = _cpu_s(holder.pid) if holder else 0.0
                    t0, calls = time.perf_counter(), 0
                    while time.perf_counter() - t0 < args.seconds:
                        cpu.run_flat([x])
                        calls += 1
                    elapsed = time.perf_counter() - t0
                    if holder:
                        spin[arm].append((_cpu_s(holder.pid) - before) / elapsed)
                finally:
                    if holder:
                        holder.stdin.close()
                        holder.wait(60)
                rates[arm].append(calls / elapsed)
                print(f"  round {r + 1}/{args.rounds} {arm}: {rates[arm][-1]:.1f} calls/s", file=sys.stderr, flush=True)
    alone = statistics.median(rates["alone"])
    results = {
        "rounds": args.rounds, "seconds": args.seconds, "load_before": load_before, "load_after": os.getloadavg(),
        "calls_per_second": {a: {"median": statistics.median(v), "all": v, "vs_alone": statistics.median(v) / alone}
                             for a, v in rates.items()},
        "holder_cpu_seconds_per_second": {a: {"median": statistics.median(v), "all": v} for a, v in spin.items()},
    }  # fmt: skip
    path = save("lavapipe_idle", results) if args.out is None else _write(args.out, results)
    for arm, r in results["calls_per_second"].items():
        used = results["holder_cpu_seconds_per_second"].get(arm)
        print(f"{arm}: {r['median']:.1f} calls/s = {r['vs_alone']:.2f}x alone"
              + (f"; the holder's threads used {used['median']:.2f} CPU s/s" if used else ""))  # fmt: skip
    print(f"wrote {path}")


def _hold(bundle: Path, mode: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(bundle), mode], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    if holder.stdout.readline().strip() != "ready":
        holder.kill()
        raise SystemExit("the lavapipe holder did not start")
    return holder


def _cpu_s(pid: int) -> float:
    """CPU seconds used so far by every thread of process `pid`."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


if __name__ == "__main__":
    main()

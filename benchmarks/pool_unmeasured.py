"""A pool whose devices are not measured yet, against the CPU alone.

    python benchmarks/pool_unmeasured.py [--rounds 5] [--rows 64] [--models mlp,convnet] [--repeats 3]

A bundle never benched has no profiles, so a pool knows nothing of its devices' speeds:
each gets a one-row probe first. On a busy host lavapipe's first call took 2.62 s while
the CPU did the other 63 rows in 0.06 s, and the call waited for it (24 rows/s against
the CPU's 1,406). Now a chunk held by a device not measured yet is always worth a backup
copy, so the call returns once the measured devices have every row.

For each model (compiled with `--dynamic-batch` for the CPU and lavapipe, never benched):
pools started side by side, `devices="all"` and `devices="cpu"`, and a second
`devices="cpu"` as a control (start-up is not measured), then `rounds` interleaved calls
of `rows` rows, each timed on its own, the order turning every round (all, cpu, control;
cpu, control, all; ...: the first call of a round is not always the same pool's).
Reported: the median call time of each and the ratio all / cpu (goal: <= 1.2), also
the first call's (the one an unmeasured device's probe used to hold up),
paired round by round, and control / cpu: what two identical pools differ by here
(calls of a millisecond differ by 15% between identical pools on a busy 2-core host). The same again with backup copies off
(`backups=False`: the call waits on the unmeasured probe, as before) for reference.
`--repeats N` does all of it N times, with fresh pools each time (each a pool never
measured), and reports the median of the N ratios too: calls of a millisecond on a
shared machine make one set of 5 calls a noisy sample.

Writes benchmarks/results/pool_unmeasured.json (or --out PATH).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _harness import save  # noqa: E402

from hxc.build import build_bundle  # noqa: E402
from hxc.compiler.imported import ImportOptions  # noqa: E402
from hxc.pool import Pool  # noqa: E402

SHAPES = {"convnet": (3, 32, 32), "mlp": (64,)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--models", default="mlp")
    ap.add_argument("--repeats", type=int, default=1, help="fresh pools this many times; the median ratio is reported")
    ap.add_argument("--out", type=Path, help="write the results here instead of benchmarks/results/pool_unmeasured.json")
    args = ap.parse_args()
    os.environ.setdefault("HXC_CACHE_DIR", str(Path(tempfile.gettempdir()) / "hxc-bench-cache"))
    results: dict = {"rounds": args.rounds, "rows": args.rows, "repeats": args.repeats, "load_before": os.getloadavg(),
                     "models": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            bundle = Path(tmp) / f"{name}.hxc"
            built = build_bundle(f"hxc.examples:{name}", bundle, "cpu:host,vulkan:spirv",
                                 options=ImportOptions(dynamic_batch=True))  # fmt: skip
            if not built.written:
                raise SystemExit(f"{name}: compile failed: {[r.error for r in built.failed]}")
            x = np.random.default_rng(0).standard_normal((args.rows, *SHAPES[name]), dtype=np.float32)
            runs = {mode: [compare(bundle, x, args.rounds, backups=mode == "backups on") for _ in range(args.repeats)]
                    for mode in ("backups on", "backups off")}  # fmt: skip
            results["models"][name] = {mode: {"median_ratio": statistics.median(r["ratio"] for r in rs),
                                              "median_paired_ratio": statistics.median(r["paired_ratio"] for r in rs),
                                              "median_control_ratio": statistics.median(r["control_ratio"] for r in rs),
                                              "median_first_call_ratio": statistics.median(r["all_s"][0] / r["cpu_s"][0]
                                                                                           for r in rs),
                                              "runs": rs} for mode, rs in runs.items()}  # fmt: skip
    results["load_after"] = os.getloadavg()
    path = save("pool_unmeasured", results) if args.out is None else _write(args.out, results)
    for name, modes in results["models"].items():
        for mode, m in modes.items():
            for r in m["runs"]:
                print(f"{name}, {mode}: all {r['all_median_s'] * 1000:.1f} ms, cpu {r['cpu_median_s'] * 1000:.1f} ms a call: "
                      f"ratio {r['ratio']:.2f}x (paired {r['paired_ratio']:.2f}x; control {r['control_ratio']:.2f}x); "
                      f"first call {r['all_s'][0] * 1000:.0f} ms against {r['cpu_s'][0] * 1000:.0f}; "
                      f"lavapipe rows {r['lavapipe']['items']}, dropped {r['lavapipe']['wasted']}, "
                      f"CPU backup copies {r['cpu_backups']}")  # fmt: skip
            print(f"{name}, {mode}: median ratio over {len(m['runs'])} run(s) {m['median_ratio']:.2f}x "
                  f"(paired {m['median_paired_ratio']:.2f}x; control {m['median_control_ratio']:.2f}x); "
                  f"first calls {m['median_first_call_ratio']:.2f}x")  # fmt: skip
    print(f"wrote {path}")


def compare(bundle: Path, x: np.ndarray, rounds: int, backups: bool) -> dict:
    """Interleaved calls on a fresh pool of every device, one of the CPU alone, and
    another of the CPU alone (the control)."""
    with Pool(bundle, "all", backups=backups) as every, Pool(bundle, "cpu") as cpu, Pool(bundle, "cpu") as control:
        pools = [("all", every), ("cpu", cpu), ("control", control)]
        times: dict[str, list[float]] = {label: [] for label, _ in pools}
        for r in range(rounds):
            for label, pool in pools[r % 3:] + pools[:r % 3]:
                t0 = time.perf_counter()
                pool(x)
                times[label].append(time.perf_counter() - t0)
                print(f"  {bundle.stem}, backups {'on' if backups else 'off'}, round {r + 1}/{rounds} {label}: "
                      f"{times[label][-1] * 1000:.1f} ms", file=sys.stderr, flush=True)  # fmt: skip
        stats = every.stats()
    vk = next(d for d in stats.devices if d.device.startswith("vulkan"))
    all_m, cpu_m = statistics.median(times["all"]), statistics.median(times["cpu"])
    return {
        "all_s": times["all"], "cpu_s": times["cpu"], "control_s": times["control"], "all_median_s": all_m,
        "cpu_median_s": cpu_m, "ratio": all_m / cpu_m,
        "paired_ratio": statistics.median(a / c for a, c in zip(times["all"], times["cpu"])),
        "control_ratio": statistics.median(times["control"]) / cpu_m,
        "lavapipe": {"items": vk.items, "wasted": vk.wasted, "busy_s": vk.busy_s, "speed_source": vk.speed_source},
        "cpu_backups": stats.device("cpu:host").backups,
    }  # fmt: skip


def _write(path: Path, data: dict) -> Path:
    import json

    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


if __name__ == "__main__":
    main()

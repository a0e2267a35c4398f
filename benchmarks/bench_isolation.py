"""Do CPU numbers from `hxc bench` depend on a lavapipe (software Vulkan) artifact being
in the same run? Before: every contender was interleaved in one process; now each
device has a worker process and the workers take turns (hxc/bench/isolate.py).

On the example CNN with a dynamic batch (cpu:host, cpu:x86-64-v3, vulkan:spirv), this
times the CPU artifact and PyTorch eager, single-stream and at batch 32, three ways,
alternating A B C A B C ... for `--rounds` rounds (so load from other processes
reaches all three alike), and reports the medians over rounds:

- alone: `hxc bench --device cpu` (no Vulkan device anywhere in the run);
- isolated: `hxc bench` with the Vulkan artifact (its own worker, taking turns);
- interleaved: the old way, every contender in one process, A B C blocks.

    python benchmarks/bench_isolation.py [--rounds 3] [--min-time 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import save  # noqa: E402

from hxc.bench.measure import Budget, Phase  # noqa: E402
from hxc.bench.run import bench_contenders, run_bench, scenarios  # noqa: E402
from hxc.build import build_bundle  # noqa: E402
from hxc.compiler.imported import ImportOptions  # noqa: E402
from hxc.manifests import read_manifest  # noqa: E402
from hxc.verify import load_golden  # noqa: E402

WATCH = ("cpu:host", "torch:eager")


def interleaved(bundle: Path, budget: Budget) -> dict[tuple[str, str, int], dict]:
    """What `hxc bench` did before: every contender in this process, interleaved."""
    manifest = read_manifest(bundle)
    golden, _ = load_golden(bundle, manifest)
    out = {}
    for scenario, batch, inputs in scenarios(manifest, golden, (32,)):
        phase = Phase(bench_contenders(bundle, ("torch",), None), inputs, budget)
        try:
            while not phase.done:
                phase.run(budget.phase_seconds)
        finally:
            phase.close()
        out.update({(t.contender.id, scenario, batch): _row(t.stats()) for t in phase.timings})
    return out


def _row(s) -> dict:
    return {"p50_ms": s.p50_ms, "p99_ms": s.p99_ms, "throughput": 1000 / s.mean_ms, "iterations": s.iterations}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=1.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hxc-isolation-"))
    bundle = work / "cnn.hxc"
    result = build_bundle("hxc.examples:convnet", bundle, "cpu:host,cpu:x86-64-v3,vulkan",
                          options=ImportOptions(dynamic_batch=True))  # fmt: skip
    assert result.written
    budget = Budget(min_seconds=args.min_time, max_seconds=30)
    ways = {
        "alone": lambda: {(p.candidate, p.scenario, p.batch): _row(p.latency)
                          for p in run_bench(bundle, device="cpu", offline_batches=(32,), budget=budget, record=False).profiles},
        "isolated": lambda: {(p.candidate, p.scenario, p.batch): _row(p.latency)
                             for p in run_bench(bundle, offline_batches=(32,), budget=budget, record=False).profiles},
        "interleaved": lambda: interleaved(bundle, budget),
    }  # fmt: skip
    runs: dict[str, list[dict]] = {w: [] for w in ways}
    for r in range(args.rounds):
        for way, fn in ways.items():
            print(f"round {r + 1}/{args.rounds}: {way}", file=sys.stderr, flush=True)
            runs[way].append(fn())
    table = {}
    for key in runs["alone"][0]:
        if key[0] not in WATCH:
            continue
        name = f"{key[0]} {key[1]} b{key[2]}"
        table[name] = {
            way: {m: statistics.median(run[key][m] for run in rs) for m in ("p50_ms", "p99_ms", "throughput")}
            for way, rs in runs.items()
        }
        table[name]["spread_alone_p50"] = max(run[key]["p50_ms"] for run in runs["alone"]) / min(run[key]["p50_ms"] for run in runs["alone"]) - 1
    path = save("bench_isolation", {"rounds": args.rounds, "min_time_s": args.min_time, "results": table})
    print("\n| contender | metric | alone | isolated (with lavapipe) | interleaved (old) |")
    print("|---|---|---|---|---|")
    for name, row in table.items():
        for m, unit in (("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("throughput", "inferences/s")):
            print(f"| {name} | {unit} | {row['alone'][m]:.3g} | {row['isolated'][m]:.3g} | {row['interleaved'][m]:.3g} |")
    print(f"({path})")


if __name__ == "__main__":
    main()

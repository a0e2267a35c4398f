"""How much faster is re-running the same `hxc compile`? (issue: at least 10x)

Runs the real CLI in a fresh process each time, as a user or CI job would: a cold
compile (empty cache) and a warm re-run (same cache), interleaved A B A B, medians.

    python benchmarks/compile_cache.py [--model hxc.examples.zoo:resnet18] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import hxc, interleave, median, save  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="hxc.examples.zoo:resnet18")
    ap.add_argument("--targets", default="all")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hxc-bench-cache-"))
    warm_cache = work / "warm-cache"
    out = work / "model.hxc"
    try:
        print(f"priming the warm cache: {args.model} for {args.targets}", file=sys.stderr)
        hxc("compile", args.model, "-t", args.targets, "-o", str(out), "--cache-dir", str(warm_cache))

        def cold() -> None:
            cache = Path(tempfile.mkdtemp(dir=work))
            hxc("compile", args.model, "-t", args.targets, "-o", str(out), "--cache-dir", str(cache))
            shutil.rmtree(cache)

        def warm() -> None:
            hxc("compile", args.model, "-t", args.targets, "-o", str(out), "--cache-dir", str(warm_cache))

        times = interleave({"cold": cold, "warm": warm}, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cold_s, warm_s = median(times["cold"]), median(times["warm"])
    result = {"model": args.model, "targets": args.targets, "rounds": args.rounds, "seconds": times,
              "median_cold_s": cold_s, "median_warm_s": warm_s, "speedup": cold_s / warm_s}  # fmt: skip
    path = save("compile_cache", result)
    print(f"{args.model} -t {args.targets}: cold {cold_s:.1f}s, warm re-run {warm_s:.1f}s -> {cold_s / warm_s:.1f}x  ({path})")


if __name__ == "__main__":
    main()

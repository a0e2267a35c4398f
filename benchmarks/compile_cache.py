"""How much faster is re-running the same `hxc compile`? (issue: at least 10x)

Runs the real CLI in a fresh process each time, as a user or CI job would, on a
ResNet-18 saved with torch.export.save: a cold compile (empty cache), a warm re-run of
the same .pt2 (import and compile caches hit), and a warm re-run from the Python
factory (re-exported every time, compile cache hits), interleaved, medians.

    python benchmarks/compile_cache.py [--model hxc.examples.zoo:resnet18] [--targets all] [--rounds 3]
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
    pt2 = work / "model.pt2"
    try:
        import importlib

        import torch

        mod, _, fn = args.model.partition(":")
        model, inputs = getattr(importlib.import_module(mod), fn)()
        torch.export.save(torch.export.export(model, inputs), str(pt2))
        print(f"priming the warm cache: {args.model} for {args.targets}", file=sys.stderr)
        hxc("compile", str(pt2), "-t", args.targets, "-o", str(out), "--cache-dir", str(warm_cache))
        hxc("compile", args.model, "-t", args.targets, "-o", str(out), "--cache-dir", str(warm_cache))

        def cold() -> None:
            cache = Path(tempfile.mkdtemp(dir=work))
            hxc("compile", str(pt2), "-t", args.targets, "-o", str(out), "--cache-dir", str(cache))
            shutil.rmtree(cache)

        def warm() -> None:
            hxc("compile", str(pt2), "-t", args.targets, "-o", str(out), "--cache-dir", str(warm_cache))

        def warm_factory() -> None:
            hxc("compile", args.model, "-t", args.targets, "-o", str(out), "--cache-dir", str(warm_cache))

        times = interleave({"cold": cold, "warm": warm, "warm_factory": warm_factory}, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cold_s, warm_s, factory_s = (median(times[k]) for k in ("cold", "warm", "warm_factory"))
    result = {"model": args.model, "targets": args.targets, "rounds": args.rounds, "seconds": times,
              "median_cold_s": cold_s, "median_warm_s": warm_s, "median_warm_factory_s": factory_s,
              "speedup": cold_s / warm_s, "speedup_factory": cold_s / factory_s}  # fmt: skip
    path = save("compile_cache", result)
    print(f"{args.model} -t {args.targets}: cold {cold_s:.1f}s; warm re-run of the .pt2 {warm_s:.2f}s "
          f"({cold_s / warm_s:.0f}x); warm re-run of the factory {factory_s:.1f}s ({cold_s / factory_s:.1f}x)  ({path})")


if __name__ == "__main__":
    main()

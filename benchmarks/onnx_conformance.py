"""How much of the ONNX operator set does `hxc compile model.onnx` handle on the CPU?

Runs every ONNX node test through hxc (`hxc.compiler.onnx_conformance`: import with
hxc's ONNX frontend, compile for cpu:host, compare with the expected outputs at hxc's
tolerances) and records the pass rate and every failure's category.

    python benchmarks/onnx_conformance.py [--jobs 2] [--only REGEX] [--timeout 180]

Results go to benchmarks/results/onnx_conformance.json (full runs only).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from hxc.compiler.onnx_conformance import TARGET, list_tests, node_tests_dir, progress_printer, run_conformance, summarize


def _versions() -> dict[str, str]:
    from importlib import metadata

    return {d: metadata.version(d) for d in ("onnx", "onnxruntime", "iree-base-compiler", "iree-base-runtime")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--only", help="run tests whose name matches this regular expression")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per test")
    ap.add_argument("--target", default=TARGET)
    args = ap.parse_args()

    cases = list_tests(node_tests_dir(), args.only)
    print(f"{len(cases)} ONNX node tests, {args.jobs} at a time, for {args.target}", file=sys.stderr)
    t0 = time.perf_counter()
    progress = progress_printer(len(cases))

    results = run_conformance(cases, jobs=args.jobs, timeout=args.timeout, target=args.target, on_result=progress)
    summary = summarize(results)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["versions"] = _versions()
    where = "not saved: --only ran a subset"
    if not args.only:  # the results file always describes a full run
        sys.path.insert(0, str(Path(__file__).parent))
        from _harness import save

        where = f"wrote {save('onnx_conformance', summary)}"
    print(f"{summary['passed']} passed / {summary['total']} total ({100 * summary['pass_rate']:.1f}%), "
          f"{summary['skipped']} skipped; {where}")  # fmt: skip
    for category, n in summary["failures_by_category"].items():
        print(f"  {n:5d}  {category}")


if __name__ == "__main__":
    main()

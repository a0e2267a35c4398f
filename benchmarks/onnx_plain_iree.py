"""Is hxc ever worse than the tools it wraps? The ONNX node tests through plain IREE.

Runs the same ONNX node tests as `onnx_conformance.py`, with each test's own inputs
and expected outputs, but through IREE alone, the way a user would without hxc:
`iree-import-onnx model.onnx` (no options), `iree-compile` with IREE's default flags
for the host CPU (only the target device, backend and CPU named), and the IREE Python
runtime called with the test's numpy inputs. Outputs are compared with hxc's
tolerances (`hxc.runtime.verify.compare`), so "passes" means the same in both scripts.

    python benchmarks/onnx_plain_iree.py [--jobs 2] [--only REGEX] [--timeout 300]
    python benchmarks/onnx_plain_iree.py --compare   # only redo the comparison with hxc's latest run

Then it reads `results/onnx_conformance.json` (hxc's run; re-run that script first
for an up-to-date comparison) and lists the tests each one passes that the other
fails. Results go to benchmarks/results/onnx_plain_iree.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from hxc.compiler.onnx_conformance import (
    CaseResult,
    Outcome,
    list_tests,
    node_tests_dir,
    progress_printer,
    read_case,
    run_conformance,
    worker_loop,
)

# IREE's defaults: only what it cannot guess (which device and CPU) is named.
PLAIN_FLAGS = (
    "--iree-hal-target-device=local",
    "--iree-hal-local-target-device-backends=llvm-cpu",
    "--iree-llvmcpu-target-cpu=host",
)


def run_plain(case: Path, workdir: Path, target: str = "plain-iree", timeout: float = 300) -> CaseResult:
    t0 = time.perf_counter()
    try:
        _run_plain(case, workdir, timeout)
        outcome = Outcome("pass", "")
    except Outcome as o:
        outcome = o
    except Exception as e:
        outcome = Outcome("fail", f"script error: {type(e).__name__}", str(e).splitlines()[0][:300] if str(e) else "")
    return CaseResult(case.name, outcome.status, outcome.category, outcome.detail[:400], outcome.operator,
                      round(time.perf_counter() - t0, 3))  # fmt: skip


def _run_plain(case: Path, work: Path, timeout: float) -> None:
    import numpy as np

    from hxc.compiler.driver import iree_compile_path, summarize_compile_error
    from hxc.dtypes import from_numpy
    from hxc.runtime.verify import compare

    graph, inputs, expected = read_case(case)
    mlir, vmfb = work / "model.mlir", work / "model.vmfb"
    importer = Path(sys.executable).parent / "iree-import-onnx"
    try:
        proc = subprocess.run([str(importer), str(case / "model.onnx"), "-o", str(mlir)],
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise Outcome("fail", "import timeout") from None
    if proc.returncode != 0:
        lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        raise Outcome("fail", "import failed", lines[-1][:300] if lines else f"exit {proc.returncode}")
    try:
        proc = subprocess.run([iree_compile_path(), str(mlir), *PLAIN_FLAGS, "-o", str(vmfb)],
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise Outcome("fail", "compile timeout") from None
    if proc.returncode != 0:
        error, operator, _ = summarize_compile_error(proc.stderr, proc.returncode)
        raise Outcome("fail", "iree-compile crashed" if proc.returncode < 0 else "iree-compile error", error, operator)
    try:
        got = _invoke(vmfb, inputs)
    except Exception as e:
        raise Outcome("fail", "runtime error", str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if len(got) != len(expected):
        raise Outcome("fail", "wrong number of outputs", f"{len(got)} vs {len(expected)}")
    for k, (a, e) in enumerate(zip(got, expected)):
        a = np.asarray(a)
        if a.shape != e.shape:
            raise Outcome("fail", "wrong output shape", f"output {k}: {a.shape} vs {e.shape}")
        found = from_numpy(e.dtype)
        if found is None:
            raise Outcome("fail", "unsupported element type", f"output dtype {e.dtype}")
        c = compare(a.astype(e.dtype), e, found.name)
        if not c.ok:
            raise Outcome("fail", "numerical mismatch", f"output {k}: max abs err {c.max_abs:.3g}")


def _invoke(vmfb: Path, inputs: list) -> list:
    import numpy as np

    import iree.runtime as rt

    config = rt.Config("local-sync")
    module = rt.VmModule.mmap(config.vm_instance, str(vmfb))
    context = rt.SystemContext(vm_modules=[module], config=config)
    # The importer names the function after the ONNX graph.
    [name] = [f for f in module.function_names if not f.startswith("__") and "$" not in f]
    result = context.modules[module.name][name](*inputs)
    results = result if isinstance(result, (list, tuple)) else [result]
    return [np.asarray(r.to_host()) if hasattr(r, "to_host") else np.asarray(r) for r in results]


def compare_runs(plain_passed: set[str], hxc: dict) -> dict:
    """Tests one pipeline passes and the other fails, with hxc's failure for each."""
    plain_pass = set(plain_passed)
    hxc_pass = set(hxc.get("passed_tests", []))
    hxc_fail = {f["name"]: f for f in hxc.get("failures", [])}
    worse = sorted(plain_pass - hxc_pass)
    return {
        "hxc_recorded": hxc.get("recorded"),
        "plain_only": len(worse),
        "hxc_only": len(hxc_pass - plain_pass),
        "plain_only_by_hxc_category": dict(Counter(hxc_fail.get(n, {}).get("category", "not run") for n in worse).most_common()),
        "plain_only_tests": [{"name": n, **{k: v for k, v in hxc_fail.get(n, {}).items() if k != "name"}} for n in worse],
        "hxc_only_tests": sorted(hxc_pass - plain_pass),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--only", help="run tests whose name matches this regular expression")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per test")
    ap.add_argument("--target", default="plain-iree", help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--compare", action="store_true",
                    help="do not run IREE: compare the saved plain-IREE results with hxc's latest onnx_conformance.json")
    args = ap.parse_args()
    if args.worker:
        worker_loop(args.target, run_plain)
        return
    results_dir = Path(__file__).parent / "results"
    if args.compare:
        sys.path.insert(0, str(Path(__file__).parent))
        from _harness import save

        summary = json.loads((results_dir / "onnx_plain_iree.json").read_text())
        summary = {k: v for k, v in summary.items() if k not in ("machine", "recorded")}
        hxc = json.loads((results_dir / "onnx_conformance.json").read_text())
        summary["versus_hxc"] = compare_runs(set(summary["passed_tests"]), hxc)
        save("onnx_plain_iree", summary)
        _report(summary, "comparison updated")
        return

    cases = list_tests(node_tests_dir(), args.only)
    print(f"{len(cases)} ONNX node tests through plain IREE, {args.jobs} at a time", file=sys.stderr)
    t0 = time.perf_counter()
    progress = progress_printer(len(cases))

    results = run_conformance(cases, jobs=args.jobs, timeout=args.timeout, on_result=progress, worker=(__file__,))
    ran = [r for r in results if r.status != "skip"]
    passed = [r for r in ran if r.status == "pass"]
    summary = {
        "pipeline": "iree-import-onnx + iree-compile " + " ".join(PLAIN_FLAGS) + " + iree.runtime (local-sync)",
        "passed": len(passed),
        "total": len(ran),
        "skipped": len(results) - len(ran),
        "pass_rate": round(len(passed) / len(ran), 4) if ran else 0.0,
        "failures_by_category": dict(Counter(r.category for r in ran if r.status == "fail").most_common()),
        "passed_tests": [r.name for r in passed],
        "failures": [{"name": r.name, "category": r.category, "operator": r.operator, "detail": r.detail[:200]}
                     for r in ran if r.status == "fail"],  # fmt: skip
        "seconds": round(time.perf_counter() - t0, 1),
    }
    hxc_file = results_dir / "onnx_conformance.json"
    if hxc_file.is_file():
        summary["versus_hxc"] = compare_runs({r.name for r in passed}, json.loads(hxc_file.read_text()))
    where = "not saved: --only ran a subset"
    if not args.only:
        sys.path.insert(0, str(Path(__file__).parent))
        from _harness import save

        where = f"wrote {save('onnx_plain_iree', summary)}"
    _report(summary, where)


def _report(summary: dict, where: str) -> None:
    print(f"plain IREE: {summary['passed']} passed / {summary['total']} ({100 * summary['pass_rate']:.1f}%); {where}")
    if "versus_hxc" in summary:
        v = summary["versus_hxc"]
        print(f"  plain IREE passes {v['plain_only']} tests hxc fails; hxc passes {v['hxc_only']} that plain IREE fails")
        for category, n in v["plain_only_by_hxc_category"].items():
            print(f"  {n:5d}  hxc: {category}")


if __name__ == "__main__":
    main()

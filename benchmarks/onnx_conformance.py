"""How much of the ONNX operator set does hxc handle on the CPU, and is it ever worse
than plain IREE? Every ONNX node test, through hxc and through IREE alone, in one run.

Each test runs through two pipelines on its own inputs (empty ones included) and is
compared with its own expected outputs at hxc's tolerances
(`hxc.bench.onnx_conformance`):
- hxc, the way a user runs a model: `build_bundle` for cpu:host (= `hxc compile
  model.onnx --input ... --example ...`), then `hxc.runtime.load(bundle)(*inputs)`;
- plain IREE: `iree-import-onnx` (no options), `iree-compile` with IREE's defaults for
  the host CPU, the IREE Python runtime called with the same numpy inputs.
Tests plain IREE passes and hxc fails are run again `--recheck` times through both, so
a nondeterministic test is named as such, with its pass counts as the evidence.

    python benchmarks/onnx_conformance.py [--jobs 2] [--only REGEX] [--timeout 300] [--recheck 4] [--hxc-only] [--log F]
    python benchmarks/onnx_conformance.py --only REGEX --merge   # re-run some tests into the saved full run

Results go to benchmarks/results/onnx_conformance.json (full runs only): hxc's summary
at the top level, plain IREE's under `plain_iree`, the comparison under
`versus_plain_iree`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from hxc.bench.onnx_conformance import (
    HXC,
    PLAIN,
    TARGET,
    CaseResult,
    list_tests,
    node_tests_dir,
    progress_printer,
    run_conformance,
    summarize,
    versus_plain,
)


def _versions() -> dict[str, str]:
    from importlib import metadata

    return {d: metadata.version(d) for d in ("onnx", "onnxruntime", "iree-base-compiler", "iree-base-runtime")}


def recheck(cases: list[Path], times: int, jobs: int, timeout: float, target: str) -> dict[str, dict[str, int]]:
    """{test: {"hxc": passes, "plain-iree": passes, "runs": times}} over `times` more runs of each."""
    results = run_conformance([c for c in cases for _ in range(times)], jobs=jobs, timeout=timeout, target=target,
                              pipelines=(HXC, PLAIN))  # fmt: skip
    out: dict[str, dict[str, int]] = {c.name: {HXC: 0, PLAIN: 0, "runs": times} for c in cases}
    for r in results:
        out[r.name][r.pipeline] += r.status == "pass"
    return out


RESULTS_FILE = Path(__file__).parent / "results" / "onnx_conformance.json"


def _saved_results(saved: dict) -> list[CaseResult]:
    """The per-test results of a saved run, for both pipelines (what the file keeps of them)."""
    out = []
    for pipeline, part in ((HXC, saved), (PLAIN, saved["plain_iree"])):
        out += [CaseResult(n, "pass", "", pipeline=pipeline) for n in part["passed_tests"]]
        out += [CaseResult(f["name"], "fail", f["category"], f["detail"], f["operator"], pipeline=pipeline)
                for f in part["failures"]]  # fmt: skip
        out += [CaseResult(n, "skip", "", pipeline=pipeline) for n in saved["skipped_tests"]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--only", help="run tests whose name matches this regular expression")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per test and pipeline")
    ap.add_argument("--recheck", type=int, default=4, help="runs again of each test plain IREE passes and hxc fails")
    ap.add_argument("--hxc-only", action="store_true", help="leave plain IREE out")
    ap.add_argument("--target", default=TARGET)
    ap.add_argument("--log", type=Path, help="append each result to this file as a JSON line as it comes")
    ap.add_argument("--merge", action="store_true",
                    help="with --only: replace those tests' results in the saved full run (after a change that "
                         "concerns only them) and save it, recording what was re-run")  # fmt: skip
    args = ap.parse_args()
    if args.merge and (not args.only or args.hxc_only):
        ap.error("--merge needs --only and both pipelines")

    cases = list_tests(node_tests_dir(), args.only)
    pipelines = (HXC,) if args.hxc_only else (HXC, PLAIN)
    print(f"{len(cases)} ONNX node tests through {' and '.join(pipelines)}, {args.jobs} at a time, for {args.target}",
          file=sys.stderr)  # fmt: skip
    t0 = time.perf_counter()
    progress = progress_printer(len(cases) * len(pipelines), every=100)

    def on_result(r: CaseResult) -> None:
        progress(r)
        if args.log:  # a run of hours: what it found so far, readable while it runs
            with args.log.open("a") as f:
                f.write(json.dumps(asdict(r)) + "\n")

    results = run_conformance(cases, jobs=args.jobs, timeout=args.timeout, target=args.target, pipelines=pipelines,
                              on_result=on_result)  # fmt: skip
    merged: list[dict] = []
    if args.merge:
        saved = json.loads(RESULTS_FILE.read_text())
        rerun = {c.name for c in cases}
        results = [r for r in _saved_results(saved) if r.name not in rerun] + results
        merged = [*saved.get("merged", []), {"only": args.only, "tests": len(rerun), "seconds": round(time.perf_counter() - t0, 1),
                                             "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]  # fmt: skip
        cases = list_tests(node_tests_dir())
    summary = summarize(results, HXC)
    if not args.hxc_only:
        plain = summarize(results, PLAIN)
        summary["plain_iree"] = {k: v for k, v in plain.items() if k not in ("unlowered_operators", "skipped_tests")}
        versus = versus_plain(results)
        if args.recheck and versus["plain_only_tests"]:
            by_name = {c.name: c for c in cases}
            worse = [by_name[t["name"]] for t in versus["plain_only_tests"]]
            print(f"re-running {len(worse)} test(s) plain IREE passed and hxc failed, {args.recheck} times each",
                  file=sys.stderr)  # fmt: skip
            counts = recheck(worse, args.recheck, args.jobs, args.timeout, args.target)
            for t in versus["plain_only_tests"]:
                t["recheck"] = counts[t["name"]]
        summary["versus_plain_iree"] = versus
    summary["seconds"] = saved["seconds"] if args.merge else round(time.perf_counter() - t0, 1)
    summary["versions"] = _versions()
    if merged:
        summary["merged"] = merged  # re-runs of some tests after the full run, with their regex and time
    where = "not saved: --only ran a subset"
    if not args.only or args.merge:  # the results file always describes a full run
        sys.path.insert(0, str(Path(__file__).parent))
        from _harness import save

        where = f"wrote {save('onnx_conformance', summary)}"
    print(f"hxc: {summary['passed']} passed / {summary['total']} total ({100 * summary['pass_rate']:.1f}%), "
          f"{summary['skipped']} skipped; {where}")  # fmt: skip
    for category, n in summary["failures_by_category"].items():
        print(f"  {n:5d}  {category}")
    if "plain_iree" in summary:
        v = summary["versus_plain_iree"]
        print(f"plain IREE: {summary['plain_iree']['passed']} passed; it passes {v['plain_only']} that hxc fails, "
              f"hxc passes {v['hxc_only']} that it fails")  # fmt: skip
        for t in v["plain_only_tests"]:
            print(f"  {t['name']}: hxc {t['category']}: {t['detail'][:100]}  recheck {t.get('recheck')}")


if __name__ == "__main__":
    main()

"""ONNX's own operator conformance tests, run through hxc the way a user runs a model.

Each node test (one small model per operator variant, with inputs and expected outputs)
goes through hxc's public path: `build_bundle` (what `hxc compile model.onnx -t cpu:host
--input ... --example ...` does: import, compile, golden sample, bundle) with the test's
own input shapes and its own inputs and outputs as the example, then
`hxc.runtime.load(bundle)` and a call with the test's inputs exactly as given (empty
ones included). The outputs are compared with the expected ones at hxc's tolerances.
Each failure gets a category: where in the pipeline it failed and why.

The same tests also run through IREE alone (`run_plain`: `iree-import-onnx`,
`iree-compile` with IREE's defaults for the host CPU, the IREE runtime), on the same
inputs and in the same run, so that "hxc is never worse than plain IREE" is measured,
not assumed. Every (test, pipeline) runs in a worker process, so a crash or a hang
costs one result, not the run.

`benchmarks/onnx_conformance.py` runs all of them and records both pass rates and the
comparison; the test suite runs a slice. The node tests come from the onnx package: its
`backend/test/data/node` directory when the wheel ships it, otherwise they are
generated from `onnx.backend.test.case.node` into the hxc cache (once per onnx
version). Tests with more than one data set are skipped.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TARGET = "cpu:host"
_MARK = "@@hxc-conformance "
HXC, PLAIN = "hxc", "plain-iree"  # the pipelines a test runs through
# IREE's defaults: only what it cannot guess (which device and CPU) is named.
PLAIN_FLAGS = (
    "--iree-hal-target-device=local",
    "--iree-hal-local-target-device-backends=llvm-cpu",
    "--iree-llvmcpu-target-cpu=host",
)


@dataclass(frozen=True)
class CaseResult:
    name: str
    status: str  # pass | fail | skip
    category: str  # "" for a pass; see _categorize
    detail: str = ""
    operator: str | None = None  # the ONNX operator a failed compile names
    seconds: float = 0.0
    pipeline: str = HXC  # hxc, or plain-iree (IREE alone)


# --- test data -----------------------------------------------------------------------


def node_tests_dir(root: Path | None = None, names: Iterable[str] | None = None) -> Path:
    """A directory of node tests (`NAME/model.onnx`, `NAME/test_data_set_0/*.pb`):
    the onnx wheel's own when it ships them, else generated under `root` (default: the
    hxc cache). `names` limits generation to those tests."""
    import onnx

    shipped = Path(onnx.__file__).parent / "backend" / "test" / "data" / "node"
    if shipped.is_dir() and any(shipped.iterdir()):
        return shipped
    if root is None:
        from hxc.compiler.cache import default_cache_dir

        root = default_cache_dir() / "onnx-node-tests" / onnx.__version__
    wanted = set(names) if names is not None else None
    done = root / ".complete"
    if done.exists() or (wanted is not None and all((root / n / "model.onnx").is_file() for n in wanted)):
        return root
    _generate(root, wanted)
    if wanted is None:
        done.touch()
    return root


def _generate(root: Path, wanted: set[str] | None) -> None:
    import warnings

    import numpy as np
    from onnx import numpy_helper
    from onnx.backend.test.case import node

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        cases = node.collect_testcases()
    for case in cases:
        if wanted is not None and case.name not in wanted:
            continue
        d = root / case.name
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.onnx").write_bytes(case.model.SerializeToString())
        for i, (inputs, outputs) in enumerate(case.data_sets):
            ds = d / f"test_data_set_{i}"
            ds.mkdir(exist_ok=True)
            for kind, values, infos in (("input", inputs, case.model.graph.input), ("output", outputs, case.model.graph.output)):
                for j, value in enumerate(values):
                    info = infos[j]
                    which = info.type.WhichOneof("value")
                    if which == "sequence_type":
                        proto = numpy_helper.from_list(value, info.name)
                    elif which == "optional_type":
                        proto = numpy_helper.from_optional(value, info.name)
                    elif which == "map_type":
                        proto = numpy_helper.from_dict(value, info.name)
                    elif hasattr(value, "SerializeToString"):
                        proto = value
                    else:
                        proto = numpy_helper.from_array(np.asarray(value), info.name)
                    (ds / f"{kind}_{j}.pb").write_bytes(proto.SerializeToString())


def list_tests(root: Path, only: str | None = None) -> list[Path]:
    pattern = re.compile(only) if only else None
    return sorted(d for d in root.iterdir() if (d / "model.onnx").is_file() and (pattern is None or pattern.search(d.name)))


# --- one test ------------------------------------------------------------------------


class Outcome(Exception):
    """How one test ended, raised from anywhere in running it (status pass/fail/skip)."""

    def __init__(self, status: str, category: str, detail: str = "", operator: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.category, self.detail, self.operator = status, category, detail, operator


def run_case(case: Path, workdir: Path, target: str = TARGET, timeout: float = 300) -> CaseResult:
    """Build, load and call one node test through hxc's public path; never raises."""
    return _outcome(case, HXC, lambda: _run_case(case, workdir, target), "hxc bug")


def run_plain(case: Path, workdir: Path, target: str = TARGET, timeout: float = 300) -> CaseResult:
    """One node test through IREE alone, as a user without hxc would run it; never raises."""
    return _outcome(case, PLAIN, lambda: _run_plain(case, workdir, timeout), "script error")


PIPELINES: dict[str, Callable[[Path, Path, str], CaseResult]] = {HXC: run_case, PLAIN: run_plain}


def _outcome(case: Path, pipeline: str, run: Callable[[], None], bug: str) -> CaseResult:
    t0 = time.perf_counter()
    try:
        run()
        outcome = Outcome("pass", "")
    except Outcome as o:
        outcome = o
    except Exception as e:  # a bug in hxc (or in this script): keep it visible as its own category
        outcome = Outcome("fail", f"{bug}: {type(e).__name__}", str(e).splitlines()[0][:300] if str(e) else "")
    detail = outcome.detail.replace(f"{case}/", "")  # messages name the model file by its full path
    return CaseResult(case.name, outcome.status, outcome.category, detail[:400], outcome.operator,
                      round(time.perf_counter() - t0, 3), pipeline)  # fmt: skip


def _run_case(case: Path, workdir: Path, target: str) -> None:
    import numpy as np

    import hxc.runtime
    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions
    from hxc.dtypes import to_storage
    from hxc.errors import HxcError

    graph, inputs, expected = read_case(case)
    # Each test's own shapes, by input name (zero-size dimensions included), and its own
    # inputs and expected outputs as the example (`hxc compile --example`).
    initialized = {t.name for t in graph.initializer}
    names = [v.name for v in graph.input if v.name not in initialized]
    specs = tuple(f"{n}={_spec(a)}" for n, a in zip(names, inputs))
    example = workdir / "example.npz"
    np.savez(example, **{f"input_{i}": to_storage(a) for i, a in enumerate(inputs)},
             **{f"output_{i}": to_storage(a) for i, a in enumerate(expected)})  # fmt: skip
    bundle = workdir / "model.hxc"
    # An example holds inputs; a model without any gets ONNX Runtime's golden sample.
    options = ImportOptions(inputs=specs, weights="inline", example=str(example) if inputs else None)
    try:
        built = build_bundle(str(case / "model.onnx"), bundle, target, options=options, jobs=1, use_cache=False)
    except HxcError as e:
        raise Outcome("fail", _import_category(e.message), e.message) from None
    if not built.written:
        [r] = built.results
        raise Outcome("fail", _compile_category(r.error or ""), r.error or "", r.operator)
    try:
        model = hxc.runtime.load(bundle, device=target, strict=True)
        out = model(*inputs)
    except HxcError as e:
        raise Outcome("fail", "runtime error", e.message) from None
    except Exception as e:
        raise Outcome("fail", "runtime error", str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    got = list(out) if isinstance(out, (tuple, list)) else [out]
    _compare(got, expected, [s.dtype for s in model.signature.outputs])


def _compile_category(error: str) -> str:
    if "killed by signal" in error:
        return "iree-compile crashed"
    if "torch.operator" in error and "legalize" in error:
        return "no IREE lowering for the ONNX op"
    return "IREE compile error (after lowering)"


def _compare(got: list, expected: list, dtypes: list[str | None]) -> None:
    """Raise Outcome unless `got` matches `expected` (shapes, then values at the
    tolerance of each output's hxc dtype)."""
    import numpy as np

    from hxc.dtypes import from_numpy
    from hxc.golden import compare

    if len(got) != len(expected):
        raise Outcome("fail", "wrong number of outputs", f"{len(got)} vs {len(expected)}")
    for k, (a, e, name) in enumerate(zip(got, expected, dtypes)):
        a = np.asarray(a)
        if a.shape != e.shape:
            raise Outcome("fail", "wrong output shape", f"output {k}: {a.shape} vs {e.shape}")
        if name is None:
            found = from_numpy(e.dtype)
            if found is None:
                raise Outcome("fail", "unsupported element type", f"output dtype {e.dtype}")
            name = found.name
        c = compare(a.astype(e.dtype), e, name)
        if not c.ok:
            raise Outcome("fail", "numerical mismatch", f"output {k}: max abs err {c.max_abs:.3g}")


def _run_plain(case: Path, work: Path, timeout: float) -> None:
    from hxc.compiler.driver import iree_compile_path, summarize_compile_error

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
        got = _invoke_plain(vmfb, inputs)
    except Exception as e:
        raise Outcome("fail", "runtime error", str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    _compare(got, expected, [None] * len(expected))


def _invoke_plain(vmfb: Path, inputs: list) -> list:
    """The IREE Python runtime called with the test's numpy inputs, as IREE documents it."""
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


def read_case(case: Path) -> tuple[Any, list, list]:
    """A node test's graph, inputs and expected outputs; raises Outcome for tests that
    cannot be run as one call (several data sets, non-tensor values)."""
    import onnx

    sets = sorted(case.glob("test_data_set_*"))
    if len(sets) != 1:
        raise Outcome("skip", "several data sets" if sets else "no data set")
    graph = onnx.load(str(case / "model.onnx"), load_external_data=False).graph
    if any(v.type.WhichOneof("value") != "tensor_type" for v in [*graph.input, *graph.output]):
        raise Outcome("fail", "non-tensor inputs or outputs (sequence, optional, map)")
    return graph, _read_all(sets[0], "input"), _read_all(sets[0], "output")


def _read_all(ds: Path, kind: str) -> list:
    files = sorted(ds.glob(f"{kind}_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
    return [_read(p) for p in files]


def _read(p: Path):
    import onnx
    from onnx import numpy_helper

    t = onnx.TensorProto()
    t.ParseFromString(p.read_bytes())
    try:
        return numpy_helper.to_array(t)
    except Exception as e:
        raise Outcome("fail", "unsupported element type", str(e)) from None


def _spec(a) -> str:
    from hxc.dtypes import from_numpy

    found = from_numpy(a.dtype)
    if found is None:
        raise Outcome("fail", "unsupported element type", f"input dtype {a.dtype}")
    return "x".join([*map(str, a.shape), found.name])


def _import_category(message: str) -> str:
    if "float64" in message:
        return "float64 interface"
    if "ONNX type" in message:
        return "unsupported element type"
    if "non-tensor" in message or "tensor inputs only" in message or "tensor outputs only" in message:
        return "non-tensor inputs or outputs (sequence, optional, map)"
    if "ONNX Runtime" in message:
        return "ONNX Runtime cannot run it (golden sample)"
    if "shape inference" in message:
        return "ONNX shape inference failed"
    return "import into MLIR failed"


# --- many tests, in worker processes -------------------------------------------------


def run_conformance(
    cases: Sequence[Path],
    *,
    jobs: int = 2,
    timeout: float = 300,
    target: str = TARGET,
    pipelines: Sequence[str] = (HXC,),
    on_result: Callable[[CaseResult], None] = lambda r: None,
) -> list[CaseResult]:
    """Run every case through every pipeline (`hxc`, `plain-iree`) in `jobs` worker
    processes, so a crash or a hang costs one result, not the run; `timeout` seconds
    per case and pipeline. Results come back case by case, in the order of
    `pipelines` within a case. A worker is `python -m hxc.bench.onnx_conformance
    --worker --target T`: one `PIPELINE<TAB>CASE` per line of stdin, one marked JSON
    result per line of stdout (`worker_loop`)."""
    unknown = [p for p in pipelines if p not in PIPELINES]
    if unknown:
        raise ValueError(f"unknown pipeline(s) {unknown}; choose from {list(PIPELINES)}")
    todo: queue.Queue[tuple[int, Path, str]] = queue.Queue()
    for i, (case, pipeline) in enumerate((c, p) for c in cases for p in pipelines):
        todo.put((i, case, pipeline))
    results: list[CaseResult | None] = [None] * (len(cases) * len(pipelines))

    def worker_thread() -> None:
        proc = None
        while True:
            try:
                i, case, pipeline = todo.get_nowait()
            except queue.Empty:
                break
            if proc is None or proc.poll() is not None:
                proc = _start_worker(target)
            timer = threading.Timer(timeout, _kill_group, (proc,))
            timer.start()
            t0 = time.perf_counter()
            try:
                proc.stdin.write(f"{pipeline}\t{case}\n")
                proc.stdin.flush()
                line = ""
                while True:
                    line = proc.stdout.readline()
                    if not line or line.startswith(_MARK):
                        break
            except (BrokenPipeError, OSError):
                line = ""
            finally:
                timer.cancel()
            if line:
                result = CaseResult(**json.loads(line[len(_MARK):]))
            else:
                killed = time.perf_counter() - t0 >= timeout
                _kill_group(proc)
                proc.wait()
                proc = None
                result = CaseResult(case.name, "fail", "timeout" if killed else "crash",
                                    seconds=round(time.perf_counter() - t0, 3), pipeline=pipeline)  # fmt: skip
            results[i] = result
            on_result(result)
        if proc is not None:
            proc.stdin.close()
            proc.wait()

    threads = [threading.Thread(target=worker_thread, daemon=True) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r is not None]


def progress_printer(total: int, every: int = 50) -> Callable[[CaseResult], None]:
    """An `on_result` for run_conformance: a running count to stderr every `every` tests."""
    done: Counter[str] = Counter()
    t0 = time.perf_counter()

    def progress(r: CaseResult) -> None:
        done[r.status] += 1
        n = sum(done.values())
        if n % every == 0 or n == total:
            print(f"  {n}/{total}  pass {done['pass']}  fail {done['fail']}  skip {done['skip']}  "
                  f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)  # fmt: skip

    return progress


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill a worker and the iree-compile it may be running (its own process group)."""
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass


def _start_worker(target: str) -> subprocess.Popen:
    env = {**os.environ, "IREE_PY_RUNTIME_FLAGS": os.environ.get("IREE_PY_RUNTIME_FLAGS", "")}
    return subprocess.Popen(
        [sys.executable, "-m", __name__, "--worker", "--target", target],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip


def worker_loop(target: str) -> None:
    """A worker process: one `PIPELINE<TAB>CASE` per line of stdin, one marked JSON
    result per line of stdout."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    for line in sys.stdin:
        pipeline, _, path = line.rstrip("\n").partition("\t")
        case = Path(path)
        with tempfile.TemporaryDirectory(prefix="hxc-conformance-") as work:
            result = PIPELINES[pipeline](case, Path(work), target)
        sys.stdout.write(_MARK + json.dumps(asdict(result)) + "\n")
        sys.stdout.flush()


# --- summary -------------------------------------------------------------------------


def summarize(results: Sequence[CaseResult], pipeline: str = HXC) -> dict:
    """Pass rate, failures by category and every test's outcome for one pipeline."""
    results = [r for r in results if r.pipeline == pipeline]
    ran = [r for r in results if r.status != "skip"]
    passed = [r for r in ran if r.status == "pass"]
    failed = [r for r in ran if r.status == "fail"]
    ops = Counter(r.operator for r in failed if r.category == "no IREE lowering for the ONNX op" and r.operator)
    return {
        "pipeline": pipeline if pipeline != PLAIN else f"iree-import-onnx + iree-compile {' '.join(PLAIN_FLAGS)} + iree.runtime (local-sync)",
        "target": TARGET,
        "passed": len(passed),
        "total": len(ran),
        "skipped": len(results) - len(ran),
        "pass_rate": round(len(passed) / len(ran), 4) if ran else 0.0,
        "failures_by_category": dict(Counter(r.category for r in failed).most_common()),
        "unlowered_operators": dict(ops.most_common()),
        "passed_tests": [r.name for r in passed],
        "skipped_tests": [r.name for r in results if r.status == "skip"],
        "failures": [{"name": r.name, "category": r.category, "operator": r.operator, "detail": r.detail[:200]}
                     for r in failed],  # fmt: skip
    }


def versus_plain(results: Sequence[CaseResult]) -> dict:
    """Tests plain IREE passes and hxc fails (with hxc's failure for each), and the
    reverse, from one run of both pipelines."""
    by = {(r.name, r.pipeline): r for r in results}
    names = dict.fromkeys(r.name for r in results)
    passes = lambda n, p: (r := by.get((n, p))) is not None and r.status == "pass"  # noqa: E731
    worse = [n for n in names if passes(n, PLAIN) and not passes(n, HXC)]
    better = [n for n in names if passes(n, HXC) and not passes(n, PLAIN)]
    hxc_failure = lambda n: by[(n, HXC)] if (n, HXC) in by else None  # noqa: E731
    return {
        "plain_only": len(worse),
        "hxc_only": len(better),
        "plain_only_by_hxc_category": dict(Counter(getattr(hxc_failure(n), "category", "not run") for n in worse).most_common()),
        "plain_only_tests": [{"name": n, "category": getattr(hxc_failure(n), "category", "not run"),
                              "detail": getattr(hxc_failure(n), "detail", "")[:200]} for n in worse],  # fmt: skip
        "hxc_only_tests": better,
    }


if __name__ == "__main__":  # a worker process, started by run_conformance
    worker_loop(sys.argv[sys.argv.index("--target") + 1])

"""ONNX's own operator conformance tests, run through hxc's ONNX frontend.

Each node test (one small model per operator variant, with inputs and expected outputs)
is imported by hxc's ONNX frontend, compiled for a target (cpu:host) with iree-compile
and run; IREE's outputs are compared with the expected ones at hxc's tolerances. Each
failure gets a category: where in the pipeline it failed and why. Tests run in worker
processes, so a crash or a hang costs one test, not the run.

`benchmarks/onnx_conformance.py` runs all of them and records the pass rate; the test
suite runs a slice. The node tests come from the onnx package: its
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


@dataclass(frozen=True)
class CaseResult:
    name: str
    status: str  # pass | fail | skip
    category: str  # "" for a pass; see _categorize
    detail: str = ""
    operator: str | None = None  # the ONNX operator a failed compile names
    seconds: float = 0.0


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
    """Import, compile and run one node test; never raises."""
    t0 = time.perf_counter()
    try:
        _run_case(case, workdir, target, timeout)
        outcome = Outcome("pass", "")
    except Outcome as o:
        outcome = o
    except Exception as e:  # a bug in hxc: keep it visible as its own category
        outcome = Outcome("fail", f"hxc bug: {type(e).__name__}", str(e).splitlines()[0][:300] if str(e) else "")
    detail = outcome.detail.replace(f"{case}/", "")  # messages name the model file by its full path
    return CaseResult(case.name, outcome.status, outcome.category, detail[:400], outcome.operator,
                      round(time.perf_counter() - t0, 3))  # fmt: skip


def _run_case(case: Path, workdir: Path, target: str, timeout: float) -> None:
    import numpy as np

    from hxc.compiler.driver import f64_interface
    from hxc.compiler.imported import ImportOptions
    from hxc.compiler.onnx_import import import_onnx
    from hxc.errors import HxcError
    from hxc.runtime.verify import compare

    graph, inputs, expected = read_case(case)
    # Each test's own shapes, by input name (zero-size dimensions included).
    initialized = {t.name for t in graph.initializer}
    names = [v.name for v in graph.input if v.name not in initialized]
    specs = [f"{n}={_spec(a)}" for n, a in zip(names, inputs)]
    try:
        imported = import_onnx(str(case / "model.onnx"), ImportOptions(inputs=tuple(specs), weights="inline"), workdir, lambda s: None)
    except HxcError as e:
        raise Outcome("fail", _import_category(e.message), e.message) from None
    vmfb = _compile(imported.mlir, imported.operators_at, f64_interface(imported.signature), workdir, target, timeout)
    try:
        got = _invoke(vmfb, inputs, imported.signature)
    except Exception as e:
        raise Outcome("fail", "runtime error", str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if len(got) != len(expected):
        raise Outcome("fail", "wrong number of outputs", f"{len(got)} vs {len(expected)}")
    for k, (a, e, spec) in enumerate(zip(got, expected, imported.signature.outputs)):
        a = np.asarray(a)
        if a.shape != e.shape:
            raise Outcome("fail", "wrong output shape", f"output {k}: {a.shape} vs {e.shape}")
        c = compare(a.astype(e.dtype), e, spec.dtype)
        if not c.ok:
            raise Outcome("fail", "numerical mismatch", f"output {k}: max abs err {c.max_abs:.3g}")


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


def _compile(mlir: Path, operators_at: dict, f64: bool, workdir: Path, target: str, timeout: float) -> Path:
    """Compile as `hxc compile` does: through hxc's driver, with its flags and its
    fallback to safer flags. (`timeout` is enforced by the parent killing this worker
    and its process group.)"""
    from hxc.compiler.build import _name_source_operator
    from hxc.compiler.driver import CompileJob, compile_all
    from hxc.manifests.bundle import file_sha256
    from hxc.targets import resolve

    [variant] = resolve(target)
    [r] = compile_all([CompileJob(mlir, file_sha256(mlir), variant, f64=f64)], workdir=workdir, jobs=1)
    if r.status == "ok" and r.vmfb is not None:
        return r.vmfb
    unlowered = r.operator == "torch.operator" and "legalize" in (r.error or "")
    r = _name_source_operator(r, operators_at)
    error, operator = r.error or "", r.operator
    if "killed by signal" in error:
        category = "iree-compile crashed"
    elif unlowered:
        category = "no IREE lowering for the ONNX op"
    else:
        category = "IREE compile error (after lowering)"
    raise Outcome("fail", category, error, operator)


def _invoke(vmfb: Path, inputs: list, signature) -> list:
    """Run the artifact through hxc's runtime session (its host<->device copies, which
    keep scalars scalar) on the CPU driver. The loader's input checks are left out:
    they refuse empty inputs, which some node tests feed (an empty axes list)."""
    from hxc.runtime.loader import Session
    from hxc.targets import Device

    session = Session.open(vmfb, Device("local-sync", "local-sync", "cpu", "cpu"))
    return session.invoke(list(inputs), signature)


# --- many tests, in worker processes -------------------------------------------------


def run_conformance(
    cases: Sequence[Path],
    *,
    jobs: int = 2,
    timeout: float = 300,
    target: str = TARGET,
    on_result: Callable[[CaseResult], None] = lambda r: None,
    worker: Sequence[str] = ("-m", __name__),
) -> list[CaseResult]:
    """Run `cases` in `jobs` worker processes (so a crash or a hang costs one test, not
    the run); results come back in the order of `cases`. `worker` is what python runs
    as the worker (`-m MODULE` or a script) with `--worker --target T`: one case path
    per line of stdin, one marked JSON result per line of stdout (`worker_loop`)."""
    todo: queue.Queue[tuple[int, Path]] = queue.Queue()
    for item in enumerate(cases):
        todo.put(item)
    results: list[CaseResult | None] = [None] * len(cases)

    def worker_thread() -> None:
        proc = None
        while True:
            try:
                i, case = todo.get_nowait()
            except queue.Empty:
                break
            if proc is None or proc.poll() is not None:
                proc = _start_worker(target, worker)
            timer = threading.Timer(timeout, _kill_group, (proc,))
            timer.start()
            t0 = time.perf_counter()
            try:
                proc.stdin.write(f"{case}\n")
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
                result = CaseResult(case.name, "fail", "timeout" if killed else "crash", seconds=round(time.perf_counter() - t0, 3))
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


def _start_worker(target: str, worker: Sequence[str]) -> subprocess.Popen:
    env = {**os.environ, "IREE_PY_RUNTIME_FLAGS": os.environ.get("IREE_PY_RUNTIME_FLAGS", "")}
    return subprocess.Popen(
        [sys.executable, *worker, "--worker", "--target", target],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip


def worker_loop(target: str, run: Callable[[Path, Path, str], CaseResult] = lambda c, w, t: run_case(c, w, t)) -> None:
    """A worker process: one case path per line of stdin, one marked JSON result per line of stdout."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    for line in sys.stdin:
        case = Path(line.strip())
        with tempfile.TemporaryDirectory(prefix="hxc-conformance-") as work:
            result = run(case, Path(work), target)
        sys.stdout.write(_MARK + json.dumps(asdict(result)) + "\n")
        sys.stdout.flush()


# --- summary -------------------------------------------------------------------------


def summarize(results: Sequence[CaseResult]) -> dict:
    ran = [r for r in results if r.status != "skip"]
    passed = [r for r in ran if r.status == "pass"]
    failed = [r for r in ran if r.status == "fail"]
    ops = Counter(r.operator for r in failed if r.category == "no IREE lowering for the ONNX op" and r.operator)
    return {
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


if __name__ == "__main__":  # a worker process, started by run_conformance
    worker_loop(sys.argv[sys.argv.index("--target") + 1])

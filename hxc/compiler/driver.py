"""Run iree-compile once per job (input IR x target variant x precision), in parallel,
through the cache.

Each compile is its own iree-compile process, so targets compile in parallel on all
cores and one crashing compile cannot take the others down. A failure is kept as a
result (with the argv and stderr that reproduce it), never raised, so the caller
decides what a partial result means. Ctrl-C kills every running compile.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Literal

from hxc.compiler.cache import CompileCache
from hxc.manifests.schema import STAGE_MARK, FileHash, Requirements, Signature, TuningTrial
from hxc.targets import CompilePlan, Variant, family
from hxc.targets.base import KEEP_F64, CheckFailed

log = logging.getLogger("hxc.compiler")


@dataclass(frozen=True)
class CompileJob:
    """One iree-compile run: an input IR for one target variant at one precision."""

    ir: Path
    ir_sha256: str
    variant: Variant
    precision: str = "fp32"
    # A tuning alternative: its name and the full flags that replace the family's plan.
    config: str = "default"
    flags: tuple[str, ...] | None = None
    # Expert flags from `--iree-flag`, appended to whatever the family chose; they are
    # part of the recorded flags and the cache key like any other.
    extra: tuple[str, ...] = ()
    # The interface casts its IR was built with (Artifact.interface_casts).
    casts: tuple[tuple[str, str], ...] = ()
    # Whether its IR takes or returns f64 tensors (see `f64_interface`).
    f64: bool = False
    stage: int | None = None  # the stage of a staged model its IR computes (Artifact.stage)

    @property
    def id(self) -> str:
        """Artifact id: `cpu:host`, `cpu:host@fp16` for a reduced-precision variant, and
        `cpu:host#s1` for a stage."""
        base = self.variant.id if self.precision == "fp32" else f"{self.variant.id}@{self.precision}"
        return base if self.stage is None else f"{base}{STAGE_MARK}{self.stage}"

    @property
    def label(self) -> str:
        return self.id if self.config == "default" else f"{self.id} [{self.config}]"

    @property
    def file_stem(self) -> str:
        stem = f"{self.variant.family}-{self.variant.name}"
        stem = stem if self.precision == "fp32" else f"{stem}-{self.precision}"
        stem = stem if self.stage is None else f"{stem}-s{self.stage}"
        return stem if self.config == "default" else f"{stem}.{self.config}"


@dataclass(frozen=True)
class CompileResult:
    job: CompileJob
    plan: CompilePlan
    status: Literal["ok", "failed"]
    seconds: float
    argv: tuple[str, ...]
    vmfb: Path | None = None
    hash: FileHash | None = None  # of `vmfb`; the bundle's copy must match it
    cached: bool = False
    verified: str | None = None
    error: str | None = None  # one line
    operator: str | None = None  # the operator that failed to lower, when known
    location: str | None = None  # file:line in the model's source where it failed
    stderr: str = ""
    tuning: tuple[TuningTrial, ...] = ()  # set by `hxc compile --tune`
    fallback: str | None = None  # why the family's safer flags were used: the default flags' error
    requires: Requirements | None = None  # what the binaries need, when they say more than the plan

    @property
    def requirements(self) -> Requirements:
        return self.requires or self.plan.requires

    @property
    def variant(self) -> Variant:
        return self.plan.variant

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def file(self) -> Path | None:
        return self.vmfb


@dataclass(frozen=True)
class CompileEvent:
    kind: Literal["start", "done"]
    job: CompileJob
    result: CompileResult | None = None

    @property
    def label(self) -> str:
        return self.job.label


@functools.cache
def iree_compile_path() -> str:
    from iree.compiler.tools.binaries import find_tool

    return find_tool("iree-compile")


@functools.cache
def compiler_version() -> str:
    return metadata.version("iree-base-compiler")


# Run a command so that it dies with the thread that started it, even if hxc is
# SIGKILLed (PR_SET_PDEATHSIG survives exec). If hxc died before prctl took effect the
# parent has already changed: exit instead of compiling for nobody.
_DIE_WITH_PARENT = (
    "import ctypes,os,sys;ppid=int(sys.argv[1]);ctypes.CDLL(None).prctl(1,9);"
    "os.getppid()==ppid or os._exit(1);os.execv(sys.argv[2],sys.argv[2:])"
)


def die_with_parent(argv: Sequence[str]) -> list[str]:
    """`argv`, wrapped so the process is killed when hxc goes away (Linux)."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]


class _Processes:
    """Running iree-compile processes, so an interrupt can kill them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self.cancelled = False

    def run(self, argv: list[str]) -> tuple[int, str]:
        with self._lock:
            if self.cancelled:
                return -1, "cancelled"
            proc = subprocess.Popen(die_with_parent(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            self._procs.add(proc)
        try:
            _, stderr = proc.communicate()
            return proc.returncode, stderr
        finally:
            with self._lock:
                self._procs.discard(proc)

    def kill_all(self) -> None:
        with self._lock:
            self.cancelled = True
            for p in self._procs:
                p.kill()


def f64_interface(signature: Signature) -> bool:
    """Whether a function takes or returns f64 tensors, which IREE must then not demote."""
    return any(t.dtype == "f64" for t in (*signature.inputs, *signature.outputs))


def compile_all(
    work: Sequence[CompileJob],
    *,
    workdir: Path,
    jobs: int | None = None,
    cache: CompileCache | None = None,
    on_event: Callable[[CompileEvent], None] = lambda e: None,
) -> list[CompileResult]:
    """Run every compile job in `work`, `jobs` at a time (default: one per core);
    results come back in the order of `work`. Artifacts land in `workdir` (or stay in
    the cache, for hits)."""
    cache = cache or CompileCache(None)
    procs = _Processes()
    jobs = max(1, jobs or os.cpu_count() or 1)

    def one(job: CompileJob) -> CompileResult:
        on_event(CompileEvent("start", job))
        result = _compile_one(job, workdir, cache, procs)
        on_event(CompileEvent("done", job, result))
        return result

    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="iree-compile")
    try:
        futures = [pool.submit(one, j) for j in work]
        return [f.result() for f in futures]
    except BaseException:
        procs.kill_all()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _compile_one(job: CompileJob, workdir: Path, cache: CompileCache, procs: _Processes) -> CompileResult:
    t0 = time.perf_counter()
    variant = job.variant
    fam = family(variant.family)
    plan = fam.plan(variant)
    if job.flags is not None:
        plan = replace(plan, flags=job.flags)
    if not job.f64:
        # Keeping f64 is for f64 interfaces only: inside a model IREE's demotion is what
        # plain IREE does, and kept f64 scalars break CUDA reductions ("failed to
        # distribute" at every layer_norm).
        plan = replace(plan, flags=tuple(f for f in plan.flags if f != KEEP_F64))
    if job.flags is None and (extra := fam.precision_flags(job.precision)):
        plan = replace(plan, flags=(*plan.flags, *extra))
    if job.extra:
        plan = replace(plan, flags=(*plan.flags, *job.extra))
    result = _compile_plan(job, plan, workdir, cache, procs, t0)
    if result.status != "failed" or job.config != "default":
        return result
    # A flag chosen for speed must never cost a model: retry with the family's safer
    # flag sets in order (the last is what IREE does by default), and record why.
    for safer in fam.fallback_flags(plan):
        if procs.cancelled:
            break
        if safer == plan.flags:
            continue
        retry = _compile_plan(job, replace(plan, flags=safer), workdir, cache, procs, t0)
        if retry.status != "failed":
            log.info("hxc: %s: default flags failed (%s); compiled with safer flags", job.id, result.error)
            return replace(retry, fallback=result.error)
    return result


def _compile_plan(
    job: CompileJob, plan: CompilePlan, workdir: Path, cache: CompileCache, procs: _Processes, t0: float
) -> CompileResult:
    fam = family(job.variant.family)
    variant = job.variant
    # The variant and the check are part of the key: two variants may share flags but not
    # the check that proves their binary (cuda:sm_80 and cuda:sm_90 compile the same
    # PTX), and PTX cached unchecked must not pass for checked once ptxas is installed.
    key = CompileCache.key(job.ir_sha256, (variant.id, plan.checked_by or "unchecked", *plan.flags), compiler_version())
    out = workdir / f"{job.file_stem}.vmfb"
    argv = (iree_compile_path(), str(job.ir), *plan.flags, "-o", str(out))
    hit = cache.get(key)
    if hit is not None:
        return CompileResult(job, plan, "ok", time.perf_counter() - t0, argv, hit.vmfb, hit.hash, cached=True,
                             verified=hit.verified, requires=hit.requires)  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="hxc-bin-", dir=workdir) as tmp:
        bins, configured = Path(tmp) / "binaries", Path(tmp) / "configured"
        dump = [f"--iree-hal-dump-executable-binaries-to={bins}"] if plan.dump_binaries else []
        configs = [f"--iree-hal-dump-executable-configurations-to={configured}"] if plan.dump_configurations else []
        code, stderr = procs.run([*argv, *dump, *configs])
        try:
            amendment = fam.amend_configurations(plan, configured) if code == 0 and plan.dump_configurations else None
            if amendment is not None and amendment.rewrite is not None:
                shutil.rmtree(bins, ignore_errors=True)
                code, stderr = _compile_amended(argv, dump, amendment.rewrite, Path(tmp), procs)
            if code != 0:
                error, operator, location = summarize_compile_error(stderr, code)
                _save_temps(job, argv, stderr)
                return CompileResult(job, plan, "failed", time.perf_counter() - t0, argv, error=error, operator=operator,
                                     location=location, stderr=stderr)  # fmt: skip
            verified = "; ".join(x for x in (fam.check(plan, bins), amendment and amendment.note) if x) or None
        except CheckFailed as e:
            out.unlink(missing_ok=True)
            return CompileResult(job, plan, "failed", time.perf_counter() - t0, argv, error=str(e), stderr=stderr)
        requires = fam.binary_requirements(plan, bins if plan.dump_binaries else None)
    stored = cache.put(key, out, verified, requires)
    return CompileResult(job, plan, "ok", time.perf_counter() - t0, argv, out, stored, verified=verified, stderr=stderr,
                         requires=requires)  # fmt: skip


def _compile_amended(
    argv: tuple[str, ...], dump: list[str], rewrite: Callable[[str], str], tmp: Path, procs: _Processes
) -> tuple[int, str]:
    """The compile `argv` again in two steps, the family's `rewrite` of IREE's configured
    module between them: up to the configured executables, then on from there (same
    flags, same output, binaries dumped again)."""
    exe, ir, *flags, _, out = argv
    configured, amended = tmp / "configured-module.mlir", tmp / "amended-module.mlir"
    code, stderr = procs.run([exe, ir, *flags, "--compile-to=executable-configurations", "-o", str(configured)])
    if code != 0:
        return code, stderr
    amended.write_text(rewrite(configured.read_text()))
    configured.unlink()
    return procs.run([exe, str(amended), *flags, "--compile-from=executable-configurations", "-o", out, *dump])


_LOCATION = re.compile(r"^(?P<file>[^\s:][^:]*):(?P<line>\d+):\d+:\s*")
_OPAQUE = re.compile(r'name = "torch\.(aten\.[\w.]+)"')
_LEGALIZE = re.compile(r"failed to legalize operation '([\w.]+)'")
_OP = re.compile(r"'([a-z_][\w]*\.[\w.]+)' op\b")


def summarize_compile_error(stderr: str, code: int) -> tuple[str, str | None, str | None]:
    """From iree-compile's stderr: one line for the user, the operator it names (an
    aten op when the torch frontend lacks a conversion, else the IREE-internal op), and
    the model source location (file:line) the failing op came from."""
    errors = [line for line in stderr.splitlines() if "error:" in line]
    if not errors:
        if code < 0:
            return f"iree-compile was killed by signal {-code}", None, None
        tail = [line for line in stderr.strip().splitlines() if line.strip()]
        return (tail[-1] if tail else f"iree-compile exited with code {code}")[:400], None, None
    first = errors[0]
    m = _LOCATION.match(first)
    location = f"{m.group('file')}:{m.group('line')}" if m else None
    text = _LOCATION.sub("", first).removeprefix("<unknown>:0:").replace("error: ", "", 1).strip()
    if m := _OPAQUE.search(first):
        return f"no IREE lowering for {m.group(1)}", m.group(1), location
    operator = None
    if m := (_LEGALIZE.search(first) or _OP.search(first)):
        operator = m.group(1)
        text = text.split(" that was explicitly marked illegal")[0] + (f" ({_ir_snippet(first)})" if "illegal:" in first else "")
    if len(text) > 300:
        text = text[:297] + "..."
    return text, operator, location


def _ir_snippet(line: str) -> str:
    # "...illegal: %22 = "vector.broadcast"(%21) : (i64) -> vector<1xi64>" -> "(i64) -> vector<1xi64>"
    types = line.rsplit(" : ", 1)
    return types[1].strip() if len(types) == 2 else ""


def _save_temps(job: CompileJob, argv: tuple[str, ...], stderr: str) -> None:
    """With HXC_SAVE_TEMPS=DIR, keep what reproduces a failed compile."""
    root = os.environ.get("HXC_SAVE_TEMPS")
    if not root:
        return
    d = Path(root) / job.file_stem
    d.mkdir(parents=True, exist_ok=True)
    ir = job.ir
    shutil.copyfile(ir, d / ir.name)
    cmd = [argv[0], ir.name, *argv[2:-2], "-o", "out.vmfb"]
    (d / "reproduce.sh").write_text("#!/bin/sh\ncd \"$(dirname \"$0\")\"\n" + shlex.join(cmd) + "\n")
    (d / "stderr.txt").write_text(stderr)

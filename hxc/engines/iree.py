"""IREE: the portable core. Builds for every target family (through the compile
driver, one iree-compile per target variant, in parallel, through the compile cache)
and runs on IREE's HAL devices: the session below holds one module on one device, its
entry points and its state."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hxc.compiler.cache import CompileCache
from hxc.compiler.driver import CompileEvent, CompileJob, CompileResult, compile_all, f64_interface
from hxc.engines.base import (TRANSFERS, BuildContext, BuildJob, Built, Engine, Session, empty_at_run_time,
                              empty_outputs)
from hxc.errors import HxcError
from hxc.manifests.bundle import CheckedFile
from hxc.manifests.schema import ARTIFACTS_DIR, MAIN, Artifact, FunctionSpec, Signature, StateSpec
from hxc.targets import Device, families, family, family_names

log = logging.getLogger("hxc.runtime")


ENGINE_NAME = "iree"


class IreeEngine(Engine):
    name = ENGINE_NAME
    summary = "IREE: one artifact per target variant (CPU, CUDA, ROCm, Vulkan), from the project's own compiler"
    families = family_names()
    precisions = ("fp32", "fp16", "bf16", "int8", "int4")
    build_needs = ("iree.compiler",)
    run_needs = ("iree.runtime",)
    install_hint = "pip install 'hxc[compile]'"  # the runtime is in every install; the compiler is the extra

    def build_all(self, jobs: Sequence[BuildJob], ctx: BuildContext) -> list[Built]:
        """Every variant at once: one iree-compile process per job, `ctx.parallel` at a
        time, through the compile cache; then, with `--tune`, each artifact this host
        can run is tuned. A job whose IR could not be made (`job.error`) fails alone.
        Artifacts are not run on the golden sample here: their family's own check
        proves what it can (ptxas for CUDA) and `hxc verify` runs them."""
        compile_jobs = [_compile_job(j) for j in jobs]
        ready = [c for c, j in zip(compile_jobs, jobs) if j.error is None]
        compiled = iter(compile_all(ready, workdir=ctx.workdir, jobs=ctx.parallel, cache=ctx.cache, on_event=ctx.on_event))
        out = []
        for c, job in zip(compile_jobs, jobs):
            if job.error is None:
                r = _name_source_operator(next(compiled), job.ir.operators_at if job.ir is not None else {})
            else:
                r = CompileResult(c, family(c.variant.family).plan(c.variant), "failed", 0.0, (), error=job.error,
                                  operator=_operator_of(job.error))  # fmt: skip
                ctx.on_event(CompileEvent("done", c, r))
            out.append(_built(r))
        if ctx.tune is not None:
            out = [ctx.tune(b, job, ctx) if b.status == "ok" else b for b, job in zip(out, jobs)]
        return out

    def build(self, job: BuildJob, ctx: BuildContext | None = None) -> Built:
        [built] = self.build_all([job], ctx or BuildContext(job.workdir, CompileCache(None)))
        return built

    def tuning_configs(self, built: Built) -> list[tuple[str, tuple[str, ...]]]:
        """The family's alternative flag sets (`TargetFamily.tuning_configs`)."""
        r: CompileResult = built.record
        return [(name, flags) for name, flags in family(built.family).tuning_configs(r.plan)]

    def alternatives(self, built: Built, job: BuildJob, configs: Sequence[tuple[str, tuple[str, ...]]],
                     ctx: BuildContext) -> list[Built]:  # fmt: skip
        """Compiled again with each flag set, in parallel; whichever wins goes into the
        bundle under the artifact's own name."""
        r: CompileResult = built.record
        alt = [dataclasses.replace(r.job, config=name, flags=flags) for name, flags in configs]
        results = compile_all(alt, workdir=ctx.workdir, jobs=ctx.parallel, cache=ctx.cache, on_event=ctx.on_event)
        return [dataclasses.replace(_built(a), bundle_name=built.bundle_name) for a in results]

    def open(self, artifact: Artifact, file: Any, device: Device, weights: tuple[Any, str] | None) -> Session:
        return IreeSession.open(file, device, weights)


def _compile_job(job: BuildJob) -> CompileJob:
    assert job.variant is not None and job.ir is not None, "an IREE build job names its variant and IR"
    return CompileJob(job.ir.mlir, job.ir_sha256, job.variant, job.precision, extra=job.flags, casts=job.casts,
                      f64=f64_interface(job.ir.interface), stage=job.stage)  # fmt: skip


def _built(r: CompileResult) -> Built:
    """A compile result as every engine's build record."""
    job, fam = r.job, family(r.job.variant.family)
    ok = r.status == "ok" and r.vmfb is not None
    return Built(
        engine=ENGINE_NAME, family=fam.name, variant=job.variant.name, precision=job.precision,
        status="ok" if ok else "failed", seconds=r.seconds, backend=fam.backend, driver=fam.drivers[0],
        binary=r.plan.binary, options=r.plan.flags, requires=r.requirements, file=r.vmfb,
        bundle_name=f"{ARTIFACTS_DIR}/{job.file_stem}.vmfb" if ok else None, verified=r.verified, error=r.error,
        tuning=r.tuning, cached=r.cached, fallback=r.fallback, interface_casts=job.casts, operator=r.operator,
        hash=r.hash, stage=job.stage, record=r,
    )  # fmt: skip


def _operator_of(message: str) -> str | None:
    m = re.search(r"\b(aten\.[\w.]+)", message)
    return m.group(1) if m else None


def _name_source_operator(r: CompileResult, operators_at: dict[str, tuple[str, ...]]) -> CompileResult:
    """A backend names its own internal op (`vector.broadcast`); the user needs the
    model's operator and the line of their model it came from."""
    if r.status != "failed" or r.location not in operators_at or (r.operator or "").startswith("aten."):
        return r
    ops = ", ".join(operators_at[r.location])
    return dataclasses.replace(r, operator=ops, error=f"cannot lower {ops} (at {Path(r.location).name}): {r.error}")


ENGINE = IreeEngine()


# Threads that poll while a device is idle: with IREE 3.13 on lavapipe, each Vulkan
# device gets two threads that wait for "any of" several semaphores, which Mesa 22's
# lavapipe implements by polling in a loop (vkWaitSemaphores with WAIT_ANY on syncs
# without native wait-any): two cores burnt for as long as the process holds the device,
# idle or not, taking them from every other device and process on the host.
SPIN_SAMPLES = 8  # looks at the new threads' states, 5 ms apart


def _hal_device(device: Device) -> Any:
    """IREE's device for `device` (cached by IREE: one per URI per process). Threads the
    Vulkan driver starts and leaves polling are moved to SCHED_IDLE: they then run only
    on a core nothing else wants, which is where a device that just finished its work
    leaves them, so a call's completion is still seen at once on an idle host.

    In a process pinned to some of the cores (a pool's lavapipe worker, `pin=`), the
    calling thread waits by polling too, at normal priority, on the same cores, and a
    SCHED_IDLE poller starved during calls: completions were seen 0.2-1.5 s late (the
    CNN, 4 rows on one core: median 0.76 s a call). There the pollers are recorded in
    `_AWAKE` and run at nice 19 for the length of each call (`_awake`): 0.12-0.40 s,
    median 0.26 s (0.33 s at normal priority); between calls they stay SCHED_IDLE."""
    import iree.runtime as rt

    if device.driver != "vulkan" or not hasattr(os, "SCHED_IDLE"):
        return rt.get_device(device.uri)
    before = set(_thread_states())
    hal_device = rt.get_device(device.uri)
    # A thread of an idle device should be asleep; one found running or runnable at every
    # look is polling (by state, not by CPU time, which a busy host would hide).
    polling = set(_thread_states()) - before
    for _ in range(SPIN_SAMPLES):
        if not polling:
            break
        time.sleep(0.005)
        states = _thread_states()
        polling = {t for t in polling if states.get(t) == "R"}
    moved = []
    for tid in polling:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 19)  # kept under SCHED_IDLE, used by _awake
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            moved.append(tid)
            log.debug("thread %d of %s polls while idle: moved to SCHED_IDLE", tid, device.uri)
        except OSError:
            pass
    if moved and len(os.sched_getaffinity(0)) < (os.cpu_count() or 1):
        _AWAKE[device.uri] = tuple(moved)
    return hal_device


# Per device URI: polling threads that must run during calls (see _hal_device).
_AWAKE: dict[str, tuple[int, ...]] = {}


@contextlib.contextmanager
def _awake(threads: tuple[int, ...]) -> Iterator[None]:
    """The polling threads at normal policy (their nice 19) while a call runs."""
    if not threads:
        yield
        return
    _set_policy(threads, os.SCHED_OTHER)
    try:
        yield
    finally:
        _set_policy(threads, os.SCHED_IDLE)


def _set_policy(threads: tuple[int, ...], policy: int) -> None:
    for tid in threads:
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
        except OSError:
            pass


def _thread_states() -> dict[int, str]:
    """The scheduler state (R running or runnable, S sleeping, ...) of each thread of this process."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                out[int(tid)] = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # the thread ended meanwhile
    return out


class IreeSession:
    """One vmfb loaded on one IREE device: its context and entry points; the IREE
    engine's session, one implementation of `hxc.engines.base.Session` among several.
    `load()` builds these after checking the bundle; `hxc compile --tune` uses them
    directly on freshly compiled candidates. State values are IREE buffer views: what a
    function returns is passed straight back into the next call, on the device."""

    def __init__(self, device: Any, context: Any, module: Any, keep_alive: tuple, host_memory: bool = False,
                 awake: tuple[int, ...] = (), empty_dispatch: bool = True, label: str = "the device") -> None:  # fmt: skip
        self.device = device
        self.context = context
        self.module = module
        self._functions: dict[str, Any] = {}
        self._call_transfers: dict[str, Any] = {}
        # `main`, what invoke() and prepare() call; None in a module of other functions.
        self.function = self._lookup(MAIN, required=False)
        self.device_seconds = 0.0  # of the last invoke(), copies to and from the device excluded
        self.host_memory = host_memory
        self._awake = awake  # polling threads to wake for each call (see _hal_device)
        self.borrow_inputs = False  # see LoadedModel.borrow_inputs
        self.empty_dispatch = empty_dispatch  # see TargetFamily.empty_dispatch
        self.label = label
        self._last_transfers: Any = None
        from hxc.engines import _iree_io

        self._io = _iree_io  # imported with the first session: it imports iree.runtime
        # The mapped module, the parameter index and its provider must outlive the
        # context that reads from them.
        self._keep_alive = keep_alive

    @classmethod
    def open(
        cls, vmfb: Path | CheckedFile, device: Device, weights: tuple[Path | CheckedFile, str] | None = None
    ) -> IreeSession:
        """A bundle's checked files run from the checked bytes; a plain path (a fresh
        build being tuned, not yet in a bundle) is mapped by IREE itself."""
        import iree.runtime as rt

        from hxc.engines import _iree_io

        hal_device = _hal_device(device)
        instance = _instance()
        if isinstance(vmfb, CheckedFile):
            module = rt.VmModule.wrap_buffer(instance, vmfb.buffer)
        else:
            module = rt.VmModule.mmap(instance, str(vmfb))
        modules = [rt.create_hal_module(instance, hal_device)]
        keep_alive: tuple = (vmfb, module)
        if weights is not None:
            # The archive stays mapped; parameters are read (or imported) by the
            # device when the module initialises.
            source, scope = weights
            index = rt.ParameterIndex()
            if isinstance(source, CheckedFile):
                index.load_from_file_handle(rt.FileHandle.wrap_memory(source.buffer), "irpa")
            else:
                index.load(str(source))
            provider = index.create_provider(scope=scope)
            modules.append(rt.create_io_parameters_module(instance, provider))
            keep_alive = (vmfb, module, source, index, provider)
        context = rt.VmContext(instance, modules=[*modules, module])
        empty_dispatch = all(f.empty_dispatch for f in families() if device.driver in f.drivers)
        return cls(hal_device, context, module, keep_alive, host_memory=device.driver in _iree_io.HOST_MEMORY_DRIVERS,
                   awake=_AWAKE.get(device.uri, ()), empty_dispatch=empty_dispatch, label=device.label)  # fmt: skip

    def _lookup(self, name: str, required: bool = True) -> Any:
        # lookup_function on the very VmModule that went into the context (IREE_NOTES).
        if name not in self._functions:
            self._functions[name] = self.module.lookup_function(name)
        if self._functions[name] is None and required:
            raise HxcError(f"this artifact has no function {name!r}")
        return self._functions[name]

    def call(self, function: str, arrays: list[np.ndarray], spec: FunctionSpec,
             state: Mapping[str, Any] | None = None) -> tuple[list[np.ndarray], dict[str, Any]]:  # fmt: skip
        """`spec` as the artifact has it (interface casts applied). The state it reads is
        pushed after the inputs as the buffer views given; the state it writes comes back
        as the buffer views the function returned, left on the device."""
        if not spec.reads and not spec.writes and function == MAIN:
            return self.invoke(arrays, spec.signature), {}
        state = state or {}
        if missing := [s.name for s in spec.reads if s.name not in state]:
            raise HxcError(f"function {function!r} reads state {', '.join(missing)}, which this call was not given")
        fn = self._lookup(function)
        t = self._call_transfers.get(function)
        if t is None or t.signature is not spec.signature:
            t = self._call_transfers[function] = self._io.Transfers(self.device, self.host_memory, spec.signature)
        n = len(spec.signature.outputs)
        with _awake(self._awake):
            args = t.upload(arrays, self.borrow_inputs, extra=len(spec.reads))
            for s in spec.reads:
                args.push_ref(state[s.name])
            results = self._io.rt.VmVariantList(n + len(spec.writes))
            t0 = time.perf_counter()
            self.context.invoke(fn, args, results)
            self.device_seconds = time.perf_counter() - t0
            outputs = t.download(results)
            view = self._io.rt.HalBufferView
            written = {s.name: results.get_as_object(n + i, view) for i, s in enumerate(spec.writes)}
        return outputs, written

    def _main(self) -> Any:
        if self.function is None:
            raise HxcError(f"this artifact has no function {MAIN!r}", hint="call one of its functions by name")
        return self.function

    def state_zeros(self, spec: StateSpec) -> Any:
        from hxc.dtypes import dtype

        return self.state_from_host(np.zeros(spec.shape, dtype(spec.dtype).numpy_dtype()), spec)

    def state_from_host(self, array: np.ndarray, spec: StateSpec) -> Any:
        TRANSFERS.state_to_device += 1
        with _awake(self._awake):
            return self._io.to_device(self.device, array, spec.dtype)

    def state_to_host(self, value: Any, spec: StateSpec) -> np.ndarray:
        TRANSFERS.state_to_host += 1
        with _awake(self._awake):
            return self._io.to_host(self.device, value, spec.dtype)

    def _transfers(self, signature: Signature) -> Any:
        # Callers pass the same signature object every time (the artifact's), so one
        # slot, checked by identity (not by hashing the signature), is enough.
        t = self._last_transfers
        if t is None or t.signature is not signature:
            t = self._last_transfers = self._io.Transfers(self.device, self.host_memory, signature)
        return t

    def _answered(self, arrays: list[np.ndarray], signature: Signature) -> list[np.ndarray] | None:
        """The outputs of a call this device cannot run (a dimension that is 0 at run time
        on a driver without empty dispatches) when the inputs' shapes alone make every
        output empty; None when the device is to be called."""
        if self.empty_dispatch or not empty_at_run_time(signature, arrays):
            return None
        return empty_outputs(signature, arrays)

    def _refused(self, e: Exception, arrays: list[np.ndarray], signature: Signature) -> Exception:
        """IREE's error for a dispatch over an empty buffer as a one-line HxcError that
        says why; any other error as it is."""
        if "empty buffer range" not in str(e):
            return e
        shapes = ", ".join(f"{s.name} {'x'.join(map(str, a.shape)) or 'scalar'}" for s, a in zip(signature.inputs, arrays))
        return HxcError(f"{self.label} cannot run this call: a dimension is 0 at run time ({shapes}), and this driver "
                        "cannot dispatch over empty buffers; not every output is empty by its shape alone, so hxc "
                        "cannot answer it without the device", hint="run it on a CPU artifact (device='cpu')")  # fmt: skip

    def prepare(self, arrays: list[np.ndarray], signature: Signature) -> Callable[[], None]:
        if self._answered(arrays, signature) is not None:
            return lambda: None  # nothing to compute: see _answered
        t = self._transfers(signature)
        with _awake(self._awake):
            args, results = t.upload(arrays), t.results
        context, function = self.context, self._main()
        awake = self._awake

        def call() -> None:
            # `main` is the synchronous entry point: it returns once the device is done.
            with _awake(awake):
                context.invoke(function, args, results())

        return call

    def invoke(self, arrays: list[np.ndarray], signature: Signature) -> list[np.ndarray]:
        answered = self._answered(arrays, signature)
        if answered is not None:
            self.device_seconds = 0.0
            return answered
        t = self._transfers(signature)
        with _awake(self._awake):  # copies to and from the device wait on it too
            args = t.upload(arrays, self.borrow_inputs)
            results = t.results()
            t0 = time.perf_counter()
            try:
                self.context.invoke(self.function or self._main(), args, results)
            except Exception as e:
                raise self._refused(e, arrays, signature) from None
            self.device_seconds = time.perf_counter() - t0
            return t.download(results)


@functools.cache
def _instance() -> Any:
    # One VM instance per process, as IREE recommends; contexts are per model.
    import iree.runtime as rt

    return rt.VmInstance()



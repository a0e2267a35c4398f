"""What every engine provides, and the records it shares with the rest of hxc.

An engine (IREE, ONNX Runtime, AOTInductor) is one module in this package exposing
`ENGINE`, an instance of an `Engine` subclass. It owns what differs between them:
which target families it builds for, what it needs installed to build and to run,
how it turns an imported model into an artifact file, what a host must have to run
that file (beyond the family's own checks), and how to open it as a `Session`.
The loader checks a file's integrity before handing it to an engine, once, for all.
"""

from __future__ import annotations

import importlib.util
import sys
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from hxc.compiler.cache import CompileCache
from hxc.compiler.imported import ImportedModel
from hxc.dtypes import dtype
from hxc.errors import HxcError
from hxc.manifests.schema import MAIN, STAGE_MARK, Artifact, FileHash, FunctionSpec, Requirements, Signature, StateSpec, TuningTrial
from hxc.targets import Device, Variant

DEFAULT_ENGINE = "iree"


class Session(Protocol):
    """One artifact opened for one device: what `LoadedModel` calls.

    `call(function, arrays, spec, state)` is the contract: host arrays in for the
    function's inputs, and the values of the state it reads as this engine's own
    device-resident handles (IREE buffer views); host arrays out for its outputs, and
    the state it writes as new handles, never copied to the host unless asked
    (`state_to_host`). `spec` is the function's `FunctionSpec` as the artifact has it
    (interface casts applied). `invoke` is `call` of a stateless `main`, the common
    path, kept without the state bookkeeping."""

    # Seconds the last call spent in the engine itself, conversions to and from host
    # arrays excluded: what pool workers report as device time.
    device_seconds: float

    def call(self, function: str, arrays: list[np.ndarray], spec: FunctionSpec,
             state: Mapping[str, Any] | None = None) -> tuple[list[np.ndarray], dict[str, Any]]:  # fmt: skip
        ...

    def invoke(self, arrays: list[np.ndarray], signature: Signature) -> list[np.ndarray]:
        """Host arrays in, host arrays out (flat, in signature order)."""
        ...

    def prepare(self, arrays: list[np.ndarray], signature: Signature) -> Callable[[], None]:
        """A zero-argument call on inputs already where the engine wants them, whose
        results stay there: what `hxc bench` times."""
        ...

    def state_zeros(self, spec: StateSpec) -> Any:
        """A new device-resident value of `spec`, all zeros."""
        ...

    def state_from_host(self, array: np.ndarray, spec: StateSpec) -> Any:
        ...

    def state_to_host(self, value: Any, spec: StateSpec) -> np.ndarray:
        ...


@dataclass
class TransferCounts:
    """Host<->device copies made by hxc's transfer layer in this process: inputs and
    outputs of calls, and state moved in or out. State that stays on the device between
    calls never adds to `state_to_device` or `state_to_host`."""

    to_device: int = 0  # input arrays copied to a device
    to_host: int = 0  # output arrays copied back
    state_to_device: int = 0  # state values copied in from the host (zeros allocated, imported)
    state_to_host: int = 0  # state values read back (exported)

    def snapshot(self) -> TransferCounts:
        return dataclasses.replace(self)


TRANSFERS = TransferCounts()


class StatelessSession:
    """What the sessions of engines that build only a stateless `main` share: the call
    contract for that one function, and a one-line refusal for anything else."""

    engine_name = "this engine"

    def call(self, function: str, arrays: list[np.ndarray], spec: FunctionSpec,
             state: Mapping[str, Any] | None = None) -> tuple[list[np.ndarray], dict[str, Any]]:  # fmt: skip
        if function != MAIN or state or spec.reads or spec.writes:
            raise HxcError(f"{self.engine_name} artifacts have one function, {MAIN}, without state; not {function!r}")
        return self.invoke(arrays, spec.signature), {}  # type: ignore[attr-defined]

    def _no_state(self, *_: Any) -> Any:
        raise HxcError(f"{self.engine_name} artifacts keep no state on the device")

    state_zeros = state_from_host = state_to_host = _no_state


def artifact_id(family: str, variant: str, precision: str, stage: int | None = None) -> str:
    """`cpu:host@fp16`; `cpu:onnxruntime`, `cpu:inductor@bf16`: other engines take the
    variant's place, so ids read like IREE's and `@` keeps its meaning; `cpu:host#s1`:
    stage 1 of a staged model."""
    base = f"{family}:{variant}"
    base = base if precision == "fp32" else f"{base}@{precision}"
    return base if stage is None else f"{base}{STAGE_MARK}{stage}"


def bundle_name(stem: str, precision: str, suffix: str) -> str:
    """`artifacts/onnxruntime.onnx`, `artifacts/cpu-inductor-bf16.pt2`."""
    from hxc.manifests.schema import ARTIFACTS_DIR

    return f"{ARTIFACTS_DIR}/{stem}{'' if precision == 'fp32' else '-' + precision}{suffix}"


@dataclass(frozen=True)
class BuildJob:
    """One artifact for an engine to build: the imported model for one target family
    (or, for engines that compile per variant, one variant of it) at one compute
    precision."""

    family: str
    precision: str
    program: Path | None  # the model's own program file (program.pt2 or model.onnx)
    program_name: str | None  # its name in the bundle
    program_format: str  # torch.export | torchscript | python | pickle | onnx
    weights: Path | None  # the parameter archive, when weights are shared
    golden: dict[str, np.ndarray]
    signature: Signature
    workdir: Path
    # What the same engine built for another family from the same job: engines whose
    # file serves several families (ONNX Runtime's execution providers) reuse it.
    reuse: Built | None = None
    # The model's functions when it has several or keeps state; engines that build one
    # stateless function refuse such a model with a failed build.
    functions: tuple[str, ...] = ()
    # For engines that compile IR per target variant (IREE): the variant, the model
    # imported for it (its precision and interface casts) with its IR's hash, the casts,
    # and expert compiler flags (`--iree-flag`).
    variant: Variant | None = None
    ir: ImportedModel | None = None
    ir_sha256: str = ""
    casts: tuple[tuple[str, str], ...] = ()
    flags: tuple[str, ...] = ()
    # Why the model could not be imported for this job (a variant's interface cast it
    # cannot carry): the build fails with this, and the other jobs still build.
    error: str | None = None
    stage: int | None = None  # the stage of a staged model it builds (its imported parts are that stage's)

    @property
    def from_onnx(self) -> bool:
        return self.program_format == "onnx"


def _ignore(_: Any) -> None:
    pass


@dataclass(frozen=True)
class BuildContext:
    """What every build of one bundle shares, whatever the engine."""

    workdir: Path
    cache: CompileCache  # built artifacts, by what they were built from (IREE's compiles)
    parallel: int | None = None  # builds at once (default: one per core), for engines that build in parallel
    on_event: Callable[[Any], None] = _ignore  # start/done events (CompileEvent, EngineEvent) for progress
    # Runs a fresh artifact on the golden sample where this host can (a build that
    # computes the wrong thing fails); given by the caller, which may use the runtime.
    check: Callable[[Engine, Built, BuildJob], Built] | None = None
    # `hxc compile --tune`: the same artifact with its fastest options (`hxc.bench.tune`).
    tune: Callable[[Built, BuildJob, BuildContext], Built] | None = None


@dataclass(frozen=True)
class EngineEvent:
    """Progress of an engine's build, shaped like the compile driver's CompileEvent for
    the progress display."""

    kind: str  # start | done
    label: str
    result: Built | None = None


@dataclass(frozen=True)
class Built:
    """What an engine made of a `BuildJob`: a file to put in the bundle (or a reason
    it could not), with everything the manifest records about it. Every artifact of a
    bundle, whatever its engine, is recorded from one of these (`as_artifact`)."""

    engine: str
    family: str
    precision: str
    status: Literal["ok", "failed"]
    seconds: float
    backend: str  # what executes it inside the engine (IREE's compiler backend, ONNX Runtime's execution provider)
    driver: str  # the runtime that loads it
    binary: str
    options: tuple[str, ...]  # the engine's options, as name=value, or IREE's compile flags
    requires: Requirements
    file: Path | None = None
    bundle_name: str | None = None  # where `file` goes in the bundle
    # The bundle holds these bytes already under `bundle_name` (an ONNX model is its own
    # ONNX Runtime artifact): the artifact names that file instead of a copy.
    in_bundle: bool = False
    verified: str | None = None
    error: str | None = None
    tuning: tuple[TuningTrial, ...] = ()
    variant: str = ""  # IREE's target variant; other engines take its place (`cpu:onnxruntime`)
    cached: bool = False
    fallback: str | None = None  # why safer options were used: the default ones' error
    interface_casts: tuple[tuple[str, str], ...] = ()
    operator: str | None = None  # the model's operator a failed build could not handle, when known
    hash: FileHash | None = None  # of `file`, when the engine hashed it: the bundle's copy must match
    stage: int | None = None  # the stage of a staged model it computes
    # The engine's own account of the build, for callers who want its details (IREE:
    # the compile driver's CompileResult, with the argv and stderr that reproduce it).
    record: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.variant:
            object.__setattr__(self, "variant", self.engine)

    def as_artifact(self, **recorded: Any) -> Artifact:
        """The manifest's record of it; `recorded` adds what only the bundle knows
        (file, sha256, size, precision_error)."""
        common = dict(id=self.id, family=self.family, variant=self.variant, backend=self.backend, driver=self.driver,
                      binary=self.binary, flags=self.options, requires=self.requires, precision=self.precision,
                      compile_seconds=round(self.seconds, 3), tuning=self.tuning, engine=self.engine,
                      cached=self.cached, fallback=self.fallback, interface_casts=self.interface_casts,
                      stage=self.stage)  # fmt: skip
        if self.status == "failed":
            return Artifact(status="failed", error=self.error, operator=self.operator, **common, **recorded)  # type: ignore[arg-type]
        return Artifact(status="ok", verified=self.verified, **common, **recorded)  # type: ignore[arg-type]

    @property
    def id(self) -> str:
        return artifact_id(self.family, self.variant, self.precision, self.stage)


class Engine:
    name: str
    summary: str
    families: tuple[str, ...]  # target families it builds artifacts for
    precisions: tuple[str, ...] = ("fp32",)
    build_needs: tuple[str, ...] = ()  # Python modules a build imports
    run_needs: tuple[str, ...] = ()  # Python modules its artifacts need at run time
    install_hint: str = ""
    # Where an unmeasured artifact of this engine goes in the static order, relative to
    # IREE's for the same device: IREE is the default until a bench says otherwise.
    static_rank_offset: int = 0

    def missing_for_build(self) -> str | None:
        """None if this host can build this engine's artifacts, else why not."""
        return _missing(self.build_needs, self.install_hint)

    def missing_at_runtime(self) -> str | None:
        """None if this process can run this engine's artifacts, else why not. Cheap:
        finds the modules without importing them (the loader calls this for every
        candidate, and importing torch to answer would cost a second)."""
        return _missing(self.run_needs, self.install_hint)

    def cannot_run(self, artifact: Artifact, device: Device) -> str | None:
        """Engine-specific reasons beyond the target family's (a torch build, an
        execution provider); None if there are none. Here: the Python distributions the
        artifact was built against (`requires.packages`, `name==version`), read from
        their metadata, without importing them."""
        from importlib import metadata

        for need in artifact.requires.packages:
            name, _, version = need.partition("==")
            try:
                have = metadata.version(name)
            except metadata.PackageNotFoundError:
                return f"needs {need}; {name} is not installed" + (f": {self.install_hint}" if self.install_hint else "")
            if version and have != version:
                return f"built against {name} {version}; this host has {name} {have}"
        return None

    def uses_shared_weights(self, artifact: Artifact) -> bool:
        """Whether opening the artifact reads the bundle's shared parameter archive (so
        the loader checks and hands it over)."""
        return True

    def build_all(self, jobs: Sequence[BuildJob], ctx: BuildContext) -> list[Built]:
        """Every artifact this engine is asked for in one bundle, in the order of `jobs`.
        One call takes them all because engines differ in how their builds share work:
        IREE compiles every variant at once, in parallel processes through one compile
        cache, and tunes once all are compiled; ONNX Runtime builds one file that serves
        every target family. One failing build never stops the others: it comes back
        failed.

        This default suits engines that build one artifact at a time (`build`): each is
        checked on the golden sample (`ctx.check`) and tuned (`ctx.tune`) as it comes;
        a later family at the same precision may reuse the first one built."""
        out: list[Built] = []
        first: dict[str, Built] = {}  # per precision: the first artifact built
        for job in jobs:
            if job.functions:  # several functions, or state: these engines build one stateless `main`
                out.append(Built(self.name, job.family, job.precision, "failed", 0.0, "", "", "", (), Requirements(),
                                 error=f"the {self.name} backend builds one stateless function; "
                                       f"this model has {', '.join(job.functions)}"))  # fmt: skip
                continue
            job = dataclasses.replace(job, reuse=first.get(job.precision))
            label = artifact_id(job.family, self.name, job.precision)
            ctx.on_event(EngineEvent("start", label))
            b = self.build(job)
            if b.status == "ok" and ctx.check is not None:
                b = ctx.check(self, b, job)
            if b.status == "ok" and ctx.tune is not None and job.reuse is None:
                b = ctx.tune(b, job, ctx)
            if b.status == "ok":
                first.setdefault(job.precision, b)
            ctx.on_event(EngineEvent("done", label, b))
            out.append(b)
        return out

    def build(self, job: BuildJob) -> Built:
        """One artifact, for engines that build them one at a time (see `build_all`)."""
        raise NotImplementedError(f"{type(self).__name__} builds through build_all")

    def alternatives(self, built: Built, job: BuildJob, configs: Sequence[tuple[str, tuple[str, ...]]],
                     ctx: BuildContext) -> list[Built]:  # fmt: skip
        """`built` with each of `configs` (from `tuning_configs`) instead of its own
        options, in order, for `--tune` to time; a build that fails comes back failed.
        Here the options take effect when the artifact is opened, so the file is the same."""
        return [dataclasses.replace(built, options=options) for _, options in configs]

    def open(self, artifact: Artifact, file: Any, device: Device, weights: tuple[Any, str] | None) -> Session:
        """`file` is the artifact's checked file (a path or the checked bytes' holder),
        `weights` the checked shared parameter archive and its scope, if any."""
        raise NotImplementedError

    def tuning_configs(self, built: Built) -> list[tuple[str, tuple[str, ...]]]:
        """Option sets `hxc compile --tune` times, as (name, options); the first is the
        build's own."""
        return [("default", built.options)]


def _missing(modules: tuple[str, ...], hint: str) -> str | None:
    for name in modules:
        if sys.modules.get(name, ...) is None:  # blocked on purpose (sys.modules[name] = None)
            return f"{name} cannot be imported" + (f": {hint}" if hint else "")
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"{name} not installed" + (f": {hint}" if hint else "")
    return None


def file_bytes(file: Any) -> bytes:
    """The bytes of a checked file: a path (a fresh build, not yet in a bundle) or an
    object holding the bytes that were hashed."""
    if isinstance(file, Path):
        return file.read_bytes()
    return bytes(file.buffer) if hasattr(file, "buffer") else bytes(file)


def options_dict(options: tuple[str, ...]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in options)


# --- what every engine's session shares ----------------------------------------


def empty_at_run_time(signature: Signature, arrays: Sequence[np.ndarray]) -> bool:
    """Whether a dynamic dimension of some input is 0 in this call (a statically 0
    dimension is the compiler's to fold away)."""
    return any(n == 0 and isinstance(d, str) for s, a in zip(signature.inputs, arrays) for d, n in zip(s.shape, a.shape))


def empty_outputs(signature: Signature, arrays: Sequence[np.ndarray]) -> list[np.ndarray] | None:
    """The outputs of a call on `arrays` when their shapes alone determine them: every
    output's shape is known from the signature (static dimensions, dynamic ones named
    after an input's) and holds a 0, so there is no value to compute. None otherwise
    (an output's size is not known, or it has values: a sum over an empty axis is 0)."""
    sizes = {d: n for s, a in zip(signature.inputs, arrays) for d, n in zip(s.shape, a.shape) if isinstance(d, str)}
    out = []
    for spec in signature.outputs:
        shape = [d if isinstance(d, int) else sizes.get(d) for d in spec.shape]
        if any(n is None for n in shape) or 0 not in shape:
            return None
        out.append(np.empty(shape, dtype(spec.dtype).numpy_dtype()))
    return out


def cast_signature(signature, casts: tuple[tuple[str, str], ...]):
    """The signature an artifact with `interface_casts` really has."""
    from dataclasses import replace

    table = dict(casts)
    if not table:
        return signature
    swap = lambda specs: tuple(replace(s, dtype=table.get(s.dtype, s.dtype)) for s in specs)  # noqa: E731
    return replace(signature, inputs=swap(signature.inputs), outputs=swap(signature.outputs))


def cast_function(spec: FunctionSpec, casts: tuple[tuple[str, str], ...]) -> FunctionSpec:
    """The function an artifact with `interface_casts` really has: its signature and
    its state in the artifact's types."""
    from dataclasses import replace

    table = dict(casts)
    if not table:
        return spec
    swap = lambda states: tuple(replace(s, dtype=table.get(s.dtype, s.dtype)) for s in states)  # noqa: E731
    return replace(spec, signature=cast_signature(spec.signature, casts), reads=swap(spec.reads), writes=swap(spec.writes))


def cast_inputs(arrays: list[np.ndarray], model_sig, artifact_sig) -> list[np.ndarray]:
    """Model-typed inputs as the artifact's types. Integers must fit: a value the
    narrower type cannot hold is refused, never wrapped around."""
    from hxc.errors import SignatureError

    out = []
    for i, (a, m, s) in enumerate(zip(arrays, model_sig.inputs, artifact_sig.inputs)):
        if m.dtype == s.dtype:
            out.append(a)
            continue
        want = dtype(s.dtype).numpy_dtype()
        if want.kind in "iu" and a.size:
            info = np.iinfo(want)
            lo, hi = a.min(), a.max()
            if lo < info.min or hi > info.max:
                raise SignatureError(
                    f"input {i} ({m.name}) holds {lo}..{hi}; this artifact computes {m.dtype} as {s.dtype} "
                    f"(range {info.min}..{info.max})",
                    hint="choose an artifact with native 64-bit integers, e.g. device='vulkan:desktop' or a CPU one",
                )
        out.append(a.astype(want))
    return out

"""`hxc.runtime.load(bundle)`: probe, select, verify, load, and call.

The choice is never silent: the returned model carries the artifact and device it
runs on, the full ranking (`explain()`), and every load attempt that failed before
it. The chosen artifact (and the shared weights) are opened once, checked against the
manifest's size and sha256, and its engine (IREE, ONNX Runtime, AOTInductor) is given
those very bytes (a mapping, or with `private_copy=True` a private copy), never the
path again. The check is here, once, for every engine.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from hxc.engines import engine
from hxc.engines.base import Session as EngineSession, cast_function, cast_inputs
from hxc.errors import HxcError, NoCompatibleArtifactError, SignatureError, UsageError, first_line
from hxc.manifests.bundle import CheckedFile, TrustedKeys, open_checked, read_bundle, trust_policy
from hxc.manifests.schema import MAIN, Artifact, FunctionSpec, Manifest, OutputTree, Signature, StateSpec, TensorSpec
from hxc.dtypes import dtype, from_numpy, is_torch, to_numpy, to_torch
from hxc.runtime.place import StagePlan, plan_stages
from hxc.runtime.prices import PriceTable
from hxc.runtime.probe import HostProbe, probe_host
from hxc.runtime.select import Candidate, Selection, select
from hxc.runtime.stages import StagedSession, StageRunner
from hxc.targets import Device

log = logging.getLogger("hxc.runtime")
PRIVATE_COPY_ENV = "HXC_PRIVATE_COPY"


@dataclass(frozen=True)
class LoadAttempt:
    artifact: str
    device: str
    error: str


class LoadedModel:
    """A bundle bound to one artifact on one device (a staged bundle: its stages' artifacts,
    on one device or where `placement` puts each). Call it like the PyTorch model."""

    def __init__(
        self,
        bundle: Path,
        manifest: Manifest,
        candidate: Candidate,
        selection: Selection,
        attempts: list[LoadAttempt],
        session: EngineSession,
        placement: StagePlan | None = None,
        stage_devices: tuple[Device, ...] = (),
    ) -> None:
        self.bundle = bundle
        self.manifest = manifest
        # A staged bundle's placement (who decided, and why), and each stage's device.
        self.placement = placement
        self.stage_devices = stage_devices
        self.functions: dict[str, FunctionSpec] = dict(manifest.functions)
        self.candidate = candidate
        self.selection = selection
        self.attempts = attempts
        self._session = session
        self._lock = threading.Lock()
        casts = candidate.artifact.interface_casts
        # What the artifact itself takes and returns, per function (see Artifact.interface_casts).
        self._artifact_specs = {name: cast_function(fn, casts) for name, fn in self.functions.items()}
        self._plans = {name: CallPlan(fn.signature, self._artifact_specs[name].signature)
                       for name, fn in self.functions.items()}  # fmt: skip
        # `model(...)` calls main: its signature and plan, looked up once.
        main = self.functions.get(MAIN)
        self.signature: Signature = main.signature if main else None  # type: ignore[assignment]
        self._artifact_signature = self._artifact_specs[MAIN].signature if main else None
        self._plan = self._plans.get(MAIN)
        self._stateful_main = bool(main and main.states)
        self._state_specs = {s.name: s for spec in self._artifact_specs.values() for s in spec.states}

    @property
    def artifact(self) -> Artifact:
        return self.candidate.artifact

    @property
    def device(self) -> Device:
        return self.candidate.device

    @property
    def where(self) -> str:
        """What runs where: `cpu:host on local-task: AMD EPYC`, or a split's stages."""
        if len(set(self.stage_devices)) > 1:
            return ", ".join(f"{a.id} on {d.label}" for a, d in zip(self.candidate.stages, self.stage_devices))
        return f"{self.candidate.id} on {self.device.label}"

    def explain(self) -> str:
        text = self.selection.explain()
        if self.placement is not None:
            text += "\n" + self.placement.explain()
        for a in self.attempts:
            text += f"\n   !  {a.artifact} on {a.device} failed to load: {a.error}"
        return text + f"\nloaded {self.where}"

    def __repr__(self) -> str:
        return f"<hxc model {self.manifest.model.name!r}: {self.where}>"

    def __call__(self, *inputs: Any) -> Any:
        plan = self._plan
        if plan is None or self._stateful_main:
            return self.call(MAIN, *inputs)  # says what is missing
        # Numpy, the common case, is told apart from torch by one type comparison.
        if inputs and type(inputs[0]) is not np.ndarray and is_torch(inputs[0]):
            flat = self._run(plan.check([to_numpy(x) for x in inputs]))
            flat = [to_torch(a, name) for a, name in zip(flat, plan.output_dtypes)]
        else:
            flat = self._run(plan.check(inputs))
        return flat[plan.single_output] if plan.single_output is not None else rebuild(self.signature.output_tree, flat)

    def run_flat(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Numpy in, flat numpy out: the path `verify` and `run` use."""
        if self._plan is None or self._stateful_main:
            return self.call_flat(MAIN, arrays)
        return self._run(self._plan.check(arrays))

    # --- functions and state -----------------------------------------------------

    def call(self, function: str, *inputs: Any, state: ModelState | None = None) -> Any:
        """Call entry point `function` (see `functions`) like the model's method: numpy
        or torch in, the same kind out. A function that reads or writes state takes
        `state=` (from `new_state()`), whose values it reads and replaces on the
        device; they never come to the host unless asked (`ModelState.to_host`)."""
        plan = self._function_plan(function)
        torch_in = bool(inputs) and type(inputs[0]) is not np.ndarray and is_torch(inputs[0])
        arrays = plan.check([to_numpy(x) for x in inputs] if torch_in else inputs)
        flat = self.call_flat(function, arrays, state=state, checked=True)
        if torch_in:
            flat = [to_torch(a, name) for a, name in zip(flat, plan.output_dtypes)]
        fn = self.functions[function]
        return flat[plan.single_output] if plan.single_output is not None else rebuild(fn.signature.output_tree, flat)

    def call_flat(self, function: str, arrays: list[np.ndarray], *, state: ModelState | None = None,
                  checked: bool = False) -> list[np.ndarray]:  # fmt: skip
        """`call` with numpy in and flat numpy out."""
        plan = self._function_plan(function)
        if not checked:
            arrays = plan.check(arrays)
        fn, spec = self.functions[function], self._artifact_specs[function]
        if (fn.reads or fn.writes) and state is None:
            raise SignatureError(f"function {function!r} keeps state ({', '.join(s.name for s in fn.states)}) on the device",
                                 hint="pass state=model.new_state()")  # fmt: skip
        if state is not None and state.model is not self:
            raise SignatureError("this state belongs to another loaded model")
        if plan.input_casts:
            arrays = cast_inputs(arrays, fn.signature, spec.signature)
        with self._lock:
            flat, written = self._session.call(function, arrays, spec, state.values if state is not None else None)
            if state is not None:
                state.values.update(written)
        return [a if a.dtype == want else a.astype(want) for a, want in zip(flat, plan.output_numpy)]

    def generate(self, prompt: Any = None, max_new_tokens: int = 64, **options: Any) -> Any:
        """A language model's continuation of `prompt` (text, or token ids) or of chat
        `messages=[...]`, streamed: see `hxc.runtime.generate.generate` for the options
        and the result."""
        from hxc.runtime.generate import generate

        return generate(self, prompt, max_new_tokens, **options)

    def _function_plan(self, function: str) -> CallPlan:
        plan = self._plans.get(function)
        if plan is None:
            raise SignatureError(f"this model has no function {function!r}; its functions are {', '.join(self.functions)}")
        return plan

    @property
    def state_specs(self) -> dict[str, StateSpec]:
        """Every state any function reads or writes, by name (as the artifact holds it)."""
        return self._state_specs

    def new_state(self) -> ModelState:
        """Every state of the model, allocated zero on this model's device, after checking
        that they fit in the device's memory."""
        specs = self.state_specs
        check_fits(sum(s.bytes for s in specs.values()), self.device)
        with self._lock:
            return ModelState(self, {name: self._session.state_zeros(s) for name, s in specs.items()})

    def import_state(self, arrays: Mapping[str, np.ndarray]) -> ModelState:
        """A state made of host arrays (`ModelState.to_host()` of another model, moved
        here): each copied to this model's device once; states not given start zero."""
        specs = self.state_specs
        if unknown := set(arrays) - set(specs):
            raise SignatureError(f"this model keeps no state {', '.join(sorted(unknown))}",
                                 hint=f"its states: {', '.join(specs) or 'none'}")  # fmt: skip
        values = {}
        for name, a in arrays.items():
            s = specs[name]
            a = to_numpy(a)
            if a.dtype != dtype(s.dtype).numpy_dtype() or tuple(a.shape) != tuple(s.shape):
                raise SignatureError(f"state {name} must be {s.tensor().format()}, not "
                                     f"{'x'.join(map(str, a.shape)) or 'scalar'}x{a.dtype}")  # fmt: skip
            values[name] = a
        check_fits(sum(s.bytes for s in specs.values()), self.device)
        with self._lock:
            return ModelState(self, {n: self._session.state_from_host(values[n], s) if n in values
                                     else self._session.state_zeros(s) for n, s in specs.items()})  # fmt: skip

    def borrow_inputs(self) -> None:
        """From now on a device in host memory (local-task) reads the arrays given to
        `run_flat` in place instead of copying them: the caller promises they stay
        unchanged and alive until each call returns. A pool worker does, for inputs in
        shared memory it holds until it replies. Other devices and engines copy as before."""
        if hasattr(self._session, "borrow_inputs"):
            self._session.borrow_inputs = True

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Checked host arrays in, flat host arrays of the model's types out."""
        plan = self._plan
        if plan.input_casts:
            arrays = cast_inputs(arrays, self.signature, self._artifact_signature)
        with self._lock:  # one IREE invocation at a time per loaded model
            flat = self._session.invoke(arrays, self._artifact_signature)
        # Artifact outputs back as the model's types (widening, or f32 rounded to f16/bf16).
        return [a if a.dtype == want else a.astype(want) for a, want in zip(flat, plan.output_numpy)]

    @property
    def last_device_ms(self) -> float:
        """Device time of the last call, host<->device copies excluded: what `hxc bench`
        profiles measure, so a caller can tell its own overhead from it."""
        return self._session.device_seconds * 1000

    def prepare(self, arrays: list[np.ndarray]) -> Callable[[], None]:
        """A zero-argument call on device-resident copies of `arrays` whose results stay
        on the device: the call `hxc bench` times, free of host<->device copies."""
        inner = cast_inputs(check_inputs(self.signature, arrays), self.signature, self._artifact_signature)
        return self._session.prepare(inner, self._artifact_signature)


class ModelState:
    """The device-resident state of one loaded model (its hidden state, its KV cache),
    by name: the engine's own handles, passed into each call that reads them and
    replaced by each call that writes them. Only `to_host` copies them to the host."""

    def __init__(self, model: LoadedModel, values: dict[str, Any]) -> None:
        self.model = model
        self.values = values

    @property
    def nbytes(self) -> int:
        """Device memory the state holds."""
        specs = self.model.state_specs
        return sum(specs[n].bytes for n in self.values)

    def to_host(self) -> dict[str, np.ndarray]:
        """Each value copied to a host array (to inspect it, or move it to another device
        with `import_state`)."""
        specs = self.model.state_specs
        with self.model._lock:
            return {n: self.model._session.state_to_host(v, specs[n]) for n, v in self.values.items()}

    def __repr__(self) -> str:
        return f"<hxc state {', '.join(self.values)}: {self.nbytes} bytes on {self.model.device.label}>"


def check_fits(nbytes: int, device: Device) -> None:
    """Refuse, in one line, to allocate state larger than the memory a device has free:
    host memory for the CPU and for CPU-backed Vulkan (lavapipe); a GPU's own memory is
    not reported to hxc, so there the device's allocator is the judge."""
    if device.kind != "cpu" and device.driver not in ("local-task", "local-sync"):
        return
    available = _available_host_memory()
    if available is not None and nbytes > available:
        raise HxcError(f"the model's state needs {nbytes / 2**20:.1f} MiB; {device.label} has "
                       f"{available / 2**20:.1f} MiB free", hint="use fewer slots or a shorter context")  # fmt: skip


def _available_host_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def load(
    bundle: str | os.PathLike[str],
    *,
    device: str | None = None,
    policy: str = "latency",
    strict: bool = False,
    precision: str | None = None,
    tolerance: float | None = None,
    probe: HostProbe | None = None,
    private_copy: bool | None = None,
    trusted_keys: TrustedKeys = None,
    min_sequence: int | None = None,
    require_signed_profiles: bool | None = None,
    slo_ms: float | None = None,
    slo_percentile: str = "p99",
    prices: PriceTable | None = None,
    placement: str | Sequence[str] | None = None,
    device_memory: str | Mapping[str, int] | None = None,
) -> LoadedModel:
    """Load the best artifact in `bundle` for this host.

    `device` (or $HXC_DEVICE) restricts the choice: a driver (`vulkan`, `local-task`,
    `cuda`), a family (`cpu`), an artifact id (`cpu:x86-64-v4`) or a device URI. If it
    cannot be honoured, hxc falls back to the best other artifact and logs a warning;
    with `strict=True` it raises instead, and it also raises if the first choice fails
    to load rather than trying the next.

    Reduced-precision artifacts (built with `hxc compile --precision fp16,...`) are only
    chosen when allowed: `precision="fp16"`, or `tolerance=` at least their recorded
    error against fp32.

    `trusted_keys` (public key files, or $HXC_TRUSTED_KEYS when None) requires a
    valid signature by one of them before any file of the bundle is opened;
    `min_sequence` (or $HXC_MIN_SEQUENCE) refuses a bundle whose signature carries a
    lower sequence number (`hxc sign --sequence`): an older bundle put back in place.
    `require_signed_profiles=True` (or $HXC_REQUIRE_SIGNED_PROFILES=1) ranks by
    profiles only if a trusted key signed them (`hxc sign --profiles`), and by the
    static order otherwise (explain() says so).

    `private_copy=True` (or $HXC_PRIVATE_COPY=1) runs a private in-memory copy of the
    checked bytes instead of a mapping of the bundle's file, so that writes to the
    file after loading cannot reach the running code (costs the artifact's size in
    memory).

    `policy` ranks by recorded profiles: "latency", "throughput" or "cost" (price per
    hour / items per second, prices from `prices` or `hxc.runtime.prices.load_prices()`);
    `slo_ms` puts the artifacts that meet that target (at `slo_percentile`, p99 or p50)
    first. See `hxc.runtime.select`.

    A staged bundle (`hxc compile --stages`) runs each stage where `placement` says
    (`"0:cpu,1:vulkan"`, or a device name per stage, e.g. a `StagePlan.assignment`),
    else where the solver places it from this host's per-stage profiles (`hxc bench`;
    minimum latency, or maximum throughput under the throughput and cost policies) within
    the `device_memory` caps (`"vulkan=2GiB"`), else on the best single device; the
    values between stages pass through the host, in this process. `model.placement.explain()`
    says why. A `device` runs every stage there, as for an unstaged bundle. See
    `hxc.runtime.place`. The same placement on a pipeline of worker processes (a worker
    per device, or per stage with `pin="split"`; several items in flight):
    `hxc.pool.load_pipeline(bundle, placement=..., pin=...)`.

    Every device at once, one batch split across them: `hxc.pool.Pool(bundle)`.
    """
    path = Path(bundle)
    if private_copy is None:
        private_copy = os.environ.get(PRIVATE_COPY_ENV, "") not in ("", "0")
    read = read_bundle(path, trust_policy(trusted_keys, min_sequence, require_signed_profiles))
    manifest = read.manifest
    probe = probe or probe_host()
    options = {"precision": precision, "tolerance": tolerance, "slo_ms": slo_ms, "slo_percentile": slo_percentile,
               "prices": prices, "profiles_note": read.profiles_note}  # fmt: skip
    selection = select(manifest, probe, policy=policy, device=device, **options)
    if not selection.candidates and selection.forced:
        if strict:
            raise NoCompatibleArtifactError(
                f"{path}: no artifact can run on the requested device {selection.forced!r}",
                hint=_summary(selection),
            )
        log.warning("hxc: requested device %r is not usable here; choosing another", selection.forced)
        refused = selection.forced
        selection = replace(
            select(manifest, probe, policy=policy, device="", **options),
            note=f"requested device {refused!r} is not usable here ({_summary(selection)}); fell back",
        )
    if not selection.candidates:
        raise NoCompatibleArtifactError(f"{path}: no artifact in this bundle can run on this host", hint=_summary(selection))

    if (placement is not None or device_memory is not None) and not device and selection.forced:
        # $HXC_DEVICE, not the caller: the placement names the devices itself.
        selection = select(manifest, probe, policy=policy, device="", **options)
    plan = plan_stages(manifest, selection, probe.host().id, policy=policy, placement=placement,
                       device_memory=device_memory)  # fmt: skip
    tries = _tries(selection, plan)
    attempts: list[LoadAttempt] = []
    checked_weights: dict[tuple[str, int | None], tuple[CheckedFile, str] | None] = {}  # hashing 400 MB once is enough
    for cand, devices in tries:
        # Every file is checked before any is opened: a file that fails is an error, not a reason to try the next.
        opened = [_checked(path, manifest, a, private_copy, checked_weights) for a in cand.artifacts]
        try:
            sessions = [engine(a.engine).open(a, module, dev, weights)
                        for a, (module, weights), dev in zip(cand.artifacts, opened, devices)]  # fmt: skip
            session = (StagedSession(sessions, manifest.stages, cand.stages, manifest.functions) if cand.stages
                       else sessions[0])
        except Exception as e:
            if strict or (plan is not None and plan.source == "forced"):
                raise HxcError(f"{cand.id} on {cand.device.label} failed to load: {first_line(e)}") from None
            attempts.append(LoadAttempt(cand.id, cand.device.label, first_line(e)))
            log.warning("hxc: %s on %s failed to load (%s); trying the next", cand.id, cand.device.label, first_line(e))
            continue
        placed = plan if plan is not None and cand.stages == plan.artifacts else None
        model = LoadedModel(path, manifest, cand, selection, attempts, session, placed,
                            tuple(devices) if cand.stages else ())  # fmt: skip
        log.info("hxc: loaded %s (%s)", model.where, placed.reason if placed else cand.reason)
        return model
    raise NoCompatibleArtifactError(
        f"{path}: every compatible artifact failed to load",
        hint="; ".join(f"{a.artifact}: {a.error}" for a in attempts),
    )


def _tries(selection: Selection, plan: StagePlan | None) -> list[tuple[Candidate, list[Device]]]:
    """What to load, in order, each with a device per artifact: the placement first (a
    split: the stages of its devices' chains, each on its own device; on one device,
    that device's chain), then the selection's other candidates; a forced placement alone."""
    plain = [(c, [c.device] * len(c.artifacts)) for c in selection.candidates]
    if plan is None or plan.source == "single":
        return plain
    if plan.split:
        first = plan.device(0).candidate
        arts = plan.artifacts
        mixed = replace(first, artifact=arts[0], stages=arts, latency=None, throughput=None, measured_on=None)
        lead = (mixed, [plan.device(k).device for k in range(len(arts))])
    else:
        c = plan.device(0).candidate
        lead = (c, [c.device] * len(c.artifacts))
    if plan.source == "forced":
        return [lead]
    return [lead, *(t for t in plain if t[0] is not lead[0])]


def load_stage(bundle: str | os.PathLike[str], artifact: str, *, device: str | None = None, probe: HostProbe | None = None,
               private_copy: bool = False, trusted_keys: TrustedKeys = None, min_sequence: int | None = None,
               require_signed_profiles: bool | None = None) -> StageRunner:  # fmt: skip
    """One stage's artifact (`cpu:host#s1`) alone on a device that can run it (`device`
    as `load` takes it, else the family's first): what `hxc bench` times to place stages.
    Checked like every file `load` opens."""
    path = Path(bundle)
    manifest = read_bundle(path, trust_policy(trusted_keys, min_sequence, require_signed_profiles)).manifest
    art = next((a for a in manifest.artifacts if a.id == artifact), None)
    if art is None or art.stage is None:
        raise UsageError(f"{path}: no stage artifact {artifact!r}",
                         hint=f"its stages' artifacts: {', '.join(a.id for a in manifest.artifacts if a.stage is not None)}")  # fmt: skip
    sel = select(manifest, probe or probe_host(), device=device or "", tolerance=float("inf"))
    cand = next((c for c in sel.candidates if art in c.stages), None)
    if cand is None:
        raise NoCompatibleArtifactError(f"{path}: {artifact} cannot run here as part of a chain of its target",
                                        hint=_summary(sel))  # fmt: skip
    module, weights = _checked(path, manifest, art, private_copy, {})
    session = engine(art.engine).open(art, module, cand.device, weights)
    return StageRunner(session, manifest.stages[art.stage], art)


def _checked(path: Path, manifest: Manifest, art: Artifact, private_copy: bool,
             weights: dict[tuple[str, int | None], tuple[CheckedFile, str] | None]) -> tuple[CheckedFile, tuple[CheckedFile, str] | None]:  # fmt: skip
    """The artifact's file, checked, and the checked parameter archive it reads (its
    precision's, and its stage's alone for a stage), from `weights` when already checked."""
    assert art.file is not None  # parse_manifest guarantees it for ok artifacts
    module = open_checked(path, manifest, art.file, private_copy=private_copy)
    if not engine(art.engine).uses_shared_weights(art):  # select() only offers artifacts of engines it knows
        return module, None
    key = (art.precision, art.stage)
    if key not in weights:
        w = manifest.weights_for(*key)
        weights[key] = None if w is None else (open_checked(path, manifest, w.file, private_copy=private_copy), w.scope)
    return module, weights[key]


def _summary(selection: Selection) -> str:
    return "; ".join(f"{r.artifact.id}: {r.reason}" for r in selection.rejected[:6]) or "the bundle has no artifacts"


# --- inputs and outputs ------------------------------------------------------------


class CallPlan:
    """What a call checks and converts, worked out once per loaded model, so that the
    common call (host arrays of exactly the signature's dtypes and static shapes)
    costs a few comparisons. Anything else goes through `check_inputs`, which accepts
    what it accepted before (dynamic dimensions, sequences, array subclasses) and
    raises the same errors."""

    def __init__(self, signature: Signature, artifact_signature: Signature) -> None:
        self.signature = signature
        specs = signature.inputs
        self.count = len(specs)
        # (numpy dtype, shape) per input, or None when a dimension is dynamic: those
        # inputs always take the full check.
        static = all(isinstance(d, int) for s in specs for d in s.shape)
        self.expected = tuple((dtype(s.dtype).numpy_dtype(), tuple(s.shape)) for s in specs) if static else None
        self.input_casts = any(m.dtype != a.dtype for m, a in zip(specs, artifact_signature.inputs))
        self.output_dtypes = tuple(s.dtype for s in signature.outputs)
        self.output_numpy = tuple(dtype(s.dtype).numpy_dtype() for s in signature.outputs)
        tree = signature.output_tree
        self.single_output = tree.index if tree.kind == "leaf" else None

    def check(self, inputs: Any) -> list[np.ndarray]:
        """`check_inputs(signature, inputs)`, by cheap comparisons where they suffice."""
        expected = self.expected
        if expected is not None and len(inputs) == self.count:
            for x, (want_dtype, want_shape) in zip(inputs, expected):
                # A subclass (np.matrix, a memmap) or anything else takes the full check.
                if type(x) is not np.ndarray or x.dtype != want_dtype or x.shape != want_shape:
                    break
            else:
                return list(inputs)
        return check_inputs(self.signature, inputs)


def check_inputs(signature: Signature, inputs: Any) -> list[np.ndarray]:
    """Host arrays for `inputs`, after checking count, dtype and shape against the
    signature; dynamic dimensions may take any size but must agree where they share
    a name."""
    expected = signature.inputs
    if len(inputs) != len(expected):
        raise SignatureError(
            f"expected {len(expected)} input(s) ({format_specs(expected)}), got {len(inputs)}"
        )
    arrays: list[np.ndarray] = []
    sizes: dict[str, int] = {}
    for i, (x, spec) in enumerate(zip(inputs, expected)):
        a = to_numpy(x)
        if a.dtype != dtype(spec.dtype).numpy_dtype():
            got = getattr(from_numpy(a.dtype), "name", str(a.dtype))
            raise SignatureError(f"input {i} ({spec.name}) has dtype {got}; expected {spec.format()}")
        if a.ndim != len(spec.shape) or any(
            isinstance(d, int) and d != n for d, n in zip(spec.shape, a.shape)
        ):
            raise SignatureError(
                f"input {i} ({spec.name}) has shape {'x'.join(map(str, a.shape)) or 'scalar'}; expected {spec.format()}"
            )
        for d, n in zip(spec.shape, a.shape):
            if isinstance(d, str):
                if sizes.setdefault(d, n) != n:
                    raise SignatureError(f"input {i} ({spec.name}): dynamic dim {d} is {n} here but {sizes[d]} in an earlier input")
        arrays.append(a)
    return arrays


def format_specs(specs: tuple[TensorSpec, ...]) -> str:
    return ", ".join(f"{s.name}: {s.format()}" for s in specs)


def rebuild(tree: OutputTree, flat: list[Any]) -> Any:
    if tree.kind == "leaf":
        assert tree.index is not None
        return flat[tree.index]
    items = [rebuild(t, flat) for t in tree.items]
    if tree.kind == "dict":
        return dict(zip(tree.keys, items))
    return list(items) if tree.kind == "list" else tuple(items)

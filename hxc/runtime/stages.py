"""A staged bundle (`hxc compile --stages`) run whole in this process: each stage's
artifact opened on its device (one device for them all, or each where a placement puts
it: `hxc.runtime.place`), called in order, each stage's outputs the next one's inputs,
through the host. It is the engine session `LoadedModel` calls, so a staged bundle
loads, runs and verifies like any other.

A language model's stages (`Stage.functions`) are called the same way, function by
function: `call(name, arrays, spec, state)` runs each stage's function of that name in
order, stage 0 on the call's arguments, each later one on the hidden states the stage
before returned and the arguments it names, each over its own layers' KV caches, which
stay on its device (the state values of the model, each created by the stage that
holds it). So `generate`, `Batch` and `hxc verify` run a staged language model through
`LoadedModel.call_flat` as they run a whole one.

The pipeline over worker processes (`hxc.pool.pipeline`, what `hxc run` and `hxc bench`
use for a placement across devices or with `--pin split`) must equal this chain.
`StageRunner` is one stage alone, as `hxc bench` times it and a pipeline worker runs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from hxc.dtypes import dtype
from hxc.engines.base import Session, StatelessSession, cast_inputs, cast_signature
from hxc.errors import HxcError
from hxc.manifests.schema import Artifact, FunctionSpec, Manifest, Signature, Stage, StateSpec


class StagedSession(StatelessSession):
    """The sessions of every stage, in order, called as one stateless `main` (or, for a
    language model's stages, as each of its functions); each may be on a device of its
    own (a placement), the values between them passing through the host."""

    engine_name = "a staged bundle's"

    def __init__(self, sessions: Sequence[Session], stages: Sequence[Stage], artifacts: Sequence[Artifact],
                 functions: Mapping[str, FunctionSpec] | None = None) -> None:  # fmt: skip
        self._sessions = list(sessions)
        # A language model's stages: per function, each stage's function as its artifacts
        # take it (`functions` are the model's), and which stage holds each state.
        self._calls = {name: [(s.functions[name], s.functions[name].spec(fn)) for s in stages]
                       for name, fn in (functions or {}).items() if all(name in s.functions for s in stages)}  # fmt: skip
        self._holder = {n: k for k, s in enumerate(stages) for f in s.functions.values() for n in f.state}
        # Each stage's signature as the model has it, and as its artifact takes it (its
        # interface casts), built once: sessions cache their transfers by the object.
        self._model = [s.signature for s in stages]
        self._artifact = [cast_signature(sig, a.interface_casts) for sig, a in zip(self._model, artifacts)]
        self._output_types = [_numpy_types(sig) for sig in self._model]
        self.device_seconds = 0.0

    def invoke(self, arrays: list[np.ndarray], signature: Signature) -> list[np.ndarray]:
        """The model's inputs, as stage 0's artifact takes them, in; the last stage's
        outputs, as its artifact returns them, out. `device_seconds`: all stages' device
        time, the hops between them excluded."""
        spent = 0.0
        for k, session in enumerate(self._sessions):
            if k:
                # The previous stage's outputs as the model's types, then as this stage takes them.
                arrays = _as_types(arrays, self._output_types[k - 1])
                arrays = cast_inputs(arrays, self._model[k], self._artifact[k])
            arrays = session.invoke(arrays, self._artifact[k])
            spent += session.device_seconds
        self.device_seconds = spent
        return arrays

    def call(self, function: str, arrays: list[np.ndarray], spec: FunctionSpec,
             state: Mapping[str, Any] | None = None) -> tuple[list[np.ndarray], dict[str, Any]]:  # fmt: skip
        """A language model's function (`spec` the model's) through every stage: the
        values between stages through the host, each stage's state on its own device.
        `device_seconds`: all stages' device time."""
        calls = self._calls.get(function)
        if calls is None:
            return super().call(function, arrays, spec, state)
        given = dict(zip((t.name for t in spec.signature.inputs), arrays))
        state = state or {}
        crossing: list[np.ndarray] = []
        written: dict[str, Any] = {}
        spent = 0.0
        for session, (stage_fn, stage_spec) in zip(self._sessions, calls):
            inputs = [*crossing, *(given[a] for a in stage_fn.args)]
            held = {n: state[n] for n in stage_fn.state if n in state}
            crossing, wrote = session.call(function, inputs, stage_spec, held)
            written.update(wrote)
            spent += session.device_seconds
        self.device_seconds = spent
        return crossing, written

    def _holder_of(self, spec: StateSpec) -> Session:
        k = self._holder.get(spec.name)
        if k is None:
            raise HxcError(f"no stage of this model holds state {spec.name!r}")
        return self._sessions[k]

    def state_zeros(self, spec: StateSpec) -> Any:
        return self._holder_of(spec).state_zeros(spec)

    def state_from_host(self, array: np.ndarray, spec: StateSpec) -> Any:
        return self._holder_of(spec).state_from_host(array, spec)

    def state_to_host(self, value: Any, spec: StateSpec) -> np.ndarray:
        return self._holder_of(spec).state_to_host(value, spec)

    def prepare(self, arrays: list[np.ndarray], signature: Signature) -> Callable[[], None]:
        """A call of every stage in turn; unlike one artifact's, the values between stages
        go through the host."""
        def call() -> None:
            self.invoke(arrays, signature)

        return call


class StageRunner:
    """One stage's artifact opened on one device, alone: what `hxc bench` times to place
    stages. Takes and returns the stage's tensors as the model has them."""

    def __init__(self, session: Session, stage: Stage, artifact: Artifact) -> None:
        self.session = session
        self.stage = stage
        self.artifact = artifact
        self._model = stage.signature
        self._artifact = cast_signature(self._model, artifact.interface_casts)
        self._output_types = _numpy_types(self._model)

    def invoke(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        out = self.session.invoke(cast_inputs(arrays, self._model, self._artifact), self._artifact)
        return _as_types(out, self._output_types)

    def prepare(self, arrays: list[np.ndarray]) -> Callable[[], None]:
        """A call on device-resident copies of `arrays`, results left on the device."""
        return self.session.prepare(cast_inputs(arrays, self._model, self._artifact), self._artifact)


def _numpy_types(signature: Signature) -> list[np.dtype]:
    """The numpy types of `signature`'s outputs, as the model has them."""
    return [dtype(t.dtype).numpy_dtype() for t in signature.outputs]


def _as_types(arrays: list[np.ndarray], types: Sequence[np.dtype]) -> list[np.ndarray]:
    """`arrays` as the model's types (an artifact may return a narrower one: interface casts)."""
    return [a if a.dtype == t else a.astype(t) for a, t in zip(arrays, types)]


def stage_inputs(manifest: Manifest, stage: Stage, model_inputs: Sequence[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    """Inputs to time `stage` alone: the model's own for stage 0; for a later stage,
    tensors of the shapes and dtypes that cross into it, floats drawn at random and
    other types zero (a dense stage's time does not depend on the values). A dynamic
    dimension takes the size the model's inputs give its name, else the size its
    recorded bytes imply (the golden example's)."""
    if stage.index == 0:
        return list(model_inputs)
    sizes: dict[str, int] = {}
    for spec, a in zip(manifest.signature.inputs, model_inputs):
        for d, n in zip(spec.shape, np.shape(a)):
            if isinstance(d, str):
                sizes.setdefault(d, int(n))
    rng = np.random.default_rng(seed)
    out = []
    for t in stage.inputs:
        kind = dtype(t.dtype)
        np_type = kind.numpy_dtype()
        shape = [d if isinstance(d, int) else sizes.get(d) for d in t.shape]
        unknown = [i for i, d in enumerate(shape) if d is None]
        if unknown:
            known = math.prod(d for d in shape if d is not None) * np_type.itemsize
            implied = max(t.bytes // known, 1) if known else 1
            for i in unknown:  # one unknown dimension takes all of it; several share it
                shape[i] = max(round(implied ** (1 / len(unknown))), 1)
        if kind.is_float:
            out.append(rng.standard_normal(shape).astype(np.float32).astype(np_type))
        else:
            out.append(np.zeros(shape, np_type))
    return out

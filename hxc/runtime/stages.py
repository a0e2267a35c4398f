"""A staged bundle (`hxc compile --stages`) run whole in this process: each stage's
artifact of one target opened on one device, called in order, each stage's outputs the
next one's inputs. It is the engine session `LoadedModel` calls, so a staged bundle
loads, runs and verifies like any other.

Placement of stages on different devices and the pipeline over worker processes
(issue 29, parts 2 and 3) come later; this is the reference they must equal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from hxc.dtypes import dtype
from hxc.engines.base import Session, StatelessSession, cast_inputs, cast_signature
from hxc.manifests.schema import Artifact, Signature, Stage


class StagedSession(StatelessSession):
    """The sessions of one target's stages, called as one stateless `main`."""

    engine_name = "a staged bundle's"

    def __init__(self, sessions: Sequence[Session], stages: Sequence[Stage], artifacts: Sequence[Artifact]) -> None:
        self._sessions = list(sessions)
        # Each stage's signature as the model has it, and as its artifact takes it (its
        # interface casts), built once: sessions cache their transfers by the object.
        self._model = [s.signature for s in stages]
        self._artifact = [cast_signature(sig, a.interface_casts) for sig, a in zip(self._model, artifacts)]
        self._output_types = [[dtype(t.dtype).numpy_dtype() for t in sig.outputs] for sig in self._model]
        self.device_seconds = 0.0

    def invoke(self, arrays: list[np.ndarray], signature: Signature) -> list[np.ndarray]:
        """The model's inputs, as stage 0's artifact takes them, in; the last stage's
        outputs, as its artifact returns them, out. `device_seconds`: all stages' device
        time, the hops between them excluded."""
        spent = 0.0
        for k, session in enumerate(self._sessions):
            if k:
                # The previous stage's outputs as the model's types, then as this stage takes them.
                arrays = [a if a.dtype == t else a.astype(t) for a, t in zip(arrays, self._output_types[k - 1])]
                arrays = cast_inputs(arrays, self._model[k], self._artifact[k])
            arrays = session.invoke(arrays, self._artifact[k])
            spent += session.device_seconds
        self.device_seconds = spent
        return arrays

    def prepare(self, arrays: list[np.ndarray], signature: Signature) -> Callable[[], None]:
        """A call of every stage in turn; unlike one artifact's, the values between stages
        go through the host."""
        def call() -> None:
            self.invoke(arrays, signature)

        return call

"""What `hxc bench` times: each artifact this host can run, and baselines rebuilt from
the bundle itself (PyTorch eager and torch.compile from the saved program, ONNX
Runtime from the saved ONNX model), so a bundle is all a benchmark needs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hxc.bench.measure import Contender
from hxc.dtypes import to_torch
from hxc.errors import UsageError
from hxc.manifests.bundle import trust_policy
from hxc.manifests.schema import PROGRAM_ONNX, PROGRAM_PT2, Manifest
from hxc.manifests.signing import TrustPolicy
from hxc.runtime.probe import HostProbe
from hxc.runtime.select import select


def artifact_contenders(bundle: Path, manifest: Manifest, probe: HostProbe, device: str | None = None,
                        trust: TrustPolicy | None = None,
                        call: Callable[[Any, list], Callable[[], None]] | None = None) -> list[Contender]:  # fmt: skip
    """One contender per artifact this host can run (reduced precision included), each
    loaded under `trust` (None: as $HXC_TRUSTED_KEYS says). `call(model, inputs)` makes
    the timed call (default: the model's `main` on `inputs`)."""
    from hxc.pool.workers import load_options
    from hxc.runtime.loader import load

    checks = load_options(trust if trust is not None else trust_policy())
    out = []
    for cand in select(manifest, probe, device=device, tolerance=float("inf")).candidates:
        holder: dict[str, Any] = {}
        art = cand.artifact

        def open_(art=art, holder=holder) -> None:
            holder["model"] = load(bundle, device=art.id, strict=True, tolerance=float("inf"), probe=probe, **checks)

        def prepare(inputs: list, holder=holder) -> Callable[[], None]:
            return holder["model"].prepare(inputs) if call is None else call(holder["model"], inputs)

        # A staged bundle's chain is named by its target (`cpu:host`), its stages by their artifacts.
        out.append(Contender(cand.id, cand.device.label, open_, prepare, device_time_only=True,
                             threads=_threads(cand.device), close=holder.clear, artifact=art.id))  # fmt: skip
    return out


def _threads(device: Any) -> int | None:
    return os.cpu_count() if device.kind == "cpu" and device.driver != "local-sync" else None


def stage_contenders(bundle: Path, manifest: Manifest, probe: HostProbe, device: str | None = None,
                     trust: TrustPolicy | None = None) -> list[Contender]:  # fmt: skip
    """A staged bundle's stages, each alone on each device that runs its chain (the
    artifact of that device's chain, as a placement would run it), timed on tensors of
    the shapes that cross into it (`hxc.runtime.stages.stage_inputs`): the per-stage
    profiles `hxc.runtime.place` places stages by."""
    from hxc.pool.workers import load_options
    from hxc.runtime.loader import load_stage
    from hxc.runtime.place import stage_devices
    from hxc.runtime.stages import stage_inputs

    checks = load_options(trust if trust is not None else trust_policy())
    out = []
    for d in stage_devices(select(manifest, probe, device=device, tolerance=float("inf"))):
        for k, art in enumerate(d.artifacts):
            holder: dict[str, Any] = {}

            def open_(art=art, uri=d.device.uri, holder=holder) -> None:
                holder["stage"] = load_stage(bundle, art.id, device=uri, probe=probe, **checks)

            def prepare(inputs: list, k=k, holder=holder) -> Callable[[], None]:
                return holder["stage"].prepare(stage_inputs(manifest, manifest.stages[k], inputs, seed=k))

            out.append(Contender(art.id, d.device.label, open_, prepare, device_time_only=True,
                                 threads=_threads(d.device), close=holder.clear, stage=k))  # fmt: skip
    return out


def torch_contender(
    candidate: str, bundle: Path, manifest: Manifest, cpu_label: str, *, compiled: bool, allow_pickle: bool
) -> Contender:
    """PyTorch eager (or torch.compile) on the bundle's program, weights restored."""
    import torch

    holder: dict[str, Any] = {}

    def open_() -> None:
        module = load_torch_module(bundle, manifest, allow_pickle=allow_pickle)
        holder["fn"] = torch.compile(module) if compiled else module

    def prepare(inputs: list) -> Callable[[], None]:
        tensors = [to_torch(a, s.dtype) for a, s in zip(inputs, manifest.signature.inputs)]
        fn = holder["fn"]

        def call() -> None:
            with torch.inference_mode():
                fn(*tensors)

        return call

    return Contender(candidate, cpu_label, open_, prepare, device_time_only=True, threads=torch.get_num_threads())


def onnxruntime_contender(candidate: str, bundle: Path, manifest: Manifest, cpu_label: str) -> Contender:
    """ONNX Runtime's CPU provider on the bundle's ONNX model."""
    holder: dict[str, Any] = {}

    def open_() -> None:
        import onnxruntime as ort

        holder["session"] = ort.InferenceSession(str(bundle / PROGRAM_ONNX), providers=["CPUExecutionProvider"])

    def prepare(inputs: list) -> Callable[[], None]:
        session = holder["session"]
        feed = {i.name: a for i, a in zip(session.get_inputs(), inputs)}
        return lambda: session.run(None, feed)

    return Contender(candidate, cpu_label, open_, prepare, device_time_only=True, threads=os.cpu_count())


def load_torch_module(bundle: Path, manifest: Manifest, *, allow_pickle: bool = False) -> Any:
    """The bundle's exported program as a runnable module, its weights restored from
    the bundle's parameter archive when they were stored there. Both files are read
    from their checked bytes, and the program is loaded without running code from it
    (`allow_pickle` lifts that, for programs whose weights torch itself pickled)."""
    from hxc.compiler.torch_program import program_with_weights
    from hxc.manifests.bundle import open_checked

    if manifest.model.program_file != PROGRAM_PT2:
        raise UsageError("this bundle holds no PyTorch program")
    checked = open_checked(bundle, manifest, manifest.model.program_file)
    # The fp32 archive, or a staged bundle's, one per stage.
    archives = [open_checked(bundle, manifest, w.file) for w in manifest.weights if w.precision == "fp32"]
    try:
        program = program_with_weights(checked.bytes(), str(checked.path), archives, allow_pickle=allow_pickle)
    finally:
        checked.close()
        for irpa in archives:
            irpa.close()
    return program.module()

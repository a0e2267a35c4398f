"""ONNX Runtime: the ONNX program, run by an execution provider.

The artifact is an ONNX file: the user's own model for ONNX input (the bundle's
`model.onnx`, not a copy), or, for a PyTorch model, its exported program converted
with `torch.onnx.export(..., dynamo=True)`. Initializers whose bytes are already in
the bundle's `weights.irpa` become ONNX external data pointing at them, so the bundle
keeps one copy of the weights. At run time the checked file's bytes and the checked
parameter archive are handed to ONNX Runtime from memory; it never reads the bundle
by path. Execution providers need no compile step, so each target family ONNX
Runtime serves is a variant of the same file: `cpu:onnxruntime` (CPU execution
provider), `cuda:onnxruntime` (CUDA), `rocm:onnxruntime` (MIGraphX); each is offered
only where that provider is installed.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from hxc.engines.base import Built, BuildJob, Engine, Session, bundle_name, file_bytes, options_dict, StatelessSession
from hxc.errors import first_line
from hxc.manifests.schema import WEIGHTS_FILE, Artifact, Requirements, Signature
from hxc.targets import Device

# Execution provider per target family, and what installs it.
PROVIDERS = {
    "cpu": ("CPUExecutionProvider", "pip install onnxruntime"),
    "cuda": ("CUDAExecutionProvider", "pip install onnxruntime-gpu"),
    "rocm": ("MIGraphXExecutionProvider", "install onnxruntime built with MIGraphX (AMD's onnxruntime-rocm wheels)"),
}
# Full graph optimisation, and one intra-op thread per logical core (0 means that
# here, as for IREE's local-task and torch; ONNX Runtime's own default counts physical
# cores). Both are recorded in the artifact and `--tune` tries the alternatives.
DEFAULT_OPTIONS = ("graph_optimization_level=ORT_ENABLE_ALL", "intra_op_num_threads=0", "execution_mode=ORT_SEQUENTIAL")
EXTERNAL_WEIGHTS = f"external_data={WEIGHTS_FILE}"
OPSET = 18


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"
    summary = "ONNX Runtime: the ONNX program on an execution provider (CPU here; CUDA, MIGraphX where installed)"
    families = tuple(PROVIDERS)
    build_needs = ("onnx", "onnxruntime", "onnxscript")
    run_needs = ("onnxruntime",)
    install_hint = "pip install 'hxc[onnx]'"
    static_rank_offset = -12  # below every IREE CPU variant (50+) until a bench says otherwise

    def build(self, job: BuildJob) -> Built:
        provider, _ = PROVIDERS[job.family]
        if job.reuse is not None:  # one ONNX file serves every execution provider
            return dataclasses.replace(job.reuse, family=job.family, backend=provider, verified=None)
        t0 = time.perf_counter()
        common = dict(engine=self.name, family=job.family, precision=job.precision, backend=provider,
                      driver="onnxruntime", binary="onnx", requires=Requirements(packages=("onnxruntime",)))  # fmt: skip
        if job.from_onnx:
            # The user's model is the program ONNX Runtime runs; the bundle has it already.
            assert job.program is not None and job.program_name is not None
            options = DEFAULT_OPTIONS + ((EXTERNAL_WEIGHTS,) if job.weights is not None else ())
            return Built(status="ok", seconds=time.perf_counter() - t0, options=options, file=job.program,
                         bundle_name=job.program_name, in_bundle=True, **common)  # fmt: skip
        try:
            model, external = _export(job)
        except Exception as e:  # some models do not export to ONNX: that artifact fails, the others stay
            return Built(status="failed", seconds=time.perf_counter() - t0, options=DEFAULT_OPTIONS,
                         error=f"torch.onnx.export failed: {_root_cause(e)}", **common)  # fmt: skip
        out = job.workdir / f"onnxruntime-{job.precision}.onnx"
        import onnx

        try:
            onnx.save_model(model, str(out))
        except (ValueError, MemoryError) as e:  # protobuf's 2 GB limit, with weights that could not be shared
            return Built(status="failed", seconds=time.perf_counter() - t0, options=DEFAULT_OPTIONS,
                         error=f"cannot store the ONNX program in one file: {first_line(e)}", **common)  # fmt: skip
        options = DEFAULT_OPTIONS + ((EXTERNAL_WEIGHTS,) if external else ())
        return Built(status="ok", seconds=time.perf_counter() - t0, options=options, file=out,
                     bundle_name=bundle_name("onnxruntime", job.precision, ".onnx"), **common)  # fmt: skip

    def uses_shared_weights(self, artifact: Artifact) -> bool:
        return EXTERNAL_WEIGHTS in artifact.flags

    def cannot_run(self, artifact: Artifact, device: Device) -> str | None:
        if (why := super().cannot_run(artifact, device)) is not None or artifact.backend == "CPUExecutionProvider":
            return why  # the CPU provider is part of every onnxruntime build
        import onnxruntime as ort  # only for bundles that carry GPU variants

        if artifact.backend not in ort.get_available_providers():
            hint = next((h for p, h in PROVIDERS.values() if p == artifact.backend), "")
            return f"this onnxruntime has no {artifact.backend} ({hint})"
        return None

    def open(self, artifact: Artifact, file: Any, device: Device, weights: tuple[Any, str] | None) -> Session:
        return OrtSession.open(file_bytes(file), artifact.backend, artifact.flags,
                               weights[0] if weights is not None and self.uses_shared_weights(artifact) else None)  # fmt: skip

    def tuning_configs(self, built: Built) -> list[tuple[str, tuple[str, ...]]]:
        opts = options_dict(built.options)
        cores = os.cpu_count() or 1
        with_ = lambda **kw: tuple(f"{k}={kw.get(k, v)}" for k, v in opts.items())  # noqa: E731
        configs = [("default", built.options), ("extended-opt", with_(graph_optimization_level="ORT_ENABLE_EXTENDED"))]
        if cores > 1:  # ORT_PARALLEL execution was 100-300x slower on every model tried: not offered
            configs.append((f"threads-{cores - 1}", with_(intra_op_num_threads=str(cores - 1))))
        return configs


class OrtSession(StatelessSession):
    engine_name = "ONNX Runtime"

    def __init__(self, session: Any) -> None:
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        # Asked for by name: run(None, ...) lists the outputs again on every call.
        self.output_names = [o.name for o in session.get_outputs()]
        self.device_seconds = 0.0

    @classmethod
    def open(cls, model: bytes, provider: str, options: tuple[str, ...], weights: Any | None) -> OrtSession:
        import onnxruntime as ort

        opts = options_dict(options)
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, opts.get("graph_optimization_level", "ORT_ENABLE_ALL"))
        so.intra_op_num_threads = int(opts.get("intra_op_num_threads", "0")) or os.cpu_count() or 1
        so.execution_mode = getattr(ort.ExecutionMode, opts.get("execution_mode", "ORT_SEQUENTIAL"))
        so.log_severity_level = 3  # warnings about unused initializers are noise here
        if weights is not None:
            data = _weights_buffer(weights)
            so.add_external_initializers_from_files_in_memory([WEIGHTS_FILE], [data], [len(data)])
        return cls(ort.InferenceSession(model, so, providers=[provider]))

    def _feed(self, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        # Contiguous arrays (nearly all) go as they are. Not np.ascontiguousarray for the
        # rest: it turns a scalar (0-d array) into shape (1,), and a 0-d array is contiguous.
        return {n: a if a.flags.c_contiguous else np.ascontiguousarray(a) for n, a in zip(self.input_names, arrays)}

    def invoke(self, arrays: list[np.ndarray], signature: Signature) -> list[np.ndarray]:
        feed = self._feed(arrays)
        t0 = time.perf_counter()
        out = self.session.run(self.output_names, feed)
        self.device_seconds = time.perf_counter() - t0
        return out

    def prepare(self, arrays: list[np.ndarray], signature: Signature) -> Callable[[], None]:
        feed, run, names = self._feed(arrays), self.session.run, self.output_names
        return lambda: run(names, feed)


def _root_cause(e: BaseException) -> str:
    """The exporter wraps the reason ("No ONNX function found for aten.cumprod") in a
    generic, coloured "Failed to convert the exported program" error."""
    import re

    while e.__cause__ is not None:
        e = e.__cause__
    return re.sub(r"\x1b\[[0-9;]*m", "", first_line(e))


def _weights_buffer(weights: Any) -> Any:
    if hasattr(weights, "buffer"):  # the checked bytes the loader hashed
        return weights.buffer
    return np.memmap(weights, dtype=np.uint8, mode="r")  # a fresh build's archive


def _export(job: BuildJob) -> tuple[Any, bool]:
    """The PyTorch program as ONNX, initializers pointing into the parameter archive
    where their bytes are the same; and whether any do."""
    import torch

    from hxc.compiler.torch_program import program_with_weights

    assert job.program is not None
    program = program_with_weights(job.program, str(job.program), job.weights)
    with torch.no_grad():
        onnx_program = torch.onnx.export(program, (), dynamo=True, optimize=True, opset_version=OPSET, verbose=False)
    model = onnx_program.model_proto
    if job.weights is None:
        return model, False
    return model, _share_with_archive(model, job.weights)


def _share_with_archive(model: Any, irpa: Any) -> bool:
    """Point initializers at the archive entries of the same name whose bytes they
    repeat (an optimised export may fold a batch norm into a conv weight that keeps its
    name: those stay inline)."""
    import iree.runtime as rt
    from onnx import numpy_helper

    from hxc.compiler.onnx_import import point_at_archive

    index = rt.ParameterIndex()
    index.load(str(irpa))
    entries = dict(index.items())
    archive = np.memmap(irpa, dtype=np.uint8, mode="r")
    same: dict[str, str] = {}
    for t in model.graph.initializer:
        entry = entries.get(t.name)
        if entry is None or not entry.is_file:
            continue
        _, offset = entry.file_storage
        raw = numpy_helper.to_array(t).tobytes()
        if len(raw) == entry.length and archive[offset : offset + entry.length].tobytes() == raw:
            same[t.name] = t.name
    point_at_archive(model, irpa, same)
    return bool(same)


ENGINE = OnnxRuntimeEngine()

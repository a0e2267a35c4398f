"""The PyTorch frontend: model file -> exported program -> IREE input IR, plus the
golden sample (PyTorch's own outputs) and, for shared weights, a parameter archive.

With shared weights every parameter and buffer becomes a named external parameter
(`#flow.parameter.named<"model"::"layer.weight">`), written once to `weights.irpa`,
and the program saved in the bundle keeps only the weights' shapes (stride-0
placeholders), so the bundle holds one copy of the weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.utils._pytree as pytree

from hxc.compiler.frontend import load_model
from hxc.compiler.imported import PARAMETER_SCOPE, ImportedModel, ImportOptions, wants_shared_weights
from hxc.compiler.lower import lower
from hxc.errors import LoweringError, UsageError

PROGRAM_FILE = "program.pt2"


def import_torch(source: str, options: ImportOptions, workdir: Path, on_stage: Callable[[str], None]) -> ImportedModel:
    timings: dict[str, float] = {}
    t = time.perf_counter()
    on_stage("loading model")
    model = load_model(source, inputs=options.inputs, dynamic_batch=options.dynamic_batch, allow_pickle=options.allow_pickle)
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    on_stage("running PyTorch for the golden sample")
    golden = golden_sample(model.reference, model.example_args)
    timings["golden"] = time.perf_counter() - t

    t = time.perf_counter()
    on_stage("lowering to IREE input IR")
    program = model.program
    weights = _program_weights(program)
    total = sum(w.numel() * w.element_size() for w in weights.values())
    has_bf16 = any(w.dtype == torch.bfloat16 for w in weights.values())
    shared = bool(weights) and wants_shared_weights(options.weights, total, has_bf16)
    if has_bf16 and not shared:
        raise UsageError(
            "this model has bf16 parameters, which iree-turbine cannot store inside an artifact",
            hint="use --weights shared (the default, auto, does this)",
        )
    irpa = None
    if shared:
        from iree.turbine.aot import ExternalTensorTrait, ParameterArchiveBuilder

        archive = ParameterArchiveBuilder()
        for name, tensor in weights.items():
            ExternalTensorTrait(external_scope=PARAMETER_SCOPE, external_name=name).set(tensor)
            archive.add_tensor(name, tensor.detach().contiguous())
        irpa = workdir / "weights.irpa"
        archive.save(irpa)
    lowered = lower(program)
    if len(lowered.signature.outputs) != sum(1 for k in golden if k.startswith("output_")):
        raise LoweringError("PyTorch returned a different number of outputs than the exported program")
    mlir = workdir / "model.mlirbc"
    mlir.write_bytes(lowered.mlir)
    timings["lower"] = time.perf_counter() - t

    program_path = workdir / PROGRAM_FILE
    if shared:
        _save_without_weights(program, program_path)
    else:
        torch.export.save(program, str(program_path))
    return ImportedModel(
        name=model.name,
        source=model.source,
        source_format=model.source_format,
        source_sha256=model.source_sha256,
        mlir=mlir,
        signature=lowered.signature,
        golden=golden,
        program=program_path,
        program_name=PROGRAM_FILE,
        weights=irpa,
        operators_at=lowered.operators_at,
        timings=timings,
    )


def _program_weights(program: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Parameters and buffers, by state-dict name: what iree-turbine turns into globals."""
    return {k: v for k, v in program.state_dict.items() if isinstance(v, torch.Tensor)}


def _save_without_weights(program: torch.export.ExportedProgram, path: Path) -> None:
    """Save the program with stride-0 placeholders for its weights: the right names,
    shapes and dtypes in kilobytes, while the values live in weights.irpa."""
    saved = dict(program.state_dict)
    try:
        for name, t in saved.items():
            empty = torch.empty_strided(t.shape, (0,) * t.dim(), dtype=t.dtype)
            program.state_dict[name] = torch.nn.Parameter(empty, requires_grad=False) if isinstance(t, torch.nn.Parameter) else empty
        torch.export.save(program, str(path))
    finally:
        program.state_dict.update(saved)


def golden_sample(reference: Callable, args: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    """Inputs and PyTorch's own outputs, flattened in the artifact's order."""
    with torch.no_grad():
        outputs = reference(*args)
    flat = pytree.tree_leaves(outputs)
    if not all(isinstance(x, torch.Tensor) for x in flat):
        raise LoweringError("the model returns non-tensor values; hxc compiles tensor outputs only")
    sample = {f"input_{i}": to_numpy(a) for i, a in enumerate(args)}
    sample.update({f"output_{i}": to_numpy(o) for i, o in enumerate(flat)})
    return sample


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)  # .npz cannot name bf16: raw bits
    return t.numpy()

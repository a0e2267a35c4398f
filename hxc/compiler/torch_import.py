"""The PyTorch pipeline every PyTorch frontend ends in: exported program -> IREE input
IR, plus the golden sample (PyTorch's own outputs), reduced-precision variants of the
program and, for shared weights, a parameter archive.

With shared weights every parameter and buffer becomes a named external parameter
(`#flow.parameter.named<"model"::"layer.weight">`), written once to `weights.irpa`,
and the program saved in the bundle keeps only the weights' shapes (stride-0
placeholders), so the bundle holds one copy of the weights.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.utils._pytree as pytree

from hxc import dtypes
from hxc.compiler.imported import PARAMETER_SCOPE, ImportedModel, ImportOptions, wants_shared_weights
from hxc.compiler.lower import lower
from hxc.compiler.torch_export import ExportedModel, export_module
from hxc.dtypes import to_numpy, to_storage
from hxc.errors import LoweringError, UsageError
from hxc.manifests.schema import PROGRAM_PT2


def import_torch(
    export: Callable[[], ExportedModel], options: ImportOptions, workdir: Path, on_stage: Callable[[str], None]
) -> ImportedModel:
    """Import the model `export()` loads and exports (a frontend's own step)."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    on_stage("loading model")
    model = export()
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    on_stage("running PyTorch for the golden sample")
    golden = golden_sample(model.reference, model.example_args)
    timings["golden"] = time.perf_counter() - t

    program, precision_error = model.program, None
    if options.precision != "fp32":
        on_stage(f"converting to {options.precision}")
        program, precision_error = _at_precision(model, options.precision, golden)

    t = time.perf_counter()
    on_stage("lowering to IREE input IR")
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
        irpa = workdir / f"weights-{options.precision}.irpa"
        archive.save(irpa)
    lowered = lower(program)
    if len(lowered.signature.outputs) != sum(1 for k in golden if k.startswith("output_")):
        raise LoweringError("PyTorch returned a different number of outputs than the exported program")
    mlir = workdir / "model.mlirbc"
    mlir.write_bytes(lowered.mlir)
    timings["lower"] = time.perf_counter() - t

    # The bundle keeps the model's own program; reduced-precision ones are derived from it.
    program_path = workdir / PROGRAM_PT2
    if shared and options.precision == "fp32":
        _save_without_weights(program, program_path)
    else:
        torch.export.save(model.program, str(program_path))
    return ImportedModel(
        name=model.name,
        source=model.source,
        source_format=model.source_format,
        source_sha256=model.source_sha256,
        mlir=mlir,
        signature=lowered.signature,
        golden=golden,
        program=program_path,
        program_name=PROGRAM_PT2,
        weights=irpa,
        precision=options.precision,
        precision_error=precision_error,
        operators_at=lowered.operators_at,
        timings=timings,
    )


class AtPrecision(torch.nn.Module):
    """The model computing in a reduced precision behind an unchanged interface:
    floating inputs are cast down on the way in and outputs back up on the way out,
    so a precision variant is a drop-in replacement for the fp32 artifact."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module.to(dtype)
        self.dtype = dtype

    def forward(self, *args: torch.Tensor):
        args = tuple(a.to(self.dtype) if a.dtype == torch.float32 else a for a in args)
        out = self.module(*args)
        return pytree.tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype == self.dtype else t, out)


def _at_precision(
    model: ExportedModel, precision: str, golden: dict[str, np.ndarray]
) -> tuple[torch.export.ExportedProgram, float]:
    """Re-export the model at `precision`; return the program and its error against the
    fp32 reference on the golden sample (max |y - y_fp32| / max |y_fp32|)."""
    if not any(a.dtype == torch.float32 for a in model.example_args) and not any(
        t.dtype == torch.float32 for t in model.program.state_dict.values()
    ):
        raise UsageError(f"--precision {precision} converts fp32 models; this one has no fp32 inputs or weights")
    program, wrapped = export_at_precision(model.program, model.example_args, precision, model.source)
    with torch.no_grad():
        outputs = pytree.tree_leaves(wrapped(*model.example_args))
    error = 0.0
    for i, out in enumerate(outputs):
        ref = golden[f"output_{i}"]
        if out.is_floating_point() and ref.dtype.kind == "f":
            scale = max(float(np.abs(ref).max()), 1e-12)
            error = max(error, float(np.abs(out.float().numpy() - ref).max()) / scale)
    return program, error


def export_at_precision(program: torch.export.ExportedProgram, example_args: tuple, precision: str,
                        source: str) -> tuple[torch.export.ExportedProgram, AtPrecision]:  # fmt: skip
    """`program` computing in `precision` behind its own interface, exported with the
    same dynamic dimensions; and the module that was exported."""
    import copy

    from hxc.compiler.lower import program_signature

    dtype = dtypes.dtype(dtypes.PRECISIONS[precision]).torch_dtype()
    wrapped = AtPrecision(copy.deepcopy(program.module()), dtype)
    dims = [{j: torch.export.Dim.DYNAMIC for j, d in enumerate(s.shape) if isinstance(d, str)}
            for s in program_signature(program).inputs]  # fmt: skip
    return export_module(wrapped, example_args, tuple(dims) if any(dims) else None, source), wrapped


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
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No complete tensor found")  # about the placeholders
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
    sample = {f"input_{i}": to_storage(to_numpy(a)) for i, a in enumerate(args)}
    sample.update({f"output_{i}": to_storage(to_numpy(o)) for i, o in enumerate(flat)})
    return sample

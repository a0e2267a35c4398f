"""The PyTorch pipeline every PyTorch frontend ends in: exported program -> IREE input
IR, plus the golden sample (PyTorch's own outputs), reduced-precision variants of the
program and, for shared weights, a parameter archive.

With shared weights every parameter and buffer becomes a named external parameter
(`#flow.parameter.named<"model"::"layer.weight">`), written once to `weights.irpa`,
and the program saved in the bundle keeps only the weights' shapes (stride-0
placeholders), so the bundle holds one copy of the weights.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import replace
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from pathlib import Path

import numpy as np
import torch
import torch.utils._pytree as pytree

from hxc import dtypes
from hxc.compiler.examples import Example, read_example
from hxc.compiler.imported import PARAMETER_SCOPE, ImportedModel, ImportOptions, wants_shared_weights
from hxc.compiler.lower import lower
from hxc.compiler.torch_export import ExportedModel, export_module, save_program
from hxc.dtypes import to_numpy, to_storage
from hxc.errors import LoweringError, UsageError
from hxc.manifests.schema import MAIN, PROGRAM_PT2, Stage, StageTensor, TensorSpec

if TYPE_CHECKING:
    from hxc.compiler.stages import StagePart


def import_torch(
    export: Callable[[], ExportedModel], options: ImportOptions, workdir: Path, on_stage: Callable[[str], None]
) -> ImportedModel:
    """Import the model `export()` loads and exports (a frontend's own step)."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    on_stage("loading model")
    model = export()
    if model.functions_module is None and options.precision in dtypes.WEIGHT_BITS:
        raise UsageError(f"{model.source}: --precision {options.precision} quantises the weights of language models "
                         "only; this model is not one", hint="build fp16 or bf16 for other models")  # fmt: skip
    if model.functions_module is not None:  # --stages included: a language model cuts itself (`hxc_stages`)
        from hxc.compiler.functions import import_functions

        return import_functions(model.functions_module, name=model.name, source=model.source,
                                source_format=model.source_format, digest=model.source_sha256, options=options,
                                workdir=workdir, on_stage=on_stage)  # fmt: skip
    if options.example:
        model = with_example(model, read_example(options.example))
    timings["load"] = time.perf_counter() - t
    if options.stages:
        return _import_stages(model, options, workdir, on_stage, timings)
    return _import_program(model, options, workdir, on_stage, timings)


def _import_program(model: ExportedModel, options: ImportOptions, workdir: Path, on_stage: Callable[[str], None],
                    timings: dict[str, float], *, keep_program: bool = True) -> ImportedModel:  # fmt: skip
    """One exported program (a model, or one of its stages) to IREE input IR, with its
    golden sample and, for shared weights, its parameter archive; with `keep_program`,
    the program file the bundle keeps."""
    t = time.perf_counter()
    on_stage("running PyTorch for the golden sample")
    golden = golden_sample(model.reference, model.example_args)
    timings["golden"] = time.perf_counter() - t

    program, precision_error = model.program, None
    if options.precision != "fp32":
        on_stage(f"converting to {options.precision}")
        program, precision_error = _at_precision(model, options.precision, golden)
    if options.interface_casts:
        on_stage("casting the interface")
        program = _with_casts(program, model, dict(options.interface_casts))

    t = time.perf_counter()
    on_stage("lowering to IREE input IR")
    weights = _program_weights(program)
    total = sum(w.numel() * w.element_size() for w in weights.values())
    has_bf16 = any(w.dtype == torch.bfloat16 for w in weights.values())
    # A cast interface is for one variant: its weights (cast like the rest) go inside it.
    shared = bool(weights) and not options.interface_casts and wants_shared_weights(options.weights, total, has_bf16)
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
    lowered = lower(program, narrow_int64=("i64", "i32") in options.interface_casts)
    if len(lowered.signature.outputs) != sum(1 for k in golden if k.startswith("output_")):
        raise LoweringError("PyTorch returned a different number of outputs than the exported program")
    mlir = workdir / "model.mlirbc"
    mlir.write_bytes(lowered.mlir)
    timings["lower"] = time.perf_counter() - t

    # The bundle keeps the model's own program; reduced-precision ones are derived from it.
    program_path = _keep_program(model, program, options, shared, workdir) if keep_program else None
    return ImportedModel(
        name=model.name,
        source=model.source,
        source_format=model.source_format,
        source_sha256=model.source_sha256,
        mlir=mlir,
        signature=lowered.signature,
        golden=golden,
        program=program_path,
        program_name=PROGRAM_PT2 if program_path is not None else None,
        weights=irpa,
        int64_constants=lowered.int64_constants,
        weight_dtypes=tuple(sorted({d.name for w in _program_weights(model.program).values()
                                    if (d := dtypes.from_torch(w.dtype)) is not None})),  # fmt: skip
        precision=options.precision,
        precision_error=precision_error,
        operators_at=lowered.operators_at,
        timings=timings,
    )


def _keep_program(model: ExportedModel, program: torch.export.ExportedProgram, options: ImportOptions, shared: bool,
                  workdir: Path) -> Path | None:  # fmt: skip
    """The program file the bundle keeps: the model's own program, without its weights
    when they are in the parameter archive(s)."""
    if options.interface_casts:
        return None  # only the model's own import provides the bundle's program
    path = workdir / PROGRAM_PT2
    if shared and options.precision == "fp32":
        _save_without_weights(program, path)
    else:
        save_program(model.program, path)
    return path


def _import_stages(model: ExportedModel, options: ImportOptions, workdir: Path, on_stage: Callable[[str], None],
                   timings: dict[str, float]) -> ImportedModel:  # fmt: skip
    """The model cut into stages (`hxc.compiler.stages`), each imported as a program of
    its own with its own weights, under the model's record: its signature, golden
    sample and program."""
    from hxc.compiler.lower import program_signature
    from hxc.compiler.stages import parse_stages, split_program

    request = parse_stages(options.stages or "")
    t = time.perf_counter()
    on_stage("running PyTorch for the golden sample")
    golden = golden_sample(model.reference, model.example_args)
    timings["golden"] = time.perf_counter() - t
    on_stage("cutting the program into stages")
    parts = split_program(model.program, model.example_args, request, model.source)
    # One decision for every stage: a stage's archive is shared when the model's would be.
    weights = _program_weights(model.program)
    total = sum(w.numel() * w.element_size() for w in weights.values())
    shared = bool(weights) and not options.interface_casts and wants_shared_weights(
        options.weights, total, any(w.dtype == torch.bfloat16 for w in weights.values()))  # fmt: skip
    per_stage = replace(options, weights="shared" if shared else "inline", example=None)
    stages = []
    for part in parts:
        on_stage(f"importing stage {part.index} of {len(parts)}")
        sub = workdir / part.name
        sub.mkdir()
        program = export_module(part.module, part.example_args, part.dynamic_shapes, f"{model.source} (stage {part.index})")
        stage_model = replace(model, name=f"{model.name}#{part.name}", program=program, example_args=part.example_args,
                              reference=part.module)  # fmt: skip
        spent: dict[str, float] = {}
        imported = _import_program(stage_model, per_stage, sub, on_stage, spent, keep_program=False)
        for k, v in spent.items():
            timings[f"stages {k}"] = timings.get(f"stages {k}", 0.0) + v
        stages.append(replace(imported, stage=_stage_record(part, imported)))
    return ImportedModel(
        name=model.name,
        source=model.source,
        source_format=model.source_format,
        source_sha256=model.source_sha256,
        mlir=stages[0].mlir,
        signature=program_signature(model.program),
        golden=golden,
        program=_keep_program(model, model.program, options, shared, workdir),
        program_name=None if options.interface_casts else PROGRAM_PT2,
        int64_constants=any(s.int64_constants for s in stages),
        weight_dtypes=tuple(sorted({d.name for w in weights.values() if (d := dtypes.from_torch(w.dtype)) is not None})),
        precision=options.precision,
        precision_error=max((s.precision_error for s in stages if s.precision_error is not None), default=None),
        timings=timings,
        stages=tuple(stages),
    )


def _stage_record(part: StagePart, imported: ImportedModel) -> Stage:
    """The manifest's record of a stage, its artifacts not yet known."""
    sig, golden = imported.signature, imported.golden

    def tensors(names: tuple[str, ...], specs: tuple[TensorSpec, ...], kind: str) -> tuple[StageTensor, ...]:
        return tuple(StageTensor(n, s.dtype, s.shape, int(golden[f"{kind}_{i}"].nbytes))
                     for i, (n, s) in enumerate(zip(names, specs)))  # fmt: skip

    return Stage(index=part.index, name=part.name, function=MAIN, artifacts=(), first_module=part.first_module,
                 last_module=part.last_module, inputs=tensors(part.inputs, sig.inputs, "input"),
                 outputs=tensors(part.outputs, sig.outputs, "output"), weights_bytes=part.weights_bytes, flops=part.flops)


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


class _CastInterface(torch.nn.Module):
    """The model behind an interface of other element types: inputs arrive as the
    artifact's types and are cast back to what the model takes; outputs leave cast to
    the artifact's types. Floating types promoted to f32 are computed in f32."""

    def __init__(self, module: torch.nn.Module, in_dtypes: list[torch.dtype], casts: dict[torch.dtype, torch.dtype]):
        super().__init__()
        promoted = {d for d, to in casts.items() if d.is_floating_point and to == torch.float32}
        if promoted:
            module = module.to(torch.float32)
            _promote_graph_dtypes(module, promoted)
        self.module = module
        self.model_dtypes = [torch.float32 if d in promoted else d for d in in_dtypes]
        self.casts = casts

    def forward(self, *args: torch.Tensor):
        args = tuple(a.to(d) for a, d in zip(args, self.model_dtypes))
        out = self.module(*args)
        return pytree.tree_map(lambda t: t.to(self.casts.get(t.dtype, t.dtype)) if isinstance(t, torch.Tensor) else t, out)


# Reinterpreting bits (`x.view(torch.int16)`): its element type is the point, not a
# precision to promote.
_BITCASTS = {torch.ops.aten.view.dtype}


def _promote_graph_dtypes(module: torch.nn.Module, promoted: set[torch.dtype]) -> None:
    """Compute in f32 what the exported graph itself makes in a `promoted` type:
    `.to(torch.float32)` casts parameters and buffers, but the graph also names dtypes
    (`torch.full(..., dtype=x.dtype)` for an additive attention mask, `.to(bf16)`) and
    holds tensor constants; left as they were, a bf16 mask met an f32 query in
    scaled_dot_product_attention and the re-export failed."""
    def widen(x: Any) -> Any:
        return torch.float32 if isinstance(x, torch.dtype) and x in promoted else x

    for gm in module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                owner, _, leaf = node.target.rpartition(".")
                holder = gm.get_submodule(owner) if owner else gm
                t = getattr(holder, leaf, None)
                if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter) and t.dtype in promoted:
                    setattr(holder, leaf, t.to(torch.float32))
            elif node.op == "call_function" and node.target not in _BITCASTS:
                node.args = pytree.tree_map(widen, node.args)
                node.kwargs = pytree.tree_map(widen, node.kwargs)
        gm.recompile()


def _with_casts(program: torch.export.ExportedProgram, model: ExportedModel, casts: dict[str, str]) -> torch.export.ExportedProgram:
    """`program` re-exported behind an interface with `casts` applied (see _CastInterface)."""
    by_dtype = {dtypes.dtype(k).torch_dtype(): dtypes.dtype(v).torch_dtype() for k, v in casts.items()}
    in_dtypes = [a.dtype for a in model.example_args]
    if by_dtype.get(torch.int64) == torch.int32:
        # Decompose first: decompositions create int64 constants too (upsampling indices).
        from hxc.compiler.lower import to_core_aten

        module = to_core_aten(program).module()
        _aten_views(module)
        _narrow_int64_constants(module, model.source)
    else:
        module = program.module()
    wrapped = _CastInterface(copy.deepcopy(module), in_dtypes, by_dtype)  # .to() would change the shared weights
    args = tuple(a.to(by_dtype.get(a.dtype, a.dtype)) for a in model.example_args)
    return export_module(wrapped, args, _varargs_dynamic_shapes(program), model.source)


# Aliasing prims that torch's decompositions leave in a core-ATen graph, and the ATen view
# op taking the same arguments. Re-exported, the graph is functionalized again, which
# refuses a non-ATen op whose output aliases its input ("Found a custom (non-ATen)
# operator whose output has alias annotations: prims::squeeze"): DeBERTa's attention
# mask, Mamba's conv weight and torch.triu_indices (the DLRM-style recommender) all hit it.
_PRIM_VIEWS = {
    torch.ops.prims.squeeze.default: torch.ops.aten.squeeze.dims,
    torch.ops.prims.transpose.default: torch.ops.aten.permute.default,
    torch.ops.prims.view_of.default: torch.ops.aten.alias.default,
}


def _aten_views(gm: torch.fx.GraphModule) -> None:
    """Replace the aliasing prims of a decomposed graph by their ATen views (_PRIM_VIEWS)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _PRIM_VIEWS:
            node.target = _PRIM_VIEWS[node.target]
    gm.recompile()


_CLAMPED_BOUNDS = {torch.ops.aten.slice.Tensor, torch.ops.aten.slice_copy.Tensor, torch.ops.aten.slice_scatter.default}


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    return target._schema.name.replace("::", ".") if isinstance(target, torch._ops.OpOverload) else str(target)


def _narrow_int64_constants(gm: torch.fx.GraphModule, source: str) -> None:
    """Store the graph's int64 constants (buffers such as position ids, lifted tensors)
    as int32 and widen them where they are read. IREE's i64->i32 demotion cannot
    rewrite large i64 constants (MLIR resource blobs); an i32 constant plus a
    conversion it can. A constant outside the 32-bit range makes demotion unsafe, as
    does an integer literal beyond it in an op computing int64 (slice bounds excepted:
    they are clamped to the dimension)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target not in _CLAMPED_BOUNDS:
            val = node.meta.get("val")
            big = [x for x in pytree.tree_leaves((node.args, node.kwargs)) if type(x) is int and not -(2**31) <= x < 2**31]
            if big and isinstance(val, torch.Tensor) and val.dtype == torch.int64:
                raise LoweringError(
                    f"{source}: {_op_name(node)} computes int64 with the constant {big[0]}, beyond 32 bits; "
                    "portable SPIR-V computes int64 in 32 bits, so this model needs a variant with native int64",
                    hint="compile for vulkan:desktop",
                )
        if node.op != "get_attr":
            continue
        owner, _, leaf = node.target.rpartition(".")
        holder = gm.get_submodule(owner) if owner else gm
        t = getattr(holder, leaf, None)
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
            continue
        if t.numel() and (int(t.min()) < -(2**31) or int(t.max()) >= 2**31):
            raise LoweringError(
                f"{source}: constant {node.target} holds 64-bit integers beyond 32 bits; "
                "portable SPIR-V computes int64 in 32 bits, so this model needs a variant with native int64",
                hint="compile for vulkan:desktop",
            )
        narrow = f"{leaf}_hxc_i32"
        holder.register_buffer(narrow, t.to(torch.int32), persistent=False)
        with gm.graph.inserting_after(node):
            read = gm.graph.get_attr(f"{owner}.{narrow}" if owner else narrow)
        with gm.graph.inserting_after(read):
            wide = gm.graph.call_function(torch.ops.aten._to_copy.default, (read,), {"dtype": torch.int64})
        node.replace_all_uses_with(wide)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def _varargs_dynamic_shapes(program: torch.export.ExportedProgram) -> tuple | None:
    """`program`'s dynamic dimensions for a wrapper whose forward takes `*args`:
    torch.export wants them nested as the one `args` parameter."""
    from hxc.compiler.lower import program_signature

    dims = tuple({j: torch.export.Dim.DYNAMIC for j, d in enumerate(s.shape) if isinstance(d, str)}
                 for s in program_signature(program).inputs)  # fmt: skip
    return (dims,) if any(dims) else None


def with_example(model: ExportedModel, example: Example) -> ExportedModel:
    """`model` with the example file's arrays as its example inputs (the golden
    sample's), checked against the program's inputs."""
    import dataclasses

    from hxc.compiler.lower import program_signature

    specs = program_signature(model.program).inputs
    args = []
    for a, spec in zip(example.ordered([s.name for s in specs]), specs):
        a = dtypes.from_storage(a, spec.dtype)
        found = dtypes.from_numpy(a.dtype)
        if found is None or found.name != spec.dtype:
            raise UsageError(f"{example.path}: the array for input {spec.name!r} is {a.dtype}; the model takes {spec.format()}")
        if a.ndim != len(spec.shape) or any(isinstance(d, int) and d != n for d, n in zip(spec.shape, a.shape)):
            raise UsageError(f"{example.path}: the array for input {spec.name!r} has shape "
                             f"{'x'.join(map(str, a.shape)) or 'scalar'}; the model takes {spec.format()}")  # fmt: skip
        args.append(dtypes.to_torch(a, spec.dtype))
    return dataclasses.replace(model, example_args=tuple(args))


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

    dtype = dtypes.dtype(dtypes.PRECISIONS[precision]).torch_dtype()
    wrapped = AtPrecision(copy.deepcopy(program.module()), dtype)
    return export_module(wrapped, example_args, _varargs_dynamic_shapes(program), source), wrapped


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
            save_program(program, path)
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

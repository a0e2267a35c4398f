"""Models of several functions with state kept on the device: one IR module with one
entry point per function, the weights shared by all of them.

A PyTorch module declares them on itself (`hxc.functions.Function`: `hxc_functions`
and `hxc_state`). A function's method (its name, or `method=`) takes its `args` and then the state it
reads, in order, and returns its outputs followed by the state it writes, in order.
Each is exported with iree-turbine's `FxProgramsBuilder` (two `export_program`s on one
root module: the parameters become globals shared by every entry point), decomposed
to core ATen like a single program (`hxc.compiler.lower`), and imported as one module.
The golden sample holds each function's inputs (state included, from the examples)
and PyTorch's own outputs, under `step.input_0`, ... (`golden_prefix`), unless the
module's `hxc_describe` replaces it (a language model keeps its greedy reference).

Weights go where `--weights` says, as for one program (`hxc.compiler.torch_import`):
`shared` (and `auto` from 16 MiB, or with bf16) makes every parameter and buffer a
named external parameter, written once to the bundle's `weights.irpa` and read by
every artifact; `inline` puts them in each artifact. A module may fix the mode with
`hxc_weights` (a language model: always shared), and then the other is refused.

What this first form leaves out, each refused in one line: reduced precision (but a
language model's weight-only int8 / int4, `hxc.compiler.quantize`) and interface casts
(a variant that needs them fails alone).
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from hxc.compiler.imported import PARAMETER_SCOPE, ImportedModel, ImportOptions, wants_shared_weights
from hxc.dtypes import WEIGHT_BITS, from_torch, to_numpy, to_storage
from hxc.functions import Function
from hxc.errors import LoweringError, ModelLoadError, UsageError, first_line
from hxc.manifests.schema import (FunctionSpec, OutputTree, Signature, Stage, StageFunction, StageTensor, StateSpec,
                                  TensorSpec, golden_prefix)

MAX_FUNCTIONS = 64  # as the manifest reader allows
# Where a module that fixes its weights mode (`hxc_weights`) keeps them, for the refusal.
_KEPT = {"shared": "once per bundle, in weights.irpa, for every target", "inline": "inside each artifact"}


def declared_functions(module: Any) -> dict[str, Function] | None:
    """The functions `module` declares, or None for a plain model (one `forward`)."""
    declared = getattr(module, "hxc_functions", None)
    return dict(declared) if declared else None


def import_functions(module: torch.nn.Module, *, name: str, source: str, source_format: str, digest: str,
                     options: ImportOptions, workdir: Path, on_stage: Callable[[str], None]) -> ImportedModel:  # fmt: skip
    quantization, precision_error = None, None
    if options.stages and not callable(getattr(module, "hxc_stages", None)):
        raise UsageError(f"{source}: --stages cuts models of one function and language models; this one declares "
                         "several functions")  # fmt: skip
    if options.precision in WEIGHT_BITS:  # a language model's weights as int8 / int4
        from hxc.compiler.quantize import quantized_language_model

        on_stage(f"quantising the weights to {options.precision}")
        module, quantization, precision_error = quantized_language_model(module, options.precision, options.group_size,
                                                                         workdir)  # fmt: skip
    elif options.precision != "fp32":
        raise UsageError(f"{source}: models of several functions are built in fp32 only, not {options.precision}",
                         hint="language models also build int8 and int4 (weight-only quantisation)")  # fmt: skip
    if options.interface_casts:
        raise LoweringError("models of several functions cannot take a cast interface yet (this variant needs "
                            f"{', '.join(f'{a} as {b}' for a, b in options.interface_casts)})")  # fmt: skip
    fixed = getattr(module, "hxc_weights", None)
    if fixed is not None and options.weights not in ("auto", fixed):
        raise UsageError(f"{source}: --weights {options.weights} is not available for this model: it keeps its weights "
                         f"{_KEPT[fixed]}")  # fmt: skip
    run = functools.partial(_import_module, name=name, source=source, source_format=source_format, digest=digest,
                            options=options, on_stage=on_stage)  # fmt: skip
    if options.stages:
        return _import_stages(module, options.stages, run, workdir, on_stage)
    imported = replace(run(module, workdir=workdir), precision_error=precision_error, quantization=quantization)
    # A module may describe itself further: a language model adds its manifest record
    # and its tokenizer's files (hxc.compiler.causal_lm).
    describe = getattr(module, "hxc_describe", None)
    return describe(imported, workdir) if callable(describe) else imported


def _import_stages(module: torch.nn.Module, stages: str, run: Callable[..., ImportedModel], workdir: Path,
                   on_stage: Callable[[str], None]) -> ImportedModel:  # fmt: skip
    """A model that cuts itself into stages (`hxc_stages`: a language model at its
    decoder layers), each stage a module of the same functions imported on its own by
    `run` (`_import_module`: its IR and its weights archive), under the whole model's
    record: its functions, golden sample and description, with no IR of its own (`mlir`
    is stage 0's)."""
    from hxc.compiler.stages import parse_stages

    parts = module.hxc_stages(parse_stages(stages))  # type: ignore[operator]
    whole = run(module, workdir=workdir, lower=False)
    describe = getattr(module, "hxc_describe", None)
    whole = describe(whole, workdir) if callable(describe) else whole
    out = []
    for part, record in parts:
        on_stage(f"importing stage {record.index} of {len(parts)}")
        sub = workdir / record.name
        sub.mkdir()
        imported = run(part, workdir=sub, name=f"{whole.name}#{record.name}")
        for k, v in imported.timings.items():
            whole.timings[f"stages {k}"] = whole.timings.get(f"stages {k}", 0.0) + v
        out.append(replace(imported, stage=_stage_record(record, imported, whole.functions)))
    return replace(whole, mlir=out[0].mlir, weights=None, stages=tuple(out))


def _stage_record(record: Stage, imported: ImportedModel, model: dict[str, FunctionSpec]) -> Stage:
    """`record` with what crosses into and out of each of its functions: the leading
    inputs that are not the model function's own arguments came from the stage before;
    bytes at the golden sample's shapes."""
    functions = {}
    for fname, spec in imported.functions.items():
        own = {t.name for t in model[fname].signature.inputs}
        sig, prefix = spec.signature, golden_prefix(fname)
        crossing = next((i for i, t in enumerate(sig.inputs) if t.name in own), len(sig.inputs))
        inputs = tuple(StageTensor(t.name, t.dtype, t.shape, int(imported.golden[f"{prefix}input_{i}"].nbytes))
                       for i, t in enumerate(sig.inputs[:crossing]))  # fmt: skip
        outputs = tuple(StageTensor(t.name, t.dtype, t.shape, int(imported.golden[f"{prefix}output_{i}"].nbytes))
                        for i, t in enumerate(sig.outputs))  # fmt: skip
        functions[fname] = StageFunction(inputs, tuple(t.name for t in sig.inputs[crossing:]), outputs,
                                         tuple(s.name for s in spec.states))  # fmt: skip
    step = functions[record.function]
    return replace(record, inputs=step.inputs, outputs=step.outputs, functions=functions)


def _import_module(module: torch.nn.Module, *, name: str, source: str, source_format: str, digest: str,
                   options: ImportOptions, workdir: Path, on_stage: Callable[[str], None],
                   lower: bool = True) -> ImportedModel:  # fmt: skip
    """The module's functions run by PyTorch (the golden sample, the signatures) and,
    with `lower`, imported as one IR module with its weights archive."""
    functions = declared_functions(module)
    assert functions is not None
    states = _states(module, functions, source)
    fixed = getattr(module, "hxc_weights", None)
    timings: dict[str, float] = {}
    module.eval()

    t = time.perf_counter()
    on_stage("running PyTorch for the golden sample")
    golden: dict[str, Any] = {}
    specs: dict[str, FunctionSpec] = {}
    calls: dict[str, tuple[Callable[..., Any], tuple[torch.Tensor, ...], Any]] = {}
    for fname, fn in functions.items():
        method = getattr(module, fn.method or fname, None)
        if not callable(method):
            raise ModelLoadError(f"{source}: function {fname!r} has no method {fn.method or fname!r} on the module")
        args = (*fn.args, *(states[s] for s in fn.reads))
        with torch.no_grad():
            try:
                out = method(*args)
            except Exception as e:
                raise ModelLoadError(f"{source}: function {fname!r} raised {type(e).__name__}: {first_line(e)}") from None
        flat = pytree.tree_leaves(out)
        if not all(isinstance(x, torch.Tensor) for x in flat) or len(flat) < len(fn.writes):
            raise LoweringError(f"function {fname!r} must return tensors: its outputs, then the state it writes "
                                f"({', '.join(fn.writes) or 'none'})")  # fmt: skip
        for s, value in zip(fn.writes, flat[len(flat) - len(fn.writes):]):
            if value.shape != states[s].shape or value.dtype != states[s].dtype:
                raise LoweringError(f"function {fname!r} returns state {s} as {tuple(value.shape)} {value.dtype}; "
                                    f"hxc_state declares {tuple(states[s].shape)} {states[s].dtype}")  # fmt: skip
        prefix = golden_prefix(fname)
        golden.update({f"{prefix}input_{i}": to_storage(to_numpy(a)) for i, a in enumerate(args)})
        golden.update({f"{prefix}output_{i}": to_storage(to_numpy(o)) for i, o in enumerate(flat)})
        user = flat[: len(flat) - len(fn.writes)]
        names = [*fn.arg_names, *(f"input_{i}" for i in range(len(fn.arg_names), len(fn.args)))]
        signature = Signature(inputs=tuple(_spec(n, a, _dims(fn, i)) for i, (n, a) in enumerate(zip(names, fn.args))),
                              outputs=tuple(_spec(f"output_{i}", o) for i, o in enumerate(user)),
                              output_tree=_tree(len(user)))  # fmt: skip
        specs[fname] = FunctionSpec(signature, reads=tuple(_state(s, states[s], module) for s in fn.reads),
                                    writes=tuple(_state(s, states[s], module) for s in fn.writes))  # fmt: skip
        calls[fname] = (method, args, _dynamic_shapes(fn, len(args)))
    timings["golden"] = time.perf_counter() - t

    mlir = workdir / "model.mlirbc"
    irpa = None
    if lower:
        t = time.perf_counter()
        on_stage("lowering to IREE input IR")
        weights = _module_weights(module)
        total = sum(w.numel() * w.element_size() for w in weights.values())
        has_bf16 = any(w.dtype == torch.bfloat16 for w in weights.values())
        shared = bool(weights) and wants_shared_weights(fixed or options.weights, total, has_bf16)
        if has_bf16 and not shared:
            raise UsageError(f"{source}: this model has bf16 parameters, which iree-turbine cannot store inside an artifact",
                             hint="use --weights shared (the default, auto, does this)")  # fmt: skip
        irpa = workdir / f"weights-{options.precision}.irpa" if shared else None
        mlir.write_bytes(_lower(module, calls, weights if shared else {}, irpa))
        timings["lower"] = time.perf_counter() - t
    first = next(iter(specs.values()))
    return ImportedModel(
        name=name,
        source=source,
        source_format=source_format,
        source_sha256=digest,
        mlir=mlir,
        signature=first.call_signature,
        golden=golden,
        program=None,
        program_name=None,
        weights=irpa,
        weight_dtypes=tuple(sorted({d.name for p in module.state_dict().values()
                                    if (d := from_torch(p.dtype)) is not None})),  # fmt: skip
        precision=options.precision,
        timings=timings,
        functions=specs,
    )


def _states(module: Any, functions: dict[str, Function], source: str) -> dict[str, torch.Tensor]:
    if len(functions) > MAX_FUNCTIONS:
        raise UsageError(f"{source}: {len(functions)} functions; hxc takes at most {MAX_FUNCTIONS}")
    states = dict(getattr(module, "hxc_state", None) or {})
    for fname, fn in functions.items():
        if not fname.isidentifier():
            raise UsageError(f"{source}: function name {fname!r} is not an identifier")
        if not isinstance(fn, Function):
            raise UsageError(f"{source}: hxc_functions[{fname!r}] is a {type(fn).__name__}, not hxc.functions.Function")
        if unknown := [s for s in (*fn.reads, *fn.writes) if s not in states]:
            raise UsageError(f"{source}: function {fname!r} names state {', '.join(unknown)}, which hxc_state does not declare")
        if not all(isinstance(a, torch.Tensor) for a in fn.args):
            raise UsageError(f"{source}: function {fname!r}: example args must be tensors")
        for d in fn.dynamic:
            if not (0 <= d.arg < len(fn.args) and 0 <= d.axis < fn.args[d.arg].ndim and d.name.isidentifier()
                    and 2 <= d.min <= fn.args[d.arg].shape[d.axis] <= d.max):
                raise UsageError(f"{source}: function {fname!r}: dynamic dimension {d.name!r} (argument {d.arg}, axis "
                                 f"{d.axis}, {d.min}..{d.max}) does not fit its example arguments")  # fmt: skip
    for s, value in states.items():
        if not isinstance(value, torch.Tensor) or value.ndim == 0:
            raise UsageError(f"{source}: hxc_state[{s!r}] must be an example tensor with at least one dimension")
    return states


def _spec(label: str, t: torch.Tensor, dynamic: dict[int, str] | None = None) -> TensorSpec:
    found = from_torch(t.dtype)
    if found is None:
        raise LoweringError(f"{label} has dtype {t.dtype}, which hxc does not support")
    return TensorSpec(label, found.name, tuple((dynamic or {}).get(a, int(n)) for a, n in enumerate(t.shape)))


def _dims(fn: Function, arg: int) -> dict[int, str]:
    """The dynamic axes of argument `arg` of `fn`, by the name the manifest gives them."""
    return {d.axis: d.name for d in fn.dynamic if d.arg == arg}


def _dynamic_shapes(fn: Function, count: int) -> Any:
    """torch.export's dynamic_shapes for `fn`'s `count` arguments (its state included),
    as the exported entry takes them: one varargs tuple."""
    if not fn.dynamic:
        return None
    dims = {d.name: torch.export.Dim(d.name, min=d.min, max=d.max) for d in fn.dynamic}
    shapes: list[Any] = [None] * count
    for d in fn.dynamic:
        shapes[d.arg] = {**(shapes[d.arg] or {}), d.axis: dims[d.name]}
    return (tuple(shapes),)


def _state(name: str, example: torch.Tensor, module: Any) -> StateSpec:
    spec = _spec(name, example)
    slots = int(getattr(module, "hxc_state_slots", {}).get(name, 1))
    return StateSpec(name=name, dtype=spec.dtype, shape=tuple(int(d) for d in spec.shape),
                     bytes=example.numel() * example.element_size(), slots=slots)  # fmt: skip


def _tree(outputs: int) -> OutputTree:
    if outputs == 1:
        return OutputTree("leaf", 0)
    return OutputTree("tuple", items=tuple(OutputTree("leaf", i) for i in range(outputs)))


def _module_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, each tensor once (a submodule reachable by two
    names, as CausalLM's aliases of the model's layers, keeps its first name)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _lower(module: torch.nn.Module, calls: dict[str, tuple[Callable[..., Any], tuple[torch.Tensor, ...], Any]],
           external: dict[str, torch.Tensor], irpa: Path | None) -> bytes:  # fmt: skip
    """One MLIR module: each function exported from the shared root module, decomposed
    to core ATen with hxc's table, and imported together (weights as shared globals).
    With `irpa`, the tensors in `external` become named parameters
    (`#flow.parameter.named<"model"::name>`) written to that archive, not into the IR."""
    from iree.turbine import aot
    from iree.turbine.aot import ExternalTensorTrait, ParameterArchiveBuilder
    from iree.turbine.aot.compiled_module import ExportTargetDef

    from hxc.compiler.lower import _bytecode, _decompose, decomposition_table

    # The trait is an attribute on the tensor itself (the user's model's): set for the
    # export, removed after it, so the module is left as it was given.
    for name, tensor in external.items():
        ExternalTensorTrait(external_scope=PARAMETER_SCOPE, external_name=name).set(tensor)
    try:
        builder = aot.FxProgramsBuilder(module)
        table = decomposition_table()
        for fname, (method, args, dynamic_shapes) in calls.items():
            attr = method.__name__

            def entry(root: torch.nn.Module, *a: torch.Tensor, _attr: str = attr) -> Any:
                return getattr(root, _attr)(*a)

            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    builder.export_program(entry, name=fname, args=args, dynamic_shapes=dynamic_shapes, strict=False)
            except Exception as e:
                raise LoweringError(f"cannot export function {fname!r} ({type(e).__name__}: {first_line(e)})") from None
            builder.programs[fname] = ExportTargetDef(_decompose(builder.programs[fname].target, table))
        if irpa is not None:
            archive = ParameterArchiveBuilder()
            for name, tensor in external.items():
                archive.add_tensor(name, tensor.detach().contiguous())
            archive.save(irpa)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exported = aot.export(builder, module_name="module")
        except Exception as e:
            raise LoweringError(f"cannot import the functions into MLIR ({type(e).__name__}: {first_line(e)})") from None
        return _bytecode(exported)
    finally:
        for tensor in external.values():
            tensor.__dict__.pop("_turbine_external_tensor_trait", None)

"""The ONNX frontend: model.onnx -> IREE input IR (the torch dialect's `onnx.*` ops, as
MLIR bytecode), plus the golden sample (ONNX Runtime's outputs) and, for shared
weights, a parameter archive.

How the model is prepared for IREE's ONNX importer (the library behind
`iree-import-onnx`, called in-process so the module can be adjusted before it is
written):
- Opset: models older than opset 17 are upgraded with onnx.version_converter first:
  torch-mlir's ONNX lowerings are written against recent operator versions, and old
  ones (6-11) otherwise fail to legalize. If the converter cannot upgrade a model,
  the original is imported as is.
- Entry point: the importer names the function after the graph (`main_graph` from
  torch.onnx.export). hxc's runtime calls `main`, so the graph is renamed before import.
- Shapes: `--input` specs fix (or free) input dimensions in the graph, then ONNX shape
  inference runs. A dynamic dimension keeps its ONNX `dim_param` name in the
  signature (`batch`), or `d{input}_{dim}` when the model leaves it unnamed.
- Locations: every top-level node is located at `FILE.onnx:N:0`, N being its 1-based
  position in the graph, so an iree-compile failure names the ONNX operator and node
  (`cannot lower onnx.DFT (at model.onnx:2)`) through `operators_at`.
- Weights: with shared weights, initializers of at least NUM_ELEMENTS_THRESHOLD
  elements become `#stream.parameter.named<"model"::NAME>` and are written to
  `weights.irpa`; smaller ones (shape constants the compiler must see) stay inline.

The golden sample runs the user's original file with ONNX Runtime on deterministic
inputs: standard-normal floats, integers 0..9 and random booleans (as the PyTorch
frontend does); if ONNX Runtime rejects those integers (an index out of range, a
zero divisor), it is run again with every integer input at 0, then at 1. A dynamic
dimension with no `--input` size gets size 2 (`hxc.dtypes.DYNAMIC_EXAMPLE_SIZE`, as in
the PyTorch frontend), one size per dimension name. `--example inputs.npz` replaces
the generated inputs (and may carry expected outputs). The golden sample is a
convenience, never a condition: when ONNX Runtime cannot load the model or run it on
those inputs, the bundle is built with inputs only and `golden_note` says why, so
`hxc verify` can say it has nothing to compare against.

The program stored in the bundle (`model.onnx`) is the user's graph as given (not
upgraded, shapes not fixed), in one file:
- inline weights: the source file itself, or, when its weights live in an external
  data file, the model re-saved with its weights embedded;
- shared weights: the graph whose large initializers are ONNX external data pointing
  at byte ranges of `weights.irpa` (location, offset, length), so the bundle holds the
  weights once and `onnxruntime.InferenceSession(bundle / "model.onnx")` still runs.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hxc.compiler.examples import Example, read_example
from hxc.compiler.imported import PARAMETER_SCOPE, ImportedModel, ImportOptions, wants_shared_weights
from hxc.compiler.specs import example_arrays, parse_input_spec
from hxc.dtypes import DYNAMIC_EXAMPLE_SIZE, dtype, from_numpy, from_onnx, from_storage, interface_dtype, to_storage
from hxc.errors import LoweringError, ModelLoadError, UsageError, first_line
from hxc.manifests.bundle import file_sha256
from hxc.manifests.schema import PROGRAM_ONNX, WEIGHTS_FILE, OutputTree, Signature, TensorSpec

log = logging.getLogger("hxc.compiler")

TARGET_OPSET = 17  # models below this default-domain opset are upgraded to it
# With shared weights, initializers with fewer elements stay inline in the IR: shape
# and index constants the compiler must fold (iree-import-onnx's default threshold).
NUM_ELEMENTS_THRESHOLD = 100
_TAG = "hxc.node."  # temporary node names that tie imported ops back to graph nodes
_TAGGED = re.compile(r'^loc\("hxc\.node\.(\d+)"\)$')


@dataclass(frozen=True)
class _Input:
    spec: TensorSpec  # what the artifact takes
    example_shape: tuple[int, ...]  # the golden sample's shape


def import_onnx(source: str, options: ImportOptions, workdir: Path, on_stage: Callable[[str], None]) -> ImportedModel:
    onnx = _onnx()
    path = Path(source)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    on_stage("loading ONNX model")
    original = load_proto(path)
    _check_external_data(original, path)
    inputs = _inputs(original, options)
    for v in original.graph.output:  # refuse unsupported outputs before any slow work
        if v.type.WhichOneof("value") == "tensor_type" and v.type.tensor_type.elem_type:
            _dtype(v.type.tensor_type.elem_type, f"output {v.name!r}")
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    on_stage("running ONNX Runtime for the golden sample")
    example = read_example(options.example) if options.example else None
    golden, golden_reference, golden_note = _golden(path, inputs, len(original.graph.output), example)
    timings["golden"] = time.perf_counter() - t

    t = time.perf_counter()
    on_stage("importing to IREE input IR")
    inits = list(original.graph.initializer)
    total = sum(_nbytes(x) for x in inits)
    has_bf16 = any(x.data_type == onnx.TensorProto.BFLOAT16 for x in inits)
    shared = any(_numel(x) >= NUM_ELEMENTS_THRESHOLD for x in inits) and wants_shared_weights(
        options.weights, total, has_bf16
    )
    shared = shared and not options.interface_casts  # a cast interface is for one variant: weights inside it
    model, names = _prepare(original, path, inputs, load_all=not shared, casts=options.interface_casts)
    label = path.name.replace(":", "_")
    irpa = workdir / WEIGHTS_FILE if shared else None
    mlir = workdir / "model.mlirbc"
    params = _to_mlir(model, names, label, mlir, irpa, path.parent)
    signature = Signature(
        inputs=tuple(i.spec for i in inputs),
        outputs=_output_specs(model, golden, mlir),
        output_tree=_output_tree(len(model.graph.output)),
    )
    operators_at = {f"{label}:{i + 1}": (_op_name(n),) for i, n in enumerate(original.graph.node)}
    timings["import"] = time.perf_counter() - t

    program = _program(original, path, workdir, irpa, params)
    return ImportedModel(
        name=path.stem,
        source=source,
        source_format="onnx",
        source_sha256=file_sha256(path),
        mlir=mlir,
        signature=signature,
        golden=golden,
        golden_reference=golden_reference,
        golden_note=golden_note,
        program=program,
        program_name=PROGRAM_ONNX,
        weights=irpa,
        weight_dtypes=tuple(sorted({d.name for x in inits if (d := from_onnx(x.data_type)) is not None})),
        operators_at=operators_at,
        timings=timings,
    )


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise UsageError("compiling ONNX models needs the onnx package", hint="pip install onnx onnxruntime") from None
    return onnx


# --- loading -----------------------------------------------------------------------


def load_proto(path: Path) -> Any:
    """The ModelProto, with external data left on disk. One-line ModelLoadError if the
    file is not a readable ONNX model."""
    onnx = _onnx()
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, onnx its own types
        raise ModelLoadError(f"{path}: corrupt or truncated ONNX model ({first_line(e)})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph nodes)")
    return model


def _tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto in a graph: initializers and constant attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _tensors(a.g)
            for g in a.graphs:
                yield from _tensors(g)


def _is_external(t: Any) -> bool:
    return t.HasField("data_location") and t.data_location == 1  # TensorProto.EXTERNAL


def _check_external_data(model: Any, path: Path) -> None:
    for t in _tensors(model.graph):
        if not _is_external(t):
            continue
        location = {e.key: e.value for e in t.external_data}.get("location", "")
        if not (path.parent / location).is_file():
            raise ModelLoadError(
                f"{path}: tensor {t.name!r} is stored in {location!r}, which is not beside the model",
                hint="keep the external data file(s) in the model's directory",
            )


def _load_external(tensors: Sequence[Any], base_dir: Path) -> None:
    from onnx.external_data_helper import load_external_data_for_tensor

    for t in tensors:
        if _is_external(t):
            load_external_data_for_tensor(t, str(base_dir))
            t.data_location = 0  # DEFAULT
            del t.external_data[:]


def source_digest(path: Path) -> str:
    """sha256 over the model file and every external data file it references, so a
    changed weights file beside the model is a different model to the import cache."""
    import hashlib

    from hxc.manifests.bundle import file_sha256

    model = load_proto(path)
    h = hashlib.sha256(file_sha256(path).encode())
    locations = sorted({{e.key: e.value for e in t.external_data}.get("location", "")
                        for t in _tensors(model.graph) if _is_external(t)})  # fmt: skip
    for loc in locations:
        f = path.parent / loc
        h.update(loc.encode() + (file_sha256(f) if f.is_file() else "missing").encode())
    return h.hexdigest()


def _numel(t: Any) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1


def _nbytes(t: Any) -> int:
    from onnx.helper import tensor_dtype_to_np_dtype

    try:
        return _numel(t) * tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):  # strings, packed 4-bit types
        return 0


def _op_name(node: Any) -> str:
    domain = node.domain if node.domain not in ("", "ai.onnx") else "onnx"
    return f"{domain}.{node.op_type}"


# --- signature -----------------------------------------------------------------------


def _inputs(model: Any, options: ImportOptions) -> list[_Input]:
    """The artifact's inputs: graph inputs that are not initializers, with `--input`
    specs (matched by name, else by position) fixing or freeing their dimensions."""
    initialized = {t.name for t in model.graph.initializer}
    graph_inputs = [v for v in model.graph.input if v.name not in initialized]
    # ONNX graphs take empty tensors as real inputs (e.g. an empty `axes`); PyTorch
    # exports specialise and miscompile zero sizes, so only this frontend allows them.
    specs = [parse_input_spec(s, i, allow_empty=True) for i, s in enumerate(options.inputs)]
    if len(specs) > len(graph_inputs):
        raise UsageError(f"{len(specs)} --input specs given, but the model has {len(graph_inputs)} input(s)")
    by_name = {s.name: s for s in specs}
    result = []
    for i, v in enumerate(graph_inputs):
        # A named spec is for its input only; an unnamed one (input_N) goes by position.
        positional = specs[i] if i < len(specs) and specs[i].name == f"input_{i}" else None
        spec = by_name.get(v.name) or positional
        result.append(_input(i, v, spec, options.dynamic_batch))
    return result


def _input(i: int, value: Any, spec: TensorSpec | None, dynamic_batch: bool) -> _Input:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        raise LoweringError(f"input {value.name!r} is a {kind or 'untyped value'}; hxc compiles tensor inputs only")
    tt = value.type.tensor_type
    elem = _dtype(tt.elem_type, f"input {value.name!r}")
    if not tt.HasField("shape") and spec is None:
        raise UsageError(f"input {value.name!r} has no shape in the model", hint="pass it, e.g. --input 1x3x224x224xf32")
    model_dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    if spec is not None:
        if spec.dtype != elem:
            raise UsageError(f"--input for {value.name!r} says {spec.dtype}, but the model's input is {elem}")
        if tt.HasField("shape") and len(spec.shape) != len(model_dims):
            raise UsageError(
                f"--input for {value.name!r} has {len(spec.shape)} dimensions, but the model's input has {len(model_dims)}"
            )
    dims: list[int | str] = []
    example: list[int] = []
    for j in range(len(spec.shape) if spec is not None else len(model_dims)):
        m = model_dims[j] if j < len(model_dims) else None
        s = spec.shape[j] if spec is not None else None
        if isinstance(s, int):
            if isinstance(m, int) and m != s:
                raise UsageError(f"--input for {value.name!r}: dimension {j} is {m} in the model, not {s}")
            dims.append(s)
            example.append(s)
        elif isinstance(s, str) or isinstance(m, str) or m is None or (dynamic_batch and j == 0):
            name = m if isinstance(m, str) else (s if isinstance(s, str) else ("batch" if dynamic_batch and j == 0 else f"d{i}_{j}"))
            dims.append(name)
            example.append(m if isinstance(m, int) else DYNAMIC_EXAMPLE_SIZE)
        else:
            dims.append(m)
            example.append(m)
    return _Input(TensorSpec(value.name, elem, tuple(dims)), tuple(example))


def _dtype(elem_type: int, label: str) -> str:
    what = f"ONNX type {_onnx().TensorProto.DataType.Name(elem_type)}" if elem_type else "no element type"
    return interface_dtype(from_onnx(elem_type), label, what)


def _output_specs(model: Any, golden: dict[str, np.ndarray], mlir: Path) -> tuple[TensorSpec, ...]:
    specs = []
    ranks: list[int | None] | None = None
    for i, v in enumerate(model.graph.output):
        label = f"output {v.name!r}"
        if v.type.WhichOneof("value") != "tensor_type":
            raise LoweringError(f"{label} is not a tensor; hxc compiles tensor outputs only")
        tt = v.type.tensor_type
        elem = _dtype(tt.elem_type, label)
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or f"out{i}_{j}") for j, d in enumerate(tt.shape.dim)]
        else:  # shape inference could not tell: the rank is what ONNX Runtime returned, else what IREE's importer typed
            if f"output_{i}" in golden:
                rank = golden[f"output_{i}"].ndim
            else:
                ranks = ranks if ranks is not None else _result_ranks(mlir)
                rank = ranks[i] if i < len(ranks) else None
                if rank is None:
                    raise LoweringError(f"{label} has no known rank", hint="pass example inputs ONNX Runtime can run: --example inputs.npz")
            dims = [f"out{i}_{j}" for j in range(rank)]
        specs.append(TensorSpec(v.name, elem, tuple(dims)))
    return tuple(specs)


def _result_ranks(mlir: Path) -> list[int | None]:
    """The rank of each result of the imported `main`, None where it is unranked."""
    from iree.compiler import ir

    with ir.Context() as ctx:
        ctx.allow_unregistered_dialects = True
        module = ir.Module.parse(mlir.read_bytes())
        for op in module.body.operations:
            if op.operation.name == "func.func":
                text = str(op.attributes["function_type"])
                results = text.split("->", 1)[1]
                return [None if "<*" in t else (0 if t == "[]" else t.count(",") + 1)
                        for t in re.findall(r"vtensor<(\*|\[[^\]]*\])", results)]  # fmt: skip
    return []


def _output_tree(n: int) -> OutputTree:
    if n == 1:
        return OutputTree(kind="leaf", index=0)
    return OutputTree(kind="tuple", items=tuple(OutputTree(kind="leaf", index=i) for i in range(n)))


# --- golden sample -----------------------------------------------------------------


def _golden(
    path: Path, inputs: list[_Input], n_outputs: int, example: Example | None
) -> tuple[dict[str, np.ndarray], str | None, str | None]:
    """The golden sample: inputs and ONNX Runtime's outputs on them, who made the
    outputs (onnxruntime, or the example file) and, when there are none, why."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UsageError("compiling ONNX models needs onnxruntime for the golden sample", hint="pip install onnxruntime") from None
    if example is not None:
        candidates = [_user_inputs(example, inputs)]
    else:
        # Random integers may not suit the model (an index past a small dimension, a zero
        # divisor): then every integer input is tried at 0 (a valid index into any
        # non-empty dimension), then at 1 (a valid divisor).
        candidates = [_examples(inputs, ints=ints) for ints in (None, 0, 1)]
    outputs, reference, note = None, "onnxruntime", None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        note = f"ONNX Runtime cannot load the model ({first_line(e)})"
    else:
        first: Exception | None = None
        for arrays in candidates:
            try:
                outputs = session.run(None, {i.spec.name: a for i, a in zip(inputs, arrays)})
                break
            except Exception as e:
                first = first or e
        else:
            shapes = ", ".join(f"{i.spec.name}: {'x'.join(map(str, a.shape)) or 'scalar'}" for i, a in zip(inputs, candidates[0]))
            note = f"ONNX Runtime failed on the {'--example' if example else 'generated'} inputs ({shapes}): {first_line(first)}"
    arrays = candidates[0] if outputs is None else arrays
    if outputs is not None and (len(outputs) != n_outputs or not all(isinstance(o, np.ndarray) for o in outputs)):
        raise LoweringError(f"{path}: the model returns non-tensor values; hxc compiles tensor outputs only")
    if outputs is None and example is not None and example.outputs is not None:
        outputs, reference, note = list(example.outputs), "user", None  # the user's outputs stand in for ONNX Runtime's
    sample = {f"input_{k}": to_storage(a) for k, a in enumerate(arrays)}
    if outputs is None:
        return sample, None, note
    sample.update({f"output_{k}": to_storage(np.asarray(o)) for k, o in enumerate(outputs)})
    return sample, reference, None


def _user_inputs(example: Example, inputs: list[_Input]) -> list[np.ndarray]:
    """The example's arrays in input order, checked against the signature."""
    arrays = example.ordered([i.spec.name for i in inputs])
    out = []
    for a, i in zip(arrays, inputs):
        spec = i.spec
        a = from_storage(a, spec.dtype)
        found = from_numpy(a.dtype)
        if found is None or found.name != spec.dtype:
            raise UsageError(f"{example.path}: the array for input {spec.name!r} is {a.dtype}; the model takes {spec.format()}")
        if a.ndim != len(spec.shape) or any(isinstance(d, int) and d != n for d, n in zip(spec.shape, a.shape)):
            raise UsageError(f"{example.path}: the array for input {spec.name!r} has shape "
                             f"{'x'.join(map(str, a.shape)) or 'scalar'}; the model takes {spec.format()}")  # fmt: skip
        out.append(a)
    return out


def _examples(inputs: list[_Input], *, ints: int | None = None, seed: int = 0) -> list[np.ndarray]:
    """Deterministic inputs, drawn as the PyTorch frontend draws them; with `ints`,
    integer and boolean inputs hold that value everywhere instead."""
    specs = [TensorSpec(i.spec.name, i.spec.dtype, i.example_shape) for i in inputs]
    arrays = example_arrays(specs, seed=seed)
    if ints is not None:
        arrays = [a if dtype(i.spec.dtype).is_float else np.full_like(a, ints) for a, i in zip(arrays, inputs)]
    return arrays


# --- import ------------------------------------------------------------------------


def _prepare(
    original: Any, path: Path, inputs: list[_Input], *, load_all: bool, casts: tuple[tuple[str, str], ...] = ()
) -> tuple[Any, list[str]]:
    """A copy of the model ready for IREE's importer: nodes tagged, input shapes set,
    opset upgraded, shapes inferred, graph named `main`. Returns it and the nodes'
    original names."""
    onnx = _onnx()
    model = onnx.ModelProto()
    model.CopyFrom(original)
    names = []
    for k, node in enumerate(model.graph.node):
        names.append(node.name or f"{node.op_type}_{k}")
        node.name = f"{_TAG}{k}"
    if _set_input_shapes(model, inputs):
        # Sizes changed: let inference recompute what depended on the old ones.
        del model.graph.value_info[:]
        for out in model.graph.output:
            for d in out.type.tensor_type.shape.dim:
                d.Clear()
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), TARGET_OPSET)
    if opset < TARGET_OPSET:
        _load_external(list(_tensors(model.graph)), path.parent)
        try:
            from onnx import version_converter

            model = version_converter.convert_version(model, TARGET_OPSET)
        except Exception as e:
            log.info("hxc: cannot upgrade %s from opset %d to %d (%s); importing it as is", path, opset, TARGET_OPSET, first_line(e))
    # Small tensors must be in memory (the importer inlines them, shape inference
    # reads them); large ones only when they are inlined too.
    _load_external([t for t in _tensors(model.graph) if load_all or _numel(t) < NUM_ELEMENTS_THRESHOLD], path.parent)
    model = _expand_functions(model, path)
    if casts:
        _cast_interface(model, dict(casts))
    model = fold_constants(model)
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:
        raise LoweringError(f"{path}: ONNX shape inference failed ({first_line(e)})") from None
    model.graph.name = "main"
    return model, names


# Operators IREE 3.13's ONNX importer has no lowering for, but which ONNX defines as
# functions of other operators: they are replaced by their function bodies (for the
# model's opset) before import. Operators ONNX gives no usable function for have
# hxc's own bodies, for the forms IREE cannot lower (onnx_decompose.DECOMPOSITIONS).
EXPAND_AS_FUNCTIONS = frozenset({"Attention", "RMSNormalization", "LinearAttention", "CausalConvWithState",
                                 "RotaryEmbedding", "Swish", "SwiGLU", "NegativeLogLikelihoodLoss",
                                 "SoftmaxCrossEntropyLoss", "SpaceToDepth"})  # fmt: skip
_EXPAND_DOMAIN = "hxc.expand"
# A function body may call another expandable operator (SwiGLU calls Swish): expansion
# runs again on the inlined graph, this many times at most.
_EXPAND_ROUNDS = 3


def _expand_functions(model: Any, path: Path) -> Any:
    """The model with top-level nodes of EXPAND_AS_FUNCTIONS replaced by the ONNX
    function that defines them (context-dependent ones built for the node's own
    attributes and input types), and nodes hxc decomposes by hxc's function for
    them, through ONNX's own inliner."""
    for _ in range(_EXPAND_ROUNDS):
        model, expanded = _expand_once(model, path)
        if not expanded:
            break
    return model


def _expand_once(model: Any, path: Path) -> tuple[Any, bool]:
    from hxc.compiler.onnx_decompose import DECOMPOSITIONS

    onnx = _onnx()
    from onnx import numpy_helper

    expandable = EXPAND_AS_FUNCTIONS | DECOMPOSITIONS.keys()
    wanted = [n for n in model.graph.node if n.domain in ("", "ai.onnx") and n.op_type in expandable]
    if not wanted:
        return model, False
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), TARGET_OPSET)
    typed = _skeleton(model)
    try:
        typed = onnx.shape_inference.infer_shapes(typed, check_type=False, strict_mode=False)
    except Exception:
        pass
    types = {v.name: v.type for v in [*typed.graph.input, *typed.graph.value_info, *typed.graph.output]}
    for t in typed.graph.initializer:
        tp = onnx.TypeProto()
        tp.tensor_type.elem_type = t.data_type
        tp.tensor_type.shape.dim.extend(onnx.TensorShapeProto.Dimension(dim_value=d) for d in t.dims)
        types.setdefault(t.name, tp)
    known = _small_initializers(typed.graph)
    for n in model.graph.node:  # Constant nodes holding a tensor
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and [a.name for a in n.attribute] == ["value"]:
            known[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    functions = []
    for k, node in enumerate(wanted):
        if node.op_type in DECOMPOSITIONS:
            body = DECOMPOSITIONS[node.op_type](node, opset, types, known)
            if body is not None:
                node.ClearField("attribute")  # hxc's bodies carry the attribute values themselves
        else:
            body = _function_body(node, opset, types)
        if body is None:
            continue
        body.domain, body.name = _EXPAND_DOMAIN, f"{node.op_type}_{k}"  # inlined and dropped within the round
        node.domain, node.op_type = _EXPAND_DOMAIN, body.name
        functions.append(body)
    if not functions:
        return model, False
    model.functions.extend(functions)
    if not any(o.domain == _EXPAND_DOMAIN for o in model.opset_import):
        model.opset_import.add(domain=_EXPAND_DOMAIN, version=1)
    # ONNX's inliner leaves a call uninlined when its body imports another opset than
    # the model (ONNX's Swish body is at opset 24; a SwiGLU model at 28); it converts
    # the body when it knows every value's type.
    del model.graph.value_info[:]
    model.graph.value_info.extend(typed.graph.value_info)
    try:
        from onnx import inliner

        try:
            return inliner.inline_local_functions(model, convert_version=True), True
        except Exception:
            return inliner.inline_local_functions(model), True
    except Exception as e:
        raise LoweringError(f"{path}: cannot expand {', '.join(sorted({f.name.rsplit('_', 1)[0] for f in functions}))} "
                            f"into ONNX operators IREE lowers ({first_line(e)})") from None  # fmt: skip


def _skeleton(model: Any) -> Any:
    """`model` for shape inference: initializers over FOLD_MAX_ELEMENTS elements keep
    their name, type and dimensions but not their data (inference reads only small
    constants: shapes, axes), so a big model's weights are not copied (a MatMul model
    with 128 MB of weights: 0.01 s instead of 1.3 s)."""
    onnx = _onnx()
    light = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, functions=model.functions)
    graph = light.graph
    for field in ("node", "input", "output", "value_info"):
        getattr(graph, field).extend(getattr(model.graph, field))
    for t in model.graph.initializer:
        if _numel(t) > FOLD_MAX_ELEMENTS:
            graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
        else:
            graph.initializer.append(t)
    return light


def _function_body(node: Any, opset: int, types: dict[str, Any]) -> Any:
    """The FunctionProto defining `node` at `opset`, or None when ONNX has none."""
    onnx = _onnx()
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, domain="")
    except Exception:
        return None
    call = onnx.NodeProto()
    call.CopyFrom(node)
    for name, attr in schema.attributes.items():  # the body may read attributes the node leaves at default
        if name not in {a.name for a in call.attribute} and attr.default_value.name:
            call.attribute.append(attr.default_value)
    body = onnx.FunctionProto()
    versions = [v for v in schema.function_opset_versions if v <= opset]
    if versions:
        body.ParseFromString(schema.get_function_with_opset_version(max(versions)))
    else:
        versions = [v for v in schema.context_dependent_function_opset_versions if v <= opset]
        if not versions or any(i and i not in types for i in call.input):
            return None
        empty = onnx.TypeProto()
        raw = schema.get_context_dependent_function_with_opset_version(
            max(versions), call.SerializeToString(), [(types[i] if i else empty).SerializeToString() for i in call.input]
        )
        body.ParseFromString(raw)
    # The function's attribute references need the node's values at the call site,
    # defaults included (SwiGLU's body reads `alpha` even when the node leaves it out).
    node.ClearField("attribute")
    node.attribute.extend(call.attribute)
    return body


# Folded results larger than this stay computed at run time: folding is for shapes,
# axes, pads and indices, not for rewriting weights.
FOLD_MAX_ELEMENTS = 4096
# Never folded: randomness, and ops whose value is not a function of their inputs.
_NEVER_FOLD = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                         "Bernoulli", "Dropout", "If", "Loop", "Scan", "SequenceConstruct", "Optional"})  # fmt: skip


def fold_constants(model: Any) -> Any:
    """Replace top-level nodes whose inputs are all known by Constant nodes holding
    their outputs: initializers and Constant nodes are known, and so is the Shape (and
    Size) of a tensor whose shape inference found static. IREE needs axes, pads,
    shapes and repeat counts as constants ("dim is not constant"); in exported models
    they are often computed from shapes at run time. Values come from ONNX's reference
    implementation, node by node; a node it cannot run is left as it is."""
    onnx = _onnx()
    from onnx import numpy_helper

    try:
        typed = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        typed = model
    shapes = {}
    for v in [*typed.graph.input, *typed.graph.value_info, *typed.graph.output]:
        tt = v.type.tensor_type
        if v.type.WhichOneof("value") == "tensor_type" and tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            if all(d is not None for d in dims):
                shapes[v.name] = dims
    known = _small_initializers(model.graph)
    graph_inputs = {v.name for v in model.graph.input} - {t.name for t in model.graph.initializer}
    opsets = list(model.opset_import)
    folded = 0
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type in _NEVER_FOLD or any(a.HasField("g") or a.graphs for a in node.attribute):
            continue
        values = _fold_node(node, known, shapes, graph_inputs, opsets)
        if values is None:
            continue
        outputs = [o for o in node.output if o]
        if len(values) != len(outputs) or any(not isinstance(v, np.ndarray) or v.size > FOLD_MAX_ELEMENTS for v in values):
            continue
        if node.op_type == "Constant":
            known.update(zip(outputs, values))
            continue
        known.update(zip(outputs, values))
        if len(outputs) != 1:
            continue  # a Constant node has one output; multi-output folds only feed later folds
        name = node.name
        node.CopyFrom(onnx.helper.make_node("Constant", [], outputs, name=name,
                                            value=numpy_helper.from_array(values[0], outputs[0])))  # fmt: skip
        folded += 1
    if folded:
        log.info("hxc: folded %d ONNX nodes into constants", folded)
    return model


def _small_initializers(graph: Any) -> dict[str, np.ndarray]:
    """The values of the initializers folding may read: in memory, at most FOLD_MAX_ELEMENTS."""
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in graph.initializer
            if not _is_external(t) and _numel(t) <= FOLD_MAX_ELEMENTS}  # fmt: skip


def _fold_node(node: Any, known: dict, shapes: dict, graph_inputs: set[str], opsets: list) -> list | None:
    if node.op_type in ("Shape", "Size") and node.input and node.input[0] in shapes:
        dims = np.array(shapes[node.input[0]], dtype=np.int64)
        if node.op_type == "Size":
            return [np.array(dims.prod(), dtype=np.int64)]
        attrs = {a.name: a.i for a in node.attribute}
        start, end = attrs.get("start", 0), attrs.get("end", len(dims))
        return [dims[start:end]]
    inputs = [i for i in node.input if i]
    if node.op_type != "Constant" and (not inputs or not all(i in known for i in inputs)):
        return None
    onnx = _onnx()
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    try:
        feeds = {i: known[i] for i in inputs}
        graph = helper.make_graph(
            [node], "fold",
            [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(known[i].dtype), known[i].shape) for i in inputs],
            [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o],
        )  # fmt: skip
        model = helper.make_model(graph, opset_imports=opsets)
        return [np.asarray(v) for v in ReferenceEvaluator(model).run(None, feeds)]
    except Exception:
        return None


def _cast_interface(model: Any, casts: dict[str, str]) -> None:
    """Give graph inputs and outputs of the element types in `casts` the other type,
    with Cast nodes inside the graph, so the model computes as before behind an
    interface a variant can carry (see ImportOptions.interface_casts)."""
    from onnx import helper

    graph = model.graph
    renamed: dict[str, str] = {}
    front = []
    for v in graph.input:
        found = from_onnx(v.type.tensor_type.elem_type)
        if found is not None and found.name in casts and v.type.WhichOneof("value") == "tensor_type":
            dtype_name = found.name
            inner = f"{v.name}__hxc_model"
            renamed[v.name] = inner
            front.append(helper.make_node("Cast", [v.name], [inner], to=v.type.tensor_type.elem_type,
                                          name=f"hxc_cast_in_{len(front)}"))  # fmt: skip
            v.type.tensor_type.elem_type = dtype(casts[dtype_name]).onnx
    _rename_uses(graph, renamed)
    back = []
    for v in graph.output:
        found = from_onnx(v.type.tensor_type.elem_type)
        if found is not None and found.name in casts and v.type.WhichOneof("value") == "tensor_type":
            inner = f"{v.name}__hxc_model"
            for node in graph.node:  # the producer writes the model-typed value under a new name
                node.output[:] = [inner if o == v.name else o for o in node.output]
            _rename_uses(graph, {v.name: inner})
            back.append(helper.make_node("Cast", [inner], [v.name], to=dtype(casts[found.name]).onnx,
                                         name=f"hxc_cast_out_{len(back)}"))  # fmt: skip
            v.type.tensor_type.elem_type = dtype(casts[found.name]).onnx
    nodes = [*front, *graph.node, *back]
    del graph.node[:]
    graph.node.extend(nodes)


def _rename_uses(graph: Any, renamed: dict[str, str]) -> None:
    """Point every node input (subgraphs included) named in `renamed` at its new name."""
    if not renamed:
        return
    for node in graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
        for a in node.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _rename_uses(g, renamed)


def _set_input_shapes(model: Any, inputs: list[_Input]) -> bool:
    """Write the signature's shapes into the graph inputs; True if any size changed."""
    changed = False
    by_name = {v.name: v for v in model.graph.input}
    for i in inputs:
        shape = by_name[i.spec.name].type.tensor_type.shape
        before = [(d.dim_value if d.HasField("dim_value") else None) for d in shape.dim]
        while len(shape.dim) < len(i.spec.shape):
            shape.dim.add()
        for d, size in zip(shape.dim, i.spec.shape):
            d.Clear()
            if isinstance(size, int):
                d.dim_value = size
            else:
                d.dim_param = size
        changed |= before != [(s if isinstance(s, int) else None) for s in i.spec.shape]
    return changed


def _to_mlir(model: Any, names: list[str], label: str, out: Path, irpa: Path | None, data_dir: Path) -> dict[str, str]:
    """Import `model` with IREE's ONNX importer and write MLIR bytecode to `out`.
    With `irpa`, large initializers become named parameters saved there; returns
    {initializer name: parameter key}."""
    from iree.compiler import ir
    from iree.compiler.extras import onnx_importer

    context = ir.Context()
    info = onnx_importer.ModelInfo(model)
    module = info.create_module(context=context).operation
    try:
        if irpa is not None:
            from iree.compiler.tools.import_onnx.importer_externalization_overrides import IREENodeImporter, ParamData

            params = ParamData(
                param_bit_threshold=None,
                num_elements_threshold=NUM_ELEMENTS_THRESHOLD,
                params_scope=PARAMETER_SCOPE,
                data_dir=str(data_dir),
                param_path=str(irpa),
                input_index_threshold=None,
            )
            importer = IREENodeImporter.define_function(info.main_graph, module, params)
        else:
            importer = onnx_importer.NodeImporter.define_function(info.main_graph, module)
        importer.import_all()
    except Exception as e:
        node = _failing_node(e)
        where = f" node {names[int(node.name[len(_TAG):])]!r} ({_op_name(node)})" if node is not None else ""
        raise LoweringError(f"cannot import ONNX{where} into MLIR ({type(e).__name__}: {first_line(e)})") from None
    _locate_nodes(module, names, label, context)
    try:
        module.verify()
    except Exception as e:
        raise LoweringError(f"the imported ONNX module is invalid ({first_line(e)})") from None
    with open(out, "wb") as f:
        module.write_bytecode(f)
    if irpa is None:
        return {}
    importer.save_params()
    return dict(importer.globals)


def _failing_node(e: BaseException) -> Any:
    """The ONNX node the importer was on when it raised, from its frame."""
    tb = e.__traceback__
    node = None
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "import_node":
            candidate = tb.tb_frame.f_locals.get("node")
            if getattr(candidate, "name", "").startswith(_TAG):
                node = candidate
        tb = tb.tb_next
    return node


def _locate_nodes(module: Any, names: list[str], label: str, context: Any) -> None:
    """Give each op imported from top-level node k the location `label:k+1:0` (under
    the node's own name), so iree-compile's errors point at the ONNX node."""
    from iree.compiler import ir

    def visit(op: Any) -> None:
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    child = child.operation
                    m = _TAGGED.match(str(child.location))
                    if m:
                        k = int(m.group(1))
                        child.location = ir.Location.name(names[k], childLoc=ir.Location.file(label, k + 1, 0))
                    visit(child)

    with context:
        visit(module)


# --- program -----------------------------------------------------------------------


def _program(original: Any, path: Path, workdir: Path, irpa: Path | None, params: dict[str, str]) -> Path:
    """The model file stored in the bundle (see the module docstring)."""
    onnx = _onnx()
    external = any(_is_external(t) for t in _tensors(original.graph))
    if irpa is None and not external:
        return path
    model = onnx.ModelProto()
    model.CopyFrom(original)
    if irpa is not None:
        point_at_archive(model, irpa, params)
    _load_external([t for t in _tensors(model.graph) if not _in_archive(t)], path.parent)
    out = workdir / PROGRAM_ONNX
    try:
        onnx.save_model(model, str(out))
    except (ValueError, MemoryError) as e:  # over protobuf's 2 GB: keep the graph file alone
        log.warning("hxc: cannot store %s with its weights in one file (%s); storing the graph only", path, first_line(e))
        return path
    return out


def _in_archive(t: Any) -> bool:
    return _is_external(t) and any(e.key == "location" and e.value == WEIGHTS_FILE for e in t.external_data)


def point_at_archive(model: Any, irpa: Path, params: dict[str, str]) -> None:
    """Make initializers stored in the parameter archive ONNX external data that
    points at their bytes in it."""
    import iree.runtime as rt

    index = rt.ParameterIndex()
    index.load(str(irpa))
    entries = dict(index.items())
    for t in model.graph.initializer:
        entry = entries.get(params.get(t.name, ""))
        if entry is None or not entry.is_file or entry.length != _nbytes(t):
            continue  # stays (or is loaded) inline
        _, offset = entry.file_storage
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            t.ClearField(field)
        del t.external_data[:]
        for key, value in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(entry.length))):
            e = t.external_data.add()
            e.key, e.value = key, value
        t.data_location = 1  # EXTERNAL

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
zero divisor), it is run again with every integer input at 0, then at 1. A dynamic dimension with no `--input` size gets size 2
(`hxc.dtypes.DYNAMIC_EXAMPLE_SIZE`, as in the PyTorch frontend), one size per
dimension name.

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

from hxc.compiler.imported import PARAMETER_SCOPE, ImportedModel, ImportOptions, wants_shared_weights
from hxc.compiler.specs import example_arrays, parse_input_spec
from hxc.dtypes import DYNAMIC_EXAMPLE_SIZE, dtype, from_onnx, interface_dtype, to_storage
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
    golden = _golden(path, inputs, len(original.graph.output))
    timings["golden"] = time.perf_counter() - t

    t = time.perf_counter()
    on_stage("importing to IREE input IR")
    inits = list(original.graph.initializer)
    total = sum(_nbytes(x) for x in inits)
    has_bf16 = any(x.data_type == onnx.TensorProto.BFLOAT16 for x in inits)
    shared = any(_numel(x) >= NUM_ELEMENTS_THRESHOLD for x in inits) and wants_shared_weights(
        options.weights, total, has_bf16
    )
    model, names = _prepare(original, path, inputs, load_all=not shared)
    label = path.name.replace(":", "_")
    irpa = workdir / WEIGHTS_FILE if shared else None
    mlir = workdir / "model.mlirbc"
    params = _to_mlir(model, names, label, mlir, irpa, path.parent)
    signature = Signature(
        inputs=tuple(i.spec for i in inputs),
        outputs=_output_specs(model, golden),
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
        program=program,
        program_name=PROGRAM_ONNX,
        weights=irpa,
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
        spec = by_name.get(v.name) or (specs[i] if i < len(specs) else None)
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


def _output_specs(model: Any, golden: dict[str, np.ndarray]) -> tuple[TensorSpec, ...]:
    specs = []
    for i, v in enumerate(model.graph.output):
        label = f"output {v.name!r}"
        if v.type.WhichOneof("value") != "tensor_type":
            raise LoweringError(f"{label} is not a tensor; hxc compiles tensor outputs only")
        tt = v.type.tensor_type
        elem = _dtype(tt.elem_type, label)
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or f"out{i}_{j}") for j, d in enumerate(tt.shape.dim)]
        else:  # shape inference could not tell: the rank is what ONNX Runtime returned
            dims = [f"out{i}_{j}" for j in range(golden[f"output_{i}"].ndim)]
        specs.append(TensorSpec(v.name, elem, tuple(dims)))
    return tuple(specs)


def _output_tree(n: int) -> OutputTree:
    if n == 1:
        return OutputTree(kind="leaf", index=0)
    return OutputTree(kind="tuple", items=tuple(OutputTree(kind="leaf", index=i) for i in range(n)))


# --- golden sample -----------------------------------------------------------------


def _golden(path: Path, inputs: list[_Input], n_outputs: int) -> dict[str, np.ndarray]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise UsageError("compiling ONNX models needs onnxruntime for the golden sample", hint="pip install onnxruntime") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelLoadError(f"{path}: ONNX Runtime cannot load the model ({first_line(e)})") from None
    # Random integers may not suit the model (an index past a small dimension, a zero
    # divisor): then every integer input is tried at 0 (a valid index into any
    # non-empty dimension), then at 1 (a valid divisor).
    first: Exception | None = None
    for ints in (None, 0, 1):
        arrays = _examples(inputs, ints=ints)
        try:
            outputs = session.run(None, {i.spec.name: a for i, a in zip(inputs, arrays)})
            break
        except Exception as e:
            first = first or e
    else:
        shapes = ", ".join(f"{i.spec.name}: {'x'.join(map(str, i.example_shape))}" for i in inputs)
        raise LoweringError(
            f"{path}: ONNX Runtime failed on example inputs ({shapes}): {first_line(first)}",
            hint="inputs that carry shapes, indices or sizes need real values; fix their shapes with --input",
        ) from None
    if len(outputs) != n_outputs or not all(isinstance(o, np.ndarray) for o in outputs):
        raise LoweringError(f"{path}: the model returns non-tensor values; hxc compiles tensor outputs only")
    sample = {f"input_{k}": to_storage(a) for k, a in enumerate(arrays)}
    sample.update({f"output_{k}": to_storage(np.asarray(o)) for k, o in enumerate(outputs)})
    return sample


def _examples(inputs: list[_Input], *, ints: int | None = None, seed: int = 0) -> list[np.ndarray]:
    """Deterministic inputs, drawn as the PyTorch frontend draws them; with `ints`,
    integer and boolean inputs hold that value everywhere instead."""
    specs = [TensorSpec(i.spec.name, i.spec.dtype, i.example_shape) for i in inputs]
    arrays = example_arrays(specs, seed=seed)
    if ints is not None:
        arrays = [a if dtype(i.spec.dtype).is_float else np.full_like(a, ints) for a, i in zip(arrays, inputs)]
    return arrays


# --- import ------------------------------------------------------------------------


def _prepare(original: Any, path: Path, inputs: list[_Input], *, load_all: bool) -> tuple[Any, list[str]]:
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
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:
        raise LoweringError(f"{path}: ONNX shape inference failed ({first_line(e)})") from None
    model.graph.name = "main"
    return model, names


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

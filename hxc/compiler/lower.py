"""Lower an exported program to IREE's input IR (the torch dialect, as MLIR bytecode).

`aot.export(ExportedProgram)` applies no decompositions, and torch-mlir cannot import
many ops that real models use (LSTM's `squeeze.dims`, f16 batch norm, `aten.diff` in
transformers' causal masks...). So the program is first decomposed to core ATen with
torch's table plus iree-turbine's. Any op the importer still leaves as an opaque
`torch.operator` gets its own decomposition from torch's full table, if it has one,
and the program is lowered again.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from hxc.dtypes import from_torch, interface_dtype
from hxc.errors import LoweringError, first_line
from hxc.manifests.schema import OutputTree, Signature, TensorSpec

_OPAQUE_OP = re.compile(r'"torch\.operator"\([^)]*\)\s*<\{name = "torch\.([\w.]+)"\}>')
_MAX_ROUNDS = 4
_INT64_RESOURCE = re.compile(r"dense_resource<[^>]+> : tensor<[^>]*xsi64>")


@dataclass
class Lowered:
    mlir: bytes  # MLIR bytecode of the torch-dialect module, function `main`
    signature: Signature
    program: torch.export.ExportedProgram  # after decomposition
    # The aten operators at each model source line ("file.py:12"). IREE reports errors
    # at these locations, which is how a failure is traced back to the operator.
    operators_at: dict[str, tuple[str, ...]]
    int64_constants: bool = False  # int64 tensor constants stored as resource blobs


def decomposition_table() -> dict:
    """Core ATen: torch's default decompositions plus iree-turbine's."""
    from iree.turbine.aot.decompositions import current_aot_decompositions

    table = torch.export.default_decompositions()
    table.update(current_aot_decompositions())
    table[torch.ops.aten.fmod.Scalar] = _fmod_scalar
    table[torch.ops.aten.roll.default] = _roll
    return table


def _roll(x: torch.Tensor, shifts: Sequence[int], dims: Sequence[int] = ()) -> torch.Tensor:
    """`torch.roll` as one gather per rolled dimension, its indices computed as tensors:
    `(arange(n) - shift) remainder n`. torch's own decomposition computes the start
    with Python's `%` on the size, which for a dynamic size becomes `aten.fmod.int`,
    an op torch-mlir cannot import; tensor arithmetic works for static and dynamic
    sizes alike, and for any shift (negative, larger than the size)."""
    if not dims:  # roll the flattened tensor, then restore its shape
        return _roll(x.flatten(), shifts, [0]).view(x.shape)
    for shift, dim in zip(shifts, dims):
        n = x.shape[dim]
        if isinstance(n, int) and n == 0:
            continue
        size = torch.scalar_tensor(n, dtype=torch.int64, device=x.device)
        x = x.index_select(dim, torch.remainder(torch.arange(n, device=x.device) - shift, size))
    return x


def _fmod_scalar(x: torch.Tensor, other: float | int | bool) -> torch.Tensor:
    """`aten.fmod.Scalar` as `aten.fmod.Tensor` with a 0-d tensor: torch-mlir lowers
    only the latter; the former fails in IREE with "failed to legalize operation
    'torch.constant.int'". torch's decomposition of `torch.roll` produces it (indices
    `(arange(n) + n - shift) fmod n`), as does `torch.fmod(x, 3)` written in a model."""
    return torch.ops.aten.fmod.Tensor(x, torch.scalar_tensor(other, dtype=torch.result_type(x, other), device=x.device))


def to_core_aten(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    return _decompose(program, decomposition_table())


def lower(program: torch.export.ExportedProgram, *, narrow_int64: bool = False) -> Lowered:
    """`narrow_int64`: the IR is for a variant that computes int64 in 32 bits; its
    int64 constants must fit (LoweringError otherwise) and are written so that IREE's
    i64->i32 demotion can rewrite them (see `_inline_int64_literals`)."""
    if narrow_int64:
        with _inline_int64_literals():
            return lower(program)
    signature = program_signature(program)
    from iree.turbine import aot

    table = decomposition_table()
    extra: set[Any] = set()
    for _ in range(_MAX_ROUNDS):
        decomposed = _decompose(program, table)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exported = aot.export(decomposed, module_name="module", function_name="main")
        except Exception as e:
            raise LoweringError(f"cannot import the program into MLIR ({type(e).__name__}: {first_line(e)})") from None
        text = str(exported.mlir_module)
        # Ops the importer could not map stay opaque; decompose those we can and retry.
        new = {op for name in set(_OPAQUE_OP.findall(text)) if (op := _aten_op(name)) is not None}
        new -= extra
        new = {op for op in new if op in torch._decomp.decomposition_table}
        if not new:
            break
        extra |= new
        table.update(torch._decomp.get_decompositions(list(new)))
    mlir = _bytecode(exported)
    return Lowered(mlir=mlir, signature=signature, program=decomposed, operators_at=source_operators(program),
                   int64_constants=bool(_INT64_RESOURCE.search(text)))  # fmt: skip


@contextlib.contextmanager
def _inline_int64_literals():
    """While importing, make int64 tensor constants plain dense attributes instead of
    MLIR resource blobs: IREE's i64->i32 demotion rewrites the former and fails on the
    latter ("'arith.constant' op failed to verify that all of {value, result} have
    same type"). Constants come from the program and from decompositions run during
    import (upsampling indices), so this is the one place that sees them all."""
    from iree.compiler.extras import fx_importer as fx

    original = fx._make_vtensor_literal_op

    def literal(tensor: torch.Tensor, vtensor_type: Any, tracker: Any) -> Any:
        if tensor.dtype != torch.int64 or tensor.numel() <= 1 or tensor.is_meta or isinstance(tensor, fx.TorchFakeTensor):
            return original(tensor, vtensor_type, tracker)
        values = tensor.detach().cpu().contiguous().numpy()
        if values.min() < -(2**31) or values.max() >= 2**31:
            raise LoweringError(
                f"a {tuple(tensor.shape)} int64 constant holds values beyond 32 bits; portable SPIR-V computes "
                "int64 in 32 bits, so this model needs a variant with native int64",
                hint="compile for vulkan:desktop",
            )
        attr = fx.DenseElementsAttr.get(values, type=fx.IntegerType.get_signed(64), shape=values.shape)
        return fx.Operation.create(name="torch.vtensor.literal", results=[vtensor_type], attributes={"value": attr})

    fx._make_vtensor_literal_op = literal
    try:
        yield
    finally:
        fx._make_vtensor_literal_op = original


_FRAME = re.compile(r'File "([^"]+)", line ([0-9]+),')


def source_operators(program: torch.export.ExportedProgram) -> dict[str, tuple[str, ...]]:
    """Map each model source line to the aten operators it produced, keyed the way
    IREE's torch importer locates ops: the innermost stack frame, file:line."""
    found: dict[str, dict[str, None]] = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        frames = _FRAME.findall(node.meta.get("stack_trace") or "")
        if not frames:
            continue
        name = node.target._schema.name.replace("::", ".")
        if name.startswith("aten._assert"):
            continue
        found.setdefault(f"{frames[-1][0]}:{frames[-1][1]}", {})[name] = None
    return {k: tuple(v) for k, v in found.items()}


def _decompose(program: torch.export.ExportedProgram, table: dict) -> torch.export.ExportedProgram:
    try:
        return program.run_decompositions(table)
    except Exception as e:
        raise LoweringError(f"decomposing the program to core ATen failed ({type(e).__name__}: {first_line(e)})") from None


def _bytecode(exported: Any) -> bytes:
    import io

    buf = io.BytesIO()
    exported.mlir_module.operation.write_bytecode(buf)
    return buf.getvalue()


def _aten_op(qualified: str) -> Any:
    # "aten.squeeze.dims" -> torch.ops.aten.squeeze.dims
    parts = qualified.split(".")
    if len(parts) < 2 or parts[0] != "aten":
        return None
    packet = getattr(torch.ops.aten, parts[1], None)
    if packet is None:
        return None
    return getattr(packet, parts[2] if len(parts) > 2 else "default", None)


def program_signature(program: torch.export.ExportedProgram) -> Signature:
    """Inputs and outputs as the compiled function sees them (flat, in order), and the
    tree that rebuilds the model's own output structure."""
    nodes = {n.name: n for n in program.graph.nodes}
    sig = program.graph_signature

    def spec(name: str, label: str) -> TensorSpec:
        val = nodes[name].meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise LoweringError(f"{label} is a {type(val).__name__}, not a tensor; hxc compiles tensor inputs and outputs only")
        dtype = interface_dtype(from_torch(val.dtype), label, f"dtype {val.dtype}")
        shape = tuple(d if isinstance(d, int) else str(d) for d in val.shape)
        return TensorSpec(name=label, dtype=dtype, shape=shape)

    inputs = tuple(spec(n, n) for n in sig.user_inputs)
    out_names = [o for o in sig.user_outputs]
    if any(o is None for o in out_names):
        raise LoweringError("the model returns a non-tensor value; hxc compiles tensor outputs only")
    outputs = tuple(spec(n, f"output_{i}") for i, n in enumerate(out_names))
    return Signature(inputs=inputs, outputs=outputs, output_tree=_tree(program.call_spec.out_spec))


def _tree(spec: pytree.TreeSpec) -> OutputTree:
    counter = iter(range(1 << 30))

    def walk(s: pytree.TreeSpec) -> OutputTree:
        if s.is_leaf():
            return OutputTree(kind="leaf", index=next(counter))
        items = tuple(walk(c) for c in s.children_specs)
        if s.type is dict or (s.context is not None and isinstance(s.context, (list, tuple)) and s.type not in (list, tuple)):
            keys = tuple(str(k) for k in (s.context or ()))
            return OutputTree(kind="dict", keys=keys, items=items)
        return OutputTree(kind="list" if s.type is list else "tuple", items=items)

    return walk(spec)


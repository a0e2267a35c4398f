"""hxc's own function bodies for ONNX operators, or forms of operators, that IREE 3.13's
ONNX importer cannot lower and for which ONNX defines no function (or one IREE cannot
lower either). `onnx_import._expand_functions` inlines them exactly as it inlines
ONNX's own function bodies.

Each builder takes the node, the model's default-domain opset and what is known
about its inputs (types from shape inference, values of initializers and Constant
nodes) and returns a FunctionProto whose formal inputs and outputs are the node's
(attribute values already applied), or None where its rewrite does not apply: the
node is then left for IREE as it is. Every rewrite is exact in the operator's own
semantics (no logarithms, no approximations), and is only made where IREE's own
lowering fails, so a model IREE already compiles is not changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

# A builder: (node, opset, value types by name, known constant values by name) -> FunctionProto | None.
Builder = Callable[[Any, int, dict[str, Any], dict[str, np.ndarray]], Any]


def _shape(types: dict[str, Any], name: str) -> list[int] | None:
    """The static shape of value `name`, or None when a dimension (or the rank) is unknown."""
    t = types.get(name)
    if t is None or t.WhichOneof("value") != "tensor_type" or not t.tensor_type.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim]
    return None if any(d is None for d in dims) else dims


def _elem_type(types: dict[str, Any], name: str) -> int:
    t = types.get(name)
    return t.tensor_type.elem_type if t is not None and t.WhichOneof("value") == "tensor_type" else 0


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _function(node: Any, opset: int, nodes: list[Any], inputs: list[str]) -> Any:
    """A function for `node` over formal inputs `inputs` (one per node input, used or
    not) and output Y; the inliner maps them onto the node's values."""
    from onnx import helper

    opsets = [helper.make_opsetid("", opset)]
    return helper.make_function("", node.op_type, inputs[: len(node.input)], ["Y"], nodes, opsets)


def _const(name: str, value: np.ndarray) -> Any:
    from onnx import helper, numpy_helper

    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def _axis_value(node: Any, types: dict, known: dict, index: int = 1) -> int | None:
    """A scan axis given as input `index`: its constant value, else the only valid one
    (0) when the data is one-dimensional; None when it is neither."""
    if len(node.input) > index and node.input[index] in known:
        return int(np.asarray(known[node.input[index]]).reshape(-1)[0])
    shape = _shape(types, node.input[0])
    return 0 if shape is not None and len(shape) == 1 else None


# --- CumSum / CumProd ------------------------------------------------------------------


def _cumsum(node: Any, opset: int, types: dict, known: dict) -> Any:
    """CumSum of a 1-D tensor whose axis is a run-time input: 0 is the only valid axis
    (-1 names the same one), and IREE needs it as a constant ("dim is not constant")."""
    if node.input[1] in known or _axis_value(node, types, known) is None:
        return None
    from onnx import helper

    axis_type = _elem_type(types, node.input[1]) or 7  # INT64
    zero = np.zeros((), dtype=helper.tensor_dtype_to_np_dtype(axis_type))
    attrs = {k: v for k, v in _attrs(node).items() if k in ("exclusive", "reverse")}
    nodes = [_const("axis0", zero), helper.make_node("CumSum", ["X", "axis0"], ["Y"], **attrs)]
    return _function(node, opset, nodes, ["X", "AXIS"])


def _cumprod(node: Any, opset: int, types: dict, known: dict) -> Any:
    """CumProd (no IREE lowering) as a masked product: y[..i..] = prod_j (M[i, j] ? x[..j..] : 1)
    with M the lower (or, reversed, upper) triangle, strict when exclusive. Multiplies
    the same values as the definition (zeros and signs exact); needs the axis and its
    length as constants, and builds an N x N intermediate along it."""
    from onnx import helper

    shape = _shape(types, node.input[0])
    axis = _axis_value(node, types, known)
    if shape is None or axis is None or not -len(shape) <= axis < len(shape):
        return None
    axis %= len(shape)
    n = shape[axis]
    attrs = _attrs(node)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    masks = {(0, 0): j <= i, (1, 0): j < i, (0, 1): j >= i, (1, 1): j > i}  # by (exclusive, reverse)
    keep = masks[(attrs.get("exclusive", 0), attrs.get("reverse", 0))]
    keep = keep.reshape(keep.shape + (1,) * (len(shape) - 1 - axis))  # i at `axis`, j at axis+1, later dims broadcast
    nodes = [
        _const("keep", keep), _const("one", np.ones((), np.float32)), _const("at", np.array([axis], np.int64)),
        _const("over", np.array([axis + 1], np.int64)),
        helper.make_node("CastLike", ["one", "X"], ["one_x"]),
        helper.make_node("Unsqueeze", ["X", "at"], ["x_j"]),
        helper.make_node("Where", ["keep", "x_j", "one_x"], ["terms"]),
    ]  # fmt: skip
    if opset >= 18:  # ReduceProd takes its axes as an input from opset 18
        nodes.append(helper.make_node("ReduceProd", ["terms", "over"], ["Y"], keepdims=0))
    else:
        nodes.append(helper.make_node("ReduceProd", ["terms"], ["Y"], axes=[axis + 1], keepdims=0))
    return _function(node, opset, nodes, ["X", "AXIS"])


# --- reductions with an empty axes input --------------------------------------------


def _reduce_empty_axes(node: Any, opset: int, types: dict, known: dict) -> Any:
    """A reduction whose axes input is statically empty (shape [0]) but not a constant:
    IREE cannot lower the run-time list; the value is known anyway: every axis
    (or, with noop_with_empty_axes, none)."""
    if len(node.input) < 2 or not node.input[1] or node.input[1] in known or _shape(types, node.input[1]) != [0]:
        return None
    from onnx import helper

    attrs = _attrs(node)
    if attrs.get("noop_with_empty_axes", 0):
        reduced = helper.make_node("Identity", ["X"], ["Y"])
    else:
        reduced = helper.make_node(node.op_type, ["X"], ["Y"], keepdims=attrs.get("keepdims", 1))
    return _function(node, opset, [reduced], ["X", "AXES"])


# --- LpPool ---------------------------------------------------------------------------


def _lppool(node: Any, opset: int, types: dict, known: dict) -> Any:
    """LpPool with dilations or SAME padding (IREE lowers only the plain forms):
    (sum over each window of |x|^p)^(1/p), the window sum being a depthwise convolution
    with ones, which takes the same kernel, strides, pads, dilations and auto_pad.
    Padded positions add 0, as in LpPool."""
    from onnx import helper

    shape = _shape(types, node.input[0])
    attrs = _attrs(node)
    dilated = any(d != 1 for d in attrs.get("dilations", []))
    same = attrs.get("auto_pad", b"NOTSET") in (b"SAME_UPPER", b"SAME_LOWER", "SAME_UPPER", "SAME_LOWER")
    if shape is None or len(shape) < 3 or attrs.get("ceil_mode", 0) or not (dilated or same):
        return None
    kernel = list(attrs["kernel_shape"])
    p = attrs.get("p", 2)
    channels = shape[1]
    conv = {k: v for k, v in attrs.items() if k in ("strides", "pads", "dilations", "auto_pad", "kernel_shape")}
    nodes = [
        _const("ones", np.ones([channels, 1, *kernel], np.float32)),
        _const("p", np.array(p, np.float32)), _const("inv_p", np.array(1.0 / p, np.float32)),
        helper.make_node("CastLike", ["ones", "X"], ["w"]),
        helper.make_node("CastLike", ["p", "X"], ["p_x"]),
        helper.make_node("CastLike", ["inv_p", "X"], ["inv_p_x"]),
        helper.make_node("Abs", ["X"], ["abs"]),
        helper.make_node("Pow", ["abs", "p_x"], ["powered"]),
        helper.make_node("Conv", ["powered", "w"], ["sums"], group=channels, **conv),
        helper.make_node("Pow", ["sums", "inv_p_x"], ["Y"]),
    ]  # fmt: skip
    return _function(node, opset, nodes, ["X"])


# --- Range ----------------------------------------------------------------------------

_FLOAT, _FLOAT16, _BFLOAT16 = 1, 10, 16


def _range_low_precision(node: Any, opset: int, types: dict, known: dict) -> Any:
    """Range over float16/bfloat16 (IREE lowers it for f32 and integers): computed in
    float32 and rounded once, as ONNX's reference (numpy's arange) computes
    start + i * delta in float before storing each element."""
    elem = _elem_type(types, node.input[0])
    if elem not in (_FLOAT16, _BFLOAT16):
        return None
    from onnx import helper

    formals = ["START", "LIMIT", "DELTA"]
    nodes = [helper.make_node("Cast", [v], [f"{v}_f32"], to=_FLOAT) for v in formals]
    nodes += [
        helper.make_node("Range", [f"{v}_f32" for v in formals], ["range_f32"]),
        helper.make_node("Cast", ["range_f32"], ["Y"], to=elem),
    ]
    return _function(node, opset, nodes, formals)


_REDUCTIONS = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
               "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")  # fmt: skip

DECOMPOSITIONS: dict[str, Builder] = {
    "CumSum": _cumsum,
    "CumProd": _cumprod,
    "LpPool": _lppool,
    "Range": _range_low_precision,
    **{op: _reduce_empty_axes for op in _REDUCTIONS},
}

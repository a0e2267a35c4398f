"""hxc's own function bodies for ONNX operators, or forms of operators, that IREE 3.13's
ONNX importer cannot lower and for which ONNX defines no function (or one IREE cannot
lower either). `onnx_import._expand_functions` inlines them exactly as it inlines
ONNX's own function bodies.

Each builder takes the node, the model's default-domain opset and what is known
about its inputs (types from shape inference, values of initializers and Constant
nodes) and returns a FunctionProto whose formal inputs and outputs are the node's
(attribute values already applied), or None where its rewrite does not apply: the
node is then left for IREE as it is. Every rewrite is exact in the operator's own
semantics (no logarithms, no approximations), and is only made for the forms IREE
rejects or computes wrongly: other nodes of the same operator stay IREE's.

Imported only when an ONNX model is compiled, so onnx is imported at the top.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

# CumProd's masked product holds (elements of x) x (length of the axis) values.
CUMPROD_MAX_ELEMENTS = 1 << 24
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
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _function(node: Any, opset: int, nodes: list[Any], inputs: list[str]) -> Any:
    """A function for `node` over formal inputs `inputs` (one per node input, used or
    not) and output Y; the inliner maps them onto the node's values."""
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_function("", node.op_type, inputs[: len(node.input)], ["Y"], nodes, opsets)


def _const(name: str, value: np.ndarray) -> Any:
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
    axis_type = _elem_type(types, node.input[1]) or TensorProto.INT64
    zero = np.zeros((), dtype=helper.tensor_dtype_to_np_dtype(axis_type))
    attrs = {k: v for k, v in _attrs(node).items() if k in ("exclusive", "reverse")}
    nodes = [_const("axis0", zero), helper.make_node("CumSum", ["X", "axis0"], ["Y"], **attrs)]
    return _function(node, opset, nodes, ["X", "AXIS"])


def _cumprod(node: Any, opset: int, types: dict, known: dict) -> Any:
    """CumProd (no IREE lowering) as a masked product: y[..i..] = prod_j (M[i, j] ? x[..j..] : 1)
    with M the lower (or, reversed, upper) triangle, strict when exclusive. Multiplies
    the same values as the definition (zeros and signs exact); needs the axis and its
    length as constants, and builds an N x N intermediate along it (up to
    CUMPROD_MAX_ELEMENTS elements; longer axes are left to IREE, which refuses them)."""
    shape = _shape(types, node.input[0])
    axis = _axis_value(node, types, known)
    if shape is None or axis is None or not -len(shape) <= axis < len(shape):
        return None
    axis %= len(shape)
    n = shape[axis]
    if int(np.prod(shape)) * n > CUMPROD_MAX_ELEMENTS:
        return None
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


def _range_low_precision(node: Any, opset: int, types: dict, known: dict) -> Any:
    """Range over float16/bfloat16 (IREE lowers it for f32 and integers): computed in
    float32 and rounded once, as ONNX's reference (numpy's arange) computes
    start + i * delta in float before storing each element."""
    elem = _elem_type(types, node.input[0])
    if elem not in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
        return None
    formals = ["START", "LIMIT", "DELTA"]
    nodes = [helper.make_node("Cast", [v], [f"{v}_f32"], to=TensorProto.FLOAT) for v in formals]
    nodes += [
        helper.make_node("Range", [f"{v}_f32" for v in formals], ["range_f32"]),
        helper.make_node("Cast", ["range_f32"], ["Y"], to=elem),
    ]
    return _function(node, opset, nodes, formals)


# --- MatMul, QLinearMatMul ------------------------------------------------------------


def _matmul_vector_batch(node: Any, opset: int, types: dict, known: dict) -> Any:
    """MatMul of a vector with a stack of matrices (1-D x 3-D and up, or the reverse),
    which IREE's lowering rejects: the vector becomes a one-row (one-column) matrix,
    as MatMul's definition (numpy's matmul) says, and that dimension is dropped again."""
    a, b = (_shape(types, i) for i in node.input)
    if a is None or b is None or not ((len(a) == 1 and len(b) >= 3) or (len(b) == 1 and len(a) >= 3)):
        return None
    at, drop = (0, -2) if len(a) == 1 else (-1, -1)
    vector = "A" if len(a) == 1 else "B"
    nodes = [
        _const("at", np.array([at], np.int64)), _const("drop", np.array([drop], np.int64)),
        helper.make_node("Unsqueeze", [vector, "at"], ["matrix"]),
        helper.make_node("MatMul", ["matrix", "B"] if vector == "A" else ["A", "matrix"], ["product"]),
        helper.make_node("Squeeze", ["product", "drop"], ["Y"]),
    ]  # fmt: skip
    return _function(node, opset, nodes, ["A", "B"])


def _qlinear_matmul_batched(node: Any, opset: int, types: dict, known: dict) -> Any:
    """QLinearMatMul of stacked (3-D and up) matrices, which IREE lowers wrongly (off by
    up to 134 on ONNX's tests; 2-D is right): ONNX's definition, step by step, for
    per-tensor scales and zero points: the int32 product of the zero-point-shifted
    integers, scaled by a_scale * b_scale / y_scale, shifted by y_zero_point, rounded
    half to even and saturated to the output type."""
    shapes = [_shape(types, i) if i else None for i in node.input]
    if len(node.input) != 8 or any(s is None for s in shapes) or max(len(shapes[0]), len(shapes[3])) < 3:
        return None
    if any(int(np.prod(shapes[k])) != 1 for k in (1, 2, 4, 5, 6, 7)):
        return None  # per-axis quantization: not this rewrite
    out_type = _elem_type(types, node.input[7])
    if out_type not in (TensorProto.UINT8, TensorProto.INT8):
        return None
    info = np.iinfo(helper.tensor_dtype_to_np_dtype(out_type))
    i32, f32 = TensorProto.INT32, TensorProto.FLOAT
    nodes = [
        helper.make_node("Cast", ["A"], ["a32"], to=i32), helper.make_node("Cast", ["A_ZP"], ["a_zp32"], to=i32),
        helper.make_node("Cast", ["B"], ["b32"], to=i32), helper.make_node("Cast", ["B_ZP"], ["b_zp32"], to=i32),
        helper.make_node("Sub", ["a32", "a_zp32"], ["a_shifted"]),
        helper.make_node("Sub", ["b32", "b_zp32"], ["b_shifted"]),
        helper.make_node("MatMul", ["a_shifted", "b_shifted"], ["product"]),
        helper.make_node("Mul", ["A_SCALE", "B_SCALE"], ["ab_scale"]),
        helper.make_node("Div", ["ab_scale", "Y_SCALE"], ["scale"]),
        helper.make_node("Cast", ["scale"], ["scale32"], to=f32),
        helper.make_node("Cast", ["product"], ["product_f"], to=f32),
        helper.make_node("Cast", ["Y_ZP"], ["y_zp_f"], to=f32),
        helper.make_node("Mul", ["product_f", "scale32"], ["scaled"]),
        helper.make_node("Add", ["scaled", "y_zp_f"], ["shifted"]),
        helper.make_node("Round", ["shifted"], ["rounded"]),
        _const("lo", np.array(info.min, np.float32)), _const("hi", np.array(info.max, np.float32)),
        helper.make_node("Clip", ["rounded", "lo", "hi"], ["saturated"]),
        helper.make_node("Cast", ["saturated"], ["Y"], to=out_type),
    ]  # fmt: skip
    return _function(node, opset, nodes, ["A", "A_SCALE", "A_ZP", "B", "B_SCALE", "B_ZP", "Y_SCALE", "Y_ZP"])


# --- LpNormalization ----------------------------------------------------------------


def _l2_normalization(node: Any, opset: int, types: dict, known: dict) -> Any:
    """LpNormalization with p = 2: x / sqrt(sum x^2) along the axis, 0 where that norm
    is 0 (as ONNX's reference defines it; IREE's lowering gives NaN there)."""
    attrs = _attrs(node)
    if attrs.get("p", 2) != 2:
        return None
    axis = np.array([attrs.get("axis", -1)], np.int64)
    nodes = [
        _const("axis", axis), _const("zero", np.zeros((), np.float32)),
        helper.make_node("ReduceSumSquare", ["X", "axis"], ["squares"], keepdims=1),
        helper.make_node("Sqrt", ["squares"], ["norm"]),
        helper.make_node("CastLike", ["zero", "X"], ["zero_x"]),
        helper.make_node("Equal", ["norm", "zero_x"], ["null"]),
        helper.make_node("Div", ["X", "norm"], ["scaled"]),
        helper.make_node("Where", ["null", "zero_x", "scaled"], ["Y"]),
    ]  # fmt: skip
    if opset < 18:  # ReduceSumSquare takes its axes as an attribute before opset 18
        nodes[2] = helper.make_node("ReduceSumSquare", ["X"], ["squares"], keepdims=1, axes=[int(axis[0])])
    return _function(node, opset, nodes, ["X"])


# --- BitShift -----------------------------------------------------------------------

# The shift amount of a BitShift this module wrote (in range by construction); ONNX's
# inliner keeps a value's name as a prefix ("hxc_shift_in_range__3"), so the next
# expansion round leaves that node to IREE.
_SHIFT_IN_RANGE = "hxc_shift_in_range"


def _bitshift(node: Any, opset: int, types: dict, known: dict) -> Any:
    """BitShift by an amount outside 0..bits-1 (negative, or the type's width or more),
    which ONNX defines (opset 28: the sign fill alone, -1 for a right shift of a negative
    signed value, else 0) and IREE lowers to LLVM shifts whose result is then undefined
    (poison): the code for one CPU gives ONNX's answer by chance (AVX-512's variable
    shifts give 0), for another not (x86-64-v3 and SPIR-V returned [0, 4, -1] for int8
    [-8, 4, -1] << [-1, -8, -16], ONNX says [0, 0, 0]). The amount is put in range
    first (0, or bits-1 for a signed right shift, which is the sign fill itself), and
    out-of-range elements of a left or unsigned right shift are 0. A constant amount
    already in range is left to IREE."""
    if node.input[1].startswith(_SHIFT_IN_RANGE):
        return None
    elem = _elem_type(types, node.input[0])
    if elem not in _INTEGER_TYPES:
        return None
    np_type = helper.tensor_dtype_to_np_dtype(elem)
    bits = np.iinfo(np_type).bits
    if node.input[1] in known:
        amount = np.asarray(known[node.input[1]])
        if ((amount >= 0) & (amount < bits)).all():
            return None
    direction = _attrs(node).get("direction", b"")
    right = (direction.decode() if isinstance(direction, bytes) else direction) == "RIGHT"
    signed = np.issubdtype(np_type, np.signedinteger)
    nodes = [
        _const("zero", np.zeros((), np_type)), _const("width", np.array(bits, np_type)),
        helper.make_node("Less", ["SHIFT", "width"], ["below_width"]),
        helper.make_node("Not", ["below_width"], ["too_far"]),
    ]  # fmt: skip
    if signed:
        nodes += [helper.make_node("Less", ["SHIFT", "zero"], ["negative"]),
                  helper.make_node("Or", ["negative", "too_far"], ["outside"])]  # fmt: skip
    else:
        nodes.append(helper.make_node("Identity", ["too_far"], ["outside"]))
    if right and signed:
        nodes += [
            _const("fill", np.array(bits - 1, np_type)),
            helper.make_node("Where", ["outside", "fill", "SHIFT"], [_SHIFT_IN_RANGE]),
            helper.make_node("BitShift", ["X", _SHIFT_IN_RANGE], ["Y"], direction="RIGHT"),
        ]  # fmt: skip
    else:
        nodes += [
            helper.make_node("Where", ["outside", "zero", "SHIFT"], [_SHIFT_IN_RANGE]),
            helper.make_node("BitShift", ["X", _SHIFT_IN_RANGE], ["shifted"], direction="RIGHT" if right else "LEFT"),
            helper.make_node("Where", ["outside", "zero", "shifted"], ["Y"]),
        ]  # fmt: skip
    return _function(node, opset, nodes, ["X", "SHIFT"])


# --- GridSample with zeros padding ----------------------------------------------------

# The grid of a GridSample this module wrote (every tap inside the image; see _bitshift's
# _SHIFT_IN_RANGE for why a name prefix marks it).
_GRID_IN_BOUNDS = "hxc_grid_in_bounds"
_GRID_PAD = 2  # zero rows and columns added on each side: two taps of a linear sample fit in them


def _gridsample_zeros(node: Any, opset: int, types: dict, known: dict) -> Any:
    """GridSample, linear mode, zeros padding (the default) over a 4-D input: IREE's
    lowering gets taps outside the image wrong: off by up to 1.3 in 81 of 252 values on
    a random grid reaching 0.6 past the edges (the same in every run), and garbage in
    one run in a few on ONNX's own test (4e21 where ONNX says 0, in hxc and plain IREE
    alike), as if it read outside the image. The same samples are taken from the image
    with _GRID_PAD zero rows and columns around it, at coordinates moved by the padding
    and clamped to [0.5, size + 2 * _GRID_PAD - 1.5]: every tap is then inside the
    padded image, a tap that was outside reads a zero, and a clamped sample (both taps
    outside) is 0, as zeros padding defines. Needs the input's spatial size as constants."""
    attrs = _attrs(node)
    text = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
    shape = _shape(types, node.input[0])
    if node.input[1].startswith(_GRID_IN_BOUNDS) or shape is None or len(shape) != 4:
        return None
    if text(attrs.get("padding_mode", "zeros")) != "zeros" or text(attrs.get("mode", "linear")) not in ("linear", "bilinear"):
        return None
    p, align = _GRID_PAD, attrs.get("align_corners", 0)
    size = np.array([shape[3], shape[2]], np.float64)  # the grid's last axis is (x, y): width first
    padded = size + 2 * p
    # Normalized coordinate g -> pixel x = g * scale + offset (ONNX's definition), then
    # x + p in the padded image -> its normalized coordinate x' * scale2 + offset2.
    scale, offset = ((size - 1) / 2, (size - 1) / 2) if align else (size / 2, (size - 1) / 2)
    scale2, offset2 = (2 / (padded - 1), -np.ones(2)) if align else (2 / padded, 1 / padded - 1)
    f32 = lambda v: np.asarray(v, np.float32)  # noqa: E731
    nodes = [
        _const("scale", f32(scale)), _const("offset", f32(offset + p)), _const("lo", f32([0.5, 0.5])),
        _const("hi", f32(padded - 1.5)), _const("scale2", f32(scale2)), _const("offset2", f32(offset2)),
        _const("pads", np.array([0, 0, p, p, 0, 0, p, p], np.int64)),
        *[helper.make_node("CastLike", [c, "GRID"], [f"{c}_g"]) for c in ("scale", "offset", "lo", "hi", "scale2", "offset2")],
        helper.make_node("Mul", ["GRID", "scale_g"], ["scaled"]),
        helper.make_node("Add", ["scaled", "offset_g"], ["pixel"]),
        helper.make_node("Max", ["pixel", "lo_g"], ["above"]),
        helper.make_node("Min", ["above", "hi_g"], ["inside"]),
        helper.make_node("Mul", ["inside", "scale2_g"], ["rescaled"]),
        helper.make_node("Add", ["rescaled", "offset2_g"], [_GRID_IN_BOUNDS]),
        helper.make_node("Pad", ["X", "pads"], ["padded"], mode="constant"),
        helper.make_node("GridSample", ["padded", _GRID_IN_BOUNDS], ["Y"], align_corners=align,
                         mode=text(attrs.get("mode", "linear")), padding_mode="zeros"),
    ]  # fmt: skip
    return _function(node, opset, nodes, ["X", "GRID"])


_INTEGER_TYPES = frozenset({TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
                            TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64})  # fmt: skip

_REDUCTIONS = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
               "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")  # fmt: skip

DECOMPOSITIONS: dict[str, Builder] = {
    "CumSum": _cumsum,
    "CumProd": _cumprod,
    "LpPool": _lppool,
    "Range": _range_low_precision,
    "MatMul": _matmul_vector_batch,
    "QLinearMatMul": _qlinear_matmul_batched,
    "LpNormalization": _l2_normalization,
    "BitShift": _bitshift,
    "GridSample": _gridsample_zeros,
    **{op: _reduce_empty_axes for op in _REDUCTIONS},
}

"""Element types: one record per dtype, and every other spelling derived from it.

hxc names element types as IREE's tools do (`f32`, `i64`, `i1`: `--input 1x3xf32`).
Each record carries that name's numpy, torch, ONNX, ONNX Runtime, IREE HAL and KServe
v2 / Triton spellings and the tolerance outputs of that type are compared at. Nothing
else in hxc lists dtypes. torch, onnx and IREE objects are looked up by name only when
asked for, so importing this module imports none of them (nor numpy).

bf16 and the float8 types have no numpy dtype of their own: on the host they are
ml_dtypes' (a dependency of iree-base-runtime), and in `.npz` files, which cannot name
those types, they are stored as their raw bits (`uint16`, `uint8`): `to_storage` /
`from_storage`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hxc.errors import LoweringError

if TYPE_CHECKING:
    import numpy as np

# Size a dynamic dimension gets in generated example inputs. torch.export specialises
# sizes 0 and 1, and a size of 1 would let a wrongly broadcast dimension pass unnoticed.
DYNAMIC_EXAMPLE_SIZE = 2


@dataclass(frozen=True)
class DType:
    name: str  # hxc's (and IREE's) name: f32
    numpy: str  # numpy dtype name; "bfloat16" is ml_dtypes'
    torch: str  # attribute of the torch module: float32
    onnx: int  # onnx.TensorProto.DataType value
    onnxruntime: str  # NodeArg.type: tensor(float)
    iree: str  # iree.runtime.HalElementType member: FLOAT_32
    kserve: str  # KServe v2 / Triton inference protocol datatype: FP32
    # (atol, rtol) for comparing outputs: |actual - expected| <= atol + rtol * |expected|;
    # None: must match exactly (integers, booleans).
    tolerance: tuple[float, float] | None
    # Carried across an artifact's interface. (f64 is, now that the targets that have it
    # keep it, `--iree-input-demote-f64-to-f32=false`, and Vulkan casts it to f32.)
    interface: bool = True

    @property
    def is_float(self) -> bool:
        return self.tolerance is not None

    def numpy_dtype(self) -> np.dtype:
        return _numpy_dtype(self.name)

    @property
    def numpy_native(self) -> bool:
        """Numpy defines it itself (not ml_dtypes' bf16 or float8): the buffer protocol
        and DLPack carry it as it is."""
        return not _foreign(self.numpy_dtype())

    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.torch)

    def iree_element_type(self) -> Any:
        import iree.runtime as rt

        return getattr(rt.HalElementType, self.iree)


# f32 leaves room for reassociated reductions on GPUs; reduced precision is looser.
DTYPES: tuple[DType, ...] = (
    DType("f64", "float64", "float64", 11, "tensor(double)", "FLOAT_64", "FP64", (1e-6, 1e-5)),
    DType("f32", "float32", "float32", 1, "tensor(float)", "FLOAT_32", "FP32", (1e-4, 1e-3)),
    DType("f16", "float16", "float16", 10, "tensor(float16)", "FLOAT_16", "FP16", (1e-2, 1e-2)),
    DType("bf16", "bfloat16", "bfloat16", 16, "tensor(bfloat16)", "BFLOAT_16", "BF16", (5e-2, 5e-2)),
    DType("i64", "int64", "int64", 7, "tensor(int64)", "SINT_64", "INT64", None),
    DType("i32", "int32", "int32", 6, "tensor(int32)", "SINT_32", "INT32", None),
    DType("i16", "int16", "int16", 5, "tensor(int16)", "SINT_16", "INT16", None),
    DType("i8", "int8", "int8", 3, "tensor(int8)", "SINT_8", "INT8", None),
    DType("u8", "uint8", "uint8", 2, "tensor(uint8)", "UINT_8", "UINT8", None),
    DType("i1", "bool", "bool", 9, "tensor(bool)", "BOOL_8", "BOOL", None),
    DType("u16", "uint16", "uint16", 4, "tensor(uint16)", "UINT_16", "UINT16", None),
    DType("u32", "uint32", "uint32", 12, "tensor(uint32)", "UINT_32", "UINT32", None),
    DType("u64", "uint64", "uint64", 13, "tensor(uint64)", "UINT_64", "UINT64", None),
    # float8: no KServe v2 / Triton datatype. Tolerance: one step of the mantissa near 1
    # (3 bits for e4m3, 2 for e5m2).
    DType("f8e4m3fn", "float8_e4m3fn", "float8_e4m3fn", 17, "tensor(float8e4m3fn)", "FLOAT_8_E4M3_FN", "", (0.125, 0.125)),
    DType("f8e4m3fnuz", "float8_e4m3fnuz", "float8_e4m3fnuz", 18, "tensor(float8e4m3fnuz)", "FLOAT_8_E4M3_FNUZ", "",
          (0.125, 0.125)),
    DType("f8e5m2", "float8_e5m2", "float8_e5m2", 19, "tensor(float8e5m2)", "FLOAT_8_E5M2", "", (0.25, 0.25)),
    DType("f8e5m2fnuz", "float8_e5m2fnuz", "float8_e5m2fnuz", 20, "tensor(float8e5m2fnuz)", "FLOAT_8_E5M2_FNUZ", "",
          (0.25, 0.25)),
)
_BY_NAME = {d.name: d for d in DTYPES}
NAMES: tuple[str, ...] = tuple(_BY_NAME)
# Compute precisions a build may ask for, and the element type each computes in.
# int8 and int4 quantise a language model's weights only: they compute in f32.
PRECISIONS: dict[str, str] = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "f32", "int4": "f32"}
# The weight-only precisions and their bits per stored weight (`hxc.compiler.quantize`).
WEIGHT_BITS: dict[str, int] = {"int8": 8, "int4": 4}


def dtype(name: str) -> DType:
    """The record for an hxc dtype name; KeyError for names hxc does not know."""
    return _BY_NAME[name]


def from_numpy(np_dtype: Any) -> DType | None:
    return next((d for d in DTYPES if d.numpy_dtype() == np_dtype), None)


@functools.cache  # torch dtypes are hashable; every torch input of every call asks
def from_torch(torch_dtype: Any) -> DType | None:
    return next((d for d in DTYPES if f"torch.{d.torch}" == str(torch_dtype)), None)


def from_onnx(elem_type: int) -> DType | None:
    return next((d for d in DTYPES if d.onnx == elem_type), None)


def interface_dtype(found: DType | None, label: str, what: str) -> str:
    """The hxc name of a model input's or output's element type, or a one-line
    LoweringError saying why the artifact's interface cannot carry it. `what` names the
    type as the model spells it (`dtype torch.complex64`, `ONNX type UINT16`)."""
    if found is None:
        raise LoweringError(f"{label} has {what}, which hxc does not support")
    if not found.interface:
        raise LoweringError(
            f"{label} is float64; IREE demotes f64 to f32, which breaks the artifact's interface",
            hint="convert the model and its inputs to float32",
        )
    return found.name


def compute_dtype(name: str, precision: str, casts: tuple[tuple[str, str], ...] = ()) -> str:
    """The dtype whose error an output carries: a reduced-precision artifact's f32
    outputs carry its compute precision's error, whatever type they are returned in;
    an f64 output an artifact computes as f32 (Artifact.interface_casts) carries f32's."""
    if name == "f64" and dict(casts).get("f64") == "f32":
        return "f32"
    return PRECISIONS.get(precision, name) if name == "f32" else name


def _foreign(np_dtype: np.dtype) -> bool:
    """A dtype numpy itself does not define (ml_dtypes' bf16 and float8): `.npz` files,
    the buffer protocol and torch cannot take it."""
    return np_dtype.type.__module__.startswith("ml_dtypes")


def to_storage(array: np.ndarray) -> np.ndarray:
    """An array as an `.npz` (or the buffer protocol) can hold it: bf16 and float8 as
    their raw bits."""
    return array.view(f"u{array.dtype.itemsize}") if _foreign(array.dtype) else array


def from_storage(array: np.ndarray, name: str) -> np.ndarray:
    """The inverse of `to_storage`, for an array of hxc dtype `name`."""
    want = _numpy_dtype(name)
    return array.view(want) if _foreign(want) and array.dtype.kind == "u" and array.dtype.itemsize == want.itemsize else array


@functools.cache
def _numpy_dtype(name: str) -> np.dtype:
    import numpy as np

    numpy_name = _BY_NAME[name].numpy
    if hasattr(np, numpy_name):
        return np.dtype(numpy_name)
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, numpy_name))


# --- torch tensors <-> host arrays, without importing torch unless one is given ---------


def is_torch(x: object) -> bool:
    """A torch tensor, recognised without importing torch."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def to_numpy(x: object) -> np.ndarray:
    """A host array for a numpy array, a torch tensor (bf16 included) or a sequence."""
    import numpy as np

    if is_torch(x):
        import torch

        t: Any = x
        if t.is_cpu and not t.requires_grad and t.is_contiguous() and _numpy_reads(t.dtype):
            return t.numpy()  # what the general path below returns, without its no-op calls (3 µs)
        t = t.detach().cpu().contiguous()
        found = from_torch(t.dtype)
        if found is not None and _foreign(_numpy_dtype(found.name)):  # numpy cannot take it: go through the bits
            return t.view(torch.uint8 if t.element_size() == 1 else torch.int16).numpy().view(_numpy_dtype(found.name))
        return t.numpy()
    return np.asarray(x)


def to_torch(array: np.ndarray, name: str) -> Any:
    """A torch tensor sharing `array`'s memory where it can, for an array of hxc dtype `name`."""
    import numpy as np
    import torch

    if type(array) is np.ndarray and array.flags.c_contiguous and not _foreign_name(name):
        return torch.from_numpy(array)  # what the general path below returns, sooner
    array = np.asarray(array, order="C")  # not ascontiguousarray: it makes a 0-d array 1-d
    d = dtype(name)
    if _foreign(_numpy_dtype(name)):
        raw = array.view(np.uint8 if array.dtype.itemsize == 1 else np.int16)
        return torch.from_numpy(raw).view(d.torch_dtype())
    return torch.from_numpy(array)


@functools.cache
def _foreign_name(name: str) -> bool:
    return _foreign(_numpy_dtype(name))


@functools.cache
def _numpy_reads(torch_dtype: Any) -> bool:
    """A torch dtype hxc knows whose tensors `Tensor.numpy()` takes as they are."""
    found = from_torch(torch_dtype)
    return found is not None and not _foreign(_numpy_dtype(found.name))

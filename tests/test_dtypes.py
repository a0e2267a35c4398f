"""The dtype table: every spelling in it is checked against the library that defines it
(numpy, torch, ONNX, ONNX Runtime, IREE), conversions round-trip, and importing it
imports none of those libraries."""

from __future__ import annotations

import subprocess
import sys

import iree.runtime as rt
import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from hxc import dtypes
from hxc.compiler.specs import example_arrays
from hxc.errors import LoweringError
from hxc.manifests.schema import TensorSpec

ALL = [d.name for d in dtypes.DTYPES]


@pytest.mark.parametrize("name", ALL)
def test_every_spelling_names_the_same_type(name):
    d = dtypes.dtype(name)
    x = torch.zeros(2, dtype=d.torch_dtype())
    assert dtypes.to_numpy(x).dtype == d.numpy_dtype()
    assert dtypes.from_torch(x.dtype) is d and dtypes.from_numpy(d.numpy_dtype()) is d and dtypes.from_onnx(d.onnx) is d
    assert helper.tensor_dtype_to_np_dtype(d.onnx) == d.numpy_dtype()
    assert isinstance(d.iree_element_type(), rt.HalElementType)
    kserve = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BF16"}
    assert d.kserve in kserve or (d.kserve == "" and name.startswith("f8"))  # KServe v2 has no float8


@pytest.mark.parametrize("name", ALL)
def test_onnxruntime_type_strings(name, tmp_path):
    d = dtypes.dtype(name)
    x = helper.make_tensor_value_info("x", d.onnx, [2])
    y = helper.make_tensor_value_info("y", d.onnx, [2])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 21)])  # float8 Identity: opset 19+  # fmt: skip
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == d.onnxruntime


def test_iree_element_types_match_their_size():
    for d in dtypes.DTYPES:
        bits = rt.HalElementType.__members__[d.iree].value & 0xFF  # IREE packs the bit count in the low byte
        assert bits == d.numpy_dtype().itemsize * 8, d.name


@pytest.mark.parametrize("name", ALL)
def test_host_conversions_round_trip(name):
    [a] = example_arrays([TensorSpec("x", name, (3, "n"))])
    assert a.shape == (3, dtypes.DYNAMIC_EXAMPLE_SIZE) and a.dtype == dtypes.dtype(name).numpy_dtype()
    t = dtypes.to_torch(a, name)
    assert t.dtype == dtypes.dtype(name).torch_dtype()
    back = dtypes.to_numpy(t)
    assert back.dtype == a.dtype and back.tobytes() == a.tobytes()
    stored = dtypes.to_storage(a)
    assert stored.dtype != object and np.lib.format.dtype_to_descr(stored.dtype)  # .npz can name it
    assert dtypes.from_storage(stored, name).tobytes() == a.tobytes()


def test_example_inputs_are_deterministic_and_suit_indices():
    specs = [TensorSpec("x", "f32", (4, 4)), TensorSpec("ids", "i64", (64,)), TensorSpec("m", "i1", (8,))]
    first, second = example_arrays(specs), example_arrays(specs)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first, second))
    assert 0 <= first[1].min() and first[1].max() < 10  # valid indices into any dimension of 10
    assert first[2].dtype == bool
    assert example_arrays(specs, seed=1)[0].tobytes() != first[0].tobytes()


def test_unknown_types_are_refused_at_the_interface():
    assert dtypes.interface_dtype(dtypes.from_torch(torch.float16), "input 'x'", "dtype torch.float16") == "f16"
    assert dtypes.interface_dtype(dtypes.from_torch(torch.float64), "input 'x'", "dtype torch.float64") == "f64"
    with pytest.raises(LoweringError, match="output_0 has dtype torch.complex64, which hxc does not support"):
        dtypes.interface_dtype(dtypes.from_torch(torch.complex64), "output_0", "dtype torch.complex64")


def test_reduced_precision_outputs_carry_their_compute_precision():
    assert dtypes.compute_dtype("f32", "fp16") == "f16"
    assert dtypes.compute_dtype("f32", "bf16") == "bf16"
    assert dtypes.compute_dtype("f32", "fp32") == "f32"
    assert dtypes.compute_dtype("i64", "fp16") == "i64"  # integer outputs stay exact
    assert dtypes.compute_dtype("f64", "fp32", (("f64", "f32"),)) == "f32"  # computed as f32 (Vulkan)


def test_importing_the_table_imports_no_library():
    code = "import sys, hxc.dtypes; print(sorted(m for m in ('torch', 'onnx', 'iree.runtime', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

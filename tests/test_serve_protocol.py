"""The inference protocol's messages without a server: what tritonclient builds parses to
the arrays it was given, responses decode in tritonclient to the outputs, every
malformed request is a ProtocolError with the protocol's status, and no byte string
makes the parser raise anything else."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as th
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.http._utils import _get_inference_request

from hxc.dtypes import DTYPES
from hxc.manifests.schema import OutputTree, Signature, TensorSpec
from hxc.serve.protocol import HEADER_LENGTH, ProtocolError, encode_infer, parse_infer, tensor_metadata

SIG = Signature(
    (TensorSpec("x", "f32", ("batch", 3)), TensorSpec("mask", "i1", ("batch", 3)), TensorSpec("ids", "i64", ("batch",))),
    (TensorSpec("y", "f32", ("batch", 3)), TensorSpec("h", "bf16", ("batch", 2))),
    OutputTree("tuple", items=(OutputTree("leaf", 0), OutputTree("leaf", 1))),
)


def _inputs(batch: int = 2):
    rng = np.random.default_rng(0)
    return [rng.standard_normal((batch, 3)).astype(np.float32), rng.random((batch, 3)) > 0.5, np.arange(batch, dtype=np.int64) - 1]


def _triton_body(arrays, binary: bool, outputs=None, parameters=None):
    """The body and header length tritonclient itself would send."""
    tensors = []
    for (name, kind), a in zip((("x", "FP32"), ("mask", "BOOL"), ("ids", "INT64")), arrays):
        t = th.InferInput(name, list(a.shape), kind)
        t.set_data_from_numpy(a, binary_data=binary)
        tensors.append(t)
    body, length = _get_inference_request(tensors, "req-1", outputs, 0, False, False, 0, None, parameters)
    return body, None if length is None else str(length)


@pytest.mark.parametrize("binary", [True, False])
def test_what_tritonclient_sends_parses_to_its_arrays(binary):
    arrays = _inputs(3)
    body, length = _triton_body(arrays, binary, parameters={"slo_ms": 25, "policy": "cost"})
    req = parse_infer(body, length, SIG)
    for got, want in zip(req.inputs, arrays):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    assert req.id == "req-1" and req.slo_ms == 25 and req.policy == "cost" and req.rows == 3
    # No outputs named: tritonclient asks for every output as binary data.
    assert [(o.name, o.binary) for o in req.outputs] == [("y", True), ("h", True)]


def test_responses_decode_in_tritonclient():
    arrays = _inputs(2)
    outputs = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([[1.5, -2], [0.25, 8]], ml_dtypes.bfloat16)]
    wanted = [th.InferRequestedOutput("h", binary_data=True), th.InferRequestedOutput("y", binary_data=False)]
    body, length = _triton_body(arrays, True, outputs=wanted)
    req = parse_infer(body, length, SIG)
    content, headers = encode_infer("m", "1", req, outputs, SIG, {"device": "cpu:host"})
    result = th.InferResult.from_response_body(content, header_length=int(headers[HEADER_LENGTH]) if HEADER_LENGTH in headers else None)
    np.testing.assert_array_equal(result.as_numpy("y"), outputs[0])
    np.testing.assert_array_equal(result.as_numpy("h").astype(np.float32), outputs[1].astype(np.float32))
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["h", "y"] and response["id"] == "req-1"
    assert response["parameters"] == {"device": "cpu:host"} and "data" in response["outputs"][1]


@pytest.mark.parametrize("binary", [True, False])
def test_a_zero_row_request_parses_and_its_empty_outputs_come_back(binary):
    # KServe v2 allows 0 in a shape; as binary data such a tensor is 0 bytes.
    arrays = _inputs(0)
    body, length = _triton_body(arrays, binary)
    req = parse_infer(body, length, SIG)
    assert [a.shape for a in req.inputs] == [(0, 3), (0, 3), (0,)] and req.rows == 0
    assert [a.dtype for a in req.inputs] == [a.dtype for a in arrays]
    outputs = [np.zeros((0, 3), np.float32), np.zeros((0, 2), ml_dtypes.bfloat16)]
    wanted = [th.InferRequestedOutput("y", binary_data=binary), th.InferRequestedOutput("h", binary_data=True)]
    req = parse_infer(*_triton_body(arrays, binary, outputs=wanted), SIG)
    content, headers = encode_infer("m", "1", req, outputs, SIG)
    result = th.InferResult.from_response_body(content, header_length=int(headers[HEADER_LENGTH]))
    assert result.as_numpy("y").shape == (0, 3) and result.as_numpy("h").shape == (0, 2)
    assert result.get_output("h")["parameters"]["binary_data_size"] == 0


def test_metadata_lists_dynamic_dims_as_minus_one_and_kserve_datatypes():
    meta = tensor_metadata(SIG)
    assert meta["inputs"][0] == {"name": "x", "datatype": "FP32", "shape": [-1, 3]}
    assert [t["datatype"] for t in meta["inputs"] + meta["outputs"]] == ["FP32", "BOOL", "INT64", "FP32", "BF16"]
    assert {d.kserve for d in DTYPES} >= {"FP32", "FP16", "BF16", "INT64", "INT32", "INT8", "UINT8", "BOOL"}


def _json(doc) -> bytes:
    return json.dumps(doc).encode()


GOOD = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
                   {"name": "mask", "datatype": "BOOL", "shape": [1, 3], "data": [True, False, True]},
                   {"name": "ids", "datatype": "INT64", "shape": [1], "data": [7]}]}  # fmt: skip


def _with(i: int, **change):
    doc = json.loads(json.dumps(GOOD))
    doc["inputs"][i].update(change)
    return doc


@pytest.mark.parametrize("body,length,message", [
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "must be a JSON object"),
    (_json({"inputs": []}), None, "non-empty list"),
    (_json(_with(0, datatype="FP64")), None, "FP64"),
    (_json(_with(0, datatype="BYTES", data=["a", "b", "c"])), None, "BYTES"),
    (_json(_with(0, datatype="INT32")), None, "the model expects FP32"),
    (_json(_with(0, shape=[1, 4], data=[1, 2, 3, 4])), None, "the model expects"),
    (_json(_with(0, shape=[1, 3], data=[1, 2])), None, "holds 2 elements"),
    (_json(_with(0, data=["a", "b", "c"])), None, "strings"),
    (_json(_with(2, data=[1.5])), None, "non-integers"),
    (_json(_with(2, data=[2**70])), None, None),
    (_json(_with(0, data=[[1, 2], [3]])), None, "regular shape"),
    (_json(_with(0, shape=[-1, 3])), None, "non-negative"),
    (_json({"inputs": GOOD["inputs"][:2]}), None, "missing input(s) 'ids'"),
    (_json({"inputs": GOOD["inputs"] + [GOOD["inputs"][0]]}), None, "given twice"),
    (_json({"inputs": GOOD["inputs"] + [{**GOOD["inputs"][0], "name": "z"}]}), None, "unknown input"),
    (_json({**GOOD, "outputs": [{"name": "nope"}]}), None, "unknown output"),
    (_json({**GOOD, "outputs": [{"name": "h", "parameters": {"binary_data": False}}]}), None, "only as binary"),
    (_json({**GOOD, "parameters": {"slo_ms": -3}}), None, "slo_ms"),
    (_json({**GOOD, "parameters": {"policy": "fastest"}}), None, "policy"),
    (_json(_with(0, parameters={"binary_data_size": 12}, data=None)), None, "both 'data' and binary"),
    (_json(_with(0, parameters={"binary_data_size": 12})) , None, "both"),
    (_json(GOOD), "12", "not valid JSON"),
    (_json(GOOD), "999999", "the body has"),
    (_json(GOOD), "abc", "number of bytes"),
    (_json({"inputs": [{"name": "h", "datatype": "BF16", "shape": [1, 2], "data": [1, 2]}]}), None, "only as binary"),
])  # fmt: skip
def test_malformed_requests_are_protocol_errors(body, length, message):
    with pytest.raises(ProtocolError) as e:
        parse_infer(body, length, SIG)
    assert e.value.status == 400
    if message:
        assert message in str(e.value)


def test_binary_sizes_must_match_shapes_and_the_body():
    x = np.ones((1, 3), np.float32)
    header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "parameters": {"binary_data_size": 12}},
                         GOOD["inputs"][1], GOOD["inputs"][2]]}  # fmt: skip
    raw = _json(header)
    assert parse_infer(raw + x.tobytes(), str(len(raw)), SIG).inputs[0].tolist() == [[1, 1, 1]]
    with pytest.raises(ProtocolError, match="add up to 12"):
        parse_infer(raw + x.tobytes() + b"extra", str(len(raw)), SIG)
    with pytest.raises(ProtocolError, match="runs past the end"):
        parse_infer(raw + x.tobytes()[:8], str(len(raw)), SIG)
    header["inputs"][0]["parameters"]["binary_data_size"] = 8
    raw = _json(header)
    with pytest.raises(ProtocolError, match="needs 12"):
        parse_infer(raw + x.tobytes()[:8], str(len(raw)), SIG)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.one_of(st.none(), st.integers(-5, 400).map(str)))
def test_no_bytes_make_the_parser_raise_anything_but_a_protocol_error(body, length):
    try:
        parse_infer(body, length, SIG)
    except ProtocolError as e:
        assert e.status == 400


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["inputs", "outputs", "parameters", "id"]), st.integers(0, 2),
       st.sampled_from(["name", "datatype", "shape", "data", "parameters"]), _json_values)  # fmt: skip
def test_no_mutation_of_a_good_request_crashes_the_parser(where, i, key, value):
    doc = json.loads(json.dumps(GOOD))
    if where == "inputs":
        doc["inputs"][i][key] = value
    else:
        doc[where] = value
    try:
        req = parse_infer(_json(doc), None, SIG)
    except ProtocolError as e:
        assert e.status == 400
    else:
        assert [a.dtype for a in req.inputs] == [np.float32, np.bool_, np.int64]


def test_deeply_nested_json_is_refused_not_a_crash():
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ' + b"[" * 100000 + b"]" * 100000 + b"}]}"
    with pytest.raises(ProtocolError):
        parse_infer(body, None, SIG)


def _strict_json(raw: bytes):
    """What a strict parser (JavaScript's, Go's) accepts: no NaN or Infinity literals."""

    def refuse(literal: str):
        raise ValueError(f"{literal} is not JSON")

    return json.loads(raw, parse_constant=refuse)


@pytest.mark.parametrize("data,message", [
    ("[NaN, 1, 2]", "NaN"),
    ("[1, Infinity, 2]", "Infinity"),
    ("[1, 2, -Infinity]", "-Infinity"),
    ("[1e400, 1, 2]", "out of range for FP32"),  # valid JSON that overflows a double
    ("[1e39, 1, 2]", "out of range for FP32"),  # a double, but not a float32
])  # fmt: skip
def test_non_finite_json_inputs_are_refused(data, message):
    body = _json(GOOD).replace(b"[1, 2, 3]", data.encode(), 1)
    assert body != _json(GOOD)
    with pytest.raises(ProtocolError) as e:
        parse_infer(body, None, SIG)
    assert e.value.status == 400 and message in str(e.value) and "binary tensor data" in str(e.value)
    # NaN anywhere in the header, not only in tensor data.
    with pytest.raises(ProtocolError, match="binary tensor data"):
        parse_infer(_json(GOOD)[:-1] + b', "parameters": {"slo_ms": NaN}}', None, SIG)


def test_non_finite_binary_inputs_pass_unchanged():
    x = np.array([[np.nan, np.inf, -np.inf]], np.float32)
    header = _json({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "parameters": {"binary_data_size": 12}},
                               GOOD["inputs"][1], GOOD["inputs"][2]]})  # fmt: skip
    got = parse_infer(header + x.tobytes(), str(len(header)), SIG).inputs[0]
    assert got.tobytes() == x.tobytes()


def test_non_finite_outputs_are_null_in_json_and_unchanged_in_binary():
    y = np.array([[np.nan, 1.5, np.inf], [-np.inf, 0.0, -2.0]], np.float32)
    h = np.array([[np.nan, 1], [2, 3]], ml_dtypes.bfloat16)
    req = parse_infer(_json({**GOOD, "outputs": [{"name": "y"}, {"name": "h", "parameters": {"binary_data": True}}]}), None, SIG)
    content, headers = encode_infer("m", "1", req, [y, h], SIG)
    length = int(headers[HEADER_LENGTH])
    doc = _strict_json(content[:length])
    assert doc["outputs"][0]["data"] == [None, 1.5, None, None, 0.0, -2.0]
    assert doc["outputs"][0]["parameters"] == {"nonfinite": True}
    result = th.InferResult.from_response_body(content, header_length=length)
    np.testing.assert_array_equal(result.as_numpy("y"), np.where(np.isfinite(y), y, np.nan))  # tritonclient: null is NaN
    assert result.as_numpy("h").tobytes() == h.tobytes()  # binary: NaN as it was
    # Binary FP32 keeps NaN and both infinities bit for bit; finite JSON outputs carry no flag.
    req = parse_infer(_json({**GOOD, "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}), None, SIG)
    content, headers = encode_infer("m", "1", req, [y, h], SIG)
    assert content[int(headers[HEADER_LENGTH]):] == y.tobytes()
    req = parse_infer(_json({**GOOD, "outputs": [{"name": "y"}]}), None, SIG)
    content, _ = encode_infer("m", "1", req, [np.ones((2, 3), np.float32), h], SIG)
    assert "parameters" not in _strict_json(content)["outputs"][0]

"""The KServe v2 / Open Inference Protocol's inference messages, as bytes in and bytes out.

No HTTP here: `parse_infer` turns a request body (JSON alone, or JSON followed by
binary tensor data as Triton's binary tensor data extension lays it out) into checked
numpy arrays in the model's input order, and `encode_infer` turns outputs into a
response body. Every mistake in a request is a `ProtocolError` carrying the HTTP
status the protocol gives it; nothing in a request can make these functions raise
anything else (tests/test_serve_protocol.py fuzzes them).

Binary tensor data extension (what tritonclient sends and expects):
- request header `Inference-Header-Content-Length: N`: the first N bytes of the body
  are the JSON inference header, the rest is tensor data;
- an input with `"parameters": {"binary_data_size": K}` takes the next K bytes, in the
  order the inputs are listed (row-major, little-endian; BOOL one byte per element);
- a requested output with `"parameters": {"binary_data": true}`, or every output when
  the request names none and sets the request parameter `binary_data_output`, comes
  back the same way, with `binary_data_size` in its JSON entry.
BF16 has no JSON spelling in the protocol (it is Triton's extension), so it travels
only as binary data. Neither do NaN and the infinities (JSON has no spelling for them,
and strict parsers refuse Python's `NaN`): a JSON request holding one is a 400, and a
non-finite value in a JSON output is `null`, with `"parameters": {"nonfinite": true}`
on that output (tritonclient reads `null` as NaN); binary data carries them unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hxc.dtypes import DTYPES, DType, dtype
from hxc.errors import HxcError, SignatureError
from hxc.manifests.schema import Signature
from hxc.pool.policies import policy_names

HEADER_LENGTH = "Inference-Header-Content-Length"
POLICIES = policy_names()  # the routing policies a request's `policy` parameter may name
# JSON element kinds numpy infers that each hxc dtype accepts (an integer input
# refuses 1.5 instead of truncating it; a float input takes integers).
_ACCEPTS = {"f": "fiu", "i": "iu", "u": "iu", "b": "b"}


class ProtocolError(HxcError):
    """A request the protocol rejects; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """A parsed, checked inference request: `inputs` in the model's order."""

    id: str | None
    inputs: tuple[np.ndarray, ...]
    outputs: tuple[RequestedOutput, ...]  # in the order to answer with
    slo_ms: float | None
    policy: str | None
    device: str | None = None  # restrict it to the devices this selector names
    parameters: Mapping[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.inputs[0].shape[0]) if self.inputs and self.inputs[0].ndim else 1


def kserve_name(hxc_dtype: str) -> str:
    return dtype(hxc_dtype).kserve


def tensor_metadata(signature: Signature) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs as model metadata lists them: -1 for a dynamic dimension."""

    def one(spec) -> dict[str, Any]:
        return {"name": spec.name, "datatype": kserve_name(spec.dtype),
                "shape": [d if isinstance(d, int) else -1 for d in spec.shape]}  # fmt: skip

    return {"inputs": [one(s) for s in signature.inputs], "outputs": [one(s) for s in signature.outputs]}


def parse_infer(body: bytes, header_length: str | None, signature: Signature) -> InferRequest:
    """The request in `body`; `header_length` is the Inference-Header-Content-Length
    header (None when the body is JSON alone)."""
    header_bytes, binary = _split(body, header_length)
    try:
        doc = json.loads(header_bytes, parse_constant=_non_finite)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"the inference header is not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(doc, dict):
        raise ProtocolError("the inference header must be a JSON object")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("'id' must be a string")
    params = _object(doc.get("parameters"), "request 'parameters'")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("'inputs' must be a non-empty list")
    by_name: dict[str, np.ndarray] = {}
    offset = 0
    for i, raw in enumerate(raw_inputs):
        name, array, used = _input(raw, i, binary, offset)
        if name in by_name:
            raise ProtocolError(f"input {name!r} is given twice")
        by_name[name] = array
        offset += used
    if offset != len(binary):
        raise ProtocolError(f"the body holds {len(binary)} bytes of binary tensor data but the inputs' "
                            f"binary_data_size add up to {offset}")  # fmt: skip
    expected = [s.name for s in signature.inputs]
    unknown = [n for n in by_name if n not in expected]
    if unknown:
        raise ProtocolError(f"unknown input(s) {', '.join(map(repr, unknown))}; the model's inputs are {', '.join(expected)}")
    missing = [n for n in expected if n not in by_name]
    if missing:
        raise ProtocolError(f"missing input(s) {', '.join(map(repr, missing))}")
    ordered = []
    for spec in signature.inputs:
        a = by_name[spec.name]
        if a.dtype != dtype(spec.dtype).numpy_dtype():
            raise ProtocolError(f"input {spec.name!r} has datatype {_kserve_of(a)}; the model expects {kserve_name(spec.dtype)}")
        ordered.append(a)
    from hxc.runtime.loader import check_inputs

    try:
        check_inputs(signature, ordered)
    except SignatureError as e:
        raise ProtocolError(str(e).replace("expected ", "the model expects ")) from None
    outputs = _requested_outputs(doc.get("outputs"), signature, bool(params.get("binary_data_output", False)))
    slo_ms = params.get("slo_ms")
    if slo_ms is not None and (isinstance(slo_ms, bool) or not isinstance(slo_ms, (int, float)) or not math.isfinite(slo_ms) or slo_ms <= 0):
        raise ProtocolError(f"parameter 'slo_ms' must be a positive number of milliseconds, not {slo_ms!r}")
    policy = params.get("policy")
    if policy is not None and policy not in POLICIES:
        raise ProtocolError(f"parameter 'policy' must be one of {', '.join(POLICIES)}, not {policy!r}")
    device = params.get("device")
    if device is not None and (not isinstance(device, str) or not device):
        raise ProtocolError(f"parameter 'device' must be a device selector (cpu, vulkan, an artifact id), not {device!r}")
    return InferRequest(request_id, tuple(ordered), outputs, float(slo_ms) if slo_ms is not None else None, policy, device,
                        params)


def encode_infer(model: str, version: str, request: InferRequest, outputs: Sequence[np.ndarray], signature: Signature,
                 parameters: Mapping[str, Any] | None = None) -> tuple[bytes, dict[str, str]]:  # fmt: skip
    """The response body and the headers that go with it; `parameters` are the
    response's (how it was served)."""
    index = {s.name: i for i, s in enumerate(signature.outputs)}
    entries, chunks = [], []
    for want in request.outputs:
        i = index[want.name]
        spec, array = signature.outputs[i], np.ascontiguousarray(outputs[i])
        entry: dict[str, Any] = {"name": spec.name, "datatype": kserve_name(spec.dtype), "shape": list(array.shape)}
        if want.binary:
            data = array.astype("<" + array.dtype.str[1:], copy=False).tobytes() if array.dtype.kind in "fiu" else array.tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"], finite = _json_list(array)
            if not finite:
                entry["parameters"] = {"nonfinite": True}
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": entries}
    if request.id is not None:
        doc["id"] = request.id
    if parameters:
        doc["parameters"] = dict(parameters)
    header = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    if not chunks:
        return header, {"content-type": "application/json"}
    return b"".join([header, *chunks]), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


# --- pieces -----------------------------------------------------------------------------


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length)
    except ValueError:
        raise ProtocolError(f"{HEADER_LENGTH} must be a number of bytes, not {header_length[:40]!r}") from None
    if not 0 < n <= len(body):
        raise ProtocolError(f"{HEADER_LENGTH} is {n} but the body has {len(body)} bytes")
    view = memoryview(body)
    return bytes(view[:n]), view[n:]


def _non_finite(literal: str) -> Any:
    raise ProtocolError(f"the inference header holds {literal}, which is not JSON: use binary tensor data for non-finite values")


def _json_list(array: np.ndarray) -> tuple[list, bool]:
    """The array as a flat JSON list, and whether every value was finite (the others
    become None: JSON has no NaN or infinity)."""
    flat = array.ravel()
    if flat.dtype.kind != "f" or (finite := np.isfinite(flat)).all():
        return flat.tolist(), True
    values = flat.astype(object)  # Python floats, and room for None
    values[~finite] = None
    return values.tolist(), False


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    return value


def _by_kserve(name: Any, where: str) -> DType:
    found = next((d for d in DTYPES if d.kserve == name and d.interface), None)
    if found is None:
        supported = ", ".join(d.kserve for d in DTYPES if d.interface)
        raise ProtocolError(f"{where} has datatype {str(name)[:40]!r}, which this server does not support (it takes {supported})")
    return found


def _kserve_of(a: np.ndarray) -> str:
    from hxc.dtypes import from_numpy

    found = from_numpy(a.dtype)
    return found.kserve if found else str(a.dtype)


def _input(raw: Any, i: int, binary: memoryview, offset: int) -> tuple[str, np.ndarray, int]:
    """(name, array, binary bytes it used) for one entry of 'inputs'."""
    if not isinstance(raw, dict):
        raise ProtocolError(f"input {i} must be a JSON object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"input {i} has no 'name'")
    where = f"input {name!r}"
    kind = _by_kserve(raw.get("datatype"), where)
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape):
        raise ProtocolError(f"{where}: 'shape' must be a list of non-negative integers")
    count = math.prod(shape)
    params = _object(raw.get("parameters"), f"{where} 'parameters'")
    size = params.get("binary_data_size")
    np_dtype = kind.numpy_dtype()
    if size is not None:
        if "data" in raw:
            raise ProtocolError(f"{where} has both 'data' and binary_data_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ProtocolError(f"{where}: binary_data_size must be a non-negative integer")
        if size != count * np_dtype.itemsize:
            raise ProtocolError(f"{where}: binary_data_size is {size} bytes but shape {shape} of {kind.kserve} needs "
                                f"{count * np_dtype.itemsize}")  # fmt: skip
        if offset + size > len(binary):
            raise ProtocolError(f"{where}: binary_data_size {size} runs past the end of the body "
                                f"({len(binary) - offset} bytes of binary data left)")  # fmt: skip
        chunk = binary[offset:offset + size]
        if kind.name == "i1":
            array = np.frombuffer(chunk, np.uint8, count) != 0
        else:
            array = np.frombuffer(chunk, np_dtype.newbyteorder("<") if np_dtype.kind in "fiu" else np_dtype, count)
            array = array.astype(np_dtype, copy=True)  # native order, owned, writeable
        return name, array.reshape(shape), size
    if "data" not in raw:
        raise ProtocolError(f"{where} has neither 'data' nor binary_data_size")
    if kind.name == "bf16":
        raise ProtocolError(f"{where}: BF16 tensors travel only as binary data (the binary tensor data extension)")
    return name, _json_data(raw["data"], kind, shape, count, where), 0


def _json_data(data: Any, kind: DType, shape: list[int], count: int, where: str) -> np.ndarray:
    if not isinstance(data, list):
        raise ProtocolError(f"{where}: 'data' must be a list")
    try:
        parsed = np.array(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise ProtocolError(f"{where}: 'data' is not a (nested) list of numbers with a regular shape") from None
    if parsed.size != count:
        raise ProtocolError(f"{where}: 'data' holds {parsed.size} elements but shape {shape} needs {count}")
    np_dtype = kind.numpy_dtype()
    accepted = _ACCEPTS[np_dtype.kind]
    if parsed.size and parsed.dtype.kind not in accepted:
        what = {"U": "strings", "O": "mixed values", "b": "booleans", "f": "non-integers"}.get(parsed.dtype.kind, str(parsed.dtype))
        raise ProtocolError(f"{where}: 'data' holds {what}, not {kind.kserve} values")
    if parsed.size and np_dtype.kind in "iu":
        info = np.iinfo(np_dtype)
        if parsed.min() < info.min or parsed.max() > info.max:
            raise ProtocolError(f"{where}: a value is out of range for {kind.kserve}")
    with np.errstate(over="ignore", invalid="ignore"):
        array = parsed.astype(np_dtype).reshape(shape)
    if parsed.size and np_dtype.kind == "f" and not np.isfinite(array).all():
        # A literal NaN/Infinity was refused while parsing, so this is a number JSON
        # spells but this dtype cannot hold (1e39 for FP32, 70000 for FP16, 1e400).
        raise ProtocolError(f"{where}: a value is out of range for {kind.kserve} "
                            "(use binary tensor data for non-finite values)")  # fmt: skip
    return array


def _requested_outputs(raw: Any, signature: Signature, binary_default: bool) -> tuple[RequestedOutput, ...]:
    names = [s.name for s in signature.outputs]
    if raw is None:
        return tuple(RequestedOutput(n, binary_default or s.dtype == "bf16") for n, s in zip(names, signature.outputs))
    if not isinstance(raw, list):
        raise ProtocolError("'outputs' must be a list")
    out: list[RequestedOutput] = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ProtocolError(f"requested output {i} must be an object with a 'name'")
        name = entry["name"]
        if name not in names:
            raise ProtocolError(f"unknown output {name!r}; the model's outputs are {', '.join(names)}")
        if any(o.name == name for o in out):
            raise ProtocolError(f"output {name!r} is requested twice")
        params = _object(entry.get("parameters"), f"output {name!r} 'parameters'")
        if params.get("classification"):
            raise ProtocolError(f"output {name!r}: the classification extension is not supported")
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise ProtocolError(f"output {name!r}: binary_data must be true or false")
        if not binary and signature.outputs[names.index(name)].dtype == "bf16":
            raise ProtocolError(f"output {name!r} is BF16, which travels only as binary data: ask for binary_data")
        out.append(RequestedOutput(name, binary))
    if not out:
        raise ProtocolError("'outputs' is empty; leave it out to get every output")
    return tuple(out)

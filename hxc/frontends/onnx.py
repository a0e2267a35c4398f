"""ONNX models: a protobuf ModelProto, whatever the file is called, with any external
data files beside it. Imported by IREE's ONNX importer (`hxc.compiler.onnx_import`);
the golden sample and the bench baseline come from ONNX Runtime.

Recognising a model reads only protobuf framing (tags and lengths, seeking over
payloads), so it needs neither the onnx package nor the model's weights in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, TYPE_CHECKING

from hxc.frontends.base import Frontend, Source
from hxc.manifests.schema import PROGRAM_ONNX

if TYPE_CHECKING:
    from hxc.compiler.imported import ImportedModel, ImportOptions

# ModelProto's field numbers (onnx.proto3): ir_version=1 ... functions=25, configuration=26.
_MODEL_FIELDS = {1, 2, 3, 4, 5, 6, 7, 8, 14, 20, 25, 26}
_IR_VERSION, _GRAPH, _GRAPH_NODE = 1, 7, 1
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


def _varint(f: IO[bytes]) -> int | None:
    value = shift = 0
    while shift < 64:
        b = f.read(1)
        if not b:
            return None
        value |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return value
        shift += 7
    return None


def _fields(f: IO[bytes], end: int):
    """(field number, wire type, payload start, payload length) of each field up to
    `end`; raises ValueError where the framing is not protobuf's."""
    while f.tell() < end:
        key = _varint(f)
        if key is None or key >> 3 == 0:
            raise ValueError("bad field tag")
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            if _varint(f) is None:
                raise ValueError("truncated varint")
            yield number, wire, f.tell(), 0
            continue
        size = {_FIXED64: 8, _FIXED32: 4}.get(wire)
        if wire == _LEN:
            size = _varint(f)
        if size is None:
            raise ValueError(f"unsupported wire type {wire}")
        start = f.tell()
        if start + size > end:
            raise ValueError("truncated field")
        yield number, wire, start, size
        f.seek(start + size)


def is_model_proto(path: Path) -> bool:
    """A ModelProto with an IR version and a graph that has nodes."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            fields = list(_fields(f, size))
            numbers = {n for n, _, _, _ in fields}
            if not numbers <= _MODEL_FIELDS or _IR_VERSION not in numbers:
                return False
            graph = next(((start, length) for n, wire, start, length in fields if n == _GRAPH and wire == _LEN), None)
            if graph is None:
                return False
            f.seek(graph[0])
            return any(n == _GRAPH_NODE for n, _, _, _ in _fields(f, graph[0] + graph[1]))
    except (ValueError, OSError):
        return False


def _recognise(source: Source) -> bool:
    # A `.onnx` file is claimed even when its framing is broken, so that importing it
    # says what is wrong with it; anything else must look like a ModelProto.
    if source.path is None or source.zip_names:
        return False
    return source.path.suffix == ".onnx" or (source.head[:1] == b"\x08" and is_model_proto(source.path))


def _import(source: str, options: ImportOptions, workdir: Path, on_stage) -> ImportedModel:
    from hxc.compiler.onnx_import import import_onnx

    return import_onnx(source, options, workdir, on_stage)


def _digest(path: Path) -> str:
    from hxc.compiler.onnx_import import source_digest

    return source_digest(path)  # the model file and every external data file it names


FRONTEND = Frontend(
    name="onnx",
    summary="an ONNX model (.onnx, external data beside it)",
    recognise=_recognise,
    import_model=_import,
    digest=_digest,
    precisions=("fp32",),  # convert the ONNX model itself for other precisions
    baseline="onnxruntime",
    program_file=PROGRAM_ONNX,
    extra="onnx",
    order=40,
)

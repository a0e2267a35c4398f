"""What kind of model a path or reference is, from the file's contents, without
importing torch: `hxc compile` asks this first, and a re-run served from the import
cache never needs torch at all."""

from __future__ import annotations

import zipfile
from pathlib import Path

from hxc.errors import ModelLoadError


def looks_like_python_ref(source: str) -> bool:
    target, sep, attr = source.rpartition(":")
    return bool(sep and target and attr.isidentifier())


def sniff_source(source: str) -> str:
    """Like `sniff`, for anything `hxc compile` accepts: `python-ref` for
    file.py:factory / package.module:factory, `missing` for a path that does not exist."""
    path = Path(source)
    if path.is_file():
        return sniff(path)
    if looks_like_python_ref(source):
        return "python-ref"
    return "missing"


def sniff(path: Path) -> str:
    """Identify a model file by its contents: pt2 | torchscript | pickle | onnx | python | unknown."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                fmt = [n for n in names if n.endswith("archive_format")]
                if fmt and z.read(fmt[0]).strip() == b"pt2":
                    return "pt2"
        except (zipfile.BadZipFile, OSError, KeyError) as e:
            raise ModelLoadError(f"{path}: corrupt or truncated archive ({e})") from None
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "pickle"
        return "unknown"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if path.suffix == ".py":
        return "python"
    # ONNX serializers write ModelProto's field 1 (ir_version, a varint) first: tag 0x08.
    if head[:1] == b"\x08" or path.suffix == ".onnx":
        if _is_onnx(path):
            return "onnx"
        if path.suffix == ".onnx":
            from hxc.compiler.onnx_import import load_proto

            load_proto(path)  # raises a one-line ModelLoadError saying what is wrong
    return "unknown"


def _is_onnx(path: Path) -> bool:
    """A protobuf ModelProto with an IR version and a graph with nodes (weights in
    external data files are not read)."""
    try:
        import onnx
    except ImportError:
        return path.suffix == ".onnx"  # import_onnx then says what to install
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return False
    return model.ir_version > 0 and model.HasField("graph") and len(model.graph.node) > 0



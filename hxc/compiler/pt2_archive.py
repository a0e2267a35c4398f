"""Look inside a torch.export archive (.pt2) before torch loads it, without torch.

`torch.export.load` runs code from the file in several ways: weights and constants
marked `use_pickle` are loaded with `torch.load(weights_only=False)`, custom and opaque
objects are unpickled, the sample inputs fall back to an unrestricted `torch.load`
when the safe one fails, legacy archives keep their weights as pickles, and compiled
AOTInductor code under `data/aotinductor/` is loaded as a shared library. hxc reads
the archive's directory and JSON configs first and refuses all of that unless the
user passed `--allow-pickle` (or the format itself is not pickle-free).

It also checks the sizes the archive declares before anything is inflated or
allocated: the total uncompressed size, each entry's compression ratio, and the
logical size of every weight (an `as_strided` view with stride 0 can declare a huge
tensor over a few bytes of storage), against limits the user can raise.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO

from hxc.errors import ModelLoadError, UsageError, first_line

MAX_MODEL_BYTES_ENV = "HXC_MAX_MODEL_BYTES"
DEFAULT_MAX_MODEL_BYTES = 64 * 1024**3
# Weights may be views over shared storage (tied embeddings, expand()ed buffers), so
# their logical size can exceed what is stored; not by this much.
MAX_EXPANSION = 64
EXPANSION_SLACK = 256 * 1024**2
MAX_COMPRESSION_RATIO = 200  # torch.export.save stores entries uncompressed
MAX_CONFIG_BYTES = 256 * 1024**2

# torch._export.serde.schema.ScalarType -> bytes per element
_ELEMENT_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 9: 4, 10: 8, 11: 16, 12: 1, 13: 2,
                  28: 2, 29: 1, 30: 1, 31: 1, 32: 1, 33: 1, 34: 4, 35: 8}  # fmt: skip
_CODE_DIRS = ("data/aotinductor/", "data/executorch/", "data/mtia")
_PICKLED_CONSTANT_PREFIXES = ("custom_obj_", "opaque_obj_")

ALLOW_PICKLE_HINT = "pass --allow-pickle only if you trust where the file came from, or re-save it with torch.export.save"


class UnsafeModelError(UsageError):
    """A model file that would run code when loaded, without the user's opt-in."""


@dataclass(frozen=True)
class Pt2Contents:
    models: tuple[str, ...]  # program names in the archive ("model")
    stored_bytes: int  # uncompressed size of every entry
    weight_bytes: int  # logical size of every weight and tensor constant
    pickled: tuple[str, ...]  # what would be unpickled (or loaded as code) by torch


def max_model_bytes() -> int:
    text = os.environ.get(MAX_MODEL_BYTES_ENV)
    if not text:
        return DEFAULT_MAX_MODEL_BYTES
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"${MAX_MODEL_BYTES_ENV} must be a number of bytes, not {text!r}") from None


def inspect_pt2(
    source: str | os.PathLike[str] | bytes | memoryview,
    where: str,
    *,
    allow_pickle: bool = False,
    check_expansion: bool = True,
) -> Pt2Contents:
    """Check a .pt2 archive before torch.export.load sees it. Raises UnsafeModelError
    (exit 2, naming --allow-pickle) if loading it would unpickle or load code, and
    ModelLoadError if it is malformed or larger than the limits allow.

    `check_expansion=False` is for hxc's own saved programs, whose weights are stride-0
    placeholders filled from the bundle's parameter archive."""
    f: IO[bytes] | str | os.PathLike[str] = io.BytesIO(source) if isinstance(source, (bytes, memoryview)) else source
    try:
        z = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ModelLoadError(f"{where}: not a readable torch.export archive ({first_line(e)})") from None
    with z:
        infos = z.infolist()
        limit = max_model_bytes()
        archive_bytes = sum(i.compress_size for i in infos)
        stored = 0
        for i in infos:
            stored += i.file_size
            if i.compress_type != zipfile.ZIP_STORED and i.file_size > MAX_COMPRESSION_RATIO * max(i.compress_size, 1):
                raise ModelLoadError(f"{where}: entry {i.filename} inflates {i.file_size // max(i.compress_size, 1)}x; "
                                     "refusing a decompression bomb")  # fmt: skip
        if stored > limit:
            raise _too_big(where, "its entries declare", stored, limit)
        names = {i.filename: i for i in infos}
        root = _root(names, where)

        def read(rel: str) -> bytes | None:
            info = names.get(root + rel)
            if info is None:
                return None
            if info.file_size > MAX_CONFIG_BYTES:
                raise ModelLoadError(f"{where}: {rel} is {info.file_size} bytes; refusing to read it")
            return z.read(info)

        models = tuple(
            n[len(root + "models/"):-len(".json")] for n in names
            if n.startswith(root + "models/") and n.endswith(".json")
        )  # fmt: skip
        pickled: list[str] = []
        pickled += [n[len(root):] for n in names if n[len(root):].startswith(_CODE_DIRS)]
        if read("version") is not None or not models:
            pickled.append("the whole archive (an older torch.export format, loaded with pickle)")
        weight_bytes = 0
        for model in models:
            for kind, legacy, config in (
                ("weights", f"data/weights/{model}.pt", f"data/weights/{model}_weights_config.json"),
                ("constants", f"data/constants/{model}.pt", f"data/constants/{model}_constants_config.json"),
            ):
                if root + legacy in names:
                    pickled.append(f"{legacy} (legacy pickled {kind})")
                    continue
                raw = read(config)
                if raw is None:
                    raise ModelLoadError(f"{where}: {config} is missing; not a complete torch.export archive")
                entries = _config_entries(raw, where, config)
                for fqn, meta in entries.items():
                    path = str(meta.get("path_name", ""))
                    if meta.get("use_pickle") or path.startswith(_PICKLED_CONSTANT_PREFIXES):
                        pickled.append(f"{kind[:-1]} {fqn!r} ({path})")
                        continue
                    weight_bytes += _logical_bytes(meta, where, fqn)
        if weight_bytes > limit:
            raise _too_big(where, "its weights declare", weight_bytes, limit)
        if check_expansion and weight_bytes > MAX_EXPANSION * archive_bytes + EXPANSION_SLACK:
            raise ModelLoadError(
                f"{where}: its weights declare {weight_bytes} bytes over {archive_bytes} bytes of stored data; "
                "refusing a tensor that expands that far",
                hint="if a weight really is a broadcast view, save the model with it materialised (.contiguous())",
            )
    contents = Pt2Contents(models, stored, weight_bytes, tuple(pickled))
    if pickled and not allow_pickle:
        raise UnsafeModelError(
            f"{where}: loading it would run code from the file: it pickles {contents.pickled[0]}"
            + (f" and {len(pickled) - 1} more" if len(pickled) > 1 else ""),
            hint=ALLOW_PICKLE_HINT,
        )
    return contents


def _root(names: dict[str, zipfile.ZipInfo], where: str) -> str:
    """The archive's top-level folder (torch.export.save writes `<stem>/...`)."""
    for n in names:
        p = PurePosixPath(n)
        if p.is_absolute() or ".." in p.parts:
            raise ModelLoadError(f"{where}: entry {n!r} has an unsafe path")
    formats = [n for n in names if n.endswith("archive_format") and n.count("/") <= 1]
    if not formats:
        raise ModelLoadError(f"{where}: not a torch.export archive (no archive_format)")
    return formats[0][: -len("archive_format")]


def _config_entries(raw: bytes, where: str, name: str) -> dict[str, dict]:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ModelLoadError(f"{where}: {name} is not valid JSON ({first_line(e)})") from None
    config = data.get("config") if isinstance(data, dict) else None
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise ModelLoadError(f"{where}: {name} is not a torch.export payload config")
    return config


def _logical_bytes(meta: dict, where: str, fqn: str) -> int:
    tm = meta.get("tensor_meta")
    try:
        sizes = [int(s["as_int"]) for s in tm["sizes"]]
        element = _ELEMENT_BYTES.get(int(tm["dtype"]), 8)
    except (TypeError, KeyError, ValueError):
        raise ModelLoadError(f"{where}: weight {fqn!r} has no readable shape (dynamic or malformed tensor_meta)") from None
    n = element
    for s in sizes:
        if s < 0:
            raise ModelLoadError(f"{where}: weight {fqn!r} declares a negative size")
        n *= s
    return n


def _too_big(where: str, what: str, n: int, limit: int) -> ModelLoadError:
    return ModelLoadError(
        f"{where}: {what} {n / 1024**3:.1f} GiB, more than the limit of {limit / 1024**3:.1f} GiB",
        hint=f"raise ${MAX_MODEL_BYTES_ENV} (bytes) if the model really is that large",
    )

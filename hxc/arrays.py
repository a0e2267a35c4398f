""".npy / .npz files read without trusting them: no pickled objects, and every size a
header or zip directory declares is checked against the bytes really there (and a
limit) before any memory is allocated for it.

numpy's own `np.load` trusts the header: an .npy whose header declares a huge shape
allocates (or fails with a MemoryError traceback) before noticing the data is short,
and an .npz member compressed a thousand to one is inflated in full. Here each is a
one-line `ArrayFileError`.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np

from hxc.errors import ExitCode, HxcError, first_line

MAX_ARRAY_BYTES_ENV = "HXC_MAX_ARRAY_BYTES"
DEFAULT_MAX_ARRAY_BYTES = 16 * 1024**3
# numpy writes .npz members uncompressed (np.savez) or deflated (np.savez_compressed);
# real tensors rarely deflate better than this, bombs do by orders of magnitude.
MAX_COMPRESSION_RATIO = 200


class ArrayFileError(HxcError):
    """An .npy/.npz file that is malformed, lies about its sizes, or exceeds the limits."""

    exit_code = ExitCode.USAGE


def max_array_bytes() -> int:
    text = os.environ.get(MAX_ARRAY_BYTES_ENV)
    if not text:
        return DEFAULT_MAX_ARRAY_BYTES
    try:
        return int(text)
    except ValueError:
        raise ArrayFileError(f"${MAX_ARRAY_BYTES_ENV} must be a number of bytes, not {text!r}") from None


def read_npy(data: bytes | memoryview, where: str) -> np.ndarray:
    """One array from the bytes of an .npy file."""
    f = io.BytesIO(data)
    try:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f, max_header_size=64 * 1024)
    except Exception as e:  # numpy's header parser raises whatever tokenize/ast raise on garbage
        raise ArrayFileError(f"{where}: not a valid .npy array ({type(e).__name__}: {first_line(e)})") from None
    if dtype.hasobject:
        raise ArrayFileError(f"{where}: holds Python objects (a pickle); only numeric arrays are accepted")
    if any(d < 0 for d in shape):
        raise ArrayFileError(f"{where}: header declares a negative dimension {shape}")
    count = 1
    for d in shape:
        count *= int(d)
    need = count * dtype.itemsize
    have = len(data) - f.tell()
    if need > max_array_bytes():
        raise ArrayFileError(
            f"{where}: header declares shape {shape} ({need} bytes), more than the limit of {max_array_bytes()}",
            hint=f"raise ${MAX_ARRAY_BYTES_ENV} if this is intended",
        )
    if need != have:
        raise ArrayFileError(f"{where}: header declares shape {shape} of {dtype} ({need} bytes) but the file holds {have}")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=f.tell()) if count else np.empty(0, dtype)
    return flat.reshape(shape, order="F" if fortran else "C").copy()


def read_npz(data: bytes | memoryview, where: str) -> dict[str, np.ndarray]:
    """All arrays of an .npz file, in the order they were saved, by name."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ArrayFileError(f"{where}: not a valid .npz archive ({first_line(e)})") from None
    with z:
        infos = z.infolist()
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise ArrayFileError(f"{where}: holds the same array name twice")
        total = 0
        for i in infos:
            total += i.file_size
            if total > max_array_bytes():
                raise ArrayFileError(f"{where}: its arrays declare more than the limit of {max_array_bytes()} bytes",
                                     hint=f"raise ${MAX_ARRAY_BYTES_ENV} if this is intended")  # fmt: skip
            if i.compress_type != zipfile.ZIP_STORED and i.file_size > MAX_COMPRESSION_RATIO * max(i.compress_size, 1):
                raise ArrayFileError(f"{where}: {i.filename} inflates {i.file_size // max(i.compress_size, 1)}x; refusing a decompression bomb")
        out: dict[str, np.ndarray] = {}
        for i in infos:
            key = i.filename[:-4] if i.filename.endswith(".npy") else i.filename
            try:
                with z.open(i) as member:
                    raw = member.read(i.file_size + 1)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
                raise ArrayFileError(f"{where}: member {i.filename} is corrupt ({first_line(e)})") from None
            if len(raw) != i.file_size:
                raise ArrayFileError(f"{where}: member {i.filename} is not the size its directory entry says")
            out[key] = read_npy(raw, f"{where}:{key}")
        return out


def read_array_files(files: list[str] | tuple[str, ...]) -> list[np.ndarray]:
    """Arrays from .npy files (one per input) or a single .npz (all of them, in the
    order they were saved). Mistakes are UsageError-style one-line errors."""
    arrays: list[np.ndarray] = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise ArrayFileError(f"{name}: no such input file")
        size = path.stat().st_size
        if size > max_array_bytes() + 1024**2:
            raise ArrayFileError(f"{name}: {size} bytes, more than the limit of {max_array_bytes()}",
                                 hint=f"raise ${MAX_ARRAY_BYTES_ENV} if this is intended")  # fmt: skip
        data = path.read_bytes()
        if data[:2] == b"PK":
            arrays.extend(read_npz(data, name).values())
        elif data[:6] == b"\x93NUMPY":
            arrays.append(read_npy(data, name))
        else:
            raise ArrayFileError(f"{name}: not a .npy or .npz array file")
    return arrays

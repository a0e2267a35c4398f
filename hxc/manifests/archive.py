"""Single-file bundles (`.hxcb`): a plain, uncompressed POSIX (ustar) tar of the bundle.

Why tar: every member's data starts on a 512-byte boundary of the file and is stored
as is, so the loader maps the archive once and hands IREE slices of that mapping in
place (IREE needs 64-byte alignment) — no extraction to a temporary directory, which
would reopen a gap between checking and using. Any `tar` can list and unpack it.

Reading trusts nothing: hxc parses the headers itself and accepts only regular files
with plain relative names (no absolute paths, `..`, links, devices, directories,
sparse or pax/GNU extension entries), each name once, each checksum valid and each
size within the file. Numbers are read as the tar format writes them (octal digits,
padded with spaces and NULs) and nothing else, so no sign, separator or base-256
form can turn a size negative. Every defect is an IntegrityError: a damaged or
hostile archive is refused like a damaged bundle file (exit 5). There is no
compression, so nothing can inflate. Packing is deterministic (zero mtimes and
owners, sorted members), so the same bundle always packs to the same bytes.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hxc.errors import IntegrityError

ARCHIVE_SUFFIX = ".hxcb"
BLOCK = 512
MAX_MEMBERS = 100_000
_REGULAR = (b"0", b"\x00")
# A tar number: octal digits, with spaces before and spaces or NULs after (the ustar
# spec; old writers pad on the left with spaces). `int(text, 8)` alone would also take
# a sign, underscores and surrounding whitespace: "-1000" made a negative size.
_NUMBER = re.compile(rb" *([0-7]+)[ \0]*")


@dataclass(frozen=True)
class Member:
    offset: int  # of the data, from the start of the archive
    size: int



def read_index(f: io.BufferedReader | io.BytesIO, file_size: int, where: str) -> dict[str, Member]:
    """The archive's members by name, after checking every header."""
    members: dict[str, Member] = {}
    pos = 0
    while True:
        f.seek(pos)
        header = f.read(BLOCK)
        if pos == 0 and (len(header) < BLOCK or (header[257:262] != b"ustar" and header != b"\0" * BLOCK)):
            # Any other file named as a bundle (a model's .py, a .pt): say what it is not,
            # not how it fails to parse as a tar.
            why = "shorter than one tar header" if len(header) < BLOCK else "not a ustar tar file"
            raise BundleError(
                f"{where}: not an hxc bundle (neither a bundle directory nor a {ARCHIVE_SUFFIX} archive: {why})"
            )
        if len(header) < BLOCK:
            raise IntegrityError(f"{where}: truncated archive (a header ends past the end of the file)")
        if header == b"\0" * BLOCK:
            return members  # end-of-archive marker
        if len(members) >= MAX_MEMBERS:
            raise IntegrityError(f"{where}: more than {MAX_MEMBERS} entries; refusing it")
        name, size, kind = _parse_header(header, where)
        if kind not in _REGULAR:
            what = {b"1": "a hard link", b"2": "a symbolic link", b"3": "a device", b"4": "a device", b"5": "a directory",
                    b"6": "a FIFO", b"x": "a pax extension", b"g": "a pax extension", b"L": "a GNU long name",
                    b"S": "a sparse file"}.get(kind, f"an entry of type {kind!r}")  # fmt: skip
            raise IntegrityError(f"{where}: {name!r} is {what}; a bundle archive holds only regular files")
        p = PurePosixPath(name)
        if not name or p.is_absolute() or any(part in ("", ".", "..") for part in name.split("/")) or "\\" in name:
            raise IntegrityError(f"{where}: entry {name!r} has a path that leaves the archive; refusing it")
        if name in members:
            raise IntegrityError(f"{where}: {name!r} appears twice; refusing an ambiguous archive")
        data = pos + BLOCK
        if data + size > file_size:
            raise IntegrityError(f"{where}: {name!r} claims {size} bytes, past the end of the archive")
        members[name] = Member(data, size)
        pos = data + -(-size // BLOCK) * BLOCK


def _parse_header(header: bytes, where: str) -> tuple[str, int, bytes]:
    if header[257:262] != b"ustar":
        raise IntegrityError(f"{where}: not a bundle archive (not a ustar tar file)")
    stored = _octal(header[148:156], where)
    computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if stored != computed:
        raise IntegrityError(f"{where}: corrupt archive (header checksum mismatch)")
    name = header[0:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]
    try:
        full = ((prefix + b"/" + name) if prefix else name).decode("utf-8")
    except UnicodeDecodeError:
        raise IntegrityError(f"{where}: an entry name is not UTF-8") from None
    return full, _octal(header[124:136], where), header[156:157]


def _octal(field: bytes, where: str) -> int:
    match = _NUMBER.fullmatch(field)
    if match is None:  # also base-256 (a GNU extension, never written by hxc)
        raise IntegrityError(f"{where}: corrupt archive (a numeric header field is not octal digits)")
    return int(match.group(1), 8)


def write_archive(target: Path, files: Iterable[tuple[str, Path]]) -> None:
    """A deterministic archive of `files` ((name in the archive, source path), in the
    order given) at `target`, which must not exist yet."""
    with open(target, "xb") as out, tarfile.open(fileobj=out, mode="w:", format=tarfile.USTAR_FORMAT) as tar:
        for name, src in files:
            info = tarfile.TarInfo(name)
            info.size = os.path.getsize(src)
            info.mode = 0o644
            info.mtime = 0
            with open(src, "rb") as f:
                tar.addfile(info, f)

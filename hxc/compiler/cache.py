"""Content-addressed caches that make re-running the same compile near-instant.

- CompileCache: one vmfb per (input IR, exact flags, target variant, compiler
  version). A hit copies the stored vmfb instead of running iree-compile.
- ImportCache: one imported model (IR, golden sample, program, weights) per model
  *file* (its sha256), import options and toolchain versions. A hit skips loading
  PyTorch, exporting and lowering. Python factories are never import-cached: their
  code can change anywhere on the import path, so they are always re-exported (and
  still hit the compile cache when the IR comes out the same).

Entries are written under a temporary name and renamed, so concurrent compiles never
see half an entry. Each entry records the sha256 of its files and is checked on every
hit: a corrupted or tampered entry is discarded (and the work redone), never copied
into a bundle under a fresh, "valid" hash. The location is $HXC_CACHE_DIR, else $XDG_CACHE_HOME/hxc, else
~/.cache/hxc.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hxc.manifests.bundle import atomic_write, copy_hashed, file_hash, file_sha256
from hxc.manifests.schema import FileHash, Requirements, SchemaError, from_json, to_json

log = logging.getLogger("hxc.cache")


def default_cache_dir() -> Path:
    if env := os.environ.get("HXC_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hxc"


@dataclass(frozen=True)
class CacheEntry:
    vmfb: Path
    verified: str | None
    hash: FileHash  # of `vmfb`, checked when the entry was looked up
    requires: Requirements | None = None  # what the binaries need, read from them when compiled


def _flag_file_digests(flags: tuple[str, ...]) -> list[str]:
    """sha256 of each file a `--flag=PATH` names (a transform spec, a tuning spec): the
    compile reads it, so an edited file must miss the cache even though the flag did not
    change."""
    out = []
    for flag in flags:
        _, eq, value = flag.partition("=")
        if eq and value and os.path.isfile(value):
            out.append(f"{value}:{file_sha256(value)}")
    return out


class CompileCache:
    def __init__(self, root: Path | None) -> None:
        self.root = root / "compile" if root is not None else None

    @staticmethod
    def key(ir_sha256: str, flags: tuple[str, ...], compiler_version: str) -> str:
        h = hashlib.sha256()
        for part in (ir_sha256, compiler_version, *flags, *_flag_file_digests(flags)):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()

    def get(self, key: str) -> CacheEntry | None:
        if self.root is None:
            return None
        vmfb, meta = self._paths(key)
        if not (vmfb.is_file() and meta.is_file()):
            return None
        try:
            info = json.loads(meta.read_text())
            recorded = FileHash(str(info["sha256"]), int(info["size"]))
            actual = file_hash(vmfb)
        except (OSError, ValueError, KeyError, TypeError):
            actual, recorded = None, None
        if actual is None or actual != recorded:
            log.warning("hxc: discarding a corrupt compile-cache entry %s", vmfb)
            for f in (meta, vmfb):
                with contextlib.suppress(OSError):
                    f.unlink()
            return None
        try:
            requires = from_json(Requirements, info["requires"]) if info.get("requires") else None
        except SchemaError:
            return None
        return CacheEntry(vmfb=vmfb, verified=info.get("verified"), hash=actual, requires=requires)

    def put(self, key: str, vmfb: Path, verified: str | None, requires: Requirements | None = None) -> FileHash:
        """Store `vmfb`; returns the hash of the bytes stored. A cache that cannot be
        written (read-only, full) is skipped with a warning: compiling goes on."""
        if self.root is None:
            return file_hash(vmfb)
        dest, meta = self._paths(key)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{id(vmfb)}.tmp")
            try:
                stored = copy_hashed(vmfb, tmp)
                os.replace(tmp, dest)
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            # The metadata goes last: get() treats an entry without it as absent.
            meta_json = {"verified": verified, "sha256": stored.sha256, "size": stored.size, "requires": to_json(requires)}
            atomic_write(meta, json.dumps(meta_json).encode())
            return stored
        except OSError as e:
            log.warning("hxc: cannot write the compile cache (%s); continuing without it", e)
            return file_hash(vmfb)

    def _paths(self, key: str) -> tuple[Path, Path]:
        assert self.root is not None
        d = self.root / key[:2]
        return d / f"{key}.vmfb", d / f"{key}.json"



class ImportCache:
    """Imported models by key; an entry is a directory of files plus meta.json."""

    def __init__(self, root: Path | None) -> None:
        self.root = root / "import" if root is not None else None

    @staticmethod
    def key(source_sha256: str, options: object, versions: dict[str, str | None]) -> str:
        h = hashlib.sha256()
        h.update(source_sha256.encode())
        h.update(json.dumps([repr(options), sorted(versions.items())]).encode())
        return h.hexdigest()

    def get(self, key: str) -> Path | None:
        """The entry's directory, after checking every file against the hashes its
        meta.json recorded; a corrupt entry is removed and treated as a miss."""
        if self.root is None:
            return None
        entry = self.root / key[:2] / key
        try:
            meta = json.loads((entry / "meta.json").read_text())
            recorded = meta["files"]
            intact = all(file_hash(entry / name) == FileHash(h["sha256"], h["size"]) for name, h in recorded.items())
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError, KeyError, TypeError):
            intact = False
        if not intact:
            log.warning("hxc: discarding a corrupt import-cache entry %s", entry)
            shutil.rmtree(entry, ignore_errors=True)
            return None
        return entry

    def put(self, key: str, files: dict[str, Path], meta: dict) -> Path | None:
        """Store an entry; a cache that cannot be written is skipped with a warning."""
        if self.root is None:
            return None
        final = self.root / key[:2] / key
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(prefix=f".{key[:8]}.", dir=final.parent))
        except OSError as e:
            log.warning("hxc: cannot write the import cache (%s); continuing without it", e)
            return None
        try:
            hashes = {name: copy_hashed(src, stage / name) for name, src in files.items()}
            meta = {**meta, "files": {n: {"sha256": h.sha256, "size": h.size} for n, h in hashes.items()}}
            atomic_write(stage / "meta.json", json.dumps(meta).encode())
            os.rename(stage, final)
        except OSError:
            # Another process stored the same entry first (theirs is as good as ours),
            # or the cache is full or read-only: either way, go on without it.
            shutil.rmtree(stage, ignore_errors=True)
        return final if (final / "meta.json").is_file() else None

"""Content-addressed caches that make re-running the same compile near-instant.

- CompileCache: one vmfb per (input IR, exact flags, target variant, compiler
  version). A hit copies the stored vmfb instead of running iree-compile.
- ImportCache: one imported model (IR, golden sample, program, weights) per model
  *file* (its sha256), import options and toolchain versions. A hit skips loading
  PyTorch, exporting and lowering. Python factories are never import-cached: their
  code can change anywhere on the import path, so they are always re-exported (and
  still hit the compile cache when the IR comes out the same).

Entries are written under a temporary name and renamed, so concurrent compiles never
see half an entry. The location is $HXC_CACHE_DIR, else $XDG_CACHE_HOME/hxc, else
~/.cache/hxc.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hxc.manifests.bundle import atomic_write
from hxc.manifests.schema import Requirements, SchemaError, from_json, to_json


def default_cache_dir() -> Path:
    if env := os.environ.get("HXC_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hxc"


@dataclass(frozen=True)
class CacheEntry:
    vmfb: Path
    verified: str | None
    requires: Requirements | None = None  # read from the binaries when compiled


class CompileCache:
    def __init__(self, root: Path | None) -> None:
        self.root = root / "compile" if root is not None else None

    @property
    def enabled(self) -> bool:
        return self.root is not None

    @staticmethod
    def key(ir_sha256: str, flags: tuple[str, ...], compiler_version: str) -> str:
        h = hashlib.sha256()
        for part in (ir_sha256, compiler_version, *flags):
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
        except (OSError, json.JSONDecodeError):
            return None
        try:
            requires = from_json(Requirements, info["requires"]) if info.get("requires") else None
        except SchemaError:
            return None
        return CacheEntry(vmfb=vmfb, verified=info.get("verified"), requires=requires)

    def put(self, key: str, vmfb: Path, verified: str | None, requires: Requirements | None = None) -> None:
        if self.root is None:
            return
        dest, meta = self._paths(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # The metadata goes last: get() treats an entry without it as absent.
        atomic_write(dest, vmfb.read_bytes())
        atomic_write(meta, json.dumps({"verified": verified, "requires": to_json(requires)}).encode())

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
        if self.root is None:
            return None
        entry = self.root / key[:2] / key
        return entry if (entry / "meta.json").is_file() else None

    def put(self, key: str, files: dict[str, Path], meta: dict) -> Path | None:
        if self.root is None:
            return None
        final = self.root / key[:2] / key
        final.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{key[:8]}.", dir=final.parent))
        try:
            for name, src in files.items():
                shutil.copyfile(src, stage / name)
            atomic_write(stage / "meta.json", json.dumps(meta).encode())
            os.rename(stage, final)
        except OSError:
            # Another process stored the same entry first; theirs is as good as ours.
            shutil.rmtree(stage, ignore_errors=True)
        return final if (final / "meta.json").is_file() else None

"""A content-addressed cache of compiled artifacts.

The key is the sha256 of everything that determines the output bytes: the input IR,
the exact flags, and the compiler's version. A hit copies the stored vmfb instead of
running iree-compile, so re-running the same compile is near-instant. Entries are
written to a temporary name and renamed, so concurrent compiles never see half an
entry. The location is $HXC_CACHE_DIR, else $XDG_CACHE_HOME/hxc, else ~/.cache/hxc.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from hxc.manifests.bundle import atomic_write


def default_cache_dir() -> Path:
    if env := os.environ.get("HXC_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hxc"


@dataclass(frozen=True)
class CacheEntry:
    vmfb: Path
    verified: str | None


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
        return CacheEntry(vmfb=vmfb, verified=info.get("verified"))

    def put(self, key: str, vmfb: Path, verified: str | None) -> None:
        if self.root is None:
            return
        dest, meta = self._paths(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # The metadata goes last: get() treats an entry without it as absent.
        atomic_write(dest, vmfb.read_bytes())
        atomic_write(meta, json.dumps({"verified": verified}).encode())

    def _paths(self, key: str) -> tuple[Path, Path]:
        assert self.root is not None
        d = self.root / key[:2]
        return d / f"{key}.vmfb", d / f"{key}.json"


"""Reading and writing bundles on disk: atomically, and safely under concurrency.

A bundle is a directory. It is built in a hidden sibling directory and swapped into
place only when complete, so an interrupted or failed run never leaves a half
bundle where a good one was. Manifest updates after the fact (benchmark profiles)
take an exclusive lock on the bundle and replace `manifest.json` atomically, so two
writers never lose each other's changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from hxc.errors import BundleError
from hxc.manifests.schema import (
    FORMAT,
    LOCK_FILE,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    Manifest,
    SchemaError,
    dumps,
    from_json,
)


def read_manifest(bundle: str | os.PathLike[str]) -> Manifest:
    """Read and check a bundle's manifest. Every problem is a one-line BundleError."""
    path = Path(bundle)
    if not path.exists():
        raise BundleError(f"{path}: no such bundle")
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle (a bundle is a directory written by `hxc compile`)")
    manifest_path = path / MANIFEST_FILE
    try:
        data = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: not a bundle (no {MANIFEST_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{manifest_path}: corrupt manifest ({e})") from None
    return parse_manifest(data, where=str(manifest_path))


def parse_manifest(data: object, where: str = MANIFEST_FILE) -> Manifest:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"{where}: not an hxc manifest (format is not {FORMAT!r})")
    version = str(data.get("schema_version", ""))
    try:
        major, minor = (int(x) for x in version.split("."))
    except ValueError:
        raise BundleError(f"{where}: unreadable schema_version {version!r}") from None
    if major != SCHEMA_VERSION[0]:
        newer = major > SCHEMA_VERSION[0]
        raise BundleError(
            f"{where}: bundle schema {version} is {'newer' if newer else 'older'} than this hxc "
            f"reads ({SCHEMA_VERSION[0]}.x)",
            hint="upgrade hxc to read it" if newer else "recompile the model with this hxc",
        )
    try:
        return from_json(Manifest, data, where="manifest")
    except SchemaError as e:
        raise BundleError(f"{where}: invalid manifest: {e}") from None


@contextlib.contextmanager
def staged_bundle(output: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging directory that becomes `output` if the block succeeds.

    On any exception the staging directory is removed and `output`, if it existed,
    is left exactly as it was.
    """
    out = Path(output).absolute()
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out}: exists and is not a directory; refusing to replace it")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).exists():
        raise BundleError(f"{out}: exists and is not a bundle; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes it private; a bundle is not
    try:
        yield stage
        _swap_into_place(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _swap_into_place(stage: Path, out: Path) -> None:
    # Two renames: old bundle aside, new one in. Each rename is atomic; between them
    # the path is briefly absent, never half written.
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.rename(out, old / "bundle")
    os.rename(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(bundle_dir: Path, manifest: Manifest) -> None:
    atomic_write(bundle_dir / MANIFEST_FILE, dumps(manifest).encode())


def atomic_write(target: Path, data: bytes) -> None:
    """Replace `target` with `data` so readers see the old or the new file, never half
    of one: write a sibling temporary file, fsync, rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_savez(target: str | os.PathLike[str], arrays: dict) -> None:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(Path(target), buf.getvalue())


def update_manifest(bundle: str | os.PathLike[str], change: Callable[[Manifest], Manifest]) -> Manifest:
    """Read-modify-write the manifest under an exclusive lock; returns what was written."""
    path = Path(bundle)
    read_manifest(path)  # fail early, with a clear message, before taking the lock
    with open(path / LOCK_FILE, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            updated = change(read_manifest(path))
            write_manifest(path, updated)
            return updated
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _process_umask() -> int:
    # Linux reports the umask without changing it. Elsewhere, setting and restoring it is
    # the only way, and that briefly leaves the process with umask 0: fine once at import,
    # a race when compile worker threads create files at the same moment.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _process_umask()


def _umask() -> int:
    return _UMASK

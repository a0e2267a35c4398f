"""Reading and writing bundles on disk: atomically, safely under concurrency, and
without trusting anything the bundle says.

A bundle is a directory. It is built in a hidden sibling directory and swapped into
place only when complete, so an interrupted or failed run never leaves a half
bundle where a good one was. `manifest.json` is written once, at build time; the
measurements added later (`hxc bench`, `hxc profiles merge`) go to `profiles.json`
under an exclusive lock with an atomic replace, so two writers never lose each
other's changes and the build-time description is never rewritten.

Every path a manifest names must stay inside the bundle (relative, no `..`, no
symbolic links on the way), and every build-time file is opened once, checked for
its recorded size and sha256, and handed on as the very bytes that were hashed
(`open_checked`), so nothing can be swapped between the check and the use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from hxc.errors import BundleError, IntegrityError, first_line
from hxc.manifests.schema import (
    FORMAT,
    LOCK_FILE,
    MANIFEST_FILE,
    PROFILES_FILE,
    PROFILES_FORMAT,
    SCHEMA_VERSION,
    FileHash,
    DTYPES,
    Host,
    Manifest,
    OutputTree,
    Profile,
    Signature,
    SchemaError,
    from_json,
    to_json,
)

log = logging.getLogger("hxc.bundle")

# A manifest or profiles file larger than this is refused before it is read: real
# ones are kilobytes (a profile is ~1 KB; 64 MiB holds tens of thousands).
MAX_METADATA_BYTES = 64 * 1024 * 1024


# --- reading ---------------------------------------------------------------------


def read_manifest(bundle: str | os.PathLike[str]) -> Manifest:
    """Read and check a bundle's manifest, with the profiles recorded beside it.
    Every problem is a one-line BundleError (IntegrityError for paths that leave the
    bundle)."""
    path = Path(bundle)
    if not path.exists():
        raise BundleError(f"{path}: no such bundle")
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle (a bundle is a directory written by `hxc compile`)")
    manifest_path = path / MANIFEST_FILE
    try:
        raw = _read_small(path, MANIFEST_FILE)
    except FileNotFoundError:
        raise BundleError(f"{path}: not a bundle (no {MANIFEST_FILE})") from None
    manifest = parse_manifest(_json(raw, manifest_path), where=str(manifest_path))
    hosts, profiles = _read_profiles(path, manifest)
    return dataclasses.replace(manifest, hosts=hosts, profiles=profiles)


def parse_manifest(data: object, where: str = MANIFEST_FILE) -> Manifest:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"{where}: not an hxc manifest (format is not {FORMAT!r})")
    version = _check_version(data, where)
    if version[0] < 2:
        raise BundleError(
            f"{where}: bundle schema {version[0]}.{version[1]} predates per-file hashes, so its program and golden "
            "sample cannot be checked; this hxc refuses it",
            hint="rebuild it with `hxc compile` (profiles can be re-recorded with `hxc bench`)",
        )
    try:
        manifest = from_json(Manifest, data, where="manifest")
    except SchemaError as e:
        raise BundleError(f"{where}: invalid manifest: {e}") from None
    except RecursionError:
        raise BundleError(f"{where}: invalid manifest: nested too deeply") from None
    _check_signature(manifest.signature, where)
    _check_references(manifest, where)
    return manifest


def _check_signature(sig: Signature, where: str) -> None:
    """Dtypes the runtime knows, sizes that are sizes, and an output structure that
    places every flat output exactly once: later code trusts all three."""
    for spec in (*sig.inputs, *sig.outputs):
        if spec.dtype not in DTYPES:
            raise BundleError(f"{where}: {spec.name} has unknown dtype {spec.dtype!r}")
        if any(isinstance(d, int) and d < 0 for d in spec.shape):
            raise BundleError(f"{where}: {spec.name} has a negative dimension")
    leaves: list[int | None] = []

    def walk(tree: OutputTree, depth: int) -> None:
        if depth > 64:
            raise BundleError(f"{where}: output_tree is nested too deeply")
        if tree.kind == "leaf":
            leaves.append(tree.index)
        elif tree.kind == "dict" and len(tree.keys) != len(tree.items):
            raise BundleError(f"{where}: output_tree has {len(tree.keys)} keys for {len(tree.items)} items")
        for t in tree.items:
            walk(t, depth + 1)

    walk(sig.output_tree, 0)
    if sorted(x for x in leaves if x is not None) != list(range(len(sig.outputs))) or None in leaves:
        raise BundleError(f"{where}: output_tree does not place each of the {len(sig.outputs)} outputs exactly once")


def _check_version(data: dict, where: str) -> tuple[int, int]:
    version = data.get("schema_version")
    try:
        major, minor = (int(x) for x in str(version).split("."))
    except ValueError:
        raise BundleError(f"{where}: unreadable schema_version {version!r}") from None
    if major > SCHEMA_VERSION[0]:
        raise BundleError(
            f"{where}: bundle schema {version} is newer than this hxc reads ({SCHEMA_VERSION[0]}.x)",
            hint="upgrade hxc to read it",
        )
    return major, minor


def _check_references(m: Manifest, where: str) -> None:
    """Every path must stay inside the bundle, and every file another record names must
    have a recorded hash (with the same sha256 where that record carries one too)."""
    for rel in m.files:
        check_relpath(rel, where)
    for a in m.artifacts:
        if a.status == "ok" and (a.file is None or a.sha256 is None):
            raise BundleError(f"{where}: artifact {a.id} is marked ok but names no file or sha256")
    for rel, what in m.referenced_files():
        check_relpath(rel, where)
        if rel not in m.files:
            raise IntegrityError(f"{where}: {what} ({rel}) has no recorded sha256; refusing to use it")
    for rel, sha in [(a.file, a.sha256) for a in m.ok_artifacts] + [(w.file, w.sha256) for w in m.weights]:
        if rel is not None and m.files[rel].sha256 != sha:
            raise IntegrityError(f"{where}: two different sha256 are recorded for {rel}")


def check_relpath(rel: object, where: str = MANIFEST_FILE) -> str:
    """`rel` if it is a plain relative path inside a bundle; an IntegrityError otherwise."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise IntegrityError(f"{where}: invalid file path {rel!r} in the manifest")
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("..", ".", "") for part in rel.split("/")) or str(p) != rel:
        raise IntegrityError(f"{where}: file path {rel!r} leaves the bundle or is not normalised; refusing it")
    return rel


def _json(raw: bytes, where: Path | str) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{where}: corrupt JSON ({first_line(e)})") from None
    except RecursionError:
        raise BundleError(f"{where}: corrupt JSON (nested too deeply)") from None


def _read_small(bundle: Path, rel: str) -> bytes:
    """A metadata file of the bundle, opened without following links and size-checked
    before reading."""
    fd = _open_inside(bundle, rel)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{bundle / rel}: not a regular file")
        if st.st_size > MAX_METADATA_BYTES:
            raise BundleError(f"{bundle / rel}: {st.st_size} bytes, more than the {MAX_METADATA_BYTES} a bundle's metadata may have")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(MAX_METADATA_BYTES + 1)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ProfilesFile:
    model_ir_sha256: str  # which model these were measured for
    hosts: tuple[Host, ...]
    profiles: tuple[Profile, ...]


def parse_profiles(data: object, where: str) -> ProfilesFile:
    if not isinstance(data, dict) or data.get("format") != PROFILES_FORMAT:
        raise BundleError(f"{where}: not an hxc profiles file")
    _check_version(data, where)
    try:
        return ProfilesFile(
            from_json(str, data.get("model_ir_sha256"), where="profiles.model_ir_sha256"),
            from_json(tuple[Host, ...], data.get("hosts", []), where="profiles.hosts"),
            from_json(tuple[Profile, ...], data.get("profiles", []), where="profiles.profiles"),
        )
    except SchemaError as e:
        raise BundleError(f"{where}: invalid profiles: {e}") from None


def read_profiles_file(path: Path) -> ProfilesFile:
    """A standalone profiles.json (copied from another machine's bundle)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise BundleError(f"{path}: no such bundle or profiles file") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise BundleError(f"{path}: not a regular file")
        raw = f.read(MAX_METADATA_BYTES + 1)
    if len(raw) > MAX_METADATA_BYTES:
        raise BundleError(f"{path}: larger than the {MAX_METADATA_BYTES} bytes a profiles file may have")
    return parse_profiles(_json(raw, path), str(path))


def _read_profiles(bundle: Path, manifest: Manifest) -> tuple[tuple[Host, ...], tuple[Profile, ...]]:
    """The measurements recorded beside the manifest. They are not build-time content
    and are never trusted for integrity: a corrupt file is reported and ignored."""
    try:
        raw = _read_small(bundle, PROFILES_FILE)
        doc = parse_profiles(_json(raw, bundle / PROFILES_FILE), str(bundle / PROFILES_FILE))
        if doc.model_ir_sha256 != manifest.model.ir_sha256:
            raise BundleError(f"{bundle / PROFILES_FILE}: measured for a different model")
    except FileNotFoundError:
        return (), ()
    except BundleError as e:
        log.warning("hxc: ignoring the bundle's profiles: %s", e)
        return (), ()
    return doc.hosts, doc.profiles


# --- checked files ---------------------------------------------------------------


@dataclass
class CheckedFile:
    """A bundle file whose bytes matched the manifest. `buffer` is a read-only view
    of exactly the bytes that were hashed (a mapping of the opened file, or a private
    copy); hand it to whatever runs the file instead of opening the path again."""

    path: Path
    buffer: mmap.mmap
    size: int
    private_copy: bool

    def bytes(self) -> bytes:
        return self.buffer[: self.size] if self.size else b""

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self.buffer.close()


def open_checked(bundle: Path, manifest: Manifest, rel: str, *, private_copy: bool = False) -> CheckedFile:
    """Open a build-time file of the bundle, check its size and sha256 against the
    manifest, and return the checked bytes. Raises IntegrityError if the file is
    missing, not a regular file inside the bundle, or not what the manifest says.

    The check is tied to the bytes used: the file is opened once and the same mapping
    is hashed and returned, so a file swapped by rename after the check is never used.
    A mapping still sees writes made to the same file in place; `private_copy=True`
    copies the bytes into private memory first, which rules that out too.
    """
    expected = manifest.files.get(rel)
    if expected is None:
        raise IntegrityError(f"{bundle / rel}: not a file this bundle's manifest records; refusing to use it")
    check_relpath(rel)
    try:
        fd = _open_inside(bundle, rel)
    except FileNotFoundError:
        raise IntegrityError(f"{bundle / rel}: missing from the bundle") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"{bundle / rel}: not a regular file; refusing to use it")
        if st.st_size != expected.size:
            raise IntegrityError(
                f"{bundle / rel}: {st.st_size} bytes where the manifest says {expected.size}; refusing to use it",
                hint="the file was modified or truncated; recompile or restore the bundle",
            )
        buffer = _private_copy(fd, st.st_size) if private_copy else _map(fd, st.st_size)
    finally:
        os.close(fd)
    actual = hashlib.sha256(buffer).hexdigest() if st.st_size else hashlib.sha256(b"").hexdigest()
    if actual != expected.sha256:
        with contextlib.suppress(BufferError):
            buffer.close()
        raise IntegrityError(
            f"{bundle / rel}: sha256 {actual[:12]}… does not match the manifest's {expected.sha256[:12]}…; refusing to use it",
            hint="the file was modified or corrupted; recompile or restore the bundle",
        )
    return CheckedFile(bundle / rel, buffer, st.st_size, private_copy)


def check_all_files(bundle: Path, manifest: Manifest) -> dict[str, str]:
    """Check every build-time file of the bundle, whether or not this host can run it.
    Returns the problem with each file that fails, by path (empty: all good)."""
    problems = {}
    for rel in sorted(manifest.files):
        try:
            open_checked(bundle, manifest, rel).close()
        except BundleError as e:
            problems[rel] = str(e)
    return problems


def _open_inside(bundle: Path, rel: str) -> int:
    """Open `rel` below `bundle` one component at a time, refusing symbolic links, so
    the file opened is inside the bundle whatever the directory holds."""
    parts = check_relpath(rel).split("/")
    dir_fd = os.open(bundle, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise IntegrityError(f"{bundle / rel}: {part} is a link or not a directory; refusing to follow it") from None
                raise
            os.close(dir_fd)
            dir_fd = nxt
        try:
            return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise IntegrityError(f"{bundle / rel}: is a symbolic link; refusing to follow it") from None
            raise
    finally:
        os.close(dir_fd)


def _map(fd: int, size: int) -> mmap.mmap:
    if size == 0:
        return mmap.mmap(-1, 1)
    return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)


def _private_copy(fd: int, size: int) -> mmap.mmap:
    # Anonymous memory is page-aligned, as IREE requires of a module's buffer.
    buf = mmap.mmap(-1, max(size, 1))
    view = memoryview(buf)
    done = 0
    while done < size:
        n = os.readv(fd, [view[done:size]])
        if n == 0:
            view.release()
            buf.close()
            raise IntegrityError("file shrank while it was being read; refusing to use it")
        done += n
    view.release()
    return buf


# --- writing ---------------------------------------------------------------------


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Exclusive, short-lived ownership of an output path: held while a run creates
    its private directories beside it, removes stale ones, or swaps the bundle in, so
    concurrent runs to one path never see each other's half-made state."""
    out = Path(output).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out.parent / f".{out.name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def private_dir(output: Path, suffix: str) -> Iterator[Path]:
    """A new directory beside `output` that this process owns (an flock on the
    directory itself, released by the kernel however the process ends), removed on
    exit. Directories left by killed runs are removed by `remove_stale`."""
    out = Path(output).absolute()
    with output_lock(out):
        path = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=suffix, dir=out.parent))
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


STALE_SUFFIXES = (".work", ".tmp", ".old")


def remove_stale(output: Path) -> list[Path]:
    """Remove the private directories that runs killed before they could clean up
    (SIGKILL, power loss) left beside `output`; returns what was removed. A directory
    still locked by a live run is left alone."""
    out = Path(output).absolute()
    if not out.parent.is_dir():
        return []
    removed = []
    with output_lock(out):
        for p in out.parent.glob(f".{glob_escape(out.name)}.*"):
            if not p.name.endswith(STALE_SUFFIXES) or p.is_symlink() or not p.is_dir():
                continue
            try:
                fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live run owns it
            finally:
                os.close(fd)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@contextlib.contextmanager
def staged_bundle(output: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging directory that becomes `output` if the block succeeds.

    On any exception the staging directory is removed and `output`, if it existed,
    is left exactly as it was. The swap is one atomic exchange of the two directory
    entries (renameat2 RENAME_EXCHANGE), so whenever the process dies, `output` holds
    the complete old bundle or the complete new one.
    """
    out = Path(output).absolute()
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out}: exists and is not a directory; refusing to replace it")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).exists():
        raise BundleError(f"{out}: exists and is not a bundle; refusing to replace it")
    with private_dir(out, ".tmp") as stage:
        os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes it private; a bundle is not
        yield stage
        with output_lock(out):
            if out.exists() and not (out / MANIFEST_FILE).exists() and out.is_dir() and any(out.iterdir()):
                raise BundleError(f"{out}: became something other than a bundle; refusing to replace it")
            _fault_point("before-swap")
            _swap_into_place(stage, out)
            _fault_point("after-swap")
        # `stage` now names the old bundle (or nothing); private_dir removes it.


def _swap_into_place(stage: Path, out: Path) -> None:
    if not out.exists():
        os.rename(stage, out)
        return
    if _exchange(stage, out):
        return
    # No RENAME_EXCHANGE on this file system: two renames, each atomic; between them
    # the path is briefly absent, never half written.
    old = stage.with_name(stage.name[: -len(".tmp")] + ".old")
    os.rename(out, old)
    os.rename(stage, out)
    shutil.rmtree(old, ignore_errors=True)


def _fault_point(name: str) -> None:
    """Test-only fault injection: HXC_FAULT=NAME kills this process here, so the fault
    tests can die at the exact instants that matter (around the swap)."""
    if os.environ.get("HXC_FAULT") == name:
        os.kill(os.getpid(), 9)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the kernel or file system cannot."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def manifest_json(manifest: Manifest) -> str:
    """The build-time part of a manifest, as written to MANIFEST_FILE."""
    data = to_json(manifest)
    del data["hosts"], data["profiles"]
    return json.dumps(data, indent=2) + "\n"


def write_manifest(bundle_dir: Path, manifest: Manifest) -> None:
    """Write a new bundle's manifest (at build time; afterwards only profiles change)."""
    atomic_write(bundle_dir / MANIFEST_FILE, manifest_json(manifest).encode())
    if manifest.hosts or manifest.profiles:
        _write_profiles(bundle_dir, manifest)


def _write_profiles(bundle_dir: Path, manifest: Manifest) -> None:
    data = {
        "format": PROFILES_FORMAT,
        "schema_version": f"{SCHEMA_VERSION[0]}.{SCHEMA_VERSION[1]}",
        "model_ir_sha256": manifest.model.ir_sha256,
        "hosts": to_json(manifest.hosts),
        "profiles": to_json(manifest.profiles),
    }
    atomic_write(bundle_dir / PROFILES_FILE, (json.dumps(data, indent=2) + "\n").encode())


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
    """Read-modify-write a bundle's profiles under an exclusive lock; returns the
    manifest with the profiles written. `change` may only change `hosts` and
    `profiles`: the build-time manifest is never rewritten."""
    path = Path(bundle)
    read_manifest(path)  # fail early, with a clear message, before taking the lock
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        current = read_manifest(path)
        updated = change(current)
        if dataclasses.replace(updated, hosts=(), profiles=()) != dataclasses.replace(current, hosts=(), profiles=()):
            raise ValueError("update_manifest may only change hosts and profiles")  # a bug, not a user error
        _write_profiles(path, updated)
        return updated
    finally:
        os.close(fd)  # releases the lock


def copy_hashed(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> FileHash:
    """Copy a file and hash the bytes written, in one pass: the hash a bundle records
    is the hash of the bytes it ships, not of a source that may differ."""
    h = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while chunk := fin.read(1 << 20):
            h.update(chunk)
            fout.write(chunk)
            size += len(chunk)
    return FileHash(h.hexdigest(), size)


def file_hash(path: str | os.PathLike[str]) -> FileHash:
    return FileHash(file_sha256(path), os.path.getsize(path))


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

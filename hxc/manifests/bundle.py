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
import math
import mmap
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from hxc.dtypes import NAMES
from hxc.errors import BundleError, IntegrityError, UsageError, first_line
from hxc.manifests import signing
from hxc.manifests.archive import ARCHIVE_SUFFIX, Member, read_index, write_archive
from hxc.manifests.schema import (
    FORMAT,
    LOCK_FILE,
    MANIFEST_FILE,
    PROFILES_FILE,
    PROFILES_FORMAT,
    PROFILES_SCHEMA_VERSION,
    PROFILES_SIGNATURE_FILE,
    SCHEMA_VERSION,
    SIGNATURE_FILE,
    MAIN,
    FileHash,
    FunctionSpec,
    Host,
    Manifest,
    OutputTree,
    Profile,
    Signature,
    SchemaError,
    TensorSpec,
    from_json,
    to_json,
)

log = logging.getLogger("hxc.bundle")

# Which public keys must have signed a bundle: paths or keys; None: as $HXC_TRUSTED_KEYS
# says; False: do not check.
TrustedKeys = Sequence[str | os.PathLike[str]] | str | None | bool

# A manifest larger than this is refused before it is read: real ones are kilobytes.
MAX_METADATA_BYTES = 64 * 1024 * 1024
# Profiles are measurements anyone who can write beside the bundle can add, read on
# every load, so they are bounded well below that: a profile is ~1.5 KB as written, and
# a bundle keeps the newest MAX_PROFILES (`hxc bench` drops older ones beyond it). A
# larger or longer file is ignored with a warning, as a corrupt one is.
MAX_PROFILES = 4096
MAX_HOSTS = 1024
MAX_PROFILES_BYTES = 8 * 1024 * 1024


# --- reading ---------------------------------------------------------------------


def read_manifest(
    bundle: str | os.PathLike[str],
    *,
    trusted_keys: TrustedKeys = None,
    min_sequence: int | None = None,
    require_signed_profiles: bool | None = None,
    profiles: bool = True,
) -> Manifest:
    """Read and check a bundle's manifest (a bundle directory or a `.hxcb` archive),
    with the profiles recorded beside it. Every problem is a one-line BundleError
    (IntegrityError for paths that leave the bundle or a signature that fails).

    Signatures: `trusted_keys` (public key paths) requires the manifest
    to carry a valid signature by one of them, checked over the exact bytes that are
    then parsed; None means "as $HXC_TRUSTED_KEYS says" (required when it is set);
    False skips the check (for `hxc inspect`, which only shows it). `min_sequence`
    also requires that signature to carry at least that sequence number (refusing an
    older bundle); `require_signed_profiles` uses only profiles a trusted key signed.
    Both fall back to the environment where None (see signing.TrustPolicy).
    `profiles=False` leaves them unread, for callers that need the build-time part.
    """
    policy = trust_policy(trusted_keys, min_sequence, require_signed_profiles)
    return read_bundle(bundle, policy, profiles=profiles).manifest


def trust_policy(trusted_keys: TrustedKeys = None, min_sequence: int | None = None,
                 require_signed_profiles: bool | None = None) -> signing.TrustPolicy | None:  # fmt: skip
    """What a read must check, from a caller's arguments and the environment; None for
    `trusted_keys=False` (check nothing)."""
    if trusted_keys is False:
        return None
    return signing.TrustPolicy.resolve(trusted_keys, min_sequence, require_signed_profiles)  # type: ignore[arg-type]


@dataclass(frozen=True)
class BundleRead:
    manifest: Manifest  # with its profiles, if they were read and kept
    profiles_note: str | None  # why the profiles were ignored, or who signed them


def read_bundle(
    bundle: str | os.PathLike[str], policy: signing.TrustPolicy | None, *, profiles: bool = True
) -> BundleRead:
    """read_manifest with a resolved policy (None: check no signature), saying what
    became of the profiles."""
    src = bundle_source(Path(bundle))
    try:
        raw = src.read_small(MANIFEST_FILE)
    except FileNotFoundError:
        raise BundleError(f"{src.path}: not a bundle (no {MANIFEST_FILE})") from None
    keys = policy.public_keys() if policy is not None else None
    if policy is not None and keys is not None:
        signing.check(raw, read_signatures(src), keys, str(src.path), min_sequence=policy.min_sequence)
    manifest = parse_manifest(_json(raw, src.where(MANIFEST_FILE)), where=src.where(MANIFEST_FILE))
    if not profiles:
        return BundleRead(manifest, None)
    signed_by = keys if policy is not None and policy.signed_profiles else None
    hosts, found, note = _read_profiles(src, manifest, raw, signed_by)
    return BundleRead(dataclasses.replace(manifest, hosts=hosts, profiles=found), note)


@dataclass(frozen=True)
class SignatureStatus:
    key_ids: tuple[str, ...]  # who signed it (unverified unless verified_by is set)
    verified_by: str | None  # the trusted key whose signature verified
    checked: bool  # whether trusted keys were given to check against
    sequence: int | None = None  # the sequence number the verified signature carries


def signature_status(bundle: Path, trusted_keys: TrustedKeys = None) -> SignatureStatus:
    """Who signed a bundle, and whether that verifies against the trusted keys (if
    any are given or set in $HXC_TRUSTED_KEYS). Raises like read_manifest on failure."""
    src = bundle_source(Path(bundle))
    sigs = read_signatures(src)
    policy = trust_policy(trusted_keys)
    keys = policy.public_keys() if policy is not None else None
    if policy is None or keys is None:
        return SignatureStatus(tuple(s.key_id for s in sigs), None, False)
    v = signing.check(src.read_small(MANIFEST_FILE), sigs, keys, str(src.path), min_sequence=policy.min_sequence)
    return SignatureStatus(tuple(s.key_id for s in sigs), v.key.key_id, True, v.sequence)


def read_signatures(src: BundleSource) -> list[signing.Signature]:
    """The signatures over the manifest (none if there are none)."""
    limit = signing.MAX_SIGNATURE_FILE
    return _signatures(lambda: src.read_small(SIGNATURE_FILE, limit=limit), src.where(SIGNATURE_FILE))


def read_profiles_signatures(src: BundleSource) -> list[signing.Signature]:
    """The signatures over the profiles (none if there are none)."""
    return _signatures(src.read_profiles_signature, str(src.profiles_signature_path))


def _signatures(read: Callable[[], bytes], where: str) -> list[signing.Signature]:
    # A signature file that cannot be read as one (too large, not a regular file) is
    # refused like a forged one (exit 5); its size is checked before any of it is read.
    try:
        raw = read()
    except FileNotFoundError:
        return []
    except BundleError as e:
        raise signing.UntrustedBundleError(f"{e.message}; refusing the signature file") from None
    return signing.parse_signatures(raw, where)


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
    if version[0] < 5 and data.get("language_model") is not None:
        raise BundleError(
            f"{where}: a language model of bundle schema {version[0]}.{version[1]}, whose functions read one KV cache "
            "for every layer in full; this hxc calls them with per-layer caches read to the filled length",
            hint="rebuild it with `hxc compile`",
        )
    if version[0] < 4 and "signature" in data and "functions" not in data:
        # Before functions, a bundle was one stateless entry point, `main`.
        data = {**data, "functions": {MAIN: {"signature": data["signature"]}}}
    try:
        manifest = from_json(Manifest, data, where="manifest")
    except SchemaError as e:
        raise BundleError(f"{where}: invalid manifest: {e}") from None
    except RecursionError:
        raise BundleError(f"{where}: invalid manifest: nested too deeply") from None
    _check_functions(manifest.functions, where)
    _check_stages(manifest, where)
    _check_references(manifest, where)
    return manifest


def _check_stages(m: Manifest, where: str) -> None:
    """A staged bundle's artifacts are stages of one chain that computes `main`: the
    runtime trusts that stage k's outputs are stage k+1's inputs and that no stage's
    artifact passes for the whole model."""
    staged = [f"artifact {a.id}" for a in m.artifacts if a.stage is not None]
    staged += [f"weights {w.file}" for w in m.weights if w.stage is not None]
    if not m.stages:
        if staged:
            raise BundleError(f"{where}: {staged[0]} belongs to a stage, and the manifest lists no stages")
        return
    by_functions = any(s.functions for s in m.stages)
    if not m.stateless_main and not by_functions:
        raise BundleError(f"{where}: a staged bundle computes one stateless function, {MAIN}")
    if [s.index for s in m.stages] != list(range(len(m.stages))) or len(m.stages) < 2:
        raise BundleError(f"{where}: stages must be numbered 0, 1, ... and be at least two")
    if whole := [a.id for a in m.artifacts if a.stage is None]:
        raise BundleError(f"{where}: artifact {whole[0]} belongs to no stage of this staged bundle")
    for a in m.artifacts:
        if not 0 <= a.stage < len(m.stages) or a.id not in m.stages[a.stage].artifacts:  # type: ignore[operator]
            raise BundleError(f"{where}: artifact {a.id} is not listed by its stage {a.stage}")
    for w in m.weights:
        if w.stage is None or not 0 <= w.stage < len(m.stages):
            raise BundleError(f"{where}: weights {w.file} name no stage of this staged bundle")
    for s in m.stages:
        if unknown := [i for i in s.artifacts if all(a.id != i or a.stage != s.index for a in m.artifacts)]:
            raise BundleError(f"{where}: stage {s.index} lists artifact {unknown[0]}, which is not one of its own")
    if by_functions:
        _check_function_stages(m, where)
        return
    main = m.functions[MAIN].signature
    before = main.inputs
    for s in m.stages:
        _check_signature(s.signature, f"{where}: stage {s.index}")
        if not _same_tensors(before, s.signature.inputs):
            raise BundleError(f"{where}: stage {s.index}'s inputs are not "
                              + ("the model's inputs" if s.index == 0 else f"stage {s.index - 1}'s outputs"))  # fmt: skip
        before = s.signature.outputs
    if not _same_tensors(before, main.outputs):
        raise BundleError(f"{where}: the last stage's outputs are not the model's outputs")


def _check_function_stages(m: Manifest, where: str) -> None:
    """A language model's stages (6.1): each stage runs every function of the model;
    per function, stage 0 takes the model's arguments, each later stage what the stage
    before returns (and arguments of the model's), the last returns the model's outputs;
    each state the function touches is held by exactly one stage."""
    for s in m.stages:
        if set(s.functions) != set(m.functions):
            raise BundleError(f"{where}: stage {s.index} has functions {', '.join(s.functions) or 'none'}; "
                              f"the model's are {', '.join(m.functions)}")  # fmt: skip
    for name, fn in m.functions.items():
        model_inputs = tuple(t.name for t in fn.signature.inputs)
        before: tuple[TensorSpec, ...] = ()
        held: list[str] = []
        for s in m.stages:
            call = s.functions[name]
            label = f"{where}: stage {s.index}'s {name}"
            if s.index == 0 and call.args != model_inputs:
                raise BundleError(f"{label} does not take the model's arguments")
            if unknown := [a for a in call.args if a not in model_inputs]:
                raise BundleError(f"{label} takes {unknown[0]!r}, which is not an argument of the model's {name}")
            if not _same_tensors(before, tuple(t.spec() for t in call.inputs)):
                raise BundleError(f"{label} does not take what stage {s.index - 1} returns")
            _check_signature(call.spec(fn).signature, label)
            before = tuple(t.spec() for t in call.outputs)
            held += call.state
        if not _same_tensors(before, fn.signature.outputs):
            raise BundleError(f"{where}: the last stage's {name} does not return the model's outputs")
        if sorted(held) != sorted(s.name for s in fn.states):
            raise BundleError(f"{where}: the stages' {name} do not hold the model's state once each")


def _same_tensors(a: tuple[TensorSpec, ...], b: tuple[TensorSpec, ...]) -> bool:
    """Same count, dtypes and static sizes (names of dynamic dimensions are each
    program's own)."""
    return len(a) == len(b) and all(x.dtype == y.dtype and len(x.shape) == len(y.shape)
                                    and all(p == q for p, q in zip(x.shape, y.shape) if isinstance(p, int) and isinstance(q, int))
                                    for x, y in zip(a, b))  # fmt: skip


MAX_FUNCTIONS = 64


def _check_functions(functions: dict[str, FunctionSpec], where: str) -> None:
    """Names that are entry points (they are looked up in the artifact), signatures
    the runtime can trust, and states whose recorded size is their shape's: the size
    is what the runtime checks against the device's memory before allocating."""
    if not functions or len(functions) > MAX_FUNCTIONS:
        raise BundleError(f"{where}: a manifest names 1 to {MAX_FUNCTIONS} functions, not {len(functions)}")
    for name, fn in functions.items():
        if not name.isidentifier():
            raise BundleError(f"{where}: function name {name[:40]!r} is not an identifier")
        _check_signature(fn.signature, f"{where}: function {name}")
        for s in (*fn.reads, *fn.writes):
            if s.dtype not in NAMES:
                raise BundleError(f"{where}: function {name}: state {s.name} has unknown dtype {s.dtype!r}")
            if any(d < 0 for d in s.shape) or s.slots < 1 or (s.slots > 1 and (not s.shape or s.shape[0] != s.slots)):
                raise BundleError(f"{where}: function {name}: state {s.name} has shape {s.shape} for {s.slots} slot(s)")
            if s.bytes != state_bytes(s.dtype, s.shape):
                raise BundleError(f"{where}: function {name}: state {s.name} records {s.bytes} bytes; its shape and "
                                  f"dtype hold {state_bytes(s.dtype, s.shape)}")  # fmt: skip


def state_bytes(dtype_name: str, shape: tuple[int, ...]) -> int:
    from hxc.dtypes import dtype

    return dtype(dtype_name).numpy_dtype().itemsize * math.prod(shape)


def _check_signature(sig: Signature, where: str) -> None:
    """Dtypes the runtime knows, sizes that are sizes, and an output structure that
    places every flat output exactly once: later code trusts all three."""
    for spec in (*sig.inputs, *sig.outputs):
        if spec.dtype not in NAMES:
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


def _check_version(data: dict, where: str, reads: tuple[int, int] = SCHEMA_VERSION) -> tuple[int, int]:
    version = data.get("schema_version")
    try:
        major, minor = (int(x) for x in str(version).split("."))
    except ValueError:
        raise BundleError(f"{where}: unreadable schema_version {version!r}") from None
    if major > reads[0]:
        raise BundleError(
            f"{where}: bundle schema {version} is newer than this hxc reads ({reads[0]}.x)",
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


@dataclass(frozen=True)
class ProfilesFile:
    model_ir_sha256: str  # which model these were measured for
    hosts: tuple[Host, ...]
    profiles: tuple[Profile, ...]


def parse_profiles(data: object, where: str) -> ProfilesFile:
    if not isinstance(data, dict) or data.get("format") != PROFILES_FORMAT:
        raise BundleError(f"{where}: not an hxc profiles file")
    _check_version(data, where, reads=PROFILES_SCHEMA_VERSION)
    for field, limit in (("profiles", MAX_PROFILES), ("hosts", MAX_HOSTS)):
        items = data.get(field, [])
        if isinstance(items, list) and len(items) > limit:
            raise BundleError(f"{where}: {len(items)} {field}, more than the {limit} a bundle keeps")
    try:
        return ProfilesFile(
            from_json(str, data.get("model_ir_sha256"), where="profiles.model_ir_sha256"),
            from_json(tuple[Host, ...], data.get("hosts", []), where="profiles.hosts"),
            from_json(tuple[Profile, ...], data.get("profiles", []), where="profiles.profiles"),
        )
    except SchemaError as e:
        raise BundleError(f"{where}: invalid profiles: {e}") from None
    except RecursionError:
        raise BundleError(f"{where}: invalid profiles: nested too deeply") from None


def read_profiles_file(path: Path) -> ProfilesFile:
    """A standalone profiles.json (copied from another machine's bundle)."""
    try:
        raw = _read_limited_file(path, MAX_PROFILES_BYTES)
    except FileNotFoundError:
        raise BundleError(f"{path}: no such bundle or profiles file") from None
    return parse_profiles(_json(raw, path), str(path))


def _read_profiles(
    src: BundleSource, manifest: Manifest, manifest_raw: bytes, signed_by: Sequence[signing.PublicKey] | None
) -> tuple[tuple[Host, ...], tuple[Profile, ...], str | None]:
    """The measurements recorded beside the manifest, and a note on them. They are not
    build-time content and are never trusted for integrity: a file that is corrupt,
    too large, or (when `signed_by` keys are given) not signed by one of them is
    reported and ignored."""
    where = str(src.profiles_path)
    try:
        raw = src.read_profiles()
        note = None
        if signed_by is not None:
            key = signing.check_profiles(manifest_raw, raw, read_profiles_signatures(src), signed_by, where)
            note = f"profiles signed by trusted key {key.key_id}"
        doc = parse_profiles(_json(raw, where), where)
        if doc.model_ir_sha256 != manifest.model.ir_sha256:
            raise BundleError(f"{where}: measured for a different model")
    except FileNotFoundError:
        return (), (), None
    except BundleError as e:
        required = " (signed profiles are required)" if isinstance(e, signing.UntrustedBundleError) else ""
        log.warning("hxc: ignoring the bundle's profiles%s: %s", required, e)
        return (), (), f"profiles ignored{required}: {e}"
    return doc.hosts, doc.profiles, note


# --- where a bundle's bytes come from ----------------------------------------------


class BundleSource:
    """A bundle on disk: a directory, or a single-file archive (`.hxcb`). Both hand
    out metadata files (size-limited) and mappings of build-time files; nothing else
    in hxc opens a bundle's files."""

    path: Path
    profiles_path: Path  # where measurements for this bundle are read and written
    profiles_signature_path: Path  # and the signatures over them (`hxc sign --profiles`)

    def where(self, rel: str) -> str:
        raise NotImplementedError

    def read_small(self, rel: str, limit: int = MAX_METADATA_BYTES) -> bytes:
        """A metadata file (FileNotFoundError if absent), refused (BundleError) if it
        holds more than `limit` bytes, before it is read."""
        raise NotImplementedError

    def map(self, rel: str, expected_size: int, private_copy: bool) -> tuple[Any, Any]:
        """(buffer, owner) for a build-time file, after checking it is a regular file
        of `expected_size` bytes; FileNotFoundError if absent."""
        raise NotImplementedError

    def read_profiles(self) -> bytes:
        return _read_limited_file(self.profiles_path, MAX_PROFILES_BYTES)

    def read_profiles_signature(self) -> bytes:
        return _read_limited_file(self.profiles_signature_path, signing.MAX_SIGNATURE_FILE)


class DirectorySource(BundleSource):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.profiles_path = path / PROFILES_FILE
        self.profiles_signature_path = path / PROFILES_SIGNATURE_FILE

    def where(self, rel: str) -> str:
        return str(self.path / rel)

    def read_small(self, rel: str, limit: int = MAX_METADATA_BYTES) -> bytes:
        fd = _open_inside(self.path, rel)
        with os.fdopen(fd, "rb") as f:
            return _read_limited(f, self.where(rel), limit)

    # Inside the directory: no links followed.
    def read_profiles(self) -> bytes:
        return self.read_small(PROFILES_FILE, MAX_PROFILES_BYTES)

    def read_profiles_signature(self) -> bytes:
        return self.read_small(PROFILES_SIGNATURE_FILE, signing.MAX_SIGNATURE_FILE)

    def map(self, rel: str, expected_size: int, private_copy: bool) -> tuple[Any, Any]:
        fd = _open_inside(self.path, rel)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IntegrityError(f"{self.where(rel)}: not a regular file; refusing to use it")
            _check_size(self.where(rel), st.st_size, expected_size)
            buffer = _private_copy(fd, 0, st.st_size) if private_copy else _map(fd, st.st_size)
        finally:
            os.close(fd)
        return buffer, buffer


class ArchiveSource(BundleSource):
    """A `.hxcb`: one mapping of the archive, and slices of it for each member."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.profiles_path = path.with_name(path.name + ".profiles.json")
        self.profiles_signature_path = path.with_name(path.name + ".profiles.sig")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except IsADirectoryError:
            raise BundleError(f"{path}: not a bundle") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BundleError(f"{path}: not a bundle (neither a directory nor an archive file)")
            with os.fdopen(os.dup(fd), "rb") as f:
                self.members = read_index(f, st.st_size, str(path))
            self._fd = os.dup(fd)
            self._size = st.st_size
        finally:
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.close(self._fd)

    def where(self, rel: str) -> str:
        return f"{self.path}:{rel}"

    def _member(self, rel: str) -> Member:
        try:
            return self.members[rel]
        except KeyError:
            raise FileNotFoundError(rel) from None

    def read_small(self, rel: str, limit: int = MAX_METADATA_BYTES) -> bytes:
        m = self._member(rel)
        if m.size > limit:
            raise BundleError(f"{self.where(rel)}: {m.size} bytes, more than the {limit} it may have")
        return os.pread(self._fd, m.size, m.offset)

    # Measurements taken since packing live beside the archive (it is never rewritten
    # for them), and so do the signatures over them; before any, the packed ones count.
    # A signature read from one place and profiles from the other never verify together.
    def read_profiles(self) -> bytes:
        try:
            return super().read_profiles()
        except FileNotFoundError:
            return self.read_small(PROFILES_FILE, MAX_PROFILES_BYTES)

    def read_profiles_signature(self) -> bytes:
        try:
            return super().read_profiles_signature()
        except FileNotFoundError:
            return self.read_small(PROFILES_SIGNATURE_FILE, signing.MAX_SIGNATURE_FILE)

    def map(self, rel: str, expected_size: int, private_copy: bool) -> tuple[Any, Any]:
        m = self._member(rel)
        _check_size(self.where(rel), m.size, expected_size)
        if private_copy:
            buffer = _private_copy(self._fd, m.offset, m.size)
            return buffer, buffer
        whole = _map(self._fd, self._size)
        return memoryview(whole)[m.offset : m.offset + m.size], whole


def bundle_source(path: Path) -> BundleSource:
    if path.is_dir():
        return DirectorySource(path)
    if not path.exists():
        raise BundleError(f"{path}: no such bundle")
    return ArchiveSource(path)


def _check_size(where: str, actual: int, expected: int) -> None:
    if actual != expected:
        raise IntegrityError(
            f"{where}: {actual} bytes where the manifest says {expected}; refusing to use it",
            hint="the file was modified or truncated; recompile or restore the bundle",
        )


def _read_limited(f: Any, where: str, limit: int) -> bytes:
    st = os.fstat(f.fileno())
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{where}: not a regular file")
    # The size first, so an oversized file costs nothing; then at most one byte more
    # than allowed, for a file that grows meanwhile.
    data = f.read(limit + 1) if st.st_size <= limit else b""
    if st.st_size > limit or len(data) > limit:
        raise BundleError(f"{where}: {max(st.st_size, len(data))} bytes, more than the {limit} it may have")
    return data


def _read_limited_file(path: Path, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        return _read_limited(f, str(path), limit)


# --- checked files ---------------------------------------------------------------


@dataclass
class CheckedFile:
    """A bundle file whose bytes matched the manifest. `buffer` is a read-only view
    of exactly the bytes that were hashed (a mapping of the opened file or archive,
    or a private copy); hand it to whatever runs the file instead of opening the path
    again."""

    path: str
    buffer: Any  # mmap.mmap or memoryview: the buffer protocol, read-only
    size: int
    private_copy: bool
    _owner: Any = None  # the mapping `buffer` is a view of

    def bytes(self) -> bytes:
        return bytes(self.buffer[: self.size]) if self.size else b""

    def close(self) -> None:
        for b in (self.buffer, self._owner):
            with contextlib.suppress(BufferError, ValueError, AttributeError):
                b.release() if isinstance(b, memoryview) else b.close()


def open_checked(bundle: Path, manifest: Manifest, rel: str, *, private_copy: bool = False) -> CheckedFile:
    """Open a build-time file of the bundle, check its size and sha256 against the
    manifest, and return the checked bytes. Raises IntegrityError if the file is
    missing, not a regular file inside the bundle, or not what the manifest says.

    The check is tied to the bytes used: the file is opened once and the same mapping
    is hashed and returned, so a file swapped by rename after the check is never used.
    A mapping still sees writes made to the same file in place; `private_copy=True`
    copies the bytes into private memory first, which rules that out too.
    """
    src = bundle if isinstance(bundle, BundleSource) else bundle_source(Path(bundle))
    where = src.where(rel)
    expected = manifest.files.get(rel)
    if expected is None:
        raise IntegrityError(f"{where}: not a file this bundle's manifest records; refusing to use it")
    check_relpath(rel)
    try:
        buffer, owner = src.map(rel, expected.size, private_copy)
    except FileNotFoundError:
        raise IntegrityError(f"{where}: missing from the bundle") from None
    checked = CheckedFile(where, buffer, expected.size, private_copy, owner)
    actual = hashlib.sha256(buffer if expected.size else b"").hexdigest()
    if actual != expected.sha256:
        checked.close()
        raise IntegrityError(
            f"{where}: sha256 {actual[:12]}… does not match the manifest's {expected.sha256[:12]}…; refusing to use it",
            hint="the file was modified or corrupted; recompile or restore the bundle",
        )
    return checked


def check_all_files(bundle: Path, manifest: Manifest) -> dict[str, str]:
    """Check every build-time file of the bundle, whether or not this host can run it.
    Returns the problem with each file that fails, by path (empty: all good)."""
    problems = {}
    src = bundle_source(Path(bundle))
    for rel in sorted(manifest.files):
        try:
            open_checked(src, manifest, rel).close()
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


def _private_copy(fd: int, offset: int, size: int) -> mmap.mmap:
    # Anonymous memory is page-aligned, as IREE requires of a module's buffer.
    buf = mmap.mmap(-1, max(size, 1))
    view = memoryview(buf)
    done = 0
    try:
        while done < size:
            n = os.preadv(fd, [view[done:size]], offset + done)
            if n == 0:
                buf.close()
                raise IntegrityError("file shrank while it was being read; refusing to use it")
            done += n
    finally:
        view.release()
    return buf


# --- writing ---------------------------------------------------------------------


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Exclusive, short-lived ownership of an output path: held while a run creates
    its private directories beside it, removes stale ones, or swaps the bundle in, so
    concurrent runs to one path never see each other's half-made state. The lock is
    an flock on the parent directory itself, so it leaves no file behind."""
    out = Path(output).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
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
    the complete old bundle or the complete new one. An output named `*.hxcb` gets
    the bundle as a single-file archive, put in place by one atomic rename.
    """
    out = Path(output).absolute()
    archive = out.suffix == ARCHIVE_SUFFIX
    if archive and out.is_dir():
        raise BundleError(f"{out}: is a directory; a {ARCHIVE_SUFFIX} bundle is a single file")
    if not archive and out.exists() and not out.is_dir():
        raise BundleError(f"{out}: exists and is not a directory; refusing to replace it",
                          hint=f"name a {ARCHIVE_SUFFIX} output to write a single-file bundle")  # fmt: skip
    if not archive and out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).exists():
        raise BundleError(f"{out}: exists and is not a bundle; refusing to replace it")
    with private_dir(out, ".tmp") as stage:
        os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes it private; a bundle is not
        yield stage
        if archive:
            _publish_archive(stage, out)
            return
        with output_lock(out):
            if out.exists() and not (out / MANIFEST_FILE).exists() and out.is_dir() and any(out.iterdir()):
                raise BundleError(f"{out}: became something other than a bundle; refusing to replace it")
            _fault_point("before-swap")
            _swap_into_place(stage, out)
            _fault_point("after-swap")
        # `stage` now names the old bundle (or nothing); private_dir removes it.


def _publish_archive(bundle_dir: Path, out: Path, extra: dict[str, bytes] | None = None) -> None:
    """Pack a complete bundle directory into `out` (a rename of a finished file, so
    `out` is the old archive or the new one, never part of one)."""
    with private_dir(out, ".tmp") as work:
        tmp = work / "bundle.hxcb"
        metadata = (MANIFEST_FILE, SIGNATURE_FILE, PROFILES_FILE, PROFILES_SIGNATURE_FILE)
        names = [n for n in metadata if (bundle_dir / n).is_file()]
        manifest = parse_manifest(_json((bundle_dir / MANIFEST_FILE).read_bytes(), bundle_dir / MANIFEST_FILE))
        extra = extra or {}
        for name, data in extra.items():
            (work / name).write_bytes(data)
        members = [(n, work / n if n in extra else bundle_dir / n) for n in names if n not in extra]
        members += [(n, work / n) for n in extra]
        members += [(rel, bundle_dir / rel) for rel in sorted(manifest.files)]
        write_archive(tmp, members)
        os.chmod(tmp, 0o666 & ~_umask())
        with output_lock(out):
            _fault_point("before-swap")
            os.replace(tmp, out)
            _fault_point("after-swap")


def pack_bundle(bundle: Path, output: Path, *, trusted_keys: TrustedKeys = None) -> Manifest:
    """Write a bundle (a directory or another archive) as a single-file archive,
    after checking every file against its manifest."""
    manifest = read_manifest(bundle, trusted_keys=trusted_keys)
    problems = check_all_files(bundle, manifest)
    if problems:
        raise IntegrityError(f"{bundle}: will not pack a damaged bundle: {next(iter(problems.values()))}")
    with private_dir(Path(output).absolute(), ".work") as work:
        _extract(bundle, manifest, work / "b")
        _publish_archive(work / "b", Path(output).absolute())
    return manifest


def unpack_bundle(archive: Path, output: Path, *, trusted_keys: TrustedKeys = None) -> Manifest:
    """Extract a single-file bundle into the directory `output` (which must not exist),
    writing only the files its manifest names, each checked first."""
    out = Path(output).absolute()
    if out.exists():
        raise UsageError(f"{out}: exists; unpack into a new directory")
    manifest = read_manifest(archive, trusted_keys=trusted_keys)
    src = bundle_source(Path(archive))
    if isinstance(src, ArchiveSource):
        known = {MANIFEST_FILE, SIGNATURE_FILE, PROFILES_FILE, PROFILES_SIGNATURE_FILE, *manifest.files}
        unknown = sorted(set(src.members) - known)
        if unknown:
            raise IntegrityError(f"{archive}: holds {unknown[0]!r}, which its manifest does not name; refusing to unpack")
    with staged_bundle(out) as stage:
        _extract(archive, manifest, stage)
    return manifest


def _extract(bundle: Path, manifest: Manifest, target: Path) -> None:
    """Write a bundle's checked files and metadata into a new directory `target`."""
    src = bundle_source(Path(bundle))
    target.mkdir(exist_ok=True)
    for name in (MANIFEST_FILE, SIGNATURE_FILE):
        with contextlib.suppress(FileNotFoundError):
            (target / name).write_bytes(src.read_small(name))
    # Profiles travel as they are (checked when read); oversized ones were already
    # reported and ignored, and are left behind.
    with contextlib.suppress(FileNotFoundError, BundleError):
        (target / PROFILES_FILE).write_bytes(src.read_profiles())
    with contextlib.suppress(FileNotFoundError, BundleError):
        (target / PROFILES_SIGNATURE_FILE).write_bytes(src.read_profiles_signature())
    for rel in sorted(manifest.files):
        checked = open_checked(src, manifest, rel)
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "xb") as f:
            f.write(checked.buffer)
        checked.close()


def sign_bundle(bundle: Path, key_path: Path, *, sequence: int | None = None) -> signing.PublicKey:
    """Add (or renew) this key's signature over the bundle's manifest, with a
    sequence number for rollback checks if given."""
    key = signing.load_private_key(key_path)
    src = bundle_source(Path(bundle))
    read_manifest(bundle, trusted_keys=False, profiles=False)  # a well-formed bundle, before signing it
    raw = src.read_small(MANIFEST_FILE)
    signatures = signing.sign(raw, key, read_signatures(src), sequence=sequence)
    data = signing.signatures_json(signatures)
    if isinstance(src, ArchiveSource):
        with private_dir(src.path, ".work") as work:
            _extract(src.path, parse_manifest(_json(raw, src.where(MANIFEST_FILE))), work / "b")
            _publish_archive(work / "b", src.path, extra={SIGNATURE_FILE: data})
    else:
        atomic_write(src.path / SIGNATURE_FILE, data)
    return signing.public_of(key)


def sign_profiles(bundle: Path, key_path: Path) -> tuple[signing.PublicKey, int]:
    """Sign the bundle's profiles as they are now (their exact bytes, bound to its
    manifest) into PROFILES_SIGNATURE_FILE, beside the profiles; returns the key and
    how many profiles were signed. Profiles recorded later are not covered: sign again."""
    key = signing.load_private_key(key_path)
    src = bundle_source(Path(bundle))
    manifest = read_manifest(bundle, trusted_keys=False, profiles=False)
    raw = src.read_small(MANIFEST_FILE)
    where = str(src.profiles_path)
    try:
        profiles = src.read_profiles()
    except FileNotFoundError:
        raise UsageError(f"{bundle}: has no profiles to sign", hint="record some with `hxc bench` first") from None
    doc = parse_profiles(_json(profiles, where), where)  # well-formed and within bounds, before vouching for them
    if doc.model_ir_sha256 != manifest.model.ir_sha256:
        raise BundleError(f"{where}: measured for a different model; refusing to sign them")
    signatures = signing.sign_profiles(raw, profiles, key, read_profiles_signatures(src))
    atomic_write(src.profiles_signature_path, signing.signatures_json(signatures))
    return signing.public_of(key), len(doc.profiles)


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
        _write_profiles(bundle_dir / PROFILES_FILE, manifest)


def _write_profiles(target: Path, manifest: Manifest) -> None:
    # Within the bounds a reader accepts: the newest MAX_PROFILES (selection uses the
    # newest measurement anyway), the hosts they name, and fewer still while the file
    # would be too large (only unusually long text gets there).
    profiles = manifest.profiles[-MAX_PROFILES:]
    for _ in range(32):  # each pass keeps fewer profiles, down to none
        hosts = manifest.hosts
        if len(hosts) > MAX_HOSTS or len(profiles) < len(manifest.profiles):
            used = {p.host_id for p in profiles}
            hosts = tuple(h for h in hosts if h.id in used)[-MAX_HOSTS:]
        data = {
            "format": PROFILES_FORMAT,
            "schema_version": f"{PROFILES_SCHEMA_VERSION[0]}.{PROFILES_SCHEMA_VERSION[1]}",
            "model_ir_sha256": manifest.model.ir_sha256,
            "hosts": to_json(hosts),
            "profiles": to_json(profiles),
        }
        raw = (json.dumps(data, indent=2) + "\n").encode()
        if len(raw) <= MAX_PROFILES_BYTES or not profiles:
            break
        profiles = profiles[len(profiles) - int(len(profiles) * MAX_PROFILES_BYTES / len(raw) * 0.9) :]
    if len(manifest.profiles) > len(profiles):
        log.warning("hxc: keeping the newest %d of %d profiles (a bundle keeps at most %d, in %d bytes)",
                    len(profiles), len(manifest.profiles), MAX_PROFILES, MAX_PROFILES_BYTES)  # fmt: skip
    atomic_write(target, raw)


def atomic_write(target: Path, data: bytes) -> None:
    """Replace `target` with `data` so readers see the old or the new file, never half
    of one: write a sibling temporary file, fsync, rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with name_write_errors(target), os.fdopen(fd, "wb") as f:
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
    # The profiles there are amended, not trusted for a choice: unsigned ones are kept
    # even where signed ones are required (they would be lost otherwise).
    read_manifest(path, require_signed_profiles=False)  # fail early, with a clear message, before taking the lock
    src = bundle_source(path)
    # A directory holds its own lock file; an archive is never written to, so its
    # profiles live beside it and the lock is on the directory it sits in.
    with _profiles_lock(src):
        current = read_manifest(path, require_signed_profiles=False)
        updated = change(current)
        if dataclasses.replace(updated, hosts=(), profiles=()) != dataclasses.replace(current, hosts=(), profiles=()):
            raise ValueError("update_manifest may only change hosts and profiles")  # a bug, not a user error
        _write_profiles(src.profiles_path, updated)
        return updated


@contextlib.contextmanager
def _profiles_lock(src: BundleSource) -> Iterator[None]:
    if isinstance(src, ArchiveSource):
        with output_lock(src.path):
            yield
        return
    fd = os.open(src.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def copy_hashed(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> FileHash:
    """Copy a file and hash the bytes written, in one pass: the hash a bundle records
    is the hash of the bytes it ships, not of a source that may differ."""
    h = hashlib.sha256()
    size = 0
    with name_write_errors(dst), open(src, "rb") as fin, open(dst, "xb") as fout:
        while chunk := fin.read(1 << 20):
            h.update(chunk)
            fout.write(chunk)
            size += len(chunk)
    return FileHash(h.hexdigest(), size)


@contextlib.contextmanager
def name_write_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """A failed write names no file (`[Errno 28] No space left on device`); give it
    the file it was writing, so the one-line error says where the disk is full."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, os.fspath(path)) from None
        raise


def file_hash(path: str | os.PathLike[str]) -> FileHash:
    return FileHash(file_sha256(path), os.path.getsize(path))


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

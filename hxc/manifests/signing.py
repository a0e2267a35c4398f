"""Ed25519 signatures over a bundle's manifest: who built it, checked before any of
its files is used.

What is signed is the exact bytes of `manifest.json`, which is written once at build
time and names the sha256 and size of every build-time file (program, artifacts,
weights, golden sample), so one signature covers everything that runs. Profiles
(`profiles.json`) are measurements added afterwards by `hxc bench` / `hxc profiles
merge`; they are deliberately outside the signature and never trusted for integrity.

Keys: `hxc keygen -o NAME` writes the private key NAME (PKCS#8 PEM, mode 0600) and the
public key NAME.pub (SubjectPublicKeyInfo PEM). A key id is the first 16 hex digits of
the sha256 of the raw 32-byte public key; it is shown wherever keys are named. A
bundle may carry several signatures (one per key), so keys can be rotated: sign with
the new key and the old, trust both, then drop the old.

Rollback: `sign(..., sequence=N)` puts a sequence number inside what is signed (the
signed message is the number and the manifest's bytes), so a reader that requires at
least N (`min_sequence`) refuses an older bundle signed by the same key. The manifest
itself is untouched: it was written at build time and is what every hash hangs on.

Profiles can be signed too, separately (`sign_profiles`: `profiles.sig`), over the
exact bytes of `profiles.json` and the manifest's sha256, so that a reader that
requires signed profiles uses only measurements a trusted key vouched for, for this
bundle.

What a reader requires (keys, a minimum sequence, signed profiles) is a `TrustPolicy`:
from the caller's arguments, else from the environment, which `TrustPolicy.from_env`
alone reads.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hxc.errors import IntegrityError, UsageError, first_line

SIGNATURE_FORMAT = "hxc-signatures"
# Version 2 of the signature file: entries may carry a sequence number (written only
# when one does, so files without one stay readable by an older hxc).
SIGNATURE_FILE_VERSION = 2
TRUSTED_KEYS_ENV = "HXC_TRUSTED_KEYS"
MIN_SEQUENCE_ENV = "HXC_MIN_SEQUENCE"
SIGNED_PROFILES_ENV = "HXC_REQUIRE_SIGNED_PROFILES"
# Domain separation: a signature over a manifest can never be replayed as one over
# anything else the same key signs (a sequenced manifest, profiles), nor the reverse.
_CONTEXT = b"hxc bundle manifest v1\x00"
_SEQUENCED_CONTEXT = b"hxc bundle manifest v2\x00"  # + 8-byte big-endian sequence + manifest
_PROFILES_CONTEXT = b"hxc bundle profiles v1\x00"  # + 32-byte manifest sha256 + profiles
_SIGNATURE_BYTES = 64
MAX_SIGNATURE_FILE = 64 * 1024
MAX_SEQUENCE = 2**63 - 1
_FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


class UntrustedBundleError(IntegrityError):
    """Verification was required and the bundle is unsigned, signed by a key that is
    not trusted, or its signature does not match its manifest."""


@dataclass(frozen=True)
class PublicKey:
    key_id: str
    raw: bytes  # the 32-byte Ed25519 public key
    source: str  # where it was read from, for messages


@dataclass(frozen=True)
class Signature:
    key_id: str
    manifest_sha256: str
    signature: bytes
    sequence: int | None = None  # signed with the manifest, for rollback checks
    profiles_sha256: str | None = None  # set on signatures over profiles (profiles.sig)


@dataclass(frozen=True)
class Verified:
    key: PublicKey  # the trusted key whose signature verified
    sequence: int | None  # the sequence number that signature carries


def key_id(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


# --- keys --------------------------------------------------------------------------


def generate_key(path: Path) -> PublicKey:
    """Write a new private key to `path` (mode 0600, refusing to overwrite) and its
    public key to `path.pub`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pub_path = Path(f"{path}.pub")
    for p in (path, pub_path):
        if p.exists():
            raise UsageError(f"{p}: exists; refusing to overwrite a key", hint="choose another name or remove it first")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    pub_path.write_bytes(public)
    return _public(key.public_key(), str(pub_path))


def load_private_key(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        st = os.stat(path)
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such private key", hint="create one with `hxc keygen -o NAME`") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(
            f"{path}: private key is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it",
            hint=f"chmod 600 {path}",
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{path}: not an unencrypted PEM private key ({first_line(e)})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{path}: not an Ed25519 key; hxc signs with Ed25519 (`hxc keygen`)")
    return key


def load_public_key(path: Path) -> PublicKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        data = Path(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise UsageError(f"{path}: no such public key") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{path}: not a PEM public key ({first_line(e)})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UsageError(f"{path}: not an Ed25519 public key")
    return _public(key, str(path))


def public_of(private_key: Any) -> PublicKey:
    return _public(private_key.public_key(), "private key")


def _public(key: Any, source: str) -> PublicKey:
    from cryptography.hazmat.primitives import serialization

    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PublicKey(key_id(raw), raw, source)


def trusted_keys(spec: str | Sequence[str | os.PathLike[str]] | None) -> list[PublicKey] | None:
    """Public keys from paths (files, or directories of *.pub files), or from
    $HXC_TRUSTED_KEYS (paths separated by ':') when `spec` is None. None: no keys
    named anywhere, so signatures are not required."""
    if spec is None:
        spec = TrustPolicy.from_env().keys
        if spec is None:
            return None
    paths = [p for p in spec.split(os.pathsep) if p] if isinstance(spec, str) else [os.fspath(p) for p in spec]
    keys: list[PublicKey] = []
    for p in map(Path, paths):
        files = sorted(p.glob("*.pub")) if p.is_dir() else [p]
        keys += [load_public_key(f) for f in files]
    if not keys:
        raise UsageError(f"no public keys found in {', '.join(paths) or 'the empty list'} (trusted keys)")
    return keys


@dataclass(frozen=True)
class TrustPolicy:
    """What a bundle must prove before it is used: a signature by one of `keys`
    (paths; None: no signature required), carrying at least `min_sequence`, and, with
    `signed_profiles`, a signature over its profiles too (else they are ignored)."""

    keys: str | tuple[str, ...] | None = None
    min_sequence: int | None = None
    signed_profiles: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> TrustPolicy:
        """The policy the environment sets: the one place hxc reads $HXC_TRUSTED_KEYS,
        $HXC_MIN_SEQUENCE and $HXC_REQUIRE_SIGNED_PROFILES. A variable that is set
        fails closed: set but naming no key, or not a number, is an error, never
        "nothing required"."""
        keys = environ.get(TRUSTED_KEYS_ENV)
        if keys is not None and not [p for p in keys.split(os.pathsep) if p.strip()]:
            raise UsageError(f"trusted keys (${TRUSTED_KEYS_ENV} or --trusted-keys) are set but name no key; "
                             "refusing to run without the signatures they ask for",
                             hint=f"name public key files or directories, or unset {TRUSTED_KEYS_ENV}")  # fmt: skip
        sequence = environ.get(MIN_SEQUENCE_ENV)
        flag = environ.get(SIGNED_PROFILES_ENV, "0")
        signed = _FLAGS.get(flag.strip().lower())
        if signed is None:
            raise UsageError(f"${SIGNED_PROFILES_ENV} is {flag!r}; expected 1 or 0")
        return cls(keys, None if sequence is None else parse_sequence(sequence, f"${MIN_SEQUENCE_ENV}"), signed)

    @classmethod
    def resolve(cls, keys: str | Sequence[str | os.PathLike[str]] | None = None, min_sequence: int | None = None,
                signed_profiles: bool | None = None) -> TrustPolicy:  # fmt: skip
        """The caller's arguments, each falling back to the environment where None."""
        env = cls.from_env()
        if keys is not None and not isinstance(keys, str):
            keys = tuple(os.fspath(k) for k in keys)
        if min_sequence is not None:
            parse_sequence(min_sequence, "min_sequence")
        return cls(env.keys if keys is None else keys, env.min_sequence if min_sequence is None else min_sequence,
                   env.signed_profiles if signed_profiles is None else signed_profiles).checked()  # fmt: skip

    def checked(self) -> TrustPolicy:
        """This policy, if it can be checked: a minimum sequence or signed profiles
        without keys to check them against is an error, not "nothing required"."""
        if self.keys is None and (self.min_sequence is not None or self.signed_profiles):
            what = "a minimum sequence" if self.min_sequence is not None else "signed profiles"
            raise UsageError(f"{what} can only be checked against trusted keys",
                             hint=f"give --trusted-keys (or ${TRUSTED_KEYS_ENV})")  # fmt: skip
        return self

    def public_keys(self) -> list[PublicKey] | None:
        return None if self.keys is None else trusted_keys(self.keys)

    def env(self) -> dict[str, str]:
        """This policy as environment variables, for a worker process to read back."""
        out = {}
        if self.keys is not None:
            out[TRUSTED_KEYS_ENV] = self.keys if isinstance(self.keys, str) else os.pathsep.join(self.keys)
        if self.min_sequence is not None:
            out[MIN_SEQUENCE_ENV] = str(self.min_sequence)
        if self.signed_profiles:
            out[SIGNED_PROFILES_ENV] = "1"
        return out


def parse_sequence(value: object, where: str) -> int:
    """A sequence number: an integer from 0 to 2**63-1."""
    try:
        n = int(str(value).strip()) if not isinstance(value, bool) else -1
    except ValueError:
        n = -1
    if not 0 <= n <= MAX_SEQUENCE:
        raise UsageError(f"{where}: {value!r} is not a sequence number (an integer from 0 to {MAX_SEQUENCE})")
    return n


# --- signatures --------------------------------------------------------------------


def _message(s: Signature, manifest_bytes: bytes, profiles_bytes: bytes | None = None) -> bytes:
    """What a signature signs: the manifest (with its sequence number, if any), or
    profiles bound to one manifest."""
    if profiles_bytes is not None:
        return _PROFILES_CONTEXT + hashlib.sha256(manifest_bytes).digest() + profiles_bytes
    if s.sequence is not None:
        return _SEQUENCED_CONTEXT + s.sequence.to_bytes(8, "big") + manifest_bytes
    return _CONTEXT + manifest_bytes


def sign(manifest_bytes: bytes, private_key: Any, existing: Iterable[Signature] = (), *,
         sequence: int | None = None) -> list[Signature]:  # fmt: skip
    """The signature list with this key's signature over `manifest_bytes` (and
    `sequence`, if given), replacing an older one by the same key and dropping any
    over a different manifest."""
    if sequence is not None:
        parse_sequence(sequence, "sequence")
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    unsigned = Signature(public_of(private_key).key_id, digest, b"", sequence)
    mine = dataclasses.replace(unsigned, signature=private_key.sign(_message(unsigned, manifest_bytes)))
    return [s for s in existing if s.key_id != mine.key_id and s.manifest_sha256 == digest] + [mine]


def sign_profiles(manifest_bytes: bytes, profiles_bytes: bytes, private_key: Any,
                  existing: Iterable[Signature] = ()) -> list[Signature]:  # fmt: skip
    """Like `sign`, over exactly `profiles_bytes` as measured for this manifest: the
    list keeps other keys' signatures over the same profiles."""
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    profiles = hashlib.sha256(profiles_bytes).hexdigest()
    unsigned = Signature(public_of(private_key).key_id, digest, b"", profiles_sha256=profiles)
    mine = dataclasses.replace(unsigned, signature=private_key.sign(_message(unsigned, manifest_bytes, profiles_bytes)))
    same = [s for s in existing if s.manifest_sha256 == digest and s.profiles_sha256 == profiles]
    return [s for s in same if s.key_id != mine.key_id] + [mine]


def signatures_json(signatures: Sequence[Signature]) -> bytes:
    entries = []
    for s in signatures:
        entry: dict[str, Any] = {"key_id": s.key_id, "manifest_sha256": s.manifest_sha256}
        if s.sequence is not None:
            entry["sequence"] = s.sequence
        if s.profiles_sha256 is not None:
            entry["profiles_sha256"] = s.profiles_sha256
        entries.append({**entry, "signature": base64.b64encode(s.signature).decode()})
    # Version 1 while no entry needs version 2: an older hxc keeps reading those.
    version = SIGNATURE_FILE_VERSION if any(s.sequence is not None for s in signatures) else 1
    data = {"format": SIGNATURE_FORMAT, "version": version, "algorithm": "ed25519", "signatures": entries}
    return (json.dumps(data, indent=2) + "\n").encode()


def parse_signatures(raw: bytes, where: str) -> list[Signature]:
    if len(raw) > MAX_SIGNATURE_FILE:
        raise UntrustedBundleError(f"{where}: signature file is {len(raw)} bytes; refusing it")
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("format") != SIGNATURE_FORMAT or data.get("algorithm") != "ed25519":
            raise ValueError("not an hxc ed25519 signature file")
        version = data.get("version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version > SIGNATURE_FILE_VERSION:
            raise ValueError(f"version {version!r}, newer than this hxc reads ({SIGNATURE_FILE_VERSION})")
        out = []
        for entry in data["signatures"]:
            sig = base64.b64decode(entry["signature"], validate=True)
            if len(sig) != _SIGNATURE_BYTES:
                raise ValueError(f"a signature is {len(sig)} bytes, not {_SIGNATURE_BYTES}")
            sequence = entry.get("sequence")
            if sequence is not None and (not isinstance(sequence, int) or isinstance(sequence, bool)
                                         or not 0 <= sequence <= MAX_SEQUENCE):  # fmt: skip
                raise ValueError(f"sequence {sequence!r} is not an integer from 0 to {MAX_SEQUENCE}")
            profiles = entry.get("profiles_sha256")
            out.append(Signature(str(entry["key_id"]), str(entry["manifest_sha256"]), sig, sequence,
                                 None if profiles is None else str(profiles)))  # fmt: skip
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise UntrustedBundleError(f"{where}: unreadable signature file ({first_line(e)})") from None
    return out


def check(manifest_bytes: bytes, signatures: Sequence[Signature], keys: Sequence[PublicKey], where: str, *,
          min_sequence: int | None = None) -> Verified:  # fmt: skip
    """The trusted key whose signature over exactly `manifest_bytes` verifies (and
    carries at least `min_sequence`); an UntrustedBundleError saying why otherwise."""
    if not signatures:
        raise UntrustedBundleError(f"{where}: the bundle is not signed, and signatures are required",
                                   hint="sign it with `hxc sign BUNDLE --key KEY`")  # fmt: skip
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    reasons: list[str] = []
    verified = _verified(signatures, keys, reasons, lambda s: _message(s, manifest_bytes),
                         lambda s: s.manifest_sha256 == digest,
                         "this manifest (changed after signing, or signed for another bundle)")  # fmt: skip
    for s, key in verified:
        if min_sequence is not None and (s.sequence is None or s.sequence < min_sequence):
            has = f"sequence {s.sequence}" if s.sequence is not None else "no sequence number"
            reasons.append(f"the signature by key {s.key_id} carries {has}, below the minimum {min_sequence} "
                           "(an older bundle: refusing a rollback)")  # fmt: skip
            continue
        return Verified(key, s.sequence)
    raise UntrustedBundleError(f"{where}: no trusted signature: {'; '.join(reasons)}",
                               hint=f"trusted keys: {', '.join(sorted(k.key_id for k in keys))}")  # fmt: skip


def check_profiles(manifest_bytes: bytes, profiles_bytes: bytes, signatures: Sequence[Signature],
                   keys: Sequence[PublicKey], where: str) -> PublicKey:  # fmt: skip
    """The trusted key whose signature over exactly these profiles of this manifest
    verifies; an UntrustedBundleError saying why otherwise."""
    if not signatures:
        raise UntrustedBundleError(f"{where}: the profiles are not signed",
                                   hint="sign them with `hxc sign BUNDLE --key KEY --profiles`")  # fmt: skip
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    profiles = hashlib.sha256(profiles_bytes).hexdigest()
    reasons: list[str] = []
    verified = _verified(signatures, keys, reasons, lambda s: _message(s, manifest_bytes, profiles_bytes),
                         lambda s: s.manifest_sha256 == digest and s.profiles_sha256 == profiles,
                         "these profiles (changed after signing, e.g. by `hxc bench`: sign them again; "
                         "or signed for another bundle)")  # fmt: skip
    first = next(verified, None)
    if first is not None:
        return first[1]
    raise UntrustedBundleError(f"{where}: no trusted signature: {'; '.join(reasons)}",
                               hint=f"trusted keys: {', '.join(sorted(k.key_id for k in keys))}")  # fmt: skip


def _verified(signatures: Sequence[Signature], keys: Sequence[PublicKey], reasons: list[str],
              message: Callable[[Signature], bytes], same_content: Callable[[Signature], bool],
              content: str) -> Iterator[tuple[Signature, PublicKey]]:  # fmt: skip
    """Each signature by a trusted key that verifies over `message(signature)`, with its
    key; why each other one fails goes to `reasons`. A signature that fails although it
    names the content's sha256 (`same_content`) is forged or damaged; one naming other
    content was made for other bytes (`content` says which)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    by_id = {k.key_id: k for k in keys}
    for s in signatures:
        key = by_id.get(s.key_id)
        if key is None:
            reasons.append(f"key {s.key_id} is not trusted")
            continue
        try:
            Ed25519PublicKey.from_public_bytes(key.raw).verify(s.signature, message(s))
        except InvalidSignature:
            why = "is invalid (forged or damaged)" if same_content(s) else f"does not match {content}"
            reasons.append(f"the signature by key {s.key_id} {why}")
            continue
        yield s, key

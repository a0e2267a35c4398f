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
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hxc.errors import IntegrityError, UsageError, first_line

SIGNATURE_FORMAT = "hxc-signatures"
TRUSTED_KEYS_ENV = "HXC_TRUSTED_KEYS"
# Domain separation: a signature over a manifest can never be replayed as one over
# anything else the same key signs.
_CONTEXT = b"hxc bundle manifest v1\x00"
_SIGNATURE_BYTES = 64
MAX_SIGNATURE_FILE = 64 * 1024


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
        spec = os.environ.get(TRUSTED_KEYS_ENV) or None
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


# --- signatures --------------------------------------------------------------------


def sign(manifest_bytes: bytes, private_key: Any, existing: Iterable[Signature] = ()) -> list[Signature]:
    """The signature list with this key's signature over `manifest_bytes` (replacing
    an older one by the same key, dropping any over a different manifest)."""
    from cryptography.hazmat.primitives import serialization

    raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    mine = Signature(key_id(raw), digest, private_key.sign(_CONTEXT + manifest_bytes))
    return [s for s in existing if s.key_id != mine.key_id and s.manifest_sha256 == digest] + [mine]


def signatures_json(signatures: Sequence[Signature]) -> bytes:
    data = {
        "format": SIGNATURE_FORMAT,
        "version": 1,
        "algorithm": "ed25519",
        "signatures": [
            {"key_id": s.key_id, "manifest_sha256": s.manifest_sha256, "signature": base64.b64encode(s.signature).decode()}
            for s in signatures
        ],
    }
    return (json.dumps(data, indent=2) + "\n").encode()


def parse_signatures(raw: bytes, where: str) -> list[Signature]:
    if len(raw) > MAX_SIGNATURE_FILE:
        raise UntrustedBundleError(f"{where}: signature file is {len(raw)} bytes; refusing it")
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("format") != SIGNATURE_FORMAT or data.get("algorithm") != "ed25519":
            raise ValueError("not an hxc ed25519 signature file")
        out = []
        for entry in data["signatures"]:
            sig = base64.b64decode(entry["signature"], validate=True)
            if len(sig) != _SIGNATURE_BYTES:
                raise ValueError(f"a signature is {len(sig)} bytes, not {_SIGNATURE_BYTES}")
            out.append(Signature(str(entry["key_id"]), str(entry["manifest_sha256"]), sig))
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise UntrustedBundleError(f"{where}: unreadable signature file ({first_line(e)})") from None
    return out


def check(manifest_bytes: bytes, signatures: Sequence[Signature], keys: Sequence[PublicKey], where: str) -> PublicKey:
    """The trusted key whose signature over exactly `manifest_bytes` verifies; an
    UntrustedBundleError saying why otherwise."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not signatures:
        raise UntrustedBundleError(f"{where}: the bundle is not signed, and signatures are required",
                                   hint="sign it with `hxc sign BUNDLE --key KEY`")  # fmt: skip
    by_id = {k.key_id: k for k in keys}
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    reasons = []
    for s in signatures:
        key = by_id.get(s.key_id)
        if key is None:
            reasons.append(f"key {s.key_id} is not trusted")
            continue
        try:
            Ed25519PublicKey.from_public_bytes(key.raw).verify(s.signature, _CONTEXT + manifest_bytes)
        except InvalidSignature:
            why = ("does not match this manifest (changed after signing, or signed for another bundle)"
                   if s.manifest_sha256 != digest else "is invalid (forged or damaged)")  # fmt: skip
            reasons.append(f"the signature by key {s.key_id} {why}")
            continue
        return key
    raise UntrustedBundleError(
        f"{where}: no trusted signature: {'; '.join(reasons)}",
        hint=f"trusted keys: {', '.join(sorted(by_id))}",
    )


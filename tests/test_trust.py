"""Signed bundles and single-file archives: keys, signatures that cover every file that
runs and survive profiling, refusal before anything is opened, and archives that are
read in place and refuse every trick a tar file can play."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

import hxc.runtime
from hxc.errors import BundleError, ExitCode, IntegrityError, UsageError
from hxc.manifests import read_manifest
from hxc.manifests.bundle import open_checked
from hxc.manifests.signing import UntrustedBundleError

QUICK = ["--min-time", "0.01", "--min-iterations", "2", "--device", "cpu:host"]


@pytest.fixture
def bundle(example_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(example_bundle, tmp_path / "b.hxc"))


@pytest.fixture
def keys(tmp_path: Path, cli) -> dict[str, Path]:
    out = {}
    for name in ("ci", "old", "stranger"):
        result = cli("keygen", "-o", tmp_path / "keys" / name, "--json")
        assert result.exit_code == 0, result.stderr
        out[name] = tmp_path / "keys" / name
    return out


def _x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)


def test_keygen_writes_a_private_key_only_its_owner_can_read(keys, cli):
    assert stat.S_IMODE(os.stat(keys["ci"]).st_mode) == 0o600
    assert Path(f"{keys['ci']}.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    again = cli("keygen", "-o", keys["ci"])
    assert again.exit_code == ExitCode.USAGE and "refusing to overwrite" in again.stderr
    os.chmod(keys["old"], 0o644)
    loose = cli("sign", "missing.hxc", "--key", keys["old"])
    assert loose.exit_code == ExitCode.USAGE


def test_signed_bundle_verifies_and_profiles_never_break_the_signature(bundle, keys, cli):
    signed = cli("sign", bundle, "--key", keys["ci"], "--json")
    key_id = json.loads(signed.stdout)["key_id"]
    assert len(key_id) == 16
    assert cli("bench", bundle, *QUICK, "--baseline", "none").exit_code == 0  # adds profiles after signing
    result = cli("verify", bundle, "--trusted-keys", f"{keys['ci']}.pub", "--json")
    assert result.exit_code == 0, result.stderr
    shown = json.loads(cli("inspect", bundle, "--trusted-keys", f"{keys['ci']}.pub", "--json").stdout)
    assert shown["signed_by"] == [key_id] and shown["signature_verified_by"] == key_id
    assert "signed by key" in cli("inspect", bundle).stdout  # shown, not checked, without keys
    model = hxc.runtime.load(bundle, trusted_keys=[f"{keys['ci']}.pub"])
    np.testing.assert_allclose(model(_x()), hxc.runtime.load(bundle)(_x()), rtol=1e-6)


@pytest.mark.parametrize("case", ["unsigned", "untrusted", "changed", "truncated", "short", "other-manifest"])
def test_bad_signatures_are_refused(bundle, example_bundle, keys, cli, tmp_path, case):
    if case != "unsigned":
        cli("sign", bundle, "--key", keys["stranger" if case == "untrusted" else "ci"])
    sig = bundle / "manifest.sig"
    if case == "changed":  # the manifest edited after signing: e.g. a hash swapped for another file's
        data = json.loads((bundle / "manifest.json").read_text())
        data["model"]["name"] = "renamed"
        (bundle / "manifest.json").write_text(json.dumps(data))
    elif case == "truncated":
        sig.write_bytes(sig.read_bytes()[:40])
    elif case == "short":
        doc = json.loads(sig.read_text())
        doc["signatures"][0]["signature"] = "AAAA"
        sig.write_text(json.dumps(doc))
    elif case == "other-manifest":
        other = Path(shutil.copytree(example_bundle, tmp_path / "other.hxc"))
        data = json.loads((other / "manifest.json").read_text())
        data["created"] = "2000-01-01T00:00:00+00:00"
        (other / "manifest.json").write_text(json.dumps(data))
        cli("sign", other, "--key", keys["ci"])
        shutil.copyfile(other / "manifest.sig", sig)
    words = {"unsigned": "not signed", "untrusted": "is not trusted", "changed": "changed after signing",
             "truncated": "unreadable signature", "short": "not 64", "other-manifest": "signed for another bundle"}[case]  # fmt: skip
    with pytest.raises(UntrustedBundleError, match=words):
        hxc.runtime.load(bundle, trusted_keys=[f"{keys['ci']}.pub"])
    result = cli("run", bundle, "-i", bundle / "golden.npz", "--trusted-keys", f"{keys['ci']}.pub")
    assert result.exit_code == ExitCode.INTEGRITY and words in result.stderr and "Traceback" not in result.stderr


def test_signatures_are_checked_before_torch_or_iree_opens_anything(bundle, keys, cli, tmp_path, models, monkeypatch):
    # program.pt2 swapped for one whose pickle runs code, with the manifest's hash
    # forged to match: an attacker who can rewrite the whole bundle.
    from test_security import _with_pickled_weight

    from hxc.manifests import write_manifest
    from hxc.manifests.bundle import file_hash

    marker = tmp_path / "ran"
    _with_pickled_weight(models["pt2"], tmp_path / "evil.pt2", marker)
    shutil.copyfile(tmp_path / "evil.pt2", bundle / "program.pt2")
    m = read_manifest(bundle)
    write_manifest(bundle, dataclasses.replace(m, files={**m.files, "program.pt2": file_hash(bundle / "program.pt2")}))
    monkeypatch.setenv("HXC_TRUSTED_KEYS", f"{keys['ci']}.pub")
    result = cli("bench", bundle, *QUICK, "--allow-pickle")
    assert result.exit_code == ExitCode.INTEGRITY and "not signed" in result.stderr and not marker.exists()
    # Without required signatures the same bundle does run the file's code (the user
    # opted in with --allow-pickle): only the signature stood in the way.
    monkeypatch.delenv("HXC_TRUSTED_KEYS")
    cli("bench", bundle, *QUICK, "--allow-pickle")
    assert marker.exists()


def test_key_rotation_with_two_signatures(bundle, keys, cli):
    cli("sign", bundle, "--key", keys["old"])
    cli("sign", bundle, "--key", keys["ci"])
    assert len(json.loads((bundle / "manifest.sig").read_text())["signatures"]) == 2
    for trusted in ("old", "ci"):
        assert cli("verify", bundle, "--trusted-keys", f"{keys[trusted]}.pub").exit_code == 0
    directory = keys["ci"].parent
    assert cli("verify", bundle, "--trusted-keys", directory).exit_code == 0  # a directory of *.pub files


def test_single_file_bundles_run_in_place(bundle, keys, cli, tmp_path):
    archive = tmp_path / "m.hxcb"
    cli("sign", bundle, "--key", keys["ci"])
    assert cli("pack", bundle, "-o", archive).exit_code == 0
    with tarfile.open(archive) as t:  # a plain tar any tool can read
        assert t.getnames()[0] == "manifest.json" and all(m.isreg() for m in t.getmembers())
    want = hxc.runtime.load(bundle)(_x())
    for device in ("cpu", "vulkan"):
        got = hxc.runtime.load(archive, device=device, strict=True, trusted_keys=[f"{keys['ci']}.pub"])(_x())
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)
    # Mapped from the archive itself: the checked bytes are a view into one mapping of the file.
    m = read_manifest(archive)
    checked = open_checked(archive, m, m.artifact("cpu:host").file)
    assert isinstance(checked.buffer, memoryview) and len(checked.buffer.obj) == archive.stat().st_size
    checked.close()
    assert cli("verify", archive, "--trusted-keys", f"{keys['ci']}.pub").exit_code == 0
    # Profiles measured later go beside the archive; the archive itself never changes.
    before = archive.read_bytes()
    assert cli("bench", archive, *QUICK, "--baseline", "none").exit_code == 0
    assert archive.read_bytes() == before and Path(f"{archive}.profiles.json").is_file()
    assert read_manifest(archive).profiles
    # Unpacking gives the same bundle back.
    out = tmp_path / "again.hxc"
    assert cli("unpack", archive, "-o", out).exit_code == 0
    assert cli("verify", out, "--trusted-keys", f"{keys['ci']}.pub").exit_code == 0
    # Packing is deterministic: the same bundle packs to the same bytes.
    assert cli("pack", bundle, "-o", tmp_path / "second.hxcb").exit_code == 0
    assert (tmp_path / "second.hxcb").read_bytes() == before


def test_compile_straight_to_a_single_file_and_sign_it(models, keys, cli, tmp_path):
    archive = tmp_path / "net.hxcb"
    assert cli("compile", models["pt2"], "-t", "cpu:host", "-o", archive).exit_code == 0
    assert archive.is_file() and not list(tmp_path.glob(".net.hxcb.*"))
    assert cli("sign", archive, "--key", keys["ci"]).exit_code == 0
    assert cli("verify", archive, "--trusted-keys", f"{keys['ci']}.pub").exit_code == 0


def _tar(path: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for info, data in entries:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = size, kind, link
    return info


@pytest.mark.parametrize("trick, words", [
    ("absolute", "leaves the archive"),
    ("dotdot", "leaves the archive"),
    ("symlink", "symbolic link"),
    ("hardlink", "hard link"),
    ("device", "device"),
    ("duplicate", "appears twice"),
    ("lying-size", "past the end"),
    ("gzip", "not a ustar tar"),
])  # fmt: skip
def test_hostile_archives_are_refused_and_nothing_is_written(bundle, cli, tmp_path, trick, words):
    manifest = (bundle / "manifest.json").read_bytes()
    good = [(_info("manifest.json", len(manifest)), manifest)]
    path = tmp_path / "evil.hxcb"
    if trick == "absolute":
        _tar(path, [*good, (_info("/etc/evil", 1), b"x")])
    elif trick == "dotdot":
        _tar(path, [*good, (_info("artifacts/../../evil", 1), b"x")])
    elif trick == "symlink":
        _tar(path, [*good, (_info("golden.npz", kind=tarfile.SYMTYPE, link="/etc/passwd"), None)])
    elif trick == "hardlink":
        _tar(path, [*good, (_info("golden.npz", kind=tarfile.LNKTYPE, link="manifest.json"), None)])
    elif trick == "device":
        _tar(path, [*good, (_info("golden.npz", kind=tarfile.CHRTYPE), None)])
    elif trick == "duplicate":
        _tar(path, [*good, *good])
    elif trick == "lying-size":
        _tar(path, good)
        raw = bytearray(path.read_bytes())
        raw[124:136] = b"%011o\0" % (10**9)  # size field: a gigabyte
        raw[148:156] = b"        "
        raw[148:156] = b"%06o\0 " % sum(raw[:512])
        path.write_bytes(bytes(raw))
    elif trick == "gzip":  # compression (and so decompression bombs) is not a bundle archive
        with tarfile.open(path, "w:gz") as t:
            t.addfile(_info("manifest.json", len(manifest)), io.BytesIO(manifest))
    before = set(tmp_path.rglob("*"))
    for command in (["verify", path], ["unpack", path, "-o", tmp_path / "out"]):
        result = cli(*command)
        assert result.exit_code == ExitCode.INTEGRITY, result.stderr  # every archive defect
        assert words in result.stderr and "Traceback" not in result.stderr
    assert set(tmp_path.rglob("*")) == before  # nothing written, anywhere
    with pytest.raises(BundleError):
        hxc.runtime.load(path)


def _set_field(raw: bytearray, header: int, start: int, end: int, value: bytes) -> None:
    """Write `value` into one numeric field of the tar header at byte `header`, with a
    valid checksum, so only the field itself is wrong."""
    raw[header + start : header + end] = value.ljust(end - start, b"\0")[: end - start]
    raw[header + 148 : header + 156] = b" " * 8
    raw[header + 148 : header + 156] = b"%06o\0 " % sum(raw[header : header + 512])


@pytest.mark.parametrize("size", [b"-0001000", b"-1", b"+0000012", b"0_1", b" 1 2", b"\x80\0\0\0\0\0\0\0\0\0\0\x01", b"12x"])
def test_archive_numbers_are_octal_digits_only(bundle, cli, tmp_path, size):
    """A size field the tar spec does not allow (a sign, an underscore, base-256, junk
    after the digits) is an integrity error in every command and in load(), never an
    OSError from seeking to a negative offset."""
    archive = tmp_path / "m.hxcb"
    assert cli("pack", bundle, "-o", archive).exit_code == 0
    raw = bytearray(archive.read_bytes())
    second = 512 + -(-int(raw[124:135], 8) // 512) * 512  # the header after manifest.json's data
    _set_field(raw, second, 124, 136, size)
    archive.write_bytes(bytes(raw))
    for command in (["inspect", archive], ["verify", archive], ["unpack", archive, "-o", tmp_path / "out"],
                    ["run", archive, "-i", bundle / "golden.npz"]):  # fmt: skip
        result = cli(*command)
        assert result.exit_code == ExitCode.INTEGRITY, result.stderr
        assert "not octal digits" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(IntegrityError, match="not octal digits"):
        hxc.runtime.load(archive)


def test_archive_numbers_keep_the_padding_tar_writers_use():
    from hxc.manifests.archive import _octal

    assert _octal(b"00000001750\0", "x") == 1000  # Python's tarfile and GNU tar
    assert _octal(b"   1750 \0\0\0\0", "x") == 1000  # old writers pad with spaces on the left
    assert _octal(b"001750\0 ", "x") == 1000  # the checksum field's own form


# --- profiles: bounded, and signed when a host requires it ------------------------------


def _forged_profiles(bundle: Path, fast: str = "vulkan:spirv", repeat: int = 1) -> bytes:
    """profiles.json claiming `fast` is far faster than every other artifact on this
    host: what someone who can write beside a bundle could add to steer the choice."""
    from hxc.manifests.schema import PROFILES_FORMAT, PROFILES_SCHEMA_VERSION, LatencyStats, Profile, to_json
    from hxc.runtime import probe_host, select

    m = read_manifest(bundle, trusted_keys=False)
    probe = probe_host()
    profiles = []
    for c in select(m, probe).candidates:
        ms = 0.001 if c.artifact.id == fast else 1000.0
        stats = LatencyStats(ms, ms, ms, ms, 0.0, ms, 100)
        profiles.append(Profile(probe.host().id, c.artifact.id, c.artifact.sha256, c.device.label, "single-stream", 1,
                                stats, 1000 / ms, 1000 / ms, None, None, None, True, "2030-01-01T00:00:00+00:00"))  # fmt: skip
    data = {"format": PROFILES_FORMAT, "schema_version": "%d.%d" % PROFILES_SCHEMA_VERSION,
            "model_ir_sha256": m.model.ir_sha256, "hosts": [to_json(probe.host())], "profiles": to_json(profiles) * repeat}  # fmt: skip
    return (json.dumps(data, indent=2) + "\n").encode()


def test_profiles_beyond_their_bounds_are_ignored_with_a_warning(bundle, caplog):
    from hxc.manifests.bundle import MAX_PROFILES, MAX_PROFILES_BYTES

    (bundle / "profiles.json").write_bytes(_forged_profiles(bundle))
    assert hxc.runtime.select(read_manifest(bundle), hxc.runtime.probe_host()).best.artifact.id == "vulkan:spirv"
    one = len(json.loads(_forged_profiles(bundle))["profiles"])
    (bundle / "profiles.json").write_bytes(_forged_profiles(bundle, repeat=MAX_PROFILES // one + 1))  # one too many
    assert len((bundle / "profiles.json").read_bytes()) <= MAX_PROFILES_BYTES  # refused by count, not size
    caplog.clear()
    assert read_manifest(bundle).profiles == ()
    assert f"more than the {MAX_PROFILES} a bundle keeps" in caplog.text and len(caplog.records) == 1
    # Larger than the byte bound: refused by its size before any of it is parsed.
    with open(bundle / "profiles.json", "ab") as f:
        f.truncate(MAX_PROFILES_BYTES + 1)
    caplog.clear()
    assert read_manifest(bundle).profiles == ()
    assert f"more than the {MAX_PROFILES_BYTES}" in caplog.text
    model = hxc.runtime.load(bundle)
    assert model.artifact.id != "vulkan:spirv" and "profiles ignored" in model.explain()


def test_recording_profiles_keeps_the_newest_within_the_bounds(bundle, monkeypatch):
    import hxc.manifests.bundle as bundle_module
    from hxc.manifests.merge import add_profiles

    monkeypatch.setattr(bundle_module, "MAX_PROFILES", 3)
    (bundle / "profiles.json").write_bytes(_forged_profiles(bundle))
    forged = read_manifest(bundle)
    newest = [dataclasses.replace(p, recorded=f"2031-01-0{i + 1}T00:00:00+00:00") for i, p in enumerate(forged.profiles * 2)]
    bundle_module.update_manifest(bundle, lambda m: add_profiles(m, (), newest))
    kept = read_manifest(bundle).profiles
    assert kept == tuple(newest[-3:])


def test_recording_profiles_where_signed_ones_are_required_keeps_the_unsigned_ones(bundle, keys, cli, monkeypatch):
    from hxc.manifests.bundle import update_manifest
    from hxc.manifests.merge import add_profiles

    cli("sign", bundle, "--key", keys["ci"])
    (bundle / "profiles.json").write_bytes(_forged_profiles(bundle))
    unsigned = read_manifest(bundle).profiles
    monkeypatch.setenv("HXC_TRUSTED_KEYS", f"{keys['ci']}.pub")
    monkeypatch.setenv("HXC_REQUIRE_SIGNED_PROFILES", "1")
    assert read_manifest(bundle).profiles == ()  # not used for choosing...
    newer = [dataclasses.replace(p, recorded="2031-01-01T00:00:00+00:00") for p in unsigned]
    update_manifest(bundle, lambda m: add_profiles(m, (), newer))
    assert read_manifest(bundle, require_signed_profiles=False).profiles == (*unsigned, *newer)  # ...nor lost


def test_unsigned_profiles_can_be_refused_and_signed_ones_are_used(bundle, keys, cli):
    pub = f"{keys['ci']}.pub"
    cli("sign", bundle, "--key", keys["ci"])
    (bundle / "profiles.json").write_bytes(_forged_profiles(bundle))  # forged: vulkan "fastest"
    assert hxc.runtime.load(bundle, trusted_keys=[pub]).artifact.id == "vulkan:spirv"  # steered, signature and all
    # Required signed profiles: unsigned ones are ignored, and the explanation says so.
    model = hxc.runtime.load(bundle, trusted_keys=[pub], require_signed_profiles=True)
    assert model.artifact.id != "vulkan:spirv" and "profiles ignored (signed profiles are required)" in model.explain()
    shown = cli("select", bundle, "--trusted-keys", pub, "--require-signed-profiles", "--explain")
    assert shown.exit_code == 0 and "profiles ignored (signed profiles are required)" in shown.stdout
    assert "no profile; static order" in shown.stdout
    # Signed by a trusted key: used (the key vouches for them, forged or not).
    assert cli("sign", bundle, "--key", keys["ci"], "--profiles").exit_code == 0
    assert (bundle / "profiles.sig").is_file() and (bundle / "manifest.sig").is_file()
    model = hxc.runtime.load(bundle, trusted_keys=[pub], require_signed_profiles=True)
    assert model.artifact.id == "vulkan:spirv" and "profiles signed by trusted key" in model.explain()
    # Signed by another key, or changed after signing: ignored again.
    cli("sign", bundle, "--key", keys["stranger"], "--profiles")
    data = json.loads((bundle / "profiles.json").read_text())
    data["profiles"][0]["latency"]["p50_ms"] *= 2
    (bundle / "profiles.json").write_text(json.dumps(data))
    shown = cli("select", bundle, "--trusted-keys", pub, "--require-signed-profiles", "--explain")
    assert "profiles ignored" in shown.stdout and "changed after signing" in shown.stdout
    # Checking signed profiles needs keys to check them against.
    result = cli("select", bundle, "--require-signed-profiles")
    assert result.exit_code == ExitCode.USAGE and "trusted keys" in result.stderr


def test_an_archive_s_profiles_beside_it_are_signed_beside_it(bundle, keys, cli, tmp_path):
    pub = f"{keys['ci']}.pub"
    archive = tmp_path / "m.hxcb"
    cli("sign", bundle, "--key", keys["ci"])
    assert cli("pack", bundle, "-o", archive).exit_code == 0
    Path(f"{archive}.profiles.json").write_bytes(_forged_profiles(bundle))
    model = hxc.runtime.load(archive, trusted_keys=[pub], require_signed_profiles=True)
    assert model.artifact.id != "vulkan:spirv" and "not signed" in model.explain()
    before = archive.read_bytes()
    assert cli("sign", archive, "--key", keys["ci"], "--profiles").exit_code == 0
    assert archive.read_bytes() == before and Path(f"{archive}.profiles.sig").is_file()
    assert hxc.runtime.load(archive, trusted_keys=[pub], require_signed_profiles=True).artifact.id == "vulkan:spirv"
    # Packed with the bundle, profiles and their signature travel inside the archive.
    (bundle / "profiles.json").write_bytes(Path(f"{archive}.profiles.json").read_bytes())
    cli("sign", bundle, "--key", keys["ci"], "--profiles")
    packed = tmp_path / "packed.hxcb"
    assert cli("pack", bundle, "-o", packed).exit_code == 0
    with tarfile.open(packed) as t:
        assert {"profiles.json", "profiles.sig"} <= set(t.getnames())
    assert hxc.runtime.load(packed, trusted_keys=[pub], require_signed_profiles=True).artifact.id == "vulkan:spirv"


# --- trust settings fail closed; rollback; signature files' size -------------------------


def _serve(*args: object) -> subprocess.CompletedProcess:
    """`hxc serve` expected to refuse before it listens: in a child process, killed
    (and the test failed) if it serves instead."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "hxc.cli", "serve", *map(str, args), "--port", str(port), "--devices", "cpu"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("value", ["", ":", " "])
def test_trusted_keys_set_but_empty_fails_closed(bundle, cli, tmp_path, monkeypatch, value):
    monkeypatch.setenv("HXC_TRUSTED_KEYS", value)
    for command in (["inspect", bundle], ["select", bundle], ["run", bundle, "-i", bundle / "golden.npz"],
                    ["verify", bundle], ["bench", bundle, *QUICK], ["pack", bundle, "-o", tmp_path / "m.hxcb"],
                    ["doctor"]):  # fmt: skip
        result = cli(*command)
        assert result.exit_code == ExitCode.USAGE and "set but name no key" in result.stderr, command
    result = _serve(bundle)
    assert result.returncode == ExitCode.USAGE and "set but name no key" in result.stderr
    with pytest.raises(UsageError, match="set but name no key"):
        hxc.runtime.load(bundle)
    monkeypatch.delenv("HXC_TRUSTED_KEYS")
    result = cli("run", bundle, "-i", bundle / "golden.npz", "--trusted-keys", "")  # the same, given on the command line
    assert result.exit_code == ExitCode.USAGE and "set but name no key" in result.stderr


def test_a_sequence_number_refuses_older_bundles(bundle, keys, cli, tmp_path, monkeypatch):
    pub = f"{keys['ci']}.pub"
    older = Path(shutil.copytree(bundle, tmp_path / "older.hxc"))
    data = json.loads((older / "manifest.json").read_text())
    data["created"] = "2000-01-01T00:00:00+00:00"  # another build of the same model
    (older / "manifest.json").write_text(json.dumps(data))
    assert cli("sign", older, "--key", keys["ci"], "--sequence", "4").exit_code == 0
    signed = cli("sign", bundle, "--key", keys["ci"], "--sequence", "5", "--json")
    assert json.loads(signed.stdout)["sequence"] == 5
    shown = json.loads(cli("inspect", bundle, "--trusted-keys", pub, "--json").stdout)
    assert shown["signature_sequence"] == 5
    assert cli("verify", bundle, "--trusted-keys", pub, "--min-sequence", "5").exit_code == 0
    # The older bundle put in place of the newer: still validly signed by the same key.
    shutil.rmtree(bundle)
    shutil.copytree(older, bundle)
    assert cli("verify", bundle, "--trusted-keys", pub).exit_code == 0  # without a minimum nothing tells them apart
    for command in (["verify", bundle], ["run", bundle, "-i", bundle / "golden.npz"], ["select", bundle]):
        result = cli(*command, "--trusted-keys", pub, "--min-sequence", "5")
        assert result.exit_code == ExitCode.INTEGRITY, (command, result.stderr)
        assert "sequence 4, below the minimum 5" in result.stderr and "Traceback" not in result.stderr
    result = _serve(bundle, "--trusted-keys", pub, "--min-sequence", "5")
    assert result.returncode == ExitCode.INTEGRITY and "below the minimum 5" in result.stderr
    with pytest.raises(UntrustedBundleError, match="below the minimum 5"):
        hxc.runtime.load(bundle, trusted_keys=[pub], min_sequence=5)
    monkeypatch.setenv("HXC_MIN_SEQUENCE", "5")  # a host-wide setting, which worker processes inherit
    monkeypatch.setenv("HXC_TRUSTED_KEYS", pub)
    with pytest.raises(UntrustedBundleError, match="below the minimum 5"):
        hxc.runtime.load(bundle)
    assert cli("run", bundle, "-i", bundle / "golden.npz").exit_code == ExitCode.INTEGRITY
    monkeypatch.setenv("HXC_MIN_SEQUENCE", "five")
    assert cli("inspect", bundle).exit_code == ExitCode.USAGE  # set but unreadable: fails closed
    monkeypatch.delenv("HXC_MIN_SEQUENCE")
    # The number is signed: raising it in manifest.sig breaks the signature.
    doc = json.loads((bundle / "manifest.sig").read_text())
    doc["signatures"][0]["sequence"] = 9
    (bundle / "manifest.sig").write_text(json.dumps(doc))
    result = cli("verify", bundle, "--min-sequence", "5")
    assert result.exit_code == ExitCode.INTEGRITY and "is invalid (forged or damaged)" in result.stderr
    # A signature without a number does not meet any minimum; with no number asked for,
    # it is written as before (version 1, which older hxc reads).
    cli("sign", bundle, "--key", keys["ci"])
    assert json.loads((bundle / "manifest.sig").read_text())["version"] == 1
    result = cli("verify", bundle, "--min-sequence", "0")
    assert result.exit_code == ExitCode.INTEGRITY and "no sequence number" in result.stderr


def test_an_oversized_signature_file_is_refused_before_it_is_read(bundle, keys, cli, tmp_path):
    pub = f"{keys['ci']}.pub"
    cli("sign", bundle, "--key", keys["ci"])
    with open(bundle / "manifest.sig", "ab") as f:
        f.truncate(300 * 1024 * 1024)  # sparse: costs no disk
    for command in (["verify", bundle], ["run", bundle, "-i", bundle / "golden.npz"], ["inspect", bundle]):
        result = cli(*command, "--trusted-keys", pub)
        assert result.exit_code == ExitCode.INTEGRITY and "refusing the signature file" in result.stderr, command
    with pytest.raises(UntrustedBundleError, match="314572800 bytes"):
        hxc.runtime.load(bundle, trusted_keys=[pub])


def test_pool_workers_are_handed_the_trusted_keys_not_the_environment(bundle, keys, cli, monkeypatch):
    """A worker process checks the bundle with the keys its parent gives it in its load
    options; what its environment says (inherited from the parent) does not decide."""
    from hxc.manifests.signing import TrustPolicy
    from hxc.pool import Backoff, Health, Worker
    from hxc.pool.workers import Workers, load_options

    cli("sign", bundle, "--key", keys["ci"])
    signature = read_manifest(bundle, trusted_keys=False).signature
    expected = hxc.runtime.load(bundle, device="cpu:host")(_x())
    # The environment names the wrong key: explicit keys win, in the worker too.
    monkeypatch.setenv("HXC_TRUSTED_KEYS", f"{keys['stranger']}.pub")
    with Workers(bundle, "cpu", trust=TrustPolicy(f"{keys['ci']}.pub")) as workers:
        (member,) = workers.members
        assert member.worker.health == Health.READY
        np.testing.assert_allclose(member.worker.run([_x()], timeout=60)[0], expected, rtol=1e-6)
    monkeypatch.delenv("HXC_TRUSTED_KEYS")
    wrong = Worker(bundle, "cpu:host", "cpu", signature, backoff=Backoff(None),
                   load_options=load_options(TrustPolicy(f"{keys['stranger']}.pub")))  # fmt: skip
    with wrong:
        assert not wrong.wait_ready(60)
        assert wrong.health == Health.UNHEALTHY and "no trusted signature" in (wrong.reason or "")
        assert wrong.load_exit_code == ExitCode.INTEGRITY
    with pytest.raises(UntrustedBundleError, match="no trusted signature"):
        Workers(bundle, "cpu", trust=TrustPolicy(f"{keys['stranger']}.pub"))  # refused before any process starts


def test_trust_options_never_change_the_environment(bundle, keys, cli, monkeypatch, tmp_path):
    monkeypatch.delenv("HXC_TRUSTED_KEYS", raising=False)
    cli("sign", bundle, "--key", keys["ci"])
    np.save(tmp_path / "x.npy", _x())
    result = cli("run", bundle, "-i", tmp_path / "x.npy", "--trusted-keys", f"{keys['ci']}.pub", "--devices", "cpu")
    assert result.exit_code == 0, result.stderr
    assert "HXC_TRUSTED_KEYS" not in os.environ
    result = cli("run", bundle, "-i", tmp_path / "x.npy", "--trusted-keys", f"{keys['stranger']}.pub", "--devices", "cpu")
    assert result.exit_code == ExitCode.INTEGRITY and "no trusted signature" in result.stderr
    monkeypatch.setenv("HXC_TRUSTED_KEYS", "")
    result = cli("inspect", bundle)
    assert result.exit_code == ExitCode.USAGE and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "set but name no key" in result.stderr and "Traceback" not in result.stderr

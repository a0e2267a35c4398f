"""Trust nothing a file says: model files that would run code, bundles whose manifest
points outside themselves or whose files were swapped, archive bombs, and corrupt
cache entries. Each case is an attack reproduced against the real compiler, runtime
and PyTorch, and must end in a one-line error with its documented exit code."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

import hxc.runtime
import hxc.verify
from hxc.build import build_bundle
from hxc.errors import ExitCode, IntegrityError
from hxc.manifests import read_manifest, write_manifest
from hxc.manifests.bundle import file_hash
from hxc.manifests.schema import to_json


class _RunsCode:
    """Unpickling this runs a shell command: the marker file proves whether it ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rewrite_zip(src: Path, dst: Path, change) -> None:
    """Copy a zip, letting `change(name, data)` return new bytes (or None to drop it);
    `change(None, None)` may return extra (name, data, compress_type) entries."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data, compress_type=zipfile.ZIP_STORED)
        for name, data, ctype in change(None, None) or ():
            zout.writestr(name, data, compress_type=ctype)


@pytest.fixture
def pt2(models: dict[str, Path]) -> Path:
    return models["pt2"]


def _with_pickled_weight(src: Path, dst: Path, marker: Path) -> Path:
    """A .pt2 whose first weight is marked `use_pickle` and holds a code-running pickle,
    exactly what torch.export.load hands to torch.load(weights_only=False)."""

    def change(name, data):
        if name is None:
            return ()
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            return json.dumps(config).encode()
        if name.endswith("data/weights/weight_0"):
            return pickle.dumps(_RunsCode(marker))
        return data

    _rewrite_zip(src, dst, change)
    return dst


def test_a_pt2_with_a_pickled_weight_is_refused_without_allow_pickle(pt2, tmp_path, cli):
    marker = tmp_path / "ran"
    evil = _with_pickled_weight(pt2, tmp_path / "evil.pt2", marker)
    result = cli("compile", evil, "-t", "cpu:host", "-o", tmp_path / "out.hxc")
    assert result.exit_code == ExitCode.USAGE
    assert "would run code from the file" in result.stderr and "--allow-pickle" in result.stderr
    assert "Traceback" not in result.stderr and not marker.exists() and not (tmp_path / "out.hxc").exists()
    # The opt-in is what it says: the user accepts that the file's code runs.
    cli("compile", evil, "-t", "cpu:host", "-o", tmp_path / "out.hxc", "--allow-pickle")
    assert marker.exists()


def test_a_pt2_whose_sample_inputs_would_fall_back_to_unsafe_unpickling_is_refused(pt2, tmp_path, cli):
    # torch retries a failed weights-only load of the sample inputs with
    # weights_only=False; nothing in the archive's configs shows it, so only the
    # guard around the load stops it.
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt2"
    _rewrite_zip(pt2, evil, lambda n, d: () if n is None else (pickle.dumps(_RunsCode(marker)) if n.endswith("sample_inputs/model.pt") else d))
    result = cli("compile", evil, "-t", "cpu:host", "-o", tmp_path / "out.hxc")
    assert result.exit_code == ExitCode.USAGE and "--allow-pickle" in result.stderr
    assert not marker.exists()


def test_a_pt2_carrying_compiled_code_is_refused(pt2, tmp_path, cli):
    # torch.export.load dlopens AOTInductor libraries found in the archive.
    evil = tmp_path / "evil.pt2"
    root = zipfile.ZipFile(pt2).namelist()[0].split("/")[0]
    _rewrite_zip(pt2, evil, lambda n, d: [(f"{root}/data/aotinductor/model/model.so", b"\x7fELF", zipfile.ZIP_STORED)] if n is None else d)
    result = cli("compile", evil, "-t", "cpu:host", "-o", tmp_path / "out.hxc")
    assert result.exit_code == ExitCode.USAGE and "data/aotinductor/model/model.so" in result.stderr


def test_archive_bombs_are_refused_before_anything_is_inflated(pt2, tmp_path, cli):
    cache = tmp_path / "cache"
    # A weight that inflates 1000x from a deflated entry.
    bomb = tmp_path / "bomb.pt2"
    zeros = bytes(64 * 1024 * 1024)
    _rewrite_zip(pt2, bomb, lambda n, d: () if n is None else d)
    with zipfile.ZipFile(bomb, "a") as z:
        z.writestr(z.namelist()[0].split("/")[0] + "/data/weights/weight_99", zeros, compress_type=zipfile.ZIP_DEFLATED)
    result = cli("compile", bomb, "-t", "cpu:host", "-o", tmp_path / "out.hxc", "--cache-dir", cache)
    assert result.exit_code == ExitCode.ERROR and "decompression bomb" in result.stderr

    # A weight declared as a 16 GiB stride-0 view over 4 bytes of storage.
    def huge(name, data):
        if name is None:
            return ()
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            meta = next(iter(config["config"].values()))["tensor_meta"]
            meta["sizes"] = [{"as_int": 65536}, {"as_int": 65536}]
            meta["strides"] = [{"as_int": 0}, {"as_int": 0}]
            return json.dumps(config).encode()
        return data

    expanding = tmp_path / "expanding.pt2"
    _rewrite_zip(pt2, expanding, huge)
    result = cli("compile", expanding, "-t", "cpu:host", "-o", tmp_path / "out.hxc", "--cache-dir", cache)
    assert result.exit_code == ExitCode.ERROR and "expands that far" in result.stderr
    assert not (tmp_path / "out.hxc").exists() and not any(p.is_file() for p in cache.rglob("*"))


def test_the_size_limit_is_configurable_and_named(pt2, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("HXC_MAX_MODEL_BYTES", "1000")
    result = cli("compile", pt2, "-t", "cpu:host", "-o", tmp_path / "out.hxc", "--no-cache")
    assert result.exit_code == ExitCode.ERROR and "HXC_MAX_MODEL_BYTES" in result.stderr


def _point_artifact_at(bundle: Path, artifact_id: str, rel: str, files: dict | None = None) -> None:
    m = read_manifest(bundle)
    art = m.artifact(artifact_id)
    arts = tuple(dataclasses.replace(a, file=rel) if a.id == artifact_id else a for a in m.artifacts)
    new_files = {(rel if k == art.file else k): v for k, v in m.files.items()} if files is None else files
    data = json.loads((bundle / "manifest.json").read_text())
    data["artifacts"] = to_json(arts)
    data["files"] = to_json(new_files)
    (bundle / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize("rel", ["../outside.vmfb", "/tmp/outside.vmfb", "artifacts/../../outside.vmfb", "artifacts/./x.vmfb"])
def test_manifest_paths_that_leave_the_bundle_are_refused(bundle, rel, cli):
    outside = bundle.parent / "outside.vmfb"
    shutil.copyfile(bundle / read_manifest(bundle).artifact("cpu:host").file, outside)
    _point_artifact_at(bundle, "cpu:host", rel)
    with pytest.raises(IntegrityError, match="leaves the bundle|not normalised"):
        hxc.runtime.load(bundle)
    result = cli("verify", bundle)
    assert result.exit_code == ExitCode.INTEGRITY and "Traceback" not in result.stderr


def test_symlinks_inside_the_bundle_are_not_followed(bundle, cli):
    m = read_manifest(bundle)
    target = bundle / m.artifact("cpu:host").file
    outside = bundle.parent / "outside.vmfb"
    shutil.move(target, outside)
    target.symlink_to(outside)  # same bytes, same hash: only the link gives it away
    with pytest.raises(IntegrityError, match="symbolic link"):
        hxc.runtime.load(bundle, device="cpu:host", strict=True)
    # A linked directory on the way is refused as well.
    shutil.move(bundle / "artifacts", bundle.parent / "real-artifacts")
    (bundle / "artifacts").symlink_to(bundle.parent / "real-artifacts")
    result = cli("verify", bundle)
    assert result.exit_code == ExitCode.INTEGRITY and "refusing to follow it" in result.stderr


def test_missing_hashes_and_nulls_are_integrity_errors_not_tracebacks(bundle, cli):
    data = json.loads((bundle / "manifest.json").read_text())
    del data["files"]["program.pt2"]
    (bundle / "manifest.json").write_text(json.dumps(data))
    result = cli("inspect", bundle)
    assert result.exit_code == ExitCode.INTEGRITY and "program.pt2) has no recorded sha256" in result.stderr
    data["files"] = {}
    data["artifacts"][0]["sha256"] = None
    (bundle / "manifest.json").write_text(json.dumps(data))
    result = cli("run", bundle, "-i", bundle / "golden.npz")
    assert result.exit_code == ExitCode.ERROR and "names no file or sha256" in result.stderr


def test_a_swapped_program_never_runs_in_bench(bundle, tmp_path, cli, models):
    # hxc bench rebuilds its PyTorch baseline from program.pt2: a replaced one (even a
    # valid archive) is refused by its hash before torch opens it.
    marker = tmp_path / "ran"
    _with_pickled_weight(models["pt2"], tmp_path / "evil.pt2", marker)
    shutil.copyfile(tmp_path / "evil.pt2", bundle / "program.pt2")
    result = cli("bench", bundle, "--min-time", "0.01", "--min-iterations", "2", "--device", "cpu:host")
    assert result.exit_code == ExitCode.INTEGRITY and "program.pt2" in result.stderr and not marker.exists()
    # Even with its hash recorded (a forged manifest), the pickle is not unpickled.
    m = read_manifest(bundle)
    write_manifest(bundle, dataclasses.replace(m, files={**m.files, "program.pt2": file_hash(bundle / "program.pt2")}))
    result = cli("bench", bundle, "--min-time", "0.01", "--min-iterations", "2", "--device", "cpu:host")
    assert result.exit_code == ExitCode.USAGE and "--allow-pickle" in result.stderr and not marker.exists()


def test_verify_checks_artifacts_this_host_cannot_run(bundle, cli):
    target = bundle / read_manifest(bundle).artifact("cpu:aarch64").file
    data = bytearray(target.read_bytes())
    data[100] ^= 1
    target.write_bytes(bytes(data))
    result = cli("verify", bundle, "--json")
    out = json.loads(result.stdout)
    assert result.exit_code == ExitCode.INTEGRITY and out["exit_code"] == 5
    assert any("cpu-aarch64.vmfb" in p for p in out["integrity"])
    assert all(r["ok"] for r in out["results"])  # what this host runs was still checked


def test_the_loaded_code_is_the_checked_code(bundle):
    """The loader maps the bytes it hashed: a file swapped by rename afterwards is not
    what runs; with a private copy, not even writes into the same file reach it."""
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
    m = read_manifest(bundle)
    path = bundle / m.artifact("cpu:host").file
    want = hxc.runtime.load(bundle, device="cpu:host")(x)
    mapped = hxc.runtime.load(bundle, device="cpu:host", strict=True)
    private = hxc.runtime.load(bundle, device="cpu:host", strict=True, private_copy=True)
    swapped = path.with_suffix(".new")
    swapped.write_bytes(b"\0" * path.stat().st_size)
    os.replace(swapped, path)
    np.testing.assert_array_equal(mapped(x), want)
    with open(path, "r+b") as f:  # in place, into the file the private copy came from
        f.write(b"\xff" * 4096)
    np.testing.assert_array_equal(private(x), want)
    with pytest.raises(IntegrityError):
        hxc.runtime.load(bundle, device="cpu:host", strict=True)


def test_corrupt_cache_entries_are_discarded_and_redone(models, tmp_path, caplog):
    cache = tmp_path / "cache"
    first = build_bundle(str(models["pt2"]), tmp_path / "a.hxc", "cpu:host", cache_dir=cache)
    for vmfb in (cache / "compile").rglob("*.vmfb"):
        data = bytearray(vmfb.read_bytes())
        data[len(data) // 2] ^= 0xFF
        vmfb.write_bytes(bytes(data))
    for ir in (cache / "import").rglob("ir"):
        ir.write_bytes(ir.read_bytes()[:-10])
    again = build_bundle(str(models["pt2"]), tmp_path / "b.hxc", "cpu:host", cache_dir=cache)
    assert "discarding a corrupt compile-cache entry" in caplog.text
    assert "discarding a corrupt import-cache entry" in caplog.text
    assert not again.results[0].cached
    assert again.manifest.artifacts[0].sha256 == first.manifest.artifacts[0].sha256
    assert hxc.verify.verify_bundle(tmp_path / "b.hxc").ok


def test_bad_array_files_are_one_line_usage_errors(example_bundle, tmp_path, cli):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)})
    (tmp_path / "huge.npy").write_bytes(header.getvalue() + b"\0" * 64)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "trunc.npz").write_bytes(b"PK\x03\x04garbage")
    for name, words in [("huge.npy", "limit"), ("obj.npy", "Python objects"), ("trunc.npz", "not a valid .npz")]:
        result = cli("run", example_bundle, "-i", tmp_path / name)
        assert result.exit_code == ExitCode.USAGE, result.stderr
        assert words in result.stderr and "Traceback" not in result.stderr

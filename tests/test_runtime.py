"""The runtime loader on this machine's real devices: llvm-cpu code on local-task and
SPIR-V on the Vulkan device (Mesa's lavapipe where there is no GPU). Choices between
hardware are tested on described hosts in test_select.py; these tests hold on any host,
with or without a GPU."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import shutil

from pathlib import Path

import numpy as np
import pytest
import torch

import hxc.runtime
from hxc.errors import BundleError, ExitCode, HxcError, IntegrityError, NoCompatibleArtifactError, SignatureError
from hxc.manifests.schema import SCHEMA_VERSION
from hxc.examples import convnet
from hxc.manifests import read_manifest, update_manifest, write_manifest
from hxc.manifests.bundle import file_hash
from hxc.manifests.schema import LatencyStats, Profile
from hxc.runtime import probe_host, select


def _reference(x: torch.Tensor) -> torch.Tensor:
    model, _ = convnet()
    with torch.no_grad():
        return model(x)


def test_probe_finds_the_real_devices_and_reports_missing_drivers():
    probe = probe_host()
    assert probe is probe_host()  # once per process
    drivers = {s.name: s for s in probe.drivers}
    # The suite needs a CPU and a Vulkan device (lavapipe, where there is no GPU).
    assert drivers["local-task"].available and drivers["vulkan"].available
    [cpu] = drivers["local-task"].devices
    assert cpu.kind == "cpu" and cpu.arch == probe.cpu.isa and cpu.features == probe.cpu.features
    for vk in drivers["vulkan"].devices:
        assert vk.uri.startswith("vulkan") and vk.kind in ("cpu", "integrated-gpu", "discrete-gpu", "virtual-gpu", "other")
        if "llvmpipe" in vk.name:
            assert vk.kind == "cpu"  # lavapipe says what it is, so it ranks after native CPU code
    for status in probe.drivers:
        assert status.available == bool(status.devices)
        assert status.available or status.reason  # an absent driver is reported with its reason, never raised


def test_every_artifact_is_ranked_or_rejected_with_a_reason_here(example_bundle):
    m = read_manifest(example_bundle)
    probe = probe_host()
    sel = select(m, probe)
    assert sorted([c.artifact.id for c in sel.candidates] + [r.artifact.id for r in sel.rejected]) == sorted(
        a.id for a in m.artifacts
    )
    assert all(r.reason for r in sel.rejected)
    cpus = [c.artifact.id for c in sel.candidates if c.artifact.family == "cpu"]
    assert cpus[:2] == ["cpu:host", "cpu:x86-64-v3"]  # compiled here: the host's own code first
    lavapipe = [c for c in sel.candidates if c.device.driver == "vulkan" and c.device.kind == "cpu"]
    if lavapipe:
        assert sel.candidates.index(lavapipe[0]) > sel.candidates.index(next(c for c in sel.candidates if c.artifact.id == "cpu:host"))
    if not probe.driver("cuda").available:
        assert "cuda driver unavailable" in {r.artifact.id: r.reason for r in sel.rejected}["cuda:sm_90"]


@pytest.mark.parametrize("device, driver", [("vulkan", "vulkan"), ("cpu", "local-task"), ("local-sync", "local-sync")])
def test_forcing_a_device_and_matching_pytorch_on_it(example_bundle, device, driver):
    model = hxc.runtime.load(example_bundle, device=device, strict=True)
    assert model.device.driver == driver
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model(x), _reference(x), atol=1e-4, rtol=1e-3)


def test_env_var_forces_the_device(example_bundle, monkeypatch):
    monkeypatch.setenv("HXC_DEVICE", "vulkan")
    assert hxc.runtime.load(example_bundle).device.driver == "vulkan"


def test_strict_raises_where_fallback_explains(example_bundle, caplog):
    # This host as the loader sees it, minus any GPU: a request for CUDA cannot be honoured.
    probe = dataclasses.replace(probe_host(), drivers=tuple(
        dataclasses.replace(s, available=False, reason="no GPU", devices=()) if s.family in ("cuda", "rocm", "vulkan") else s
        for s in probe_host().drivers))  # fmt: skip
    with pytest.raises(NoCompatibleArtifactError, match="requested device 'cuda'"):
        hxc.runtime.load(example_bundle, device="cuda", strict=True, probe=probe)
    with caplog.at_level(logging.WARNING, logger="hxc.runtime"):
        model = hxc.runtime.load(example_bundle, device="cuda", probe=probe)
    assert model.artifact.id == "cpu:host"
    assert "requested device 'cuda' is not usable" in model.explain()
    assert any("not usable" in r.message for r in caplog.records)


def _profile(m, artifact_id: str, device_label: str, p50: float) -> Profile:
    art = m.artifact(artifact_id)
    stats = LatencyStats(p50, p50 * 1.1, p50 * 1.2, p50, 0.01, p50 * 0.9, 50)
    return Profile(probe_host().host().id, art.id, art.sha256, device_label, "single-stream", 1, stats, 1000 / p50,
                   1000 / p50, None, None, None, True, datetime.datetime.now(datetime.UTC).isoformat())  # fmt: skip


@pytest.mark.parametrize("faster", ["vulkan:spirv", "cpu:host"])
def test_recorded_profiles_decide_the_choice(bundle, faster):
    labels = {d.driver: d.label for d in probe_host().devices}
    m = read_manifest(bundle)
    slow, fast = 5.0, 1.0
    profiles = (
        _profile(m, "vulkan:spirv", labels["vulkan"], fast if faster == "vulkan:spirv" else slow),
        _profile(m, "cpu:host", labels["local-task"], fast if faster == "cpu:host" else slow),
    )
    update_manifest(bundle, lambda m: dataclasses.replace(m, profiles=profiles, hosts=(probe_host().host(),)))
    model = hxc.runtime.load(bundle)
    assert model.artifact.id == faster
    assert "measured on this host: p50 1 ms" in model.explain()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model(x), _reference(x), atol=1e-4, rtol=1e-3)


def test_tampered_artifact_is_refused_and_never_run(bundle, cli):
    target = bundle / read_manifest(bundle).artifact("cpu:host").file
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match the manifest"):
        hxc.runtime.load(bundle, device="cpu")
    np.save(bundle.parent / "x.npy", np.zeros((1, 3, 32, 32), np.float32))
    result = cli("run", bundle, "--input", bundle.parent / "x.npy", "--device", "cpu")
    assert result.exit_code == ExitCode.INTEGRITY and "refusing to use it" in result.stderr


def test_an_artifact_that_fails_to_load_falls_through_to_the_next(bundle):
    # Put SPIR-V where the CPU code should be (manifest hash updated, so integrity
    # holds): local-task cannot create it, and the loader moves on, saying why.
    m = read_manifest(bundle)
    cpu, vk = m.artifact("cpu:host"), m.artifact("vulkan:spirv")
    shutil.copyfile(bundle / vk.file, bundle / cpu.file)
    arts = tuple(dataclasses.replace(a, sha256=vk.sha256, size=vk.size) if a.id == "cpu:host" else a for a in m.artifacts)
    write_manifest(bundle, dataclasses.replace(m, artifacts=arts, files={**m.files, cpu.file: m.files[vk.file]}))
    model = hxc.runtime.load(bundle, device="cpu")
    assert model.artifact.id == "cpu:x86-64-v3"
    assert model.attempts[0].artifact == "cpu:host" and "failed to load" in model.explain()
    with pytest.raises(HxcError, match=r"cpu:host on local-task: .* failed to load"):
        hxc.runtime.load(bundle, device="cpu", strict=True)


def test_newer_schema_is_refused_clearly(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    newer = SCHEMA_VERSION[0] + 1
    manifest["schema_version"] = f"{newer}.0"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=rf"schema {newer}\.0 is newer than this hxc reads.*upgrade hxc"):
        hxc.runtime.load(bundle)
    # A bundle from before every file was hashed is refused too, with what to do about it.
    manifest["schema_version"] = "1.0"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"schema 1\.0 predates per-file hashes.*rebuild it with `hxc compile`"):
        hxc.runtime.load(bundle)


@pytest.mark.parametrize(
    "inputs, fragment",
    [
        ((np.zeros((2, 3, 32, 32), np.float32),), "has shape 2x3x32x32; expected 1x3x32x32xf32"),
        ((np.zeros((1, 3, 32, 32), np.float16),), "has dtype f16; expected 1x3x32x32xf32"),
        ((), "expected 1 input(s) (x: 1x3x32x32xf32), got 0"),
    ],
)
def test_inputs_are_checked_against_the_signature(example_bundle, inputs, fragment):
    model = hxc.runtime.load(example_bundle)
    with pytest.raises(SignatureError) as e:
        model(*inputs)
    assert fragment in str(e.value)


@pytest.mark.parametrize("device", ["cpu", "vulkan"])
def test_returns_the_kind_it_was_given(example_bundle, device):
    model = hxc.runtime.load(example_bundle, device=device)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
    out = model(x)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, _reference(torch.from_numpy(x)).numpy(), atol=1e-4, rtol=1e-3)
    assert isinstance(model(torch.from_numpy(x)), torch.Tensor)


def test_run_verify_select_and_doctor_commands(example_bundle, cli, tmp_path):
    x = torch.randn(1, 3, 32, 32)
    np.save(tmp_path / "x.npy", x.numpy())
    result = cli("run", example_bundle, "--input", tmp_path / "x.npy", "--device", "vulkan", "-o", tmp_path / "y.npz")
    assert result.exit_code == 0 and "vulkan:spirv" in result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["output_0"], _reference(x).numpy(), atol=1e-4, rtol=1e-3)

    verified = json.loads(cli("verify", example_bundle, "--json").stdout)
    assert verified["ok"]
    assert {r["artifact"] for r in verified["results"]} >= {"cpu:host", "cpu:x86-64-v3", "vulkan:spirv"}
    assert all(r["max_abs"] < 1e-4 for r in verified["results"])

    explained = cli("select", example_bundle, "--explain", "--device", "cpu")
    assert explained.exit_code == 0 and "-> #1 cpu:host" in explained.stdout and "x  cpu:aarch64" in explained.stdout

    doctor = json.loads(cli("doctor", "--json").stdout)
    assert {d["name"] for d in doctor["drivers"] if d["available"]} >= {"local-task", "vulkan"}

    bad = cli("run", example_bundle, "--input", tmp_path / "missing.npy")
    assert bad.exit_code == ExitCode.USAGE and "no such input file" in bad.stderr


def test_verify_reports_a_mismatch(bundle, cli):
    golden = dict(np.load(bundle / "golden.npz"))
    golden["output_0"] = golden["output_0"] + 1.0
    np.savez(bundle / "golden.npz", **golden)
    result = cli("verify", bundle)
    assert result.exit_code == ExitCode.INTEGRITY and "golden.npz: sha256" in result.stderr
    # With the manifest agreeing (a wrong reference, not tampering), it is a numerical mismatch.
    m = read_manifest(bundle)
    write_manifest(bundle, dataclasses.replace(m, files={**m.files, "golden.npz": file_hash(bundle / "golden.npz")}))
    result = cli("verify", bundle)
    assert result.exit_code == ExitCode.MISMATCH and "MISMATCH" in result.stdout


def _strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as most JSON parsers outside Python do."""

    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_json_output_stays_valid_json_on_nan_and_infinite_results(bundle, cli, tmp_path):
    # A NaN input gives NaN outputs; an infinite golden output gives an infinite error.
    x = np.zeros((1, 3, 32, 32), np.float32)
    x[0, 0, 0, 0] = np.nan
    np.save(tmp_path / "x.npy", x)
    ran = cli("run", bundle, "--input", tmp_path / "x.npy", "--device", "cpu", "--json")
    assert ran.exit_code == 0
    [out] = _strict_json(ran.stdout)["outputs"]
    assert out["nonfinite"] == 10 and out["values"] == [None] * 10

    golden = dict(np.load(bundle / "golden.npz"))
    golden["output_0"][0, 0] = np.inf
    np.savez(bundle / "golden.npz", **golden)
    m = read_manifest(bundle)  # a wrong reference, not tampering: the manifest agrees
    write_manifest(bundle, dataclasses.replace(m, files={**m.files, "golden.npz": file_hash(bundle / "golden.npz")}))
    verified = cli("verify", bundle, "--device", "cpu", "--json")
    assert verified.exit_code == ExitCode.MISMATCH
    results = _strict_json(verified.stdout)["results"]
    assert results and all(r["ok"] is False and r["nonfinite"] and r["max_abs"] is None for r in results)


# --- hxc verify at other sizes (--shapes) and on other inputs (--example) -----------------


@pytest.fixture(scope="module")
def dynamic_bundle(models, tmp_path_factory) -> Path:
    """The test CNN with a dynamic batch (1..64), for the CPU."""
    from hxc.build import build_bundle

    out = tmp_path_factory.mktemp("dyn") / "net-dynamic.hxc"
    assert build_bundle(str(models["pt2_dynamic"]), out, "cpu:host").written
    return out


def test_verify_checks_generated_inputs_at_other_shapes_against_pytorch(dynamic_bundle, reference, cli):
    checked = cli("verify", dynamic_bundle, "--shapes", "x=5x3x8x8", "--shapes", "33x3x8x8", "--json")
    assert checked.exit_code == 0, checked.stdout + checked.stderr
    results = json.loads(checked.stdout)["results"]
    assert [(r["artifact"], r["sample"]) for r in results] == [("cpu:host", s) for s in ("golden", "x=5x3x8x8", "33x3x8x8")]
    assert all(r["ok"] and r["max_abs"] < 1e-4 for r in results)
    # The generated inputs really have those shapes, and the reference is PyTorch on them.
    from hxc.verify import shaped_sample

    sample = shaped_sample(read_manifest(dynamic_bundle).signature, "x=5x3x8x8")
    assert sample.inputs[0].shape == (5, 3, 8, 8) and sample.expected is None
    table = cli("verify", dynamic_bundle, "--shapes", "x=5x3x8x8")
    assert table.exit_code == 0 and "x=5x3x8x8" in table.stdout and "inputs" in table.stdout


def test_verify_example_files_with_and_without_expected_outputs(dynamic_bundle, reference, cli, tmp_path):
    model, _ = reference.make_model()
    x = np.random.default_rng(3).standard_normal((7, 3, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "inputs.npz", x=x)  # PyTorch computes what to expect
    with torch.no_grad():
        y = model(torch.from_numpy(x)).numpy()
    np.savez(tmp_path / "right.npz", x=x, output_0=y)
    np.savez(tmp_path / "wrong.npz", x=x, output_0=y + 1)  # expected outputs win over the reference
    good = cli("verify", dynamic_bundle, "--example", tmp_path / "inputs.npz", "--example", tmp_path / "right.npz", "--json")
    assert good.exit_code == 0, good.stdout + good.stderr
    assert [r["sample"] for r in json.loads(good.stdout)["results"]] == ["golden", str(tmp_path / "inputs.npz"),
                                                                         str(tmp_path / "right.npz")]  # fmt: skip
    bad = cli("verify", dynamic_bundle, "--example", tmp_path / "wrong.npz", "--json")
    assert bad.exit_code == ExitCode.MISMATCH
    assert [r["ok"] for r in json.loads(bad.stdout)["results"]] == [True, False]


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("y=5x3x8x8", "no input 'y'"),
        ("x=5x3x9x8", "only its dynamic dimensions can change"),
        ("x=5x3x8", "has 4 dimensions"),
        ("x=5xAx8x8", "is not a shape"),
        ("x=0x3x8x8", "is not a shape"),
        ("x=5x3x8x8,5x3x8x8", "no input 1"),
    ],
)  # fmt: skip
def test_verify_refuses_bad_shapes_in_one_line(dynamic_bundle, cli, spec, fragment):
    result = cli("verify", dynamic_bundle, "--shapes", spec)
    assert result.exit_code == ExitCode.USAGE, result.stdout + result.stderr
    assert fragment in result.stderr and "Traceback" not in result.stderr


def test_verify_refuses_an_example_that_does_not_fit_the_signature(dynamic_bundle, cli, tmp_path):
    np.savez(tmp_path / "odd.npz", x=np.zeros((2, 3, 9, 8), np.float32))
    result = cli("verify", dynamic_bundle, "--example", tmp_path / "odd.npz")
    assert result.exit_code == ExitCode.USAGE and "odd.npz" in result.stderr and "Traceback" not in result.stderr

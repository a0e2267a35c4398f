"""`hxc compile` end to end: real models in, bundles out, artifacts that run and
match PyTorch; bad input refused with one line and nothing half-written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import hxc.runtime
from hxc.errors import ExitCode
from hxc.manifests import read_manifest
from hxc.manifests.bundle import staged_bundle
from hxc.targets.cuda import find_ptxas

ALL_FAMILIES = "cpu:host,cuda:sm_90,rocm:gfx942,vulkan:spirv"


def _source(fmt: str, models: dict[str, Path]) -> list[str]:
    return {
        "example": ["hxc.examples:convnet"],
        "pt2": [str(models["pt2"])],
        "torchscript": [str(models["torchscript"]), "--input", "2x3x8x8xf32"],
        "factory": [f"{models['factory']}:make_model"],
    }[fmt]


@pytest.mark.parametrize("fmt", ["example", "pt2", "torchscript", "factory"])
def test_compile_every_family_then_run_cpu_and_vulkan_against_pytorch(fmt, models, reference, cli, tmp_path):
    out = tmp_path / "b.hxc"
    result = cli("compile", *_source(fmt, models), "--targets", ALL_FAMILIES, "-o", out)
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert {a.family for a in manifest.ok_artifacts} == {"cpu", "cuda", "rocm", "vulkan"}

    if fmt == "example":
        from hxc.examples import convnet

        model, (x,) = convnet()
    else:
        model, (x,) = reference.make_model()
    x = torch.randn_like(x)  # fresh inputs, not the golden sample
    with torch.no_grad():
        want = model(x)
    for device in ("local-task", "vulkan"):
        loaded = hxc.runtime.load(out, device=device, strict=True)
        assert loaded.device.driver == device
        torch.testing.assert_close(loaded(x), want, atol=1e-4, rtol=1e-3)


def test_bundle_layout_and_manifest_records(example_bundle):
    m = read_manifest(example_bundle)
    assert m.schema_version == "6.0" and m.format == "hxc-bundle"
    assert list(m.functions) == ["main"] and m.stateless_main  # a plain model: one function, no state
    assert (example_bundle / "program.pt2").is_file() and (example_bundle / "golden.npz").is_file()
    # Every file written at build time has its sha256 and size recorded, and nothing else.
    on_disk = {str(p.relative_to(example_bundle)) for p in example_bundle.rglob("*") if p.is_file()}
    assert set(m.files) == on_disk - {"manifest.json", "profiles.json", ".lock"}
    for rel, h in m.files.items():
        data = (example_bundle / rel).read_bytes()
        assert h.sha256 == hashlib.sha256(data).hexdigest() and h.size == len(data)
    assert m.toolchain.iree_compiler == "3.13.0" and m.toolchain.torch.startswith("2.13.0")
    assert len(m.model.source_sha256) == 64 and len(m.model.ir_sha256) == 64
    assert [(s.name, s.dtype, s.shape) for s in m.signature.inputs] == [("x", "f32", (1, 3, 32, 32))]
    assert [(s.dtype, s.shape) for s in m.signature.outputs] == [("f32", (1, 10))]
    for a in m.artifacts:
        data = (example_bundle / a.file).read_bytes()
        assert a.status == "ok" and a.sha256 == hashlib.sha256(data).hexdigest() and a.size == len(data)
        assert a.flags and a.compile_seconds is not None and a.driver and a.backend
    cpu = m.artifact("cpu:x86-64-v3")
    assert "--iree-llvmcpu-target-cpu=x86-64-v3" in cpu.flags and "avx2" in cpu.requires.cpu_features
    assert m.artifact("cpu:aarch64").requires.isa == "aarch64"
    assert m.artifact("cuda:sm_90").requires.min_gpu_arch == "sm_90"
    golden = np.load(example_bundle / "golden.npz")
    assert set(golden.files) == {"input_0", "output_0"}


def test_json_summary_for_ci(cli, tmp_path):
    out = tmp_path / "m.hxc"
    result = cli("compile", "hxc.examples:mlp", "--targets", "cpu:x86-64-v3,vulkan", "-o", out, "--json")
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert summary["ok"] and summary["written"] and summary["bundle"] == str(out)
    assert [a["id"] for a in summary["artifacts"]] == ["cpu:x86-64-v3", "vulkan:spirv", "vulkan:desktop"]
    assert all(a["status"] == "ok" and len(a["sha256"]) == 64 for a in summary["artifacts"])


def test_rerun_hits_the_compile_cache(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HXC_CACHE_DIR", str(tmp_path / "cache"))
    args = ["compile", "hxc.examples:mlp", "--targets", "cpu:x86-64-v4,rocm:gfx90a", "--json", "-o", tmp_path / "a.hxc"]
    first = json.loads(cli(*args).stdout)
    second = json.loads(cli(*args).stdout)
    assert [a["cached"] for a in first["artifacts"]] == [False, False]
    assert [a["cached"] for a in second["artifacts"]] == [True, True]
    assert [a["sha256"] for a in first["artifacts"]] == [a["sha256"] for a in second["artifacts"]]
    third = json.loads(cli(*args, "--no-cache").stdout)
    assert [a["cached"] for a in third["artifacts"]] == [False, False]


def test_dynamic_batch_artifact_accepts_other_sizes(models, reference, cli, tmp_path):
    out = tmp_path / "dyn.hxc"
    result = cli("compile", f"{models['factory']}:make_model", "--dynamic-batch", "-t", "cpu:host,vulkan", "-o", out)
    assert result.exit_code == 0, result.output
    assert isinstance(read_manifest(out).signature.inputs[0].shape[0], str)
    model, _ = reference.make_model()
    for device in ("cpu", "vulkan"):
        loaded = hxc.runtime.load(out, device=device, strict=True)
        for batch in (1, 5):
            x = torch.randn(batch, 3, 8, 8)
            with torch.no_grad():
                torch.testing.assert_close(loaded(x), model(x), atol=1e-4, rtol=1e-3)


def test_structured_outputs_and_several_inputs(models, reference, cli, tmp_path):
    out = tmp_path / "heads.hxc"
    assert cli("compile", f"{models['factory']}:two_heads", "-t", "cpu:host", "-o", out).exit_code == 0
    model, (x, s) = reference.two_heads()
    got = hxc.runtime.load(out)(x, s)
    with torch.no_grad():
        want = model(x, s)
    assert set(got) == {"features", "logits"} and isinstance(got["logits"], tuple)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def _one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) >= 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize(
    "args, code, fragment",
    [
        (["nope.pt2"], ExitCode.ERROR, "no such file"),
        (["TRUNCATED"], ExitCode.ERROR, "corrupt or truncated archive"),
        (["GARBAGE"], ExitCode.ERROR, "not a model hxc can read"),
        (["PICKLE", "--input", "2x3x8x8xf32"], ExitCode.USAGE, "--allow-pickle"),
        (["PT2", "--targets", "cpu,cdua"], ExitCode.USAGE, "did you mean 'cuda'"),
        (["TORCHSCRIPT", "--input", "2x3x8xf32x8"], ExitCode.USAGE, "malformed --input"),
    ],
)
def test_bad_input_gives_one_line_and_writes_nothing(args, code, fragment, models, cli, tmp_path):
    subst = {"TRUNCATED": models["truncated"], "GARBAGE": models["garbage"], "PICKLE": models["pickle"],
             "PT2": models["pt2"], "TORCHSCRIPT": models["torchscript"]}  # fmt: skip
    args = [str(subst.get(a, a)) for a in args]
    result = cli("compile", *args, "-o", tmp_path / "out.hxc")
    assert result.exit_code == code
    assert fragment in _one_line_error(result)
    assert list(tmp_path.iterdir()) == []  # no bundle, no staging leftovers


def test_an_op_a_target_cannot_lower_names_target_and_operator(models, cli, tmp_path):
    # Integers beyond 32 bits: the portable Vulkan profile computes int64 in 32 bits,
    # so it refuses this model, naming the operator and its source; the CPU and the
    # desktop Vulkan variant (native int64) compile it.
    out = tmp_path / "div.hxc"
    result = cli("compile", f"{models['factory']}:int_mod", "-t", "cpu:host,vulkan", "-o", out)
    assert result.exit_code == ExitCode.PARTIAL
    line = _one_line_error(result)
    assert "vulkan:spirv" in line and "aten.mul" in line and "hxc_test_models.py" in line
    assert "--allow-partial" in result.stderr
    assert not out.exists()

    result = cli("compile", f"{models['factory']}:int_mod", "-t", "vulkan:spirv", "-o", out, "--json")
    assert result.exit_code == ExitCode.ERROR and not out.exists()
    [art] = json.loads(result.stdout)["artifacts"]
    assert art["status"] == "failed" and art["operator"] == "aten.mul"


def test_allow_partial_records_the_failure_in_the_bundle(models, reference, cli, tmp_path):
    out = tmp_path / "div.hxc"
    result = cli("compile", f"{models['factory']}:int_mod", "-t", "cpu:host,vulkan", "-o", out, "--allow-partial")
    assert result.exit_code == 0
    m = read_manifest(out)
    failed = m.artifact("vulkan:spirv")
    assert failed.status == "failed" and failed.file is None and "beyond 32 bits" in failed.error
    model, (x,) = reference.int_mod()
    np.testing.assert_array_equal(hxc.runtime.load(out)(x.numpy()), model(x).numpy())


def test_a_failed_compile_leaves_the_previous_bundle_intact(models, cli, tmp_path):
    out = tmp_path / "b.hxc"
    assert cli("compile", "hxc.examples:mlp", "-t", "cpu:host", "-o", out).exit_code == 0
    before = (out / "manifest.json").read_bytes()
    result = cli("compile", f"{models['factory']}:int_mod", "-t", "vulkan:spirv", "-o", out)
    assert result.exit_code != 0
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.hxc"]


def test_staging_is_discarded_on_any_exception(tmp_path):
    out = tmp_path / "x.hxc"
    with pytest.raises(KeyboardInterrupt):
        with staged_bundle(out) as stage:
            (stage / "manifest.json").write_text("{}")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_directory_that_is_not_a_bundle(cli, tmp_path):
    victim = tmp_path / "src"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    result = cli("compile", "hxc.examples:mlp", "-t", "cpu:host", "-o", victim)
    assert result.exit_code == ExitCode.ERROR and "not a bundle" in _one_line_error(result)
    assert (victim / "precious.txt").read_text() == "keep me"


def test_inspect_shows_the_manifest(example_bundle, cli):
    table = cli("inspect", example_bundle)
    assert table.exit_code == 0
    for text in ("convnet", "cuda:sm_90", "rocm:gfx942", "x: 1x3x32x32xf32", "output_0: 1x10xf32"):
        assert text in table.stdout
    if find_ptxas():
        assert "PTX assembled by ptxas" in table.stdout
    as_json = json.loads(cli("inspect", example_bundle, "--json").stdout)
    assert as_json["schema_version"] == "6.0" and len(as_json["artifacts"]) == 6
    missing = cli("inspect", example_bundle.parent / "nope.hxc")
    assert missing.exit_code == ExitCode.ERROR and "no such bundle" in _one_line_error(missing)


def test_dynamic_batch_from_a_batch_one_example(cli, tmp_path):
    # torch.export specialises size-1 dimensions; hxc repeats a batch-1 example to 2.
    out = tmp_path / "cnn.hxc"
    assert cli("compile", "hxc.examples:convnet", "--dynamic-batch", "-t", "cpu:host", "-o", out).exit_code == 0
    from hxc.examples import convnet

    model, _ = convnet()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hxc.runtime.load(out)(x), model(x), atol=1e-4, rtol=1e-3)

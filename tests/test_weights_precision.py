"""Weights stored once per bundle, reduced-precision variants, and bf16 models."""

from __future__ import annotations


import pytest
import torch

import hxc.runtime
from hxc.build import build_bundle
from hxc.compiler.imported import ImportOptions
from hxc.errors import ExitCode
from hxc.examples import convnet, mlp
from hxc.manifests import read_manifest
from hxc.dtypes import dtype
from hxc.verify import verify_bundle

TARGETS = "cpu:host,cpu:x86-64-v3,cpu:x86-64-v4,cpu:aarch64,cuda:sm_89,rocm:gfx942,vulkan:spirv"


@pytest.fixture(scope="module")
def shared_and_inline(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    out = {}
    for mode in ("shared", "inline"):
        result = build_bundle("hxc.examples:mlp", d / f"{mode}.hxc", TARGETS, options=ImportOptions(weights=mode))
        assert result.written, [r.error for r in result.failed]
        out[mode] = d / f"{mode}.hxc"
    return out


def test_shared_weights_are_stored_once(shared_and_inline):
    shared, inline = read_manifest(shared_and_inline["shared"]), read_manifest(shared_and_inline["inline"])
    [w] = shared.weights
    assert w.file == "weights.irpa" and (shared_and_inline["shared"] / w.file).stat().st_size == w.size
    assert inline.weights == ()
    weight_bytes = sum(p.numel() * 4 for p in mlp()[0].state_dict().values())
    assert w.size >= weight_bytes
    # Every inline artifact carries the weights; shared ones carry none of them.
    for a_shared, a_inline in zip(shared.artifacts, inline.artifacts):
        assert a_inline.size - a_shared.size > 0.8 * weight_bytes, a_shared.id
    program = shared_and_inline["shared"] / "program.pt2"
    assert program.stat().st_size < (shared_and_inline["inline"] / "program.pt2").stat().st_size - 0.8 * weight_bytes


@pytest.mark.parametrize("device", ["cpu", "vulkan"])
def test_shared_weights_bundle_matches_inline_and_pytorch(shared_and_inline, device):
    x = torch.randn(4, 64)
    shared = hxc.runtime.load(shared_and_inline["shared"], device=device, strict=True)
    inline = hxc.runtime.load(shared_and_inline["inline"], device=device, strict=True)
    model, _ = mlp()
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(shared(x), inline(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared(x), want, atol=1e-4, rtol=1e-3)


def test_tampered_shared_weights_are_refused(shared_and_inline, tmp_path):
    import shutil

    bundle = shutil.copytree(shared_and_inline["shared"], tmp_path / "b.hxc")
    with open(bundle / "weights.irpa", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\xff" * 8)
    with pytest.raises(hxc.errors.IntegrityError, match="weights.irpa"):
        hxc.runtime.load(bundle)


@pytest.fixture(scope="module")
def precisions(tmp_path_factory):
    out = tmp_path_factory.mktemp("prec") / "p.hxc"
    result = build_bundle("hxc.examples:convnet", out, "cpu:host,vulkan", precisions=("fp32", "fp16", "bf16"))
    assert result.written
    assert [(s.target, s.precision) for s in result.skipped] == [
        (v, p) for p in ("fp16", "bf16") for v in ("vulkan:spirv", "vulkan:desktop")
    ]
    return out


def test_precision_variants_are_recorded_with_their_error(precisions):
    m = read_manifest(precisions)
    fp16, bf16 = m.artifact("cpu:host@fp16"), m.artifact("cpu:host@bf16")
    assert (fp16.precision, bf16.precision) == ("fp16", "bf16")
    assert 0 < fp16.precision_error < bf16.precision_error < 0.05  # bf16 keeps fewer mantissa bits
    assert m.artifact("cpu:host").precision == "fp32" and m.artifact("cpu:host").precision_error is None


def test_reduced_precision_is_refused_by_default_and_allowed_on_request(precisions):
    m = read_manifest(precisions)
    assert hxc.runtime.load(precisions, device="cpu").artifact.id == "cpu:host"
    explained = hxc.runtime.load(precisions, device="cpu").explain()
    assert "cpu:host@fp16: fp16 variant (error" in explained and "allow it with precision='fp16'" in explained
    assert hxc.runtime.load(precisions, precision="bf16", device="cpu").artifact.id == "cpu:host@bf16"
    fp16_err = m.artifact("cpu:host@fp16").precision_error
    allowed = hxc.runtime.select(m, hxc.runtime.probe_host(), tolerance=fp16_err * 1.01)
    assert "cpu:host@fp16" in [c.artifact.id for c in allowed.candidates]
    assert "cpu:host@bf16" in [r.artifact.id for r in allowed.rejected]

    model = hxc.runtime.load(precisions, precision="fp16", device="cpu")
    x = torch.randn(1, 3, 32, 32)
    reference, _ = convnet()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=dtype("f16").tolerance[0], rtol=dtype("f16").tolerance[1])
    assert verify_bundle(precisions).ok


def test_bf16_model_compiles_and_matches_pytorch(tmp_path):
    from hxc.examples.zoo import mlp_bf16

    out = tmp_path / "bf16.hxc"
    result = build_bundle("hxc.examples.zoo:mlp_bf16", out, "cpu:host,cuda:sm_90")
    assert result.written
    m = read_manifest(out)
    assert m.signature.inputs[0].dtype == "bf16" and m.weights  # bf16 parameters go to the archive
    model, (x,) = mlp_bf16()
    x = torch.randn_like(x)
    got = hxc.runtime.load(out, device="cpu")(x)
    assert got.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(got.float(), model(x).float(), atol=dtype("bf16").tolerance[0], rtol=dtype("bf16").tolerance[1])


def test_bf16_parameters_cannot_be_inline(cli, tmp_path):
    result = cli("compile", "hxc.examples.zoo:mlp_bf16", "-t", "cpu:host", "--weights", "inline", "-o", tmp_path / "x.hxc")
    assert result.exit_code == ExitCode.USAGE and "--weights shared" in result.stderr
    bad = cli("compile", "hxc.examples:mlp", "-t", "cpu:host", "-p", "fp8", "-o", tmp_path / "y.hxc")
    assert bad.exit_code == ExitCode.USAGE and "unknown 'fp8'" in bad.stderr
    assert not (tmp_path / "x.hxc").exists() and not (tmp_path / "y.hxc").exists()


def test_a_build_that_would_produce_nothing_is_refused(cli, tmp_path):
    # Vulkan offers fp32 only: `-t vulkan -p fp16` has nothing to compile.
    result = cli("compile", "hxc.examples:mlp", "-t", "vulkan", "-p", "fp16", "-o", tmp_path / "x.hxc")
    assert result.exit_code == ExitCode.USAGE
    assert "nothing to build: vulkan:spirv@fp16" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_reduced_precision_only_with_shared_weights_keeps_the_source_program(tmp_path):
    # Without an fp32 artifact, the program (saved without its weights) still needs the
    # fp32 archive: the PyTorch baseline runs on it.
    from hxc.bench.contenders import load_torch_module

    out = tmp_path / "fp16.hxc"
    result = build_bundle("hxc.examples:mlp", out, "cpu:host", options=ImportOptions(weights="shared"), precisions=("fp16",))
    assert result.written
    m = read_manifest(out)
    assert [a.id for a in m.artifacts] == ["cpu:host@fp16"]
    assert {w.precision for w in m.weights} == {"fp32", "fp16"}
    model, (x,) = mlp()
    with torch.no_grad():
        torch.testing.assert_close(load_torch_module(out, m)(x), model(x))
    # A bundle whose program lost its weights is refused, not benchmarked on garbage.
    import dataclasses

    from hxc.errors import BundleError

    without = dataclasses.replace(m, weights=tuple(w for w in m.weights if w.precision != "fp32"))
    with pytest.raises(BundleError, match="weights .* are not in the bundle"):
        load_torch_module(out, without)

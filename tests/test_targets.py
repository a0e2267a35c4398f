"""The target registry, and a real compile of every registered variant (IREE
cross-compiles, so no GPU is needed)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

import pytest

from hxc import targets
from hxc.compiler.cache import CompileCache
from hxc.compiler.driver import CompileJob, compile_all
from hxc.errors import UsageError
from hxc.targets.base import CheckFailed
from hxc.targets.cuda import find_ptxas, ptxas_version

# The executable format inside the vmfb proves which backend produced it.
FORMAT_BY_BINARY = {
    "elf-x86_64": "embedded_elf_x86_64",
    "elf-arm_64": "embedded_elf_arm_64",
    "ptx": "cuda_nvptx_fb",
    "hsaco": "rocm_hsaco_fb",
    "spirv": "vulkan_spirv_fb",
}


def test_families_are_found_by_file_name():
    assert targets.family_names() == ("cpu", "cuda", "rocm", "vulkan")
    for fam in targets.families():
        assert fam.variants and fam.default_variants
        assert len({v.name for v in fam.variants}) == len(fam.variants)


def test_required_variants_are_offered():
    ids = {v.id for v in targets.all_variants()}
    assert {"cpu:host", "cpu:x86-64-v3", "cpu:x86-64-v4", "cpu:aarch64"} <= ids
    assert {"cuda:sm_80", "cuda:sm_89", "cuda:sm_90"} <= ids
    assert {"rocm:gfx90a", "rocm:gfx942", "rocm:gfx1100", "vulkan:spirv"} <= ids


def test_resolve_families_variants_and_aliases():
    assert [v.id for v in targets.resolve("cuda")] == ["cuda:sm_80", "cuda:sm_89", "cuda:sm_90"]
    assert [v.id for v in targets.resolve("cuda:h100,rocm:mi300x,cuda:sm_90")] == ["cuda:sm_90", "rocm:gfx942"]
    every_default = targets.resolve("all")
    assert {v.family for v in every_default} == set(targets.family_names())


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("cdua", "did you mean 'cuda'"),
        ("cuda:sm_99", "Valid: sm_80"),
        ("rocm:gfx1030", "unknown rocm variant 'gfx1030'"),
        ("", "no targets given"),
    ],
)
def test_unknown_targets_are_usage_errors_with_suggestions(spec, fragment):
    with pytest.raises(UsageError) as e:
        targets.resolve(spec)
    assert fragment in str(e.value)


def test_targets_command_lists_registry_as_json(cli):
    result = cli("targets", "--json")
    assert result.exit_code == 0
    listed = {v["id"] for fam in json.loads(result.stdout) for v in fam["variants"]}
    assert listed == {v.id for v in targets.all_variants()}


@pytest.fixture(scope="module")
def mlp_ir(tmp_path_factory) -> tuple[Path, str]:
    from hxc.compiler.lower import lower
    from hxc.frontends import export_program

    lowered = lower(export_program("hxc.examples:mlp").program)
    path = tmp_path_factory.mktemp("ir") / "mlp.mlirbc"
    path.write_bytes(lowered.mlir)
    return path, hashlib.sha256(lowered.mlir).hexdigest()


@pytest.mark.parametrize("variant", targets.all_variants(), ids=lambda v: v.id)
def test_every_variant_compiles_to_its_binary_format(variant, mlp_ir, tmp_path):
    ir, sha = mlp_ir
    [result] = compile_all([CompileJob(ir, sha, variant)], workdir=tmp_path)
    assert result.status == "ok", result.error
    plan = result.plan
    formats = zipfile.ZipFile(result.vmfb).namelist()
    want = FORMAT_BY_BINARY.get(plan.binary, "embedded_elf_")
    assert any(want in name for name in formats), formats
    if variant.family == "cuda" and find_ptxas():
        assert result.verified == f"PTX assembled by ptxas {ptxas_version()} for {plan.requires.min_gpu_arch}"


def test_every_vulkan_compile_carries_the_depthwise_transform():
    # IREE 3.13's SPIR-V depthwise convolutions are wrong without it (tests/test_coverage.py
    # runs them on lavapipe); the spec must ship inside the package.
    from hxc.targets.vulkan import DEPTHWISE_SPEC

    assert DEPTHWISE_SPEC.is_file() and "linalg.depthwise_conv_2d_nchw_chw" in DEPTHWISE_SPEC.read_text()
    vulkan = targets.family("vulkan")
    for variant in vulkan.variants:
        assert f"--iree-preprocessing-transform-spec-filename={DEPTHWISE_SPEC}" in vulkan.plan(variant).flags


def test_the_compile_cache_key_follows_the_files_flags_name(tmp_path):
    # A transform or tuning spec is read by the compile: editing it must miss the cache.
    spec = tmp_path / "spec.mlir"
    spec.write_text("module {}\n")
    flags = ("--iree-hal-target-device=vulkan", f"--iree-preprocessing-transform-spec-filename={spec}")
    before = CompileCache.key("ir", flags, "3.13.0")
    assert CompileCache.key("ir", flags, "3.13.0") == before
    spec.write_text("module attributes {transform.with_named_sequence} {}\n")
    assert CompileCache.key("ir", flags, "3.13.0") != before


@pytest.mark.skipif(find_ptxas() is None, reason="ptxas not installed")
def test_ptxas_rejects_ptx_the_claimed_gpu_cannot_run(tmp_path):
    # PTX written for sm_89 must not pass as sm_80 code: ptxas refuses it, so the
    # compile fails here rather than on the user's GPU.
    cuda = targets.family("cuda")
    (tmp_path / "kernel.ptx").write_text(".version 7.8\n.target sm_89\n.address_size 64\n.visible .entry k() { ret; }\n")
    plan = cuda.plan(cuda.variant("sm_80"))
    with pytest.raises(CheckFailed, match="ptxas could not assemble the PTX for sm_80"):
        cuda.check(plan, tmp_path)
    plan89 = cuda.plan(cuda.variant("sm_89"))
    assert "for sm_89" in cuda.check(plan89, tmp_path)


@pytest.mark.skipif(find_ptxas() is None, reason="ptxas not installed")
def test_ptx_cached_unchecked_is_not_reused_once_ptxas_is_installed(mlp_ir, tmp_path, monkeypatch):
    ir, sha = mlp_ir
    cache = CompileCache(tmp_path / "cache")
    job = CompileJob(ir, sha, targets.family("cuda").variant("sm_89"))
    try:
        with monkeypatch.context() as env:  # a host without ptxas
            env.setenv("PATH", os.path.dirname(sys.executable))
            env.setenv("HXC_PTXAS", "")
            env.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
            find_ptxas.cache_clear()
            [unchecked] = compile_all([job], workdir=tmp_path, cache=cache)
    finally:
        find_ptxas.cache_clear()
    assert unchecked.status == "ok" and unchecked.verified is None
    [checked] = compile_all([job], workdir=tmp_path, cache=cache)
    assert not checked.cached and checked.verified.startswith("PTX assembled by ptxas")
    [again] = compile_all([job], workdir=tmp_path, cache=cache)
    assert again.cached and again.verified == checked.verified


def test_hopper_variant_is_sm80_ptx_checked_for_sm90():
    cuda = targets.family("cuda")
    hopper = cuda.variant("h100")
    assert hopper.name == "sm_90"
    assert "--iree-cuda-target=sm_80" in hopper.flags  # IREE 3.13 cannot target sm_90
    assert hopper.requires.min_gpu_arch == "sm_90"

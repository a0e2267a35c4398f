"""Selection and ranking on described hosts (synthetic `HostProbe`s: an Ada workstation,
an H100 server, an MI300X server, an old Xeon without AVX-512, a Graviton3), so every
assertion holds on any machine that runs the suite, GPU runners included. Fast: no
compiler, no device."""

from __future__ import annotations

import dataclasses

import pytest

from hxc.errors import UsageError
from hxc.manifests.schema import LatencyStats, Profile
from hxc.runtime import select

EVERY_DEFAULT = ("cpu:host", "cpu:x86-64-v3", "cpu:x86-64-v4", "cpu:aarch64", "cuda:sm_80", "cuda:sm_89", "cuda:sm_90",
                 "rocm:gfx90a", "rocm:gfx942", "rocm:gfx1100", "vulkan:spirv")  # fmt: skip


def _order(sel) -> list[str]:
    return [c.artifact.id for c in sel.candidates]


def _reasons(sel) -> dict[str, str]:
    return {r.artifact.id: r.reason for r in sel.rejected}


def test_the_most_specific_compatible_sm_wins(hosts, synthetic_manifest):
    # sm_80, sm_86 and sm_89 PTX all run on an sm_89 GPU; sm_89's may use Ada's instructions.
    m = synthetic_manifest(("cuda:sm_80", "cuda:sm_86", "cuda:sm_89", "cuda:sm_90", "cuda:sm_120"))
    sel = select(m, hosts["ada"])
    assert _order(sel) == ["cuda:sm_89", "cuda:sm_86", "cuda:sm_80"]
    assert _reasons(sel) == {"cuda:sm_90": "built for sm_90 or newer; this GPU is sm_89",
                             "cuda:sm_120": "built for sm_120 or newer; this GPU is sm_89"}  # fmt: skip
    assert _order(select(m, hosts["h100"]))[:2] == ["cuda:sm_90", "cuda:sm_89"]


def test_ada_workstation_prefers_cuda_then_tuned_vulkan_then_its_cpu(hosts, synthetic_manifest):
    m = synthetic_manifest((*EVERY_DEFAULT, "vulkan:ada", "vulkan:rdna3"))
    sel = select(m, hosts["ada"])
    assert _order(sel) == ["cuda:sm_89", "cuda:sm_80", "vulkan:ada", "vulkan:spirv", "cpu:x86-64-v3"]
    reasons = _reasons(sel)
    assert reasons["cpu:x86-64-v4"].startswith("needs CPU features this CPU lacks: avx512f")
    assert reasons["cpu:aarch64"] == "aarch64 code cannot run on this x86_64 CPU"
    assert reasons["vulkan:rdna3"] == "SPIR-V tuned for amd GPUs; this device is nvidia"
    assert reasons["rocm:gfx942"] == "hip driver unavailable: no hip device on ada-workstation"
    # Forcing Vulkan keeps the vendor-tuned SPIR-V first.
    assert _order(select(m, hosts["ada"], device="vulkan")) == ["vulkan:ada", "vulkan:spirv"]


def test_mi300_picks_its_exact_gfx_arch(hosts, synthetic_manifest):
    sel = select(synthetic_manifest(EVERY_DEFAULT), hosts["mi300"])
    assert _order(sel)[0] == "rocm:gfx942"  # "gfx942:sramecc+:xnack-": feature suffixes are ignored
    reasons = _reasons(sel)
    assert reasons["rocm:gfx90a"] == "code for gfx90a cannot run on gfx942:sramecc+:xnack-"
    assert "cuda driver unavailable" in reasons["cuda:sm_89"]
    # Zen 4 has AVX-512 but not Sapphire Rapids' AMX: the compile host's code is refused.
    assert "amx_tile" in reasons["cpu:host"]
    cpus = [i for i in _order(sel) if i.startswith("cpu:")]
    assert cpus == ["cpu:x86-64-v4", "cpu:x86-64-v3"]  # the CPU variant with more instructions first


def test_a_cpu_without_avx512_runs_v3_and_software_vulkan_comes_last(hosts, synthetic_manifest):
    sel = select(synthetic_manifest(EVERY_DEFAULT), hosts["old_xeon"])
    assert _order(sel) == ["cpu:x86-64-v3", "vulkan:spirv"]
    assert "avx512f" in _reasons(sel)["cpu:x86-64-v4"]


def test_an_arm_server_runs_arm_code_only(hosts, synthetic_manifest):
    sel = select(synthetic_manifest((*EVERY_DEFAULT, "cpu:aarch64-sve")), hosts["graviton3"])
    assert _order(sel) == ["cpu:aarch64-sve", "cpu:aarch64"]
    assert _reasons(sel)["cpu:x86-64-v3"] == "x86_64 code cannot run on this aarch64 CPU"
    assert [c.device.driver for c in sel.candidates] == ["local-task", "local-task"]  # not local-sync


def _profile(m, host, artifact_id: str, p50: float, scenario: str = "single-stream") -> Profile:
    art = m.artifact(artifact_id)
    device = next(d for d in host.devices if d.driver == art.driver)
    stats = LatencyStats(p50, p50, p50, p50, 0.0, p50, 10)
    return Profile(host.host().id, art.id, art.sha256, device.label, scenario, 1, stats, 1000 / p50, 1000 / p50,  # type: ignore[arg-type]
                   None, None, None, True, "2025-01-01T00:00:00+00:00")  # fmt: skip


def test_profiles_outrank_the_static_order(hosts, synthetic_manifest):
    ada = hosts["ada"]
    m = synthetic_manifest(EVERY_DEFAULT)
    measured = dataclasses.replace(m, profiles=(_profile(m, ada, "cpu:x86-64-v3", 0.5), _profile(m, ada, "cuda:sm_89", 2.0)))
    sel = select(measured, ada)
    assert _order(sel)[:3] == ["cpu:x86-64-v3", "cuda:sm_89", "cuda:sm_80"]  # measured first, by p50
    assert sel.best.reason == "measured on this host: p50 0.5 ms, p99 0.5 ms (10 samples), 2000 items/s (single-stream batch 1)"
    # A host with the same device but another id (here: another hostname) lends its profiles.
    twin = dataclasses.replace(ada, hostname="ada-2", cpu=dataclasses.replace(ada.cpu, cores=8))
    assert twin.host().id != ada.host().id
    borrowed = select(measured, twin)
    assert borrowed.best.artifact.id == "cpu:x86-64-v3" and borrowed.best.measured_on == "same device"


def test_throughput_policy_ranks_by_offline_throughput(hosts, synthetic_manifest):
    h = hosts["old_xeon"]
    m = synthetic_manifest(EVERY_DEFAULT)
    m = dataclasses.replace(m, profiles=(
        _profile(m, h, "cpu:x86-64-v3", 1.0), _profile(m, h, "vulkan:spirv", 2.0),
        _profile(m, h, "cpu:x86-64-v3", 4.0, "offline"), _profile(m, h, "vulkan:spirv", 3.0, "offline"),
    ))  # fmt: skip
    assert select(m, h).best.artifact.id == "cpu:x86-64-v3"
    assert select(m, h, policy="throughput").best.artifact.id == "vulkan:spirv"
    with pytest.raises(UsageError, match="unknown policy"):
        select(m, h, policy="fastest")


def test_reduced_precision_only_when_allowed_and_preferred_only_among_equals(hosts, synthetic_manifest):
    m = synthetic_manifest(("cuda:sm_80", "cuda:sm_89"), precisions={"fp16": 1e-3, "bf16": 1e-2})
    ada = hosts["ada"]
    assert _order(select(m, ada)) == ["cuda:sm_89", "cuda:sm_80"]
    assert "allow it with precision='fp16'" in _reasons(select(m, ada))["cuda:sm_89@fp16"]
    assert _order(select(m, ada, precision="fp16")) == ["cuda:sm_89@fp16", "cuda:sm_89", "cuda:sm_80@fp16", "cuda:sm_80"]
    within = select(m, ada, tolerance=5e-3)
    assert "cuda:sm_89@fp16" in _order(within) and "cuda:sm_89@bf16" in _reasons(within)


def test_forced_device_env_and_empty_override(hosts, synthetic_manifest, monkeypatch):
    m = synthetic_manifest(EVERY_DEFAULT)
    ada = hosts["ada"]
    assert _order(select(m, ada, device="cpu")) == ["cpu:x86-64-v3"]
    assert _order(select(m, ada, device="cuda:sm_80")) == ["cuda:sm_80"]
    assert _order(select(m, ada, device="local-sync")) == ["cpu:x86-64-v3"]
    assert select(m, ada, device="local-sync").best.device.driver == "local-sync"
    monkeypatch.setenv("HXC_DEVICE", "vulkan")
    assert select(m, ada).forced == "vulkan" and _order(select(m, ada)) == ["vulkan:spirv"]
    assert select(m, ada, device="").forced is None  # "" lifts the environment's restriction
    assert "not the requested device 'vulkan'" in _reasons(select(m, ada))["cuda:sm_89"]


def test_failed_artifacts_are_rejected_with_their_compile_error(hosts, synthetic_manifest):
    m = synthetic_manifest(("cpu:x86-64-v3", "vulkan:spirv"))
    failed = dataclasses.replace(m.artifact("vulkan:spirv"), status="failed", file=None, error="cannot lower aten.remainder")
    m = dataclasses.replace(m, artifacts=(m.artifact("cpu:x86-64-v3"), failed))
    sel = select(m, hosts["old_xeon"])
    assert _order(sel) == ["cpu:x86-64-v3"]
    assert _reasons(sel) == {"vulkan:spirv": "failed to compile: cannot lower aten.remainder"}

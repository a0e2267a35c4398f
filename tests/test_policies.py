"""Selection policies (latency, throughput, cost), SLOs and prices.

The ranking arithmetic runs on a synthetic host (a 16-core x86 CPU and an NVIDIA L4
seen through CUDA and Vulkan) with synthetic profiles, so it passes on any machine;
the real-device tests on top bench the example bundle here and select from that."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

import hxc.runtime
from hxc.errors import ExitCode, UsageError
from hxc.manifests import read_manifest, update_manifest
from hxc.manifests.schema import (
    FunctionSpec,
    Artifact,
    LatencyStats,
    Manifest,
    ModelInfo,
    OutputTree,
    Profile,
    Requirements,
    Signature,
    TensorSpec,
    Toolchain,
)
from hxc.runtime import select
from hxc.runtime.prices import PRICES_ENV, load_prices
from hxc.runtime.probe import DriverStatus, HostProbe
from hxc.targets import Device
from hxc.targets.cpu import HostCpu

FEATURES = ("avx", "avx2", "fma", "sse4_2")
CPU = Device("local-task", "local-task", "Synthetic Xeon", "cpu", "x86_64", FEATURES)
L4_CUDA = Device("cuda", "cuda://0", "NVIDIA L4", "discrete-gpu", "sm_89")
L4_VK = Device("vulkan", "vulkan://0", "NVIDIA L4", "discrete-gpu", "nvidia-proprietary", vendor="nvidia")


@pytest.fixture
def host() -> HostProbe:
    drivers = (
        DriverStatus("local-task", "cpu", True, None, (CPU,)),
        DriverStatus("cuda", "cuda", True, None, (L4_CUDA,)),
        DriverStatus("vulkan", "vulkan", True, None, (L4_VK,)),
    )
    return HostProbe("synthetic", "Linux", HostCpu("x86_64", "Synthetic Xeon", FEATURES, 16), drivers, 0.0)


def _artifact(id_: str, driver: str, requires: Requirements) -> Artifact:
    fam, variant = id_.split(":")
    return Artifact(id_, fam, variant, fam, driver, "x", (), requires, "ok", f"artifacts/{variant}.vmfb", f"sha-{id_}", 1)


ARTIFACTS = (
    _artifact("cpu:x86-64-v3", "local-task", Requirements(isa="x86_64", cpu_features=("avx2", "fma"))),
    _artifact("cuda:sm_89", "cuda", Requirements(min_gpu_arch="sm_89")),
    _artifact("vulkan:spirv", "vulkan", Requirements()),
    _artifact("vulkan:ampere", "vulkan", Requirements(vendor="nvidia")),  # never measured
)


def _stats(p50: float, p99: float, n: int) -> LatencyStats:
    return LatencyStats(p50, (p50 + p99) / 2, p99, p50, 0.1, p50 * 0.9, n)


def _profile(host: HostProbe, art: str, device: Device, scenario: str, batch: int, p50: float, p99: float,
             items_per_s: float, n: int = 200, overhead: LatencyStats | None = None) -> Profile:  # fmt: skip
    return Profile(host.host().id, art, f"sha-{art}", device.label, scenario, batch, _stats(p50, p99, n),  # type: ignore[arg-type]
                   items_per_s / batch, items_per_s, None, None, None, True, "2026-01-01T00:00:00+00:00",
                   caller_overhead=overhead)  # fmt: skip


def _manifest(host: HostProbe, *, samples: int = 200, vk_overhead: LatencyStats | None = None) -> Manifest:
    profiles = (
        _profile(host, "cpu:x86-64-v3", CPU, "single-stream", 1, 5.0, 8.0, 200, samples),
        _profile(host, "cpu:x86-64-v3", CPU, "offline", 32, 40.0, 45.0, 800, samples),
        _profile(host, "cuda:sm_89", L4_CUDA, "single-stream", 1, 1.0, 3.0, 1000, samples),
        _profile(host, "cuda:sm_89", L4_CUDA, "offline", 32, 8.0, 9.0, 4000, samples),
        _profile(host, "vulkan:spirv", L4_VK, "single-stream", 1, 2.0, 4.0, 500, samples, vk_overhead),
        _profile(host, "vulkan:spirv", L4_VK, "offline", 32, 16.0, 18.0, 2000, samples),
    )
    spec = TensorSpec("x", "f32", ("batch", 4))
    return Manifest(
        ModelInfo("m", "m.pt2", "torch.export", "0" * 64, None, "0" * 64),
        {"main": FunctionSpec(Signature((spec,), (spec,), OutputTree("leaf", 0)))},
        Toolchain("0", "3.13.0", None, None, "3.11"),
        ARTIFACTS, "2026-01-01T00:00:00+00:00", hosts=(host.host(),), profiles=profiles,
    )  # fmt: skip


def _ids(sel) -> list[str]:
    return [c.artifact.id for c in sel.candidates]


def test_latency_and_throughput_rank_by_the_recorded_metrics(host):
    m = _manifest(host)
    assert _ids(select(m, host, policy="latency")) == ["cuda:sm_89", "vulkan:spirv", "cpu:x86-64-v3", "vulkan:ampere"]
    by_tp = select(m, host, policy="throughput")
    assert _ids(by_tp)[:3] == ["cuda:sm_89", "vulkan:spirv", "cpu:x86-64-v3"]
    # Throughput is the best items/s over the recorded scenarios (here offline batch 32).
    assert by_tp.best.items_per_second == 4000 and by_tp.best.throughput.batch == 32


def test_cost_is_price_per_hour_over_items_per_second(host, tmp_path, monkeypatch):
    monkeypatch.delenv(PRICES_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))
    sel = select(_manifest(host), host, policy="cost")
    # Defaults: an L4 costs 0.71/h; the CPU 16 cores x 0.045 = 0.72/h.
    costs = {c.artifact.id: c.cost_per_1k for c in sel.candidates}
    assert costs["cuda:sm_89"] == pytest.approx(0.71 / (4000 * 3600) * 1000)
    assert costs["cpu:x86-64-v3"] == pytest.approx(16 * 0.045 / (800 * 3600) * 1000)
    assert costs["vulkan:ampere"] is None  # unmeasured: cannot be costed, ranked last
    assert _ids(sel) == ["cuda:sm_89", "vulkan:spirv", "cpu:x86-64-v3", "vulkan:ampere"]
    text = sel.explain()
    assert "0.71 USD/h ('*L4*' in defaults) / (4000 items/s x 3600) x 1000 = 4.93e-05 USD per 1k items" in text
    assert "0.72 USD/h (16 cores x 0.045/core-hour)" in text
    assert "not measured, so it cannot be costed" in text


def test_cost_policy_picks_differently_when_prices_change(host, tmp_path, monkeypatch):
    m = _manifest(host)
    prices = tmp_path / "prices.toml"
    prices.write_text('currency = "EUR"\ncpu_core_hour = 0.01\n[devices]\n"*L4*" = 20.0\n')
    monkeypatch.setenv(PRICES_ENV, str(prices))
    sel = select(m, host, policy="cost")
    assert sel.best.artifact.id == "cpu:x86-64-v3" and sel.currency == "EUR"
    assert {c.price.source for c in sel.candidates if c.device.name == "NVIDIA L4"} == {f"'*L4*' in {prices}"}
    assert sel.best.price.per_hour == pytest.approx(16 * 0.01)
    # An SLO the CPU misses (p99 8 ms > 5 ms) sends the work back to the L4.
    with_slo = select(m, host, policy="cost", slo_ms=5)
    assert with_slo.best.artifact.id == "cuda:sm_89"
    assert _ids(with_slo)[-1] == "cpu:x86-64-v3" and not with_slo.candidates[-1].slo.met
    # The table passed in wins over the environment.
    assert select(m, host, policy="cost", prices=load_prices(None)).currency == "EUR"


def test_slo_is_judged_on_the_chosen_percentile_with_caller_overhead(host):
    overhead = _stats(0.5, 1.5, 500)
    m = _manifest(host, vk_overhead=overhead)
    sel = select(m, host, policy="cost", slo_ms=5)  # p99
    verdicts = {c.artifact.id: c.slo for c in sel.candidates}
    assert verdicts["cuda:sm_89"].met and verdicts["cuda:sm_89"].estimate_ms == 3.0
    vk = verdicts["vulkan:spirv"]  # 4 ms on the device + 1.5 ms overhead: misses 5 ms
    assert not vk.met and vk.estimate_ms == pytest.approx(5.5) and vk.overhead_ms == 1.5
    assert verdicts["vulkan:ampere"] is None
    assert "p99 4 + overhead 1.5 = 5.5 ms > 5 ms: SLO missed" in sel.explain()
    # On p50 all three meet it, and the cheapest wins.
    p50 = select(m, host, policy="cost", slo_ms=5, slo_percentile="p50")
    assert all(c.slo.met for c in p50.candidates if c.slo) and p50.best.artifact.id == "cuda:sm_89"
    # Order: meets, then unmeasured (cannot be judged), then misses.
    assert _ids(select(m, host, policy="latency", slo_ms=3.5)) == ["cuda:sm_89", "vulkan:ampere", "vulkan:spirv", "cpu:x86-64-v3"]


def test_when_nothing_meets_the_slo_the_fastest_is_picked_and_said(host):
    sel = select(_manifest(host), host, policy="cost", slo_ms=0.5)
    assert sel.best.artifact.id == "cuda:sm_89"  # fastest at p99, though not cheapest per se
    assert sel.note == "no candidate meets the SLO (p99 <= 0.5 ms); the fastest is picked"
    assert _ids(sel) == ["cuda:sm_89", "vulkan:spirv", "cpu:x86-64-v3", "vulkan:ampere"]
    assert "note: no candidate meets" in sel.explain()


def test_p99_from_too_few_samples_is_flagged_weak(host):
    sel = select(_manifest(host, samples=20), host, slo_ms=10)
    v = sel.best.slo
    assert v.met and v.weak and v.samples == 20
    assert "p99 from 20 samples, fewer than 100" in v.caveats
    assert "caller overhead not measured" in v.caveats[1]
    strong = select(_manifest(host, samples=200, vk_overhead=_stats(0.1, 0.2, 300)), host, slo_ms=10, device="vulkan:spirv")
    assert not strong.best.slo.weak
    # p50 needs fewer samples: 20 are enough.
    assert "p50 from" not in " ".join(select(_manifest(host, samples=20), host, slo_ms=10, slo_percentile="p50").best.slo.caveats)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("this is not toml = = =", "not a valid prices TOML file"),
        ('[devices]\n"*L4*" = -1\n', "must be a price per hour >= 0"),
        ('[devices]\n"*L4*" = "cheap"\n', "must be a price per hour >= 0"),
        ("gpu_hour = 1\n", "unknown key(s) gpu_hour"),
    ],
)
def test_bad_price_files_are_one_line_usage_errors(tmp_path, text, fragment):
    path = tmp_path / "prices.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as e:
        load_prices(path)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UsageError, match="no such price file"):
        load_prices(tmp_path / "missing.toml")


def test_the_user_config_file_is_read(host, tmp_path, monkeypatch):
    monkeypatch.delenv(PRICES_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "hxc").mkdir()
    (tmp_path / "hxc" / "prices.toml").write_text('[devices]\n"cuda: *" = 100\n')
    prices = load_prices()
    assert prices.price(L4_CUDA, 1).per_hour == 100 and prices.price(L4_VK, 1).per_hour == 0.71
    assert prices.price(Device("hip", "hip://0", "Mystery GPU", "discrete-gpu"), 1) is None


def test_bad_policy_and_slo_arguments(host):
    m = _manifest(host)
    with pytest.raises(UsageError, match="unknown policy"):
        select(m, host, policy="cheapest")
    with pytest.raises(UsageError, match="unknown SLO percentile"):
        select(m, host, slo_ms=5, slo_percentile="p90")
    with pytest.raises(UsageError, match="positive number"):
        select(m, host, slo_ms=-1)


# --- on this machine's real devices ---------------------------------------------------


@pytest.fixture(scope="module")
def measured_bundle(example_bundle: Path, tmp_path_factory) -> Path:
    """The example bundle with real profiles of cpu:host and vulkan:spirv from this machine."""
    from hxc.bench.measure import Budget
    from hxc.bench.run import run_bench

    bundle = Path(shutil.copytree(example_bundle, tmp_path_factory.mktemp("measured") / "b.hxc"))
    run_bench(bundle, baselines=[], device="cpu:host", budget=Budget(min_iterations=30, min_seconds=0.05))
    run_bench(bundle, baselines=[], device="vulkan", budget=Budget(min_iterations=5, min_seconds=0.05, max_seconds=10))
    return bundle


def test_select_command_shows_the_cost_and_slo_arithmetic(measured_bundle, cli, tmp_path, monkeypatch):
    m = read_manifest(measured_bundle)
    p99 = {p.candidate: p.latency.p99_ms for p in m.profiles}
    assert p99["cpu:host"] < p99["vulkan:spirv"]  # lavapipe is the slow one here
    between = (p99["cpu:host"] + p99["vulkan:spirv"]) / 2

    free_vulkan = tmp_path / "prices.toml"
    free_vulkan.write_text('[devices]\n"vulkan: llvmpipe*" = 0.0\n')
    monkeypatch.setenv(PRICES_ENV, str(free_vulkan))
    out = json.loads(cli("select", measured_bundle, "--policy", "cost", "--json").stdout)
    assert out["choice"]["artifact"] == "vulkan:spirv"  # free beats fast when there is no deadline
    by_id = {c["artifact"]: c for c in out["candidates"]}
    assert by_id["vulkan:spirv"]["cost_per_1k_items"] == 0.0 and by_id["cpu:host"]["cost_per_1k_items"] > 0
    assert hxc.runtime.load(measured_bundle, policy="cost").artifact.id == "vulkan:spirv"
    assert hxc.runtime.load(measured_bundle, policy="cost", slo_ms=between).artifact.id == "cpu:host"

    explained = cli("select", measured_bundle, "--policy", "cost", "--slo-ms", f"{between:.6f}", "--explain")
    assert explained.exit_code == 0
    assert "-> #1 cpu:host" in explained.stdout and "SLO met" in explained.stdout and "SLO missed" in explained.stdout
    assert "per 1k items" in explained.stdout and "cost per 1,000 items" in explained.stdout
    tight = json.loads(cli("select", measured_bundle, "--policy", "cost", "--slo-ms", "0.0001", "--json").stdout)
    assert tight["choice"]["artifact"] == "cpu:host" and "fastest is picked" in tight["note"]
    assert all(c["slo"]["met"] is False for c in tight["candidates"] if c["slo"])

    monkeypatch.setenv(PRICES_ENV, str(tmp_path / "nope.toml"))
    bad = cli("select", measured_bundle, "--policy", "cost")
    assert bad.exit_code == ExitCode.USAGE and "no such price file" in bad.stderr


def test_profiles_without_overhead_still_round_trip(measured_bundle, tmp_path):
    # caller_overhead is optional: profiles without it (recorded by an older hxc) read as None.
    bundle = Path(shutil.copytree(measured_bundle, tmp_path / "c.hxc"))
    data = json.loads((bundle / "profiles.json").read_text())
    for p in data["profiles"]:
        p.pop("caller_overhead", None)
    (bundle / "profiles.json").write_text(json.dumps(data))
    assert all(p.caller_overhead is None for p in read_manifest(bundle).profiles)
    update_manifest(bundle, lambda m: dataclasses.replace(m, profiles=tuple(
        dataclasses.replace(p, caller_overhead=_stats(1, 2, 3)) for p in m.profiles)))  # fmt: skip
    assert read_manifest(bundle).profiles[0].caller_overhead == _stats(1, 2, 3)

"""`hxc bench`: profiles recorded on the real devices and then used by the loader;
concurrent runs, merging across hosts, JSON output and the regression gate."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hxc.runtime
from hxc.errors import ExitCode
from hxc.manifests import read_manifest, update_manifest

QUICK = ["--min-time", "0.05", "--min-iterations", "3", "--max-time", "5"]


def test_bench_records_profiles_the_loader_then_uses(bundle, cli):
    result = cli("bench", bundle, *QUICK, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    measured = {r["candidate"] for r in out["results"]}
    assert measured >= {"cpu:host", "cpu:x86-64-v3", "vulkan:spirv", "torch:eager"}
    m = read_manifest(bundle)
    assert len(m.profiles) == len(measured) and [h.id for h in m.hosts] == [out["host"]["id"]]

    model = hxc.runtime.load(bundle)
    assert model.candidate.measured_on == "this host"
    fastest = min((p for p in m.profiles if p.artifact_sha256), key=lambda p: p.latency.p50_ms)
    assert model.artifact.id == fastest.candidate


def test_json_rows_have_the_documented_fields(bundle, cli):
    out = json.loads(cli("bench", bundle, *QUICK, "--device", "cpu", "--no-record", "--json").stdout)
    assert out["recorded"] is False and read_manifest(bundle).profiles == ()
    row = out["results"][0]
    for key, kind in {"candidate": str, "device": str, "scenario": str, "batch": int, "p50_ms": float, "p90_ms": float,
                      "p99_ms": float, "mean_ms": float, "stdev_ms": float, "min_ms": float, "iterations": int,
                      "throughput": float, "items_per_second": float, "load_ms": float, "first_call_ms": float,
                      "spread": float, "device_time_only": bool}.items():  # fmt: skip
        assert isinstance(row[key], kind), key
    assert row["scenario"] == "single-stream" and row["p50_ms"] <= row["p99_ms"]
    torch_row = next(r for r in out["results"] if r["candidate"] == "torch:eager")
    assert torch_row["speedup_vs_torch"] == 1.0


def test_dynamic_batch_models_get_offline_scenarios(cli, tmp_path):
    out = tmp_path / "mlp.hxc"
    assert cli("compile", "hxc.examples:mlp", "-t", "cpu:host", "--dynamic-batch", "-o", out).exit_code == 0
    rows = json.loads(cli("bench", out, *QUICK, "--batch", "4,16", "--json").stdout)["results"]
    assert {(r["scenario"], r["batch"]) for r in rows} == {("single-stream", 1), ("offline", 4), ("offline", 16)}
    offline = next(r for r in rows if r["batch"] == 16 and r["candidate"] == "cpu:host")
    assert offline["items_per_second"] == pytest.approx(offline["throughput"] * 16)


# Two processes record profiles into one bundle the way `hxc bench` does. Each starts
# when the other is ready, and each holds its read-modify-write open for a second, so
# without the bundle lock both would read the same manifest and one would lose its write.
_WRITER = """
import dataclasses, sys, time
from pathlib import Path
from hxc.manifests import update_manifest
from hxc.manifests.merge import add_profiles
from hxc.manifests.schema import Host, LatencyStats, Profile

bundle, me, other = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
(bundle.parent / f"{me}.ready").touch()
while not (bundle.parent / f"{other}.ready").exists():
    time.sleep(0.001)
host = Host(me, me, "cpu", 1, (), (), {})
stats = LatencyStats(1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1)
profile = Profile(me, "torch:eager", None, "cpu", "single-stream", 1, stats, 1.0, 1.0, None, None, None, True, "now")

def slowly(m):
    time.sleep(1.0)
    return add_profiles(m, [host], [profile])

update_manifest(bundle, slowly)
"""


def test_concurrent_profile_writers_both_land(bundle):
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(bundle), me, other], stderr=subprocess.PIPE, text=True)
             for me, other in (("a", "b"), ("b", "a"))]  # fmt: skip
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert {h.id for h in read_manifest(bundle).hosts} == {"a", "b"}  # nothing lost to the race


def test_merge_profiles_from_another_host(bundle, tmp_path, cli):
    assert cli("bench", bundle, *QUICK, "--device", "cpu").exit_code == 0
    # A copy of the bundle benchmarked on another machine (a CI runner), as copied back.
    elsewhere = Path(shutil.copytree(bundle, tmp_path / "ci.hxc"))
    m = read_manifest(elsewhere)
    other = dataclasses.replace(m.hosts[0], id="0123456789abcdef", hostname="ci-runner-7", cpu_model="AMD EPYC 9654")
    moved = tuple(dataclasses.replace(p, host_id=other.id) for p in m.profiles)
    update_manifest(elsewhere, lambda m: dataclasses.replace(m, hosts=(other,), profiles=moved))

    result = cli("profiles", "merge", bundle, elsewhere / "profiles.json", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["added"] == len(moved)
    merged = read_manifest(bundle)
    assert {h.hostname for h in merged.hosts} == {m.hosts[0].hostname, "ci-runner-7"}
    assert len(merged.profiles) == 2 * len(moved)
    again = json.loads(cli("profiles", "merge", bundle, elsewhere, "--json").stdout)
    assert again["added"] == 0  # merging twice changes nothing

    html = tmp_path / "report.html"
    assert cli("report", bundle, "-o", html).exit_code == 0
    text = html.read_text()
    assert "ci-runner-7" in text and "<svg" in text
    assert cli("report", bundle, "-o", tmp_path / "chart.svg").exit_code == 0
    assert (tmp_path / "chart.svg").read_text().startswith("<svg")


def test_regression_gate_exit_code(bundle, cli):
    # A margin of -0.999999 demands a million times PyTorch's speed: the gate must trip
    # on any host; a margin of a million lets anything pass.
    slow = cli("bench", bundle, *QUICK, "--device", "cpu", "--fail-if-slower-than", "torch", "--margin", "-0.999999", "--json")
    assert slow.exit_code == ExitCode.REGRESSION
    gate = json.loads(slow.stdout)["gate"]
    assert gate["passed"] is False and gate["best"].startswith("cpu:") and gate["ratio"] > 1e-6
    lenient = cli("bench", bundle, *QUICK, "--device", "cpu", "--fail-if-slower-than", "torch", "--margin", "1e6")
    assert lenient.exit_code == 0 and "gate passed" in lenient.stdout
    missing = cli("bench", bundle, *QUICK, "--baseline", "none", "--fail-if-slower-than", "torch")
    assert missing.exit_code == ExitCode.USAGE and "is not measured" in missing.stderr


def test_tune_keeps_the_fastest_configuration_and_records_the_search(cli, tmp_path):
    out = tmp_path / "tuned.hxc"
    result = cli("compile", "hxc.examples:convnet", "-t", "cpu:x86-64-v3,rocm:gfx942", "--tune", "-o", out)
    assert result.exit_code == 0, result.output
    m = read_manifest(out)
    cpu = m.artifact("cpu:x86-64-v3")
    assert [t.config for t in cpu.tuning] == ["default", "no-im2col", "no-data-tiling", "global-data-tiling", "channels-last", "ukernels-all"]
    [chosen] = [t for t in cpu.tuning if t.chosen]
    assert chosen.p50_ms == min(t.p50_ms for t in cpu.tuning if t.p50_ms is not None)
    assert cpu.flags == chosen.flags  # the bundle carries the winner
    assert m.artifact("rocm:gfx942").tuning == ()  # not runnable here: left as compiled
    x = torch.randn(1, 3, 32, 32)
    from hxc.examples import convnet

    model, _ = convnet()
    with torch.no_grad():
        torch.testing.assert_close(hxc.runtime.load(out, device="cpu")(x), model(x), atol=1e-4, rtol=1e-3)


def test_cpu_numbers_agree_with_and_without_lavapipe_in_the_run(tmp_path):
    """lavapipe computes on the CPU's cores: timed interleaved with it, a CPU artifact's
    mean latency was 3.7x and its p99 25x what it is alone. Each device now gets a
    worker process, and the workers take turns. Runs with and without the Vulkan
    artifact alternate (A B A B A B, so load from other processes reaches both alike),
    and the CPU numbers of the two, in every scenario, must agree within the spread
    that repeating one configuration shows."""
    import math
    import statistics

    from hxc.bench.measure import Budget
    from hxc.bench.run import run_bench
    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions

    bundle = tmp_path / "cnn.hxc"
    # One artifact per device (the portable Vulkan variant only), so nothing is interleaved.
    assert build_bundle("hxc.examples:convnet", bundle, "cpu:host,vulkan:spirv", options=ImportOptions(dynamic_batch=True)).written
    budget = Budget(warmup=3, min_iterations=30, min_seconds=0.3, max_seconds=5, phase_seconds=0.3)
    runs: dict[str, list] = {"alone": [], "with lavapipe": []}
    for _ in range(3):
        for name, device in (("alone", "cpu"), ("with lavapipe", None)):
            result = run_bench(bundle, baselines=(), device=device, offline_batches=(2,), budget=budget, record=False)
            assert not result.errors
            runs[name].append({(p.candidate, p.batch): p for p in result.profiles})

    first = runs["with lavapipe"][0]
    assert set(first) == {(a, b) for a in ("cpu:host", "vulkan:spirv") for b in (1, 2)}
    for (candidate, batch), p in first.items():
        assert p.conditions.isolated and p.conditions.interleaved_with == ()  # one artifact per device here
        assert p.latency.iterations >= budget.min_iterations or p.latency.mean_ms * p.latency.iterations >= 5000

    for batch in (1, 2):
        for metric in ("p50_ms", "mean_ms"):
            logs = {name: [math.log(getattr(r[("cpu:host", batch)].latency, metric)) for r in rs] for name, rs in runs.items()}
            a, b = logs["alone"], logs["with lavapipe"]
            noise = (max(a) - min(a)) + (max(b) - min(b)) + math.log(1.25)
            gap = abs(statistics.median(a) - statistics.median(b))
            assert gap <= noise, (batch, metric, [round(math.exp(x), 4) for x in a], [round(math.exp(x), 4) for x in b])


def test_block_medians_pair_contenders_round_by_round():
    """The harness keeps each block's median in order, one block per contender per
    round, so `paired_ratio` compares blocks that ran in the same round."""
    import statistics

    from hxc.bench.measure import Budget, Contender, Timing, measure, paired_ratio

    calls: list[str] = []

    def contender(name: str) -> Contender:
        return Contender(name, "cpu", lambda: None, lambda _inputs: lambda: calls.append(name), device_time_only=False)

    # Zero-length blocks: one call each, so every block's median is that call's time.
    budget = Budget(warmup=0, min_iterations=6, min_seconds=0.0, block_seconds=0.0, settle_seconds=0.0)
    a, b = measure([contender("a"), contender("b")], [], budget)
    assert calls[2:] == ["a", "b"] * 6  # after each one's first call: A B A B ...
    for t in (a, b):
        assert t.block_medians_ms == t.latencies_ms and len(t.block_medians_ms) == 6
    assert paired_ratio(a, a) == 1.0
    assert paired_ratio(a, b) == statistics.median(x / y for x, y in zip(a.block_medians_ms, b.block_medians_ms))
    elsewhere = Timing(contender("c"), 0.0, 0.0, None, list(b.latencies_ms), block_medians_ms=list(b.block_medians_ms))
    elsewhere.contender.device = "vulkan"
    assert paired_ratio(a, elsewhere) is None  # different devices never share a round
    apart = Timing(contender("d"), 0.0, 0.0, None, list(b.latencies_ms), block_medians_ms=list(b.block_medians_ms))
    assert paired_ratio(a, apart) is None  # nor do contenders timed in other processes, on any device


def _timed(candidate: str, sha: str | None, p50: float, p90: float, load: float | None = None):
    from hxc.manifests.schema import Conditions, LatencyStats, Profile

    stats = LatencyStats(p50, p90, p90, p50, 0.0, p50, 200)
    return Profile("h", candidate, sha, "cpu", "single-stream", 4, stats, 1000 / p50, 4000 / p50, None, None, None, True,
                   "now", conditions=Conditions((), True, load))  # fmt: skip


def test_noisy_timings_and_tiny_ratios_say_so(synthetic_manifest, cli):
    from rich.console import Console

    from hxc.bench.report import html_report, number, profiles_table, ratio, row_json, rows
    from hxc.manifests.schema import Host
    from hxc.runtime import select

    m = synthetic_manifest(("cpu:x86-64-v3", "vulkan:spirv"))
    sha = {a.id: a.sha256 for a in m.artifacts}
    # torch's p90 270x its p50 (a busy machine), lavapipe 300x slower than torch.
    profiles = (_timed("torch:eager", None, 0.361, 97.5, load=2.0), _timed("cpu:x86-64-v3", sha["cpu:x86-64-v3"], 0.02, 0.027),
                _timed("vulkan:spirv", sha["vulkan:spirv"], 108.0, 110.0))  # fmt: skip
    host = Host("h", "vm", "AMD EPYC", 2, (), (), {})
    m = dataclasses.replace(m, hosts=(host,), profiles=profiles)
    console = Console(width=250, record=True)
    console.print(profiles_table(m))
    text = console.export_text()
    assert "0.00x" not in text and "0.0033x*" in text and "26,908% noisy" in text
    assert "* noise: 3 of 3 rows" in text and "re-run `hxc bench`" in text and "up to 2.0 cores" in text
    assert [row_json(r)["noisy"] for r in rows(m)] == [True, True, True]  # torch's own, and every ratio to it
    assert number(26960.4) == "26,960" and number(0.0224) == "0.0224" and ratio(1 / 300) == "0.0033x"
    page = html_report(m, select(m, _sapphire_rapids()), "vm")
    assert "e+0" not in page and "re-run `hxc bench`" in page
    assert "The loader's pick on vm" in page and "<b>cpu:x86-64-v3</b>" in page


def _sapphire_rapids():
    from hxc.runtime.probe import DriverStatus, HostProbe
    from hxc.targets import Device, families
    from hxc.targets.cpu import SAPPHIRE_RAPIDS, HostCpu

    cpu = HostCpu(isa="x86_64", model="AMD EPYC", features=tuple(sorted(SAPPHIRE_RAPIDS)), cores=2)
    dev = Device("local-task", "local-task", "AMD EPYC", "cpu", "x86_64", cpu.features)
    drivers = tuple(DriverStatus(d, f.name, d == "local-task", None, (dev,) if d == "local-task" else ())
                    for f in families() for d in f.drivers)  # fmt: skip
    return HostProbe(hostname="vm", os="Linux", cpu=cpu, drivers=drivers, seconds=0.0)

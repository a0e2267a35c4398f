"""Placing a staged bundle's stages on this host's devices (issue 29, items 2 and 3, wired in):
`hxc bench` records a profile per stage and device, `hxc select --explain` shows the
solver's placement and its arithmetic, `--placement` / `--device-memory` force or cap
it (bad ones are one-line errors), and `load` / `hxc run` run each stage on its device
to PyTorch's outputs; across devices or with `--pin split`, `hxc run`, `hxc bench` and
`hxc.pool.load_pipeline` run it on a pipeline of worker processes. A tiny MLP in two stages, for the CPU and lavapipe; Vulkan runs
only in child processes (bench workers, `hxc run` subprocesses), never in pytest's."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from hxc.errors import ExitCode
from hxc.golden import compare
from hxc.manifests import read_manifest

SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def mlp():
        torch.manual_seed(1)
        blocks = [nn.Sequential(nn.Linear(12, 12), nn.ReLU()) for _ in range(4)]
        return nn.Sequential(*blocks, nn.Sequential(nn.Linear(12, 3))).eval(), (torch.randn(4, 12),)
    """
)
FAST = ("--min-iterations", "10", "--min-time", "0.05", "--baseline", "none")


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """The MLP in 2 stages for cpu:host and vulkan:spirv, its input and PyTorch's output."""
    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions

    d = tmp_path_factory.mktemp("placed")
    (d / "hxc_placed_mlp.py").write_text(SOURCE)
    out = d / "mlp.hxc"
    result = build_bundle(f"{d / 'hxc_placed_mlp.py'}:mlp", out, "cpu:host,vulkan:spirv", options=ImportOptions(stages="2"))
    assert result.written, [b.error for b in result.failed]
    sys.path.insert(0, str(d))
    try:
        import hxc_placed_mlp

        model, (x,) = hxc_placed_mlp.mlp()
    finally:
        sys.path.remove(str(d))
    with torch.no_grad():
        expected = model(x).numpy()
    np.savez(d / "x.npz", input_0=x.numpy())
    return out, x.numpy(), expected


@pytest.fixture(scope="module")
def benched(staged, tmp_path_factory):
    """A copy of the bundle with per-stage profiles of both devices (each timed in a worker process)."""
    import shutil

    from click.testing import CliRunner

    from hxc.cli import main

    out = tmp_path_factory.mktemp("benched") / "mlp.hxc"
    shutil.copytree(staged[0], out)
    result = CliRunner().invoke(main, ["bench", str(out), *FAST, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def _hxc(*args, timeout: float = 240) -> subprocess.CompletedProcess:
    """`hxc ...` in a child process (where lavapipe may run)."""
    return subprocess.run([sys.executable, "-m", "hxc.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _close(got: np.ndarray, expected: np.ndarray) -> None:
    c = compare(got, expected, "f32")
    assert c.ok, (c.max_abs, c.max_rel)


def _one_line_error(result, fragment: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


# --- profiles and the solver's choice ---------------------------------------------------


def test_bench_records_each_stage_on_each_device(benched):
    bundle, report = benched
    m = read_manifest(bundle)
    by_id = {a.id: a for a in m.artifacts}
    staged = {(p.candidate, p.stage) for p in m.profiles}
    # Each stage alone on each device (its own artifact's bytes), and each whole chain as before.
    assert staged == {("cpu:host#s0", 0), ("cpu:host#s1", 1), ("vulkan:spirv#s0", 0), ("vulkan:spirv#s1", 1),
                      ("cpu:host", None), ("vulkan:spirv", None)}, staged  # fmt: skip
    for p in m.profiles:
        art = by_id[p.candidate] if p.stage is not None else by_id[f"{p.candidate}#s0"]
        assert p.artifact_sha256 == art.sha256 and p.latency.iterations >= 10
    assert {r["candidate"] for r in report["results"]} == {c for c, _ in staged}


def test_select_explains_the_single_device_choice_on_this_host(benched, staged, cli):
    bundle, _ = benched
    result = cli("select", bundle, "--explain")
    assert result.exit_code == 0, result.output
    text = result.stdout
    # Lavapipe is many times slower than the CPU here, and a split pays a hop: the CPU alone.
    assert "stage placement (by the solver, objective latency): stages 0-1 on cpu" in text, text
    assert "why: cpu alone is predicted best (no split has better latency)" in text
    assert "best single device: cpu:" in text and "search: exact over all 4 assignments" in text
    assert "device vulkan = vulkan: " in text
    placed = json.loads(cli("select", bundle, "--json").stdout)["placement"]
    assert placed["assignment"] == ["cpu", "cpu"] and placed["source"] == "solver" and not placed["split"]
    assert placed["predicted"]["latency_ms"] > 0 and placed["explain"][0].startswith("objective: latency")
    # Without per-stage profiles, the chain runs on the selection's best device, and says so.
    plain = json.loads(cli("select", staged[0], "--json").stdout)
    assert plain["placement"]["source"] == "single" and "no per-stage profiles" in plain["placement"]["reason"]


def test_a_memory_cap_that_no_single_device_meets_splits_and_runs_like_pytorch(benched, staged, cli):
    bundle, _ = benched
    m = read_manifest(bundle)
    sizes = [s.weights_bytes for s in m.stages]
    cap = max(sizes)  # each device holds one stage, neither holds both
    result = cli("select", bundle, "--device-memory", f"cpu={cap},vulkan={cap}", "--json")
    assert result.exit_code == 0, result.output
    placed = json.loads(result.stdout)["placement"]
    assert placed["split"] and sorted(placed["assignment"]) == ["cpu", "vulkan"], placed
    assert any(line.startswith("why: no single device can run it (the model needs") for line in placed["explain"])

    # `hxc run` runs the solver's split (lavapipe in the child) to PyTorch's outputs.
    _, _, expected = staged
    x = staged[0].parent / "x.npz"
    run = _hxc("run", bundle, "-i", x, "-o", bundle.parent / "y.npz", "--device-memory", f"cpu={cap},vulkan={cap}", "--json")
    assert run.returncode == 0, run.stderr
    ran = json.loads(run.stdout)
    assert ran["placement"]["placement"] == placed["placement"] and ran["artifact"] in ("cpu:host+vulkan:spirv",
                                                                                         "vulkan:spirv+cpu:host")  # fmt: skip
    with np.load(bundle.parent / "y.npz") as y:
        _close(y["output_0"], expected)

    # A cap below the smallest stage fits nothing: one line, exit 4.
    result = cli("select", bundle, "--device-memory", f"cpu={min(sizes) - 1},vulkan={min(sizes) - 1}")
    assert result.exit_code == ExitCode.NO_COMPATIBLE_ARTIFACT
    _one_line_error(result, "alone needs")


def test_bench_times_a_forced_placement_end_to_end(benched, cli):
    bundle, _ = benched
    before = len(read_manifest(bundle).profiles)
    result = cli("bench", bundle, "--placement", "0:cpu,1:local-task", *FAST[:4], "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["candidate"] for r in report["results"]] == ["stages 0-1:cpu"] and not report["recorded"]
    assert len(read_manifest(bundle).profiles) == before


# --- forced placements ------------------------------------------------------------------


def test_forced_placement_across_devices_equals_pytorch(staged):
    bundle, _, expected = staged
    out = bundle.parent / "forced.npz"
    run = _hxc("run", bundle, "-i", bundle.parent / "x.npz", "-o", out, "--placement", "0:cpu,1:vulkan", "--json")
    assert run.returncode == 0, run.stderr
    ran = json.loads(run.stdout)
    assert ran["artifact"] == "cpu:host+vulkan:spirv" and ran["placement"]["source"] == "forced"
    assert [s["artifact"] for s in ran["placement"]["stages"]] == ["cpu:host#s0", "vulkan:spirv#s1"]
    # Two devices: a pipeline of a worker per device, each holding its own stage.
    assert ran["placement"]["runner"] == "pipeline" and not ran["placement"]["pin"]
    assert [(w["name"], w["artifacts"]) for w in ran["placement"]["workers"]] == [("cpu", ["cpu:host#s0"]),
                                                                                  ("vulkan", ["vulkan:spirv#s1"])]  # fmt: skip
    assert "not costed: no per-stage profiles" in ran["placement"]["reason"]
    with np.load(out) as y:
        _close(y["output_0"], expected)


def test_load_takes_a_placement_string_or_a_device_per_stage(staged):
    import hxc.runtime

    bundle, x, expected = staged
    for placement in ("0:cpu,1:local-task", ("cpu", "cpu:host")):  # CPU only: no Vulkan in this process
        model = hxc.runtime.load(bundle, placement=placement)
        assert model.placement is not None and model.placement.source == "forced"
        assert model.placement.assignment == ("cpu", "cpu") and model.candidate.id == "cpu:host"
        _close(model(x), expected)
        assert "stage placement (forced, objective latency): stages 0-1 on cpu" in model.explain()


# --- on the pipeline of worker processes ---------------------------------------------


def _two_cores() -> None:
    import os

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("--pin split needs a core per stage worker")


def test_run_a_pinned_worker_per_stage_on_one_device_equals_pytorch(staged):
    """`--placement 0:cpu,1:cpu --pin split`: two CPU workers, one core each, each with
    its own stage; the tensor between them in shared memory."""
    _two_cores()
    bundle, _, expected = staged
    out = bundle.parent / "pinned.npz"
    run = _hxc("run", bundle, "-i", bundle.parent / "x.npz", "-o", out, "--placement", "0:cpu,1:cpu", "--pin", "split",
               "--json")  # fmt: skip
    assert run.returncode == 0, run.stderr
    placed = json.loads(run.stdout)["placement"]
    assert placed["runner"] == "pipeline" and placed["pin"] and placed["placement"] == "0-1:cpu"
    (w0, w1) = placed["workers"]
    assert (w0["name"], w0["artifacts"], w1["name"], w1["artifacts"]) == ("cpu[0]", ["cpu:host#s0"], "cpu[1]", ["cpu:host#s1"])
    assert len(w0["cpus"]) == 1 and w0["cpus"] != w1["cpus"]
    with np.load(out) as y:
        _close(y["output_0"], expected)
    # On one device unpinned, the stages stay one chain in one worker process.
    one = _hxc("run", bundle, "-i", bundle.parent / "x.npz", "--placement", "0:cpu,1:cpu", "--json")
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["placement"]["runner"] == "one process"


def test_bench_a_pinned_pipeline_reports_throughput_latency_and_the_callers_cpu(benched, cli):
    _two_cores()
    bundle, _ = benched
    before = len(read_manifest(bundle).profiles)
    result = cli("bench", bundle, "--placement", "0:cpu,1:cpu", "--pin", "split", "--in-flight", "4", *FAST[:4], "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    pipe, placed = report["pipeline"], report["placement"]
    assert not report["recorded"] and len(read_manifest(bundle).profiles) == before
    assert pipe["runner"] == "pipeline" and pipe["in_flight"] == 4 and [w["name"] for w in pipe["workers"]] == ["cpu[0]", "cpu[1]"]
    assert pipe["items_per_s"] > 0 and pipe["items"] >= 16 and pipe["latency_ms"]["samples"] >= 10
    assert 0 < pipe["latency_ms"]["p50"] <= pipe["latency_ms"]["p99"]
    assert pipe["caller_cpu_ms_per_item"] > 0 and 0 < pipe["caller_cpu_share_of_a_core"] < 2
    assert set(pipe["busy_share"]) == {"cpu[0]", "cpu[1]"}
    # Costed as it ran: a worker per stage, the hop between them through shared memory.
    assert placed["pin"] and placed["workers"] == ["cpu[0]", "cpu[1]"]
    # (This MLP's stages take less than the hop: the hop may be the bottleneck.)
    assert pipe["predicted"]["bottleneck"] in ("cpu[0]", "cpu[1]", "cpu[0]<->cpu[1]") and placed["predicted"]["items_per_s"] > 0
    # Text: the same figures for people.
    text = cli("bench", bundle, "--placement", "0:cpu,1:cpu", "--pin", "split", *FAST[:4]).stdout
    assert "throughput, 4 in flight:" in text and "caller CPU" in text and "latency, one in flight: p50" in text
    # `hxc select --pin split` costs the solver's choice the same way.
    chosen = json.loads(cli("select", bundle, "--pin", "split", "--json").stdout)["placement"]
    assert chosen["pin"] and chosen["workers"] == ["cpu[0]", "cpu[1]"] and chosen["source"] == "solver"
    assert "pinned: each stage has its own worker" in chosen["explain"][0]


def test_load_pipeline_runs_like_the_model(benched, staged):
    """The Python entry: `hxc.pool.load_pipeline`, forced and pinned, or the solver's
    choice; called like the model, numpy or torch."""
    from hxc.pool import load_pipeline

    _two_cores()
    bundle, _ = benched
    _, x, expected = staged
    with load_pipeline(bundle, placement="0:cpu,1:local-task", pin="split", in_flight=2) as pipe:
        _close(pipe(x), expected)
        y = pipe(torch.from_numpy(x))
        assert isinstance(y, torch.Tensor)
        _close(y.numpy(), expected)
        assert [w.name for w in pipe.workers] == ["cpu[0]", "cpu[1]"] and pipe.artifacts == ("cpu:host#s0", "cpu:host#s1")
        text = pipe.explain()
    assert "stage placement (forced, objective latency; pinned: workers cpu[0], cpu[1]): stages 0-1 on cpu" in text
    assert "runs as a pipeline of 2 worker process(es) (pinned: a worker per stage)" in text
    with load_pipeline(bundle) as pipe:  # the solver's: the CPU alone here, one worker
        assert pipe.placement.source == "solver" and [w.name for w in pipe.workers] == ["cpu"]
        got = list(pipe.map([[x], [x]]))
    for g in got:
        _close(g, expected)


def test_pipeline_flags_in_bad_combinations_are_one_line_errors(staged, cli, tmp_path):
    from hxc.build import build_bundle

    bundle = staged[0]
    x = bundle.parent / "x.npz"
    whole = tmp_path / "whole.hxc"
    assert build_bundle(f"{bundle.parent / 'hxc_placed_mlp.py'}:mlp", whole, "cpu:host").written
    cases = [
        (("run", whole, "-i", x, "--pin", "split"), "--pin needs --devices (a pool of devices), or a staged bundle"),
        (("run", bundle, "-i", x, "--pin", "cpu=0"), "a staged bundle's pipeline takes --pin split"),
        (("run", bundle, "-i", x, "--pin", "split", "--in-process"), "--pin split runs each stage in a worker process"),
        (("run", bundle, "-i", x, "--device", "cpu", "--pin", "split"), "--device and --pin exclude each other"),
        (("bench", bundle, "--in-flight", "4"), "--in-flight times a pipeline of workers; this placement runs in one process"),
        (("bench", bundle, "--placement", "0:cpu,1:cpu", "--pool"), "do not apply to --pool"),
        (("bench", whole, "--in-flight", "2"), "time a staged bundle"),
        (("serve", bundle, "--placement", "0:cpu,1:cpu"), "hxc serve --placement is not built yet"),
    ]
    for args, fragment in cases:
        result = cli(*args)
        assert result.exit_code == ExitCode.USAGE, (args, result.output)
        _one_line_error(result, fragment)
    from hxc.errors import UsageError
    from hxc.pool import load_pipeline

    with pytest.raises(UsageError, match="no staged chain of this bundle runs here|for a staged bundle"):
        load_pipeline(whole, pin="split")


BAD = [
    (("--placement", "0:cpu"), "--placement: stage(s) 1 placed nowhere"),
    (("--placement", "0:cpu,1:nope"), "--placement: 'nope' is not a device that can run this model's stages here"),
    (("--placement", "0-1:cpu,1:vulkan"), "--placement: stage 1 is placed twice (cpu and vulkan)"),
    (("--placement", "0-2:cpu"), "--placement: '0-2:cpu': the model has stages 0-1"),
    (("--placement", "cpu"), "--placement: 'cpu' is not STAGE[-STAGE]:DEVICE"),
    (("--device-memory", "vulkan=2XB"), "--device-memory vulkan: '2XB' is not a size"),
    (("--device-memory", "cuda=1GiB"), "--device-memory: 'cuda' is not a device that can run this model's stages"),
    (("--device-memory", "cpu"), "--device-memory: 'cpu' is not DEVICE=SIZE"),
    (("--device-memory", "cpu=1GiB,local-task=2GiB"), "--device-memory: cpu is given twice"),
    (("--device", "cpu", "--placement", "0:cpu,1:cpu"), "--device and --placement/--device-memory exclude each other"),
]


@pytest.mark.parametrize("args, fragment", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_placement_flags_are_one_line_usage_errors(staged, cli, args, fragment):
    bundle = staged[0]
    for command in (("select", bundle), ("run", bundle, "-i", bundle.parent / "x.npz")):
        result = cli(*command, *args)
        assert result.exit_code == ExitCode.USAGE, result.output
        _one_line_error(result, fragment)


def test_placement_flags_need_a_staged_bundle(staged, cli):
    from hxc.build import build_bundle

    whole = staged[0].parent / "whole.hxc"
    assert build_bundle(f"{staged[0].parent / 'hxc_placed_mlp.py'}:mlp", whole, "cpu:host").written
    result = cli("select", whole, "--placement", "0:cpu")
    assert result.exit_code == ExitCode.USAGE
    _one_line_error(result, "--placement and --device-memory are for a staged bundle")


def test_later_stages_are_timed_on_tensors_of_their_recorded_shapes(staged):
    from hxc.runtime.stages import stage_inputs

    bundle, x, _ = staged
    m = read_manifest(bundle)
    assert stage_inputs(m, m.stages[0], [x])[0] is x
    [h] = stage_inputs(m, m.stages[1], [x])
    assert h.shape == (4, 12) and h.dtype == np.float32 and h.std() > 0.5

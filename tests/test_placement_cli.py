"""Placing a staged bundle's stages on this host's devices (issue 29, item 2, wired in):
`hxc bench` records a profile per stage and device, `hxc select --explain` shows the
solver's placement and its arithmetic, `--placement` / `--device-memory` force or cap
it (bad ones are one-line errors), and `load` / `hxc run` run each stage on its device
to PyTorch's outputs. A tiny MLP in two stages, for the CPU and lavapipe; Vulkan runs
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

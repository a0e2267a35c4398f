"""Engines beside IREE: ONNX Runtime and AOTInductor artifacts in the same bundle,
built from the same model, checked against PyTorch, chosen by the loader only where
their runtime is present and, after `hxc bench`, only where they measure faster."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import hxc.runtime
from hxc.errors import ExitCode
from hxc.manifests import read_manifest
from hxc.manifests.bundle import file_sha256
from hxc.manifests.schema import LatencyStats, Profile
from hxc.runtime.probe import probe_host
from hxc.runtime.select import select

ENGINES = {"cpu:host": "iree", "cpu:onnxruntime": "onnxruntime", "cpu:inductor": "inductor"}
QUICK = ["--min-time", "0.05", "--min-iterations", "5", "--max-time", "5"]


@pytest.fixture(scope="session")
def three(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example CNN with a dynamic batch, built by all three engines for the CPU."""
    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions

    out = tmp_path_factory.mktemp("engines") / "cnn.hxc"
    result = build_bundle("hxc.examples:convnet", out, "cpu:host", backends="iree,onnxruntime,inductor",
                          options=ImportOptions(dynamic_batch=True))  # fmt: skip
    assert result.written, [(r.id, r.error) for r in result.failed]
    return out


def test_every_engine_builds_a_first_class_artifact(three):
    m = read_manifest(three)
    arts = {a.id: a for a in m.artifacts}
    assert {i: a.engine for i, a in arts.items()} == ENGINES
    for a in arts.values():
        assert a.status == "ok" and a.compile_seconds > 0 and a.file
        assert file_sha256(three / a.file) == a.sha256 and (three / a.file).stat().st_size == a.size
    ort, aoti = arts["cpu:onnxruntime"], arts["cpu:inductor"]
    assert ort.backend == "CPUExecutionProvider" and "graph_optimization_level=ORT_ENABLE_ALL" in ort.flags
    assert ort.verified.startswith("golden sample") and aoti.verified.startswith("golden sample")
    # AOTInductor code is tied to this CPU and this torch build, and says so.
    assert aoti.requires.packages == (f"torch=={torch.__version__}",)
    assert aoti.requires.isa == "x86_64" and "avx2" in aoti.requires.cpu_features
    assert arts["cpu:host"].backend == "llvm-cpu"  # the field keeps its meaning for IREE


@pytest.mark.parametrize("artifact", list(ENGINES))
def test_each_engine_matches_pytorch_at_any_batch(three, artifact):
    from hxc.examples import convnet

    model, _ = convnet()
    loaded = hxc.runtime.load(three, device=artifact, strict=True)
    assert loaded.artifact.id == artifact
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), atol=1e-4, rtol=1e-3)


def test_verify_checks_every_engine(three, cli):
    out = json.loads(cli("verify", three, "--json").stdout)
    assert {r["artifact"]: r["ok"] for r in out["results"]} == {a: True for a in ENGINES}


def test_a_missing_runtime_rejects_its_artifacts_with_the_reason(three, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    sel = select(read_manifest(three), probe_host())
    why = {r.artifact.id: r.reason for r in sel.rejected}
    assert why == {"cpu:onnxruntime": "onnxruntime cannot be imported: pip install 'hxc[onnx]'"}
    assert {c.artifact.id for c in sel.candidates} == {"cpu:host", "cpu:inductor"}


def test_inductor_needs_the_torch_build_it_was_made_with(three):
    m = read_manifest(three)
    other = tuple(dataclasses.replace(a, requires=dataclasses.replace(a.requires, packages=("torch==2.0.0",)))
                  if a.engine == "inductor" else a for a in m.artifacts)  # fmt: skip
    sel = select(dataclasses.replace(m, artifacts=other), probe_host())
    [rejected] = sel.rejected
    assert rejected.artifact.id == "cpu:inductor"
    assert rejected.reason == f"built against torch 2.0.0; this host has torch {torch.__version__}"


def test_the_runtime_stays_torch_free_unless_inductor_is_chosen(three):
    script = textwrap.dedent(
        """
        import sys, numpy as np, hxc.runtime
        x = np.zeros((2, 3, 32, 32), np.float32)
        for device in ("cpu:host", "cpu:onnxruntime", "cpu:inductor"):
            hxc.runtime.load(sys.argv[1], device=device, strict=True)(x)
            print(device, "torch" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", script, str(three)], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:3] == ["cpu:host False", "cpu:onnxruntime False", "cpu:inductor True"]


def _profile(m, probe, artifact_id: str, p50: float) -> Profile:
    a = m.artifact(artifact_id)
    cpu = next(d for d in probe.devices if d.driver == "local-task")
    stats = LatencyStats(p50_ms=p50, p90_ms=p50, p99_ms=p50, mean_ms=p50, stdev_ms=0.0, min_ms=p50, iterations=100)
    return Profile(host_id=probe.host().id, candidate=a.id, artifact_sha256=a.sha256, device=cpu.label,
                   scenario="single-stream", batch=1, latency=stats, throughput=1000 / p50, items_per_second=1000 / p50,
                   load_ms=None, first_call_ms=None, memory_mb=None, device_time_only=True, recorded="2026-01-01T00:00:00+00:00")  # fmt: skip


@pytest.mark.parametrize(("ort_ms", "iree_ms", "chosen"), [(0.1, 0.3, "cpu:onnxruntime"), (0.3, 0.1, "cpu:host")])
def test_recorded_profiles_decide_between_engines(three, ort_ms, iree_ms, chosen):
    m = read_manifest(three)
    probe = probe_host()
    profiles = (_profile(m, probe, "cpu:onnxruntime", ort_ms), _profile(m, probe, "cpu:host", iree_ms),
                _profile(m, probe, "cpu:inductor", 1.0))  # fmt: skip
    sel = select(dataclasses.replace(m, profiles=profiles), probe)
    assert sel.best.artifact.id == chosen and sel.best.measured_on == "this host"


def test_bench_measures_every_engine_and_the_loader_follows(three, tmp_path, cli):
    import shutil

    bundle = Path(shutil.copytree(three, tmp_path / "b.hxc"))
    out = json.loads(cli("bench", bundle, *QUICK, "--batch", "4", "--json").stdout)
    measured = {(r["candidate"], r["scenario"]) for r in out["results"]}
    assert {(a, s) for a in ENGINES for s in ("single-stream", "offline")} <= measured
    single = [r for r in out["results"] if r["scenario"] == "single-stream" and r["candidate"] in ENGINES]
    # Each is timed in a process of its own (runtimes' thread pools slow each other down).
    assert all(r["isolated"] and r["interleaved_with"] == [] for r in single)
    fastest = min(single, key=lambda r: r["p50_ms"])["candidate"]
    assert hxc.runtime.load(bundle).artifact.id == fastest


CUMPROD = textwrap.dedent(
    """
    import torch

    class Net(torch.nn.Module):  # torch.onnx.export has no ONNX function for cumprod; IREE and Inductor do
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.cumprod(self.fc(x), 1)

    def make():
        torch.manual_seed(0)
        return Net().eval(), (torch.randn(4, 8),)
    """
)


def test_an_export_failure_is_recorded_without_losing_the_others(tmp_path, cli):
    src = tmp_path / "cumprod.py"
    src.write_text(CUMPROD)
    named = cli("compile", f"{src}:make", "-t", "cpu:host", "-b", "iree,onnxruntime", "-o", tmp_path / "a.hxc")
    assert named.exit_code == ExitCode.PARTIAL and not (tmp_path / "a.hxc").exists()  # asked for by name: as for targets
    assert "cpu:onnxruntime: torch.onnx.export failed: No ONNX function found for" in named.stderr

    out = tmp_path / "b.hxc"
    result = cli("compile", f"{src}:make", "-t", "cpu:host", "-b", "iree,onnxruntime", "--allow-partial", "-o", out)
    assert result.exit_code == 0
    arts = {a.id: a for a in read_manifest(out).artifacts}
    assert arts["cpu:onnxruntime"].status == "failed" and "prims.prod" in arts["cpu:onnxruntime"].error
    assert arts["cpu:host"].status == "ok"
    x = torch.randn(4, 8)
    model, _ = __import__("runpy").run_path(str(src))["make"]()
    torch.testing.assert_close(hxc.runtime.load(out)(x), model(x).detach(), atol=1e-4, rtol=1e-3)


def test_ort_tuning_and_shared_weights_from_pytorch(tmp_path, cli):
    out = tmp_path / "mlp.hxc"
    result = cli("compile", "hxc.examples:mlp", "-t", "cpu", "-b", "onnxruntime", "--weights", "shared", "--tune", "-o", out)
    assert result.exit_code == 0, result.output
    m = read_manifest(out)
    [ort] = m.artifacts  # only the backend asked for
    assert [t.config for t in ort.tuning][:2] == ["default", "extended-opt"]
    [chosen] = [t for t in ort.tuning if t.chosen]
    assert ort.flags == chosen.flags and chosen.p50_ms == min(t.p50_ms for t in ort.tuning if t.p50_ms is not None)
    # Every weight is in weights.irpa once; the ONNX file points into it.
    assert "external_data=weights.irpa" in ort.flags
    assert ort.size < m.weights_for("fp32").size / 4
    from hxc.examples import mlp

    model, (x,) = mlp()
    with torch.no_grad():
        torch.testing.assert_close(hxc.runtime.load(out)(x), model(x), atol=1e-4, rtol=1e-3)


def test_an_onnx_model_is_its_own_onnxruntime_artifact(tmp_path, cli):
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort

    from hxc.examples import mlp

    model, (x,) = mlp()
    src = tmp_path / "mlp.onnx"
    torch.onnx.export(model, (x,), str(src), dynamo=False, opset_version=17)
    out = tmp_path / "m.hxc"
    assert cli("compile", src, "-t", "cpu:host", "-b", "iree,onnxruntime", "--weights", "shared", "-o", out).exit_code == 0
    m = read_manifest(out)
    art = m.artifact("cpu:onnxruntime")
    assert art.file == m.model.program_file == "model.onnx"  # the bundle's own copy, not a second one
    stored = onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in stored)
    direct = ort.InferenceSession(str(src))
    expected = direct.run(None, {direct.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(hxc.runtime.load(out, device="cpu:onnxruntime", strict=True)(x.numpy()), expected, rtol=1e-5, atol=1e-6)

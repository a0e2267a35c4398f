"""benchmarks/gpu_check.sh, the GPU proof (README, "GPU check"): the remote half's
bookkeeping, and the steps that run on the GPU host's Python, here on the CPU with no
network. (The whole check, wheels and a fresh host-like venv included, runs with
`benchmarks/gpu_check.sh dry-run`; it downloads wheels, so it is not part of this suite.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_check_steps  # noqa: E402


def _state(pid: int) -> str | None:
    """The process's state letter (Z: a zombie, dead), or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return fields[0]


def test_a_remote_run_without_its_wheels_says_why_and_skips_what_needs_hxc(tmp_path):
    """Nothing carried and a host Python without hxc: every planned step is accounted for,
    the record is complete, and the checkout's own hxc (on PYTHONPATH here) is not what the
    steps import."""
    folder = tmp_path / "carried"
    (folder / "wheels").mkdir(parents=True)
    host = tmp_path / "host"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", host], check=True, timeout=120)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ran = subprocess.run([sys.executable, REPO / "benchmarks" / "gpu_check.py", "remote", "--dir", folder, "--out", out,
                          "--python", host / "bin" / "python", "--budget", "400"],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert ran.returncode == 1, ran.stdout + ran.stderr
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["status"] == "complete" and doc["ok"] is False
    steps = {s["name"]: s for s in doc["steps"]}
    assert list(steps) == list(gpu_check.REMOTE_PLAN)
    assert steps["host"]["status"] == "ok" and steps["host"]["result"]["python"]
    assert steps["install"]["status"] == "skipped" and "gpu_check.sh local" in steps["install"]["error"]
    assert steps["versions"]["status"] == "failed" and "No module named 'hxc'" in steps["versions"]["error"]
    later = [s for name, s in steps.items() if name not in ("host", "install", "versions")]
    assert all(s["status"] == "skipped" and "hxc does not import" in s["error"] for s in later)
    assert "local.json" in doc["local"]["error"]
    assert "versions: FAILED" in (out / "gpu_check.log").read_text()


def test_a_step_past_its_slot_is_killed_with_its_children_and_the_next_step_runs(tmp_path):
    check = gpu_check.Check(tmp_path, 60, {"hang": (2, 1), "next": (30, 1)}, {})
    pid_file = tmp_path / "child.pid"
    hang = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
            "time.sleep(120)")  # fmt: skip
    hung = check.run("hang", [sys.executable, "-c", hang], env=dict(os.environ), cwd=tmp_path)
    assert hung.status == "timeout" and hung.rc is None and "timed out" in hung.error
    child = int(pid_file.read_text())
    for _ in range(50):  # killed with its group; reaped by whoever inherited it
        if _state(child) in (None, "Z", "X"):
            break
        subprocess.run(["sleep", "0.1"], check=True)
    assert _state(child) in (None, "Z", "X")

    fine = check.run("next", [sys.executable, "-c", "print('{\"rows\": 3}')"], env=dict(os.environ), cwd=tmp_path)
    assert fine.status == "ok" and fine.result == {"rows": 3}
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(s["name"], s["status"]) for s in doc["steps"]] == [("hang", "timeout"), ("next", "ok")]


def test_a_step_that_cannot_get_its_floor_is_not_started(tmp_path):
    """The budget keeps every later step's floor back: what cannot fit is skipped, not cut short."""
    check = gpu_check.Check(tmp_path, 5, {"early": (100, 1), "late": (100, 10)}, {})
    marker = tmp_path / "ran"
    touch = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    early = check.run("early", touch, env=dict(os.environ), cwd=tmp_path)
    late = check.run("late", touch, env=dict(os.environ), cwd=tmp_path)
    assert early.status == late.status == "skipped" and not marker.exists()
    assert "10 s are kept for later steps" in early.error and "not enough time left" in late.error


def test_an_install_into_a_read_only_environment_goes_to_a_prefix_the_steps_then_see(tmp_path):
    """A host Python whose environment cannot be written (pip says so; a stand-in script
    plays that part in front of the real interpreter): the install goes to a prefix, which
    every later step gets on its PYTHONPATH."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = wheels / "gcprobe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("gcprobe/__init__.py", "WHERE = __file__\n")
        z.writestr("gcprobe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: gcprobe\nVersion: 1.0\n")
        z.writestr("gcprobe-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("gcprobe-1.0.dist-info/RECORD", "")
    python = tmp_path / "python"
    python.write_text(f"""#!/bin/sh
case " $* " in
  *" install "*" --prefix "*) ;;
  *" install "*) echo "ERROR: Could not install packages due to an OSError: [Errno 30] Read-only file system: '/opt/x'" >&2; exit 1 ;;
esac
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    check = gpu_check.Check(tmp_path / "out", 600, {"install": (120, 5)}, {})
    host = gpu_check.Host(str(python), gpu_check._child_env(), work)
    gpu_check._install(check, host, wheels, wheel)
    assert [(s.name, s.status) for s in check.steps] == [("install", "failed"), ("install-prefix", "ok")]
    assert "Read-only file system" in check.steps[0].error
    seen = subprocess.run([python, "-c", "import gcprobe; print(gcprobe.WHERE)"], capture_output=True, text=True, env=host.env,
                          cwd=work, timeout=60)  # fmt: skip
    assert seen.returncode == 0 and seen.stdout.startswith(str(work / "prefix")), seen.stderr


def test_a_host_without_the_unversioned_libcuda_gets_a_link_on_the_loader_path(tmp_path):
    """IREE's CUDA driver asks the loader for "libcuda.so"; where only libcuda.so.1 is found,
    the steps get a link of that name on LD_LIBRARY_PATH (zlib stands in for the driver)."""
    zlib = gpu_check_steps.loaded_from(["libz.so.1", "libz.so"])
    assert zlib["dlopen"]["libz.so.1"] and zlib["path"]
    env = dict(os.environ)
    opens = [sys.executable, "-c", "import ctypes; ctypes.CDLL('libcuda.so')"]
    if not gpu_check_steps.loaded_from(["libcuda.so"])["dlopen"]["libcuda.so"]:  # a CUDA host has it already
        assert subprocess.run(opens, env=env, capture_output=True, timeout=60).returncode != 0
    shim = gpu_check.cuda_shim({"dlopen": {"libcuda.so.1": True, "libcuda.so": False}, "path": zlib["path"]}, tmp_path, env)
    assert shim == f"{tmp_path / 'libcuda-shim' / 'libcuda.so'} -> {zlib['path']}"
    assert subprocess.run(opens, env=env, capture_output=True, timeout=60).returncode == 0
    assert gpu_check.cuda_shim({"dlopen": {"libcuda.so": True}, "path": zlib["path"]}, tmp_path, {}) is None


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The check's CNN with a dynamic batch, for this host's CPU."""
    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions

    out = tmp_path_factory.mktemp("gpu-check") / "convnet.hxc"
    assert build_bundle(gpu_check.MODELS["convnet"], out, "cpu:host", options=ImportOptions(dynamic_batch=True)).written
    return out


def _step(*args: str | Path, timeout: float = 300) -> dict:
    ran = subprocess.run([sys.executable, REPO / "benchmarks" / "gpu_check_steps.py", *map(str, args)], capture_output=True,
                         text=True, timeout=timeout)  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return json.loads(ran.stdout)


def test_the_torch_step_matches_the_golden_sample_from_the_program_and_the_factory(cnn):
    doc = _step("torch", "--bundle", cnn, "--devices", "cpu", "--batch", "4", "--min-time", "0.01", "--max-time", "2")
    assert doc["sources"] == {"program.pt2": {"ok": True}, "factory": {"ok": True}}
    assert {(c["source"], c["ok"]) for c in doc["checks"]} == {("program.pt2", True), ("factory", True)}
    assert {(t["source"], t["batch"]) for t in doc["timings"]} == {(s, b) for s in ("program.pt2", "factory") for b in (1, 4)}
    assert all(t["iterations"] >= 1 and 0 < t["min_ms"] <= t["p50_ms"] <= t["p99_ms"] for t in doc["timings"])


def test_the_torch_step_rebuilds_only_the_checks_own_models():
    """A manifest's text never picks what code is imported."""
    made = SimpleNamespace(model=SimpleNamespace(source="os:getcwd", source_format="python"))
    assert gpu_check_steps._factory(made) is None
    ours = SimpleNamespace(model=SimpleNamespace(source=gpu_check.MODELS["convnet"], source_format="python"))
    assert gpu_check_steps._factory(ours) is not None


def test_the_pool_and_serve_steps_on_the_cpu(cnn):
    """The pool's rows against PyTorch, and the server's answers against the golden sample,
    with the CPU standing in for the GPU."""
    pool = _step("pool", "--bundle", cnn, "--devices", "cpu", "--rows", "24")
    assert pool["verdict"]["ok"] and pool["compare"]["ok"] and pool["verdict"]["rows"] == {"cpu:host": 24}
    served = _step("serve", cnn, "--devices", "cpu", "--gpu", "cpu", "--timeout", "200")
    assert served["verdict"]["ok"] and served["exit_code"] == 0 and served["events"][-1] == "stopped"
    assert [(r["sent_to"], r["status"], r["matches_golden"]) for r in served["requests"]] == [("gpu", 200, True), ("routed", 200, True)]
    assert set(served["verdict"]["ran_on"].values()) == {"cpu:host"}
    assert any('status="ok"' in line for line in served["metrics"])


def test_the_summary_sets_the_gpu_artifact_against_pytorch_on_cuda():
    """What the dry run cannot show (no CUDA here): CUDA's rows land in the GPU columns and
    the speed-up is PyTorch's p50 on CUDA over the GPU artifact's, the eager module first."""
    Step = gpu_check.Step
    bench = Step("bench:convnet", "ok", result={"results": [
        {"candidate": "cuda:sm_90", "device": "cuda: NVIDIA H100 80GB HBM3", "batch": 32, "p50_ms": 0.25},
        {"candidate": "cpu:x86-64-v3", "device": "local-task: Intel Xeon", "batch": 32, "p50_ms": 4.0}]})  # fmt: skip
    torch_run = Step("torch:convnet", "ok", result={
        "sources": {"program.pt2": {"ok": False, "error": "newer archive"}, "factory": {"ok": True}},
        "checks": [{"source": "factory", "device": "cuda", "ok": True}],
        "timings": [{"source": "factory", "device": "cuda", "batch": 32, "p50_ms": 0.5},
                    {"source": "factory", "device": "cpu", "batch": 32, "p50_ms": 3.0}]})  # fmt: skip
    s = gpu_check.summarize([bench, torch_run], "cuda")
    assert s["latency"] == [{"model": "convnet", "batch": 32, "hxc_gpu_p50_ms": 0.25, "hxc_gpu_artifact": "cuda:sm_90",
                             "hxc_cpu_p50_ms": 4.0, "hxc_cpu_artifact": "cpu:x86-64-v3", "torch_cuda_factory_p50_ms": 0.5,
                             "torch_cpu_factory_p50_ms": 3.0, "hxc_gpu_speedup_vs_torch_cuda": 2.0}]  # fmt: skip
    assert s["torch_loads_program_pt2"] == {"convnet": False} and s["torch_matches_golden"] == {"convnet": {"factory@cuda": True}}
    assert "convnet batch 32: hxc_gpu 0.25 ms" in "\n".join(gpu_check.summary_lines({"summary": s}))

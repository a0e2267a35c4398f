"""The command line as a thin layer: usage mistakes are caught by click's parameter
types and exit 2 with one line, before any work; baselines are resolved and the bench
gate judged in the library (fast tests on synthetic manifests and profiles)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from hxc.bench.baselines import NAMES, baseline, is_baseline, resolve
from hxc.bench.gate import judge
from hxc.errors import ExitCode, UsageError
from hxc.manifests.schema import PROGRAM_ONNX, LatencyStats, Profile


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["compile", "m.pt2", "-p", "fp32,fp8"], "Invalid value for '-p' / '--precision': unknown 'fp8'"),
        (["compile", "m.pt2", "--weights", "bad"], "Invalid value for '--weights'"),
        (["compile", "m.pt2", "--jobs", "0"], "Invalid value for '-j' / '--jobs'"),
        (["bench", "b.hxc", "--batch", "8,x"], "is not a comma-separated list of positive integers"),
        (["bench", "b.hxc", "--batch", "0"], "is not a comma-separated list of positive integers"),
        (["bench", "b.hxc", "--baseline", "tensorflow"], "unknown 'tensorflow'"),
        (["bench", "b.hxc", "--fail-if-slower-than", "tensorflow"], "'tensorflow' is not one of"),
        (["run", "b.hxc", "--nope"], "No such option '--nope'"),
        (["verify"], "Missing argument 'BUNDLE'"),
        (["nope"], "No such command 'nope'"),
    ],
)
def test_usage_mistakes_exit_2_with_one_line(args, fragment, cli, tmp_path):
    result = cli(*args)
    assert result.exit_code == ExitCode.USAGE, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert f"(see `hxc {args[0]} -h`)" in lines[0] or args[0] == "nope"
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


def test_usage_mistakes_with_json_print_json(cli):
    result = cli("bench", "b.hxc", "--batch", "x", "--json")
    assert result.exit_code == ExitCode.USAGE
    out = json.loads(result.stdout)
    assert out["ok"] is False and out["exit_code"] == 2 and "--batch" in out["error"]


def test_help_still_works(cli):
    assert cli("--help").exit_code == 0 and "compile" in cli("--help").stdout
    assert cli("bench", "-h").exit_code == 0 and "--fail-if-slower-than" in cli("bench", "-h").stdout


def test_a_factory_bundle_is_named_like_its_model(models, cli, tmp_path, monkeypatch):
    # `file.py:make_model` names the model after its file, in the manifest and the bundle.
    monkeypatch.chdir(tmp_path)
    result = cli("compile", f"{models['factory']}:make_model", "-t", "cpu:host", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bundle"] == "hxc_test_models.hxc"
    manifest = json.loads((tmp_path / "hxc_test_models.hxc" / "manifest.json").read_text())
    assert manifest["model"]["name"] == "hxc_test_models"


def test_baselines_resolve_from_the_bundle(synthetic_manifest):
    torch_bundle = synthetic_manifest(("cpu:x86-64-v3",))
    onnx_bundle = dataclasses.replace(
        torch_bundle, model=dataclasses.replace(torch_bundle.model, source_format="onnx", program_file=PROGRAM_ONNX)
    )
    def names(*wanted: str, m=torch_bundle) -> list[str]:
        chosen, skipped = resolve(wanted, m)
        assert skipped == []  # everything is installed here
        return [b.name for b in chosen]

    assert names("auto") == ["torch"]
    assert names("auto", m=onnx_bundle) == ["onnxruntime"]
    assert names("none") == []
    assert names("torch-compile", "auto", "torch") == ["torch-compile", "torch"]
    with pytest.raises(UsageError, match="runs the bundle's program.pt2, which this bundle does not hold.*use onnxruntime"):
        resolve(["torch"], onnx_bundle)
    with pytest.raises(UsageError, match="unknown baseline 'jax'"):
        resolve(["jax"], torch_bundle)
    assert NAMES == ("torch", "torch-compile", "onnxruntime")
    assert all(is_baseline(baseline(n).candidate) for n in NAMES) and not is_baseline("cpu:host")


def _profile(candidate: str, p50: float, sha: str | None, scenario: str = "single-stream") -> Profile:
    stats = LatencyStats(p50, p50, p50, p50, 0.0, p50, 10)
    return Profile("h", candidate, sha, "cpu", scenario, 1, stats, 1.0, 1.0, None, None, None, True, "now")  # type: ignore[arg-type]


def test_the_gate_compares_the_fastest_artifact_with_the_baseline():
    profiles = [_profile("torch:eager", 2.0, None), _profile("cpu:host", 2.2, "a"), _profile("vulkan:spirv", 9.0, "b"),
                _profile("cpu:host", 0.1, "a", scenario="offline")]  # fmt: skip
    torch = baseline("torch")
    strict = judge(profiles, torch, margin=0.0)
    assert (strict.best, strict.ratio, strict.passed, strict.exit_code) == ("cpu:host", 1.1, False, ExitCode.REGRESSION)
    assert "cpu:host p50 2.2 ms vs torch:eager 2 ms (1.10x the baseline's time, allowed 1.00x)" == strict.message
    assert judge(profiles, torch, margin=0.1).exit_code == ExitCode.OK
    with pytest.raises(UsageError, match="--fail-if-slower-than torch-compile: that baseline was not measured"):
        judge(profiles, baseline("torch-compile"), margin=0.0)


def test_verify_names_every_artifact_it_did_not_run_and_whether_its_bytes_matched(bundle, cli):
    from hxc.manifests import read_manifest

    everything = {a.id for a in read_manifest(bundle).artifacts}
    out = json.loads(cli("verify", bundle, "--json").stdout)
    ran = {r["artifact"] for r in out["results"]}
    not_run = {n["artifact"]: n for n in out["not_run"]}
    assert ran | set(not_run) == everything and not ran & set(not_run)
    assert not_run["cuda:sm_90"]["sha256_ok"] is True and "cuda" in not_run["cuda:sm_90"]["reason"]
    text = cli("verify", bundle)
    assert "sha256 ok; not run: " in text.stdout
    assert f"the other {len(not_run)} were not run here" in text.stdout and f"{len(not_run)} of them matched" in text.stdout
    # An artifact this host cannot run is still hash-checked.
    cuda = bundle / next(a.file for a in read_manifest(bundle).artifacts if a.id == "cuda:sm_90")
    cuda.write_bytes(cuda.read_bytes()[:-1] + b"x")
    tampered = cli("verify", bundle, "--json")
    assert tampered.exit_code == ExitCode.INTEGRITY
    assert {n["artifact"]: n["sha256_ok"] for n in json.loads(tampered.stdout)["not_run"]}["cuda:sm_90"] is False


@pytest.mark.parametrize("content", [b"import torch\n", b"\x89PNG" + bytes(range(256)) * 8], ids=["short", "long"])
def test_a_file_that_is_no_bundle_is_called_so(cli, tmp_path, content):
    path = tmp_path / "mlp.py"
    path.write_bytes(content)
    for command in ("inspect", "select", "verify"):
        result = cli(command, path)
        assert result.exit_code == ExitCode.ERROR and "not an hxc bundle" in result.stderr, result.stderr
        assert "truncated" not in result.stderr and "Traceback" not in result.stderr

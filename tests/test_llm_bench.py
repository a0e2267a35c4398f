"""`hxc bench` on a language-model bundle (issue 25, item 9): per artifact and device,
time to first token at prompts of 32 and 128 tokens and time per output token at batch
1, recorded as profiles (`Profile.generation` says which), shown by `--json`, `hxc
inspect` and `hxc report`, and read back by an hxc that knows nothing of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hxc.build import build_bundle
from hxc.compiler.imported import ImportOptions
from hxc.manifests import read_manifest
from hxc.manifests.schema import GenerationTiming

QUICK = ["--min-time", "0.05", "--min-iterations", "3", "--max-time", "5"]


def _build(tmp_path_factory, targets: str) -> Path:
    out = tmp_path_factory.mktemp("llm-bench") / "llama.hxc"
    result = build_bundle("hxc.examples.llm:tiny_llama", out, targets, use_cache=False,
                          options=ImportOptions(max_context=160))  # fmt: skip
    assert result.written, [r.error for r in result.failed]
    return result.output


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "cpu:host")


def test_bench_records_time_to_first_token_and_per_token(bundle, cli, tmp_path):
    result = cli("bench", bundle, *QUICK, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["recorded"] and out["errors"] == []
    rows = {(r["candidate"], r["phase"], r["prompt_tokens"]): r for r in out["results"]}
    assert set(rows) == {("cpu:host", "prefill", 32), ("cpu:host", "prefill", 128), ("cpu:host", "decode", 32)}
    first32, first128, per_token = rows["cpu:host", "prefill", 32], rows["cpu:host", "prefill", 128], rows["cpu:host", "decode", 32]
    assert 0 < first32["ttft_ms"] < first128["ttft_ms"]  # 1 prefill chunk vs 4
    assert per_token["tpot_ms"] > 0 and per_token["tokens_per_s"] == pytest.approx(1000 / per_token["tpot_ms"])
    assert all(r["batch"] == 1 and r["scenario"] == "single-stream" and r["device"] == out["results"][0]["device"]
               for r in rows.values())  # fmt: skip

    m = read_manifest(bundle)
    assert [p.generation for p in m.profiles] == [GenerationTiming("prefill", 32), GenerationTiming("prefill", 128),
                                                 GenerationTiming("decode", 32)]  # fmt: skip
    assert all(p.artifact_sha256 == m.artifact("cpu:host").sha256 for p in m.profiles)
    data = json.loads((bundle / "profiles.json").read_text())
    assert data["schema_version"] == "2.2"

    shown = cli("inspect", bundle).stdout
    assert "first token, prompt 128" in shown and "per token, after 32" in shown
    assert cli("report", bundle, "-o", tmp_path / "report.html").exit_code == 0
    page = (tmp_path / "report.html").read_text()
    assert "first token, prompt 32" in page and "per token, after 32" in page


def test_a_reader_that_knows_no_generation_field_still_reads_them(bundle, cli):
    # profiles.json 2.2 adds an optional field: a 2.1 reader ignores it (unknown keys are).
    assert cli("bench", bundle, *QUICK, "--no-record").exit_code == 0
    data = json.loads((bundle / "profiles.json").read_text())
    data["schema_version"] = "2.1"
    for p in data["profiles"]:
        p.pop("generation", None)
    (bundle / "profiles.json").write_text(json.dumps(data))
    m = read_manifest(bundle)
    assert m.profiles and all(p.generation is None for p in m.profiles)


def test_baselines_and_gates_are_refused_in_one_line(bundle, cli):
    for args in (["--baseline", "torch"], ["--fail-if-slower-than", "torch"]):
        result = cli("bench", bundle, *QUICK, *args)
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert "no baseline for language models" in result.output


@pytest.mark.heavy
def test_bench_on_lavapipe_too(tmp_path_factory, cli):
    bundle = _build(tmp_path_factory, "cpu:host,vulkan:spirv")
    out = json.loads(cli("bench", bundle, *QUICK, "--no-record", "--json").stdout)
    assert {(r["candidate"], r["phase"]) for r in out["results"]} >= {("vulkan:spirv", "prefill"), ("vulkan:spirv", "decode")}

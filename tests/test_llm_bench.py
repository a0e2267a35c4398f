"""`hxc bench` on a language-model bundle (issue 25, item 9; issue 26, item 4): per
artifact and device, time to first token at prompts of 32, 128 and 512 tokens (where the
context holds them) with prefill tokens/s, time per output token and decode tokens/s at
batch 1 and at the bundle's slots, and the artifact's memory (weights, KV bytes per
token), recorded as profiles (`Profile.generation` says which), shown by `--json`, `hxc
inspect` and `hxc report`, and read back by an hxc that knows nothing of them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hxc.bench.llm import cases
from hxc.build import build_bundle
from hxc.compiler.imported import ImportOptions
from hxc.manifests import read_manifest
from hxc.manifests.schema import GenerationTiming, LanguageModel

QUICK = ["--min-time", "0.05", "--min-iterations", "3", "--max-time", "5"]


def _build(tmp_path_factory, targets: str) -> Path:
    out = tmp_path_factory.mktemp("llm-bench") / "llama.hxc"
    # Without `mixed` (--no-mixed-step): bench times prefill and decode, and the compile is shorter.
    result = build_bundle("hxc.examples.llm:tiny_llama", out, targets, use_cache=False,
                          options=ImportOptions(max_context=160, slots=2, mixed_step=False))  # fmt: skip
    assert result.written, [r.error for r in result.failed]
    assert list(read_manifest(result.output).functions) == ["prefill", "decode"]
    return result.output


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "cpu:host")


def test_bench_records_time_to_first_token_and_per_token(bundle, cli, tmp_path):
    result = cli("bench", bundle, *QUICK, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["recorded"] and out["errors"] == []
    rows = {(r["candidate"], r["phase"], r["prompt_tokens"], r["batch"]): r for r in out["results"]}
    # No 512-token prompt: the context holds 160.
    assert set(rows) == {("cpu:host", "prefill", 32, 1), ("cpu:host", "prefill", 128, 1), ("cpu:host", "decode", 32, 1),
                         ("cpu:host", "decode", 32, 2)}  # fmt: skip
    first32, first128 = rows["cpu:host", "prefill", 32, 1], rows["cpu:host", "prefill", 128, 1]
    per_token, both_slots = rows["cpu:host", "decode", 32, 1], rows["cpu:host", "decode", 32, 2]
    assert 0 < first32["ttft_ms"] < first128["ttft_ms"]  # 1 prefill chunk vs 4
    assert first128["tokens_per_s"] == pytest.approx(128 * 1000 / first128["mean_ms"])  # prefill tokens/s
    assert per_token["tpot_ms"] > 0 and per_token["tokens_per_s"] == pytest.approx(1000 / per_token["tpot_ms"])
    # One decode call steps both slots: a token for each.
    assert both_slots["scenario"] == "offline" and both_slots["tokens_per_s"] == pytest.approx(2000 / both_slots["tpot_ms"])
    assert all(r["batch"] == 1 and r["scenario"] == "single-stream" for r in (first32, first128, per_token))
    assert len({r["device"] for r in rows.values()}) == 1

    m = read_manifest(bundle)
    weights = m.weights_for("fp32")
    assert weights is not None and m.language_model is not None
    memory = {"weights_bytes": weights.size, "kv_bytes_per_token": m.language_model.kv_bytes_per_token}
    assert all({k: r[k] for k in memory} == memory for r in rows.values())
    assert m.language_model.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # k and v, 2 layers, 2 KV heads of 16, f32
    assert [(p.generation.phase, p.generation.prompt_tokens, p.batch) for p in m.profiles] == [
        ("prefill", 32, 1), ("prefill", 128, 1), ("decode", 32, 1), ("decode", 32, 2)]  # fmt: skip
    assert all(p.generation == GenerationTiming(p.generation.phase, p.generation.prompt_tokens, **memory) for p in m.profiles)
    assert all(p.artifact_sha256 == m.artifact("cpu:host").sha256 for p in m.profiles)
    data = json.loads((bundle / "profiles.json").read_text())
    assert data["schema_version"] == "2.4"

    shown = cli("inspect", bundle).stdout
    assert "first token, prompt 128" in shown and "per token, after 32" in shown
    assert cli("report", bundle, "-o", tmp_path / "report.html").exit_code == 0
    page = (tmp_path / "report.html").read_text()
    assert "first token, prompt 32" in page and "per token, after 32" in page


def test_the_cases_follow_the_context_and_the_slots():
    def lm(max_context: int, slots: int) -> LanguageModel:
        return LanguageModel("llama", 32000, 12, 12, 4, 64, max_context, slots, 32, 2 * 12 * 4 * 64 * 4)

    def timed(max_context: int, slots: int) -> list[tuple[str, int, int]]:
        return [(c.timing.phase, c.timing.prompt_tokens, c.batch) for c in cases(lm(max_context, slots))]

    assert timed(4096, 4) == [("prefill", 32, 1), ("prefill", 128, 1), ("prefill", 512, 1), ("decode", 32, 1),
                              ("decode", 32, 4)]  # fmt: skip
    assert timed(512, 1) == [("prefill", 32, 1), ("prefill", 128, 1), ("decode", 32, 1)]  # room for a token after the prompt
    assert timed(64, 2) == [("prefill", 32, 1), ("decode", 32, 1), ("decode", 32, 2)]


def test_decoding_two_slots_in_one_call_gives_each_its_own_logits(bundle):
    # What the batch-2 decode timing runs: each slot's logits as when it is stepped alone.
    import hxc.runtime
    from hxc.runtime.generate import decode, decode_batch, language_model_of, prefill

    model = hxc.runtime.load(bundle, device="local-task")
    lm = language_model_of(model)
    prompts = {0: [0, 5, 9, 200, 17], 1: [0, 44, 3, 81, 300, 7, 12]}
    alone, together = model.new_state(), model.new_state()
    first = {s: int(np.argmax(prefill(model, lm, ids, alone, slot=s))) for s, ids in prompts.items()}
    for s, ids in prompts.items():
        prefill(model, lm, ids, together, slot=s)
    expected = {s: decode(model, lm, first[s], len(ids), alone, slot=s) for s, ids in prompts.items()}
    both = decode_batch(model, lm, {s: (first[s], len(ids)) for s, ids in prompts.items()}, together)
    for s in prompts:
        np.testing.assert_allclose(both[s], expected[s], rtol=1e-5, atol=1e-5)


def test_a_reader_that_knows_no_generation_field_still_reads_them(bundle, cli):
    # profiles.json 2.2 adds an optional field: a 2.1 reader ignores it (unknown keys are);
    # 2.3 adds the memory to it, which profiles recorded before 2.3 lack.
    assert cli("bench", bundle, *QUICK, "--no-record").exit_code == 0
    data = json.loads((bundle / "profiles.json").read_text())
    data["schema_version"] = "2.2"
    for p in data["profiles"]:
        p["generation"].pop("weights_bytes")
        p["generation"].pop("kv_bytes_per_token")
    (bundle / "profiles.json").write_text(json.dumps(data))
    m = read_manifest(bundle)
    assert m.profiles and all(p.generation.weights_bytes is None and p.generation.kv_bytes_per_token is None
                              for p in m.profiles)  # fmt: skip
    data["schema_version"] = "2.1"
    for p in data["profiles"]:
        p.pop("generation", None)
    (bundle / "profiles.json").write_text(json.dumps(data))
    m = read_manifest(bundle)
    assert m.profiles and all(p.generation is None and p.tokens_per_s is None for p in m.profiles)


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


def test_select_shows_how_a_request_would_be_routed_by_the_profiles(bundle, cli):
    """`hxc select --prompt-tokens`: the router's arithmetic on idle devices, from the
    profiles `hxc bench` recorded (recorded here if an earlier test has not)."""
    from hxc.pool.lm_estimate import LMSpeed
    from hxc.runtime import probe_host
    from hxc.runtime.prices import load_prices
    from hxc.runtime.select import profiles_for

    m = read_manifest(bundle)
    if not any(p.generation is not None for p in m.profiles):
        assert cli("bench", bundle, *QUICK).exit_code == 0
        m = read_manifest(bundle)
    result = cli("select", bundle, "--prompt-tokens", "100", "--max-tokens", "16", "--ttft-ms", "60000", "--json")
    assert result.exit_code == 0, result.output
    routing = json.loads(result.stdout)["routing"]
    row = routing["devices"][0]
    host = probe_host()
    device = next(d for d in host.devices if d.label == row["device"])
    speed = LMSpeed.from_profiles(profiles_for(m, m.artifact(row["artifact"]), device, host.host().id)[0])
    # Alone: its prompt read as the profiles say, then the step that hands out its first token.
    assert row["measured"] and row["meets_targets"] and row["rank"] == 0
    assert row["ttft_ms"] == pytest.approx(speed.prefill_ms(100) + speed.step_ms(1))
    assert row["tpot_ms"] == pytest.approx(speed.step_ms(1))
    price = load_prices().price(device, host.cpu.cores).per_hour
    device_s = (speed.prefill_ms(100) + 16 * speed.step_ms(1)) / 1000
    assert row["price_per_1k_tokens"] == pytest.approx(price / 3600 * device_s / 16 * 1000)
    text = cli("select", bundle, "--prompt-tokens", "100", "--ttft-ms", "0.001", "--explain").stdout
    assert "Routing a request of 100 prompt and 60 output tokens" in text  # 128 by default, cut to the context's 160
    assert "misses the targets" in text and "ttft_ms <= 0.001" in text

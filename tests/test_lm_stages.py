"""A language model cut into stages at its decoder layers (`hxc compile --stages` on a
causal LM, issue 29): each stage its own artifact and weights archive with the model's
functions over the hidden states and its own layers' KV caches, recorded in the
manifest's `stages` per function; generation through the chain (`generate`, `Batch`,
`hxc verify`) equal to the unsplit bundle's and to Hugging Face's, token for token.
The tiny Llama of `hxc.examples.llm` (2 layers), built as the session's unsplit bundle
(`tiny_llm_bundle`: context 96, 4 slots, chunks of 32) and once here in two stages;
cpu:host in this process; lavapipe in a child process only."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import hxc.runtime
from hxc.errors import BundleError, ExitCode
from hxc.manifests import read_manifest
from hxc.manifests.bundle import parse_manifest
from hxc.runtime.batching import Batch
from hxc.verify import verify_bundle

SOURCE = "hxc.examples.llm:tiny_llama"
MAX_CONTEXT, SLOTS, CHUNK = 96, 4, 32  # as conftest's tiny_llm_bundle: the unsplit bundle to equal
PROMPT_IDS = [0, *range(5, 44)]  # 40 tokens: two prefill calls
NEW_TOKENS = 12


def _build(out: Path, stages: str | None, targets: str = "cpu:host"):
    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions

    options = ImportOptions(max_context=MAX_CONTEXT, slots=SLOTS, stages=stages)
    result = build_bundle(SOURCE, out, targets, options=options, use_cache=False)
    assert result.written, [b.error for b in result.failed]
    return result.output


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_llm_bundle) -> dict[str, Path]:
    """The same model whole (the session's) and in two stages."""
    return {"whole": tiny_llm_bundle, "staged": _build(tmp_path_factory.mktemp("lm-stages") / "staged.hxc", "2")}


@pytest.fixture(scope="module")
def hf_tokens() -> list[int]:
    from hxc.examples.llm import tiny_llama

    model, _ = tiny_llama()
    model.generation_config.eos_token_id = None  # random weights: compare the full length
    with torch.no_grad():
        out = model.eval().generate(torch.tensor([PROMPT_IDS]), attention_mask=torch.ones(1, len(PROMPT_IDS), dtype=torch.long),
                                    do_sample=False, max_new_tokens=NEW_TOKENS)  # fmt: skip
    return out[0, len(PROMPT_IDS):].tolist()


def test_the_manifest_records_each_stage_per_function(bundles):
    m = read_manifest(bundles["staged"])
    lm = m.language_model
    assert m.schema_version == "6.1" and len(m.stages) == 2 and lm.layers == 2
    assert [a.id for a in m.artifacts] == ["cpu:host#s0", "cpu:host#s1"] and lm.prefill_chunk == CHUNK
    assert sorted(w.file for w in m.weights) == ["weights-s0.irpa", "weights-s1.irpa"]
    s0, s1 = m.stages
    assert (s0.first_module, s0.last_module, s1.first_module, s1.last_module) == (
        "model.embed_tokens", "model.layers.0", "model.layers.1", "lm_head")
    hidden = 64
    rows = {"prefill": CHUNK, "decode": SLOTS, "mixed": SLOTS + CHUNK}
    assert set(rows) == set(m.functions) == set(s0.functions) == set(s1.functions)
    for name, n in rows.items():
        a, b = s0.functions[name], s1.functions[name]
        model_args = tuple(t.name for t in m.functions[name].signature.inputs)
        assert a.inputs == () and a.args == model_args  # stage 0 takes the call's own arguments
        [out] = a.outputs
        assert (out.dtype, out.shape, out.bytes) == ("f32", (n, hidden), n * hidden * 4)  # the hidden states
        assert [(t.dtype, t.shape) for t in b.inputs] == [("f32", (n, hidden))]
        assert "tokens" not in b.args and "chunk_tokens" not in b.args
        assert [t.shape for t in b.outputs] == [t.shape for t in m.functions[name].signature.outputs]  # the logits
        assert (a.state, b.state) == (("k_cache_0", "v_cache_0"), ("k_cache_1", "v_cache_1"))
    assert (s0.function, s0.outputs, s1.inputs) == ("decode", s0.functions["decode"].outputs, s1.functions["decode"].inputs)
    assert s0.kv_bytes_per_token + s1.kv_bytes_per_token == lm.kv_bytes_per_token
    assert s0.kv_bytes_per_token == s1.kv_bytes_per_token > 0
    # Each stage holds its own weights: the embeddings in s0, the head in s1 (untied), a layer each.
    assert s0.weights_bytes > 0 and s1.weights_bytes > 0 and s0.flops < s1.flops  # the head multiplies, the lookup does not
    sizes = {w.file: w.size for w in m.weights}
    whole = read_manifest(bundles["whole"])
    assert whole.schema_version == "5.3" and not whole.stages
    assert sizes["weights-s0.irpa"] + sizes["weights-s1.irpa"] == pytest.approx(whole.weights_for("fp32").size, rel=0.05)
    assert m.functions == whole.functions and m.language_model == whole.language_model


def test_generate_equals_the_unsplit_bundle_and_hugging_face(bundles, hf_tokens):
    got = {}
    for kind in ("whole", "staged"):
        model = hxc.runtime.load(bundles[kind], device="local-task", strict=True)
        got[kind] = list(model.generate(PROMPT_IDS, NEW_TOKENS, stop_token_ids=[]).result().token_ids)
    assert got["staged"] == got["whole"] == hf_tokens
    assert model.candidate.id == "cpu:host" and len(model.candidate.stages) == 2


def test_a_batch_of_two_with_mixed_steps_equals_hugging_face(bundles, hf_tokens):
    model = hxc.runtime.load(bundles["staged"], device="local-task", strict=True)
    state = model.new_state()
    assert sorted(state.values) == ["k_cache_0", "k_cache_1", "v_cache_0", "v_cache_1"]
    batch = Batch(model, state)
    assert batch.mixed
    batch.add("a", PROMPT_IDS, NEW_TOKENS, stop_token_ids=[])
    got: dict[str, list[int]] = {"a": [], "b": []}
    for step in range(1, 100):  # bounded: 2 prompts of 40 tokens and 2 x 12 new tokens take far fewer
        if step == 2:
            batch.add("b", PROMPT_IDS, NEW_TOKENS, stop_token_ids=[])  # its chunks ride in a's decode steps
        for e in batch.step():
            got[e.id].append(e.token)
        if batch.idle:
            break
    assert got == {"a": hf_tokens, "b": hf_tokens}
    # Each stage's caches stayed with it, on the device, and were written there.
    host = state.to_host()
    assert all(np.abs(host[n][:, :len(PROMPT_IDS)]).max() > 0 for n in host)


def test_verify_checks_the_chain_against_hugging_face(bundles, cli):
    report = verify_bundle(bundles["staged"], device="cpu", isolate=False)
    assert report.ok and report.results, report.results
    assert {r.artifact for r in report.results} == {"cpu:host"}
    # The CLI's way: in a worker process, over the worker protocol's state.
    result = cli("verify", bundles["staged"], "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] and [r["artifact"] for r in data["results"]] == ["cpu:host"], data


def test_bench_times_the_chain_with_every_stage_s_weights(bundles, cli):
    result = cli("bench", bundles["staged"], "--device", "cpu", "--min-time", "0.2", "--no-record", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    m = read_manifest(bundles["staged"])
    assert rows and {r["candidate"] for r in rows} == {"cpu:host"}
    assert {r["weights_bytes"] for r in rows} == {sum(w.size for w in m.weights)}


def test_a_stage_function_that_does_not_chain_is_refused(bundles):
    data = json.loads((bundles["staged"] / "manifest.json").read_text())
    parse_manifest(data)
    broken = json.loads(json.dumps(data))
    broken["stages"][1]["functions"]["decode"]["inputs"][0]["shape"] = [3, 64]
    with pytest.raises(BundleError, match="stage 1's decode does not take what stage 0 returns"):
        parse_manifest(broken)
    broken = json.loads(json.dumps(data))
    broken["stages"][1]["functions"]["decode"]["state"] = ["k_cache_0", "v_cache_1"]
    with pytest.raises(BundleError, match="do not hold the model's state once each"):
        parse_manifest(broken)
    broken = json.loads(json.dumps(data))
    del broken["stages"][0]["functions"]["mixed"]
    with pytest.raises(BundleError, match="stage 0 has functions"):
        parse_manifest(broken)


@pytest.mark.parametrize(
    "stages, fragment",
    [
        ("3", "--stages 3: this model has 2 decoder layers; it can be cut into at most 2 stages"),
        ("at:model.layers.0", "--stages at:model.layers.0: the first decoder layer"),
        ("at:model.norm", "--stages at:model.norm: not a decoder layer of this model"),
        ("at:", "--stages at:: name the submodules to cut before"),
    ],
)
def test_bad_stages_are_one_line_usage_errors(cli, tmp_path, stages, fragment):
    result = cli("compile", SOURCE, "-o", tmp_path / "b.hxc", "-t", "cpu:host", "--max-context", MAX_CONTEXT,
                 "--stages", stages)  # fmt: skip
    assert result.exit_code == ExitCode.USAGE, result.output
    errors = [line for line in result.stderr.splitlines() if not line.endswith("…")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and fragment in errors[0], result.stderr
    assert not (tmp_path / "b.hxc").exists()


def test_quantised_stages_are_refused_before_any_work(cli, tmp_path):
    result = cli("compile", SOURCE, "-o", tmp_path / "b.hxc", "-t", "cpu:host", "--stages", "2", "--precision", "fp32,int8")
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "--stages and --precision int8: a language model's quantised stages are not built yet" in result.stderr


@pytest.mark.heavy
def test_lavapipe_runs_the_chain_in_a_child_process(tmp_path, hf_tokens):
    """Both stages on lavapipe (the portable Vulkan variant), in a child process as
    every lavapipe run of the suite."""
    bundle = _build(tmp_path / "vk.hxc", "2", targets="vulkan:spirv")  # its own: lavapipe compiles are slow
    out = subprocess.run([sys.executable, "-m", "hxc.cli", "generate", str(bundle), ",".join(map(str, PROMPT_IDS)),
                          "--token-ids", "-n", str(NEW_TOKENS), "--device", "vulkan", "--ignore-eos", "--json"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout)
    assert data["device"].startswith("vulkan") and data["token_ids"] == hf_tokens


FOUR_LAYERS = textwrap.dedent(
    """
    import torch
    import transformers as tf
    from hxc.examples.llm import tiny_config, tiny_tokenizer

    def make(family):
        tok = tiny_tokenizer(family)
        cfg = tiny_config(family, len(tok))
        if family == "gpt2":
            cfg.n_layer = 4
        else:
            cfg.num_hidden_layers = 4
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(cfg).eval()
        model.generation_config.pad_token_id = 1
        return model, tok

    def llama():
        return make("llama")

    def gpt2():
        return make("gpt2")
    """
)


@pytest.mark.heavy
@pytest.mark.parametrize("family, stages, ranges", [
    ("llama", "at:model.layers.1,model.layers.3", [(0, 1), (1, 3), (3, 4)]),
    ("gpt2", "3", [(0, 1), (1, 3), (3, 4)]),  # balanced: the head weighs half a layer here
])  # fmt: skip
def test_a_middle_stage_of_four_layers(tmp_path, family, stages, ranges):
    """Three stages of a 4-layer model: a middle stage takes and returns hidden states."""
    import importlib.util

    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions

    source = tmp_path / "four.py"
    source.write_text(FOUR_LAYERS)
    result = build_bundle(f"{source}:{family}", tmp_path / "b.hxc", "cpu:host", use_cache=False,
                          options=ImportOptions(max_context=MAX_CONTEXT, slots=2, stages=stages))  # fmt: skip
    assert result.written, [b.error for b in result.failed]
    m = read_manifest(result.output)
    held = [tuple(int(n.rsplit("_", 1)[1]) for n in s.functions["decode"].state[::2]) for s in m.stages]
    assert held == [tuple(range(a, b)) for a, b in ranges]
    spec = importlib.util.spec_from_file_location("four", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    hf, _ = getattr(module, family)()
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = hf.generate(torch.tensor([PROMPT_IDS]), attention_mask=torch.ones(1, len(PROMPT_IDS), dtype=torch.long),
                               do_sample=False, max_new_tokens=NEW_TOKENS)[0, len(PROMPT_IDS):].tolist()  # fmt: skip
    model = hxc.runtime.load(result.output, device="local-task", strict=True)
    assert list(model.generate(PROMPT_IDS, NEW_TOKENS, stop_token_ids=[]).result().token_ids) == expected
    report = verify_bundle(result.output, device="cpu", isolate=False)
    assert report.ok and report.results, report.results

"""Language models end to end (issue 25): a Hugging Face directory (tiny Llama) and a
factory returning (model, tokenizer) (tiny GPT-2), both random weights from
`hxc.examples.llm`, compiled for cpu:host and the portable Vulkan variant; greedy
generation through `hxc.runtime.load(...).generate` equals Hugging Face's
`generate(do_sample=False)` token for token on local-task and lavapipe, with the KV
cache on the device throughout; chat templates (rendered as transformers renders them, in
a sandbox), stop strings and prompt truncation; the CLI; each bad input in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hxc.runtime
from hxc.build import build_bundle
from hxc.engines.base import TRANSFERS
from hxc.errors import ExitCode, HxcError, ModelLoadError, UsageError
from hxc.examples.llm import save_tiny_lm, tiny_gpt2, tiny_tokenizer
from hxc.manifests import read_manifest
from hxc.runtime.generate import CHAT_TEMPLATE_MAX_CHARS, ChatTemplate
from hxc.verify import verify_bundle

TARGETS = "cpu:host,vulkan:spirv"
MAX_CONTEXT = 96
PROMPT = "The quick brown fox jumps over the lazy dog. Every device runs the same bundle, token for token. Hello!"
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("hf") / "tiny-llama", "llama")


@pytest.fixture(scope="module")
def bundles(llama_dir, tmp_path_factory) -> dict[str, Path]:
    """llama: compiled from the directory; gpt2: from the factory (model, tokenizer)."""
    out = tmp_path_factory.mktemp("llm")
    built = {}
    for family, source in (("llama", str(llama_dir)), ("gpt2", "hxc.examples.llm:tiny_gpt2")):
        from hxc.compiler.imported import ImportOptions

        result = build_bundle(source, out / f"{family}.hxc", TARGETS, use_cache=False,
                              options=ImportOptions(max_context=MAX_CONTEXT))  # fmt: skip
        assert result.written, [r.error for r in result.failed]
        built[family] = result.output
    return built


@pytest.fixture(scope="module")
def references(llama_dir) -> dict[str, tuple]:
    """(model, tokenizer) as Hugging Face loads them, per family."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return {"llama": (AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval(), AutoTokenizer.from_pretrained(str(llama_dir))),
            "gpt2": tiny_gpt2()}  # fmt: skip


def hf_generate(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=n)  # fmt: skip
    return out[0, len(ids):].tolist()


def test_the_manifest_records_the_language_model_and_its_tokenizer(bundles):
    m = read_manifest(bundles["llama"])
    assert m.schema_version == "6.0" and m.model.source_format == "huggingface"
    lm = m.language_model
    assert (lm.family, lm.layers, lm.heads, lm.kv_heads, lm.head_dim) == ("llama", 2, 4, 2, 16)
    assert (lm.max_context, lm.slots, lm.prefill_chunk, lm.cache_dtype) == (MAX_CONTEXT, 1, 32, "f32")
    assert lm.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4 and (lm.bos_token_id, lm.eos_token_ids) == (0, (1,))
    assert lm.tokenizer_file == "tokenizer/tokenizer.json" and all(f in m.files for f in lm.tokenizer_files)
    assert list(m.functions) == ["prefill", "decode"]
    prefill_inputs = m.functions["prefill"].signature.inputs
    assert [s.name for s in prefill_inputs] == ["tokens", "start", "length", "slot", "span"]
    assert prefill_inputs[-1].shape == ("span",)  # dynamic: the rows a call reads
    reads = m.functions["decode"].reads
    assert [s.name for s in reads] == ["k_cache_0", "v_cache_0", "k_cache_1", "v_cache_1"]
    assert (reads[0].shape, reads[0].slots) == ((1, MAX_CONTEXT + 1, 2 * 16), 1)  # one slot: [1, context + 1, kv x hd]
    assert {a.id for a in m.ok_artifacts} == {"cpu:host", "vulkan:spirv"}
    assert read_manifest(bundles["gpt2"]).language_model.family == "gpt2"
    # IREE 3.13's default data tiling fails on attention over a dynamic span; the CPU
    # artifact keeps data tiling through IREE's other path, and says why.
    cpu = m.artifact("cpu:host")
    assert "--iree-global-opt-data-tiling" in cpu.flags and "--iree-opt-data-tiling" not in cpu.flags
    assert "delinearize_index" in cpu.fallback


def test_the_weights_are_stored_once_outside_every_artifact(bundles, llama_dir, tmp_path):
    """One weights.irpa read by every target's artifact; no vmfb holds a copy (the
    embedding's bytes are found in the archive and in no artifact)."""
    from safetensors.numpy import load_file

    bundle = bundles["llama"]
    m = read_manifest(bundle)
    assert [(w.file, w.precision) for w in m.weights] == [("weights.irpa", "fp32")]
    embedding = load_file(str(llama_dir / "model.safetensors"))["model.embed_tokens.weight"][:4].tobytes()
    assert embedding in (bundle / "weights.irpa").read_bytes()
    for a in m.ok_artifacts:
        assert embedding not in (bundle / a.file).read_bytes(), a.id
    from hxc.compiler.imported import ImportOptions

    with pytest.raises(UsageError, match="--weights inline is not available for this model: it keeps its weights once "
                                         "per bundle, in weights.irpa"):  # fmt: skip
        build_bundle(str(llama_dir), tmp_path / "inline.hxc", "cpu:host", options=ImportOptions(weights="inline"))


def test_verify_checks_greedy_tokens_against_hugging_face(bundles, references):
    """The reference recorded at compile time is Hugging Face's greedy continuation; the
    golden sample is its logits alone (no KV caches); `hxc verify` runs it on every
    artifact, each in its own worker."""
    bundle = bundles["gpt2"]
    ref = read_manifest(bundle).language_model.greedy_reference
    hf, tokenizer = references["gpt2"]
    hf.generation_config.eos_token_id = None
    assert len(ref.prompt_token_ids) > 32 and len(ref.token_ids) == 16  # two prefill chunks, then 15 decode steps
    assert list(ref.token_ids) == hf_generate(hf, list(ref.prompt_token_ids), 16)
    with np.load(bundle / "golden.npz") as golden:
        assert list(golden) == ["greedy.logits"] and golden["greedy.logits"].shape == (16, tokenizer.vocab_size)
    report = verify_bundle(bundle)
    assert report.ok, report.results
    assert {(r.artifact, r.sample) for r in report.results} == {("cpu:host", "greedy"), ("vulkan:spirv", "greedy")}
    assert all(r.max_abs is not None and r.max_abs < 1e-3 for r in report.results)


def test_verify_fails_on_a_wrong_recorded_reference(bundles, tmp_path):
    """A recorded token that is not Hugging Face's (here: its least likely one at step
    5) fails every artifact, naming the first differing position."""
    bundle = Path(shutil.copytree(bundles["gpt2"], tmp_path / "wrong.hxc"))
    data = json.loads((bundle / "manifest.json").read_text())
    with np.load(bundle / "golden.npz") as golden:
        least = int(golden["greedy.logits"][5].argmin())
    right = data["language_model"]["greedy_reference"]["token_ids"][5]
    data["language_model"]["greedy_reference"]["token_ids"][5] = least
    (bundle / "manifest.json").write_text(json.dumps(data))
    report = verify_bundle(bundle, device="cpu", isolate=False)
    assert not report.ok and report.exit_code == ExitCode.MISMATCH
    (r,) = report.results
    assert r.error == f"greedy tokens differ from Hugging Face's at position 5 of 16: {right} instead of {least}"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("device", ["local-task", "vulkan"])
def test_greedy_equals_hugging_face_generate(bundles, references, family, device):
    hf, tokenizer = references[family]
    prompt_ids = tokenizer(PROMPT).input_ids
    assert len(prompt_ids) > 32  # two prefill chunks
    hf.generation_config.eos_token_id = None  # random weights: compare the full length
    if device == "vulkan":
        # lavapipe in a child process, as every lavapipe run of the suite: its polling threads
        # would stay in the test process and slow every later test.
        out = subprocess.run([sys.executable, "-m", "hxc.cli", "generate", str(bundles[family]), PROMPT, "-n",
                              str(NEW_TOKENS), "--device", "vulkan", "--ignore-eos", "--json"],
                             capture_output=True, text=True, timeout=600)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        data = json.loads(out.stdout)
        assert data["device"].startswith("vulkan") and data["prompt_token_ids"] == prompt_ids
        assert data["token_ids"] == hf_generate(hf, prompt_ids, NEW_TOKENS), f"{family} on {device}"
        assert data["text"] == tokenizer.decode(data["token_ids"], skip_special_tokens=True)
        return
    model = hxc.runtime.load(bundles[family], device=device, strict=True)
    stream = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    pieces = list(stream)
    r = stream.result()
    assert list(r.prompt_token_ids) == prompt_ids  # tokenised as AutoTokenizer does (Llama's BOS once)
    assert list(r.token_ids) == hf_generate(hf, prompt_ids, NEW_TOKENS), f"{family} on {device}"
    assert r.text == tokenizer.decode(list(r.token_ids), skip_special_tokens=True)
    assert "".join(p.text for p in pieces) == r.text
    assert sum(len(p.token_ids) for p in pieces) == NEW_TOKENS and r.finish_reason == "length"


def test_64_tokens_with_no_state_copies(bundles):
    model = hxc.runtime.load(bundles["llama"], device="local-task", strict=True)
    state = model.new_state()
    before = TRANSFERS.snapshot()
    r = model.generate(list(range(2, 12)), max_new_tokens=65, stop_token_ids=[], state=state).result()
    after = TRANSFERS.snapshot()
    assert len(r.token_ids) == 65  # 1 from the prefill, 64 decode steps
    assert (after.state_to_device - before.state_to_device, after.state_to_host - before.state_to_host) == (0, 0)
    # Up: prefill's 5 inputs once, then each step's tokens, positions and span (its
    # length only: a few KiB at most). Down: each call's logits. The caches: never.
    assert (after.to_device - before.to_device, after.to_host - before.to_host) == (5 + 64 * 3, 1 + 64)


def test_seeded_sampling_is_reproducible_and_stops_at_eos(bundles):
    model = hxc.runtime.load(bundles["gpt2"], device="local-task", strict=True)
    sample = dict(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.95, stop_token_ids=[])
    a, b = (model.generate(PROMPT, seed=7, **sample).result() for _ in range(2))
    assert a.token_ids == b.token_ids
    assert model.generate(PROMPT, seed=8, **sample).result().token_ids != a.token_ids
    greedy = model.generate(PROMPT, max_new_tokens=5, stop_token_ids=[]).result().token_ids
    stopped = model.generate(PROMPT, max_new_tokens=5, stop_token_ids=[greedy[0]]).result()
    assert stopped.token_ids == greedy[:1] and stopped.finish_reason == "stop"


def test_generation_stops_at_the_end_of_the_context(bundles):
    model = hxc.runtime.load(bundles["gpt2"], device="local-task", strict=True)
    r = model.generate(list(range(2, 92)), max_new_tokens=50, stop_token_ids=[]).result()
    assert len(r.token_ids) == MAX_CONTEXT - 90 + 1 and r.finish_reason == "length"


def test_the_cli_streams_text_and_prints_one_json_object(bundles, references, cli):
    result = cli("generate", bundles["gpt2"], PROMPT, "-n", "8", "--ignore-eos", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    hf, tokenizer = references["gpt2"]
    hf.generation_config.eos_token_id = None
    assert data["token_ids"] == hf_generate(hf, tokenizer(PROMPT).input_ids, 8)
    assert data["finish_reason"] == "length" and data["artifact"] in ("cpu:host", "vulkan:spirv")
    assert {"text", "prompt_token_ids", "device", "ttft_ms", "tpot_ms", "tokens_per_s"} <= set(data)
    streamed = cli("generate", bundles["gpt2"], PROMPT, "-n", "8", "--ignore-eos", "--device", "cpu")
    assert streamed.exit_code == 0 and streamed.stdout == data["text"] + "\n"


def test_bad_inputs_are_one_line_errors(bundles, cli, tmp_path):
    model = hxc.runtime.load(bundles["gpt2"], device="local-task", strict=True)
    with pytest.raises(UsageError, match=f"prompt has 200 tokens; this bundle's context holds {MAX_CONTEXT}"):
        model.generate(list(range(200)))
    with pytest.raises(UsageError, match="prompt is empty"):
        model.generate("")
    with pytest.raises(UsageError, match="token id 9999 is outside the vocabulary"):
        model.generate([9999])
    with pytest.raises(UsageError, match="temperature must be"):
        model.generate("hi", temperature=-1)
    with pytest.raises(UsageError, match="top-p must be in"):
        model.generate("hi", top_p=0)
    with pytest.raises(UsageError, match="max_new_tokens must be at least 1"):
        model.generate("hi", max_new_tokens=0)
    with pytest.raises(UsageError, match="stop strings must be non-empty text"):
        model.generate("hi", stop=[""])
    with pytest.raises(UsageError, match="has no chat template"):
        model.generate(messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(UsageError, match="not both"):
        model.generate("hi", messages=[{"role": "user", "content": "hi"}])
    result = cli("generate", bundles["gpt2"], "x " * 300, "-d", "cpu")
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "context holds" in result.output
    plain = build_bundle("hxc.examples:mlp", tmp_path / "mlp.hxc", "cpu:host").output
    with pytest.raises(UsageError, match="not a language model"):
        hxc.runtime.load(plain, device="cpu").generate("hi")


def test_directories_hxc_cannot_take_are_refused_in_one_line(llama_dir, tmp_path):
    def variant(name: str, change) -> Path:
        d = Path(shutil.copytree(llama_dir, tmp_path / name))
        change(d)
        return d

    def edit_config(**fields):
        def change(d: Path) -> None:
            config = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps({**config, **fields}))
        return change

    pickled = variant("pickled", lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"))
    with pytest.raises(ModelLoadError, match=r"only pickled weights \(pytorch_model.bin\); hxc loads safetensors only"):
        build_bundle(str(pickled), tmp_path / "o.hxc", "cpu:host")
    remote = variant("remote", edit_config(auto_map={"AutoModelForCausalLM": "modeling_x.X"}))
    with pytest.raises(UsageError, match="needs trust_remote_code"):
        build_bundle(str(remote), tmp_path / "o.hxc", "cpu:host")
    bert = variant("bert", edit_config(model_type="bert"))
    with pytest.raises(UsageError, match="model type 'bert' is not supported; hxc compiles llama, gpt2, mistral, qwen2, phi3, gemma"):
        build_bundle(str(bert), tmp_path / "o.hxc", "cpu:host")
    with pytest.raises(ModelLoadError, match="is a directory, not a model file"):
        build_bundle(str(tmp_path), tmp_path / "o.hxc", "cpu:host")
    with pytest.raises(HxcError, match="outside 2..256"):
        from hxc.compiler.imported import ImportOptions

        build_bundle(str(llama_dir), tmp_path / "o.hxc", "cpu:host", options=ImportOptions(max_context=1000))


def test_a_prefill_chunk_past_the_context_is_a_one_line_error(llama_dir, cli, tmp_path):
    result = cli("compile", llama_dir, "-t", "cpu:host", "--max-context", "64", "--prefill-chunk", "65", "-o", tmp_path / "o.hxc")
    assert result.exit_code != 0 and "prefill chunk 65 is outside 1..64" in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in result.output and not (tmp_path / "o.hxc").exists()


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world! How are you today?"}]


def test_chat_messages_render_the_bundles_template_as_transformers_does(bundles, references, cli):
    hf, tokenizer = references["llama"]
    model = hxc.runtime.load(bundles["llama"], device="local-task", strict=True)
    r = model.generate(messages=CHAT, max_new_tokens=6, stop_token_ids=[]).result()
    rendered = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<s><|system|>Be brief.</s><|user|>") and rendered.endswith("<|assistant|>")
    expected = tokenizer(rendered, add_special_tokens=False).input_ids  # the template holds the BOS itself
    assert list(r.prompt_token_ids) == expected and expected.count(0) == 1
    hf.generation_config.eos_token_id = None
    assert list(r.token_ids) == hf_generate(hf, expected, 6)
    result = cli("generate", bundles["llama"], CHAT[1]["content"], "--chat", "-n", "3", "--ignore-eos", "-d", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompt_token_ids"] == tokenizer.apply_chat_template(
        CHAT[1:], add_generation_prompt=True, return_dict=True)["input_ids"]  # fmt: skip
    listed = cli("generate", bundles["llama"], json.dumps(CHAT), "--chat", "-n", "3", "-d", "cpu", "--json")
    assert json.loads(listed.stdout)["prompt_token_ids"] == expected
    bad = cli("generate", bundles["llama"], "[not json", "--chat", "-d", "cpu")
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "not a JSON list of messages" in bad.output


# A template in the shape real ones have: a namespace, loop controls, tojson, raise_exception, {% generation %}.
REALISTIC = """{%- set ns = namespace(system='') -%}
{%- for m in messages -%}
  {%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}{%- continue -%}{%- endif -%}
  {%- if m['role'] not in ('user', 'assistant') -%}{{ raise_exception('unknown role ' + m['role']) }}{%- endif -%}
  <|{{ m['role'] }}|>{% if loop.first and ns.system %}[{{ ns.system | tojson }}] {% endif %}
  {%- if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{{ eos_token }}
{% endfor -%}
{%- if add_generation_prompt %}<|assistant|>{% endif -%}"""


def test_chat_templates_render_as_in_transformers_and_hostile_ones_fail_in_one_line():
    tokenizer = tiny_tokenizer("llama")
    tokenizer.chat_template = REALISTIC
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}}
    messages = [*CHAT, {"role": "assistant", "content": " Fine. "}, {"role": "user", "content": "Ünïcode \"quoted\""}]
    template = ChatTemplate(REALISTIC, config)
    for add in (True, False):
        assert template.render(messages, add) == tokenizer.apply_chat_template(messages, add_generation_prompt=add, tokenize=False)
    hostile = {
        "{{ ''.__class__.__mro__[1].__subclasses__() }}": "chat template failed",
        "{{ messages.append(1) }}": "chat template failed: .*unsafe",
        "{{ 'x' * 100000000 }}": "too large",
        "{{ 9 ** 99999999 }}": "exponent 99999999 is too large",
        "{% for i in range(99999) %}{% for j in range(99999) %}xy{% endfor %}{% endfor %}":
            f"rendered more than {CHAT_TEMPLATE_MAX_CHARS:,} characters",
        "{{ raise_exception('this model takes no system role') }}": "failed: this model takes no system role$",
        "{% for %}": "chat template failed: ",
        "{{ 1 / 0 }}": "failed: division by zero",
    }  # fmt: skip
    for source, message in hostile.items():
        with pytest.raises(UsageError, match=message) as e:
            ChatTemplate(source, config).render(CHAT)
        assert "\n" not in str(e.value), source
    with pytest.raises(UsageError, match=r"messages\[1\] is not a"):
        template.render([CHAT[0], {"content": "no role"}])


def test_generation_ends_before_a_stop_string(bundles, cli):
    model = hxc.runtime.load(bundles["gpt2"], device="local-task", strict=True)
    sample = dict(max_new_tokens=16, temperature=1.0, seed=3, stop_token_ids=[])  # varied text (greedy repeats itself)
    full = model.generate(PROMPT, **sample).result()
    assert len(set(full.text)) > 6, full.text
    stop = full.text[6:9]
    at = full.text.index(stop)
    assert at > 0
    stream = model.generate(PROMPT, stop=[stop, "never seen"], **sample)
    pieces = list(stream)
    r = stream.result()
    assert r.text == full.text[:at] and r.finish_reason == "stop"
    assert "".join(p.text for p in pieces) == r.text  # nothing of the stop string was streamed
    assert full.token_ids[:len(r.token_ids)] == r.token_ids and len(r.token_ids) < 16  # the tokens that made it are kept
    # The start of a stop string is held back while it may still match, then let out.
    stream = model.generate(PROMPT, stop=stop + "\x00", **sample)
    pieces = list(stream)
    r = stream.result()
    assert r.text == full.text and r.finish_reason == "length" and "".join(p.text for p in pieces) == full.text
    result = cli("generate", bundles["gpt2"], PROMPT, "-n", "16", "--temperature", "1", "--seed", "3", "--ignore-eos",
                 "--stop", stop, "-d", "local-task", "--json")  # fmt: skip
    assert json.loads(result.stdout)["text"] == full.text[:at] and json.loads(result.stdout)["finish_reason"] == "stop"


def test_a_prompt_too_long_is_truncated_from_the_left_when_asked(bundles, references, cli):
    gpt2 = hxc.runtime.load(bundles["gpt2"], device="local-task", strict=True)
    ids = list(range(2, 202))
    r = gpt2.generate(ids, max_new_tokens=8, truncate=True, stop_token_ids=[]).result()
    assert list(r.prompt_token_ids) == ids[-(MAX_CONTEXT - 7):]  # room for the 8 new tokens
    assert r.token_ids == gpt2.generate(ids[-(MAX_CONTEXT - 7):], max_new_tokens=8, stop_token_ids=[]).result().token_ids
    assert len(r.token_ids) == 8 and r.finish_reason == "length"
    # Room for many tokens takes the prompt down to half the context, not further.
    assert len(gpt2.generate(ids, max_new_tokens=90, truncate=True).result().prompt_token_ids) == MAX_CONTEXT // 2
    short = gpt2.generate(ids[:10], max_new_tokens=8, truncate=True, stop_token_ids=[]).result()
    assert list(short.prompt_token_ids) == ids[:10]  # nothing to cut
    llama = hxc.runtime.load(bundles["llama"], device="local-task", strict=True)
    with_bos = [0, *ids]
    r = llama.generate(with_bos, max_new_tokens=8, truncate=True, stop_token_ids=[]).result()
    assert list(r.prompt_token_ids) == [0, *ids[-(MAX_CONTEXT - 8):]]  # Llama's BOS stays in front
    hf, _ = references["llama"]
    hf.generation_config.eos_token_id = None
    assert list(r.token_ids) == hf_generate(hf, list(r.prompt_token_ids), 8)
    result = cli("generate", bundles["gpt2"], "x " * 300, "-d", "cpu", "--truncate", "-n", "4", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["prompt_token_ids"]) == MAX_CONTEXT - 3


@pytest.mark.heavy
def test_64_tokens_with_no_state_copies_on_lavapipe(bundles):
    model = hxc.runtime.load(bundles["gpt2"], device="vulkan", strict=True)
    state = model.new_state()
    before = TRANSFERS.snapshot()
    r = model.generate(list(range(2, 12)), max_new_tokens=65, stop_token_ids=[], state=state).result()
    after = TRANSFERS.snapshot()
    assert len(r.token_ids) == 65
    assert (after.state_to_device - before.state_to_device, after.state_to_host - before.state_to_host) == (0, 0)


def test_several_prefill_chunks_build_one_function_each_and_give_hugging_faces_tokens(llama_dir, references, tmp_path):
    # --prefill-chunk 8,32: `prefill` reads 8 tokens a call, `prefill_32` 32. A prompt alone
    # goes in the largest chunks it fills; beside a decoding sequence, in the smallest.
    from hxc.compiler.imported import ImportOptions
    from hxc.runtime.batching import Batch

    result = build_bundle(str(llama_dir), tmp_path / "chunks.hxc", "cpu:host", use_cache=False,
                          options=ImportOptions(max_context=MAX_CONTEXT, slots=2, prefill_chunk=(32, 8)))  # fmt: skip
    m = read_manifest(result.output)
    assert list(m.functions) == ["prefill", "prefill_32", "decode"]
    assert (m.language_model.prefill_chunk, m.language_model.chunks) == (8, (8, 32))
    hf, tokenizer = references["llama"]
    hf.generation_config.eos_token_id = None
    ids = tokenizer(PROMPT).input_ids
    assert 32 < len(ids) <= 40  # alone: 32, then the rest in one call of 8
    expected = hf_generate(hf, ids, NEW_TOKENS)
    model = hxc.runtime.load(result.output, device="local-task", strict=True)
    assert list(model.generate(ids, NEW_TOKENS, stop_token_ids=[]).result().token_ids) == expected
    assert len(m.language_model.greedy_reference.prompt_token_ids) == 32 + 8  # `hxc verify` runs both sizes
    report = verify_bundle(result.output, device="cpu", isolate=False)
    assert report.results and all(r.ok for r in report.results), report.results

    batch = Batch(model)
    batch.add("a", ids, NEW_TOKENS, stop_token_ids=[])
    steps_to_first = {}
    got: dict[str, list[int]] = {"a": [], "b": []}
    for step in range(1, 200):  # bounded: 2 prompts of <= 40 tokens and 2 x 24 new tokens take far fewer
        if step == 4:
            batch.add("b", ids, NEW_TOKENS, stop_token_ids=[])
        for e in batch.step():
            steps_to_first.setdefault(e.id, step)
            got[e.id].append(e.token)
        if batch.idle:
            break
    assert got == {"a": expected, "b": expected}
    assert steps_to_first["a"] == 2  # 32 + 8 (alone)
    assert steps_to_first["b"] - 3 == -(-len(ids) // 8)  # all in 8s, while "a" decodes

"""Weight-only int8 / int4 language models (`hxc compile --precision fp32,int8,int4`,
`hxc.compiler.quantize`): the tiny random-weight Llama of `hxc.examples.llm`, compiled
for cpu:host and the portable Vulkan variant. The quantised layers store what group-wise
symmetric quantisation says; the archive holds the packed bytes; each artifact records
its error against float32, and recomputing it gives the same numbers; the compiled code
computes what the quantised PyTorch model does (its greedy tokens, on local-task and on
lavapipe in a child process); the loader picks a quantised artifact only when asked;
`hxc verify` holds each to its recorded error; other models are refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hxc.runtime
from hxc.build import build_bundle
from hxc.compiler.imported import ImportOptions
from hxc.compiler.quantize import QuantLinear, measure, prompts, quantize_model
from hxc.errors import UsageError
from hxc.examples.llm import save_tiny_lm
from hxc.manifests import read_manifest
from hxc.runtime.select import select
from hxc.verify import verify_bundle

GROUP = 32  # the tiny model's layers are 64 and 128 wide: two or four groups each
MAX_CONTEXT = 96


@pytest.mark.parametrize("bits", [8, 4])
def test_group_wise_symmetric_quantisation_and_packing(bits):
    """Each group of 32 input features shares one scale, max |w| / (2^(b-1) - 1); the
    weights round to the nearest step; int4 keeps two weights per byte."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    q = QuantLinear(linear.weight, linear.bias, bits, GROUP)
    qmax = 2 ** (bits - 1) - 1
    w = linear.weight.detach().reshape(40, 3, GROUP)
    scales = w.abs().amax(-1) / qmax
    expected = (torch.round(w / scales[..., None]).clamp(-qmax, qmax) * scales[..., None]).reshape(40, 96)
    assert torch.equal(q.scales, scales) and torch.equal(q.dequantized(), expected)
    assert q.qweight.dtype == torch.int8 and q.qweight.numel() == 40 * 96 * bits // 8
    x = torch.randn(5, 96)
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, expected, linear.bias))


def test_a_group_wider_than_a_layer_uses_the_widest_group_that_divides_it():
    assert QuantLinear(torch.randn(4, 96), None, 4, 128).group == 96
    assert QuantLinear(torch.randn(4, 80), None, 8, 64).group == 40
    with pytest.raises(UsageError, match="int4 packs weights in pairs"):
        QuantLinear(torch.randn(4, 7), None, 4, 128)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("hf") / "tiny-llama", "llama")


@pytest.fixture(scope="module")
def hf(llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()


@pytest.fixture(scope="module")
def bundle(llama_dir, tmp_path_factory) -> Path:
    result = build_bundle(str(llama_dir), tmp_path_factory.mktemp("q") / "tiny.hxc", "cpu:host,vulkan:spirv",
                          precisions=("fp32", "int8", "int4"), use_cache=False,
                          options=ImportOptions(max_context=MAX_CONTEXT, group_size=GROUP))  # fmt: skip
    assert result.written, [b.error for b in result.failed]
    return result.output


def quantised(hf, precision: str):
    import copy

    model = copy.deepcopy(hf)
    quantize_model(model, precision, GROUP)
    return model


def test_every_target_builds_each_precision_and_records_its_quantisation(bundle):
    m = read_manifest(bundle)
    assert m.schema_version == "6.0"
    ids = {a.id: a for a in m.ok_artifacts}
    assert set(ids) == {f"{t}{p}" for t in ("cpu:host", "vulkan:spirv") for p in ("", "@int8", "@int4")}
    for precision, bits in (("int8", 8), ("int4", 4)):
        q = ids[f"cpu:host@{precision}"].quantization
        # 2 layers x 7 Linear layers, the LM head and the token embedding.
        assert (q.bits, q.group_size, q.modules, q.lm_head, q.embeddings, q.scale_dtype) == (bits, GROUP, 16, True, True, "f32")
        assert (q.greedy_prompts, q.greedy_tokens) == (4, 64)
        assert ids[f"vulkan:spirv@{precision}"].quantization == q
    assert ids["cpu:host"].quantization is None
    # The quantised SPIR-V reads 8-bit storage, which the portable profile declares.
    assert "storageBuffer8BitAccess" in ids["vulkan:spirv@int4"].requires.vulkan_features


def test_the_archives_hold_the_packed_bytes(bundle, hf):
    """weights-int8.irpa and weights-int4.irpa hold the quantised model's buffers (int8
    weights and embedding rows, float32 scales and norms), not float weights."""
    m = read_manifest(bundle)
    sizes = {w.precision: w.size for w in m.weights}
    assert {w.precision: w.file for w in m.weights} == {"fp32": "weights.irpa", "int8": "weights-int8.irpa",
                                                         "int4": "weights-int4.irpa"}  # fmt: skip
    for precision in ("fp32", "int8", "int4"):
        model = hf if precision == "fp32" else quantised(hf, precision)
        stored = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        assert stored <= sizes[precision] < stored * 1.1 + 64 * 1024, precision  # archive overhead: alignment, names
        assert (bundle / m.weights_for(precision).file).stat().st_size == sizes[precision]
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"] / 2


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_the_recorded_error_is_what_it_measures_again(bundle, hf, llama_dir, precision):
    """Recomputed from the Hugging Face model and the same prompts, the agreement and
    the largest logit difference are the recorded ones; int8 agrees on nearly every
    greedy token (int4 is coarser: random weights have near-ties everywhere)."""
    m = read_manifest(bundle)
    art = m.artifact(f"cpu:host@{precision}")
    ref = m.language_model.greedy_reference
    from hxc.compiler.quantize import MEASURED_TOKENS, _greedy

    cases = [(ref.prompt_token_ids, ref.token_ids)]
    cases += [(p, _greedy(hf, p, MEASURED_TOKENS)) for p in prompts(llama_dir / "tokenizer.json", hf.config.vocab_size)]
    again = measure(hf, quantised(hf, precision), cases)
    q = art.quantization
    assert round(again.agreement, 4) == q.greedy_agreement and again.tokens == q.greedy_tokens
    assert again.max_logit_diff == pytest.approx(q.max_logit_diff, rel=1e-5)
    assert again.relative == pytest.approx(art.precision_error, rel=1e-5)
    if precision == "int8":
        assert q.greedy_agreement >= 0.95
    assert 0 < q.max_logit_diff and q.greedy_agreement > 0.5


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_the_compiled_artifact_generates_what_the_quantised_model_does(bundle, hf, precision):
    """On local-task, greedy tokens equal the quantised PyTorch model's own."""
    model = hxc.runtime.load(bundle, device="local-task", precision=precision, strict=True)
    assert model.artifact.id == f"cpu:host@{precision}"
    prompt = read_manifest(bundle).language_model.greedy_reference.prompt_token_ids
    got = model.generate(list(prompt), max_new_tokens=16, stop_token_ids=[]).result().token_ids
    q = quantised(hf, precision)
    with torch.no_grad():
        want = q.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=16, min_new_tokens=16, pad_token_id=0)[0, len(prompt):]  # fmt: skip
    assert list(got) == want.tolist()


def test_lavapipe_runs_the_int4_artifact(bundle):
    """The portable SPIR-V int4 artifact on lavapipe (in a child process, as every
    lavapipe run of the suite) gives the CPU artifact's tokens."""
    prompt = read_manifest(bundle).language_model.greedy_reference.prompt_token_ids
    ids = ",".join(map(str, prompt))
    out = subprocess.run([sys.executable, "-m", "hxc.cli", "generate", str(bundle), ids, "--token-ids", "-n", "12",
                          "--device", "vulkan", "--precision", "int4", "--ignore-eos", "--json"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout)
    assert data["artifact"] == "vulkan:spirv@int4"
    cpu = hxc.runtime.load(bundle, device="local-task", precision="int4", strict=True)
    assert data["token_ids"] == list(cpu.generate(list(prompt), max_new_tokens=12, stop_token_ids=[]).result().token_ids)


def test_a_quantised_artifact_is_chosen_only_when_asked(bundle, cli):
    m = read_manifest(bundle)
    assert hxc.runtime.load(bundle, device="local-task").artifact.id == "cpu:host"
    int8, int4 = m.artifact("cpu:host@int8"), m.artifact("cpu:host@int4")
    assert int8.precision_error < int4.precision_error
    sel = select(m, hxc.runtime.probe_host(), device="cpu", tolerance=int8.precision_error)
    allowed = {c.artifact.id for c in sel.candidates}
    assert "cpu:host@int8" in allowed and "cpu:host@int4" not in allowed
    refused = {r.artifact.id: r.reason for r in sel.rejected}
    assert refused["cpu:host@int4"].startswith("int4 variant (error ")
    result = cli("select", bundle, "--device", "cpu", "--precision", "int4", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["choice"]["artifact"] == "cpu:host@int4"


def test_verify_holds_each_artifact_to_its_recorded_error(bundle):
    report = verify_bundle(bundle, device="cpu")
    assert report.ok, report.results
    by = {r.artifact: r for r in report.results}
    assert set(by) == {"cpu:host", "cpu:host@int8", "cpu:host@int4"}
    m = read_manifest(bundle)
    for p in ("int8", "int4"):
        assert 0 < by[f"cpu:host@{p}"].max_abs <= m.artifact(f"cpu:host@{p}").quantization.max_logit_diff * 1.05


def test_other_models_are_refused_in_one_line(models, cli, tmp_path):
    """int8 / int4 quantise language models only: a .pt2 is refused before anything
    runs, a factory returning a plain module when it is imported."""
    with pytest.raises(UsageError, match="--precision int4 is not supported for a torch.export archive .*: int8 and int4 "
                                         "quantise the weights of language models only"):  # fmt: skip
        build_bundle(str(models["pt2"]), tmp_path / "a.hxc", "cpu:host", precisions=("fp32", "int4"))
    result = cli("compile", "hxc.examples:convnet", "-t", "cpu:host", "--precision", "int8", "-o", tmp_path / "b.hxc")
    assert result.exit_code == 2
    assert [line for line in result.stderr.splitlines() if line.startswith("error: ")] == [
        "error: hxc.examples:convnet: --precision int8 quantises the weights of language models only; this model is not "
        "one (build fp16 or bf16 for other models)"
    ]
    assert not (tmp_path / "b.hxc").exists()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_embedding_looks_up_quantised_rows_and_a_tied_head_shares_them(family):
    import copy

    from hxc.compiler.quantize import QuantEmbedding
    from hxc.examples.llm import tiny_model

    model = tiny_model(family, 384)
    q = copy.deepcopy(model)
    quantize_model(q, "int4", GROUP)
    table, head = q.get_input_embeddings(), q.get_output_embeddings()
    assert isinstance(table, QuantEmbedding) and isinstance(head, QuantLinear)
    assert (table.weights is head) == (family == "gpt2")  # GPT-2 ties its head to the embedding
    ids = torch.tensor([[3, 5, 7, 300]])
    torch.testing.assert_close(table(ids), table.weights.dequantized()[ids])


def test_serve_offers_the_variants_it_loads_to_the_requests_that_allow_them(bundle):
    """`hxc serve --precision int8` loads the CPU's int8 artifact beside its fp32 one; a
    request runs on it only when its `precision` names it, and then gives what `generate`
    gives on that artifact."""
    from test_serve import Server

    prompt = [5, 17, 33, 2, 9]
    want = {p: list(hxc.runtime.load(bundle, device="cpu", precision=p).generate(prompt, 6, stop_token_ids=[]).result().token_ids)
            for p in ("fp32", "int8")}  # fmt: skip
    with Server(f"llm={bundle}", "--devices", "cpu", "--precision", "int8") as s:

        def generate(**routing) -> tuple[str, list[int]]:
            body = {"model": "llm", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True, **routing}
            status, headers, raw = s.http("POST", "/v1/completions", json.dumps(body).encode())
            assert status == 200, raw
            return headers["x-hxc-device"], json.loads(raw)["choices"][0]["text"]

        device, text = generate()
        assert device == "cpu:host"  # full precision unless the request allows less
        assert generate(precision="int8")[0] == "cpu:host@int8"
        # The text of each variant is its own generate's (the tokenizer turns the ids into it).
        from hxc.runtime.generate import Tokenizer

        tok = Tokenizer.of(hxc.runtime.load(bundle, device="cpu"))
        assert text == tok.decode(want["fp32"])
        assert generate(precision=["int8"])[1] == tok.decode(want["int8"])
        status, _, raw = s.http("GET", "/v2/models/llm/routing?prompt_tokens=5&max_tokens=6")
        view = {d["name"]: d for d in json.loads(raw)["devices"]}
        assert status == 200 and view["cpu:host@int8"]["why_not"] == "precision int8 not allowed"
        status, _, raw = s.http("GET", "/v2/models/llm/routing?prompt_tokens=5&max_tokens=6&policy=cost&precision=fp32,int8")
        chosen = json.loads(raw)["devices"][0]
        assert chosen["chosen"] and chosen["eligible"]
        assert generate(precision=["fp32", "int8"], policy="cost")[0] == chosen["name"]

"""A Hugging Face causal LM as prefill + decode over a static KV cache
(hxc.compiler.causal_lm): greedy tokens equal `generate(do_sample=False)` token for
token in eager PyTorch, through the argument lists the runtime makes (`hxc.lm_calls`).
Compiled by IREE for the CPU and for Vulkan (lavapipe), through hxc's own pipeline:
tests/test_llm_generate.py."""

from __future__ import annotations

import pytest
import torch

from hxc.compiler.causal_lm import CausalLM, bytes_per_token, cache_shape, generate_greedy
from hxc.errors import UsageError

PROMPTS = ([5, 17, 99, 3, 42, 7, 8, 200, 11, 12], [9, 1, 2, 250])  # the first runs as 2 chunks of 8
CHUNK = 8
NEW_TOKENS = 24


def tiny(family: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "llama":
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             rope_theta=500000.0)  # fmt: skip
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0,
                            eos_token_id=0)  # fmt: skip
        model = GPT2LMHeadModel(config)
    model.eval()
    # Random weights say eos at random: generate the full length, as the wrapper does.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def hf_tokens(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=n)  # fmt: skip
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family(request) -> tuple[str, torch.nn.Module, list[list[int]]]:
    model = tiny(request.param)
    return request.param, model, [hf_tokens(model, list(p), NEW_TOKENS) for p in PROMPTS]


# --- helpers and bad input ---------------------------------------------------------------


def test_cache_shape_and_bytes_per_token():
    config = tiny("llama").config
    assert cache_shape(config, slots=3, max_context=100) == (3, 101, 2, 16)  # per layer, token-major; +1: the scratch row
    assert cache_shape(config, slots=1, max_context=100) == (1, 101, 32)  # one slot: heads and head dim as one axis
    assert bytes_per_token(config) == 2 * 2 * 2 * 16 * 4


def test_unsupported_family_and_bad_sizes_are_one_line_errors():
    from transformers import BertConfig

    with pytest.raises(UsageError, match="unsupported causal LM family 'bert': hxc supports llama, gpt2, mistral, "
                                         "qwen2, phi3, gemma$"):  # fmt: skip
        cache_shape(BertConfig(), 1, 16)
    with pytest.raises(UsageError, match="outside 2..128"):
        CausalLM(tiny("gpt2"), slots=1, max_context=129)


def test_sliding_window_within_the_context_is_causal_attention_and_past_it_refused():
    """Mistral's window: a context up to it is plain causal attention (the eager parity
    below runs inside it); past it hxc would attend to keys HF's mask drops: refused."""
    from transformers import Qwen2Config

    from hxc.compiler.causal_lm import default_max_context, language_model
    from hxc.examples.llm import tiny_config, tiny_model

    config = tiny_config("mistral", 256, max_positions=128)
    config.sliding_window = 48
    with pytest.raises(UsageError, match="max context 64 is past the model's sliding window of 48 tokens: hxc attends "
                                         "over the whole context, so it supports at most 48$"):  # fmt: skip
        cache_shape(config, 1, 64)
    assert cache_shape(config, 1, 48)[1] == 49 and default_max_context(config) == 48
    model = tiny_model("mistral", 256, max_positions=128)
    model.config.sliding_window = 32
    assert language_model(model).layout.max_context == 32  # the default stays inside the window
    # Qwen2's window applies only with use_sliding_window, to the layers layer_types marks.
    assert default_max_context(Qwen2Config(max_position_embeddings=8192, sliding_window=1024)) == 4096
    on = Qwen2Config(max_position_embeddings=8192, sliding_window=1024, use_sliding_window=True, max_window_layers=0)
    assert default_max_context(on) == 1024


def test_what_the_families_differ_in_is_read_from_the_model():
    from transformers import GemmaConfig, GemmaForCausalLM

    from hxc.compiler.causal_lm import SUPPORTED_FAMILIES
    from hxc.examples import llm
    from hxc.examples.llm import tiny_model

    assert llm.FAMILIES == SUPPORTED_FAMILIES  # a tiny model (and tiny_<family> factory) for each
    assert all(callable(getattr(llm, f"tiny_{f}")) for f in SUPPORTED_FAMILIES)

    gemma = CausalLM(tiny_model("gemma", 256, max_positions=128), slots=1, max_context=16)
    assert (gemma.dims.head_dim, gemma.rotary_dim) == (32, 32)  # head_dim is not hidden / heads
    phi3 = CausalLM(tiny_model("phi3", 256, max_positions=128), slots=1, max_context=16)
    assert (phi3.dims.head_dim, phi3.rotary_dim) == (16, 8)  # partial_rotary_factor 0.5
    config = GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, use_bidirectional_attention=True)  # fmt: skip
    with pytest.raises(UsageError, match="this gemma model attends bidirectionally: hxc compiles causal attention only"):
        CausalLM(GemmaForCausalLM(config), slots=1, max_context=16)


# --- eager parity --------------------------------------------------------------------------


@pytest.mark.parametrize("values_by_sum", [False, True], ids=["matmul", "by-sum"])
def test_eager_greedy_equals_generate_two_slots_at_once(family, values_by_sum):
    # by-sum: the attention form weight-only quantised programs compile (hxc.compiler.quantize).
    name, model, expected = family
    lm = CausalLM(model, slots=2, max_context=64, prefill_chunk=CHUNK, values_by_sum=values_by_sum)
    assert generate_greedy(lm, PROMPTS, NEW_TOKENS) == expected


@pytest.mark.parametrize("values_by_sum", [False, True], ids=["matmul", "by-sum"])
def test_eager_greedy_with_prompts_read_in_mixed_steps(family, values_by_sum):
    # The second prompt's chunks ride in `mixed` calls beside the first's decode steps
    # (one weight read for both): each sequence's tokens are still Hugging Face's.
    name, model, expected = family
    lm = CausalLM(model, slots=3, max_context=64, prefill_chunk=(8, 4), values_by_sum=values_by_sum)
    assert generate_greedy(lm, [PROMPTS[1], PROMPTS[0]], NEW_TOKENS, mixed=True) == [expected[1], expected[0]]
    assert "mixed" not in CausalLM(model, slots=1, max_context=64).hxc_functions  # nothing decodes beside a prompt


@pytest.mark.parametrize("name", ["mistral", "qwen2", "phi3", "gemma"])
def test_eager_greedy_equals_generate_other_families(name):
    # The compiled forms: tests/test_llm_families.py (through hxc's pipeline).
    from hxc.examples.llm import tiny_model

    model = tiny_model(name, 256, max_positions=128)
    model.generation_config.eos_token_id = None
    expected = [hf_tokens(model, list(p), NEW_TOKENS) for p in PROMPTS]
    assert generate_greedy(CausalLM(model, slots=2, max_context=64, prefill_chunk=CHUNK), PROMPTS, NEW_TOKENS) == expected


def test_eager_one_slot_of_three_and_whole_prompt_chunk(family):
    # Idle slots decode into the scratch row and disturb nothing; a chunk as long as
    # the prompt gives the same tokens as two chunks.
    name, model, expected = family
    lm = CausalLM(model, slots=3, max_context=64, prefill_chunk=16)
    assert generate_greedy(lm, PROMPTS[:1], NEW_TOKENS) == expected[:1]


def test_a_call_reads_only_its_span_of_the_cache(family):
    # What the span promises: rows past it are never read. NaN in every row no call's
    # span reaches (a masked NaN is still NaN) leaves every token as it was.
    name, model, expected = family
    lm = CausalLM(model, slots=2, max_context=64, prefill_chunk=CHUNK)
    used = max(len(p) for p in PROMPTS) + NEW_TOKENS
    spans = []

    def call(fn, args, caches):
        spans.append(args[-1].shape[0])
        for c in caches:
            c[:, :, used:-1] = float("nan")  # short of the scratch row, which idle slots write
        with torch.no_grad():
            out = getattr(lm, fn)(*(torch.from_numpy(a) for a in args), *caches)
        return [out[0].numpy()], list(out[1:])

    assert generate_greedy(lm, PROMPTS, NEW_TOKENS, call=call) == expected
    assert max(spans) < used and spans[-1] == max(len(p) for p in PROMPTS) + NEW_TOKENS - 1


def test_next_chunk_takes_the_largest_a_prompt_fills_or_the_smallest():
    from hxc.lm_calls import next_chunk, prefill_function

    assert [next_chunk((8, 32), n) for n in (1, 8, 31, 32, 100)] == [8, 8, 8, 32, 32]
    assert next_chunk((8, 32), 100, smallest=True) == 8
    assert [prefill_function(c, (8, 32, 128)) for c in (8, 32, 128)] == ["prefill", "prefill_32", "prefill_128"]


def test_eager_greedy_with_two_prefill_chunks(family):
    # PROMPTS[0] (10 tokens) goes in as 8, then 2 in a chunk of 4; PROMPTS[1] (4) as one 4.
    name, model, expected = family
    lm = CausalLM(model, slots=2, max_context=64, prefill_chunk=(8, 4))
    assert list(lm.hxc_functions) == ["prefill", "prefill_8", "decode", "mixed"] and lm.prefill_chunk == 4
    assert generate_greedy(lm, PROMPTS, NEW_TOKENS) == expected
    with pytest.raises(UsageError, match="prefill chunk 65 is outside 1..64"):
        CausalLM(model, slots=1, max_context=64, prefill_chunk=(8, 65))

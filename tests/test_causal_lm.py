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
    assert cache_shape(config, slots=3, max_context=100) == (3, 2, 101, 16)  # per layer; +1: the scratch row
    assert bytes_per_token(config) == 2 * 2 * 2 * 16 * 4


def test_unsupported_family_and_bad_sizes_are_one_line_errors():
    from transformers import BertConfig

    with pytest.raises(UsageError, match="unsupported causal LM family 'bert': hxc supports llama, gpt2"):
        cache_shape(BertConfig(), 1, 16)
    with pytest.raises(UsageError, match="outside 2..128"):
        CausalLM(tiny("gpt2"), slots=1, max_context=129)


# --- eager parity --------------------------------------------------------------------------


def test_eager_greedy_equals_generate_two_slots_at_once(family):
    name, model, expected = family
    lm = CausalLM(model, slots=2, max_context=64, prefill_chunk=CHUNK)
    assert generate_greedy(lm, PROMPTS, NEW_TOKENS) == expected


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
        return out[0].numpy(), list(out[1:])

    assert generate_greedy(lm, PROMPTS, NEW_TOKENS, call=call) == expected
    assert max(spans) < used and spans[-1] == max(len(p) for p in PROMPTS) + NEW_TOKENS - 1

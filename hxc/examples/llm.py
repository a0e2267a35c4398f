"""Tiny language models with RANDOM weights and a tokenizer trained here on a few
sentences: for tests, benchmarks and the README, without downloads. Their text is
noise; what they show is that hxc generates exactly what Hugging Face does.

    hxc compile hxc.examples.llm:tiny_llama -t cpu      # a factory: (model, tokenizer)
    python -c "from hxc.examples.llm import save_tiny_lm; save_tiny_lm('tiny-llama')"
    hxc compile tiny-llama/                             # a Hugging Face directory

Nothing here imports hxc's compiler; transformers and tokenizers load when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FAMILIES = ("llama", "gpt2")
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A compiler turns one program into another, faster one.",
    "Every device runs the same bundle, token for token.",
    "Language models predict the next token from the ones before it.",
    "Hello world! How are you today? I am fine, thank you.",
    "Numbers like 3, 14 and 2048 are tokens too.",
)
BOS, EOS = "<s>", "</s>"
# The Llama flavour's chat template (a tiny one, in the usual shape): each message as
# <|role|>text</s>, then <|assistant|> to open the reply.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")  # fmt: skip


def tiny_tokenizer(family: str = "llama", vocab_size: int = 384) -> Any:
    """A byte-level BPE (any text encodes) trained on SENTENCES, as a transformers fast
    tokenizer: the Llama flavour adds BOS in front of every prompt and has a chat
    template, GPT-2's adds nothing and has none."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    tok.train_from_iterator(SENTENCES, trainer)
    if family == "llama":
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, tok.token_to_id(BOS))])  # fmt: skip
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, clean_up_tokenization_spaces=False)
    if family == "llama":
        out.chat_template = CHAT_TEMPLATE
    return out


def tiny_model(family: str, vocab_size: int, seed: int = 0, max_positions: int = 256) -> Any:
    """A 2-layer causal LM of `family` with random weights drawn from `seed`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    torch.manual_seed(seed)
    if family == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                             rope_theta=10000.0, bos_token_id=0, eos_token_id=1)  # fmt: skip
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=max_positions,
                            bos_token_id=0, eos_token_id=1)  # fmt: skip
        model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = 1
    return model.eval()


def tiny_lm(family: str = "llama", seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer): a random-weight model whose vocabulary is the tokenizer's."""
    tokenizer = tiny_tokenizer(family)
    return tiny_model(family, len(tokenizer), seed), tokenizer


def tiny_llama() -> tuple[Any, Any]:
    """A random-weight Llama (2 layers, hidden 64, 4 heads / 2 KV heads) and its tokenizer."""
    return tiny_lm("llama")


def tiny_gpt2() -> tuple[Any, Any]:
    """A random-weight GPT-2 (2 layers, hidden 64, 4 heads) and its tokenizer."""
    return tiny_lm("gpt2")


def save_tiny_lm(directory: str | Path, family: str = "llama", seed: int = 0) -> Path:
    """Write a tiny random-weight model as a Hugging Face directory (config.json,
    model.safetensors, generation_config.json, tokenizer files)."""
    out = Path(directory)
    model, tokenizer = tiny_lm(family, seed)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out

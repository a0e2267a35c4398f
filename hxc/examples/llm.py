"""Tiny language models with RANDOM weights and a tokenizer trained here on a few
sentences: for tests, benchmarks and the README, without downloads. Their text is
noise; what they show is that hxc generates exactly what Hugging Face does.

    hxc compile hxc.examples.llm:tiny_llama -t cpu      # a factory: (model, tokenizer)
    hxc compile hxc.examples.llm:tiny_qwen2 -t cpu      # also tiny_gpt2, tiny_mistral, tiny_phi3, tiny_gemma
    python -c "from hxc.examples.llm import save_tiny_lm; save_tiny_lm('tiny-llama')"
    hxc compile tiny-llama/                             # a Hugging Face directory

Nothing here imports hxc's compiler; transformers and tokenizers load when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# One tiny model per family hxc compiles (hxc.compiler.causal_lm.SUPPORTED_FAMILIES).
FAMILIES = ("llama", "gpt2", "mistral", "qwen2", "phi3", "gemma")
# The families whose tokenizer puts a BOS in front of every prompt (and whose tiny
# tokenizer has the chat template); GPT-2's and Qwen2's add nothing.
_ADDS_BOS = ("llama", "mistral", "phi3", "gemma")
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
    tokenizer: the Llama flavour (and Mistral's, Phi-3's, Gemma's) adds BOS in front of
    every prompt and has a chat template, GPT-2's (and Qwen2's) adds nothing and has none."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    tok.train_from_iterator(SENTENCES, trainer)
    if family in _ADDS_BOS:
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, tok.token_to_id(BOS))])  # fmt: skip
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, clean_up_tokenization_spaces=False)
    if family in _ADDS_BOS:
        out.chat_template = CHAT_TEMPLATE
    return out


def tiny_config(family: str, vocab_size: int, max_positions: int = 256) -> Any:
    """A transformers config of `family`: 2 layers, hidden 64, 4 heads (2 KV heads where
    the family has grouped queries), and each family's own twist, kept so the tiny
    model exercises it: Mistral's sliding window (as wide as its positions, so any
    context hxc takes lies inside it) and 4 query heads per KV head, Qwen2's q/k/v biases, Phi-3's fused projections
    with a partial rotary factor (rope on half of each head, as Phi-4-mini has 3/4),
    Gemma's head_dim (32) that is not hidden / heads. Embeddings are not tied to the
    head (Gemma's are, in every release): tied, a random-weight model's residual stream
    is mostly the current token's embedding, so it repeats its last token forever and
    greedy parity checks little (tiny GPT-2, tied, does that)."""
    import transformers as tf

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=max_positions,
                             bos_token_id=0, eos_token_id=1)  # fmt: skip
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=max_positions, rope_theta=10000.0, **ids)  # fmt: skip
    if family == "llama":
        return tf.LlamaConfig(**{**common, "pad_token_id": None})
    if family == "mistral":
        return tf.MistralConfig(**{**common, "num_key_value_heads": 1}, sliding_window=max_positions)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "phi3":
        return tf.Phi3Config(**common, partial_rotary_factor=0.5)
    return tf.GemmaConfig(**common, head_dim=32, tie_word_embeddings=False)


def tiny_model(family: str, vocab_size: int, seed: int = 0, max_positions: int = 256) -> Any:
    """A 2-layer causal LM of `family` with random weights drawn from `seed`."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, vocab_size, max_positions)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if family not in ("llama", "gpt2"):
        # transformers starts biases at 0 and norm weights at 1 (Gemma's at 0: it scales
        # by 1 + w), so a wrong bias or norm would go unnoticed: give them the weights'
        # spread too (more, 0.1, made tiny Qwen2 repeat one token).
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(torch.randn_like(p) * config.initializer_range)
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


def tiny_mistral() -> tuple[Any, Any]:
    """A random-weight Mistral (as tiny_llama with 1 KV head and a sliding window of 256) and its tokenizer."""
    return tiny_lm("mistral")


def tiny_qwen2() -> tuple[Any, Any]:
    """A random-weight Qwen2 (as tiny_llama, with q/k/v biases, tied embeddings) and its tokenizer."""
    return tiny_lm("qwen2")


def tiny_phi3() -> tuple[Any, Any]:
    """A random-weight Phi-3 (fused qkv and gate/up projections, rope on half of each head) and its tokenizer."""
    return tiny_lm("phi3")


def tiny_gemma() -> tuple[Any, Any]:
    """A random-weight Gemma 1 (head_dim 32, scaled embeddings, GELU, (1 + w) norms) and its tokenizer."""
    return tiny_lm("gemma")


def save_tiny_lm(directory: str | Path, family: str = "llama", seed: int = 0) -> Path:
    """Write a tiny random-weight model as a Hugging Face directory (config.json,
    model.safetensors, generation_config.json, tokenizer files)."""
    out = Path(directory)
    model, tokenizer = tiny_lm(family, seed)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out

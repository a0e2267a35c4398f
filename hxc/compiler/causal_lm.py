"""A Hugging Face causal LM as two exportable functions over a static KV cache.

`CausalLM` wraps a `transformers` model (a family of `SUPPORTED_FAMILIES`: Llama,
GPT-2, Mistral, Qwen2, Phi-3, Gemma 1) without copying its weights: it calls the model's
own embeddings, norms, projections, MLPs and head, and reads the rotary frequencies from
the model's rotary embedding, so each family's quirks (Qwen2's q/k/v biases, Phi-3's
fused projections, Gemma's scaled embedding, (1 + w) RMSNorm and GELU MLP) are the
model's own code. It adds what HF's `generate` keeps in Python objects and what IREE
cannot take as it is:

- `prefill(tokens[1, n], start[1], length[1], slot[1], k_cache, v_cache)` runs a chunk
  of up to n prompt tokens of sequence `slot` at positions start..start+length-1 (the
  rest of the chunk is padding), so a long prompt runs as several fixed-size chunks;
  it returns the logits of the chunk's last valid token, [1, vocab], and the caches.
- `decode(tokens[B], positions[B], k_cache, v_cache)` runs one token for each of the B
  slots (B = slots, static), each at its own position, and returns logits [B, vocab]
  and the caches. A slot with nothing to do passes position `max_context`: its key and
  value go to the scratch row, and its logits mean nothing.

The caches are [slots, layers, kv_heads, max_context + 1, head_dim] float32: the last
row of the context axis is a scratch row that padding and idle slots write into, so
every write has a place to go. They are passed in and returned (or, with
cache_write="inplace", updated in place and not returned), so the runtime can keep
them on the device as state.

Every layer attends to the cache as it was *before* the call (masked to the positions
already written) plus the call's own keys (causally), with one softmax over both; the
new keys and values are written once, after the last layer. So attention never waits
for a write, and the write is one operation over all layers.

What the export needs (IREE 3.13, iree-turbine 3.9, measured; see also
/work/shared/IREE_NOTES.md "Language models"):
- attention is matmul -> softmax -> matmul with an additive float mask: SDPA does not
  lower for SPIR-V ('iree_linalg_ext.online_attention' op result #0 must be variadic
  of ranked tensor ... but got 'memref<...>'), and a boolean SDPA mask fails
  ('tensor.collapse_shape' op expected the expanded type ...);
- masks come from single comparisons (a range check is `min(rel, len-1-rel) >= 0`):
  `&` of boolean tensors fails to legalize (torch.aten.__and__.Tensor);
- token ids and positions are int32 (SPIR-V's portable profile has no Int64);
- one tensor passed as two example arguments is one input to torch.export: with the
  same zeros for `start` and `slot`, the compiled prefill read `slot` as `start`
  (right at start 0, wrong after): every example argument is its own tensor;
- the cache write (`CACHE_WRITES`): all three forms compile for llvm-cpu and for the
  portable vulkan-spirv variant and give HF's tokens on local-task and lavapipe.
  `index_put` on the cache *arguments* lowers to a scatter that compiles (the
  `index_copy` failure in IREE_NOTES, "write affecting operations on global
  resources are restricted to workgroup distributed contexts", was a cache held in
  module globals). "inplace" (`index_put_` on the arguments, only the logits
  returned) exports as `torch.overwrite.tensor.contents`, but IREE still copies each
  cache into a transient buffer, scatters there and copies it back
  (`stream.cmd.copy` x4 in the decode's stream IR): no mode yet costs O(tokens
  written).

Measured (this 2-core machine, shared and noisy: +-50% between runs):
- tiny Llama of the tests (2 layers, hidden 64, 2 slots, context 64), decode step:
  local-task 0.1-0.3 ms, lavapipe 17-28 ms (first call 0.4-11 s: pipelines);
- cost against max_context, Llama 4 layers, hidden 256, 8 heads / 4 KV heads, 4 slots,
  local-task, decode step median ms (cache k+v MiB): no write at all (attention over
  the full context only) 4 (4) / 16-34 (64) at 256 / 4096; "select" 4.0 (4), 24 (16),
  188 (64) at 256, 1024, 4096; "scatter" 4.2-6.7, 47 (with a transposed copy, since
  removed), 92-129; "inplace" 2.3-7.4, 12, 46-123. Every form grows with the maximum
  context: attention reads the whole cache (masked) and the write copies it. A cost
  that follows the filled length needs a dynamic context length or pages (part 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hxc.errors import LoweringError, UsageError
from hxc.functions import Function
from hxc.manifests.schema import GREEDY_LOGITS, TOKENIZER_DIR, GreedyReference, LanguageModel

if TYPE_CHECKING:
    from hxc.compiler.imported import ImportedModel


@dataclass(frozen=True)
class _Family:
    """What differs in how hxc reads one transformers family (its `model_type`); the rest
    (biases, norms, MLPs, activations) lives in the model's own modules."""

    # Rotary positions over Llama-shaped modules (`model.model.{embed_tokens, layers, norm,
    # rotary_emb}`, `layer.self_attn`, `input_layernorm`, `post_attention_layernorm`,
    # `mlp`); False: GPT-2's learned positions (`model.transformer.{wte, wpe, h, ln_f}`).
    rotary: bool = True
    # One `qkv_proj` (Phi-3) instead of `q_proj`, `k_proj`, `v_proj`.
    fused_qkv: bool = False
    # Embeddings times sqrt(hidden), in the model's dtype (Gemma). transformers 5 does it
    # inside `embed_tokens` (it then has `embed_scale`); 4.x did it in the model's forward.
    scaled_embedding: bool = False


_FAMILIES = {
    "llama": _Family(),
    "gpt2": _Family(rotary=False),
    "mistral": _Family(),
    "qwen2": _Family(),
    "phi3": _Family(fused_qkv=True),
    "gemma": _Family(scaled_embedding=True),
}
SUPPORTED_FAMILIES = tuple(_FAMILIES)
# How the new keys/values get into the cache (see the module docstring for costs):
# - "select": a `where` over the whole cache with a mask of the written positions;
# - "scatter": `index_put` at (slot, layer, head, position), padding to the scratch row;
# - "inplace": the same `index_put_` on the cache arguments themselves: the functions
#   return the logits alone and the caller's cache buffers are updated.
# The default is "scatter": it returns the caches (state in, state out) and cost less
# than "select" at long contexts.
CACHE_WRITES = ("select", "scatter", "inplace")
# Llama rope types whose frequencies depend on the sequence length at run time: the
# static frequencies read from the model would be wrong for them.
_DYNAMIC_ROPE = ("dynamic", "longrope")
# Prompt tokens per prefill call: a prompt runs as ceil(n / chunk) calls of this size.
# One bucket for now: a short prompt pays for the whole chunk, a long one for one call
# per chunk.
DEFAULT_PREFILL_CHUNK = 32
# The default context when none is asked for: the model's own maximum, up to this (the
# cache is static: every slot holds max_context tokens' worth of keys and values).
DEFAULT_MAX_CONTEXT = 4096
# What a tokenizer's save_pretrained writes that the bundle carries: hxc's runtime reads
# tokenizer.json (with the `tokenizers` library) and tokenizer_config.json.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja")  # fmt: skip
# The greedy reference `hxc verify` checks (`LanguageModel.greedy_reference`): this
# text, tokenised by the bundle's tokenizer (seeded ids without one), cut to a prompt
# that spans two prefill chunks, and this many tokens Hugging Face generates after it.
REFERENCE_TEXT = "The quick brown fox jumps over the lazy dog. Every device runs the same bundle, token for token. "
REFERENCE_TOKENS = 16


@dataclass(frozen=True)
class CacheLayout:
    """The KV cache of one model at a given slot count and context: each of k and v is
    one float32 tensor of `shape`."""

    slots: int
    layers: int
    kv_heads: int
    max_context: int
    head_dim: int
    dtype: str = "float32"

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        # +1: the scratch row (see the module docstring).
        return (self.slots, self.layers, self.kv_heads, self.max_context + 1, self.head_dim)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 4

    @property
    def nbytes(self) -> int:
        return 2 * self.slots * self.layers * self.kv_heads * (self.max_context + 1) * self.head_dim * 4


@dataclass(frozen=True)
class _Dims:
    family: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    max_positions: int
    # Sliding-window attention: a query at position p sees keys p-window+1..p (HF's
    # `sliding_window_overlay`); None when every layer attends to the whole context.
    window: int | None = None


def _dims(config: Any) -> _Dims:
    family = getattr(config, "model_type", None)
    if family not in _FAMILIES:
        raise UsageError(f"unsupported causal LM family {family!r}: hxc supports {', '.join(SUPPORTED_FAMILIES)}")
    if not _FAMILIES[family].rotary:
        heads = config.n_head
        return _Dims(family, config.n_layer, heads, heads, config.n_embd // heads, config.n_positions)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return _Dims(family, config.num_hidden_layers, heads, kv, head_dim, config.max_position_embeddings,
                 _sliding_window(config))  # fmt: skip


def _sliding_window(config: Any) -> int | None:
    """The window of the config's sliding-window layers, or None if it has none (Mistral
    and Phi-3: `sliding_window` applies to every layer when set; Qwen2: only with
    `use_sliding_window`, to the layers `layer_types` marks "sliding_attention")."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    return int(window)


def default_max_context(config: Any) -> int:
    """The context a build gets when none is asked for: the model's maximum, up to
    DEFAULT_MAX_CONTEXT and the sliding window (beyond it hxc's attention is not the
    model's: see `cache_layout`)."""
    d = _dims(config)
    return min(d.max_positions, DEFAULT_MAX_CONTEXT, d.window or d.max_positions)


def cache_shape(config: Any, slots: int, max_context: int) -> tuple[int, int, int, int, int]:
    """The shape of each of k_cache and v_cache for `config` (a transformers config)."""
    return cache_layout(config, slots, max_context).shape


def cache_layout(config: Any, slots: int, max_context: int) -> CacheLayout:
    d = _dims(config)
    if slots < 1:
        raise UsageError(f"slots must be at least 1, not {slots}")
    if not 1 <= max_context <= d.max_positions:
        raise UsageError(f"max context {max_context} is outside 1..{d.max_positions} (the model's maximum)")
    if d.window is not None and max_context > d.window:
        # Within the window, sliding-window attention is plain causal attention; past it
        # the masks would have to drop keys older than the window, which they do not.
        raise UsageError(f"max context {max_context} is past the model's sliding window of {d.window} tokens: "
                         f"hxc attends over the whole context, so it supports at most {d.window}")  # fmt: skip
    return CacheLayout(slots, d.layers, d.kv_heads, max_context, d.head_dim)


def bytes_per_token(config: Any) -> int:
    """KV-cache bytes one token of context takes (keys and values, all layers, fp32)."""
    d = _dims(config)
    return 2 * d.layers * d.kv_heads * d.head_dim * 4


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dims: int) -> torch.Tensor:
    """HF's apply_rotary_pos_emb on x [rows, heads, hd]: rotate-half over the first `dims`
    of each head (all of them but with Phi-3's partial_rotary_factor), the rest as is."""

    def rotate_half(t: torch.Tensor) -> torch.Tensor:
        half = t.shape[-1] // 2
        return torch.cat((-t[..., half:], t[..., :half]), dim=-1)

    if dims == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :dims], x[..., dims:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


def _range_mask(rel: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """rel in [0, length), as one comparison (`&` of boolean tensors does not lower)."""
    return torch.minimum(rel, length - 1 - rel) >= 0


class CausalLM(torch.nn.Module):
    """`model` (a transformers causal LM) as `prefill` and `decode` over a static KV
    cache of `slots` sequences of up to `max_context` tokens (see the module docstring)."""

    # Weights once per bundle, in its parameter archive, read by every target's
    # artifact: a language model's weights dominate the bundle, and a copy inside each
    # vmfb would multiply them by the targets (`--weights inline` is refused).
    hxc_weights = "shared"

    def __init__(self, model: torch.nn.Module, slots: int, max_context: int, cache_write: str = "scatter",
                 prefill_chunk: int | None = None) -> None:  # fmt: skip
        super().__init__()
        config = model.config
        self.layout = cache_layout(config, slots, max_context)
        self.dims = d = _dims(config)
        if cache_write not in CACHE_WRITES:
            raise UsageError(f"unknown cache write {cache_write!r}: one of {', '.join(CACHE_WRITES)}")
        self.cache_write = cache_write
        self.prefill_chunk = min(DEFAULT_PREFILL_CHUNK, max_context) if prefill_chunk is None else prefill_chunk
        if not 1 <= self.prefill_chunk <= max_context:
            raise UsageError(f"prefill chunk {self.prefill_chunk} is outside 1..{max_context} (the max context)")
        self._declare_functions()
        self.model = model.eval()
        self.vocab = config.vocab_size
        self.group = d.heads // d.kv_heads
        self.spec = spec = _FAMILIES[d.family]
        self.rope: Any = None
        self.embed_scale: float | None = None
        if spec.rotary:
            base = model.model
            rope = base.rotary_emb
            rope_type = getattr(rope, "rope_type", "default")
            if any(t in str(rope_type) for t in _DYNAMIC_ROPE):
                raise UsageError(f"rope type {rope_type!r} changes with the sequence length: not supported yet")
            if getattr(config, "use_bidirectional_attention", False):
                raise UsageError(f"this {d.family} model attends bidirectionally: hxc compiles causal attention only")
            self.embed, self.layers, self.norm = base.embed_tokens, base.layers, base.norm
            self.rope = rope
            # Rotary dims per head: all of them, or the first part (Phi-3's partial_rotary_factor).
            self.rotary_dim = 2 * rope.inv_freq.shape[-1]
            if spec.scaled_embedding and not hasattr(self.embed, "embed_scale"):
                self.embed_scale = config.hidden_size**0.5
            self.scaling = [layer.self_attn.scaling for layer in base.layers]
        else:
            base = model.transformer
            self.embed, self.layers, self.norm = base.wte, base.h, base.ln_f
            self.wpe = base.wpe
            self.scaling = [layer.attn.scaling for layer in base.h]
        self.lm_head = model.lm_head

    def _declare_functions(self) -> None:
        """`prefill` and `decode` as hxc functions over the state `k_cache`, `v_cache`
        (`hxc.functions`), so hxc's compile path builds them like any model of several
        functions. "inplace" returns no caches, so it has no state form: it is for
        `export_mlir` only."""
        if self.cache_write == "inplace":
            self.hxc_functions = None
            return
        lay = self.layout
        i32 = torch.int32
        k, v = empty_cache(lay)
        self.hxc_state = {"k_cache": k, "v_cache": v}
        self.hxc_state_slots = {"k_cache": lay.slots, "v_cache": lay.slots}
        caches = ("k_cache", "v_cache")
        # Every example its own tensor (see the module docstring: torch.export merges one
        # tensor passed twice into one input).
        self.hxc_functions = {
            "prefill": Function(args=(torch.zeros(1, self.prefill_chunk, dtype=i32), torch.zeros(1, dtype=i32),
                                      torch.ones(1, dtype=i32), torch.zeros(1, dtype=i32)),
                                reads=caches, writes=caches, arg_names=("tokens", "start", "length", "slot")),
            "decode": Function(args=(torch.zeros(lay.slots, dtype=i32), torch.zeros(lay.slots, dtype=i32)),
                               reads=caches, writes=caches, arg_names=("tokens", "positions")),
        }  # fmt: skip

    def hxc_describe(self, imported: ImportedModel, workdir: Path) -> ImportedModel:
        """The bundle's `language_model` record and the tokenizer's files
        (`hxc.compiler.functions` calls this after importing the functions)."""
        model, lay, d = self.model, self.layout, self.dims
        files = save_tokenizer(getattr(self, "tokenizer", None), workdir / TOKENIZER_DIR)
        gen = getattr(model, "generation_config", None)
        bos = _first_id(getattr(gen, "bos_token_id", None), getattr(model.config, "bos_token_id", None))
        eos = _ids(getattr(gen, "eos_token_id", None)) or _ids(getattr(model.config, "eos_token_id", None))
        reference, logits = self.greedy_reference(files.get(f"{TOKENIZER_DIR}/tokenizer.json"))
        record = LanguageModel(family=d.family, vocab_size=self.vocab, layers=d.layers, heads=d.heads, kv_heads=d.kv_heads,
                               head_dim=d.head_dim, max_context=lay.max_context, slots=lay.slots,
                               prefill_chunk=self.prefill_chunk, kv_bytes_per_token=lay.bytes_per_token,
                               bos_token_id=bos, eos_token_ids=eos, tokenizer_files=tuple(sorted(files)),
                               greedy_reference=reference)  # fmt: skip
        # The golden sample is the greedy reference's logits, not each function's sample:
        # those hold the full KV caches in and out (8 caches of slots x layers x kv heads x
        # max context x head dim: 1.1 GB for Llama 3.2 1B at 4096), while the reference
        # ([16, vocab] f32: 8.2 MB at a 128K vocabulary) runs both functions the way
        # generation does (two prefill chunks, then decode steps over the cache they
        # wrote), so `hxc verify` still checks every function's numbers, and the tokens.
        return replace(imported, language_model=record, files=files, golden={GREEDY_LOGITS: logits})

    def greedy_reference(self, tokenizer_json: Path | None) -> tuple[GreedyReference, Any]:
        """A prompt and Hugging Face's greedy continuation of it (`generate(do_sample=False)`
        with a plain generation config: no end-of-sequence stop, no repetition penalty or
        other logits processor, which hxc's greedy choice does not apply either), with
        the logits of each step, [steps, vocab] float32."""
        import numpy as np
        from transformers import GenerationConfig

        lay = self.layout
        steps = min(REFERENCE_TOKENS, lay.max_context)
        length = max(1, min(self.prefill_chunk + 8, lay.max_context + 1 - steps))  # prompt + steps - 1 <= context
        if tokenizer_json is not None:
            from tokenizers import Tokenizer

            ids = Tokenizer.from_file(str(tokenizer_json)).encode(REFERENCE_TEXT * (1 + length // 8)).ids[:length]
        else:
            ids = np.random.default_rng(0).integers(0, self.vocab, length).tolist()
        model = self.model
        # generate() fills what its config leaves unset from the model's own config (its
        # end-of-sequence id among them), so the plain config replaces it for the call.
        saved = model.generation_config
        model.generation_config = GenerationConfig(do_sample=False, max_new_tokens=steps, min_new_tokens=0,
                                                   pad_token_id=0, output_logits=True, return_dict_in_generate=True)  # fmt: skip
        try:
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        except Exception as e:
            raise LoweringError(f"transformers' generate failed on the reference prompt ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0][:300]})") from None  # fmt: skip
        finally:
            model.generation_config = saved
        tokens = out.sequences[0, len(ids):].tolist()
        logits = torch.stack(out.logits)[:, 0].float().numpy()
        if len(tokens) != steps or logits.shape != (steps, self.vocab):
            raise LoweringError(f"transformers' generate gave {len(tokens)} tokens of logits {tuple(logits.shape)}; "
                                f"expected {steps} of {steps}x{self.vocab}")  # fmt: skip
        return GreedyReference(prompt_token_ids=tuple(int(i) for i in ids), token_ids=tuple(int(t) for t in tokens)), logits

    # ---- one layer's pieces, per family -------------------------------------------

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens)
        if self.embed_scale is not None:
            # As transformers 4.x's GemmaModel: the scale rounded to the hidden states' dtype.
            hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        if not self.spec.rotary:
            # Padding and idle slots may sit past the table: clamp, their output is unused.
            hidden = hidden + self.wpe(positions.clamp(0, self.dims.max_positions - 1))
        return hidden

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # HF's LlamaRotaryEmbedding.forward (the same in every rotary family here) for
        # static rope types, with the model's own inverse frequencies and scaling
        # (rope_theta, linear/llama3/yarn factors).
        freqs = positions[..., None].float() * self.rope.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.rope.attention_scaling, emb.sin() * self.rope.attention_scaling

    def _qkv(self, i: int, x: torch.Tensor, rope: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [rows, heads, hd], k and v [rows, kv_heads, hd] for x [rows, hidden]."""
        d = self.dims
        layer = self.layers[i]
        rows = x.shape[0]
        if self.spec.rotary:
            attn = layer.self_attn
            if self.spec.fused_qkv:
                # Phi-3's qkv_proj: the query heads, then the key heads, then the value heads.
                q, k, v = attn.qkv_proj(x).split((d.heads * d.head_dim, d.kv_heads * d.head_dim,
                                                  d.kv_heads * d.head_dim), dim=-1)  # fmt: skip
            else:
                q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            q = q.reshape(rows, d.heads, d.head_dim)
            k = k.reshape(rows, d.kv_heads, d.head_dim)
            v = v.reshape(rows, d.kv_heads, d.head_dim)
            cos, sin = (t[:, None, :] for t in rope)
            return _rotate(q, cos, sin, self.rotary_dim), _rotate(k, cos, sin, self.rotary_dim), v
        q, k, v = layer.attn.c_attn(x).split(d.heads * d.head_dim, dim=-1)
        return (q.reshape(rows, d.heads, d.head_dim), k.reshape(rows, d.kv_heads, d.head_dim),
                v.reshape(rows, d.kv_heads, d.head_dim))  # fmt: skip

    def _pre_attn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        return layer.input_layernorm(x) if self.spec.rotary else layer.ln_1(x)

    def _post_attn(self, i: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        # Phi-3's residual dropouts are identities in eval mode, so they are left out.
        layer = self.layers[i]
        if self.spec.rotary:
            x = x + layer.self_attn.o_proj(attn)
            return x + layer.mlp(layer.post_attention_layernorm(x))
        x = x + layer.attn.c_proj(attn)
        return x + layer.mlp(layer.ln_2(x))

    def _attend(self, i: int, q: torch.Tensor, k_old: torch.Tensor, v_old: torch.Tensor, old_mask: torch.Tensor,
                k_new: torch.Tensor, v_new: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Attention of q [S, n, heads, hd] over the old cache [S, kv, C, hd] and the new
        keys [S, n, kv, hd], with additive masks [S, n, C] and [S, n, n] (or broadcastable).
        Written as matmul -> softmax -> matmul (SDPA does not lower for SPIR-V)."""
        d = self.dims
        s, n = q.shape[0], q.shape[1]
        # Query head h uses kv head h // group (HF's repeat_kv): [S, kv, group*n, hd].
        qg = q.reshape(s, n, d.kv_heads, self.group, d.head_dim).permute(0, 2, 3, 1, 4)
        qg = qg.reshape(s, d.kv_heads, self.group * n, d.head_dim) * self.scaling[i]
        kn, vn = k_new.transpose(1, 2), v_new.transpose(1, 2)  # [S, kv, n, hd]
        old = (qg @ k_old.transpose(-1, -2)).view(s, d.kv_heads, self.group, n, -1) + old_mask[:, None, None]
        new = (qg @ kn.transpose(-1, -2)).view(s, d.kv_heads, self.group, n, n) + new_mask[:, None, None]
        c = old.shape[-1]
        probs = torch.softmax(torch.cat((old, new), dim=-1), dim=-1)
        p_old = probs[..., :c].reshape(s, d.kv_heads, self.group * n, c)
        p_new = probs[..., c:].reshape(s, d.kv_heads, self.group * n, n)
        out = p_old @ v_old + p_new @ vn  # [S, kv, group*n, hd]
        out = out.view(s, d.kv_heads, self.group, n, d.head_dim).permute(0, 3, 1, 2, 4)
        return out.reshape(s, n, d.heads * d.head_dim)

    def _layers(self, hidden: torch.Tensor, positions: torch.Tensor, k_old: torch.Tensor, v_old: torch.Tensor,
                old_mask: torch.Tensor, new_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Every layer for hidden [S, n, H] at positions [S, n] over the old caches
        [S, L, kv, C, hd]; returns the final hidden states and the new keys and values,
        [S, L, n, kv, hd] each."""
        s, n, width = hidden.shape
        rope = self._rope(positions.reshape(s * n)) if self.rope is not None else None
        ks, vs = [], []
        for i in range(self.dims.layers):
            x = self._pre_attn(i, hidden).reshape(s * n, width)
            q, k, v = self._qkv(i, x, rope)
            q = q.view(s, n, self.dims.heads, self.dims.head_dim)
            k = k.view(s, n, self.dims.kv_heads, self.dims.head_dim)
            v = v.view(s, n, self.dims.kv_heads, self.dims.head_dim)
            attn = self._attend(i, q, k_old[:, i], v_old[:, i], old_mask, k, v, new_mask)
            hidden = self._post_attn(i, hidden, attn)
            ks.append(k)
            vs.append(v)
        return self.norm(hidden), torch.stack(ks, dim=1), torch.stack(vs, dim=1)

    # ---- the two entry points -----------------------------------------------------

    def prefill(self, tokens: torch.Tensor, start: torch.Tensor, length: torch.Tensor, slot: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Logits [1, vocab] of the chunk's last valid token, and the updated caches."""
        n = tokens.shape[1]
        ctx = self.layout.max_context + 1
        start, length, slot = start.reshape(1), length.reshape(1), slot.reshape(1)
        offsets = torch.arange(n, dtype=torch.int32)
        positions = (start + offsets).reshape(1, n)
        k_old, v_old = k_cache.index_select(0, slot), v_cache.index_select(0, slot)
        kpos = torch.arange(ctx, dtype=torch.int32)
        # Old rows written before this chunk: position < start (the scratch row is >= start).
        old_mask = torch.where(kpos < start, 0.0, float("-inf")).reshape(1, 1, ctx)
        new_mask = torch.where(offsets[None, :] <= offsets[:, None], 0.0, float("-inf")).reshape(1, n, n)
        hidden = self._embed(tokens, positions)
        hidden, k_new, v_new = self._layers(hidden, positions, k_old, v_old, old_mask, new_mask)
        last = hidden[0].index_select(0, (length - 1).clamp(0, n - 1))  # [1, H]
        logits = self.lm_head(last)
        k_cache, v_cache = self._write_prefill(k_cache, v_cache, k_new[0], v_new[0], start, length, slot)
        if self.cache_write == "inplace":
            return (logits,)
        return logits, k_cache, v_cache

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Logits [B, vocab] of one token per slot, and the updated caches."""
        b = tokens.shape[0]
        ctx = self.layout.max_context + 1
        kpos = torch.arange(ctx, dtype=torch.int32)
        old_mask = torch.where(kpos[None, :] < positions[:, None], 0.0, float("-inf")).reshape(b, 1, ctx)
        new_mask = torch.zeros(1, 1, 1)
        hidden = self._embed(tokens.reshape(b, 1), positions.reshape(b, 1))
        hidden, k_new, v_new = self._layers(hidden, positions.reshape(b, 1), k_cache, v_cache, old_mask, new_mask)
        logits = self.lm_head(hidden[:, 0])
        k_cache, v_cache = self._write_decode(k_cache, v_cache, k_new[:, :, 0], v_new[:, :, 0], positions)
        if self.cache_write == "inplace":
            return (logits,)
        return logits, k_cache, v_cache

    # ---- cache writes ---------------------------------------------------------------

    def _write_prefill(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                       start: torch.Tensor, length: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """k_new, v_new [L, n, kv, hd] into slot `slot` at positions start..start+length-1."""
        lay = self.layout
        n = k_new.shape[1]
        ctx = lay.max_context + 1
        if self.cache_write == "select":
            rel = torch.arange(ctx, dtype=torch.int32) - start  # cache row -> chunk offset
            rows = _range_mask(rel, length)  # [C]
            slots = torch.arange(lay.slots, dtype=torch.int32) == slot  # [S]
            take = rel.clamp(0, n - 1)
            slots, rows = slots[:, None, None, None, None], rows[None, None, None, :, None]
            out = []
            for cache, new in ((k_cache, k_new), (v_cache, v_new)):
                src = new.index_select(1, take).permute(0, 2, 1, 3)  # [L, kv, C, hd]
                # Nested selects: `&` of the two masks does not lower.
                out.append(torch.where(slots, torch.where(rows, src[None], cache), cache))
            return out[0], out[1]
        offsets = torch.arange(n, dtype=torch.int32)
        pos = torch.where(offsets < length, start + offsets, lay.max_context)  # padding -> scratch row
        return (self._scatter(k_cache, k_new, slot.reshape(1, 1, 1), pos.reshape(1, 1, n)),
                self._scatter(v_cache, v_new, slot.reshape(1, 1, 1), pos.reshape(1, 1, n)))  # fmt: skip

    def _write_decode(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                      positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """k_new, v_new [B, L, kv, hd] into each slot b at positions[b]."""
        lay = self.layout
        b = k_new.shape[0]
        if self.cache_write == "select":
            rows = torch.arange(lay.max_context + 1, dtype=torch.int32)[None, :] == positions[:, None]  # [B, C]
            mask = rows[:, None, None, :, None]
            return (torch.where(mask, k_new[:, :, :, None, :], k_cache),
                    torch.where(mask, v_new[:, :, :, None, :], v_cache))  # fmt: skip
        slots = torch.arange(b, dtype=torch.int32).reshape(b, 1, 1)
        # Cache writes as [S(b), L, 1 position] -> per (b, layer) a [kv, hd] row.
        return (self._scatter(k_cache, k_new[:, :, None], slots, positions.reshape(b, 1, 1)),
                self._scatter(v_cache, v_new[:, :, None], slots, positions.reshape(b, 1, 1)))  # fmt: skip

    def _scatter(self, cache: torch.Tensor, new: torch.Tensor, slot: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """cache[slot, l, h, pos, :] = new[.., l, j, h, :] with `slot` and `pos` broadcast
        over [S', L, n] (one index per axis but the last: no transposed copy of the cache)."""
        layers = torch.arange(self.dims.layers, dtype=torch.int32).reshape(1, -1, 1, 1)
        heads = torch.arange(self.dims.kv_heads, dtype=torch.int32).reshape(1, 1, 1, -1)
        index = (slot[..., None], layers, heads, pos[..., None])  # broadcast to [S', L, n, kv]
        if self.cache_write == "inplace":
            return cache.index_put_(index, new)
        return torch.index_put(cache, index, new)


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def _first_id(*values: Any) -> int | None:
    return next((ids[0] for v in values if (ids := _ids(v))), None)


def is_causal_lm(obj: Any) -> bool:
    """Whether `obj` is a transformers causal LM (checked without importing transformers
    when nothing has)."""
    import sys

    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(obj, transformers.PreTrainedModel) and hasattr(obj, "generate")


def language_model(model: torch.nn.Module, tokenizer: Any = None, *, max_context: int | None = None, slots: int = 1,
                   prefill_chunk: int | None = None) -> CausalLM:  # fmt: skip
    """A transformers causal LM as a CausalLM ready to compile (fp32), with the
    tokenizer the bundle will carry: a transformers tokenizer, a `tokenizers.Tokenizer`,
    a directory holding one, or None (the caller then passes token ids)."""
    config = model.config
    if max_context is None:
        max_context = default_max_context(config)
    lm = CausalLM(model.float().eval(), slots, max_context, prefill_chunk=prefill_chunk)
    lm.tokenizer = tokenizer
    return lm


def save_tokenizer(tokenizer: Any, directory: Path) -> dict[str, Path]:
    """The tokenizer's files, written to `directory`, by their bundle path
    (`tokenizer/tokenizer.json`, ...). A transformers tokenizer is saved as it loaded,
    so its post-processor (the BOS it adds) is the one `AutoTokenizer` applies."""
    if tokenizer is None:
        return {}
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, (str, Path)):
        source = Path(tokenizer)
        if not (source / "tokenizer.json").is_file() and not (source / "tokenizer_config.json").is_file():
            return {}  # a model directory without a tokenizer: generation takes token ids
        from transformers import AutoTokenizer

        from hxc.errors import ModelLoadError, first_line

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True, trust_remote_code=False)
        except Exception as e:
            raise ModelLoadError(f"{source}: cannot load its tokenizer ({type(e).__name__}: {first_line(e)})") from None
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(directory))
    elif hasattr(tokenizer, "to_str"):  # a tokenizers.Tokenizer
        (directory / "tokenizer.json").write_text(tokenizer.to_str())
    else:
        raise UsageError(f"cannot save a {type(tokenizer).__name__} as a tokenizer: give a transformers tokenizer "
                         "or a tokenizers.Tokenizer")  # fmt: skip
    if not (directory / "tokenizer.json").is_file():
        raise UsageError("the tokenizer wrote no tokenizer.json (a slow tokenizer?): hxc's runtime reads tokenizer.json",
                         hint="use the model's fast tokenizer (AutoTokenizer with use_fast=True)")  # fmt: skip
    return {f"{TOKENIZER_DIR}/{name}": directory / name for name in _TOKENIZER_FILES if (directory / name).is_file()}


def empty_cache(layout: CacheLayout) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(layout.shape), torch.zeros(layout.shape)


def generate_greedy(lm: CausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int, chunk: int,
                    call: Any = None) -> list[list[int]]:  # fmt: skip
    """Greedy continuations of `prompts` (one slot each, all decoded together) through
    `call(function, *args) -> outputs` (eager `lm` by default): the reference loop the
    runtime's scheduler will follow, used to check parity."""
    import numpy as np

    if len(prompts) > lm.layout.slots:
        raise UsageError(f"{len(prompts)} prompts for {lm.layout.slots} slots")
    if call is None:
        def call(name: str, *args: Any) -> Any:
            with torch.no_grad():
                out = getattr(lm, name)(*(torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in args))
            return tuple(o.numpy() if i == 0 else o for i, o in enumerate(out))
    k, v = (t.numpy() for t in empty_cache(lm.layout))
    i32 = lambda *x: np.array(x, dtype=np.int32)  # noqa: E731
    out: list[list[int]] = []
    for s, prompt in enumerate(prompts):
        for at in range(0, len(prompt), chunk):
            piece = list(prompt[at:at + chunk])
            tokens = np.zeros((1, chunk), np.int32)
            tokens[0, :len(piece)] = piece
            logits, k, v = _caches(call("prefill", tokens, i32(at), i32(len(piece)), i32(s), k, v), k, v)
        out.append([int(np.asarray(logits).reshape(-1).argmax())])
    b = lm.layout.slots
    for step in range(max_new_tokens - 1):
        tokens = np.zeros(b, np.int32)
        positions = np.full(b, lm.layout.max_context, np.int32)  # idle slots: scratch row
        for s, prompt in enumerate(prompts):
            tokens[s] = out[s][-1]
            positions[s] = len(prompt) + step
        logits, k, v = _caches(call("decode", tokens, positions, k, v), k, v)
        logits = np.asarray(logits)
        for s in range(len(prompts)):
            out[s].append(int(logits[s].argmax()))
    return out


def _caches(out: Sequence[Any], k: Any, v: Any) -> tuple[Any, Any, Any]:
    """(logits, k, v) from a call's outputs: an in-place call returns the logits alone."""
    return (out[0], k, v) if len(out) == 1 else tuple(out)


def export_mlir(lm: CausalLM, prefill_chunk: int) -> str:
    """`prefill` (chunks of `prefill_chunk` tokens) and `decode` as one MLIR module with
    the weights as globals both functions share."""
    from iree.turbine import aot

    if not 1 <= prefill_chunk <= lm.layout.max_context:
        raise UsageError(f"prefill chunk {prefill_chunk} is outside 1..{lm.layout.max_context}")
    lay = lm.layout
    i32 = torch.int32
    k, v = empty_cache(lay)
    # Every argument its own tensor: torch.export treats one tensor passed twice as one
    # input (start and slot given the same zeros made `start` read `slot`).
    scalar = lambda: torch.zeros(1, dtype=i32)  # noqa: E731
    fxb = aot.FxProgramsBuilder(lm)

    @fxb.export_program(name="prefill", args=(torch.zeros(1, prefill_chunk, dtype=i32), scalar(), scalar() + 1, scalar(),
                                              k, v), strict=False)  # fmt: skip
    def prefill(module, tokens, start, length, slot, k_cache, v_cache):
        return module.prefill(tokens, start, length, slot, k_cache, v_cache)

    @fxb.export_program(name="decode", args=(torch.zeros(lay.slots, dtype=i32), torch.zeros(lay.slots, dtype=i32), *empty_cache(lay)),
                        strict=False)  # fmt: skip
    def decode(module, tokens, positions, k_cache, v_cache):
        return module.decode(tokens, positions, k_cache, v_cache)

    try:
        with torch.no_grad():
            exported = aot.export(fxb)
    except Exception as e:  # turbine and torch raise many types; the message is what helps
        raise LoweringError(f"exporting the causal LM failed: {str(e).strip().splitlines()[0][:300]}") from e
    return str(exported.mlir_module)

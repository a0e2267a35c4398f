"""A Hugging Face causal LM as two exportable functions over a static KV cache.

`CausalLM` wraps a `transformers` model (a family of `SUPPORTED_FAMILIES`: Llama,
GPT-2, Mistral, Qwen2, Phi-3, Gemma 1) without copying its weights: it calls the model's
own embeddings, norms, projections, MLPs and head, and reads the rotary frequencies from
the model's rotary embedding, so each family's quirks (Qwen2's q/k/v biases, Phi-3's
fused projections, Gemma's scaled embedding, (1 + w) RMSNorm and GELU MLP) are the
model's own code. It adds what HF's `generate` keeps in Python objects and what IREE
cannot take as it is:

- `prefill(tokens[1, n], start[1], length[1], slot[1], span[R], *caches)` runs a chunk
  of up to n prompt tokens of sequence `slot` at positions start..start+length-1 (the
  rest of the chunk is padding), so a long prompt runs as several fixed-size chunks;
  it returns the logits of the chunk's last valid token, [1, vocab], and the caches.
- `decode(tokens[B], positions[B], span[R], *caches)` runs one token for each of the B
  slots (B = slots, static), each at its own position, and returns logits [B, vocab]
  and the caches. A slot with nothing to do passes position `max_context`: its key and
  value go to the scratch row, and its logits mean nothing.
- `span` is a dynamic length (2..max_context; its values are not read): the call
  reads rows 0..R-1 of the caches, which must hold every position it attends to. The
  argument lists are made in one place, `hxc.lm_calls`.

The caches are one key and one value tensor per layer (`k_cache_0`, `v_cache_0`, ...),
each [slots, kv_heads, max_context + 1, head_dim] float32: the last row of the context
axis is a scratch row that padding and idle slots write into, so every write has a
place to go. Each layer first writes its new keys and values (a scatter at the call's
positions), then attends over the first R rows, masked per query to the positions at or
before its own. The functions return the caches they were given; IREE scatters into the
caller's buffers and returns them, so the runtime keeps them on the device as state
and a step costs what its span and its own tokens cost, not the maximum context.

What the export needs (IREE 3.13, iree-turbine 3.9, measured; see also
/work/shared/IREE_NOTES.md "Language models"):
- attention is matmul -> softmax -> matmul with an additive float mask: SDPA does not
  lower for SPIR-V ('iree_linalg_ext.online_attention' op result #0 must be variadic
  of ranked tensor ... but got 'memref<...>'), and a boolean SDPA mask fails
  ('tensor.collapse_shape' op expected the expanded type ...);
- masks come from single comparisons: `&` of boolean tensors fails to legalize
  (torch.aten.__and__.Tensor);
- token ids and positions are int32 (SPIR-V's portable profile has no Int64);
- one tensor passed as two example arguments is one input to torch.export: with the
  same zeros for `start` and `slot`, the compiled prefill read `slot` as `start`
  (right at start 0, wrong after): every example argument is its own tensor;
- a dynamic `span` of 1 is specialised by torch.export (min 2), and one reaching the
  scratch row makes it guard the slice (max max_context);
- in place only with one tensor per layer, written before it is read. IREE scatters into
  an argument's own buffer only where the value passed in has no other use. Measured
  (Llama 4 layers, hidden 256, 8 heads / 4 KV heads, 4 slots, local-task, 1 thread,
  decode step at 100 tokens, context 256 / 4096): one cache for every layer written
  after the last layer (the part-1 form: attention reads the whole cache, the write
  copies it) 4.2-6.7 / 92-129 ms; one cache for every layer written per layer before
  its read, in place (`index_put_`): 3.9 / 59 ms, since IREE copies the whole cache
  when layer 1 writes what layer 0 still reads (`stream.cmd.copy` of each cache in
  and out); per-layer caches, in place (`index_put_`): 5.8 / 49 ms, a copy into the
  result; per-layer caches passed and returned (this form): 1.5 / 1.3 ms, no copy
  (the function returns the argument buffers it scattered into).

Measured (this 2-core machine, shared and noisy: +-50% between runs): see
benchmarks/llm_cache.py for the step cost against the context and the filled length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hxc.errors import LoweringError, UsageError
from hxc.functions import DynamicDim, Function
from hxc.lm_calls import MIXED, decode_args, mixed_args, prefill_calls, prefill_function
from hxc.compiler.stages import StageRequest, balanced_cuts
from hxc.manifests.schema import GREEDY_LOGITS, TOKENIZER_DIR, GreedyReference, LanguageModel, Stage

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
# Llama rope types whose frequencies depend on the sequence length at run time: the
# static frequencies read from the model would be wrong for them.
_DYNAMIC_ROPE = ("dynamic", "longrope")
# Prompt tokens per prefill call: a prompt runs as ceil(n / chunk) calls of this size.
# One chunk size unless asked for more (`--prefill-chunk 8,128`: one prefill function
# each): a short prompt pays for the whole chunk, a long one for one call per chunk.
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
    """The KV cache of one model at a given slot count and context: per layer, a key
    and a value tensor of `shape`, named `names` (k_cache_0, v_cache_0, k_cache_1, ...).
    A stage's (`CausalLM.hxc_stages`): its `layers` layers from `first_layer` on, named
    by the model's own layer numbers."""

    slots: int
    layers: int
    kv_heads: int
    max_context: int
    head_dim: int
    dtype: str = "float32"
    first_layer: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        # +1: the scratch row (see the module docstring). Token-major, so the rows a call
        # reads are one block per slot. One slot keeps kv_heads x head_dim as one axis:
        # the same bytes, in the form IREE 3.13 scatters into in place (with a separate
        # head axis, its unit-dimension folding of a one-row update reshaped the cache
        # and the result came back as a copy of it).
        if self.slots == 1:
            return (1, self.max_context + 1, self.kv_heads * self.head_dim)
        return (self.slots, self.max_context + 1, self.kv_heads, self.head_dim)

    @property
    def names(self) -> tuple[str, ...]:
        first = self.first_layer
        return tuple(f"{kv}_cache_{i}" for i in range(first, first + self.layers) for kv in ("k", "v"))

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


def cache_shape(config: Any, slots: int, max_context: int) -> tuple[int, int, int, int]:
    """The shape of each layer's key (and value) cache for `config` (a transformers config)."""
    return cache_layout(config, slots, max_context).shape


def cache_layout(config: Any, slots: int, max_context: int) -> CacheLayout:
    d = _dims(config)
    if slots < 1:
        raise UsageError(f"slots must be at least 1, not {slots}")
    if not 2 <= max_context <= d.max_positions:
        raise UsageError(f"max context {max_context} is outside 2..{d.max_positions} (the model's maximum)")
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


@dataclass(frozen=True)
class _Group:
    """Tokens that attend alike in one call (`CausalLM._layers`): a decode step's B
    slots, one token each, or a prefill chunk's n tokens of one slot."""

    tokens: torch.Tensor | None  # [rows]; None in a stage after the first (it takes hidden states)
    positions: torch.Tensor  # [rows]
    write_slots: torch.Tensor  # [rows]: the slot each row's keys and values go to
    write_at: torch.Tensor  # [rows]: and the row of it (the scratch row for padding and idle slots)
    mask: torch.Tensor  # [S, n, span]: additive, what each query sees
    slot: torch.Tensor | None  # [1]: the slot a chunk attends over; None: slots 0..S-1, one query each
    shape: tuple[int, int]  # (S, n): rows = S * n
    last: torch.Tensor | None = None  # [1]: the row whose logits a chunk returns


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dims: int, by_matmul: bool = False) -> torch.Tensor:
    """HF's apply_rotary_pos_emb on x [rows, heads, hd]: rotate-half over the first `dims`
    of each head (all of them but with Phi-3's partial_rotary_factor), the rest as is.

    `by_matmul`: the same numbers, rotate-half as a product with a signed permutation
    (each output is one input, times +-1, plus zeros: exact). The keys go this way: the
    slicing and concatenation of rotate-half let IREE split the head dimension in two
    (2 x hd/2) and carry that reshape into the cache write, which then scattered into a
    reshaped copy of the cache instead of the cache itself."""
    if by_matmul:
        hd, half = x.shape[-1], dims // 2
        perm = torch.zeros(hd, hd, dtype=x.dtype)
        idx = torch.arange(half)
        perm[idx + half, idx] = -1.0  # out[j] = -x[j + half]
        perm[idx, idx + half] = 1.0  # out[j + half] = x[j]
        pad = (0, hd - dims)  # past the rotated dims: times 1, plus 0
        cos, sin = torch.nn.functional.pad(cos, pad, value=1.0), torch.nn.functional.pad(sin, pad, value=0.0)
        return x * cos + (x @ perm) * sin

    def rotate_half(t: torch.Tensor) -> torch.Tensor:
        half = t.shape[-1] // 2
        return torch.cat((-t[..., half:], t[..., :half]), dim=-1)

    if dims == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :dims], x[..., dims:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


class CausalLM(torch.nn.Module):
    """`model` (a transformers causal LM) as `prefill` and `decode` over a static KV
    cache of `slots` sequences of up to `max_context` tokens (see the module docstring).

    `layers=(a, b)`: one stage of the model (`hxc_stages`): its decoder layers a..b-1,
    with the embeddings when a is 0 and the final norm and head when b is the last
    layer. It has the same functions, over its own layers' caches (k_cache_a, ...);
    after the first stage each takes the hidden states [rows, hidden] the stage before
    returned in place of the token ids (and `mixed` drops `chunk_tokens`: its rows follow
    the decode rows), and all but the last return those rows' hidden states in place of
    the logits. A stage holds only the weights it reads."""

    # Weights once per bundle, in its parameter archive, read by every target's
    # artifact: a language model's weights dominate the bundle, and a copy inside each
    # vmfb would multiply them by the targets (`--weights inline` is refused).
    hxc_weights = "shared"

    def __init__(self, model: torch.nn.Module, slots: int, max_context: int,
                 prefill_chunk: int | Sequence[int] | None = None, *, values_by_sum: bool = False,
                 mixed_step: bool = True, layers: tuple[int, int] | None = None) -> None:  # fmt: skip
        super().__init__()
        # With several slots, also `mixed` (a decode step carrying a prefill chunk).
        self.mixed_step = mixed_step
        # How attention weighs the values (see `_attend`): a batched matmul, or a product
        # and a sum over the span, the form IREE's dispatch-creation data tiling compiles.
        self.values_by_sum = values_by_sum
        config = model.config
        self.dims = d = _dims(config)
        first, end = self.layer_range = layers or (0, d.layers)
        if not 0 <= first < end <= d.layers:
            raise UsageError(f"layers {first}..{end - 1} are not a range of this model's {d.layers} decoder layers")
        self.has_embeddings, self.has_head = first == 0, end == d.layers  # what a stage holds beside its layers
        self.hidden_size = int(config.hidden_size)
        self.layout = replace(cache_layout(config, slots, max_context), layers=end - first, first_layer=first)
        if prefill_chunk is None:
            prefill_chunk = min(DEFAULT_PREFILL_CHUNK, max_context)
        self.prefill_chunks = tuple(sorted({prefill_chunk} if isinstance(prefill_chunk, int) else set(prefill_chunk)))
        if not self.prefill_chunks:
            raise UsageError("no prefill chunk size given")
        for chunk in self.prefill_chunks:
            if not 1 <= chunk <= max_context:
                raise UsageError(f"prefill chunk {chunk} is outside 1..{max_context} (the max context)")
        self._declare_functions()
        whole = (first, end) == (0, d.layers)
        # A stage keeps the model and its parts as plain attributes and registers (holds)
        # only what it reads: its weights are exactly its own (`_hold`).
        self._hold("model", model.eval(), whole)
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
            self._hold_parts(base.embed_tokens, base.layers, base.norm, whole)
            self.rope = rope
            # Rotary dims per head: all of them, or the first part (Phi-3's partial_rotary_factor).
            self.rotary_dim = 2 * rope.inv_freq.shape[-1]
            if spec.scaled_embedding and not hasattr(self.embed, "embed_scale"):
                self.embed_scale = config.hidden_size**0.5
            self.scaling = [layer.self_attn.scaling for layer in base.layers]
        else:
            base = model.transformer
            self._hold_parts(base.wte, base.h, base.ln_f, whole)
            self._hold("wpe", base.wpe, whole or self.has_embeddings)
            self.scaling = [layer.attn.scaling for layer in base.h]
        self._hold("lm_head", model.lm_head, whole or self.has_head)

    def _hold(self, name: str, module: torch.nn.Module, held: bool) -> None:
        """`module` as attribute `name`: registered when `held` (its weights are this
        module's, and go into its parameter archive), else only read through."""
        if held:
            setattr(self, name, module)
        else:
            object.__setattr__(self, name, module)

    def _hold_parts(self, embed: torch.nn.Module, layers: torch.nn.ModuleList, norm: torch.nn.Module, whole: bool) -> None:
        self._hold("embed", embed, whole or self.has_embeddings)
        self._hold("layers", layers, whole)
        self._hold("norm", norm, whole or self.has_head)
        if not whole:  # the stage's own layers, by the model's numbers
            first, end = self.layer_range
            self.stage_layers = torch.nn.ModuleDict({str(i): layers[i] for i in range(first, end)})

    @property
    def prefill_chunk(self) -> int:
        """`prefill`'s chunk size: the smallest."""
        return self.prefill_chunks[0]

    def _declare_functions(self) -> None:
        """`prefill` and `decode` as hxc functions over the state (each layer's k and v
        caches, `hxc.functions`), so hxc's compile path builds them like any model of
        several functions. `span` is dynamic: its length is how many cache rows a call
        reads (2..max_context)."""
        lay = self.layout
        i32 = torch.int32
        self.hxc_state = dict(zip(lay.names, empty_cache(lay)))
        self.hxc_state_slots = {name: lay.slots for name in lay.names}
        span = DynamicDim(arg=-1, axis=0, name="span", min=2, max=lay.max_context)
        # A stage after the first takes the hidden states of the rows in place of their token ids.
        from_tokens = self.has_embeddings
        hidden = lambda rows: torch.zeros(rows, self.hidden_size)  # noqa: E731
        tokens_in = ("tokens",) if from_tokens else ("hidden",)
        # Every example its own tensor (see the module docstring: torch.export merges one
        # tensor passed twice into one input).
        self.hxc_functions = {
            **{prefill_function(chunk, self.prefill_chunks): Function(
                args=(torch.zeros(1, chunk, dtype=i32) if from_tokens else hidden(chunk), torch.zeros(1, dtype=i32),
                      torch.ones(1, dtype=i32), torch.zeros(1, dtype=i32), _span_example(lay)),
                reads=lay.names, writes=lay.names, arg_names=(*tokens_in, "start", "length", "slot", "span"),
                dynamic=(replace(span, arg=4),), method="prefill" if from_tokens else "prefill_from")
               for chunk in self.prefill_chunks},
            "decode": Function(args=(torch.zeros(lay.slots, dtype=i32) if from_tokens else hidden(lay.slots),
                                     torch.zeros(lay.slots, dtype=i32), _span_example(lay)),
                               reads=lay.names, writes=lay.names, arg_names=(*tokens_in, "positions", "span"),
                               dynamic=(replace(span, arg=2),), method="decode" if from_tokens else "decode_from"),
        }  # fmt: skip
        if lay.slots > 1 and self.mixed_step:
            # A decode step with the smallest prefill chunk riding in it (`mixed`): what a
            # batch runs while a prompt is read beside running sequences.
            chunk = self.prefill_chunks[0]
            chunk_args = (torch.zeros(1, dtype=i32), torch.ones(1, dtype=i32), torch.zeros(1, dtype=i32), _span_example(lay))
            chunk_names = ("start", "length", "slot", "chunk_span")
            if from_tokens:
                args = (torch.zeros(lay.slots, dtype=i32), torch.zeros(lay.slots, dtype=i32), _span_example(lay),
                        torch.zeros(1, chunk, dtype=i32), *chunk_args)
                names = ("tokens", "positions", "span", "chunk_tokens", *chunk_names)
            else:  # the decode rows' hidden states, then the chunk's
                args = (hidden(lay.slots + chunk), torch.zeros(lay.slots, dtype=i32), _span_example(lay), *chunk_args)
                names = ("hidden", "positions", "span", *chunk_names)
            self.hxc_functions[MIXED] = Function(
                args=args, reads=lay.names, writes=lay.names, arg_names=names,
                dynamic=(replace(span, arg=2), replace(span, arg=len(args) - 1, name="chunk_span")),
                method=MIXED if from_tokens else "mixed_from")  # fmt: skip

    def hxc_stages(self, request: StageRequest) -> list[tuple[CausalLM, Stage]]:
        """The model cut at decoder-layer boundaries as `request` asks (`--stages`): each
        stage a CausalLM of its layers (see the class docstring), with the manifest's
        record of it, its functions' tensors not yet known. N stages balance their FLOPs
        per token (2 x the weights each layer and the head multiply; an embedding lookup
        costs nothing), every stage holding at least one layer; `at:NAME,...` cuts before
        the named decoder layers (`model.layers.4`, GPT-2's `transformer.h.4`)."""
        layers = self.layers
        names = {id(m): n for n, m in self.model.named_modules()}
        layer_names = [names[id(layer)] for layer in layers]
        total = len(layers)
        if request.at:
            index = {n: k for k, n in enumerate(layer_names)}
            cuts = []
            for name in request.at:
                if name not in index:
                    raise UsageError(f"--stages at:{name}: not a decoder layer of this model",
                                     hint=f"its layers: {layer_names[0]} .. {layer_names[-1]}")  # fmt: skip
                if index[name] == 0:
                    raise UsageError(f"--stages at:{name}: the first decoder layer; a cut there leaves stage 0 without layers")
                if cuts and index[name] <= cuts[-1]:
                    raise UsageError(f"--stages at:{','.join(request.at)}: name the layers in the order they run")
                cuts.append(index[name])
        else:
            if request.count > total:
                raise UsageError(f"--stages {request.text}: this model has {total} decoder layers; it can be cut into at "
                                 f"most {total} stages", hint="ask for fewer, or name the cuts with at:NAME,...")  # fmt: skip
            # Units: the embeddings, each layer, the head; a cut before layer k is at unit k + 1.
            flops = [0, *(_matmul_flops(layer) for layer in layers), _matmul_flops(self.model.lm_head)]
            cuts = [c - 1 for c in balanced_cuts(list(range(2, total + 1)), flops, request.count)]
        bounds = [0, *cuts, total]
        out = []
        for k, (first, end) in enumerate(zip(bounds, bounds[1:])):
            stage = CausalLM(self.model, self.layout.slots, self.layout.max_context, prefill_chunk=self.prefill_chunks,
                             values_by_sum=self.values_by_sum, mixed_step=self.mixed_step, layers=(first, end))  # fmt: skip
            held = {id(t): t for t in (*stage.parameters(), *stage.buffers())}.values()
            flops = sum(_matmul_flops(layers[i]) for i in range(first, end))
            flops += _matmul_flops(self.model.lm_head) if stage.has_head else 0
            head_name = names.get(id(self.model.lm_head), "lm_head")
            out.append((stage, Stage(index=k, name=f"s{k}", function="decode", artifacts=(),
                                     first_module=names.get(id(self.embed)) if stage.has_embeddings else layer_names[first],
                                     last_module=head_name if stage.has_head else layer_names[end - 1],
                                     inputs=(), outputs=(), weights_bytes=sum(t.numel() * t.element_size() for t in held),
                                     flops=flops, kv_bytes_per_token=stage.layout.bytes_per_token)))  # fmt: skip
        return out

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
                               prefill_chunks=self.prefill_chunks if len(self.prefill_chunks) > 1 else (),
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
        # Past the largest chunk: `prefill` of the smallest and of the largest size both run
        # (the way generate reads it). prompt + steps - 1 <= context.
        length = max(1, min(self.prefill_chunks[-1] + 8, lay.max_context + 1 - steps))
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
            return _rotate(q, cos, sin, self.rotary_dim), _rotate(k, cos, sin, self.rotary_dim, by_matmul=True), v
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

    # ---- the entry points -----------------------------------------------------

    def prefill(self, tokens: torch.Tensor, start: torch.Tensor, length: torch.Tensor, slot: torch.Tensor,
                span: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """Logits [1, vocab] of the chunk's last valid token, and the caches (written in place)."""
        return self._prefill(self._prefill_group(tokens.shape[1], start, length, slot, span, tokens=tokens), None, caches)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, span: torch.Tensor,
               *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """Logits [B, vocab] of one token per slot, and the caches (written in place)."""
        return self._decode(self._decode_group(positions, span, tokens), None, caches)

    def mixed(self, tokens: torch.Tensor, positions: torch.Tensor, span: torch.Tensor, chunk_tokens: torch.Tensor,
              start: torch.Tensor, length: torch.Tensor, slot: torch.Tensor, chunk_span: torch.Tensor,
              *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """A decode step and a prefill chunk in one call (vLLM's mixed batch): the B
        decode rows and the chunk's rows go through every projection, MLP and the head
        together, so the weights are read once for both; each part attends over its own
        span. Logits [B, vocab] of the decode rows, [1, vocab] of the chunk's last valid
        token, and the caches. The chunk's slot must be idle in the decode part."""
        decode = self._decode_group(positions, span, tokens)
        chunk = self._prefill_group(chunk_tokens.shape[1], start, length, slot, chunk_span, first_row=tokens.shape[0],
                                    tokens=chunk_tokens)  # fmt: skip
        return self._mixed(decode, chunk, None, caches)

    # A later stage's: the rows' hidden states [rows, H] from the stage before in place of their tokens.

    def prefill_from(self, hidden: torch.Tensor, start: torch.Tensor, length: torch.Tensor, slot: torch.Tensor,
                     span: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
        return self._prefill(self._prefill_group(hidden.shape[0], start, length, slot, span), hidden, caches)

    def decode_from(self, hidden: torch.Tensor, positions: torch.Tensor, span: torch.Tensor,
                    *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
        return self._decode(self._decode_group(positions, span), hidden, caches)

    def mixed_from(self, hidden: torch.Tensor, positions: torch.Tensor, span: torch.Tensor, start: torch.Tensor,
                   length: torch.Tensor, slot: torch.Tensor, chunk_span: torch.Tensor,
                   *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """The decode rows' hidden states first, then the chunk's."""
        b = positions.shape[0]
        decode = self._decode_group(positions, span)
        chunk = self._prefill_group(hidden.shape[0] - b, start, length, slot, chunk_span, first_row=b)
        return self._mixed(decode, chunk, hidden, caches)

    def _prefill(self, group: _Group, hidden: torch.Tensor | None, caches: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        hidden, out = self._layers([group], caches, hidden)
        if not self.has_head:
            return (hidden, *out)
        return (self.lm_head(hidden.index_select(0, group.last)), *out)

    def _decode(self, group: _Group, hidden: torch.Tensor | None, caches: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        hidden, out = self._layers([group], caches, hidden)
        return (self.lm_head(hidden) if self.has_head else hidden, *out)

    def _mixed(self, decode: _Group, chunk: _Group, hidden: torch.Tensor | None,
               caches: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:  # fmt: skip
        hidden, out = self._layers([decode, chunk], caches, hidden)
        if not self.has_head:
            return (hidden, *out)
        b = decode.shape[0]
        logits = self.lm_head(torch.cat([hidden[:b], hidden.index_select(0, chunk.last)]))
        return (logits[:b], logits[b:], *out)

    def _decode_group(self, positions: torch.Tensor, span: torch.Tensor, tokens: torch.Tensor | None = None) -> _Group:
        """One token for each of the B slots, at its own position (written there)."""
        b = positions.shape[0]
        kpos = torch.arange(span.shape[0], dtype=torch.int32)
        mask = torch.where(kpos[None, :] <= positions[:, None], 0.0, float("-inf")).reshape(b, 1, -1)
        return _Group(tokens, positions, torch.arange(b, dtype=torch.int32), positions, mask, None, (b, 1))

    def _prefill_group(self, n: int, start: torch.Tensor, length: torch.Tensor, slot: torch.Tensor, span: torch.Tensor,
                       first_row: int = 0, tokens: torch.Tensor | None = None) -> _Group:  # fmt: skip
        """A chunk of n prompt tokens of `slot` at start.. (`length` valid, the rest padding):
        `tokens` [1, n], or None in a stage after the first."""
        start, length, slot = start.reshape(1), length.reshape(1), slot.reshape(1)
        offsets = torch.arange(n, dtype=torch.int32)
        positions = start + offsets
        # Padding rows write to the scratch row, past every span, never read.
        write_at = torch.where(offsets < length, positions, self.layout.max_context)
        kpos = torch.arange(span.shape[0], dtype=torch.int32)
        mask = torch.where(kpos[None, :] <= positions.reshape(n, 1), 0.0, float("-inf")).reshape(1, n, -1)
        last = first_row + (length - 1).clamp(0, n - 1)  # [1]: the row of the chunk's last valid token
        rows = tokens.reshape(n) if tokens is not None else None
        return _Group(rows, positions, slot.expand(n), write_at, mask, slot, (1, n), last)

    def _layers(self, groups: Sequence[_Group], caches: Sequence[torch.Tensor],
                hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
        """Every layer for the groups' tokens as one set of rows: each layer projects
        every row at once (its weights read once), writes each row's keys and values at
        its (slot, row) of the caches, then each group attends over the first `span`
        rows of its slots (of `group.slot` [1], or slots 0..S-1 when None; the mask
        [S, n, span] says which each query sees). Returns the final hidden states
        [rows, H] and the caches. A stage runs its own layers, from the embeddings of the
        groups' tokens (the first) or from `hidden` (the stage before's rows), and ends
        with the final norm only if it is the last."""
        d = self.dims
        one = len(groups) == 1
        cat = (lambda ts: ts[0]) if one else torch.cat  # noqa: E731 (one group: the same graph as before)
        positions = cat([g.positions for g in groups])
        if hidden is None:
            hidden = self._embed(cat([g.tokens for g in groups]), positions)
        rope = self._rope(positions) if self.rope is not None else None
        index = (cat([g.write_slots for g in groups]), cat([g.write_at for g in groups]))  # each row's (slot, row)
        out = list(caches)
        # With several slots a chunk reads its slot's rows as a slice at a data-dependent
        # offset, which IREE reads in place, not as a gather (index_select), which copies
        # them first: an 8-token chunk at span 1,990 of a 2-layer, hidden-768 Llama of 8
        # slots took 20 ms as a gather and 11 ms as a slice. (With one slot the slice lets
        # IREE's default data tiling compile the program, in place of its global-
        # optimisation path (`hxc.targets.cpu`): not measured yet, so one slot keeps the gather.)
        offsets = {}
        for g in groups:
            if g.slot is not None and out[0].shape[0] > 1:
                offsets[id(g)] = slot = g.slot.reshape(()).item()
                torch._check(slot >= 0)
                torch._check(slot < out[0].shape[0])
        first = self.layer_range[0]
        for i in range(*self.layer_range):
            c = 2 * (i - first)  # the layer's caches among the stage's
            q, k, v = self._qkv(i, self._pre_attn(i, hidden), rope)
            # Written before it is read, one tensor per layer: IREE then scatters into the
            # cache's own buffer (the only use of the value passed in) and reads the rows
            # it needs. One cache for every layer, or a write after the last layer, left
            # the old value in use beside the write, and IREE copied the whole cache.
            row = out[c].shape[2:]  # one token's keys: [kv, hd], or [kv * hd] with one slot
            out[c] = torch.index_put(out[c], index, k.reshape(-1, *row))
            out[c + 1] = torch.index_put(out[c + 1], index, v.reshape(-1, *row))
            attns, at = [], 0
            for g in groups:
                s, n = g.shape
                rows = g.mask.shape[-1]
                # [slots, span, kv, hd]
                k_rows, v_rows = (t[:, :rows].unflatten(-1, (d.kv_heads, d.head_dim)) if len(row) == 1 else t[:, :rows]
                                  for t in (out[c], out[c + 1]))  # fmt: skip
                if id(g) in offsets:
                    k_rows, v_rows = k_rows.narrow(0, offsets[id(g)], 1), v_rows.narrow(0, offsets[id(g)], 1)
                elif g.slot is not None:
                    k_rows, v_rows = k_rows.index_select(0, g.slot), v_rows.index_select(0, g.slot)
                attn = self._attend(i, q[at:at + s * n].reshape(s, n, d.heads, d.head_dim), k_rows, v_rows, g.mask)
                attns.append(attn.reshape(s * n, d.heads * d.head_dim))
                at += s * n
            hidden = self._post_attn(i, hidden, cat(attns))
        return (self.norm(hidden) if self.has_head else hidden), out

    def _attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention of q [S, n, heads, hd] over keys and values [S, R, kv, hd] with the
        additive mask [S, n, R]; [S, n, heads * hd]. Written as matmul -> softmax ->
        matmul (SDPA does not lower for SPIR-V)."""
        d = self.dims
        s, n = q.shape[0], q.shape[1]
        # Query head h uses kv head h // group (HF's repeat_kv): [S, kv, group*n, hd].
        qg = q.reshape(s, n, d.kv_heads, self.group, d.head_dim).permute(0, 2, 3, 1, 4)
        qg = qg.reshape(s, d.kv_heads, self.group * n, d.head_dim) * self.scaling[i]
        k, v = k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)  # [S, kv, hd, R], [S, kv, R, hd]
        scores = (qg @ k).view(s, d.kv_heads, self.group, n, -1) + mask[:, None, None]
        probs = torch.softmax(scores, dim=-1).reshape(s, d.kv_heads, self.group * n, -1)
        if self.values_by_sum:
            # IREE 3.13's dispatch-creation data tiling fails on a matmul whose reduction
            # is dynamic (here the span: "'affine.delinearize_index' op no basis element
            # may be statically non-positive"), and only that path fuses int8 -> f32 into
            # the weights' matmuls. Weight-only quantised programs therefore weigh the
            # values as a product and a sum over the span: same decode step as the matmul
            # on a 125M Llama, first token after 512 1.5x slower (README "Quantisation").
            out = (probs.unsqueeze(-1) * v.unsqueeze(2)).sum(dim=3)
        else:
            out = probs @ v
        out = out.view(s, d.kv_heads, self.group, n, d.head_dim).permute(0, 3, 1, 2, 4)
        return out.reshape(s, n, d.heads * d.head_dim)


def _matmul_flops(module: torch.nn.Module) -> int:
    """FLOPs per token of a module's matrix products: 2 x its weights of two or more
    dimensions that are not embedding tables (a lookup multiplies nothing)."""
    tables = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    return sum(2 * p.numel() for p in module.parameters() if p.dim() >= 2 and id(p) not in tables)


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
                   prefill_chunk: int | Sequence[int] | None = None, mixed_step: bool = True) -> CausalLM:  # fmt: skip
    """A transformers causal LM as a CausalLM ready to compile (fp32), with the
    tokenizer the bundle will carry: a transformers tokenizer, a `tokenizers.Tokenizer`,
    a directory holding one, or None (the caller then passes token ids)."""
    config = model.config
    if max_context is None:
        max_context = default_max_context(config)
    lm = CausalLM(model.float().eval(), slots, max_context, prefill_chunk=prefill_chunk, mixed_step=mixed_step)
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


def empty_cache(layout: CacheLayout) -> list[torch.Tensor]:
    """Zeroed caches, in the order of `layout.names`."""
    return [torch.zeros(layout.shape) for _ in layout.names]


def _span_example(layout: CacheLayout) -> torch.Tensor:
    # Any length inside the dynamic range but its ends (torch.export specialises
    # an example at a bound it meets).
    return torch.zeros(max(2, min(16, layout.max_context - 1)), dtype=torch.int32)


def generate_greedy(lm: CausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    call: Any = None, *, mixed: bool = False) -> list[list[int]]:  # fmt: skip
    """Greedy continuations of `prompts` (one slot each) through `call(function, args,
    caches) -> (outputs, caches)` (eager `lm` by default), with the argument lists the
    runtime makes (`hxc.lm_calls`): the reference loop used to check parity. Every
    prompt is read first, then all decode together; `mixed`: the first prompt is read
    alone, and each other prompt's chunks ride in `mixed` calls beside the decode of
    those already started (as `hxc.runtime.batching` runs them)."""
    import numpy as np

    lay = lm.layout
    if len(prompts) > lay.slots:
        raise UsageError(f"{len(prompts)} prompts for {lay.slots} slots")
    if call is None:
        def call(name: str, args: list[Any], caches: list[Any]) -> tuple[list[Any], list[Any]]:
            with torch.no_grad():
                out = getattr(lm, lm.hxc_functions[name].method or name)(*(torch.from_numpy(a) for a in args), *caches)
            return [o.numpy() for o in out[:len(out) - len(caches)]], list(out[len(out) - len(caches):])
    caches = empty_cache(lay)
    out: list[list[int]] = [[] for _ in prompts]
    first = lambda logits: int(np.asarray(logits).reshape(-1).argmax())  # noqa: E731
    for s, prompt in enumerate(prompts[:1] if mixed else prompts):
        for name, args in prefill_calls(prompt, s, lm.prefill_chunks, lay.max_context):
            (logits, *_), caches = call(name, args, caches)
        out[s].append(first(logits))
    chunk = lm.prefill_chunk
    reading = [(s, at) for s in range(1, len(prompts) if mixed else 0) for at in range(0, len(prompts[s]), chunk)]
    while True:  # bounded: each call reads a chunk or adds a token to a sequence short of max_new_tokens
        busy = {s: (o[-1], len(prompts[s]) + len(o) - 1) for s, o in enumerate(out) if o and len(o) < max_new_tokens}
        if not busy and not reading:
            return out
        if reading:
            s, at = reading.pop(0)
            args = mixed_args(busy, lay.slots, prompts[s][at:at + chunk], at, s, chunk, lay.max_context)
            (logits, chunk_logits, *_), caches = call(MIXED, args, caches)
            if at + chunk >= len(prompts[s]):
                out[s].append(first(chunk_logits))
        else:
            (logits, *_), caches = call("decode", decode_args(busy, lay.slots, lay.max_context), caches)
        logits = np.asarray(logits)
        for s in busy:
            out[s].append(int(logits[s].argmax()))

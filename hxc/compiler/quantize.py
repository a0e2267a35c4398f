"""Weight-only quantisation of a language model (`hxc compile --precision int8,int4`).

Each `nn.Linear` of the decoder layers (and GPT-2's `Conv1D`, its transposed Linear),
and the LM head, is replaced by a `QuantLinear`: the weight stored as signed integers
in groups of `group_size` input features, each group with its own float32 scale
(symmetric: w ~= q * scale, q in -(2^(b-1)-1)..2^(b-1)-1; W8A32 / W4A32: activations,
the KV cache and the compute stay float32). `qweight` is int8 [out, groups, group]; for
int4 it is [out, groups, group / 2], two weights per byte as two's complement nibbles
(the low nibble the even feature, the high one the odd), unpacked by arithmetic shifts
(`(byte << [4, 0]) >> 4`). torch.export thus hands IREE int8 globals and the weights
archive holds the packed bytes. How the exported forward is shaped so that IREE fuses
the int8 -> float conversion into the matvec, and why int4 is unpacked to int8 at load
on the CPU: `QuantLinear.forward` and hxc/targets/cpu.py (QUANTIZED_FLAGS).

The token embedding is quantised the same way (`QuantEmbedding`: a lookup gathers
integer rows and dequantises them): it costs no decode time either way, but float32 it
was 98 MB of the 100M-parameter Llama's 157 MB int4 archive. A model whose LM head
shares the embedding's weight (GPT-2) keeps one integer table for both. An embedding
that is not a plain `nn.Embedding` (Gemma's scales its rows) stays float32.

How far a quantised model strays from float32 is measured here, in PyTorch, at compile
time (`measure`): over a fixed set of prompts, each continued greedily by the float32
model (Hugging Face's `generate(do_sample=False)`), the quantised model is given the
same tokens and its logits are compared step by step: the share of steps whose greedy
token is the float32 model's, the largest logit difference, and that difference over
the largest float32 logit (the artifact's `precision_error`, what `--tolerance` reads).
The first prompt is the bundle's greedy reference (`LanguageModel.greedy_reference`),
so `hxc verify`, which runs that prompt through each artifact, can hold a quantised
artifact to the difference recorded for it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hxc.dtypes import WEIGHT_BITS
from hxc.errors import UsageError
from hxc.manifests.schema import Quantization

# Input features per scale, unless `--group-size` says otherwise (a layer whose width it
# does not divide uses the largest divisor of its width below it). Chosen by
# measurement (benchmarks/llm_precision.py): see the README's "Quantised weights".
DEFAULT_GROUP_SIZE = 128
# The fixed prompts of the error measurement after the greedy reference's: texts for a
# model with a tokenizer, else seeded random ids of these lengths.
PROMPT_TEXTS = (
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "The capital of France is Paris. The capital of Germany is",
)
PROMPT_LENGTHS = (12, 16, 10)
# Greedy tokens per prompt that the measurement compares.
MEASURED_TOKENS = 16


def _group(width: int, group_size: int) -> int:
    """The largest divisor of `width` not above `group_size` (even, for int4's pairs,
    when one exists)."""
    divisors = [d for d in range(min(group_size, width), 0, -1) if width % d == 0]
    return next((d for d in divisors if d % 2 == 0), divisors[0])


class QuantLinear(torch.nn.Module):
    """y = x @ dequant(q).T + bias over integer weights and per-group scales (see the
    module docstring for the layout and `forward` for the form IREE gets)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int) -> None:
        super().__init__()
        w = weight.detach().float()
        self.out_features, self.in_features = w.shape
        self.bits = bits
        self.group = _group(self.in_features, group_size)
        if bits == 4 and self.group % 2:
            raise UsageError(f"int4 packs weights in pairs: a layer {self.in_features} features wide has no even group size")
        self.groups = self.in_features // self.group
        qmax = 2 ** (bits - 1) - 1
        grouped = w.reshape(self.out_features, self.groups, self.group)
        scales = grouped.abs().amax(dim=-1) / qmax
        scales = torch.where(scales == 0, torch.ones_like(scales), scales)
        q = torch.round(grouped / scales[..., None]).clamp(-qmax, qmax).to(torch.int16)
        if bits == 4:
            pairs = (q & 15).reshape(self.out_features, self.groups, self.group // 2, 2)
            q = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8).view(torch.int8)
            # Shifts that sign-extend each nibble into an int8: (byte << [4, 0]) >> 4.
            self.register_buffer("nibble_shifts", torch.tensor([4, 0], dtype=torch.int8))
            self.register_buffer("sign_shift", torch.tensor([4], dtype=torch.int8))
        self.register_buffer("qweight", q.to(torch.int8).contiguous())  # [out, groups, group (/ 2 for int4)]
        self.register_buffer("scales", scales.contiguous())  # [out, groups]
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def integers(self) -> torch.Tensor:
        """The stored weights as int8, [out, groups, group]. int4's arithmetic shifts keep
        to int8 ops (torch-mlir does not lower a scalar subtraction on int8 tensors, and
        `>>` as aten.__rshift__ not at all), a constant expression IREE can hoist."""
        if self.bits != 4:
            return self.qweight
        pairs = torch.bitwise_left_shift(self.qweight[..., None], self.nibble_shifts)
        return torch.bitwise_right_shift(pairs, self.sign_shift).reshape(self.out_features, self.groups, self.group)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [out, in] the stored integers stand for."""
        return (self.integers().to(torch.float32) * self.scales[..., None]).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_exporting():
            # Eager (the compile-time measurement, the golden sample): one matmul.
            return torch.nn.functional.linear(x, self.dequantized(), self.bias)
        # Exported: per group, a contraction over the group's features whose only
        # weight-side op is the int8 -> f32 conversion, which IREE fuses into the
        # matvec's dispatch (so each call reads int8); the scales apply after, over the
        # groups. Dequantising first (q * scale, reshaped to [out, in], then a matmul)
        # put the dequantisation in a dispatch of its own that wrote the float weights
        # every call: slower than float32.
        xs = x.reshape(*x.shape[:-1], 1, self.groups, self.group)
        partial = (xs * self.integers().to(torch.float32)).sum(-1)  # [..., out, groups]
        y = (partial * self.scales).sum(-1)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group={self.group}"


class QuantEmbedding(torch.nn.Module):
    """A token embedding over the same integer rows and scales as `QuantLinear` (a row
    per token: [vocab, groups, group]); a lookup gathers the rows and dequantises them.
    `weights` may be the tied LM head's QuantLinear, whose buffers it then shares, so a
    tied model stores the table once."""

    def __init__(self, weights: QuantLinear, padding_idx: int | None = None) -> None:
        super().__init__()
        self.weights = weights
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w, flat = self.weights, ids.reshape(-1)
        if torch.compiler.is_exporting():
            # The whole table unpacked, then the rows: the unpacking is a constant
            # expression IREE does once, at load, as for the Linear weights. Unpacking
            # the gathered rows instead fused into the next residual add of the CPU
            # prefill, whose dispatch then needed 98 KB of stack and lost data tiling.
            rows = w.integers().index_select(0, flat)
        else:
            rows = w.qweight.index_select(0, flat)
            if w.bits == 4:
                rows = torch.bitwise_right_shift(torch.bitwise_left_shift(rows[..., None], w.nibble_shifts), w.sign_shift)
        scales = w.scales.index_select(0, flat)
        out = rows.reshape(-1, w.groups, w.group).to(torch.float32) * scales[..., None]
        return out.reshape(*ids.shape, w.in_features)


def _linear_weight(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [out, in], bias) of a Linear or of transformers' Conv1D (GPT-2: y = x @ W + b,
    W [in, out]); None for any other module."""
    if isinstance(module, torch.nn.Linear):
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.t(), module.bias
    return None


def quantize_model(model: torch.nn.Module, precision: str, group_size: int = DEFAULT_GROUP_SIZE, *,
                   lm_head: bool = True, embeddings: bool = True) -> tuple[str, ...]:  # fmt: skip
    """Replace, in place, every Linear (or Conv1D) of `model` (a transformers causal LM)
    by a QuantLinear of `precision` (int8, int4): the LM head too when `lm_head`, and the
    token embedding by a QuantEmbedding when `embeddings` (over the head's buffers when
    the two share their weight). Returns the names of the modules replaced."""
    bits = WEIGHT_BITS[precision]
    if group_size < 1:
        raise UsageError(f"the group size must be at least 1, not {group_size}")
    head, table = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and isinstance(table, torch.nn.Embedding) and getattr(head, "weight", None) is table.weight
    replaced, quantised_head = [], None
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            found = _linear_weight(child)
            if found is None or (child is head and not lm_head):
                continue
            q = QuantLinear(*found, bits, group_size)
            setattr(module, child_name, q)
            replaced.append(f"{name}.{child_name}" if name else child_name)
            quantised_head = q if child is head else quantised_head
    # Only a plain Embedding: a subclass may do more (Gemma's scales its rows).
    if embeddings and type(table) is torch.nn.Embedding:
        rows = quantised_head if tied and quantised_head is not None else QuantLinear(table.weight, None, bits, group_size)
        model.set_input_embeddings(QuantEmbedding(rows, table.padding_idx))
        replaced.append("embeddings")
    return tuple(replaced)


@dataclass(frozen=True)
class QuantError:
    """A quantised model against float32 over the measurement's prompts (`measure`)."""

    agreement: float  # share of steps whose greedy token is float32's
    tokens: int  # steps compared (prompts x MEASURED_TOKENS)
    prompts: int
    max_logit_diff: float  # max |logits - logits_fp32|
    relative: float  # max_logit_diff / max |logits_fp32|


def _greedy(model: torch.nn.Module, ids: Sequence[int], steps: int) -> list[int]:
    """Hugging Face's greedy continuation (no end-of-sequence stop, no logits processor:
    as `CausalLM.greedy_reference`)."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(torch.tensor([list(ids)]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             generation_config=config)  # fmt: skip
    return out[0, len(ids):].tolist()


def _teacher_forced(model: torch.nn.Module, prompt: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
    """Logits [len(tokens), vocab] of the steps that chose `tokens` after `prompt`, each
    step given the tokens before it."""
    seq = torch.tensor([[*prompt, *tokens[:-1]]])
    with torch.no_grad():
        return model(seq).logits[0, len(prompt) - 1:].float()


def prompts(tokenizer_json: Any, vocab: int) -> list[list[int]]:
    """The measurement's prompts after the greedy reference's: PROMPT_TEXTS through the
    bundle's tokenizer, or seeded random ids without one."""
    if tokenizer_json is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_json))
        return [tok.encode(t).ids for t in PROMPT_TEXTS]
    rng = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=rng).tolist() for n in PROMPT_LENGTHS]


def measure(reference: torch.nn.Module, quantized: torch.nn.Module,
            cases: Sequence[tuple[Sequence[int], Sequence[int]]]) -> QuantError:
    """`quantized` against `reference` (float32) on `cases`, each a prompt and the
    reference's greedy tokens after it."""
    agree = total = 0
    worst = peak = 0.0
    for prompt, tokens in cases:
        want = _teacher_forced(reference, prompt, tokens)
        got = _teacher_forced(quantized, prompt, tokens)
        agree += int((got.argmax(-1) == torch.tensor(list(tokens))).sum())
        total += len(tokens)
        worst = max(worst, float((got - want).abs().max()))
        peak = max(peak, float(want.abs().max()))
    return QuantError(agree / total, total, len(cases), worst, worst / peak if peak else 0.0)


def quantized_language_model(lm: Any, precision: str, group_size: int | None,
                             workdir: Path) -> tuple[Any, Quantization, float]:  # fmt: skip
    """A CausalLM over a quantised copy of `lm`'s model (`lm` is left as it was), the
    manifest's record of it, and its error relative to the largest float32 logit
    (`Artifact.precision_error`)."""
    from hxc.compiler.causal_lm import CausalLM, save_tokenizer
    from hxc.manifests.schema import TOKENIZER_DIR

    if not isinstance(lm, CausalLM):
        raise UsageError(f"--precision {precision} quantises the weights of language models only",
                         hint="build fp16 or bf16 for other models")  # fmt: skip
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    model = copy.deepcopy(lm.model)
    replaced = quantize_model(model, precision, group_size)
    quantized = CausalLM(model, lm.layout.slots, lm.layout.max_context, prefill_chunk=lm.prefill_chunks, values_by_sum=True)
    quantized.tokenizer = getattr(lm, "tokenizer", None)
    # The greedy reference's prompt as the fp32 import records it (the same tokenizer file).
    tokenizer_json = save_tokenizer(quantized.tokenizer, workdir / "measure-tokenizer").get(f"{TOKENIZER_DIR}/tokenizer.json")
    ref, _ = lm.greedy_reference(tokenizer_json)
    cases = [(ref.prompt_token_ids, ref.token_ids)]
    cases += [(p, _greedy(lm.model, p, MEASURED_TOKENS)) for p in prompts(tokenizer_json, lm.vocab)]
    err = measure(lm.model, model, cases)
    record = Quantization(bits=WEIGHT_BITS[precision], group_size=group_size, modules=len(replaced),
                          lm_head=isinstance(model.get_output_embeddings(), QuantLinear),
                          embeddings=isinstance(model.get_input_embeddings(), QuantEmbedding),
                          greedy_agreement=round(err.agreement, 4), greedy_tokens=err.tokens, greedy_prompts=err.prompts,
                          max_logit_diff=err.max_logit_diff)  # fmt: skip
    return quantized, record, err.relative

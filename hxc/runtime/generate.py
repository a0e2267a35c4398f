"""Text generation on a loaded language model (a bundle with a `language_model` record:
`hxc compile` of a Hugging Face directory or a transformers factory).

    m = hxc.runtime.load("llm.hxc")
    for piece in m.generate("Once upon a time", max_new_tokens=32):
        print(piece.text, end="", flush=True)
    result = m.generate([1, 306, 4966], max_new_tokens=8).result()   # token ids in, the whole result

The prompt runs through `prefill` in chunks of the bundle's prefill size, then each new
token through `decode`, with the KV cache a `ModelState`: allocated once on the device,
passed by handle, never copied to the host. Only the logits of each step come back;
the next token is chosen here (greedy by default, exactly `argmax` like Hugging Face's
`generate(do_sample=False)`; or sampled with temperature, top-k and top-p from a
seeded generator, reproducible on the same artifact). Text is tokenised by the
bundle's own `tokenizer.json` (the `tokenizers` library), as `AutoTokenizer` does, and
streamed pieces joined are the decoded text.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hxc.errors import UsageError
from hxc.manifests.schema import LanguageModel

if TYPE_CHECKING:
    from hxc.runtime.loader import LoadedModel, ModelState

FINISH_REASONS = ("stop", "length")  # an end-of-sequence token; max_new_tokens or the context


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits: temperature 0 is greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0: every token
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise UsageError(f"temperature must be 0 (greedy) or more, not {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"top-k must be 0 (off) or more, not {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top-p must be in (0, 1], not {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def choose(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        if self.greedy:
            return int(np.argmax(logits))  # the first of equal maxima, as torch.argmax
        x = logits.astype(np.float64) / self.temperature
        if 0 < self.top_k < x.size:
            kth = np.partition(x, -self.top_k)[-self.top_k]
            x = np.where(x < kth, -np.inf, x)
        p = np.exp(x - x.max())
        p /= p.sum()
        if self.top_p < 1:
            order = np.argsort(-p, kind="stable")
            cumulative = np.cumsum(p[order])
            # Keep the tokens until the total reaches top_p (at least the most likely one).
            cut = np.empty_like(p, dtype=bool)
            cut[order] = (cumulative - p[order]) >= self.top_p
            p = np.where(cut, 0.0, p)
            p /= p.sum()
        return int(rng.choice(p.size, p=p))


@dataclass(frozen=True)
class Piece:
    """A stretch of the output as it is generated: its new text (empty while a
    character is still incomplete) and the token ids it covers."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Generation:
    """A whole generation: the continuation only (the prompt excluded)."""

    text: str
    token_ids: tuple[int, ...]
    prompt_token_ids: tuple[int, ...]
    finish_reason: str  # stop | length
    ttft_ms: float  # prompt in to first token chosen (tokenising included)
    tpot_ms: float | None  # per output token after the first; None for a single token

    @property
    def tokens_per_s(self) -> float | None:
        return None if not self.tpot_ms else 1000.0 / self.tpot_ms


class Tokenizer:
    """The bundle's tokenizer (its tokenizer.json, read from the checked bytes), encoding
    and decoding as Hugging Face's fast tokenizer of the same files does."""

    def __init__(self, tokenizer_json: str, config: dict[str, Any]) -> None:
        from hxc.extras import require

        require("llm", "tokenising text", ("tokenizers",))
        from tokenizers import Tokenizer as _Tokenizer

        self._tok = _Tokenizer.from_str(tokenizer_json)
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))

    @classmethod
    def of(cls, model: LoadedModel) -> Tokenizer | None:
        from hxc.manifests.bundle import open_checked

        lm = model.manifest.language_model
        if lm is None or lm.tokenizer_file is None:
            return None
        config_file = next((f for f in lm.tokenizer_files if f.endswith("/tokenizer_config.json")), None)
        text = open_checked(model.bundle, model.manifest, lm.tokenizer_file).bytes().decode()
        config = json.loads(open_checked(model.bundle, model.manifest, config_file).bytes()) if config_file else {}
        return cls(text, config if isinstance(config, dict) else {})

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)  # with the special tokens its post-processor adds (BOS)

    def decode(self, ids: Sequence[int]) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=True)
        return _clean_up_spaces(text) if self.clean_up_spaces else text


def _clean_up_spaces(text: str) -> str:
    # transformers' `clean_up_tokenization`, applied when the tokenizer's config asks.
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(a, b)
    return text


class Stream:
    """A generation in progress: iterate it for `Piece`s as tokens are chosen; `result()`
    finishes it (if needed) and returns the whole `Generation`."""

    def __init__(self, pieces: Iterator[Piece], holder: dict[str, Generation]) -> None:
        self._pieces = pieces
        self._holder = holder

    def __iter__(self) -> Iterator[Piece]:
        return self._pieces

    def __next__(self) -> Piece:
        return next(self._pieces)

    def result(self) -> Generation:
        for _ in self._pieces:
            pass
        return self._holder["result"]


def language_model_of(model: LoadedModel) -> LanguageModel:
    lm = model.manifest.language_model
    if lm is None:
        raise UsageError(f"{model.bundle}: not a language model (its functions: {', '.join(model.functions)})",
                         hint="compile a Hugging Face model directory or a transformers causal LM")  # fmt: skip
    return lm


def generate(model: LoadedModel, prompt: str | Sequence[int], max_new_tokens: int = 64, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop_token_ids: Sequence[int] | None = None,
             state: ModelState | None = None, tokenizer: Tokenizer | None = None) -> Stream:  # fmt: skip
    """Generate up to `max_new_tokens` tokens after `prompt` (text, or token ids), as a
    `Stream`. Stops after a token of `stop_token_ids` (default: the model's end-of-
    sequence tokens; [] never stops early), or when the context is full. `state` (a
    `model.new_state()`) is reused when given; by default each call allocates one.
    Bad input (an empty or too long prompt, bad sampling values) raises here, in one
    line, before anything runs."""
    lm = language_model_of(model)
    sampling = Sampling(float(temperature), int(top_k), float(top_p), seed)
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    start = time.perf_counter()
    if isinstance(prompt, str):
        tokenizer = tokenizer or Tokenizer.of(model)
        if tokenizer is None:
            raise UsageError(f"{model.bundle}: the bundle has no tokenizer", hint="pass the prompt as token ids")
        ids = tokenizer.encode(prompt)
    else:
        ids = [int(t) for t in prompt]
        if bad := [t for t in ids if not 0 <= t < lm.vocab_size]:
            raise UsageError(f"token id {bad[0]} is outside the vocabulary (0..{lm.vocab_size - 1})")
    if not ids:
        raise UsageError("the prompt is empty (no tokens)")
    if len(ids) > lm.max_context:
        raise UsageError(f"the prompt has {len(ids)} tokens; this bundle's context holds {lm.max_context}",
                         hint="shorten the prompt, or compile with a larger --max-context")  # fmt: skip
    stop = set(lm.eos_token_ids if stop_token_ids is None else (int(t) for t in stop_token_ids))
    if tokenizer is None and lm.tokenizer_file is not None:
        tokenizer = Tokenizer.of(model)
    holder: dict[str, Generation] = {}
    state = state if state is not None else model.new_state()
    pieces = _pieces(model, lm, ids, max_new_tokens, sampling, stop, state, tokenizer, start, holder)
    return Stream(pieces, holder)


def _tokens(model: LoadedModel, lm: LanguageModel, ids: list[int], max_new_tokens: int, sampling: Sampling,
            stop: set[int], state: ModelState) -> Iterator[int]:  # fmt: skip
    """The chosen tokens, one at a time: the first from the prompt's last chunk, the rest
    from decode steps at positions len(ids), len(ids) + 1, ... in slot 0."""
    rng = np.random.default_rng(sampling.seed)
    chunk, slot = lm.prefill_chunk, 0
    logits = None
    for at in range(0, len(ids), chunk):
        piece = ids[at:at + chunk]
        tokens = np.zeros((1, chunk), np.int32)
        tokens[0, :len(piece)] = piece
        logits = model.call_flat("prefill", [tokens, _i32(at), _i32(len(piece)), _i32(slot)], state=state)[0]
    assert logits is not None
    token = sampling.choose(logits[0], rng)
    yield token
    # Idle slots decode into the cache's scratch row (position max_context).
    tokens = np.zeros(lm.slots, np.int32)
    positions = np.full(lm.slots, lm.max_context, np.int32)
    for n in range(1, max_new_tokens):
        position = len(ids) + n - 1  # where the last token's keys and values go
        if token in stop or position >= lm.max_context:
            return
        tokens[slot], positions[slot] = token, position
        logits = model.call_flat("decode", [tokens, positions], state=state)[0]
        token = sampling.choose(logits[slot], rng)
        yield token


def _i32(value: int) -> np.ndarray:
    return np.array([value], np.int32)


def _pieces(model: LoadedModel, lm: LanguageModel, ids: list[int], max_new_tokens: int, sampling: Sampling,
            stop: set[int], state: ModelState, tokenizer: Tokenizer | None, start: float,
            holder: dict[str, Generation]) -> Iterator[Piece]:  # fmt: skip
    out: list[int] = []
    emitted, pending = "", 0  # text given out so far; tokens not yet covered by a piece
    first = last = start
    for token in _tokens(model, lm, ids, max_new_tokens, sampling, stop, state):
        last = time.perf_counter()
        if not out:
            first = last
        out.append(token)
        pending += 1
        if tokenizer is None:
            yield Piece("", (token,))
            pending = 0
            continue
        text = tokenizer.decode(out)
        # Hold back text that may still change: an incomplete UTF-8 character decodes as
        # U+FFFD, and cleaned-up spaces depend on what follows them.
        held = text.endswith("\ufffd") or (tokenizer.clean_up_spaces and text[-1:].isspace())
        if not held and text.startswith(emitted) and len(text) > len(emitted):
            yield Piece(text[len(emitted):], tuple(out[len(out) - pending:]))
            emitted, pending = text, 0
    text = tokenizer.decode(out) if tokenizer is not None else ""
    if pending:
        # (Should the text ever change behind what was streamed, the result's text is right.)
        yield Piece(text[len(emitted):] if text.startswith(emitted) else "", tuple(out[len(out) - pending:]))
    finish = "stop" if out[-1] in stop else "length"
    tpot = (last - first) * 1000 / (len(out) - 1) if len(out) > 1 else None
    holder["result"] = Generation(text, tuple(out), tuple(ids), finish, (first - start) * 1000, tpot)

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

    m.generate(messages=[{"role": "user", "content": "Hi!"}])   # the bundle's chat template
    m.generate("Q: why? A:", stop=["\nQ:"], truncate=True)

A chat template is untrusted input (it came with the model): it renders in jinja2's
immutable sandbox, its output and its string arithmetic bounded, and any error it raises
is one line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hxc.errors import UsageError
from hxc.lm_calls import MIXED, decode_args, mixed_args, prefill_args, prefill_calls, prefill_function
from hxc.manifests.schema import LanguageModel, Manifest

if TYPE_CHECKING:
    from hxc.runtime.loader import LoadedModel, ModelState

FINISH_REASONS = ("stop", "length")  # an end-of-sequence token or stop string; max_new_tokens or the context
# Characters a chat template may render (and a string it may build): a prompt is at most a
# context's worth of tokens, far below this; a template that loops past it is refused.
CHAT_TEMPLATE_MAX_CHARS = 1 << 20
# The special tokens a template sees by name (bos_token, ...), as transformers passes them.
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


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
    and decoding as Hugging Face's fast tokenizer of the same files does; with the chat
    template its files hold, if any."""

    def __init__(self, tokenizer_json: str, config: dict[str, Any], chat_template: str | None = None) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self._tok = _Tokenizer.from_str(tokenizer_json)
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.chat_template = ChatTemplate(chat_template, config) if chat_template else None

    @classmethod
    def of(cls, model: LoadedModel) -> Tokenizer | None:
        return cls.of_bundle(model.bundle, model.manifest)

    @classmethod
    def of_bundle(cls, bundle: Any, manifest: Manifest) -> Tokenizer | None:
        """The tokenizer of a bundle read (and checked) but not loaded: what a server
        that runs the model in other processes tokenises with."""
        from hxc.manifests.bundle import open_checked

        lm = manifest.language_model
        if lm is None or lm.tokenizer_file is None:
            return None

        def read(name: str) -> bytes | None:
            path = next((f for f in lm.tokenizer_files if f.endswith("/" + name)), None)
            return None if path is None else open_checked(bundle, manifest, path).bytes()

        text = read("tokenizer.json")
        assert text is not None
        config = _json_object(read("tokenizer_config.json"))
        config = {**_json_object(read("special_tokens_map.json")), **config}
        # transformers 5 saves the template as chat_template.jinja; older ones inside the config.
        template = read("chat_template.jinja")
        return cls(text.decode(), config, template.decode() if template is not None else _config_template(config))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # With the special tokens its post-processor adds (BOS), unless the text already
        # holds them (a rendered chat template), as transformers' apply_chat_template.
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=True)
        return _clean_up_spaces(text) if self.clean_up_spaces else text


def _json_object(data: bytes | None) -> dict[str, Any]:
    if data is None:
        return {}
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _config_template(config: dict[str, Any]) -> str | None:
    """tokenizer_config.json's chat_template: a string, or named templates (the `default` one)."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class ChatTemplate:
    """A chat template rendered as transformers' apply_chat_template renders it (the
    same globals and filters, special tokens by name), in jinja2's immutable sandbox."""

    def __init__(self, source: str, config: dict[str, Any]) -> None:
        self.source = source
        self.variables = {name: _token_text(config.get(name)) for name in _SPECIAL_TOKENS if config.get(name) is not None}

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        checked = _check_messages(messages)
        try:
            template = _sandbox().from_string(self.source)
            out: list[str] = []
            size = 0
            for part in template.generate(messages=checked, add_generation_prompt=add_generation_prompt, **self.variables):
                size += len(part)
                if size > CHAT_TEMPLATE_MAX_CHARS:
                    raise TemplateError(f"it rendered more than {CHAT_TEMPLATE_MAX_CHARS:,} characters")
                out.append(part)
        except Exception as e:  # the template is arbitrary code from the model: whatever it raises is its fault
            from hxc.errors import first_line

            raise UsageError(f"the bundle's chat template failed: {first_line(e)}") from None
        return "".join(out)


def _token_text(value: Any) -> str:
    # A special token is saved as its text, or as an AddedToken's fields ({"content": ...}).
    return str(value.get("content", "")) if isinstance(value, dict) else str(value)


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UsageError("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise UsageError(f"messages[{i}] is not a {{\"role\": str, \"content\": ...}} object")
        out.append(json.loads(json.dumps(m)))  # plain data only: nothing of the caller's objects reaches the template
    return out


def _sandbox() -> Any:
    """A jinja2 environment for untrusted templates: immutable sandbox, strings and
    sequences built by `*` and `**` bounded, transformers' extra globals and filters."""
    import datetime as dt

    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.nodes import CallBlock
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and isinstance(right, int) and abs(right) > 64:
                raise SecurityError(f"exponent {right} is too large")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > CHAT_TEMPLATE_MAX_CHARS:
                        raise SecurityError(f"a sequence of {len(seq) * n:,} items is too large")
            return super().call_binop(context, operator, left, right)

    class Generation(Extension):
        # transformers' {% generation %} marks the assistant's text (for training masks): here it renders its body.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: dt.datetime.now().strftime(f))
    return env


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


def generate(model: LoadedModel, prompt: str | Sequence[int] | None = None, max_new_tokens: int = 64, *,
             messages: Sequence[dict[str, Any]] | None = None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, stop: str | Sequence[str] | None = None,
             stop_token_ids: Sequence[int] | None = None, truncate: bool = False, state: ModelState | None = None,
             tokenizer: Tokenizer | None = None) -> Stream:  # fmt: skip
    """Generate up to `max_new_tokens` tokens after `prompt` (text, or token ids) or after
    chat `messages` (rendered by the bundle's chat template, with the assistant's turn
    opened), as a `Stream`.

    Generation stops after a token of `stop_token_ids` (default: the model's end-of-
    sequence tokens; [] never stops early), before any string of `stop` (the text ends
    where it starts; the tokens that made it are still in `token_ids`), or when the
    context is full. A prompt longer than the context is an error, unless `truncate`:
    then a prompt that leaves no room for `max_new_tokens` loses tokens from its start
    (the BOS token kept) until it does, down to half the context. `state` (a
    `model.new_state()`) is reused when given; by default each call allocates one.
    Bad input (an empty or too long prompt, bad sampling values, a chat template that
    fails) raises here, in one line, before anything runs."""
    lm = language_model_of(model)
    sampling = Sampling(float(temperature), int(top_k), float(top_p), seed)
    stops = stop_strings(stop)
    start = time.perf_counter()
    if tokenizer is None and (isinstance(prompt, str) or messages is not None or stops or lm.tokenizer_file is not None):
        tokenizer = Tokenizer.of(model)
    ids = prompt_ids(lm, tokenizer, prompt, max_new_tokens, messages=messages, truncate=truncate, stops=stops,
                     where=str(model.bundle))  # fmt: skip
    stop_ids = set(lm.eos_token_ids if stop_token_ids is None else (int(t) for t in stop_token_ids))
    holder: dict[str, Generation] = {}
    state = state if state is not None else model.new_state()
    pieces = _pieces(model, lm, ids, max_new_tokens, sampling, stop_ids, stops, state, tokenizer, start, holder)
    return Stream(pieces, holder)


def prompt_ids(lm: LanguageModel, tokenizer: Tokenizer | None, prompt: str | Sequence[int] | None, max_new_tokens: int, *,
               messages: Sequence[dict[str, Any]] | None = None, truncate: bool = False, stops: Sequence[str] = (),
               where: str = "the model") -> list[int]:  # fmt: skip
    """The token ids `generate` runs for `prompt` (text, or token ids) or chat
    `messages`, checked: every bad input (no tokenizer where text needs one, an empty or
    too long prompt, ids outside the vocabulary, a chat template that fails) is one
    line, raised before anything runs. `where` names the model in those lines."""
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    if (prompt is None) == (messages is None):
        raise UsageError("give a prompt or chat messages, not both" if messages is not None else "give a prompt or chat messages")
    if tokenizer is None and (isinstance(prompt, str) or messages is not None or stops):
        what = "chat messages" if messages is not None else "stop strings" if stops else "text prompts"
        raise UsageError(f"{where}: the bundle has no tokenizer, which {what} need", hint="pass the prompt as token ids")
    if messages is not None:
        assert tokenizer is not None
        if tokenizer.chat_template is None:
            raise UsageError(f"{where}: the bundle's tokenizer has no chat template", hint="pass a text prompt")
        ids = tokenizer.encode(tokenizer.chat_template.render(messages), add_special_tokens=False)
    elif isinstance(prompt, str):
        assert tokenizer is not None
        ids = tokenizer.encode(prompt)
    else:
        assert prompt is not None
        ids = [int(t) for t in prompt]
        if bad := [t for t in ids if not 0 <= t < lm.vocab_size]:
            raise UsageError(f"token id {bad[0]} is outside the vocabulary (0..{lm.vocab_size - 1})")
    if not ids:
        raise UsageError("the prompt is empty (no tokens)")
    if truncate:
        ids = _truncated(ids, lm, max_new_tokens)
    elif len(ids) > lm.max_context:
        raise UsageError(f"the prompt has {len(ids)} tokens; this bundle's context holds {lm.max_context}",
                         hint="shorten the prompt, ask to truncate it (--truncate), or compile with a larger --max-context")  # fmt: skip
    return ids


def stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """`stop` as a tuple of stop strings, each checked."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if bad := [s for s in stops if not isinstance(s, str) or not s]:
        raise UsageError(f"stop strings must be non-empty text, not {bad[0]!r}")
    return stops


def _truncated(ids: list[int], lm: LanguageModel, max_new_tokens: int) -> list[int]:
    """The prompt's last tokens that leave room for `max_new_tokens` (the first comes from
    the prompt itself, each other takes a position), keeping at least half the context;
    a leading BOS token stays in front."""
    keep = max(lm.max_context - (max_new_tokens - 1), lm.max_context // 2, 1)
    if len(ids) <= keep:
        return ids
    if lm.bos_token_id is not None and ids[0] == lm.bos_token_id and keep > 1:
        return [ids[0], *ids[len(ids) - keep + 1:]]
    return ids[len(ids) - keep:]


def prefill(model: LoadedModel, lm: LanguageModel, ids: Sequence[int], state: ModelState, slot: int = 0) -> np.ndarray:
    """Run the prompt `ids` through `prefill` in chunks, its keys and values written into
    `slot`'s cache in `state`: the logits of its last token, (vocab,)."""
    logits = None
    for name, args in prefill_calls(ids, slot, lm.chunks, lm.max_context):
        logits = model.call_flat(name, args, state=state)[0][0]
    assert logits is not None
    return logits


def prefill_chunk(model: LoadedModel, lm: LanguageModel, ids: Sequence[int], at: int, state: ModelState,
                  slot: int = 0, *, chunk: int | None = None) -> np.ndarray:  # fmt: skip
    """One prefill call of `chunk` tokens (one of `lm.chunks`; default the smallest):
    the prompt's tokens from `at` (that many at most) into `slot`'s cache. The logits of
    the chunk's last token, (vocab,). (`prefill` is these calls from 0; a batching
    scheduler interleaves them with decode steps.)"""
    chunk = lm.prefill_chunk if chunk is None else chunk
    args = prefill_args(ids[at:at + chunk], at, slot, chunk, lm.max_context)
    return model.call_flat(prefill_function(chunk, lm.chunks), args, state=state)[0][0]


def decode(model: LoadedModel, lm: LanguageModel, token: int, position: int, state: ModelState, slot: int = 0) -> np.ndarray:
    """One `decode` step: `token` at `position` of `slot` (its keys and values written
    there), every other slot idle. The logits of the next token, (vocab,)."""
    return decode_batch(model, lm, {slot: (token, position)}, state)[slot]


def decode_batch(model: LoadedModel, lm: LanguageModel, steps: Mapping[int, tuple[int, int]], state: ModelState) -> np.ndarray:
    """One `decode` call for several sequences at once: `steps` maps a slot to its
    (token, position), each token's keys and values written at its position of its
    slot; slots not in `steps` are idle (they write the cache's scratch row). The
    logits, (slots, vocab): a busy slot's row is its next token's; an idle slot's row
    means nothing. (The call reads the cache up to the furthest position in `steps`.)"""
    return model.call_flat("decode", decode_args(steps, lm.slots, lm.max_context), state=state)[0]


def mixed_step(model: LoadedModel, lm: LanguageModel, steps: Mapping[int, tuple[int, int]], ids: Sequence[int], at: int,
               state: ModelState, slot: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """`decode_batch`'s step for `steps` and `prefill_chunk`'s call of the smallest chunk
    of `ids` from `at` into `slot` (not in `steps`), as one `mixed` call (a bundle of
    several slots has it, `has_mixed`): each weight is read once for both. The decode
    logits (slots, vocab) and the chunk's last token's logits (vocab,)."""
    args = mixed_args(steps, lm.slots, ids[at:at + lm.prefill_chunk], at, slot, lm.prefill_chunk, lm.max_context)
    out = model.call_flat(MIXED, args, state=state)
    return out[0], out[1][0]


def has_mixed(model: LoadedModel) -> bool:
    """Whether the model's artifact has the `mixed` step (a decode step carrying a prefill chunk)."""
    return MIXED in model.functions


def _tokens(model: LoadedModel, lm: LanguageModel, ids: list[int], max_new_tokens: int, sampling: Sampling,
            stop: set[int], state: ModelState) -> Iterator[int]:  # fmt: skip
    """The chosen tokens, one at a time: the first from the prompt's last chunk, the rest
    from decode steps at positions len(ids), len(ids) + 1, ... in slot 0."""
    rng = np.random.default_rng(sampling.seed)
    token = sampling.choose(prefill(model, lm, ids, state), rng)
    yield token
    for n in range(1, max_new_tokens):
        position = len(ids) + n - 1  # where the last token's keys and values go
        if token in stop or position >= lm.max_context:
            return
        token = sampling.choose(decode(model, lm, token, position, state), rng)
        yield token


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the first stop string in `text` starts, if any does."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` may be the start of a stop string (held
    back from the stream until the next token decides)."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)


class TextStream:
    """Token ids in, text out as it becomes final: what `generate` streams, for anyone
    who has the tokens (a server whose tokens come from a worker process).

    `add(token)` returns the `Piece` the token completes, if any: text that may still
    change is held back (an incomplete UTF-8 character decodes as U+FFFD; cleaned-up
    spaces depend on what follows them; text that may start a stop string). After a
    stop string appears, `stopped` is True and nothing more is added; `finish()` gives
    the last piece (the text held back, or tokens no piece covered), and `text` is then
    the whole text, cut where the first stop string starts."""

    def __init__(self, tokenizer: Tokenizer | None, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.token_ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._emitted = ""  # text given out so far
        self._pending = 0  # tokens not yet covered by a piece
        self._stopped_at: int | None = None  # where a stop string starts in the text

    def add(self, token: int) -> Piece | None:
        out, tokenizer = self.token_ids, self.tokenizer
        out.append(token)
        self._pending += 1
        if tokenizer is None:
            self._pending = 0
            return Piece("", (token,))
        text = self.text = tokenizer.decode(out)
        if self.stops and (at := _find_stop(text, self.stops)) is not None:
            self._stopped_at, self.stopped = at, True
            return None
        if text.endswith("\ufffd") or (tokenizer.clean_up_spaces and text[-1:].isspace()):
            return None
        ready = text[:len(text) - _partial_stop(text, self.stops)]
        if ready.startswith(self._emitted) and len(ready) > len(self._emitted):
            piece = Piece(ready[len(self._emitted):], tuple(out[len(out) - self._pending:]))
            self._emitted, self._pending = ready, 0
            return piece
        return None

    def finish(self) -> Piece | None:
        out = self.token_ids
        if self.tokenizer is not None:
            self.text = self.text[:self._stopped_at] if self._stopped_at is not None else self.tokenizer.decode(out)
        text, emitted, pending = self.text, self._emitted, self._pending
        self._emitted, self._pending = text, 0
        if pending or len(text) > len(emitted):  # tokens not yet given out, or text held back
            # (Should the text ever change behind what was streamed, the result's text is right.)
            return Piece(text[len(emitted):] if text.startswith(emitted) else "", tuple(out[len(out) - pending:]))
        return None


def _pieces(model: LoadedModel, lm: LanguageModel, ids: list[int], max_new_tokens: int, sampling: Sampling,
            stop: set[int], stops: tuple[str, ...], state: ModelState, tokenizer: Tokenizer | None, start: float,
            holder: dict[str, Generation]) -> Iterator[Piece]:  # fmt: skip
    text = TextStream(tokenizer, stops)
    first = last = start
    for token in _tokens(model, lm, ids, max_new_tokens, sampling, stop, state):
        last = time.perf_counter()
        if not text.token_ids:
            first = last
        piece = text.add(token)
        if piece is not None:
            yield piece
        if text.stopped:
            break
    if (piece := text.finish()) is not None:
        yield piece
    out = text.token_ids
    finish = "stop" if text.stopped or out[-1] in stop else "length"
    tpot = (last - first) * 1000 / (len(out) - 1) if len(out) > 1 else None
    holder["result"] = Generation(text.text, tuple(out), tuple(ids), finish, (first - start) * 1000, tpot)

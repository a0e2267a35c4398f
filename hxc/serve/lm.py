"""Text generation for the server's language-model endpoints: one object per request
between the HTTP side (`openai.py`, `generate_ext.py`, the routes in `lm_routes.py`)
and the devices (`hxc.pool.lm_router.LMRouter`, which batches sequences on each
device's worker process).

    gen = start(model, TextRequest(prompt="Once upon", max_tokens=16), metrics)
    async for text in gen.pieces():      # the text as it becomes final
        ...
    gen.result                            # TextResult: text, finish_reason, token counts

The prompt is tokenised here (the bundle's tokenizer, its chat template) and checked
exactly as `hxc generate` checks it; tokens come back from the worker and become text
here, through the same `TextStream` `generate` uses, so the text is `generate`'s for
the same prompt, sampling and seed. A stop string ends the sequence on its device at
once; so does a client that goes away (`close()`).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hxc.errors import HxcError, UsageError
from hxc.serve.models import ServedModel
from hxc.serve.protocol import ProtocolError


@dataclass(frozen=True)
class TextRequest:
    """What any of the endpoints asks of a language model, checked for types by its parser."""

    prompt: str | Sequence[int] | None = None
    messages: Sequence[dict[str, Any]] | None = None
    max_tokens: int | None = None  # None: until the context is full
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's end-of-sequence tokens
    ignore_eos: bool = False
    # Routing (None: the server's defaults): targets, the policy, the precisions allowed.
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    slo_ms: float | None = None
    policy: str | None = None
    precision: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TextResult:
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    finish_reason: str  # stop | length
    device: str | None
    slo_missed: bool = False  # a target missed: predicted when it was routed, or measured

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class Generation:
    """One request's sequence: iterate `pieces()` once; `result` when it ends. Create
    with `start` (in the event loop)."""

    def __init__(self, model: ServedModel, ids: list[int], request: TextRequest, metrics: Any) -> None:
        from hxc.pool.lm_router import GenerateParams, Targets
        from hxc.runtime.generate import Sampling, TextStream

        self.model = model
        self.prompt_ids = ids
        self.metrics = metrics
        self.result: TextResult | None = None
        self._text = TextStream(model.tokenizer, request.stop)  # type: ignore[arg-type]
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._closed = False
        Sampling(request.temperature, request.top_k, request.top_p, request.seed)  # bad values: one line, here
        lm = model.language_model
        stop_ids = () if request.ignore_eos else request.stop_token_ids
        # Past the context the sequence ends there, with "length", as generate's does.
        max_new = min(request.max_tokens or lm.max_context, lm.max_context)
        params = GenerateParams(max_new, request.temperature, request.top_k, request.top_p, request.seed,
                                tuple(stop_ids) if stop_ids is not None else None)  # fmt: skip
        self.started = time.perf_counter()
        self.first_token_s: float | None = None  # time to the first token
        self.e2e_s: float | None = None  # time to the last
        self._last_token = self.started
        router = model.router
        targets = Targets(request.ttft_ms, request.tpot_ms, request.slo_ms, request.policy, request.precision)
        try:
            self.seq = router.submit(ids, params, self._on_tokens, self._on_done, targets)  # type: ignore[attr-defined]
        except HxcError as e:
            raise router_error(e, model.name) from None

    # --- from the worker threads -------------------------------------------------------

    def _on_tokens(self, seq: Any, tokens: list[int]) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, list(tokens))

    def _on_done(self, seq: Any) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, None)

    # --- in the event loop -------------------------------------------------------------

    async def pieces(self) -> AsyncIterator[str]:
        """The text as it becomes final (empty pieces are skipped); raises ProtocolError
        if the sequence fails. Leaving the loop early (or `close()`) cancels it."""
        text = self._text
        try:
            while True:
                tokens = await self._queue.get()
                if tokens is None:
                    break
                now = time.perf_counter()
                for token in tokens:
                    if self.first_token_s is None:
                        self.first_token_s = now - self.started
                        self._observe("ttft", self.first_token_s)
                    else:
                        self._observe("itl", now - self._last_token)
                    self._last_token = now
                    piece = text.add(token)
                    if piece is not None and piece.text:
                        yield piece.text
                    if text.stopped:
                        break
                if text.stopped:
                    self.close()  # a stop string: the device can stop now
                    break
            seq = self.seq
            if seq.error is not None and not text.stopped:
                raise router_error(seq.error, self.model.name)
            last = text.finish()
            if last is not None and last.text:
                yield last.text
            stop_ids = set(seq.params.stop_token_ids if seq.params.stop_token_ids is not None else self.model.language_model.eos_token_ids)
            ids = text.token_ids
            finish = "stop" if text.stopped or (ids and ids[-1] in stop_ids) else "length"
            self.e2e_s = time.perf_counter() - self.started
            self.result = TextResult(text.text, tuple(ids), len(self.prompt_ids), finish, seq.device,
                                     seq.predicted_miss or bool(self.missed()))  # fmt: skip
            self._observe("e2e", self.e2e_s)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the sequence on its device, if it still runs (idempotent)."""
        if not self._closed:
            self._closed = True
            if not self.seq.done:
                self.model.router.cancel(self.seq)  # type: ignore[attr-defined]

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (None for one token)."""
        n = len(self._text.token_ids)
        if self.e2e_s is None or self.first_token_s is None or n < 2:
            return None
        return (self.e2e_s - self.first_token_s) / (n - 1)

    @property
    def device(self) -> str | None:
        """The device it runs on, or was routed to (None before either)."""
        seq = self.seq
        return seq.device or (seq.queued_on.name if seq.queued_on is not None else None)

    def missed(self) -> list[str]:
        """The targets its measured times missed, of ttft, tpot and e2e (after it ended)."""
        t, out = self.seq.targets, []
        for name, target, value in (("ttft", t.ttft_ms, self.first_token_s), ("tpot", t.tpot_ms, self.tpot_s),
                                    ("e2e", t.slo_ms, self.e2e_s)):  # fmt: skip
            if target is not None and value is not None and value * 1000 > target:
                out.append(name)
        return out

    def _observe(self, what: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.lm_observe(self.model.name, self.seq.device or "", what, seconds)


def start(model: ServedModel, request: TextRequest, metrics: Any = None) -> Generation:
    """Tokenise and check `request`, and queue it on `model`'s devices (in the event
    loop). Raises ProtocolError: 400 for a bad request, 503 when no device can take it."""
    if model.language_model is None:
        raise ProtocolError(f"model {model.name!r} is not a language model")
    if model.router is None or not model.ready():
        why = model.error or ("still loading" if not model.loaded.is_set() else "no device is ready")
        raise ProtocolError(f"model {model.name!r} has no device ready: {why}", 503, retry_after_s=1.0)
    from hxc.runtime.generate import prompt_ids, stop_strings

    try:
        stops = stop_strings(request.stop)
        ids = prompt_ids(model.language_model, model.tokenizer, request.prompt, request.max_tokens or 1,  # type: ignore[arg-type]
                         messages=request.messages, stops=stops, where=f"model {model.name!r}")  # fmt: skip
        return Generation(model, ids, request, metrics)
    except UsageError as e:
        raise ProtocolError(str(e)) from None


ROUTING_FIELDS = ("ttft_ms", "tpot_ms", "slo_ms", "policy", "precision")


def routing_fields(doc: Mapping[str, Any], error: Callable[[str, str], Exception]) -> dict[str, Any]:
    """A request's routing fields (`ROUTING_FIELDS`, each optional) as `TextRequest`'s
    keyword arguments, checked; `error(message, field)` makes the API's own error."""
    from hxc.pool.policies import policy_names

    out: dict[str, Any] = {}
    for name in ("ttft_ms", "tpot_ms", "slo_ms"):
        value = doc.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise error(f"{name!r} must be a number of milliseconds above 0, not {json.dumps(value)[:40]}", name)
        out[name] = float(value)
    policy = doc.get("policy")
    if policy is not None:
        if policy not in policy_names():
            raise error(f"'policy' must be one of {', '.join(policy_names())}, not {json.dumps(policy)[:40]}", "policy")
        out["policy"] = policy
    precision = doc.get("precision")
    if precision is not None:
        allowed = [precision] if isinstance(precision, str) else precision
        if not isinstance(allowed, list) or not allowed or not all(isinstance(p, str) and 0 < len(p) <= 16 for p in allowed):
            raise error("'precision' must be a precision (\"int8\") or a non-empty list of them ([\"fp32\", \"int8\"])",
                        "precision")  # fmt: skip
        out["precision"] = tuple(dict.fromkeys(allowed))
    return out


def router_error(e: BaseException, model: str) -> ProtocolError:
    """A router's or worker's error as the status it answers with."""
    from hxc.pool.router import NoDeviceReady, Overloaded
    from hxc.pool.worker import WorkerFailed

    if isinstance(e, ProtocolError):
        return e
    if isinstance(e, Overloaded):
        return ProtocolError(f"model {model!r} is overloaded: {e}", 503, retry_after_s=e.retry_after_s)
    if isinstance(e, UsageError):
        return ProtocolError(f"model {model!r}: {e}", 400)
    if isinstance(e, (NoDeviceReady, WorkerFailed)):
        return ProtocolError(f"model {model!r}: {e}", 503, retry_after_s=getattr(e, "retry_after_s", 1.0))
    return ProtocolError(f"model {model!r}: generation failed: {e}", 500)

"""The language-model routes of `hxc serve`: the OpenAI API (`/v1/completions`,
`/v1/chat/completions`, `/v1/models`) and the KServe generate extension
(`/v2/models/{name}/generate`, `/generate_stream`). Thin: `openai.py` and
`generate_ext.py` parse and shape, `lm.py` generates; this module moves bytes, streams
server-sent events, answers errors in each API's own shape, and notices a client that
goes away (its sequence is cancelled on its device at once, streamed or not).

Every route runs after the guard (API keys, the body read in full and bounded), as
the KServe routes do. Streams are capped together (`max_streams`: 503 with
Retry-After beyond it); SIGTERM lets the streams in flight finish (uvicorn's drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import asdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hxc.errors import HxcError
from hxc.serve import generate_ext, openai
from hxc.serve.lm import Generation, start
from hxc.serve.models import ServedModel, ServeOptions
from hxc.serve.protocol import ProtocolError, error_body

log = logging.getLogger("hxc.serve")
ReadBody = Callable[[Request, int], Awaitable[bytes]]
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class _ClientGone(Exception):
    pass


def lm_routes(by_name: Mapping[str, ServedModel], options: ServeOptions, metrics: Any, read_body: ReadBody) -> list[Route]:
    created = int(time.time())
    streams = {"open": 0}

    def language_models() -> list[ServedModel]:
        return [m for m in by_name.values() if m.language_model is not None]

    def model_for(name: str, kserve: bool) -> ServedModel:
        model = by_name.get(name)
        if model is None:
            names = ", ".join(m.name for m in language_models()) or "none"
            if kserve:
                raise ProtocolError(f"unknown model {name!r}; this server has {', '.join(by_name) or 'none'}", 404)
            raise openai.OpenAIError(f"the model {name!r} does not exist; this server's language models: {names}", 404,
                                     param="model", code="model_not_found")  # fmt: skip
        if model.language_model is None:
            what = ("it takes tensors: POST /v2/models/{0}/infer" if kserve else "use the KServe endpoint POST /v2/models/{0}/infer")
            raise ProtocolError(f"model {name!r} is not a language model; {what.format(name)}", 400)
        return model

    def stream_slot() -> None:
        if options.max_streams is not None and streams["open"] >= options.max_streams:
            raise ProtocolError(f"{options.max_streams} streams are already open (--max-streams); retry", 503, retry_after_s=1.0)

    def count(model: ServedModel | None, endpoint: str, status: str, gen: Generation | None = None) -> None:
        # A request refused before its model was known counts under model "".
        metrics.lm_request(model.name if model is not None else "", endpoint, status, gen)

    async def whole(request: Request, gen: Generation, model: ServedModel, endpoint: str,
                    error: Callable[[ProtocolError], Response], body: Callable[[Any], Any]) -> Response:  # fmt: skip
        """A non-streamed answer in either API: the whole generation as `body(result)`, or
        the API's `error`; a client gone before the end cancels it (499)."""
        try:
            text = await _watching(request, _collect(gen))
        except _ClientGone:
            count(model, endpoint, "client_gone", gen)
            return Response(status_code=499)
        except ProtocolError as e:
            count(model, endpoint, str(e.status))
            return error(e)
        assert gen.result is not None and text == gen.result.text
        count(model, endpoint, "ok", gen)
        return JSONResponse(body(gen.result), headers=_routing_headers(gen))

    # --- OpenAI ------------------------------------------------------------------------

    async def list_models(request: Request) -> Response:
        return JSONResponse(openai.models_list([m.name for m in language_models()], created))

    async def get_model(request: Request) -> Response:
        try:
            model = model_for(request.path_params["model"], kserve=False)
        except ProtocolError as e:
            return _openai_error(e)
        return JSONResponse(openai.model_doc(model.name, created))

    async def completions(request: Request) -> Response:
        return await _openai(request, openai.parse_completion, "completions")

    async def chat_completions(request: Request) -> Response:
        return await _openai(request, openai.parse_chat, "chat")

    async def _openai(request: Request, parse: Callable[[bytes], openai.ParsedRequest], endpoint: str) -> Response:
        model = None
        try:
            parsed = parse(await read_body(request, options.max_body_bytes))
            model = model_for(parsed.model, kserve=False)
            if parsed.stream:
                stream_slot()
            gen = start(model, parsed.text, metrics)
        except ProtocolError as e:
            count(model, endpoint, str(e.status))
            return _openai_error(e)
        answer = openai.Response(parsed)
        if not parsed.stream:
            return await whole(request, gen, model, endpoint, _openai_error, answer.whole)

        async def events() -> AsyncIterator[bytes]:
            status = "client_gone"
            try:
                yield openai.sse(answer.chunk("", first=True))
                async for text in gen.pieces():
                    yield openai.sse(answer.chunk(text))
                result = gen.result
                assert result is not None
                yield openai.sse(answer.chunk(None, finish_reason=result.finish_reason))
                if parsed.include_usage:
                    yield openai.sse(answer.usage_chunk(result))
                yield openai.sse("[DONE]")
                status = "ok"
            except ProtocolError as e:
                status = str(e.status)
                yield openai.sse(openai.error_doc(e))
                yield openai.sse("[DONE]")
            finally:
                gen.close()
                count(model, endpoint, status, gen)

        return _EventStream(events(), streams, _routing_headers(gen))

    # --- KServe generate extension -------------------------------------------------------

    async def generate(request: Request) -> Response:
        return await _generate(request, stream=False)

    async def generate_stream(request: Request) -> Response:
        return await _generate(request, stream=True)

    async def _generate(request: Request, stream: bool) -> Response:
        endpoint = "generate_stream" if stream else "generate"
        model = None
        try:
            model = model_for(request.path_params["name"], kserve=True)
            version = request.path_params.get("version")
            if version is not None and version != model.version:
                raise ProtocolError(f"model {model.name!r} has no version {version!r}; it serves version {model.version}", 404)
            text_request, request_id = generate_ext.parse_generate(await read_body(request, options.max_body_bytes))
            if stream:
                stream_slot()
            gen = start(model, text_request, metrics)
        except ProtocolError as e:
            count(model, endpoint, str(e.status))
            return _kserve_error(e)
        name, version = model.name, model.version
        if not stream:
            return await whole(request, gen, model, endpoint, _kserve_error,
                               lambda result: generate_ext.response(name, version, result, request_id))

        async def events() -> AsyncIterator[bytes]:
            status = "client_gone"
            try:
                async for text in gen.pieces():
                    yield openai.sse(generate_ext.chunk(name, version, text, request_id))
                assert gen.result is not None
                yield openai.sse(generate_ext.chunk(name, version, "", request_id, gen.result))
                status = "ok"
            except ProtocolError as e:
                status = str(e.status)
                yield openai.sse({"error": str(e)})
            finally:
                gen.close()
                count(model, endpoint, status, gen)

        return _EventStream(events(), streams, _routing_headers(gen))

    # --- the routing debug view ------------------------------------------------------------

    async def routing(request: Request) -> Response:
        """How a hypothetical request would be routed now: every device's estimate and the
        arithmetic behind it (query: prompt_tokens, max_tokens, and the routing fields)."""
        try:
            model = model_for(request.path_params["name"], kserve=True)
            if model.router is None or not model.ready():
                raise ProtocolError(f"model {model.name!r} has no device ready", 503, retry_after_s=1.0)
            return JSONResponse(routing_view(model, request.query_params))
        except ProtocolError as e:
            return _kserve_error(e)

    v = "/versions/{version}"
    return [
        Route("/v2/models/{name}/routing", routing),
        Route("/v1/models", list_models), Route("/v1/models/{model:path}", get_model),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v2/models/{name}/generate", generate, methods=["POST"]),
        Route("/v2/models/{name}" + v + "/generate", generate, methods=["POST"]),
        Route("/v2/models/{name}/generate_stream", generate_stream, methods=["POST"]),
        Route("/v2/models/{name}" + v + "/generate_stream", generate_stream, methods=["POST"]),
    ]  # fmt: skip


def routing_view(model: ServedModel, query: Mapping[str, str]) -> dict[str, Any]:
    """The `/routing` document: the request as understood, and each device, best first."""
    from hxc.pool.lm_router import Targets
    from hxc.serve.lm import routing_fields

    def count(name: str, default: int) -> int:
        raw = query.get(name)
        if raw is None:
            return default
        if not raw.isdigit() or not 1 <= int(raw) <= 10**7:
            raise ProtocolError(f"query {name!r} must be a positive integer, not {raw[:40]!r}")
        return int(raw)

    lm = model.language_model
    prompt = count("prompt_tokens", 128)
    if prompt >= lm.max_context:
        raise ProtocolError(f"prompt_tokens {prompt}: the context holds {lm.max_context} tokens")
    wanted = count("max_tokens", 128)
    fields: dict[str, Any] = {}
    for name in ("ttft_ms", "tpot_ms", "slo_ms"):
        if name in query:
            try:
                fields[name] = float(query[name])
            except ValueError:
                raise ProtocolError(f"query {name!r} must be a number of milliseconds, not {query[name][:40]!r}") from None
    for name in ("policy", "precision"):
        if name in query:
            fields[name] = query[name].split(",") if name == "precision" else query[name]
    f = routing_fields(fields, lambda message, name: ProtocolError(f"query {message}"))
    targets = Targets(f.get("ttft_ms"), f.get("tpot_ms"), f.get("slo_ms"), f.get("policy"), f.get("precision"))
    router = model.router
    try:
        resolved = router.check(targets)  # type: ignore[attr-defined]
        choices = router.explain(prompt, wanted, targets)  # type: ignore[attr-defined]
    except HxcError as e:
        raise ProtocolError(f"model {model.name!r}: {e}") from None
    return {"model": model.name, "currency": router.currency,  # type: ignore[attr-defined]
            "request": {"prompt_tokens": prompt, "max_tokens": min(wanted, lm.max_context - prompt),
                        **{k: v for k, v in asdict(resolved).items()}},
            "devices": [_choice_doc(c) for c in choices]}  # fmt: skip


def _choice_doc(c: Any) -> dict[str, Any]:
    e, b = c.estimate, c.breakdown

    def ms(x: float | None) -> float | None:
        return None if x is None or not math.isfinite(x) else round(x, 3)

    doc = {"name": c.name, "device": c.device, "precision": c.precision, "rank": c.rank, "chosen": c.rank == 0,
           "eligible": c.eligible is None, "why_not": c.eligible, "meets_targets": c.meets,
           "ttft_ms": ms(e.ttft_ms), "tpot_ms": ms(e.tpot_ms), "finish_ms": ms(e.finish_ms),
           "kv_headroom_bytes": e.kv_headroom_bytes, "price_per_1k_tokens": e.price_per_unit,
           "measured": b is not None}  # fmt: skip
    if c.speed is not None:  # what the estimate reads: prompt tokens -> ms to the first token, batch -> ms per step
        doc["speed"] = {"prefill_ms": [[n, round(ms, 3)] for n, ms in c.speed.prefill],
                        "step_ms": [[b_, round(ms, 3)] for b_, ms in c.speed.step]}  # fmt: skip
    if b is not None:
        doc["arithmetic"] = {"slot_wait_ms": ms(b.slot_wait_ms), "prefill_ms": ms(b.prefill_ms),
                             "interleave_ms": ms(b.interleave_ms), "step_ms": ms(b.step_ms), "batch": b.batch,
                             "device_s": round(b.device_s, 6), "price_per_hour": b.price_per_hour}  # fmt: skip
    return doc


async def _collect(gen: Generation) -> str:
    return "".join([text async for text in gen.pieces()])


async def _watching(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, unless the client disconnects first: then cancel it (its
    generation is closed, freeing its slot) and raise _ClientGone."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request.receive))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, ProtocolError):
        await task
    raise _ClientGone


async def _disconnected(receive: Callable[[], Awaitable[dict]]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class _EventStream(Response):
    """A server-sent event stream that stops (and closes its events, cancelling their
    generation) as soon as the client disconnects, not at the next event it sends.
    Counted in `streams["open"]` while it runs."""

    def __init__(self, events: AsyncIterator[bytes], streams: dict[str, int], headers: Mapping[str, str]) -> None:
        # No Content-Length (Response's own init would declare 0): the body is streamed.
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"),
                            *((k.encode(), v.encode()) for k, v in {**SSE_HEADERS, **headers}.items())]  # fmt: skip
        self.events = events
        self.streams = streams
        streams["open"] += 1

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def stream() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        sending = asyncio.ensure_future(stream())
        watch = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({sending, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.streams["open"] -= 1
            for task in (sending, watch):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sending
            await self.events.aclose()  # type: ignore[attr-defined]


def _routing_headers(gen: Generation) -> dict[str, str]:
    """Where a request ran and whether it missed a target: at the end for a whole answer;
    for a stream, where it was routed and whether that was predicted to miss (its last
    event or usage says what happened)."""
    result = gen.result
    device = (result.device if result is not None else gen.device) or ""
    missed = result.slo_missed if result is not None else gen.seq.predicted_miss
    return {"x-hxc-device": device, "x-hxc-slo-missed": "true" if missed else "false"}


def _openai_error(e: ProtocolError) -> Response:
    return Response(openai.error_body(e), status_code=e.status, media_type="application/json", headers=_retry(e))


def _kserve_error(e: ProtocolError) -> Response:
    return Response(error_body(str(e)), status_code=e.status, media_type="application/json", headers=_retry(e))


def _retry(e: ProtocolError) -> dict[str, str] | None:
    retry = e.retry_after_s
    return {"Retry-After": str(math.ceil(retry) if math.isfinite(retry) else 1)} if retry is not None else None


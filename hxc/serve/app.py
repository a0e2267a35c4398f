"""The HTTP side of `hxc serve`: the KServe v2 / Open Inference Protocol REST routes on
Starlette. Requests are parsed and answered by `protocol.py`, routed by each model's
`Router`; this module only moves bytes, maps errors to statuses, and counts.

Every request first passes `guard.Guard` (API key, then the whole body, bounded in
size and time), so a route runs only for an authorised request whose body has
arrived, and takes a queue slot only then.

Every error is the protocol's `{"error": "..."}` with its status: 400 for a request
the protocol or the model refuses, 401 for a missing or wrong API key, 404 for an
unknown model, version or path, 408 for a body that did not arrive in time, 413 for
a body over the limit, 415 for an unknown content encoding, 503 (with Retry-After)
when the model's queue is full, bodies arriving fill their memory bound, or no device
is ready, 500 for a failure inside the server (logged with its traceback; the server
keeps serving).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
import zlib
from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import hxc
from hxc.errors import HxcError
from hxc.serve import generate_ext
from hxc.serve.guard import Guard, error_content
from hxc.serve.lm_routes import lm_routes
from hxc.serve.metrics import Metrics
from hxc.serve.models import ServedModel, ServeOptions, close_model, load_model
from hxc.serve.protocol import HEADER_LENGTH, ProtocolError, encode_infer, error_body, parse_infer, tensor_metadata

log = logging.getLogger("hxc.serve")
PLATFORM = "hxc"
EXTENSIONS = ["binary_tensor_data"]
# Bodies larger than this are parsed in a thread, so one big request does not stall the event loop.
THREAD_PARSE_BYTES = 256 * 1024


def create_app(models: Sequence[ServedModel], options: ServeOptions) -> Starlette:
    by_name = {m.name: m for m in models}
    metrics = Metrics(lambda: models)

    def lookup(request: Request) -> ServedModel:
        name = request.path_params["name"]
        model = by_name.get(name)
        if model is None:
            raise ProtocolError(f"unknown model {name!r}; this server has {', '.join(by_name) or 'none'}", 404)
        version = request.path_params.get("version")
        if version is not None and version != model.version:
            raise ProtocolError(f"model {name!r} has no version {version!r}; it serves version {model.version}", 404)
        return model

    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": PLATFORM, "version": hxc.__version__, "extensions": EXTENSIONS})

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        ok = bool(models) and all(m.ready() for m in models)
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def model_metadata(request: Request) -> Response:
        model = lookup(request)
        if model.language_model is not None:
            return JSONResponse(generate_ext.metadata(model.name, model.version, PLATFORM))
        return JSONResponse({"name": model.name, "versions": [model.version], "platform": PLATFORM,
                             **tensor_metadata(model.signature)})  # fmt: skip

    async def model_ready(request: Request) -> Response:
        model = lookup(request)
        ok = model.ready()
        return JSONResponse({"name": model.name, "ready": ok}, status_code=200 if ok else 503)

    async def model_config(request: Request) -> Response:
        # Triton's model configuration, for clients that ask (tritonclient.get_model_config).
        model = lookup(request)
        router = model.router
        if model.language_model is not None:  # text in, text out, streamed (Triton's "decoupled" models)
            return JSONResponse({"name": model.name, "platform": PLATFORM, "max_batch_size": 0,
                                 "model_transaction_policy": {"decoupled": True},
                                 "input": [{"name": "text_input", "data_type": "TYPE_STRING", "dims": [1]}],
                                 "output": [{"name": "text_output", "data_type": "TYPE_STRING", "dims": [-1]}]})  # fmt: skip
        batch = router.max_batch_size if router is not None and router.batching else 0  # type: ignore[attr-defined]
        meta = tensor_metadata(model.signature)
        strip = (lambda t: {"name": t["name"], "data_type": "TYPE_" + t["datatype"],
                            "dims": t["shape"][1:] if batch else t["shape"]})  # fmt: skip
        return JSONResponse({
            "name": model.name, "platform": PLATFORM, "max_batch_size": batch,
            "input": [strip(t) for t in meta["inputs"]], "output": [strip(t) for t in meta["outputs"]],
            **({"dynamic_batching": {"max_queue_delay_microseconds": int(options.max_queue_delay_ms * 1000)}} if batch else {}),
        })  # fmt: skip

    async def infer(request: Request) -> Response:
        t0 = time.perf_counter()
        name = request.path_params["name"]
        try:
            model = lookup(request)
            if model.language_model is not None:
                raise ProtocolError(f"model {model.name!r} is a language model: use POST /v2/models/{model.name}/generate or "
                                    "/generate_stream, or the OpenAI API (POST /v1/completions, /v1/chat/completions)")  # fmt: skip
            router = model.router
            if router is None or not model.ready():
                why = model.error or ("still loading" if not model.loaded.is_set() else _not_ready(model))
                raise ProtocolError(f"model {model.name!r} has no device ready: {why}", 503, retry_after_s=1.0)
            # The guard has read the whole body already (a stalled upload never gets
            # here), so a queue slot is held only by a request that has arrived.
            body = await _read_body(request, options.max_body_bytes)
            try:
                admission = router.admit()  # type: ignore[attr-defined]
            except HxcError as e:
                raise _router_error(e, metrics, model.name) from None
            try:
                header = request.headers.get(HEADER_LENGTH)
                if len(body) > THREAD_PARSE_BYTES:
                    parsed = await run_in_threadpool(parse_infer, body, header, model.signature)
                else:
                    parsed = parse_infer(body, header, model.signature)
                del body
                try:
                    future = router.submit(parsed.inputs, slo_ms=parsed.slo_ms, policy=parsed.policy,  # type: ignore[attr-defined]
                                           device=parsed.device, admission=admission)  # fmt: skip
                except HxcError as e:
                    raise _router_error(e, metrics, model.name) from None
            finally:
                admission.release()
            try:
                routed = await asyncio.wrap_future(future)
            except HxcError as e:
                raise _router_error(e, metrics, model.name) from None
            served = {"device": routed.device, "batch_rows": routed.batch_rows, "slo_missed": routed.slo_missed}
            content, headers = encode_infer(model.name, model.version, parsed, routed.outputs, model.signature, served)
        except ProtocolError as e:
            metrics.requests.labels(name if name in by_name else "", "", str(e.status)).inc()
            return _error(e)
        metrics.requests.labels(model.name, routed.device, "ok").inc()
        metrics.latency.labels(model.name).observe(time.perf_counter() - t0)
        metrics.queue.labels(model.name, routed.device).observe(routed.queue_ms / 1000)
        metrics.compute.labels(model.name, routed.device).observe(routed.compute_ms / 1000)
        if routed.slo_missed:
            metrics.slo_misses.labels(model.name, routed.device).inc()
        return Response(content, headers=headers)

    async def prometheus(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(await run_in_threadpool(generate_latest, metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        status = exc.status_code
        message = f"no route {request.method} {request.url.path}" if status in (404, 405) else str(exc.detail)
        return Response(error_content(request.url.path, status, message), status_code=status, media_type="application/json")

    async def protocol_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ProtocolError)
        return _error(exc)

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return Response(error_body(f"internal server error: {type(exc).__name__}: {str(exc)[:200]}"), status_code=500,
                        media_type="application/json")  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        # Load in the background: liveness answers at once, readiness once devices are up.
        def load_all() -> None:
            threads = [threading.Thread(target=load_model, args=(m, options, metrics.batch_done), daemon=True) for m in models]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            app.state.on_ready()

        threading.Thread(target=load_all, name="hxc-serve-load", daemon=True).start()
        try:
            yield
        finally:
            for m in models:
                m.loaded.wait(options.start_timeout_s + 10)
                close_model(m)

    v = "/versions/{version}"
    routes = [
        Route("/v2", server_metadata), Route("/v2/", server_metadata),
        Route("/v2/health/live", live), Route("/v2/health/ready", ready),
        Route("/v2/models/{name}", model_metadata), Route("/v2/models/{name}" + v, model_metadata),
        Route("/v2/models/{name}/ready", model_ready), Route("/v2/models/{name}" + v + "/ready", model_ready),
        Route("/v2/models/{name}/config", model_config), Route("/v2/models/{name}" + v + "/config", model_config),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}" + v + "/infer", infer, methods=["POST"]),
        Route("/metrics", prometheus),
        *lm_routes(by_name, options, metrics, _read_body),
    ]  # fmt: skip
    guard = Middleware(Guard, api_key_digests=options.api_key_digests, auth_health=options.auth_health,
                       open_metrics=options.open_metrics, max_body_bytes=options.max_body_bytes,
                       max_receiving_bytes=options.max_receiving_bytes, body_timeout_s=options.body_timeout_s,
                       on_refused=lambda reason: metrics.refused.labels(reason).inc(), gauge=metrics.receiving)  # fmt: skip
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[guard],
                    exception_handlers={HTTPException: http_error, ProtocolError: protocol_error, Exception: internal_error})  # fmt: skip
    app.state.metrics = metrics
    app.state.on_ready = lambda: None
    return app


def _error(e: ProtocolError) -> Response:
    retry = e.retry_after_s
    headers = {"Retry-After": str(math.ceil(retry) if math.isfinite(retry) else 1)} if retry is not None else None
    return Response(error_body(str(e)), status_code=e.status, media_type="application/json", headers=headers)


def _router_error(e: HxcError, metrics: Metrics, model: str) -> ProtocolError:
    from hxc.errors import UsageError
    from hxc.pool.router import NoDeviceReady, Overloaded
    from hxc.pool.worker import WorkerFailed

    if isinstance(e, Overloaded):
        metrics.shed.labels(model).inc()
        return ProtocolError(f"model {model!r} is overloaded: {e}", 503, retry_after_s=e.retry_after_s)
    if isinstance(e, UsageError):
        return ProtocolError(f"model {model!r}: {e}", 400)
    if isinstance(e, (NoDeviceReady, WorkerFailed)):
        return ProtocolError(f"model {model!r}: {e}", 503, retry_after_s=getattr(e, "retry_after_s", 1.0))
    return ProtocolError(f"model {model!r}: inference failed: {e}", 500)


def _not_ready(model: ServedModel) -> str:
    router = model.router
    if router is None:
        return "not loaded"
    return "; ".join(f"{s.name}: {s.health}" + (f" ({s.reason})" if s.reason else "") for s in router.states())  # type: ignore[attr-defined]


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, decoded, refusing anything over `limit` bytes (413), and
    compressed bodies that inflate beyond it. (The guard has received it already and
    checked its raw size; this is where it is inflated.)"""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProtocolError(f"the request body is {declared} bytes, more than the limit of {limit}", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(f"the request body is more than the limit of {limit} bytes", 413)
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ProtocolError(f"unsupported Content-Encoding {encoding[:40]!r}; use gzip, deflate or none", 415)
    inflater = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise ProtocolError(f"the {encoding} body is corrupt ({e})") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise ProtocolError(f"the request body inflates to more than the limit of {limit} bytes", 413)
    return out

"""What every HTTP request passes before a route sees it: a pure ASGI middleware.

In order:

1. **The API key**, when the server has any: `Authorization: Bearer KEY` or an
   `api-key: KEY` header, compared as SHA-256 digests in constant time (the server
   holds only the digests). A missing or wrong key is a 401 before anything else
   happens: no body read, no queue slot, no parsing. The health probes stay open
   unless `auth_health`; `/metrics` is closed unless `open_metrics`.
2. **The body, read in full before the route runs**, so a route takes a queue slot
   only for a request that has arrived, and a slow or stalled upload holds no slot.
   Bodies still arriving are bounded on their own: each by `max_body_bytes` (413,
   from Content-Length before reading and while reading) and by `body_timeout_s`
   from the end of its headers (408, connection closed); all of them together by
   `max_receiving_bytes` of what they hold in memory (503 with Retry-After, refused
   from Content-Length before reading when it cannot fit). A stalled upload holds
   only the bytes it sent, so stalled uploads cannot lock complete requests out.
3. A client that goes away mid-body is one debug line (no traceback: anyone could
   flood the log with them).

Errors take the shape of the protocol the path belongs to: KServe v2's
`{"error": "..."}`, or OpenAI's `{"error": {"message", "type", "param", "code"}}`
under `/v1/`. Keys never appear in a message or a log line.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from hxc.errors import UsageError

log = logging.getLogger("hxc.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HEALTH_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
METRICS_PATH = "/metrics"
OPENAI_PREFIX = "/v1/"
KEY_ENV = "HXC_API_KEY"
# Printable ASCII but space and comma: what a header carries as is and a list can split.
_KEY_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F)) - {","}


# --- keys -------------------------------------------------------------------------------------


def parse_keys(text: str, where: str) -> list[str]:
    """The keys in `text`: separated by commas or lines; blank lines and `#` comments
    ignored. The message of a bad key names its position, never the key."""
    keys = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for part in line.split(","):
            key = part.strip()
            if not key:
                continue
            if not set(key) <= _KEY_CHARS:
                raise UsageError(f"{where}: API key {len(keys) + 1} holds a character an HTTP header cannot carry "
                                 "(keys are printable ASCII without spaces or commas)")  # fmt: skip
            keys.append(key)
    return keys


def key_digests(keys: Iterable[str]) -> tuple[bytes, ...]:
    return tuple(sorted({_digest(k.encode()) for k in keys}))


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _offered_keys(headers: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    offered = []
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                offered.append(token.strip())
        elif name == b"api-key" and value.strip():
            offered.append(value.strip())
    return offered


def authorized(headers: Iterable[tuple[bytes, bytes]], digests: tuple[bytes, ...]) -> bool | None:
    """True for a valid key, False for a wrong one, None for none offered. Every
    offered key is compared with every digest, so the time taken does not depend on
    which key matched or how much of it did."""
    offered = _offered_keys(headers)
    if not offered:
        return None
    ok = False
    for key in offered:
        d = _digest(key)
        for want in digests:
            ok |= hmac.compare_digest(d, want)
    return ok


# --- error shapes -----------------------------------------------------------------------------


def error_content(path: str, status: int, message: str) -> bytes:
    """An error body in the shape of the protocol `path` belongs to."""
    if path.startswith(OPENAI_PREFIX) or path == OPENAI_PREFIX[:-1]:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
        code = {401: "invalid_api_key", 404: "not_found", 408: "timeout", 413: "request_too_large", 503: "overloaded"}.get(status)
        return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    return json.dumps({"error": message}).encode()


async def send_error(send: Send, path: str, status: int, message: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = error_content(path, status, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})  # fmt: skip
    await send({"type": "http.response.body", "body": body, "more_body": False})


# --- the middleware ---------------------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, status: int, reason: str, message: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.headers = status, reason, message, list(headers)


class _Gone(Exception):
    """The client disconnected before its body arrived."""


# Only a stalled body closes its connection: after any other refusal the HTTP layer
# reads and drops the rest of the body (the header timeout bounds how long), since
# closing with unread bytes resets the connection and the client may lose the answer.
_CLOSE = (b"connection", b"close")


class Guard:
    """The ASGI middleware (see the module's docstring). `on_refused(reason)` counts
    what it turned away (unauthorized, body_too_large, body_timeout, receiving_full,
    client_gone); `gauge`, if given, follows the bytes bodies still arriving hold."""

    def __init__(self, app: ASGIApp, *, api_key_digests: tuple[bytes, ...] = (), auth_health: bool = False,
                 open_metrics: bool = False, max_body_bytes: int = 64 * 1024**2, max_receiving_bytes: int = 256 * 1024**2,
                 body_timeout_s: float = 30.0, on_refused: Callable[[str], None] | None = None,
                 gauge: Any = None) -> None:  # fmt: skip
        self.app = app
        self.digests = api_key_digests
        self.open_paths = (frozenset() if auth_health else HEALTH_PATHS) | ({METRICS_PATH} if open_metrics else set())
        self.max_body = max_body_bytes
        self.max_receiving = max_receiving_bytes
        self.body_timeout_s = body_timeout_s
        self.on_refused = on_refused or (lambda reason: None)
        self.receiving = 0  # bytes held by bodies still arriving (one event loop: no lock)
        self.gauge = gauge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        try:
            if self.digests and path not in self.open_paths:
                ok = authorized(scope["headers"], self.digests)
                if not ok:
                    message = ("invalid API key" if ok is False else
                               "this server needs an API key: send 'Authorization: Bearer KEY' or an 'api-key: KEY' header")  # fmt: skip
                    raise _Refused(401, "unauthorized", message, [(b"www-authenticate", b"Bearer")])
            message = await self._body(scope, receive)
        except _Refused as e:
            self.on_refused(e.reason)
            await send_error(send, path, e.status, e.message, e.headers)
            return
        except _Gone:
            self.on_refused("client_gone")
            log.debug("hxc serve: the client of %s %s went away before its body arrived", scope["method"], path)
            return
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return message
            return await receive()  # after the body: only http.disconnect can come

        await self.app(scope, replay, send)

    async def _body(self, scope: Scope, receive: Receive) -> Message:
        """The request's whole body as one http.request message."""
        declared = _content_length(scope["headers"])
        if declared is not None and declared > self.max_body:
            raise _Refused(413, "body_too_large", f"the request body is {declared} bytes, more than the limit of {self.max_body}")
        if declared is not None and declared > 0 and self.receiving + declared > self.max_receiving:
            raise self._full()
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        held = 0
        chunks: list[bytes] = []
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _Gone
                    chunk = message.get("body", b"")
                    more = message.get("more_body", False)
                    if not chunks and not more:
                        if len(chunk) > self.max_body:
                            raise self._too_large()
                        return message  # all of it at once: nothing held across an await
                    if held + len(chunk) > self.max_body:
                        raise self._too_large()
                    if self.receiving + len(chunk) > self.max_receiving:
                        raise self._full()
                    chunks.append(chunk)
                    held += len(chunk)
                    self.receiving += len(chunk)
                    if self.gauge is not None:
                        self.gauge.inc(len(chunk))
                    if not more:
                        return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        except TimeoutError:
            raise _Refused(408, "body_timeout", f"the request body did not arrive within {self.body_timeout_s:g} s "
                           f"({held} bytes of {declared if declared is not None else 'a chunked body'} arrived)",
                           [_CLOSE]) from None  # fmt: skip
        finally:
            self.receiving -= held
            if held and self.gauge is not None:
                self.gauge.dec(held)

    def _too_large(self) -> _Refused:
        return _Refused(413, "body_too_large", f"the request body is more than the limit of {self.max_body} bytes")

    def _full(self) -> _Refused:
        mib = self.max_receiving / 1024**2
        return _Refused(503, "receiving_full", f"the server is overloaded: request bodies still arriving already hold "
                        f"close to its limit of {mib:g} MiB; retry", [(b"retry-after", b"1")])  # fmt: skip


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else None  # the HTTP layer refuses a malformed one
    return None

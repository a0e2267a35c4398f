"""Running the server: uvicorn on the Starlette app, until SIGTERM or Ctrl-C.

On SIGTERM (or SIGINT) uvicorn stops accepting connections, waits up to
`drain_timeout_s` for the requests in flight to be answered, then the app's lifespan
closes every model's router and worker processes, and the process exits 0.

Every phase of a connection is bounded in time: idle between requests by uvicorn's
keep-alive timeout, the headers of a request by `header_timeout_s` (uvicorn has no
such timeout: a connection that sends half a request line would stay open forever),
its body by the guard's `body_timeout_s`, its work by the router's deadlines.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hxc.errors import UsageError
from hxc.serve.models import ServedModel, ServeOptions

log = logging.getLogger("hxc.serve")


def serve(models: Sequence[ServedModel], options: ServeOptions, *, on_event: Callable[[dict], None] | None = None) -> None:
    """Serve until told to stop. `on_event` hears {"event": "listening" | "ready" | "stopped", ...}:
    listening once the port is bound, ready once every model's devices are up."""
    import uvicorn

    from hxc.serve.app import create_app

    tls = tls_context(options)  # a bad certificate is one line before anything binds or loads
    sock = listen(options.host, options.port)
    app = create_app(models, options)
    url = f"{'https' if tls else 'http'}://{options.host}:{options.port}"
    emit = on_event or (lambda e: None)
    app.state.on_ready = lambda: emit({"event": "ready", "url": url, "models": [_model_event(m) for m in models]})
    # Bodies are read before a queue slot is taken, bounded together by
    # max_receiving_bytes; admitted requests by max_queue x max_body_bytes; plus a socket
    # buffer per connection. uvicorn's own plain 503 for too many connections is only a
    # backstop, far above the queue limit, so clients normally see the protocol's error
    # with a Retry-After; the header and body timeouts keep stalled clients from
    # holding connections until it is reached.
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, timeout_graceful_shutdown=options.drain_timeout_s,
        limit_concurrency=max(1000, 2 * options.max_queue + 64), lifespan="on", timeout_keep_alive=30,
        http=_protocol_class(options.header_timeout_s),
        ssl_certfile=options.ssl_certfile, ssl_keyfile=options.ssl_keyfile, ssl_ca_certs=options.ssl_ca_certs,
        ssl_cert_reqs=ssl.CERT_REQUIRED if options.ssl_ca_certs else ssl.CERT_NONE,
    )  # fmt: skip
    server = uvicorn.Server(config)

    def stop(*_: object) -> None:
        server.should_exit = True

    # uvicorn captures SIGTERM/SIGINT while serving and raises them again once it has
    # drained; by then the work is done, so they must end the process quietly (exit 0).
    # A signal that arrives before uvicorn captures them (just after `listening`) must
    # still stop it: a handler that ignored it left the server running, deaf to Ctrl-C.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    listening = {"event": "listening", "url": url, "models": [m.name for m in models],
                 "auth": bool(options.api_key_digests), "tls": tls is not None}  # fmt: skip
    if not options.api_key_digests and not _loopback(sock):
        listening["warning"] = (f"listening on {options.host}, beyond this host, without an API key: anyone who can "
                                "reach the port can use the models (set HXC_API_KEY or --api-key-file)")  # fmt: skip
    emit(listening)
    server.run(sockets=[sock])
    emit({"event": "stopped", "url": url})


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything loads, so a port in use is one line."""
    from hxc.errors import HxcError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        # proto must be IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that
        # say so, and without it Nagle + delayed ACKs add ~40 ms to every keep-alive request.
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise HxcError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def tls_context(options: ServeOptions) -> ssl.SSLContext | None:
    """The server's TLS context, or None without --ssl-certfile; a missing or malformed
    certificate, key or CA file is a UsageError naming the flag (uvicorn would fail
    later, with a traceback, after the models had loaded)."""
    cert, key, ca = options.ssl_certfile, options.ssl_keyfile, options.ssl_ca_certs
    if cert is None:
        if key is not None or ca is not None:
            raise UsageError("--ssl-keyfile and --ssl-ca-certs need --ssl-certfile")
        return None
    for flag, path in (("--ssl-certfile", cert), ("--ssl-keyfile", key), ("--ssl-ca-certs", ca)):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{flag} {path}: no such file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A key protected by a passphrase would make OpenSSL prompt on the terminal:
        # answer with an empty one, so it fails here instead.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, OSError) as e:
        where = f"--ssl-certfile {cert}" + (f" / --ssl-keyfile {key}" if key is not None else "")
        raise UsageError(f"{where}: not a PEM certificate and its unencrypted private key ({_ssl_reason(e)})") from None
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as e:
            raise UsageError(f"--ssl-ca-certs {ca}: not PEM CA certificates ({_ssl_reason(e)})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _ssl_reason(e: Exception) -> str:
    reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
    return str(reason).replace("_", " ").lower()[:120]


def _loopback(sock: socket.socket) -> bool:
    try:
        return ipaddress.ip_address(sock.getsockname()[0]).is_loopback
    except ValueError:
        return False


def _protocol_class(header_timeout_s: float) -> type:
    """uvicorn's HTTP/1.1 protocol (h11 or httptools, whichever it picks), closing a
    connection whose next request's headers have not arrived `header_timeout_s` after
    its first byte, or after its last response while an unread body still drains."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class Protocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _header_timer = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self._between_requests():
                self._arm()
            super().data_received(data)
            if self._header_timer is not None and not self._between_requests():
                self._header_timer.cancel()
                self._header_timer = None

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout_s, self._expired)

        def _expired(self) -> None:
            self._header_timer = None
            if self._between_requests() and not self.transport.is_closing():
                log.debug("hxc serve: closing a connection whose request headers did not arrive within %g s", header_timeout_s)
                self.transport.close()

    return Protocol


def _model_event(m: ServedModel) -> dict:
    router = m.router
    devices = [{"device": s.name, "health": s.health, "reason": s.reason} for s in router.states()] if router else []  # type: ignore[attr-defined]
    return {"name": m.name, "bundle": str(m.bundle), "ready": m.ready(), "error": m.error, "devices": devices}


def print_event(as_json: bool) -> Callable[[dict], None]:
    def emit(event: dict) -> None:
        if "warning" in event:
            sys.stderr.write(f"hxc serve: warning: {event['warning']}\n")
            sys.stderr.flush()
        if as_json:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()
            return
        kind = event["event"]
        if kind == "listening":
            auth = "API keys" if event.get("auth") else "no API key"
            sys.stderr.write(f"hxc serve: listening on {event['url']} ({', '.join(event['models'])}; {auth}); loading devices...\n")
        elif kind == "ready":
            for m in event["models"]:
                if m["error"]:
                    sys.stderr.write(f"hxc serve: model {m['name']} failed to load: {m['error']}\n")
                else:
                    devices = ", ".join(f"{d['device']} ({d['health']})" for d in m["devices"])
                    sys.stderr.write(f"hxc serve: model {m['name']} ready on {devices}\n")
        elif kind == "stopped":
            sys.stderr.write("hxc serve: drained and stopped\n")
        sys.stderr.flush()

    return emit

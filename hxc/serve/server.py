"""Running the server: uvicorn on the Starlette app, until SIGTERM or Ctrl-C.

On SIGTERM (or SIGINT) uvicorn stops accepting connections, waits up to
`drain_timeout_s` for the requests in flight to be answered, then the app's lifespan
closes every model's router and worker processes, and the process exits 0.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
from collections.abc import Callable, Sequence

from hxc.serve.models import ServedModel, ServeOptions


def serve(models: Sequence[ServedModel], options: ServeOptions, *, on_event: Callable[[dict], None] | None = None) -> None:
    """Serve until told to stop. `on_event` hears {"event": "listening" | "ready" | "stopped", ...}:
    listening once the port is bound, ready once every model's devices are up."""
    import uvicorn

    from hxc.serve.app import create_app

    sock = listen(options.host, options.port)
    app = create_app(models, options)
    url = f"http://{options.host}:{options.port}"
    emit = on_event or (lambda e: None)
    app.state.on_ready = lambda: emit({"event": "ready", "url": url, "models": [_model_event(m) for m in models]})
    # Only admitted requests have their bodies read (the rest are shed first), so memory
    # is bounded by max_queue x max_body_bytes plus a socket buffer per connection;
    # uvicorn's own plain 503 for too many connections is only a backstop, far above the
    # queue limit, so clients normally see the protocol's error with a Retry-After.
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, timeout_graceful_shutdown=options.drain_timeout_s,
        limit_concurrency=max(1000, 2 * options.max_queue + 64), lifespan="on", timeout_keep_alive=30,
    )  # fmt: skip
    server = uvicorn.Server(config)
    # uvicorn captures SIGTERM/SIGINT while serving and raises them again once it has
    # drained; by then the work is done, so they must end the process quietly (exit 0).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    emit({"event": "listening", "url": url, "models": [m.name for m in models]})
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


def _model_event(m: ServedModel) -> dict:
    router = m.router
    devices = [{"device": s.name, "health": s.health, "reason": s.reason} for s in router.states()] if router else []  # type: ignore[attr-defined]
    return {"name": m.name, "bundle": str(m.bundle), "ready": m.ready(), "error": m.error, "devices": devices}


def print_event(as_json: bool) -> Callable[[dict], None]:
    def emit(event: dict) -> None:
        if as_json:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()
            return
        kind = event["event"]
        if kind == "listening":
            sys.stderr.write(f"hxc serve: listening on {event['url']} ({', '.join(event['models'])}); loading devices...\n")
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

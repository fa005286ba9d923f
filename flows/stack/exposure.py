"""Who may talk to the stack's servers: loopback only, own Host and Origin only.

Both servers bind 127.0.0.1 and answer only requests whose ``Host`` names this machine's loopback address
and port, and whose ``Origin`` (when sent) is the server's own. MLflow does that itself (``--allowed-hosts``,
``--cors-allowed-origins``); Prefect has no such setting, so its app is served through
:class:`HostOriginGuard` (:func:`serve_prefect`, run as ``python -m forgeline.flows.stack serve-prefect PORT``)
instead of ``prefect server start``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"


def loopback_hosts(port: int) -> list[str]:
    """``Host`` header values the stack's servers accept: their own loopback address and port."""
    return [f"{HOST}:{port}", f"localhost:{port}"]


def loopback_origins(port: int) -> list[str]:
    """``Origin`` header values the stack's servers accept: pages they serve themselves."""
    return [f"http://{host}" for host in loopback_hosts(port)]


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class HostOriginGuard:
    """ASGI middleware: 403 for a request whose ``Host`` is not allowed or whose ``Origin`` is foreign.

    The ``Host`` check defeats DNS rebinding (a page on ``evil.example`` whose name resolves to
    127.0.0.1); the ``Origin`` check refuses cross-site requests from a browser, reads included, where CORS
    alone would still let the request through and only hide the answer. Requests without ``Origin``
    (Python clients, workers, curl) pass on ``Host`` alone. Websocket handshakes get the same checks.
    """

    def __init__(self, app: Any, hosts: Iterable[str], origins: Iterable[str]) -> None:
        self.app = app
        self.hosts = frozenset(h.lower() for h in hosts)
        self.origins = frozenset(o.lower().rstrip("/") for o in origins)

    def refusal(self, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
        """Why a request with these headers is refused, or ``None`` when it may pass."""
        host = origin = None
        for name, value in headers:
            if name.lower() == b"host":
                host = value.decode("latin-1").strip().lower()
            elif name.lower() == b"origin":
                origin = value.decode("latin-1").strip().lower().rstrip("/")
        if host not in self.hosts:
            return f"Host {host!r} is not allowed (this server answers only {', '.join(sorted(self.hosts))})"
        if origin is not None and origin not in self.origins:
            return f"Origin {origin!r} is not allowed"
        return None

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan: the server's start-up and shutdown
            return
        reason = self.refusal(scope.get("headers") or [])
        if reason is None:
            await self.app(scope, receive, send)
            return
        logger.warning("refused %s %s: %s", scope["type"], scope.get("path", ""), reason)
        if scope["type"] == "websocket":
            await receive()  # websocket.connect; closing before accepting answers the handshake with 403
            await send({"type": "websocket.close", "code": 1008})
            return
        body = f"forbidden: {reason}\n".encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 403, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def serve_prefect(port: int) -> None:
    """Run the Prefect server (API, UI and services, as ``prefect server start`` does) behind the guard.

    Prefect settings (database, CORS, logging) come from the environment :func:`start_stack` prepares.
    """
    import uvicorn
    from prefect.server.api.server import create_app
    from prefect.settings import (
        PREFECT_SERVER_API_KEEPALIVE_TIMEOUT,
        PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL,
        PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT,
        PREFECT_SERVER_LOGGING_LEVEL,
    )

    app = HostOriginGuard(create_app(final=True), loopback_hosts(port), loopback_origins(port))
    uvicorn.run(
        app,
        host=HOST,
        port=port,
        timeout_keep_alive=PREFECT_SERVER_API_KEEPALIVE_TIMEOUT.value(),
        ws_ping_interval=PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL.value(),
        ws_ping_timeout=PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT.value(),
        log_level=str(PREFECT_SERVER_LOGGING_LEVEL.value()).lower(),
    )


def main(argv: list[str]) -> None:
    """``python -m forgeline.flows.stack serve-prefect PORT``: how the stack runs its Prefect server.

    Raises:
        SystemExit: the arguments are not ``serve-prefect PORT``.
    """
    if len(argv) != 2 or argv[0] != "serve-prefect" or not argv[1].isdigit():
        raise SystemExit("usage: python -m forgeline.flows.stack serve-prefect PORT")
    serve_prefect(int(argv[1]))

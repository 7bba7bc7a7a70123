"""The worker's own HTTP endpoint (GENQ_WORKER_METRICS_PORT): `/metrics` for Prometheus,
`/healthz` (liveness: the watchdog sees nothing wrong) and `/readyz` (readiness: connected to
Redis, its preloaded models loaded, not shutting down) for orchestrators and load tools.

Served from a thread with the standard library, beside prometheus-client's WSGI app, so it
answers even while the event loop is busy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from prometheus_client import make_wsgi_app

# Why the worker is not live, or not ready; None when it is.
Check = Callable[[], str | None]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would drown the worker's log."""


def probe_app(live: Check, ready: Check) -> Callable[..., Iterable[bytes]]:
    metrics = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        check = {"/healthz": live, "/readyz": ready}.get(path)
        if check is None:
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        problem = check()
        status = "200 OK" if problem is None else "503 Service Unavailable"
        body = orjson.dumps({"status": "ok" if problem is None else problem})
        start_response(status, [("Content-Type", "application/json")])
        return [body]

    return app


def serve_probes(port: int, live: Check, ready: Check) -> None:
    server = make_server(
        "", port, probe_app(live, ready), server_class=_Server, handler_class=_QuietHandler
    )
    threading.Thread(target=server.serve_forever, name="genq-probes", daemon=True).start()

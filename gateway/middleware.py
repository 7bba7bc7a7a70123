"""ASGI middleware: request-body size limit and access logging."""

from __future__ import annotations

import logging
import time
import uuid

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import error_body

logger = logging.getLogger("genq.access")


class BodyLimitMiddleware:
    """Refuses a declared body above `max_bytes` with 413 before reading it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                body = orjson.dumps(
                    error_body(
                        "payload_too_large",
                        f"request body over {self.max_bytes} bytes (GENQ_MAX_BODY_BYTES)",
                    )
                )
                await send(
                    {
                        "type": "http.response.start",
                        "status": 413,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class AccessLogMiddleware:
    """One structured log line per request, tagged with an `X-Request-ID` (echoed back)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
                logger.info(
                    "%s %s %s",
                    scope["method"],
                    scope["path"],
                    message["status"],
                    extra={
                        "request_id": request_id,
                        "status": message["status"],
                        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                    },
                )
            await send(message)

        await self.app(scope, receive, send_wrapper)

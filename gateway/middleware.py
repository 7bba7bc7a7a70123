"""ASGI middleware: request ids and access logging."""

from __future__ import annotations

import logging
import re
import time
import uuid

from opentelemetry import trace
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common import logs

logger = logging.getLogger("genq.access")

# Printable ASCII without spaces, as long as a UUID with room to spare.
_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")


class AccessLogMiddleware:
    """Tags every log line of a request with its request id (the client's `X-Request-ID`, or a
    new one), echoes it back, and writes one access line per request: method, route, status,
    duration, and the job it concerned, if any."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(dict(scope["headers"]).get(b"x-request-id"))
        logs.bind(request_id=request_id)
        trace.get_current_span().set_attribute("genq.request_id", request_id)
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
                        "status": message["status"],
                        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                    },
                )
            await send(message)

        await self.app(scope, receive, send_wrapper)


def _request_id(header: bytes | None) -> str:
    """The client's id if it is a plain token (it goes into every log line), else a new one."""
    if header is not None and _REQUEST_ID.fullmatch(header):
        return header.decode("ascii")
    return uuid.uuid4().hex

"""HTTP hardening around the routes: the Host check, security headers and rate-limit headers.

The body size limit is FastAPI's own (`max_body_size`), counted as the bytes arrive, chunked
bodies included; `DeclaredBodyLimitMiddleware` answers a body declared too large in the error
envelope before Starlette would (in plain text). CORS is Starlette's `CORSMiddleware`.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.settings import Settings
from gateway.auth import Caller, is_loopback
from gateway.errors import count_rejection, error_response
from gateway.services.ratelimit import rate_limit_headers

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

# Every answer: not to be sniffed, framed, cached, or followed by a Referer.
_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
# JSON and event streams load nothing; the interactive docs load Swagger UI from a CDN.
_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
_DOCS = ("/docs", "/redoc", "/openapi.json")


def allowed_hosts(settings: Settings) -> list[str]:
    """GENQ_ALLOWED_HOSTS, or the loopback names on a loopback bind (a page on another site
    that rebinds its name to 127.0.0.1 sends its own name as Host), or any host."""
    if settings.allowed_hosts is not None:
        return [h.lower() for h in settings.allowed_hosts]
    return list(LOOPBACK_HOSTS) if is_loopback(settings.host) else ["*"]


def _host_name(value: str) -> str:
    """The name of a Host header, without its port: `[::1]:8000` is `::1`."""
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _host_allowed(host: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        if pattern == "*" or host == pattern:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
    return False


class HostCheckMiddleware:
    """Refuses a request whose Host is not an allowed name (DNS rebinding), in the one error
    envelope; Starlette's `TrustedHostMiddleware` answers in plain text."""

    def __init__(self, app: ASGIApp, hosts: list[str]) -> None:
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or "*" in self.hosts:
            await self.app(scope, receive, send)
            return
        raw = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if not _host_allowed(_host_name(raw.strip().lower()), self.hosts):
            count_rejection("host")
            response = error_response(
                400,
                "host_not_allowed",
                "this gateway does not answer for that Host (GENQ_ALLOWED_HOSTS)",
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class DeclaredBodyLimitMiddleware:
    """413 for a `Content-Length` over `max_bytes`, before a byte of the body is read."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                count_rejection("body_too_large")
                response = error_response(413, "payload_too_large", body_limit(self.max_bytes))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def body_limit(max_bytes: object) -> str:
    return f"request body over {max_bytes} bytes (GENQ_MAX_BODY_BYTES)"


class ResponseHeadersMiddleware:
    """Security headers on every answer, and the rate-limit headers of what the request spent
    (its `Caller`, kept on the request by authentication), before the first byte of a body,
    a stream's included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        docs = scope["path"].startswith(_DOCS)

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                headers += [h for h in _HEADERS if h[0] not in names]
                if not docs:
                    headers.append(_CSP)
                if b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                caller = scope.get("state", {}).get("caller")
                if isinstance(caller, Caller):
                    headers += rate_limit_headers(caller)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_wrapper)

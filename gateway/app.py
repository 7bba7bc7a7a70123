"""The FastAPI application."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from starlette.middleware.cors import CORSMiddleware

from common import tracing
from common.settings import Settings
from gateway.deps import Services
from gateway.drain import Drain
from gateway.errors import install_error_handlers
from gateway.metrics import MetricsMiddleware
from gateway.middleware import AccessLogMiddleware
from gateway.openai import router as openai
from gateway.openai import tokenize
from gateway.routes import admin, generate, health, jobs, models
from gateway.security import (
    DeclaredBodyLimitMiddleware,
    HostCheckMiddleware,
    ResponseHeadersMiddleware,
    allowed_hosts,
)

# What browsers may send and read across origins.
CORS_REQUEST_HEADERS = [
    "Authorization",
    "X-API-Key",
    "Content-Type",
    "Idempotency-Key",
    "Last-Event-ID",
    "X-Request-ID",
]
CORS_RESPONSE_HEADERS = [
    "Location",
    "Retry-After",
    "RateLimit",
    "RateLimit-Policy",
    "X-Request-ID",
    "X-Genq-Job-Id",
]


def create_app(settings: Settings, drain: Drain | None = None) -> FastAPI:
    """`drain` is started by the server when it is told to stop (see `gateway.main`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = Services.build(settings, drain or Drain())
        app.state.services = services
        pools = services.router.source.get
        reaping = asyncio.create_task(
            services.reaper.sweep_forever(lambda: pools().pools(), settings.worker_heartbeat_s)
        )
        probing = asyncio.create_task(services.probe.run())
        yield
        probing.cancel()
        reaping.cancel()
        await services.aclose()

    app = FastAPI(
        title="genq",
        summary="Queue-backed text generation with transformer language models.",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # The last added runs first: hosts are checked before CORS, and every answer gets the
    # security headers.
    app.add_middleware(ResponseHeadersMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=settings.cors_allow_credentials,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=CORS_REQUEST_HEADERS,
            expose_headers=CORS_RESPONSE_HEADERS,
            max_age=600,
        )
    app.add_middleware(DeclaredBodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(HostCheckMiddleware, hosts=allowed_hosts(settings))
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(AccessLogMiddleware)
    routers = (jobs, generate, openai, tokenize, models, admin, health)
    for router in (module.router for module in routers):
        # Counted as the bytes arrive: a chunked body over it is refused before it is read.
        # Per route, inside the middleware, so that the 413 goes through the error handlers.
        app.include_router(router, max_body_size=settings.max_body_bytes)
    provider = tracing.provider()
    if provider is not None:
        # A server span per request, named by route template, continuing a client's
        # `traceparent`; probes and scrapes would only add noise.
        FastAPIInstrumentor.instrument_app(
            app,
            tracer_provider=provider,
            excluded_urls="/healthz,/readyz,/health,/metrics",
            exclude_spans=["receive", "send"],  # one per SSE event otherwise
        )
    return app

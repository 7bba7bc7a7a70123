"""The FastAPI application."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

from common import tracing
from common.settings import Settings
from gateway.deps import Services
from gateway.drain import Drain
from gateway.errors import install_error_handlers
from gateway.metrics import MetricsMiddleware
from gateway.middleware import AccessLogMiddleware, BodyLimitMiddleware
from gateway.routes import admin, generate, health, jobs, models, openai


def create_app(settings: Settings, drain: Drain | None = None) -> FastAPI:
    """`drain` is started by the server when it is told to stop (see `gateway.main`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = Services.build(settings, drain or Drain())
        app.state.services = services
        pools = services.models.source.get
        reaping = asyncio.create_task(
            services.reaper.sweep_forever(lambda: pools().pools(), settings.worker_heartbeat_s)
        )
        yield
        reaping.cancel()
        await services.aclose()

    app = FastAPI(
        title="genq",
        summary="Queue-backed text generation with transformer language models.",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(AccessLogMiddleware)
    routers = (jobs, generate, openai, models, admin, health)
    for router in (module.router for module in routers):
        app.include_router(router)
    provider = tracing.provider()
    if provider is not None:
        # A server span per request, named by route template, continuing a client's
        # `traceparent`; probes and scrapes would only add noise.
        FastAPIInstrumentor.instrument_app(
            app,
            tracer_provider=provider,
            excluded_urls="/healthz,/readyz,/metrics",
            exclude_spans=["receive", "send"],  # one per SSE event otherwise
        )
    return app

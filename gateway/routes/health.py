"""Probes and Prometheus exposition."""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from redis.exceptions import RedisError

from common.schemas import ErrorBody
from gateway import metrics
from gateway.deps import ServicesDep
from gateway.errors import ShuttingDown, Unavailable
from gateway.security import StrictJSONRoute

router = APIRouter(route_class=StrictJSONRoute, tags=["health"])


class Health(BaseModel):
    status: str


@router.get("/healthz")
async def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@router.get("/readyz", responses={503: {"model": ErrorBody}})
async def readyz(services: ServicesDep) -> Health:
    """Readiness: not shutting down, and Redis answers a PING (within the command timeout, or at
    once while the circuit breaker is open)."""
    if services.drain.started:
        raise ShuttingDown("draining: this gateway is shutting down", retry_after_s=1)
    try:
        await services.redis.ping()
    except (RedisError, OSError) as e:
        # Open to anyone: it says what is wrong, never where Redis is or what it answered.
        raise Unavailable("redis unreachable", retry_after_s=1) from e
    return Health(status="ready")


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def prometheus_metrics(services: ServicesDep) -> Response:
    """Prometheus exposition; queue gauges are refreshed at each scrape."""
    # Scrapes still answer while Redis is down; the gauges keep their last value.
    with contextlib.suppress(RedisError, OSError):
        metrics.record_queue_stats(await services.queue.stats())
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

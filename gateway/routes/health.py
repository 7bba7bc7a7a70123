"""Probes and Prometheus exposition."""

from __future__ import annotations

from fastapi import APIRouter, Response
from pydantic import BaseModel
from redis.exceptions import RedisError

from gateway import metrics
from gateway.deps import ServicesDep
from gateway.errors import ShuttingDown, Unavailable
from gateway.routes.common import StrictJSONRoute
from gateway.schemas import ErrorBody

router = APIRouter(route_class=StrictJSONRoute, tags=["health"])


class Health(BaseModel):
    status: str


@router.get("/healthz")
async def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@router.get("/readyz", responses={503: {"model": ErrorBody}})
@router.get("/health", responses={503: {"model": ErrorBody}})
async def readyz(services: ServicesDep) -> Health:
    """Readiness: not shutting down, and Redis answers a PING (within the command timeout, or at
    once while the circuit breaker is open). `/health` is the same: the route vLLM and TGI
    serve, which load generators and balancers probe before they start."""
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
    # Scrapes still answer while Redis is down: the queue gauges keep their last value, and
    # genq_redis_up says they are stale.
    try:
        metrics.record_queue_stats(await services.queue.stats())
    except (RedisError, OSError):
        metrics.REDIS_UP.set(0)
    else:
        metrics.REDIS_UP.set(1)
    body, media_type = metrics.exposition()
    return Response(body, media_type=media_type)

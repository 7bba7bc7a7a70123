"""Gateway Prometheus metrics (`genq_` prefix) and the middleware that feeds the HTTP ones."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.schemas import QueueStats

HTTP_REQUESTS = Counter(
    "genq_http_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "genq_http_request_duration_seconds",
    "Time to the response headers",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
SUBMITTED = Counter("genq_jobs_submitted_total", "Jobs accepted", ["model"])
CACHE_HITS = Counter(
    "genq_cache_hits_total", "Requests served by an identical running or finished job"
)
REJECTED = Counter("genq_jobs_rejected_total", "Submissions refused", ["reason"])
RATE_LIMITER_BYPASSED = Counter(
    "genq_rate_limiter_bypassed_total",
    "Submissions let through unlimited because the limiter could not reach Redis "
    "(GENQ_RATE_LIMIT_FAIL_OPEN)",
)
QUEUE_DEPTH = Gauge("genq_queue_depth", "Jobs waiting in a pool's queue", ["pool"])
WORKERS_ALIVE = Gauge("genq_workers_alive", "Workers heartbeating in a pool", ["pool"])
REDIS_BREAKER_OPEN = Gauge(
    "genq_redis_breaker_open", "1 while the Redis circuit breaker is open (answering 503)"
)


def record_queue_stats(stats: QueueStats) -> None:
    for pool in stats.pools:
        QUEUE_DEPTH.labels(pool.pool).set(pool.depth)
        WORKERS_ALIVE.labels(pool.pool).set(pool.workers_alive)


class MetricsMiddleware:
    """Counts every request by route template (not raw path, which would explode cardinality)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                route = scope.get("route")
                path = getattr(route, "path", "unmatched")
                HTTP_LATENCY.labels(scope["method"], path).observe(time.perf_counter() - started)
                HTTP_REQUESTS.labels(scope["method"], path, str(status)).inc()
            await send(message)

        await self.app(scope, receive, send_wrapper)

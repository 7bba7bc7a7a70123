"""Gateway Prometheus metrics (`genq_` prefix) and the middleware that feeds the HTTP ones.

With several uvicorn processes (GENQ_GATEWAY_PROCESSES > 1) the values live in
prometheus-client's multiprocess files and `/metrics` merges them (`exposition`): counters and
histograms add up, gauges say how they combine (`multiprocess_mode`). Labels are route
templates, statuses, fixed reasons, Redis command names, pools and `name@version` from the
registry: never a client's input.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.schemas import QueueStats

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

HTTP_REQUESTS = Counter(
    "genq_http_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "genq_http_request_duration_seconds",
    "Time to the response headers",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
SUBMITTED = Counter("genq_jobs_submitted_total", "Jobs accepted", ["pool", "model"])
CACHE_HITS = Counter(
    "genq_cache_hits_total", "Requests served by an identical running or finished job"
)
REJECTED = Counter(
    "genq_requests_rejected_total",
    "Requests refused before any work, by reason: queue_full, requests_per_minute, "
    "tokens_per_minute, concurrent, unauthorized, forbidden, validation, body_too_large, host",
    ["reason"],
)
RATE_LIMITER_BYPASSED = Counter(
    "genq_rate_limiter_bypassed_total",
    "Submissions let through unlimited because the limiter could not reach Redis "
    "(GENQ_RATE_LIMIT_FAIL_OPEN)",
)
SSE_STREAMS = Gauge(
    "genq_sse_streams_open", "Event streams being served", multiprocess_mode="livesum"
)
BREAKER_STATE = Gauge(
    "genq_redis_breaker_state",
    "Gateway processes whose Redis circuit breaker is in this state (closed, open, half_open)",
    ["state"],
    multiprocess_mode="livesum",
)
REDIS_PROBE_FAILURES = Counter(
    "genq_redis_probe_failures_total",
    "PINGs of the gateway's Redis probe left unanswered for GENQ_REDIS_PROBE_TIMEOUT_S; each "
    "opens the circuit breaker, or keeps it open",
)
REDIS_LATENCY = Histogram(
    "genq_redis_command_duration_seconds",
    "Redis commands and pipelines of the gateway, from sending to the reply (blocking event "
    "reads excluded)",
    ["command"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
# Read from Redis at each scrape; every gateway reports the same figures (take the max).
QUEUE_DEPTH = Gauge(
    "genq_queue_depth",
    "Jobs in a pool's queue, due or deferred, running ones included",
    ["pool"],
    multiprocess_mode="mostrecent",
)
QUEUE_READY = Gauge(
    "genq_queue_ready_jobs",
    "Jobs of a pool's queue due to run now (running ones included)",
    ["pool"],
    multiprocess_mode="mostrecent",
)
QUEUE_RUNNING = Gauge(
    "genq_queue_running_jobs",
    "Jobs the pool's live workers hold",
    ["pool"],
    multiprocess_mode="mostrecent",
)
QUEUE_OLDEST_AGE = Gauge(
    "genq_queue_oldest_age_seconds",
    "Age of the job at the head of a pool's queue (0 when empty)",
    ["pool"],
    multiprocess_mode="mostrecent",
)
REDIS_UP = Gauge(
    "genq_redis_up",
    "1 if the last scrape read the queue statistics from Redis, 0 if Redis failed it",
    multiprocess_mode="mostrecent",
)
WORKERS_ALIVE = Gauge(
    "genq_workers_alive",
    "Workers heartbeating in a pool",
    ["pool"],
    multiprocess_mode="mostrecent",
)

BREAKER_STATES = {"closed": "closed", "open": "open", "half-open": "half_open"}
# Any other method a client sends is counted as "other": labels never take a client's words.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def record_queue_stats(stats: QueueStats) -> None:
    for pool in stats.pools:
        QUEUE_DEPTH.labels(pool.pool).set(pool.depth)
        QUEUE_READY.labels(pool.pool).set(pool.ready)
        QUEUE_RUNNING.labels(pool.pool).set(pool.running)
        QUEUE_OLDEST_AGE.labels(pool.pool).set(pool.oldest_age_s or 0.0)
        WORKERS_ALIVE.labels(pool.pool).set(pool.workers_alive)


def record_breaker_state(state: str) -> None:
    """`state` is pybreaker's name of the new state."""
    for name, label in BREAKER_STATES.items():
        BREAKER_STATE.labels(label).set(1 if name == state else 0)


@contextmanager
def redis_command(name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        REDIS_LATENCY.labels(name).observe(time.perf_counter() - started)


def exposition() -> tuple[bytes, str]:
    """This process's metrics, or every gateway process's in multiprocess mode."""
    directory = os.environ.get(MULTIPROC_DIR_VARIABLE)
    if not directory:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST


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
                method = scope["method"] if scope["method"] in _METHODS else "other"
                HTTP_LATENCY.labels(method, path).observe(time.perf_counter() - started)
                HTTP_REQUESTS.labels(method, path, str(status)).inc()
            await send(message)

        await self.app(scope, receive, send_wrapper)

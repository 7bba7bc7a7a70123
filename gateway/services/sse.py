"""A job's event stream as Server-Sent Events."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse, ServerSentEvent

from common.settings import Settings
from gateway import metrics
from gateway.errors import ApiError, ShuttingDown, error_body, map_exception
from gateway.services.jobs import JobService

logger = logging.getLogger(__name__)


def sse_response(
    events: AsyncIterator[ServerSentEvent],
    settings: Settings,
    headers: Mapping[str, str] | None = None,
) -> EventSourceResponse:
    # On SIGTERM the stream ends itself (the drain) with a resumable ending; the grace keeps
    # sse-starlette from cutting it before that ending is sent.
    return EventSourceResponse(
        _counted(events),
        headers=headers,
        ping=int(settings.sse_ping_s),
        shutdown_grace_period=settings.shutdown_grace_s,
    )


async def _counted(events: AsyncIterator[ServerSentEvent]) -> AsyncIterator[ServerSentEvent]:
    """`events`, counted in `genq_sse_streams_open` while they are being sent."""
    metrics.SSE_STREAMS.inc()
    try:
        async for event in events:
            yield event
    finally:
        metrics.SSE_STREAMS.dec()


async def job_event_stream(
    jobs: JobService, job_id: str, last_event_id: str | None, listener: Redis, owner: str
) -> AsyncIterator[ServerSentEvent]:
    """Validate first (so a bad id or unknown job is an HTTP error), then relay events.

    Once the stream has started, failures arrive as an `error` event without an id, so the
    client can resume from its last id: Redis unreachable, the job expired, or the gateway
    shutting down.
    """
    events = await jobs.events(job_id, last_event_id, listener, owner)

    async def relay() -> AsyncIterator[ServerSentEvent]:
        try:
            async for event in events:
                yield ServerSentEvent(id=event.id, event=event.type.value, data=event.data)
        except (RedisError, ApiError) as e:
            err = map_exception(e)
            if not isinstance(e, ShuttingDown):
                logger.warning("event stream of job %s broke off: %s", job_id, e)
            yield _error_event(err.code, err.message)

    return relay()


def _error_event(code: str, message: str) -> ServerSentEvent:
    return ServerSentEvent(event="error", data=orjson.dumps(error_body(code, message)).decode())

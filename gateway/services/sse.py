"""A job's event stream as Server-Sent Events."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import orjson
from redis.exceptions import RedisError
from sse_starlette import ServerSentEvent

from gateway.errors import error_body, map_exception
from gateway.services.jobs import JobService

logger = logging.getLogger(__name__)


async def job_event_stream(
    jobs: JobService, job_id: str, last_event_id: str | None
) -> AsyncIterator[ServerSentEvent]:
    """Validate first (so a bad id or unknown job is an HTTP error), then relay events.

    Once the stream has started, failures arrive as an `error` event without an id, so the
    client can resume from its last id.
    """
    events = await jobs.events(job_id, last_event_id)

    async def relay() -> AsyncIterator[ServerSentEvent]:
        try:
            async for event in events:
                yield ServerSentEvent(id=event.id, event=event.type.value, data=event.data)
                if event.type.terminal:
                    return
        except RedisError as e:
            err = map_exception(e)
            logger.warning("event stream of job %s broke off: %s", job_id, e)
            yield _error_event(err.code, err.message)
            return
        yield _error_event("job_expired", f"job {job_id!r} expired before it finished")

    return relay()


def _error_event(code: str, message: str) -> ServerSentEvent:
    return ServerSentEvent(event="error", data=orjson.dumps(error_body(code, message)).decode())

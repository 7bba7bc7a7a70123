"""Reading a job's event stream without polling: `XREAD BLOCK` until the next entry arrives."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator

from redis.asyncio import Redis

from common import events, keys
from common.events import Event

STREAM_ID = re.compile(r"^\d+-\d+$")

# Entries fetched per XREAD; a slow client reads a long stream in several round trips.
_READ_COUNT = 512


async def read_events(
    redis: Redis, job_id: str, *, after: str, deadline: float | None, block_ms: int
) -> AsyncIterator[Event]:
    """Yield the job's events after stream id `after` ("0" for all) up to its terminal event.

    Returns early at `deadline` (a `time.monotonic()` value), or when the job record is gone
    while nothing arrives (it expired, or was never there). `block_ms` stays below the client's
    socket timeout.
    """
    key = keys.events(job_id)
    last = after
    while True:
        wait_ms = block_ms
        if deadline is not None:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                return
            wait_ms = min(block_ms, remaining_ms)
        reply = await redis.xread({key: last}, count=_READ_COUNT, block=max(1, wait_ms))
        if not reply:
            if not await redis.exists(keys.job(job_id)):
                return
            continue
        for entry_id, fields in reply[0][1]:
            event = events.decode(entry_id, fields)
            last = event.id
            yield event
            if event.type.terminal:
                return

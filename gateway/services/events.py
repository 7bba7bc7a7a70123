"""Reading a job's event stream without polling: what is there, then `XREAD BLOCK` for more."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.typing import KeyT, StreamIdT

from common import events, keys
from common.events import Event
from common.jobstore import JobStore
from gateway.drain import Drain
from gateway.errors import JobExpired, ShuttingDown
from gateway.redisclient import STREAM_BLOCK_S, Listeners

# A resume point: an event's id (its Redis stream entry id), or empty for "from the start", as
# an EventSource sends it before any event had an id.
EVENT_ID_PATTERN = r"^(\d+-\d+)?$"
STREAM_ID = re.compile(EVENT_ID_PATTERN)

# Entries fetched per XREAD; a slow client reads a long stream in several round trips.
_READ_COUNT = 512

_DRAINING = "this gateway is shutting down; retry (or resume with Last-Event-ID) on another"

# Per stream key, its entries: (entry id, fields).
Entries = list[tuple[str, list[tuple[bytes, dict[bytes, bytes]]]]]


class EventReader:
    """Reads on a listener: a connection of `Listeners`, held by one waiting client."""

    def __init__(self, store: JobStore, listeners: Listeners, drain: Drain) -> None:
        self.store = store
        self.listeners = listeners
        self.drain = drain

    async def read(
        self, listener: Redis, job_id: str, *, after: str, deadline: float | None
    ) -> AsyncIterator[Event]:
        """Yield the job's events after stream id `after` ("0" for all) up to its terminal event,
        reading on `listener` (a connection held for this client).

        Returns at once when the job had finished and the client has seen its end, and early at
        `deadline` (a `time.monotonic()` value). Raises `JobExpired` when the record is gone while
        nothing arrives, and `ShuttingDown` when the gateway drains.
        """
        async with contextlib.aclosing(self.read_jobs(listener, {job_id: after}, deadline)) as read:
            async for _, event in read:
                yield event

    async def read_jobs(
        self, listener: Redis, after: dict[str, str], deadline: float | None
    ) -> AsyncGenerator[tuple[str, Event], None]:
        """`read` for several jobs at once, on the one `listener`: each XREAD asks for every
        stream still open, so a client waiting on n jobs holds one connection, not n. `after`
        maps each job id to the stream id to read after; yields (job id, event) as they come,
        until every job has ended."""
        job_ids = {keys.events(job_id): job_id for job_id in after}
        last = {keys.events(job_id): start for job_id, start in after.items()}
        block = False  # the first read takes what is there without waiting
        while last:
            entries = await self._next(listener, last, deadline) if block else None
            if entries is None:
                entries = await _xread(listener, last, block_ms=None)
            if not entries:
                if deadline is not None and time.monotonic() >= deadline:
                    return
                entries = await self._after_quiet(listener, last, job_ids)
            for key, stream in entries:
                for entry_id, fields in stream:
                    event = events.decode(entry_id, fields)
                    last[key] = event.id
                    yield job_ids[key], event
                    if event.type.terminal:
                        del last[key]
                        break
            block = True

    async def _after_quiet(
        self, listener: Redis, last: dict[str, str], job_ids: dict[str, str]
    ) -> Entries:
        """What is left of the open streams whose jobs have finished, after a read that found
        nothing. A finished job's end was written before that read (the client has seen it), or
        since: its stream closes once that is read, rather than wait for events that will never
        come."""
        entries: Entries = []
        for key in list(last):
            status = await self.store.status(job_ids[key])
            if status is None:
                raise JobExpired(f"job {job_ids[key]!r} expired before it finished")
            if status.finished:
                left = await _xread(listener, {key: last[key]}, block_ms=None)
                if left:
                    entries.extend(left)
                else:
                    del last[key]
        return entries

    async def _next(
        self, listener: Redis, last: dict[str, str], deadline: float | None
    ) -> Entries | None:
        """Entries after `last` once some arrive; [] after a quiet block; None when `deadline`
        leaves no time to block. Raises `ShuttingDown` as soon as the gateway drains."""
        block_s = STREAM_BLOCK_S
        if deadline is not None:
            block_s = min(block_s, deadline - time.monotonic())
            if block_s <= 0:
                return None
        if self.drain.started:
            raise ShuttingDown(_DRAINING)
        read = asyncio.ensure_future(_xread(listener, last, block_ms=max(1, int(block_s * 1000))))
        try:
            await asyncio.wait((read, self.drain.stopping()), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not read.done():
                read.cancel()  # redis-py drops a connection whose read was cancelled
                # Wait for that before the connection can go back to the pool (this client
                # went away, or the gateway drains): the next holder would find the read still
                # waiting on its socket. Shielded: anyio cancels a gone client's task again at
                # every await.
                with anyio.CancelScope(shield=True):
                    await asyncio.wait((read,))
                _retrieve(read)
        if read.cancelled():
            raise ShuttingDown(_DRAINING)
        return read.result()


async def _xread(redis: Redis, last: dict[str, str], *, block_ms: int | None) -> Entries:
    """Each stream's entries after its id in `last`, for the streams that have any."""
    # Typed as redis-py asks: its map is invariant in the key and id types.
    streams: dict[KeyT, StreamIdT] = {key: start for key, start in last.items()}
    reply: Any = await redis.xread(streams, count=_READ_COUNT, block=block_ms)
    return [(key.decode(), stream) for key, stream in reply] if reply else []


def _retrieve(task: asyncio.Future[Entries]) -> None:
    """Consume the outcome of an abandoned read, so asyncio does not log it as lost."""
    if not task.cancelled():
        task.exception()

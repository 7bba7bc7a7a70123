"""Reading a job's event stream without polling: what is there, then `XREAD BLOCK` for more."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from redis.asyncio import Redis

from common import events, keys
from common.events import Event
from common.jobstore import JobStore
from gateway.drain import Drain
from gateway.errors import JobExpired, ShuttingDown
from gateway.redisclient import STREAM_BLOCK_S, Listeners

STREAM_ID = re.compile(r"^\d+-\d+$")

# Entries fetched per XREAD; a slow client reads a long stream in several round trips.
_READ_COUNT = 512

_DRAINING = "this gateway is shutting down; retry (or resume with Last-Event-ID) on another"

Entries = list[tuple[bytes, dict[bytes, bytes]]]


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
        key = keys.events(job_id)
        last = after
        block = False  # the first read takes what is there without waiting
        while True:
            entries = await self._next(listener, key, last, deadline) if block else None
            if entries is None:
                entries = await _xread(listener, key, last, block_ms=None)
            if not entries:
                if deadline is not None and time.monotonic() >= deadline:
                    return
                status = await self.store.status(job_id)
                if status is None:
                    raise JobExpired(f"job {job_id!r} expired before it finished")
                if status.finished:
                    # Its end was written before the read above (the client has seen it), or
                    # since: take what is left and stop, rather than wait for events that
                    # will never come.
                    entries = await _xread(listener, key, last, block_ms=None)
                    if not entries:
                        return
            for entry_id, fields in entries:
                event = events.decode(entry_id, fields)
                last = event.id
                yield event
                if event.type.terminal:
                    return
            block = True

    async def _next(
        self, listener: Redis, key: str, last: str, deadline: float | None
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
        read = asyncio.ensure_future(
            _xread(listener, key, last, block_ms=max(1, int(block_s * 1000)))
        )
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


async def _xread(redis: Redis, key: str, last: str, *, block_ms: int | None) -> Entries:
    reply: Any = await redis.xread({key: last}, count=_READ_COUNT, block=block_ms)
    return reply[0][1] if reply else []


def _retrieve(task: asyncio.Future[Entries]) -> None:
    """Consume the outcome of an abandoned read, so asyncio does not log it as lost."""
    if not task.cancelled():
        task.exception()

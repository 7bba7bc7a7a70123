"""A stream connection goes back to the pool only once nothing reads on it any more: a client
that disconnects while its read blocks must not hand the next client a connection with a read
still waiting on it ("read() called while another coroutine is already waiting")."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import cast

from common import keys
from common.jobstore import JobStore
from common.settings import Settings
from gateway.drain import Drain
from gateway.redisclient import create_gateway_redis
from gateway.services.events import EventReader
from genq.redis_server import RedisServer


async def test_a_cancelled_read_is_over_before_its_connection_is_reused(
    redis_server: RedisServer,
) -> None:
    settings = Settings(redis_url=redis_server.url, redis_max_stream_connections=1)
    redis, listeners = create_gateway_redis(settings)
    store = JobStore(redis, ttl_s=60, events_maxlen=10)
    reader = EventReader(store, listeners, Drain())
    await cast("Awaitable[int]", redis.hset(keys.job("quiet"), "status", "running"))

    async def follow() -> None:
        async with listeners.hold() as listener:
            async for _ in reader.read(listener, "quiet", after="0", deadline=None):
                pass

    async def ping() -> bool:
        async with listeners.hold() as listener:
            return bool(await listener.ping())

    try:
        for _ in range(10):
            client = asyncio.ensure_future(follow())
            await asyncio.sleep(0.02)  # it blocks in XREAD
            client.cancel()  # the client went away...
            nxt = asyncio.ensure_future(ping())  # ...and the next one asks for a connection
            await asyncio.gather(client, return_exceptions=True)
            assert await nxt
    finally:
        await redis.aclose()
        await listeners.pool.aclose()

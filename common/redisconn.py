"""Connections to Redis, one Redis or a primary found through Sentinel, built from `Settings` in
one place; the worker's client is here too (the gateway's, with its breaker and bounded pools,
is in `gateway.redisclient`, over `connection_pool`).

With GENQ_REDIS_SENTINELS, every pool is a `SentinelPool`, redis-py's Sentinel pool:
each new connection asks the sentinels for the primary, and a connection that finds its node
demoted (READONLY) is dropped, so clients follow a failover as they reconnect.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import redis
import redis.sentinel
from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool
from redis.asyncio.connection import parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from common import keys
from common.contract import deserialize_payload, serialize_payload
from common.settings import Settings


class SentinelPool(SentinelConnectionPool):
    """redis-py's Sentinel pool, which also closes its clients of the sentinels when it closes
    (redis-py leaves them open)."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # closing, not the sweep of idle connections on a new primary
            for sentinel in self.sentinel_manager.sentinels:
                await sentinel.aclose()


P = TypeVar("P", bound=ConnectionPool)
S = TypeVar("S", bound=SentinelPool)


def connection_pool(
    settings: Settings,
    plain: type[P],
    sentinel: type[S],
    **options: Any,
) -> P | S:
    """A pool of class `plain` on GENQ_REDIS_URL, or with Sentinel of class `sentinel` on the
    primary of GENQ_REDIS_SENTINEL_SERVICE, logging in with the URL's credentials and database.
    Neither connects before its first use."""
    url = settings.redis_url.get_secret_value()
    if not settings.sentinel_addresses:
        return plain.from_url(url, **options)
    return sentinel(
        settings.redis_sentinel_service,
        # Untyped in redis-py.
        Sentinel(settings.sentinel_addresses, sentinel_kwargs=_sentinel_options(settings)),  # type: ignore[no-untyped-call]
        **_data_options(url),
        **options,
    )


@contextmanager
def sync_client(settings: Settings, **options: Any) -> Iterator[redis.Redis]:
    """A blocking client, for the few calls made off the event loop; closed on exit."""
    url = settings.redis_url.get_secret_value()
    if not settings.sentinel_addresses:
        with redis.Redis.from_url(url, **options) as client:
            yield client
        return
    manager = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]  # untyped in redis-py
        settings.sentinel_addresses, sentinel_kwargs=_sentinel_options(settings)
    )
    try:
        with manager.master_for(  # type: ignore[no-untyped-call]
            settings.redis_sentinel_service, **_data_options(url), **options
        ) as client:
            yield client
    finally:
        for sentinel in manager.sentinels:
            sentinel.close()


def _data_options(url: str) -> dict[str, Any]:
    """The URL's credentials, database and options; its address is the sentinels' to give."""
    options: dict[str, Any] = dict(parse_url(url))
    options.pop("host", None)
    options.pop("port", None)
    return options


def _sentinel_options(settings: Settings) -> dict[str, Any]:
    password = settings.redis_sentinel_password
    return {
        "password": None if password is None else password.get_secret_value(),
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        "socket_timeout": settings.redis_connect_timeout_s,
    }


def create_redis(settings: Settings) -> ArqRedis:
    """A client that never pings at construction: the process starts even while Redis is down
    and recovers by itself when it returns; commands fail fast meanwhile. It serves arq's
    worker too (which takes a client, not arq's `RedisSettings`)."""
    pool = connection_pool(
        settings,
        ConnectionPool,
        SentinelPool,
        socket_connect_timeout=settings.redis_connect_timeout_s,
        socket_timeout=settings.redis_socket_timeout_s,
        health_check_interval=30,
    )
    return ArqRedis(
        pool,
        job_serializer=serialize_payload,
        job_deserializer=deserialize_payload,
        default_queue_name=keys.queue(settings.pool),
    )

"""The worker's Redis client (the gateway's, with its breaker and bounded pools, is in
`gateway.redisclient`)."""

from __future__ import annotations

from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool

from common import keys
from common.contract import deserialize_payload, serialize_payload
from common.settings import Settings


def create_redis(settings: Settings) -> ArqRedis:
    """A client that never pings at construction: the process starts even while Redis is down
    and recovers by itself when it returns; commands fail fast meanwhile."""
    pool = ConnectionPool.from_url(
        settings.redis_url.get_secret_value(),
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

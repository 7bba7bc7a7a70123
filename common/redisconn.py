"""Redis clients, built the same way on both sides."""

from __future__ import annotations

from arq.connections import ArqRedis, RedisSettings
from redis.asyncio import ConnectionPool

from common import keys
from common.contract import deserialize_payload, serialize_payload
from common.settings import Settings


def arq_redis_settings(settings: Settings) -> RedisSettings:
    rs = RedisSettings.from_dsn(settings.redis_url.get_secret_value())
    rs.conn_timeout = int(max(1, settings.redis_connect_timeout_s))
    return rs


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

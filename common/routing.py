"""Run-time routing overrides (aliases, traffic splits) in Redis, over the models file's.

Each change is a single HSET or HDEL, so switching an alias or a split is atomic: every request
resolved after it sees the new target, none sees half of it.

redis-py types its hash commands for its sync and async clients at once; the casts pick async.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import cast

import orjson
from redis.asyncio import Redis

from common import keys
from common.catalog import Catalog, CatalogError, CatalogSource

_ALIAS = "alias:"
_TRAFFIC = "traffic:"
# The field of the catalog revision; named before the catalog was, and kept: every gateway and
# worker of a rolling upgrade reads it.
_REVISION = "registry_revision"


async def current(redis: Redis, source: CatalogSource) -> Catalog:
    """The catalog with the overrides applied; overrides the file no longer allows are skipped
    (a removed version, say) rather than breaking routing."""
    raw = await cast("Awaitable[dict[bytes, bytes]]", redis.hgetall(keys.routing()))
    base = source.get(revision=int(raw.get(_REVISION.encode(), 0)))
    aliases = dict(base.aliases)
    traffic = dict(base.traffic)
    for field, value in raw.items():
        name = field.decode()
        if name.startswith(_ALIAS):
            aliases[name.removeprefix(_ALIAS)] = value.decode()
        elif name.startswith(_TRAFFIC):
            traffic[name.removeprefix(_TRAFFIC)] = orjson.loads(value)
    for alias, target in list(aliases.items()):
        try:
            base.check_alias(alias, target)
        except CatalogError:
            del aliases[alias]
    for name, weights in list(traffic.items()):
        try:
            base.check_traffic(name, weights)
        except CatalogError:
            del traffic[name]
    return Catalog(base.specs, aliases, traffic)


async def set_alias(redis: Redis, catalog: Catalog, alias: str, target: str) -> None:
    catalog.check_alias(alias, target)
    await cast("Awaitable[int]", redis.hset(keys.routing(), _ALIAS + alias, target))


async def set_traffic(redis: Redis, catalog: Catalog, name: str, weights: dict[str, int]) -> None:
    catalog.check_traffic(name, weights)
    await cast(
        "Awaitable[int]",
        redis.hset(keys.routing(), _TRAFFIC + name, orjson.dumps(weights).decode()),
    )


async def clear_traffic(redis: Redis, name: str) -> None:
    """Back to the file's split for `name`, or to its last listed version."""
    await cast("Awaitable[int]", redis.hdel(keys.routing(), _TRAFFIC + name))


async def next_revision(redis: Redis) -> int:
    """Move the catalog revision on: every process re-reads the models file."""
    return int(await cast("Awaitable[int]", redis.hincrby(keys.routing(), _REVISION, 1)))

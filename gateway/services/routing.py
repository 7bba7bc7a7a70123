"""Model routing: which version and pool serve a request's model name, from the registry and
its run-time overrides."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from common import routing
from common.catalog import Catalog, CatalogSource, ModelSpec, UnknownModel
from gateway.errors import ModelNotFound


@dataclass(frozen=True, slots=True)
class Route:
    pool: str
    model: str  # name@version, recorded on the job
    spec: ModelSpec


class ModelRouter:
    def __init__(self, redis: Redis, source: CatalogSource) -> None:
        self.redis = redis
        self.source = source

    async def catalog(self) -> Catalog:
        return await routing.current(self.redis, self.source)

    async def resolve(self, requested: str | None) -> Route:
        """The version serving `requested` and its pool. Known models are accepted before any
        worker is up, so that jobs queue while workers start (or are scaled to zero)."""
        try:
            spec = (await self.catalog()).resolve(requested)
        except UnknownModel as e:
            raise ModelNotFound(str(e)) from e
        return Route(pool=spec.pool, model=spec.key, spec=spec)

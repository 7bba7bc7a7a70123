"""Model routing and listing, from what workers registered in Redis."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from common import registry
from common.schemas import ModelCard, ModelList
from common.settings import Settings
from gateway.errors import ModelNotFound

DEFAULT_ALIAS = "default"


@dataclass(frozen=True, slots=True)
class Route:
    pool: str
    model: str  # the name recorded on the job


class ModelService:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings

    async def resolve(self, requested: str | None) -> Route:
        """The pool serving `requested`; no name or `default` means the gateway's own pool.

        The default pool is accepted even before any worker registered, so that jobs queue up
        while workers are still starting (or scaled to zero).
        """
        served = await registry.served_models(self.redis)
        if requested is None or requested == DEFAULT_ALIAS:
            pool = self.settings.pool
            names = sorted(e.name for e in served.values() if e.pool == pool)
            return Route(pool=pool, model=names[0] if len(names) == 1 else DEFAULT_ALIAS)
        entry = served.get(requested)
        if entry is None:
            listed = ", ".join(sorted(served)) or "none registered yet"
            raise ModelNotFound(f"model {requested!r} is not served; served models: {listed}")
        return Route(pool=entry.pool, model=entry.name)

    async def list(self) -> ModelList:
        served = await registry.served_models(self.redis)
        alive: dict[str, int] = {}
        for pool in {e.pool for e in served.values()}:
            for worker in await registry.live_workers(self.redis, pool):
                for name in worker.models:
                    alive[name] = alive.get(name, 0) + 1
        cards = [
            ModelCard(
                id=e.name,
                created=int(e.registered_at),
                pool=e.pool,
                source=e.source,
                workers=alive.get(e.name, 0),
            )
            for e in sorted(served.values(), key=lambda e: e.name)
        ]
        return ModelList(data=cards)

"""Model routing (registry + run-time overrides) and the model list with per-worker states."""

from __future__ import annotations

import time
from dataclasses import dataclass

from redis.asyncio import Redis

from common import registry, routing
from common.catalog import Catalog, CatalogSource, ModelSpec, UnknownModel
from gateway.errors import ModelNotFound
from gateway.schemas import ModelCard, ModelList, ModelVersion, WorkerHolding

# What a version shows when live workers disagree: the most useful state wins.
_STATE_ORDER = ("ready", "reloading", "loading", "failed")


@dataclass(frozen=True, slots=True)
class Route:
    pool: str
    model: str  # name@version, recorded on the job
    spec: ModelSpec


class ModelService:
    def __init__(self, redis: Redis, source: CatalogSource) -> None:
        self.redis = redis
        self.source = source
        self._started = int(time.time())

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

    async def listing(self, *, details: bool = True) -> ModelList:
        """Every served model; with `details`, each version's source, the workers holding it
        (host names and pids) and why it failed to load, for operators."""
        catalog = await self.catalog()
        holdings: dict[str, list[WorkerHolding]] = {}
        for pool in sorted(catalog.pools()):
            for worker in await registry.live_workers(self.redis, pool):
                for held in worker.models:
                    holdings.setdefault(held.key, []).append(
                        WorkerHolding(
                            worker=worker.id,
                            state=held.state,
                            reason=held.reason,
                            decode=held.decode,
                            decode_note=held.decode_note,
                        )
                    )
        cards = []
        for name in catalog.names():
            versions = [
                self._version(catalog, spec, holdings, details) for spec in catalog.versions(name)
            ]
            aliases = [
                alias
                for alias, target in catalog.aliases.items()
                if target == name or target.split("@", 1)[0] == name
            ]
            ready_workers = {
                h.worker
                for spec in catalog.versions(name)
                for h in holdings.get(spec.key, [])
                if h.state in ("ready", "reloading")
            }
            cards.append(
                ModelCard(
                    id=name,
                    created=self._started,
                    aliases=aliases,
                    workers=len(ready_workers),
                    versions=versions,
                )
            )
        return ModelList(data=cards)

    def _version(
        self,
        catalog: Catalog,
        spec: ModelSpec,
        holdings: dict[str, list[WorkerHolding]],
        details: bool,
    ) -> ModelVersion:
        held = holdings.get(spec.key, [])
        states = {h.state for h in held}
        state = next((s for s in _STATE_ORDER if s in states), "not_loaded")
        reasons = [h.reason for h in held if h.reason]
        weights = catalog.traffic.get(spec.name)
        return ModelVersion(
            id=spec.key,
            version=spec.version,
            pool=spec.pool,
            source=(spec.source or "default model") if details else None,
            state=state,
            reason=reasons[0] if reasons and details else None,
            traffic_weight=None if weights is None else weights.get(spec.version, 0),
            default=catalog.default_version(spec.name).key == spec.key,
            workers=held if details else None,
        )

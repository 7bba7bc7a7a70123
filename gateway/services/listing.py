"""The model list: every served model and version, with the states of the workers holding them."""

from __future__ import annotations

import time

from redis.asyncio import Redis

from common import heartbeats
from common.catalog import Catalog, ModelSpec
from common.heartbeats import WorkerInfo
from gateway.schemas import ModelCard, ModelList, ModelVersion, WorkerHolding
from gateway.services.routing import ModelRouter

# What a version shows when live workers disagree: the most useful state wins.
_STATE_ORDER = ("ready", "reloading", "loading", "failed")


class ModelListing:
    def __init__(self, redis: Redis, router: ModelRouter) -> None:
        self.redis = redis
        self.router = router
        self._started = int(time.time())

    async def models(self, *, details: bool = True) -> ModelList:
        """Every served model; with `details`, each version's source, the workers holding it
        (host names and pids) and why it failed to load, for operators."""
        catalog = await self.router.catalog()
        holdings: dict[str, list[WorkerHolding]] = {}
        workers = [
            worker
            for pool in sorted(catalog.pools())
            for worker in await heartbeats.live_workers(self.redis, pool)
        ]
        contexts = _context_windows(workers)
        for worker in workers:
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
                self._version(catalog, spec, holdings, contexts.get(spec.key), details)
                for spec in catalog.versions(name)
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
                    max_model_len=contexts.get(catalog.default_version(name).key),
                )
            )
        return ModelList(data=cards)

    async def max_model_len(self, key: str) -> int | None:
        """The `max_model_len` of version `key` (name@version), as `models` lists it: None
        until a live worker has loaded it."""
        spec = (await self.router.catalog()).specs.get(key)
        if spec is None:
            return None
        workers = await heartbeats.live_workers(self.redis, spec.pool)
        return _context_windows(workers).get(key)

    def _version(
        self,
        catalog: Catalog,
        spec: ModelSpec,
        holdings: dict[str, list[WorkerHolding]],
        max_model_len: int | None,
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
            max_model_len=max_model_len,
            workers=held if details else None,
        )


def _context_windows(workers: list[WorkerInfo]) -> dict[str, int]:
    """Each version's smallest context window among the `workers` that have loaded it."""
    contexts: dict[str, int] = {}
    for worker in workers:
        for held in worker.models:
            if held.max_context is not None:
                contexts[held.key] = min(contexts.get(held.key, held.max_context), held.max_context)
    return contexts

"""Operator actions on models: reload weights, traffic splits, aliases."""

from __future__ import annotations

import orjson
from redis.asyncio import Redis

from common import keys, routing
from common.catalog import CatalogError
from gateway.errors import InvalidRouting, ModelNotFound
from gateway.schemas import ModelCard, ReloadAccepted
from gateway.services.listing import ModelListing
from gateway.services.routing import ModelRouter


class AdminService:
    def __init__(self, redis: Redis, router: ModelRouter, listing: ModelListing) -> None:
        self.redis = redis
        self.router = router
        self.listing = listing

    async def reload(self, name: str) -> ReloadAccepted:
        """Have every process re-read the registry, and every worker holding `name` reload it.

        Workers load the new weights in the background and swap them in between two decode
        steps; `GET /v1/models` shows `reloading` on each until it is done.
        """
        await routing.next_revision(self.redis)
        catalog = await self.router.catalog()  # re-reads the file: the revision moved on
        if not catalog.versions(name):
            raise ModelNotFound(f"model {name!r} is not served; served models: {catalog.served()}")
        command = orjson.dumps({"action": "reload", "name": name})
        listeners = int(await self.redis.publish(keys.control(), command))
        return ReloadAccepted(
            model=name,
            serves=catalog.resolve(name).key if not catalog.traffic.get(name) else None,
            versions=[spec.key for spec in catalog.versions(name)],
            workers_notified=listeners,
        )

    async def set_traffic(self, name: str, weights: dict[str, int]) -> ModelCard:
        try:
            await routing.set_traffic(self.redis, await self.router.catalog(), name, weights)
        except CatalogError as e:
            raise InvalidRouting(str(e)) from e
        return await self.card(name)

    async def clear_traffic(self, name: str) -> ModelCard:
        await routing.clear_traffic(self.redis, name)
        return await self.card(name)

    async def set_alias(self, alias: str, target: str) -> None:
        try:
            await routing.set_alias(self.redis, await self.router.catalog(), alias, target)
        except CatalogError as e:
            raise InvalidRouting(str(e)) from e

    async def card(self, name: str) -> ModelCard:
        for card in (await self.listing.models()).data:
            if card.id == name:
                return card
        catalog = await self.router.catalog()
        raise ModelNotFound(f"model {name!r} is not served; served models: {catalog.served()}")

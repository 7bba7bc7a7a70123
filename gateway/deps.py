"""Long-lived services, built once at startup and reached from `app.state`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from arq.connections import ArqRedis
from fastapi import Depends, Request
from redis.asyncio import Redis

from common.catalog import CatalogSource
from common.jobstore import JobStore
from common.reaper import Reaper
from common.settings import Settings
from gateway.drain import Drain
from gateway.redisclient import Listeners, create_gateway_redis
from gateway.services.admin import AdminService
from gateway.services.events import EventReader
from gateway.services.jobs import JobService
from gateway.services.models import ModelService
from gateway.services.openai import OpenAIService
from gateway.services.queue import QueueService


@dataclass(frozen=True)
class Services:
    settings: Settings
    redis: ArqRedis
    listeners: Listeners
    drain: Drain
    jobs: JobService
    models: ModelService
    queue: QueueService
    openai: OpenAIService
    admin: AdminService
    reaper: Reaper

    @classmethod
    def build(cls, settings: Settings, drain: Drain) -> Services:
        redis, listeners = create_gateway_redis(settings)
        store = JobStore(redis, ttl_s=settings.result_ttl_s, events_maxlen=settings.events_maxlen)
        source = CatalogSource(settings)
        models = ModelService(redis, source)
        queue = QueueService(redis, store, settings, source)
        reader = EventReader(store, listeners, drain)
        jobs = JobService(redis, store, models, queue, settings, reader)
        return cls(
            settings=settings,
            redis=redis,
            listeners=listeners,
            drain=drain,
            jobs=jobs,
            models=models,
            queue=queue,
            openai=OpenAIService(jobs, drain),
            admin=AdminService(redis, models),
            reaper=Reaper(redis, store, settings.max_tries),
        )

    async def aclose(self) -> None:
        await self.redis.aclose(close_connection_pool=True)
        await self.listeners.pool.disconnect()


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _jobs(request: Request) -> JobService:
    return _services(request).jobs


def _models(request: Request) -> ModelService:
    return _services(request).models


def _queue(request: Request) -> QueueService:
    return _services(request).queue


def _admin(request: Request) -> AdminService:
    return _services(request).admin


async def _listener(request: Request) -> AsyncIterator[Redis]:
    # Request-scoped: held until the response (a stream included) has ended, and taken before
    # the handler runs, so a full pool is a 503 before any job is submitted.
    async with _services(request).listeners.hold() as listener:
        yield listener


ServicesDep = Annotated[Services, Depends(_services)]
JobsDep = Annotated[JobService, Depends(_jobs)]
ModelsDep = Annotated[ModelService, Depends(_models)]
QueueDep = Annotated[QueueService, Depends(_queue)]
AdminDep = Annotated[AdminService, Depends(_admin)]
ListenerDep = Annotated[Redis, Depends(_listener)]

"""Long-lived services, built once at startup and reached from `app.state`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from arq.connections import ArqRedis
from fastapi import Depends, Request

from common.catalog import CatalogSource
from common.jobstore import JobStore
from common.reaper import Reaper
from common.redisconn import create_redis
from common.settings import Settings
from gateway.services.admin import AdminService
from gateway.services.jobs import JobService
from gateway.services.models import ModelService
from gateway.services.openai import OpenAIService
from gateway.services.queue import QueueService


@dataclass(frozen=True)
class Services:
    settings: Settings
    redis: ArqRedis
    jobs: JobService
    models: ModelService
    queue: QueueService
    openai: OpenAIService
    admin: AdminService
    reaper: Reaper

    @classmethod
    def build(cls, settings: Settings) -> Services:
        redis = create_redis(settings)
        store = JobStore(redis, ttl_s=settings.result_ttl_s, events_maxlen=settings.events_maxlen)
        source = CatalogSource(settings)
        models = ModelService(redis, source)
        queue = QueueService(redis, store, settings, source)
        jobs = JobService(redis, store, models, queue, settings)
        return cls(
            settings=settings,
            redis=redis,
            jobs=jobs,
            models=models,
            queue=queue,
            openai=OpenAIService(jobs),
            admin=AdminService(redis, models),
            reaper=Reaper(redis, store, settings.max_tries),
        )


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


ServicesDep = Annotated[Services, Depends(_services)]
JobsDep = Annotated[JobService, Depends(_jobs)]
ModelsDep = Annotated[ModelService, Depends(_models)]
QueueDep = Annotated[QueueService, Depends(_queue)]
AdminDep = Annotated[AdminService, Depends(_admin)]

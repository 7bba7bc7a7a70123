"""Long-lived services, built once at startup and reached from `app.state`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from arq.connections import ArqRedis
from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from redis.asyncio import Redis

from common.catalog import CatalogSource
from common.jobstore import JobStore
from common.reaper import Reaper
from common.settings import Settings
from gateway.auth import Caller, KeyRing, NotAuthenticated, Scope, presented_key
from gateway.drain import Drain
from gateway.errors import Forbidden, Unauthorized
from gateway.openai.serving import OpenAIServing
from gateway.openai.tokenization import TokenizationServing
from gateway.redisclient import Listeners, create_gateway_redis
from gateway.redisprobe import RedisProbe
from gateway.services.admin import AdminService
from gateway.services.events import EventReader
from gateway.services.jobs import JobService
from gateway.services.listing import ModelListing
from gateway.services.queue import QueueService
from gateway.services.ratelimit import RateLimiter
from gateway.services.routing import ModelRouter


@dataclass(frozen=True)
class Services:
    settings: Settings
    redis: ArqRedis
    listeners: Listeners
    probe: RedisProbe
    drain: Drain
    jobs: JobService
    router: ModelRouter
    listing: ModelListing
    queue: QueueService
    openai: OpenAIServing
    tokenization: TokenizationServing
    admin: AdminService
    reaper: Reaper
    keyring: KeyRing

    @classmethod
    def build(cls, settings: Settings, drain: Drain) -> Services:
        """Raises `InvalidKeys` when the API keys (or their absence) do not allow serving."""
        keyring = KeyRing.from_settings(settings)
        redis, listeners = create_gateway_redis(settings)
        store = JobStore(redis, ttl_s=settings.result_ttl_s, events_maxlen=settings.events_maxlen)
        source = CatalogSource(settings)
        router = ModelRouter(redis, source)
        listing = ModelListing(redis, router)
        queue = QueueService(redis, store, settings, source)
        reader = EventReader(store, listeners, drain)
        limiter = RateLimiter(redis, store, settings)
        jobs = JobService(redis, store, router, queue, settings, reader, limiter)
        openai = OpenAIServing(jobs, drain)
        return cls(
            settings=settings,
            redis=redis,
            listeners=listeners,
            probe=RedisProbe.from_settings(settings, redis.breaker),
            drain=drain,
            jobs=jobs,
            router=router,
            listing=listing,
            queue=queue,
            openai=openai,
            tokenization=TokenizationServing(openai, listing),
            admin=AdminService(redis, router, listing),
            reaper=Reaper(redis, store, settings.max_tries),
            keyring=keyring,
        )

    async def aclose(self) -> None:
        await self.probe.aclose()
        await self.redis.aclose(close_connection_pool=True)
        await self.listeners.pool.disconnect()


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _jobs(request: Request) -> JobService:
    return _services(request).jobs


def _listing(request: Request) -> ModelListing:
    return _services(request).listing


def _queue(request: Request) -> QueueService:
    return _services(request).queue


def _admin(request: Request) -> AdminService:
    return _services(request).admin


async def _listener(request: Request) -> AsyncIterator[Redis]:
    # Request-scoped: held until the response (a stream included) has ended, and taken before
    # the handler runs, so a full pool is a 503 before any job is submitted.
    async with _services(request).listeners.hold() as listener:
        yield listener


# Declared for the OpenAPI schema (its Authorize button, generated clients); the key itself is
# read from the raw headers by `presented_key`, so that a header that is not ASCII is a 401.
_BEARER = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")
_API_KEY = APIKeyHeader(name="x-api-key", auto_error=False, description="An API key.")


async def _caller(
    request: Request,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)],
    _api_key: Annotated[str | None, Security(_API_KEY)],
) -> Caller:
    """The request's API key, as `Authorization: Bearer <key>` or `x-api-key: <key>`. The
    caller is kept on the request: its answer carries the rate-limit headers of what it spent."""
    try:
        principal = _services(request).keyring.authenticate(presented_key(request.scope["headers"]))
    except NotAuthenticated as e:
        raise Unauthorized(
            "invalid API key"
            if e.presented
            else "missing API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`"
        ) from e
    caller = Caller(principal)
    request.state.caller = caller
    return caller


def _scoped(scope: Scope) -> Callable[[Caller], Awaitable[Caller]]:
    async def check(caller: Annotated[Caller, Depends(_caller)]) -> Caller:
        if not caller.principal.can(scope):
            raise Forbidden(
                f"the API key {caller.principal.name!r} lacks the `{scope}` scope this route needs"
            )
        return caller

    return check


require_admin = _scoped(Scope.admin)

ServicesDep = Annotated[Services, Depends(_services)]
CallerDep = Annotated[Caller, Depends(_caller)]
GeneratorDep = Annotated[Caller, Depends(_scoped(Scope.generate))]
ReaderDep = Annotated[Caller, Depends(_scoped(Scope.read))]
JobsDep = Annotated[JobService, Depends(_jobs)]
ListingDep = Annotated[ModelListing, Depends(_listing)]
QueueDep = Annotated[QueueService, Depends(_queue)]
AdminDep = Annotated[AdminService, Depends(_admin)]
ListenerDep = Annotated[Redis, Depends(_listener)]

"""Requests answered by a job that already exists: a retry with the same Idempotency-Key, and
(the result cache) a deterministic request identical to one that is running or has finished.
Both know a request by its fingerprint."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from dataclasses import dataclass, field

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from common import keys
from common.catalog import DEFAULT_ALIAS
from common.jobs import Job, JobStatus
from common.jobstore import JobStore
from common.settings import Settings
from gateway import metrics
from gateway.errors import IdempotencyConflict
from gateway.schemas import GenerationRequest
from gateway.services.validation import Validated

# How long a request that lost an Idempotency-Key race waits for the winner's job record.
_IDEMPOTENCY_WAIT_S = 2.0
# Marks an Idempotency-Key answered by an identical earlier job (`cached: true`).
_SERVED = "served"


def fingerprint(
    model: str,
    request: GenerationRequest,
    *,
    exclude: set[str] | None = None,
    scope: str | None = None,
) -> str:
    """Digest of the canonical request as the named model would serve it; with `scope` (an API
    key's principal), only requests of that key have the same one."""
    body = request.model_dump(mode="json", exclude=exclude)
    body["model"] = model
    if scope is not None:
        body["scope"] = scope
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def is_deterministic(request: GenerationRequest) -> bool:
    return request.temperature == 0.0 or request.seed is not None


def sharing_scope(settings: Settings, owner: str) -> str | None:
    """Whose jobs, results and cached prompts a request of `owner` may share: its own API
    key's, or everyone's (None) with GENQ_SHARE_ACROSS_KEYS."""
    return None if settings.share_across_keys else owner


@dataclass(frozen=True, slots=True)
class Served:
    """The earlier job that answers a request; `cached`: it was made for another request
    (a result-cache hit, now or when the Idempotency-Key was first used); `held`: the request
    now holds it (a result-cache hit on a job still running)."""

    job: Job
    cached: bool
    held: bool = False


@dataclass(slots=True)
class Reservation:
    """What a new request found: the job that answers it, or the keys that now name its new job
    (released if that job is not queued after all)."""

    served: Served | None = None
    claims: list[str] = field(default_factory=list)


class Dedup:
    def __init__(self, redis: Redis, store: JobStore, settings: Settings) -> None:
        self.redis = redis
        self.store = store
        self.settings = settings

    async def reserve(
        self,
        validated: Validated,
        owner: str,
        idempotency_key: str | None,
        job_id: str,
        *,
        choice: int = 0,
    ) -> Reservation:
        """The job that already serves this request of API key `owner`, if any; else `job_id`
        is registered under the request's Idempotency-Key and its result-cache entry. `choice`:
        which of a request's n choices this is, each of which the Idempotency-Key names."""
        request = validated.request
        reservation = Reservation()
        # Idempotency is keyed by the name asked for: a canary split may route a retry to
        # another version.
        asked = request.model or DEFAULT_ALIAS
        if idempotency_key is not None:
            redis_key = keys.idempotency(owner, idempotency_key, choice)
            earlier = await self._claim_idempotency(
                redis_key, idempotency_key, owner, asked, request, job_id
            )
            if earlier is not None:
                reservation.served = earlier
                return reservation
            reservation.claims.append(redis_key)
        # A request with a webhook wants its own delivery, so it never shares a job.
        if self.settings.cache_enabled and is_deterministic(request) and not request.webhook:
            scope = sharing_scope(self.settings, owner)
            digest = fingerprint(validated.route.model, request, exclude={"priority"}, scope=scope)
            cache_key = keys.result_cache(digest)
            served = await self._from_cache(cache_key, job_id, owner)
            if served is not None:
                metrics.CACHE_HITS.inc()
                if idempotency_key is not None:
                    # A retry must get this same answer, not a conflict with a job never made.
                    await self._repoint_idempotency(
                        keys.idempotency(owner, idempotency_key, choice),
                        asked,
                        request,
                        served.job.id,
                    )
                reservation.served = served
                return reservation
            reservation.claims.append(cache_key)
        return reservation

    async def release(self, reservation: Reservation, job_id: str) -> None:
        """Free the keys that name `job_id`, which was not queued: a retry after a 429 (or an
        outage) must not find its key taken by a phantom job."""
        with contextlib.suppress(RedisError):
            for key in reservation.claims:
                owner = await self.redis.get(key)
                if owner is not None and owner.decode().split(" ", 1)[0] == job_id:
                    await self.redis.delete(key)

    async def _claim_idempotency(
        self,
        redis_key: str,
        key: str,
        owner: str,
        model: str,
        request: GenerationRequest,
        job_id: str,
    ) -> Served | None:
        """None if this request now owns Idempotency-Key `key` (of API key `owner`, stored at
        `redis_key`); else the job of the request that owns it."""
        digest = fingerprint(model, request)
        if await self.redis.set(
            redis_key, f"{job_id} {digest}", nx=True, ex=self.settings.idempotency_ttl_s
        ):
            return None
        holder = await self.redis.get(redis_key)
        if holder is None:  # expired just now: claim it again
            return await self._claim_idempotency(redis_key, key, owner, model, request, job_id)
        holder_id, holder_digest, *served = holder.decode().split(" ")
        if holder_digest != digest:
            raise IdempotencyConflict(
                f"Idempotency-Key {key!r} was used with a different request body"
            )
        deadline = time.monotonic() + _IDEMPOTENCY_WAIT_S
        while (job := await self.store.load(holder_id, owner=owner)) is None:
            if time.monotonic() > deadline:
                raise IdempotencyConflict(
                    f"the request holding Idempotency-Key {key!r} has not created its job"
                )
            await asyncio.sleep(0.05)
        return Served(job, cached=bool(served))

    async def _repoint_idempotency(
        self, redis_key: str, model: str, request: GenerationRequest, job_id: str
    ) -> None:
        value = f"{job_id} {fingerprint(model, request)} {_SERVED}"
        ttl = self.settings.idempotency_ttl_s
        await self.redis.set(redis_key, value, ex=ttl)

    async def _from_cache(self, cache_key: str, job_id: str, owner: str) -> Served | None:
        """The job serving identical requests, unless it failed; else register `job_id`.
        `owner` may see the job from now on, and holds it while it runs."""
        ttl = self.settings.cache_ttl_s
        if await self.redis.set(cache_key, job_id, nx=True, ex=ttl):
            return None
        serving = await self.redis.get(cache_key)
        job = None if serving is None else await self.store.load(serving.decode())
        failed = job is None or job.status in (JobStatus.failed, JobStatus.cancelled)
        if (
            job is None
            or failed
            or not await self.store.share(job.id, owner, hold=not job.status.finished)
        ):
            await self.redis.set(cache_key, job_id, ex=ttl)
            return None
        return Served(job, cached=True, held=not job.status.finished)

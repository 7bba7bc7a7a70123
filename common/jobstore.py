"""The job record (`keys.job`) and event stream (`keys.events`), read and written by both sides.

redis-py types its hash commands for its sync and async clients at once; the casts pick async.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Mapping
from enum import StrEnum
from typing import cast

import orjson
from pydantic import BaseModel
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from common import events, keys, lua
from common.jobs import Job, JobError, JobResult, JobStatus, Timings, TokenEvent, WebhookDelivery

# How far back job starts count towards a pool's drain rate.
DRAIN_WINDOW_S = 300

# Hash fields holding nested models as JSON.
_JSON_FIELDS: dict[str, type[BaseModel]] = {
    "result": JobResult,
    "error": JobError,
    "timings": Timings,
}


def _to_hash(job: Job) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in ("status", "model", "created_at", "started_at", "finished_at", "attempt"):
        value = getattr(job, name)
        if value is not None:
            out[name] = str(value)
    for name in _JSON_FIELDS:
        value = getattr(job, name)
        if value is not None:
            out[name] = value.model_dump_json()
    return out


def _from_hash(job_id: str, raw: Mapping[bytes, bytes]) -> Job:
    data = {k.decode(): v.decode() for k, v in raw.items()}
    nested = {
        name: model.model_validate_json(data[name])
        for name, model in _JSON_FIELDS.items()
        if name in data
    }
    return Job(
        id=job_id,
        status=JobStatus(data["status"]),
        model=data["model"],
        created_at=float(data["created_at"]),
        started_at=float(data["started_at"]) if "started_at" in data else None,
        finished_at=float(data["finished_at"]) if "finished_at" in data else None,
        attempt=int(data.get("attempt", 0)),
        **nested,
    )


def owner_field(owner: str) -> str:
    """The record's field that lets API key `owner` see the job; its value counts the key's
    holds on it (requests of that key sharing the job and not let go)."""
    return f"owner:{owner}"


def _text(reply: bytes | str) -> str:
    return reply.decode() if isinstance(reply, bytes) else reply


class Fenced(StrEnum):
    """How a fenced write of an attempt went."""

    ok = "ok"
    missing = "missing"  # no record: the job expired (or never existed)
    finished = "finished"  # it had already ended: nothing written
    superseded = "superseded"  # the record names another attempt: nothing written
    held = "held"  # an orphan's lease is held after all: nothing written


class Reaped(StrEnum):
    held = "held"
    requeued = "requeued"
    fail = "fail"
    settled = "settled"
    gone = "gone"


class JobStore:
    def __init__(self, redis: Redis, *, ttl_s: int, events_maxlen: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.events_maxlen = events_maxlen
        self._start = redis.register_script(lua.START)
        self._append = redis.register_script(lua.APPEND)
        self._finish = redis.register_script(lua.FINISH)
        self._hand_back = redis.register_script(lua.HAND_BACK)
        self._reap = redis.register_script(lua.REAP)
        self._renew = redis.register_script(lua.RENEW)
        self._release = redis.register_script(lua.RELEASE)
        self._share = redis.register_script(lua.SHARE)
        self._admit = redis.register_script(lua.ADMIT)

    async def create(
        self,
        job: Job,
        *,
        pool: str,
        owner: str,
        webhook: str | None = None,
        in_flight: bool = False,
    ) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            self.stage_create(
                pipe, job, pool=pool, owner=owner, webhook=webhook, in_flight=in_flight
            )
            await pipe.execute()

    def stage_create(
        self,
        pipe: Pipeline,
        job: Job,
        *,
        pool: str,
        owner: str,
        webhook: str | None = None,
        in_flight: bool = False,
        trace_context: Mapping[str, str] | None = None,
    ) -> None:
        """Add the record's creation to `pipe`, so it can share a round trip with the enqueue.
        `owner` (an API key's principal) holds it; `in_flight`: the job counts towards the
        owner's concurrency limit (`admit`) until it ends. `trace_context` (W3C headers) is kept
        for the spans of the job's webhook deliveries."""
        extra = {"pool": pool, "holders": "1", owner_field(owner): "1"}
        if webhook:
            extra["webhook"] = webhook
        if in_flight:
            extra["in_flight"] = keys.in_flight(owner)
        if trace_context:
            extra["trace_context"] = orjson.dumps(trace_context).decode()
        pipe.hset(keys.job(job.id), mapping={**_to_hash(job), **extra})
        pipe.expire(keys.job(job.id), self.ttl_s)

    async def webhook(self, job_id: str) -> str | None:
        raw = await cast("Awaitable[bytes | None]", self.redis.hget(keys.job(job_id), "webhook"))
        return None if raw is None else raw.decode()

    async def trace_context(self, job_id: str) -> dict[str, str]:
        """The trace context the job was submitted in; empty if none was kept."""
        raw = await cast(
            "Awaitable[bytes | None]", self.redis.hget(keys.job(job_id), "trace_context")
        )
        return {} if raw is None else dict(orjson.loads(raw))

    async def load(self, job_id: str, *, owner: str | None = None) -> Job | None:
        """The job, or None if it is gone or, with `owner`, not that API key's to see."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.job(job_id))
            pipe.lrange(keys.deliveries(job_id), 0, -1)
            raw, deliveries = await pipe.execute()
        if not raw:
            return None
        if owner is not None and owner_field(owner).encode() not in raw:
            return None
        job = _from_hash(job_id, raw)
        job.webhook_deliveries = [WebhookDelivery.model_validate_json(d) for d in deliveries]
        return job

    async def log_delivery(self, job_id: str, delivery: WebhookDelivery) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.rpush(keys.deliveries(job_id), delivery.model_dump_json())
            pipe.expire(keys.deliveries(job_id), self.ttl_s)
            await pipe.execute()

    async def pool(self, job_id: str) -> str | None:
        """The worker pool whose queue holds the job."""
        raw = await cast("Awaitable[bytes | None]", self.redis.hget(keys.job(job_id), "pool"))
        return None if raw is None else raw.decode()

    async def share(self, job_id: str, owner: str, *, hold: bool) -> bool:
        """An identical request of `owner` attached to the job: the key may see it and, with
        `hold`, holds it too. False if the record is gone."""
        args = [owner_field(owner), "1" if hold else "0"]
        return bool(await self._share(keys=[keys.job(job_id)], args=args))

    async def release_holder(self, job_id: str, owner: str) -> int:
        """`owner` lets go of one of its holds on the job; how many holds are left in all."""
        return int(await self._release(keys=[keys.job(job_id)], args=[owner_field(owner)]))

    async def admit(self, owner: str, job_ids: list[str], limit: int) -> tuple[bool, int]:
        """Count new jobs towards `owner`'s concurrency limit, unless that would pass it:
        (admitted, jobs in flight)."""
        args: list[str | int] = [limit, keys.job_prefix(), *job_ids]
        ok, count = await self._admit(keys=[keys.in_flight(owner)], args=args)
        return bool(ok), int(count)

    async def leave_in_flight(self, owner: str, job_ids: list[str]) -> None:
        """Jobs admitted but never queued (the submission failed)."""
        await cast("Awaitable[int]", self.redis.srem(keys.in_flight(owner), *job_ids))

    async def status(self, job_id: str) -> JobStatus | None:
        """The job's status; None once the record is gone (expired, or never there)."""
        raw = await cast("Awaitable[bytes | None]", self.redis.hget(keys.job(job_id), "status"))
        return None if raw is None else JobStatus(raw.decode())

    async def request_cancel(self, job_id: str) -> None:
        """Flag a job for cancellation; a worker that picks it up later sees the flag."""
        await cast("Awaitable[int]", self.redis.hset(keys.job(job_id), "cancel", "1"))

    async def cancel_requested(self, job_id: str) -> bool:
        return (await self.cancel_flags([job_id]))[0]

    async def cancel_flags(self, job_ids: list[str]) -> list[bool]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(keys.job(job_id), "cancel")
            return [flag is not None for flag in await pipe.execute()]

    async def start_attempt(
        self, job_id: str, *, attempt: int, worker: str, model: str, pool: str
    ) -> Fenced:
        """Record that `worker` runs attempt `attempt`, unless the job ended or a later attempt
        started; log the start for the pool's drain rate (queue ETAs)."""
        keys_ = [keys.job(job_id), keys.running(pool), keys.starts(pool)]
        args: list[str | float] = [job_id, attempt, worker, model, time.time(), DRAIN_WINDOW_S]
        return Fenced(_text(await self._start(keys=keys_, args=args)))

    async def append_step(
        self, tokens: dict[str, list[TokenEvent]], attempts: dict[str, int]
    ) -> list[str]:
        """One round trip for every job's new tokens of one decode step. Returns the jobs whose
        attempt is no longer theirs: their tokens were dropped, and their rows should stop."""
        ids = list(tokens)
        keys_: list[str] = []
        args: list[str | int] = [self.events_maxlen, self.ttl_s]
        for job_id in ids:
            keys_ += [keys.job(job_id), keys.events(job_id)]
            args += [attempts[job_id], len(tokens[job_id])]
            for token in tokens[job_id]:
                args += [token.index, token.encoded()]
        lost = await self._append(keys=keys_, args=args)
        return [ids[int(n) - 1] for n in lost]

    async def published(self, job_id: str) -> list[TokenEvent] | None:
        """The token events earlier, interrupted attempts published, in order; None where the
        stream no longer holds them all (trimmed at `events_maxlen`, or expired)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hget(keys.job(job_id), "tokens")
            pipe.xrange(keys.events(job_id))
            count, entries = await pipe.execute()
        published = [
            TokenEvent.model_validate_json(event.data)
            for event in (events.decode(entry_id, fields) for entry_id, fields in entries)
            if event.type is events.EventType.token
        ]
        if [token.index for token in published] != list(range(int(count or 0))):
            return None
        return published

    async def finish(self, job: Job, *, pool: str, orphan: bool = False) -> Fenced:
        """Store the final record and close the event stream, atomically and once: refused if
        the job already ended or its record names another attempt than `job.attempt`. Both then
        expire. `orphan`: only if no worker holds the job's lease, and take it off its queue."""
        assert job.finished_at is not None, "a final record says when it finished"
        kind, data = events.final_fields(job)
        keys_ = [
            keys.job(job.id),
            keys.events(job.id),
            keys.running(pool),
            keys.arq_in_progress(job.id),
            keys.queue(pool),
            keys.arq_job(job.id),
            keys.arq_retry(job.id),
        ]
        record = _to_hash(job)
        fields = [item for pair in record.items() for item in pair]
        orphaned = "1" if orphan else "0"
        args: list[str | int] = [job.id, job.attempt, self.ttl_s, kind, data, orphaned]
        args += [record["finished_at"], *fields]
        return Fenced(_text(await self._finish(keys=keys_, args=args)))

    async def hand_back(self, job_id: str, *, attempt: int, pool: str) -> Fenced:
        """Put a started job back to `queued` (its worker is stopping); arq re-queues it."""
        keys_ = [keys.job(job_id), keys.running(pool)]
        return Fenced(_text(await self._hand_back(keys=keys_, args=[job_id, attempt])))

    async def started(self, pool: str) -> list[str]:
        """Jobs of `pool` a worker has started and that have not ended (or been reaped)."""
        return [i.decode() for i in await self.redis.zrange(keys.running(pool), 0, -1)]

    async def reap(self, job_id: str, *, pool: str, max_tries: int) -> Reaped:
        keys_ = [
            keys.job(job_id),
            keys.arq_in_progress(job_id),
            keys.running(pool),
            keys.queue(pool),
        ]
        return Reaped(_text(await self._reap(keys=keys_, args=[job_id, max_tries])))

    async def renew_leases(self, held: dict[str, int | None], lease_ms: int) -> list[str]:
        """Renew the leases of the jobs a worker holds (attempt None: not started yet). Returns
        the started jobs whose lease lapsed and went to another attempt."""
        ids = list(held)
        if not ids:
            return []
        keys_ = [keys.arq_in_progress(i) for i in ids] + [keys.job(i) for i in ids]
        attempts = [held[i] for i in ids]
        args: list[str | int] = [lease_ms, *("" if a is None else a for a in attempts)]
        lost = await self._renew(keys=keys_, args=args)
        return [ids[int(n) - 1] for n in lost if held[ids[int(n) - 1]] is not None]

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from common import keys
from common.events import EventType, decode, decode_job
from common.jobs import Job, JobResult, JobStatus, TokenEvent, Usage
from common.jobstore import Fenced, JobStore

POOL = "p"
OWNER = "key-a"


def new_job(job_id: str = "j1") -> Job:
    return Job(id=job_id, status=JobStatus.queued, model="m", created_at=time.time())


def succeeded(job: Job, text: str, attempt: int) -> Job:
    return job.model_copy(
        update={
            "status": JobStatus.succeeded,
            "attempt": attempt,
            "finished_at": time.time(),
            "result": JobResult(
                text=text,
                finish_reason="length",
                usage=Usage(prompt_tokens=1, completion_tokens=len(text)),
            ),
        }
    )


async def start(store: JobStore, job_id: str, attempt: int) -> Fenced:
    return await store.start_attempt(job_id, attempt=attempt, worker="w", model="m", pool=POOL)


def tokens(*texts: str, first: int = 0) -> list[TokenEvent]:
    return [TokenEvent(index=first + i, text=t) for i, t in enumerate(texts)]


async def test_record_round_trips_and_expires(redis: Redis) -> None:
    store = JobStore(redis, ttl_s=100, events_maxlen=1000)
    job = new_job()
    await store.create(job, pool="gpu", owner=OWNER)
    assert await store.load("j1") == job
    assert await store.pool("j1") == "gpu"
    assert 0 < await redis.ttl(keys.job("j1")) <= 100
    assert await store.load("missing") is None


async def test_finish_writes_record_and_closing_event_with_ttl(redis: Redis) -> None:
    store = JobStore(redis, ttl_s=100, events_maxlen=1000)
    job = new_job()
    await store.create(job, pool=POOL, owner=OWNER)
    assert await start(store, "j1", 1) is Fenced.ok
    assert await store.append_step({"j1": tokens("a", "b")}, {"j1": 1}) == []
    assert [t.text for t in await store.published("j1") or []] == ["a", "b"]
    final = succeeded(job, "ab", attempt=1)
    assert await store.finish(final, pool=POOL) is Fenced.ok
    loaded = await store.load("j1")
    assert loaded is not None
    assert loaded.started_at is not None
    assert loaded.model_copy(update={"started_at": None}) == final
    entries = [decode(i, f) for i, f in await redis.xrange(keys.events("j1"))]
    assert [e.type for e in entries] == [EventType.token, EventType.token, EventType.done]
    assert decode_job(entries[-1]) == final
    assert 0 < await redis.ttl(keys.events("j1")) <= 100
    assert await store.started(POOL) == []


async def test_a_new_job_has_published_nothing(redis: Redis) -> None:
    store = JobStore(redis, ttl_s=100, events_maxlen=1000)
    assert await store.published("fresh") == []


async def test_published_is_none_once_the_stream_lost_its_start(redis: Redis) -> None:
    """A re-run cannot go on from a stream trimmed past its first events."""
    store = JobStore(redis, ttl_s=100, events_maxlen=1000)
    await store.create(new_job(), pool=POOL, owner=OWNER)
    await start(store, "j1", 1)
    await store.append_step({"j1": tokens("a", "b", "c")}, {"j1": 1})
    await redis.xtrim(keys.events("j1"), maxlen=2, approximate=False)
    assert await store.published("j1") is None


async def test_a_superseded_attempt_writes_nothing(redis: Redis) -> None:
    store = JobStore(redis, ttl_s=100, events_maxlen=1000)
    job = new_job()
    await store.create(job, pool=POOL, owner=OWNER)
    assert await start(store, "j1", 1) is Fenced.ok
    await store.append_step({"j1": tokens("a")}, {"j1": 1})
    assert await start(store, "j1", 2) is Fenced.ok  # the lease lapsed; another worker runs it
    assert await start(store, "j1", 1) is Fenced.superseded
    assert await store.append_step({"j1": tokens("b", first=1)}, {"j1": 1}) == ["j1"]
    assert await store.finish(succeeded(job, "ab", attempt=1), pool=POOL) is Fenced.superseded
    await store.append_step({"j1": tokens("x", first=1)}, {"j1": 2})
    assert await store.finish(succeeded(job, "ax", attempt=2), pool=POOL) is Fenced.ok
    assert await store.finish(succeeded(job, "ax", attempt=2), pool=POOL) is Fenced.finished
    assert await start(store, "j1", 3) is Fenced.finished
    entries = [decode(i, f) for i, f in await redis.xrange(keys.events("j1"))]
    assert [e.type for e in entries] == [EventType.token, EventType.token, EventType.done]
    assert decode_job(entries[-1]).result.text == "ax"  # type: ignore[union-attr]


async def test_racing_finishes_leave_one_result(redis: Redis) -> None:
    store = JobStore(redis, ttl_s=100, events_maxlen=1000)
    job = new_job()
    await store.create(job, pool=POOL, owner=OWNER)
    await start(store, "j1", 1)
    outcomes = await asyncio.gather(
        *(store.finish(succeeded(job, f"r{i}", attempt=1), pool=POOL) for i in range(8))
    )
    assert sorted(outcomes) == sorted([Fenced.ok] + [Fenced.finished] * 7)
    entries = await redis.xrange(keys.events("j1"))
    assert len(entries) == 1


async def test_holders_count_down(redis: Redis) -> None:
    store = JobStore(redis, ttl_s=100, events_maxlen=1000)
    await store.create(new_job(), pool=POOL, owner=OWNER)
    assert await store.share("j1", OWNER, hold=True)
    assert await store.release_holder("j1", OWNER) == 1
    assert await store.release_holder("j1", OWNER) == 0
    assert await store.release_holder("gone", OWNER) == -1
    assert not await redis.exists(keys.job("gone"))


async def test_a_key_lets_go_only_of_its_own_holds(redis: Redis) -> None:
    store = JobStore(redis, ttl_s=100, events_maxlen=1000)
    await store.create(new_job(), pool=POOL, owner=OWNER)
    assert await store.share("j1", "key-b", hold=True)
    # key-c never held it: its releases change nothing, however many.
    assert await store.release_holder("j1", "key-c") == 2
    assert await store.release_holder("j1", "key-c") == 2
    assert await store.release_holder("j1", OWNER) == 1
    assert await store.release_holder("j1", OWNER) == 1
    assert await store.release_holder("j1", "key-b") == 0


async def test_only_owners_load_a_job(redis: Redis) -> None:
    store = JobStore(redis, ttl_s=100, events_maxlen=1000)
    await store.create(new_job(), pool=POOL, owner=OWNER)
    assert await store.load("j1", owner=OWNER) is not None
    assert await store.load("j1", owner="key-b") is None
    assert await store.load("j1") is not None  # the gateway's and workers' own reads
    assert await store.share("j1", "key-b", hold=False)
    assert await store.load("j1", owner="key-b") is not None


async def test_sharing_an_expired_job_recreates_nothing(redis: Redis) -> None:
    store = JobStore(redis, ttl_s=100, events_maxlen=1000)
    assert not await store.share("gone", OWNER, hold=True)
    assert not await redis.exists(keys.job("gone"))


async def test_admit_counts_jobs_in_flight_until_they_end(redis: Redis) -> None:
    store = JobStore(redis, ttl_s=100, events_maxlen=1000)
    for job_id in ("j1", "j2"):
        assert (await store.admit(OWNER, [job_id], limit=2))[0]
        await store.create(new_job(job_id), pool=POOL, owner=OWNER, in_flight=True)
    assert await store.admit(OWNER, ["j3"], limit=2) == (False, 2)
    assert await store.admit("key-b", ["j4"], limit=2) == (True, 1)  # another key's own count
    await start(store, "j1", 1)
    assert await store.finish(succeeded(new_job("j1"), "x", 1), pool=POOL) is Fenced.ok
    assert await store.admit(OWNER, ["j3"], limit=2) == (True, 2)


async def test_admit_drops_jobs_whose_record_is_gone(redis: Redis) -> None:
    store = JobStore(redis, ttl_s=100, events_maxlen=1000)
    assert await store.admit(OWNER, ["lost-1", "lost-2"], limit=2) == (True, 2)
    # Their submissions never wrote a record (a gateway died): they do not hold the slots.
    assert await store.admit(OWNER, ["j1", "j2"], limit=2) == (True, 2)
    assert await store.admit(OWNER, ["j3"], limit=2) == (True, 1)


async def test_a_replayed_write_repeats_nothing(redis: Redis) -> None:
    """A write whose reply was lost (Redis stalled past the client's timeout, then carried it
    out) is retried: the retry must neither repeat tokens nor count as another's result."""
    store = JobStore(redis, ttl_s=100, events_maxlen=1000)
    job = new_job()
    await store.create(job, pool=POOL, owner=OWNER)
    await start(store, "j1", 1)
    await store.append_step({"j1": tokens("a", "b")}, {"j1": 1})
    await store.append_step({"j1": tokens("a", "b")}, {"j1": 1})
    await store.append_step({"j1": tokens("b", "c", first=1)}, {"j1": 1})
    assert [t.index for t in await store.published("j1") or []] == [0, 1, 2]
    final = succeeded(job, "abc", attempt=1)
    assert await store.finish(final, pool=POOL) is Fenced.ok
    assert await store.finish(final, pool=POOL) is Fenced.ok
    late = final.model_copy(update={"finished_at": time.time() + 1})
    assert await store.finish(late, pool=POOL) is Fenced.finished
    entries = [decode(i, f) for i, f in await redis.xrange(keys.events("j1"))]
    assert [e.type for e in entries] == [EventType.token] * 3 + [EventType.done]
    indexes = [TokenEvent.model_validate_json(e.data).index for e in entries[:3]]
    assert indexes == [0, 1, 2]

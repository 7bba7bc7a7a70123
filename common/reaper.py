"""The reaper: started jobs that no live worker holds go back to their queue, or fail.

A worker holds each job it runs by a lease (arq's in-progress key) that its heartbeat renews. A
worker that dies, hangs or loses Redis for longer than the lease stops renewing, and the lease
lapses: arq lets any worker of the pool claim the job again, and the reaper puts its record back
to `queued` (or fails it with `worker_lost` once it has used up GENQ_MAX_TRIES), so no job shows
`running` without a live worker.

Every step is one atomic script that checks the state it changes, so the reaper is idempotent and
safe to run anywhere and at once: every worker sweeps its pool, and gateways sweep every pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable

from arq.connections import ArqRedis
from prometheus_client import Counter
from redis.exceptions import RedisError

from common import keys
from common.contract import ErrorCode
from common.jobs import Job, JobError, JobStatus, Timings
from common.jobstore import Fenced, JobStore, Reaped
from common.webhooks import enqueue_delivery

logger = logging.getLogger(__name__)

REAPED = Counter(
    "genq_jobs_reaped_total",
    "Started jobs found without a live worker: requeued, or failed after GENQ_MAX_TRIES",
    ["pool", "outcome"],
)


class Reaper:
    def __init__(self, redis: ArqRedis, store: JobStore, max_tries: int) -> None:
        self.redis = redis
        self.store = store
        self.max_tries = max_tries

    async def take_turn(self, pool: str, owner: str, interval_s: float) -> None:
        """Sweep `pool` unless another process has swept it within `interval_s`: one sweep per
        interval for the whole fleet."""
        turn = keys.reaper_turn(pool)
        if await self.redis.set(turn, owner, nx=True, px=int(interval_s * 1000)):
            await self.sweep(pool)

    async def sweep_forever(self, pools: Callable[[], Iterable[str]], interval_s: float) -> None:
        """For gateways: take turns at every pool, so jobs of a pool whose workers are all gone
        go back to `queued` too."""
        owner = uuid.uuid4().hex
        while True:
            await asyncio.sleep(interval_s)
            try:
                for pool in pools():
                    await self.take_turn(pool, owner, interval_s)
            except (RedisError, OSError) as e:
                logger.debug("reaper skipped a sweep: %s", e)

    async def sweep(self, pool: str) -> dict[Reaped, int]:
        """One look at every started job of `pool`; how many ended up in each state."""
        seen: dict[Reaped, int] = {}
        for job_id in await self.store.started(pool):
            outcome = await self.store.reap(job_id, pool=pool, max_tries=self.max_tries)
            if outcome is Reaped.requeued:
                logger.warning("job %s lost its worker; back on the queue of %s", job_id, pool)
                REAPED.labels(pool, "requeued").inc()
            elif outcome is Reaped.fail and await self._fail(job_id, pool):
                REAPED.labels(pool, "failed").inc()
            seen[outcome] = seen.get(outcome, 0) + 1
        return seen

    async def _fail(self, job_id: str, pool: str) -> bool:
        job = await self.store.load(job_id)
        if job is None:
            return False
        final = _lost(job, self.max_tries)
        if await self.store.finish(final, pool=pool, orphan=True) is not Fenced.ok:
            return False  # a worker took it, or it ended, since the look
        logger.error("job %s failed: %s", job_id, final.error.message if final.error else "")
        if webhook := await self.store.webhook(job_id):
            await enqueue_delivery(self.redis, pool, job_id, webhook)
        return True


def _lost(job: Job, max_tries: int) -> Job:
    now = time.time()
    return job.model_copy(
        update={
            "status": JobStatus.failed,
            "finished_at": now,
            "error": JobError(
                code=ErrorCode.worker_lost,
                message=f"the workers running the job stopped {job.attempt} times "
                f"(GENQ_MAX_TRIES={max_tries}), or its queue entry was lost",
            ),
            "timings": Timings(
                total_s=now - job.created_at,
                queued_s=None if job.started_at is None else job.started_at - job.created_at,
            ),
        }
    )

"""Webhook deliveries: queued by whoever finishes a job, run by the pool's workers."""

from __future__ import annotations

from arq.connections import ArqRedis

from common import keys
from common.contract import DELIVER_WEBHOOK_FUNCTION


async def enqueue_delivery(redis: ArqRedis, pool: str, job_id: str, url: str) -> None:
    await redis.enqueue_job(
        DELIVER_WEBHOOK_FUNCTION,
        job_id,
        url,
        _job_id=f"webhook-{job_id}",
        _queue_name=keys.queue(pool),
    )

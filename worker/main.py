"""The worker process: an arq worker whose one job function runs generation requests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from typing import Any

import orjson
from arq import Worker
from arq.worker import func
from prometheus_client import start_http_server
from redis.exceptions import RedisError

from common import keys, registry
from common.catalog import CatalogError, CatalogSource
from common.jobstore import JobStore
from common.logs import setup_logging
from common.redisconn import create_redis, deserialize_job, serialize_job
from common.schemas import GenerationRequest
from common.settings import Settings
from common.webhooks import DELIVER_FUNCTION
from worker.loading import ModelLoadError
from worker.service import JobPayload, JobRunner
from worker.webhooks import WebhookSender, deliver_webhook

logger = logging.getLogger(__name__)

JOB_FUNCTION = "generate"


async def generate(
    ctx: dict[str, Any],
    job_id: str,
    request: dict[str, Any],
    seed: int,
    max_new_tokens: int,
    model: str,
) -> str:
    runner: JobRunner = ctx["runner"]
    payload = JobPayload(
        job_id=job_id,
        request=GenerationRequest.model_validate(request),
        seed=seed,
        max_new_tokens=max_new_tokens,
        model=model,
    )
    job = await runner.run(payload, attempt=ctx["job_try"])
    return job.status.value


class WorkerProcess:
    def __init__(self, settings: Settings, source: CatalogSource) -> None:
        self.settings = settings
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.started_at = time.time()
        self.redis = create_redis(settings)
        store = JobStore(
            self.redis, ttl_s=settings.result_ttl_s, events_maxlen=settings.events_maxlen
        )
        self._beat_now = asyncio.Event()
        self.runner = JobRunner(store, settings, self.redis, source, self._beat_now.set)
        self.webhooks = WebhookSender(store, settings)
        self._beating: asyncio.Task[None] | None = None
        self._listening: asyncio.Task[None] | None = None
        self._reloads: set[asyncio.Task[None]] = set()

    def info(self) -> registry.WorkerInfo:
        return registry.WorkerInfo(
            id=self.id,
            pool=self.settings.pool,
            models=self.runner.models.holdings(),
            running=self.runner.running,
            started_at=self.started_at,
            host=socket.gethostname(),
            pid=os.getpid(),
        )

    async def startup(self, ctx: dict[str, Any]) -> None:
        ctx["runner"] = self.runner
        ctx["webhooks"] = self.webhooks
        await self.runner.start()
        await registry.heartbeat(self.redis, self.info(), self.settings.worker_heartbeat_s)
        self._beating = asyncio.create_task(self._beat_forever())
        self._listening = asyncio.create_task(self._listen())
        held = ", ".join(m.key for m in self.runner.models.holdings()) or "none yet"
        logger.info("worker %s ready: pool %s, models %s", self.id, self.settings.pool, held)

    async def shutdown(self, ctx: dict[str, Any]) -> None:
        for task in (self._beating, self._listening):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(OSError):
            await registry.remove_worker(self.redis, self.info())
        await self.runner.stop()
        await self.webhooks.close()

    async def _beat_forever(self) -> None:
        """Beat every GENQ_WORKER_HEARTBEAT_S, and at once when a model's state changes, so
        that `GET /v1/models` shows loads, failures and evictions as they happen."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), self.settings.worker_heartbeat_s)
            self._beat_now.clear()
            try:
                await registry.heartbeat(self.redis, self.info(), self.settings.worker_heartbeat_s)
            except (OSError, RedisError) as e:  # Redis away: arq reconnects; keep beating.
                logger.warning("heartbeat failed: %s", e)

    async def _listen(self) -> None:
        """Relay cancel requests and reload commands as they are published.

        `get_message` waits with its own timeout, below the connection's socket timeout, so
        a quiet channel is not mistaken for a dead one. Cancel requests published while the
        channel was down are caught by the runner's sweep of cancel flags.
        """
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(keys.cancellations(), keys.control())
                    while True:
                        message = await pubsub.get_message(timeout=1.0)
                        if message is not None:
                            self._on_message(message["channel"].decode(), message["data"])
                        await self.runner.sweep_cancel_flags()
            except (OSError, RedisError) as e:
                logger.warning("cancel/control channels lost, resubscribing: %s", e)
                await asyncio.sleep(1)

    def _on_message(self, channel: str, data: bytes) -> None:
        if channel == keys.cancellations():
            self.runner.cancel(data.decode())
            return
        command = orjson.loads(data)
        if command.get("action") == "reload":
            # In the background: the listener keeps relaying cancellations meanwhile.
            task = asyncio.create_task(self.runner.models.reload(str(command["name"])))
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)

    def build(self) -> Worker:
        s = self.settings
        return Worker(
            # One try more than GENQ_MAX_TRIES so the job function itself records the failure.
            functions=[
                func(generate, name=JOB_FUNCTION, max_tries=s.max_tries + 1),
                func(deliver_webhook, name=DELIVER_FUNCTION, max_tries=s.webhook_max_tries),
            ],
            queue_name=keys.queue(s.pool),
            redis_pool=self.redis,
            on_startup=self.startup,
            on_shutdown=self.shutdown,
            max_jobs=s.worker_max_jobs,
            # A backstop only: generation stops itself at GENQ_JOB_TIMEOUT_S with a recorded error.
            job_timeout=s.job_timeout_s + 10,
            job_completion_wait=s.worker_job_completion_wait_s,
            keep_result=0,
            poll_delay=s.worker_poll_delay_s,
            queue_read_limit=s.worker_queue_read_limit,
            health_check_key=keys.worker_health(self.id),
            health_check_interval=max(1, int(s.worker_heartbeat_s)),
            job_serializer=serialize_job,
            job_deserializer=deserialize_job,
            allow_abort_jobs=True,
        )


def run_worker(settings: Settings) -> None:
    """Load the pool's preloaded models, then serve jobs until SIGINT/SIGTERM. Exits 2 if the
    registry is invalid or none of the preloaded models loads."""
    setup_logging(settings)
    try:
        process = WorkerProcess(settings, CatalogSource(settings))
        process.runner.models.preload()
    except (CatalogError, ModelLoadError) as e:
        logger.error("%s", e)
        raise SystemExit(2) from e
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port)
    process.build().run()

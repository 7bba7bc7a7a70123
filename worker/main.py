"""The worker process: an arq worker whose job function runs generation requests, with its
heartbeat (which renews its jobs' leases), the reaper, the watchdog and its probes."""

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
from arq.worker import func
from redis.exceptions import RedisError

from common import heartbeats, keys, logs, tracing
from common.catalog import CatalogError, CatalogSource
from common.contract import (
    DELIVER_WEBHOOK_FUNCTION,
    GENERATE_FUNCTION,
    deserialize_payload,
    serialize_payload,
)
from common.jobstore import JobStore
from common.logs import setup_logging
from common.reaper import Reaper
from common.redisconn import create_redis, sync_client
from common.settings import Settings
from worker import metrics
from worker.arq_worker import ResilientWorker
from worker.engine import Engine
from worker.job_runner import JobRunner
from worker.loading import ModelLoadError, resolve_device
from worker.probes import serve_probes
from worker.watchdog import Watchdog
from worker.webhooks import WebhookSender, deliver_webhook

logger = logging.getLogger(__name__)

# Beyond GENQ_WORKER_JOB_COMPLETION_WAIT_S, what a stopping worker may take to hand its jobs
# back and close: past it, it exits anyway.
SHUTDOWN_MARGIN_S = 10
# How often running jobs' cancel flags are checked: the net under missed cancel messages.
_SWEEP_EVERY_S = 1.0
# arq's own job timeout is only a backstop: a job ends itself at GENQ_JOB_TIMEOUT_S, then may
# spend a minute or two retrying its writes while Redis is away.
_BACKSTOP_MARGIN_S = 180


def read_payload(data: bytes) -> dict[str, Any]:
    """arq's payload of a job. Read as arq picks the job up, before its first line about it: a
    work item's request id and trace id tag the job's log lines from here on."""
    payload = deserialize_payload(data)
    args = payload.get("a") or ()
    if payload.get("f") == GENERATE_FUNCTION and args and isinstance(args[0], dict):
        item = args[0]
        context = logs.current()
        context.request_id = item.get("request_id")
        context.trace_id = tracing.trace_id(item.get("trace_context") or {})
    return payload


async def run_generation_job(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> str:
    """The job function registered as GENERATE_FUNCTION; its one argument is the work item
    (`common.contract.WorkItem`)."""
    runner: JobRunner = ctx["runner"]
    payload = args[0] if len(args) == 1 and not kwargs else {"args": args, **kwargs}
    return await runner.run(ctx["job_id"], payload, attempt=ctx["job_try"])


class WorkerProcess:
    def __init__(self, settings: Settings, source: CatalogSource) -> None:
        self.settings = settings
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.started_at = time.time()
        self.redis = create_redis(settings)
        self.store = JobStore(
            self.redis, ttl_s=settings.result_ttl_s, events_maxlen=settings.events_maxlen
        )
        self.draining = False
        self._beat_now = asyncio.Event()
        self.runner = JobRunner(
            self.store,
            settings,
            self.redis,
            source,
            self._beat_now.set,
            self.id,
            lambda: self.draining,
        )
        self.webhooks = WebhookSender(self.store, settings)
        self.reaper = Reaper(self.redis, self.store, settings.max_tries)
        self.watchdog = Watchdog(
            self._engines, settings.worker_watchdog_timeout_s, self._release_leases
        )
        self.lease_ms = heartbeats.lapse_ms(settings.worker_heartbeat_s)
        self.worker: ResilientWorker | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._reloads: set[asyncio.Task[None]] = set()

    def info(self) -> heartbeats.WorkerInfo:
        return heartbeats.WorkerInfo(
            id=self.id,
            pool=self.settings.pool,
            models=self.runner.models.holdings(),
            running=self.runner.running,
            started_at=self.started_at,
            host=socket.gethostname(),
            pid=os.getpid(),
        )

    def live(self) -> str | None:
        """Why the worker is not live: what tripped (or would trip) its watchdog."""
        return self.watchdog.tripped or self.watchdog.problem()

    def ready(self) -> str | None:
        """Why the worker should get no work now."""
        if self.draining:
            return "shutting down"
        if self.worker is None:
            return "loading its models"
        if not self.worker.connected:
            return "Redis unreachable"
        return self.live()

    async def startup(self, ctx: dict[str, Any]) -> None:
        ctx["runner"] = self.runner
        ctx["webhooks"] = self.webhooks
        await self.runner.start()
        self._tasks = [
            asyncio.create_task(coroutine)
            for coroutine in (self._beat_forever(), self._listen(), self._tick_forever())
        ]
        self.watchdog.start()
        held = ", ".join(m.key for m in self.runner.models.holdings()) or "none yet"
        logger.info("worker %s ready: pool %s, models %s", self.id, self.settings.pool, held)

    async def shutdown(self, ctx: dict[str, Any]) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(OSError, RedisError, TimeoutError):
            async with asyncio.timeout(1):
                await heartbeats.remove_worker(self.redis, self.info())
        await self.runner.stop()
        await self.webhooks.close()

    def _engines(self) -> list[Engine]:
        return self.runner.models.engines()

    def _leased_jobs(self) -> dict[str, int | None]:
        """The jobs this worker holds a lease on, with the attempt it runs (None: not started)."""
        tasks = self.worker.tasks if self.worker is not None else {}
        return {
            job_id: self.runner.attempt_of(job_id)
            for job_id, task in list(tasks.items())
            if not task.done()
        }

    async def _beat_forever(self) -> None:
        """Every GENQ_WORKER_HEARTBEAT_S, and at once when a model's state changes (so that
        `GET /v1/models` shows loads, failures and evictions as they happen): say it is alive,
        renew the leases of its jobs, and take its turn at reaping its pool. Stops for good
        once the watchdog tripped, so that its jobs' leases lapse."""
        while self.watchdog.healthy:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), self.settings.worker_heartbeat_s)
            self._beat_now.clear()
            if not self.watchdog.healthy:
                return
            try:
                await heartbeats.beat(self.redis, self.info(), self.settings.worker_heartbeat_s)
                for job_id in await self.store.renew_leases(self._leased_jobs(), self.lease_ms):
                    self.runner.lose(job_id)
                await self.reaper.take_turn(
                    self.settings.pool, self.id, self.settings.worker_heartbeat_s
                )
            except (OSError, RedisError) as e:  # Redis away: the arq loop reconnects
                logger.warning("heartbeat failed: %s", e)

    async def _tick_forever(self) -> None:
        while True:
            self.watchdog.loop_alive()
            await asyncio.sleep(1)

    def _release_leases(self) -> None:
        """Called by a tripped watchdog, off the event loop: let other workers take this one's
        jobs now rather than when their leases lapse."""
        leased = list(self._leased_jobs())
        if not leased:
            return
        with (
            sync_client(self.settings, socket_timeout=1, socket_connect_timeout=1) as client,
            contextlib.suppress(RedisError, OSError),
        ):
            client.delete(*(keys.arq_in_progress(job_id) for job_id in leased))

    async def _listen(self) -> None:
        """Relay cancel requests and reload commands as they are published.

        `get_message` waits with its own timeout, below the connection's socket timeout, so
        a quiet channel is not mistaken for a dead one. Cancel requests published while the
        channel was down are caught by the runner's sweep of cancel flags.
        """
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    channels = (keys.cancellations(), keys.control(), keys.wake(self.settings.pool))
                    await pubsub.subscribe(*channels)
                    swept = time.monotonic()
                    while True:
                        message = await pubsub.get_message(timeout=1.0)
                        if message is not None:
                            self._on_message(message["channel"].decode(), message["data"])
                        if time.monotonic() - swept >= _SWEEP_EVERY_S:
                            await self.runner.sweep_cancel_flags()
                            swept = time.monotonic()
            except (OSError, RedisError) as e:
                logger.warning("cancel/control channels lost, resubscribing: %s", e)
                await asyncio.sleep(1)

    def _on_message(self, channel: str, data: bytes) -> None:
        if channel == keys.wake(self.settings.pool):
            if self.worker is not None:
                self.worker.wake()
            return
        if channel == keys.cancellations():
            self.runner.cancel(data.decode())
            return
        command = orjson.loads(data)
        if command.get("action") == "reload":
            # In the background: the listener keeps relaying cancellations meanwhile.
            task = asyncio.create_task(self.runner.models.reload(str(command["name"])))
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)

    def _drain(self) -> None:
        self.draining = True

    def build(self) -> ResilientWorker:
        s = self.settings
        self.worker = ResilientWorker(
            # One try more than GENQ_MAX_TRIES so the job function itself records the failure.
            functions=[
                func(run_generation_job, name=GENERATE_FUNCTION, max_tries=s.max_tries + 1),
                func(deliver_webhook, name=DELIVER_WEBHOOK_FUNCTION, max_tries=s.webhook_max_tries),
            ],
            queue_name=keys.queue(s.pool),
            redis_pool=self.redis,
            on_startup=self.startup,
            on_shutdown=self.shutdown,
            max_jobs=s.worker_max_jobs,
            job_timeout=s.job_timeout_s + _BACKSTOP_MARGIN_S,
            job_completion_wait=s.worker_job_completion_wait_s,
            keep_result=0,
            idle_poll_s=s.worker_poll_delay_s,
            queue_read_limit=s.worker_queue_read_limit,
            health_check_key=keys.worker_health(self.id),
            health_check_interval=max(1, int(s.worker_heartbeat_s)),
            job_serializer=serialize_payload,
            job_deserializer=read_payload,
            allow_abort_jobs=True,
            lease_s=self.lease_ms / 1000,
            grace_s=s.worker_job_completion_wait_s + SHUTDOWN_MARGIN_S,
            on_drain=self._drain,
        )
        return self.worker


def run_worker(settings: Settings) -> None:
    """Load the pool's preloaded models, then serve jobs until SIGINT/SIGTERM. Exits 2 if the
    models file is invalid or none of the preloaded models loads."""
    setup_logging(settings)
    tracing.configure("genq-worker")
    try:
        process = WorkerProcess(settings, CatalogSource(settings))
    except CatalogError as e:
        logger.error("%s", e)
        raise SystemExit(2) from e
    try:
        device = resolve_device(settings.device)
        memory = metrics.MemoryCollector(device, settings.memory_limit_mb * 2**20)
        metrics.configure(settings.pool, memory)
        if settings.worker_metrics_port:
            serve_probes(settings.worker_metrics_port, process.live, process.ready)
        process.runner.models.preload()
    except ModelLoadError as e:
        logger.error("%s", e)
        raise SystemExit(2) from e
    process.build().run()

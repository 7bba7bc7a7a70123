"""arq's worker, made to ride out Redis outages and to stop in bounded time.

Stock arq lets a Redis error escape its poll loop, which ends the worker, and leaks a job slot
when claiming a job fails half way, so that after a few blips it never takes another job. Here a
lost connection only pauses the loop: the worker keeps its models, reports itself disconnected,
retries with jittered backoff, and takes jobs again when Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from arq import Worker
from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from redis.exceptions import RedisError, ResponseError, WatchError

from common import logs

logger = logging.getLogger(__name__)

_BACKOFF_BASE_S = 0.1
_BACKOFF_MAX_S = 5.0
# Exit status of a worker that did not stop within its grace period.
EXIT_SHUTDOWN_TIMEOUT = 4


# arq's INFO line for a job's start, `{queued for}s → {job}({arguments}){extra}`: the arguments
# hold the work item (the prompt) or a webhook's URL.
_ARQ_JOB_START = "%6.2fs → %s(%s)%s"


class _HideJobArguments(logging.Filter):
    """Drops the arguments from arq's job-start lines: prompts and webhook URLs stay out of the
    logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _ARQ_JOB_START and isinstance(record.args, tuple):
            queued, ref, _, extra = record.args
            record.args = (queued, ref, "…", extra)
        return True


_HIDE_JOB_ARGUMENTS = _HideJobArguments()


class ResilientWorker(Worker):
    def __init__(
        self,
        *args: Any,
        lease_s: float,
        grace_s: float,
        idle_poll_s: float,
        on_drain: Callable[[], None],
        **kwargs: Any,
    ) -> None:
        # arq polls its queue every `poll_delay`; here the loop waits for a wake-up (a job was
        # queued, or a job slot came free) or `idle_poll_s`, whichever comes first.
        super().__init__(*args, poll_delay=0, **kwargs)
        self.idle_poll_s = idle_poll_s
        self._wake = asyncio.Event()
        logging.getLogger("arq.worker").addFilter(_HIDE_JOB_ARGUMENTS)
        # A claim is a lease the heartbeat renews, not arq's fixed job timeout: a dead worker's
        # jobs are free again once it lapses.
        self.in_progress_timeout_s = lease_s
        self.grace_s = grace_s
        self.on_drain = on_drain
        self.connected = False
        self._failures = 0
        self._deadline: float | None = None  # time.monotonic() by which a stop must be done

    async def main(self) -> None:
        while True:
            try:
                await super().main()
                return
            except (RedisError, OSError) as e:  # before the poll loop: Redis is not there yet
                await self._disconnected(e)

    def wake(self) -> None:
        """Look at the queue now (a job was queued on it)."""
        self._wake.set()

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self._wake.set()  # a job slot came free: a job waiting in the queue can start

    async def _poll_iteration(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.idle_poll_s)
        self._wake.clear()
        try:
            await super()._poll_iteration()
        except (RedisError, OSError) as e:
            await self._disconnected(e)
            return
        if not self.connected:
            logger.info("Redis reachable: taking jobs")
        self.connected = True
        self._failures = 0

    async def _disconnected(self, error: Exception) -> None:
        if self.connected or not self._failures:
            logger.warning("Redis unreachable, not taking jobs until it is back: %s", error)
        self.connected = False
        self._failures += 1
        cap = min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2**self._failures)
        await asyncio.sleep(random.uniform(0, cap))

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's claim of each job, with the job slot given back when Redis fails midway."""
        for job_id_b in job_ids:
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                return
            self.job_counter += 1
            job_id = job_id_b.decode()
            # A job not claimed gives its slot back without a wake-up: the queue still lists the
            # jobs that run (here or elsewhere) until they end, and a wake-up per such job
            # would poll Redis in a loop for as long as they run.
            try:
                score = await self._claim(job_id)
            except BaseException:
                super()._release_sem_dec_counter_on_complete()
                raise
            if score is None:
                super()._release_sem_dec_counter_on_complete()
                continue
            task = self.loop.create_task(self.run_job(job_id, score))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    async def _claim(self, job_id: str) -> int | None:
        """The job's score once this worker holds its lease; None if another worker has it,
        it finished, or it is not due."""
        in_progress_key = in_progress_key_prefix + job_id
        async with self.pool.pipeline(transaction=True) as pipe:
            await pipe.watch(in_progress_key)
            ongoing = await pipe.exists(in_progress_key)
            score = await pipe.zscore(self.queue_name, job_id)
            if ongoing or not score or score > timestamp_ms():
                return None
            pipe.multi()  # type: ignore[no-untyped-call]  # untyped in redis-py
            pipe.psetex(in_progress_key, int(self.in_progress_timeout_s * 1000), b"1")
            try:
                await pipe.execute()
            except (ResponseError, WatchError):
                return None
        return int(score)

    async def run_job(self, job_id: str, score: int) -> None:
        # arq's own lines about the job (picked up, ended) carry its id, as genq's do.
        logs.bind(job_id=job_id)
        try:
            await super().run_job(job_id, score)
        except (RedisError, OSError) as e:
            # arq could not read or settle the job; its lease lapses and it runs again.
            logger.warning("job %s: Redis failed around the job (%s); it will run again", job_id, e)

    def handle_sig_wait_for_completion(self, signum: signal.Signals) -> None:
        self._stopping(signum)
        super().handle_sig_wait_for_completion(signum)

    def handle_sig(self, signum: signal.Signals) -> None:
        self._stopping(signum)
        super().handle_sig(signum)

    def _stopping(self, signum: signal.Signals) -> None:
        if self._deadline is None:
            self._deadline = time.monotonic() + self.grace_s
            self.on_drain()
            _exit_after(self.grace_s)

    async def close(self) -> None:
        """arq's close (the cancelled jobs hand themselves back, arq settles them, then the
        worker's own shutdown), cut short a second before the grace period ends: a Redis that
        is gone or stalled must not keep the worker from exiting cleanly."""
        if not self._pool:
            return
        left_s = 3600.0 if self._deadline is None else self._deadline - time.monotonic() - 1
        try:
            async with asyncio.timeout(max(left_s, 0.1)):
                await asyncio.gather(*self.tasks.values(), return_exceptions=True)
                if self.connected:
                    with contextlib.suppress(RedisError, OSError):
                        await self.pool.delete(self.health_check_key)
                if self.on_shutdown:
                    await self.on_shutdown(self.ctx)
        except TimeoutError:
            logger.warning("shutdown cut short at the end of its grace period (Redis away?)")
        with contextlib.suppress(RedisError, OSError):
            await self.pool.close(close_connection_pool=True)
        self._pool = None


def _exit_after(grace_s: float) -> None:
    """However shutdown goes (a hung step, Redis stalled), the process is gone by `grace_s`."""

    def force() -> None:
        logger.error("shutdown took longer than %.0f s; exiting now", grace_s)
        os._exit(EXIT_SHUTDOWN_TIMEOUT)

    timer = threading.Timer(grace_s, force)
    timer.daemon = True
    timer.start()

"""A worker looks at its queue when woken (a job queued, a job slot freed) or every
GENQ_WORKER_POLL_DELAY_S, and not more: a job still listed in the queue while it runs must not
wake the poll loop again and again (that spin took a CPU core from the model: 14 against 25
tokens/s at one client on the default model)."""

from __future__ import annotations

import time

import httpx
import redis

from common.settings import Settings
from genq.redis_server import RedisServer
from tests.conftest import Stack


def queue_reads(client: redis.Redis) -> int:
    stats: dict[str, dict[str, int]] = client.info("commandstats")  # type: ignore[assignment]  # sync client
    return int(stats.get("cmdstat_zrangebyscore", {}).get("calls", 0))


def test_a_running_job_does_not_make_the_worker_poll_in_a_loop(
    stack: Stack, stack_redis: RedisServer
) -> None:
    client = redis.Redis.from_url(stack_redis.url)
    body = {"prompt": "Count.", "max_new_tokens": 900, "ignore_eos": True}
    before = queue_reads(client)
    started = time.monotonic()
    done = httpx.post(f"{stack.base}/v1/generate", json=body, timeout=120)
    elapsed = time.monotonic() - started
    reads = queue_reads(client) - before
    assert done.status_code == 200, done.text
    assert done.json()["result"]["usage"]["completion_tokens"] == 900
    # One read per idle poll while the job ran, plus a few: its own pick-up, the gateway's.
    idle_poll_s = Settings.model_fields["worker_poll_delay_s"].default
    assert reads <= elapsed / idle_poll_s + 10, f"{reads} queue reads in {elapsed:.2f} s"

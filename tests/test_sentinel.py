"""Redis through Sentinel: the settings, a stack that serves through it, and acknowledgement only
once a replica holds the job (Redis WAIT)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from pydantic import ValidationError
from redis.exceptions import RedisError

from common import keys
from common.redisconn import sync_client
from common.settings import Settings
from gateway.redisclient import create_gateway_redis
from genq.redis_ha import RedisHA
from genq.redis_server import RedisServer, free_port
from tests.conftest import TINY_NAME
from tests.procs import Proc, genq_env, start_gateway, start_worker

BODY = {"prompt": "Hello", "max_new_tokens": 6, "temperature": 0.5}


def test_sentinel_settings_are_parsed_and_default_to_one_replica_ack(tmp_path: Path) -> None:
    password = tmp_path / "sentinel-password"
    password.write_text("s3cret\n")
    on = Settings(
        redis_sentinels="10.0.0.1:26379, sentinel-b:26380,[::1]:26381",
        redis_sentinel_password_file=password,
    )
    assert on.sentinel_addresses == [("10.0.0.1", 26379), ("sentinel-b", 26380), ("::1", 26381)]
    assert on.redis_sentinel_password is not None
    assert on.redis_sentinel_password.get_secret_value() == "s3cret"
    assert on.replicas_ack == 1
    assert Settings().replicas_ack == 0
    assert Settings(redis_sentinels="a:1", redis_min_replicas_ack=0).replicas_ack == 0
    with pytest.raises(ValidationError, match="GENQ_REDIS_SENTINELS: 'sentinel-b' is not"):
        Settings(redis_sentinels="a:1,sentinel-b")


def test_a_client_built_from_the_settings_finds_the_primary_and_follows_a_failover(
    redis_ha: RedisHA,
) -> None:
    settings = Settings(
        redis_url=redis_ha.url,
        redis_sentinels=redis_ha.sentinel_addresses,
        redis_sentinel_password=redis_ha.sentinel_password,
    )
    with sync_client(settings, socket_timeout=1) as client:
        client.set("before", "1")
        old = redis_ha.primary.port
        redis_ha.primary.kill()
        redis_ha.wait_for_promotion(old)
        # The first command after the kill may meet the dead connection; the next reconnects
        # to the primary the sentinels name now.
        for _ in range(50):
            try:
                client.set("after", "1")
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        assert client.get("before") == b"1"  # replicated before the kill
        assert client.connection_pool.get_master_address()[1] != old  # type: ignore[attr-defined]


async def test_the_gateways_pools_follow_a_failover_to_the_promoted_replica(
    redis_ha: RedisHA,
) -> None:
    settings = Settings(
        redis_url=redis_ha.url,
        redis_sentinels=redis_ha.sentinel_addresses,
        redis_sentinel_password=redis_ha.sentinel_password,
    )
    commands, listeners = create_gateway_redis(settings)
    try:
        await commands.set("before", "1")
        old = redis_ha.primary.port
        # A failover the sentinels run with the old primary alive: it stays up, demoted, and
        # answers writes with READONLY, which must send the pools to the new primary.
        sentinel = redis.Redis(port=redis_ha.sentinels[0].port, password=redis_ha.sentinel_password)
        sentinel.execute_command("SENTINEL", "FAILOVER", "genq")  # type: ignore[no-untyped-call]
        sentinel.close()
        new = await asyncio.to_thread(redis_ha.wait_for_promotion, old)
        pool = commands.connection_pool
        # Until the old primary is demoted, a write may still land on it (and be lost: WAIT
        # is what keeps such a job from being acknowledged); then READONLY, or the sentinels
        # closing its clients, and the breaker's open spell, if it opened. The sentinels demote
        # the old primary on their next look at it: seconds on a loaded machine, hence 30 s.
        for _ in range(300):
            with contextlib.suppress(RedisError):
                await commands.set("after", "1")
                if pool.master_address == ("127.0.0.1", new):  # type: ignore[attr-defined]
                    break
            await asyncio.sleep(0.1)
        assert pool.master_address == ("127.0.0.1", new)  # type: ignore[attr-defined]
        async with listeners.hold() as listener:
            assert await listener.get("before") == b"1"
            assert await listener.get("after") == b"1"
    finally:
        await commands.aclose(close_connection_pool=True)
        await listeners.pool.aclose()


@pytest.fixture(scope="module")
def ha_stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, log_dir: Path
) -> Iterator[tuple[RedisHA, str]]:
    """A gateway and a worker that reach Redis only through the sentinels (their
    GENQ_REDIS_URL names a port nothing listens on)."""
    ha = RedisHA(tmp_path_factory.mktemp("redis-ha"))
    ha.start()
    env = genq_env(
        ha.url,
        **{**ha.env(), "GENQ_REDIS_URL": f"redis://:{ha.password}@127.0.0.1:{free_port()}/0"},
        GENQ_MODEL=str(tiny_model_dir),
        GENQ_MODEL_NAME=TINY_NAME,
    )
    procs: list[Proc] = []
    try:
        gateway, base = start_gateway(env, log_dir)
        procs.append(gateway)
        procs.append(start_worker(env, log_dir, base, TINY_NAME))
        yield ha, base
    finally:
        for proc in procs:
            proc.stop()
        ha.stop()


def _finished(base: str, job_id: str, timeout_s: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job: dict[str, object] = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=5).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s}s")


def test_a_stack_on_sentinel_completes_a_job_the_replica_holds(
    ha_stack: tuple[RedisHA, str],
) -> None:
    ha, base = ha_stack
    accepted = httpx.post(f"{base}/v1/jobs", json=BODY, timeout=10)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    # Acknowledged means replicated: the replica had the job before the 202 left.
    replica = redis.Redis(port=ha.replica.port, password=ha.password)
    assert replica.exists(keys.job(job_id)) == 1
    replica.close()
    assert _finished(base, job_id)["status"] == "succeeded"


def test_a_job_no_replica_confirms_answers_503_and_a_retry_gets_the_same_job(
    ha_stack: tuple[RedisHA, str],
) -> None:
    ha, base = ha_stack
    key = {"Idempotency-Key": f"paused-replica-{time.time_ns()}"}
    ha.replica.pause()
    try:
        refused = httpx.post(f"{base}/v1/jobs", json=BODY, headers=key, timeout=10)
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "1"
        error = refused.json()["error"]
        assert error["code"] == "not_replicated"
        assert "GENQ_REDIS_MIN_REPLICAS_ACK=1" in error["message"]
        # Still unconfirmed: a retry must not be acknowledged either.
        again = httpx.post(f"{base}/v1/jobs", json=BODY, headers=key, timeout=10)
        assert again.status_code == 503, again.text
    finally:
        ha.replica.resume()
    retried = httpx.post(f"{base}/v1/jobs", json=BODY, headers=key, timeout=10)
    assert retried.status_code in (200, 202), retried.text
    job_id = retried.json()["id"]
    assert job_id in error["message"]  # the job the 503 named, not a second one
    assert _finished(base, job_id)["status"] == "succeeded"


def test_a_required_replica_that_does_not_exist_refuses_every_new_job(
    tmp_path: Path, tiny_model_dir: Path, log_dir: Path
) -> None:
    server = RedisServer(tmp_path / "redis", free_port(), persist=False)
    server.start()
    env = genq_env(server.url, GENQ_REDIS_MIN_REPLICAS_ACK="1", GENQ_REDIS_ACK_TIMEOUT_MS="50")
    gateway, base = start_gateway(env, log_dir)
    try:
        refused = httpx.post(f"{base}/v1/jobs", json=BODY, timeout=10)
        assert refused.status_code == 503, refused.text
        assert "0 of the 1 replicas" in refused.json()["error"]["message"]
    finally:
        gateway.stop()
        server.stop()

"""A Redis outage turns into fast 503s, and the gateway recovers by itself."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson
import pytest
from httpx_sse import connect_sse

from genq.redis_server import RedisServer, free_port
from tests.procs import genq_env, start_gateway
from tests.scrape import parse


@contextmanager
def gateway_on_own_redis(
    tmp_path_factory: pytest.TempPathFactory, log_dir: Path, **settings: str
) -> Iterator[tuple[RedisServer, str]]:
    """A gateway (no worker: jobs stay queued) on a Redis of its own."""
    server = RedisServer(tmp_path_factory.mktemp("outage-redis"), free_port(), persist=False)
    server.start()
    gateway, base = start_gateway(genq_env(server.url, **settings), log_dir)
    try:
        yield server, base
    finally:
        gateway.stop()
        server.stop()


def eventually(check: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_readyz_and_routes_follow_redis_down_and_back(
    tmp_path_factory: pytest.TempPathFactory, log_dir: Path
) -> None:
    with (
        gateway_on_own_redis(tmp_path_factory, log_dir) as (server, base),
        httpx.Client(base_url=base, timeout=10) as client,
    ):
        assert client.get("/readyz").status_code == 200
        server.stop()

        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["error"]["code"] == "redis_unavailable"
        submit = client.post("/v1/jobs", json={"prompt": "hi"})
        assert submit.status_code == 503
        assert submit.headers["retry-after"] == "1"
        assert client.get("/v1/jobs/abc").status_code == 503
        assert client.get("/healthz").status_code == 200  # alive, just not ready

        server.start()
        # The probe found Redis gone and opened the breaker; it closes it once Redis answers.
        assert eventually(lambda: client.get("/readyz").status_code == 200, timeout_s=15)
        assert client.post("/v1/jobs", json={"prompt": "hi"}).status_code == 202


def test_a_stall_is_refused_at_once_once_the_probe_saw_it_and_served_as_soon_as_it_ends(
    tmp_path_factory: pytest.TempPathFactory, log_dir: Path
) -> None:
    """SIGSTOP: connects still succeed, commands never answer. A command would wait 2 s for its
    reply; the probe finds Redis silent within its interval and timeout (0.5 s), and opens the
    breaker, so that no request waits on Redis. Once Redis answers, the probe closes the breaker,
    long before the breaker's own reset (60 s) would let a request try."""
    settings = {
        "GENQ_REDIS_COMMAND_TIMEOUT_S": "2",
        "GENQ_REDIS_BREAKER_RESET_S": "60",
        "GENQ_REDIS_PROBE_INTERVAL_S": "0.25",
        "GENQ_REDIS_PROBE_TIMEOUT_S": "0.25",
    }
    with (
        gateway_on_own_redis(tmp_path_factory, log_dir, **settings) as (server, base),
        httpx.Client(base_url=base, timeout=15) as client,
    ):
        assert client.post("/v1/jobs", json={"prompt": "hi"}).status_code == 202
        server.pause()
        try:
            time.sleep(1.5)  # three times the probe's interval and timeout; no request meanwhile
            for path in ["/v1/jobs", "/v1/jobs/abc", "/readyz"] * 3:
                started = time.perf_counter()
                if path == "/v1/jobs":
                    answer = client.post(path, json={"prompt": "hi"})
                else:
                    answer = client.get(path)
                took_s = time.perf_counter() - started
                assert answer.status_code == 503
                assert answer.json()["error"]["code"] == "redis_unavailable"
                # Not waiting the command timeout (2 s) means Redis was not asked: the first
                # request already found the breaker open.
                assert took_s < 0.5, (path, took_s)
                # The probe closes the breaker within its interval and timeout of Redis's return.
                assert answer.headers["retry-after"] == "1"
            scraped = parse(client.get("/metrics").text)
            assert scraped.value("genq_redis_breaker_state", state="open") == 1
            assert scraped.value("genq_redis_probe_failures_total") >= 1
        finally:
            server.resume()

        assert eventually(
            lambda: client.post("/v1/jobs", json={"prompt": "hi"}).status_code == 202,
            timeout_s=10,
        )
        breaker = client.get("/metrics").text
        assert 'genq_redis_breaker_state{state="open"} 0.0' in breaker
        assert 'genq_redis_breaker_state{state="closed"} 1.0' in breaker


def test_failed_requests_open_the_breaker_which_closes_after_its_reset(
    tmp_path_factory: pytest.TempPathFactory, log_dir: Path
) -> None:
    """The breaker's own path, with a probe too slow to see the stall (its PING waits 60 s):
    the two requests that wait out the command timeout (3 s) open it, and the next ones are
    refused without waiting. Half-open after 8 s, the first request that finds Redis answering
    closes it; the probe, never having found Redis silent, leaves the breaker to its reset."""
    settings = {
        "GENQ_REDIS_COMMAND_TIMEOUT_S": "3",
        "GENQ_REDIS_BREAKER_FAILURES": "2",
        "GENQ_REDIS_BREAKER_RESET_S": "8",
        "GENQ_REDIS_PROBE_TIMEOUT_S": "60",
    }
    with (
        gateway_on_own_redis(tmp_path_factory, log_dir, **settings) as (server, base),
        httpx.Client(base_url=base, timeout=15) as client,
    ):
        assert client.post("/v1/jobs", json={"prompt": "hi"}).status_code == 202
        server.pause()
        try:
            with ThreadPoolExecutor(2) as pool:
                tripping = list(
                    pool.map(lambda _: client.post("/v1/jobs", json={"prompt": "hi"}), range(2))
                )
            assert [r.status_code for r in tripping] == [503, 503]

            for path in ["/v1/jobs", "/v1/jobs/abc", "/readyz"] * 3:
                started = time.perf_counter()
                if path == "/v1/jobs":
                    answer = client.post(path, json={"prompt": "hi"})
                else:
                    answer = client.get(path)
                took_s = time.perf_counter() - started
                assert answer.status_code == 503
                assert answer.json()["error"]["code"] == "redis_unavailable"
                assert took_s < 0.5, (path, took_s)  # the command timeout is 3 s
                assert 1 <= int(answer.headers["retry-after"]) <= 8
            scraped = parse(client.get("/metrics").text)
            assert scraped.value("genq_redis_breaker_state", state="open") == 1
            assert scraped.value("genq_redis_probe_failures_total") == 0
        finally:
            server.resume()

        assert eventually(
            lambda: client.post("/v1/jobs", json={"prompt": "hi"}).status_code == 202,
            timeout_s=30,
        )
        breaker = client.get("/metrics").text
        assert 'genq_redis_breaker_state{state="open"} 0.0' in breaker
        assert 'genq_redis_breaker_state{state="closed"} 1.0' in breaker


def test_sync_wait_cut_by_an_outage_answers_202_with_the_job(
    tmp_path_factory: pytest.TempPathFactory, log_dir: Path
) -> None:
    with (
        gateway_on_own_redis(tmp_path_factory, log_dir) as (server, base),
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        answers: list[httpx.Response] = []
        waiter = threading.Thread(
            target=lambda: answers.append(
                client.post("/v1/generate", json={"prompt": "hi", "timeout_s": 60})
            )
        )
        waiter.start()
        assert eventually(lambda: _queued(client) == 1, timeout_s=10)
        server.stop()
        waiter.join(timeout=20)
        assert not waiter.is_alive()
        answer = answers[0]
        assert answer.status_code == 202
        job = answer.json()
        assert answer.headers["location"] == f"/v1/jobs/{job['id']}"
        assert job["status"] == "queued"


def test_event_stream_cut_by_an_outage_ends_with_a_resumable_error(
    tmp_path_factory: pytest.TempPathFactory, log_dir: Path
) -> None:
    with (
        gateway_on_own_redis(tmp_path_factory, log_dir) as (server, base),
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        job = client.post("/v1/jobs", json={"prompt": "hi"}).json()
        with connect_sse(client, "GET", f"/v1/jobs/{job['id']}/events") as source:
            assert source.response.status_code == 200
            server.stop()
            events = list(source.iter_sse())
        assert [e.event for e in events] == ["error"]
        assert events[0].id == ""
        assert orjson.loads(events[0].data)["error"]["code"] == "redis_unavailable"


def _queued(client: httpx.Client) -> int:
    pools = client.get("/v1/queue").json()["pools"]
    return sum(p["depth"] for p in pools)

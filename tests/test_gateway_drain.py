"""A gateway told to stop ends its streams and waits at once, resumably, then exits; a full
pool of stream connections is a clear 503."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest
from httpx_sse import ServerSentEvent, connect_sse

from common.settings import Settings
from gateway.app import create_app
from gateway.deps import Services
from gateway.drain import Drain
from genq.redis_server import RedisServer, free_port
from tests.procs import genq_env, start_gateway


def eventually(check: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def _queued(client: httpx.Client) -> int:
    return sum(p["depth"] for p in client.get("/v1/queue").json()["pools"])


def _in_background(call: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(call()))
    thread.start()
    return thread, out


def test_sigterm_ends_streams_resumably_answers_waiters_202_and_exits_0(
    tmp_path_factory: pytest.TempPathFactory, log_dir: Path
) -> None:
    server = RedisServer(tmp_path_factory.mktemp("drain-redis"), free_port(), persist=False)
    server.start()
    # No worker: every job stays queued, so every stream and wait is still open at the signal.
    gateway, base = start_gateway(
        genq_env(server.url, GENQ_SHUTDOWN_GRACE_S="5", GENQ_SYNC_TIMEOUT_S="120"), log_dir
    )
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            job = client.post("/v1/jobs", json={"prompt": "hi"}).json()

            def native_stream() -> list[ServerSentEvent]:
                with connect_sse(client, "GET", f"/v1/jobs/{job['id']}/events") as source:
                    return list(source.iter_sse())

            def openai_stream() -> list[str]:
                body = {"model": "default", "prompt": "hi", "stream": True}
                with client.stream("POST", "/v1/completions", json=body) as answer:
                    return [line for line in answer.iter_lines() if line.startswith("data:")]

            streams = [_in_background(native_stream), _in_background(openai_stream)]
            sync, sync_out = _in_background(
                lambda: client.post("/v1/generate", json={"prompt": "hello", "max_new_tokens": 3})
            )
            assert eventually(lambda: _queued(client) == 3, timeout_s=10)
            time.sleep(0.5)  # let the last of them reach its blocking read

            started = time.monotonic()
            gateway.popen.send_signal(signal.SIGTERM)
            code = gateway.popen.wait(timeout=20)
            took_s = time.monotonic() - started
            for thread, _ in [*streams, (sync, sync_out)]:
                thread.join(timeout=5)

        assert code == 0
        print(f"\ngateway drained and exited in {took_s:.2f}s")
        events = streams[0][1][0]
        assert isinstance(events, list)
        assert [e.event for e in events] == ["error"]
        assert events[0].id == ""  # no id: the client resumes from its last one
        assert orjson.loads(events[0].data)["error"]["code"] == "shutting_down"

        chunks = streams[1][1][0]
        assert isinstance(chunks, list)
        assert orjson.loads(chunks[-1].removeprefix("data:"))["error"]["code"] == "shutting_down"

        answer = sync_out[0]
        assert isinstance(answer, httpx.Response)
        assert answer.status_code == 202
        assert answer.headers["location"] == f"/v1/jobs/{answer.json()['id']}"
    finally:
        gateway.stop()
        server.stop()


async def test_readyz_answers_503_once_draining(redis_server: RedisServer) -> None:
    settings = Settings(redis_url=redis_server.url, allow_anonymous=True, allowed_hosts=["gateway"])
    drain = Drain()
    app = create_app(settings, drain)
    app.state.services = services = Services.build(settings, drain)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            assert (await client.get("/readyz")).status_code == 200
            drain.start()
            ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["error"]["code"] == "shutting_down"
        assert ready.headers["retry-after"] == "1"
    finally:
        await services.aclose()


def test_a_full_stream_pool_is_a_503_naming_the_setting_before_any_job_is_queued(
    tmp_path_factory: pytest.TempPathFactory, log_dir: Path
) -> None:
    server = RedisServer(tmp_path_factory.mktemp("pool-redis"), free_port(), persist=False)
    server.start()
    env = genq_env(
        server.url, GENQ_REDIS_MAX_STREAM_CONNECTIONS="1", GENQ_REDIS_COMMAND_TIMEOUT_S="0.5"
    )
    gateway, base = start_gateway(env, log_dir)
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            job = client.post("/v1/jobs", json={"prompt": "hi"}).json()
            with connect_sse(client, "GET", f"/v1/jobs/{job['id']}/events") as holder:
                assert holder.response.status_code == 200  # holds the one stream connection

                for answer in (
                    client.get(f"/v1/jobs/{job['id']}/events"),
                    client.post("/v1/generate", json={"prompt": "hi", "timeout_s": 5}),
                ):
                    assert answer.status_code == 503
                    error = answer.json()["error"]
                    assert error["code"] == "redis_pool_exhausted"
                    assert "GENQ_REDIS_MAX_STREAM_CONNECTIONS" in error["message"]
                    assert answer.headers["retry-after"] == "1"
                assert _queued(client) == 1  # the refused generate queued nothing
                assert client.post("/v1/jobs", json={"prompt": "x"}).status_code == 202

            # Closing the stream gives its connection back.
            def waits() -> bool:
                answer = client.post("/v1/generate", json={"prompt": "hi", "timeout_s": 0.2})
                return answer.status_code == 202

            assert eventually(waits, timeout_s=10)
    finally:
        gateway.stop()
        server.stop()

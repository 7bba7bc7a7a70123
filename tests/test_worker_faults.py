"""A worker killed mid-job: the job runs again on another worker and nothing is lost or doubled."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import orjson
import pytest
from httpx_sse import connect_sse

from genq.redis_server import RedisServer, free_port
from tests.conftest import TINY_NAME
from tests.procs import genq_env, start_gateway, start_worker
from tests.sse import read_stream, token_text


def test_job_of_a_killed_worker_is_finished_by_another(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, log_dir: Path
) -> None:
    server = RedisServer(tmp_path_factory.mktemp("fault-redis"), free_port(), persist=False)
    server.start()
    # The dead worker's lease on the job lapses after three heartbeats (3 s here).
    env = genq_env(server.url, GENQ_MODEL=str(tiny_model_dir), GENQ_MODEL_NAME=TINY_NAME)
    gateway, base = start_gateway(env, log_dir)
    first = start_worker(env, log_dir, base, TINY_NAME)
    second = None
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            # Seeded, so the run is the same every time: long enough to be killed mid-way.
            body = {"prompt": "Once", "max_new_tokens": 900, "temperature": 1.0, "seed": 5}
            job = client.post("/v1/jobs", json=body).json()
            url = f"/v1/jobs/{job['id']}/events"
            with connect_sse(client, "GET", url) as source:
                seen = next(source.iter_sse())  # the first worker is generating
            first.stop(signal.SIGKILL)
            assert seen.event == "token"

            second = start_worker(env, log_dir, base, TINY_NAME)
            deadline = time.monotonic() + 90
            while client.get(f"/v1/jobs/{job['id']}").json()["status"] != "succeeded":
                assert time.monotonic() < deadline, "the orphaned job never finished"
                time.sleep(0.5)

            events = read_stream(client, "GET", url)
            final = orjson.loads(events[-1].data)
            assert final["attempt"] == 2
            assert final["result"]["usage"]["completion_tokens"] > 100
            indexes = [orjson.loads(e.data)["index"] for e in events if e.event == "token"]
            assert indexes == list(range(len(indexes)))  # none lost, none repeated
            assert token_text(events) == final["result"]["text"]
    finally:
        for proc in (second, first, gateway):
            if proc is not None:
                proc.stop()
        server.stop()

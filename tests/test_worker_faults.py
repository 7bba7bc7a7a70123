"""A worker killed mid-job: the job runs again on another worker and nothing is lost or doubled."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import orjson
import pytest
import redis
from httpx_sse import connect_sse

from common import keys
from genq.redis_server import RedisServer, free_port
from tests.conftest import TINY_NAME
from tests.engine_driver import reference
from tests.procs import genq_env, start_gateway, start_worker
from tests.sse import read_stream, token_text
from worker.engine.model import LoadedModel


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


def test_a_rerun_that_samples_otherwise_goes_on_from_the_tokens_sent(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    tiny_lm: LoadedModel,
    log_dir: Path,
) -> None:
    """The second attempt runs on a worker whose scores are perturbed (`bench.perturbed_worker`),
    as a re-run on other hardware may sample other tokens: it must go on from the tokens the
    first attempt sent, so that the stream still equals the result."""
    server = RedisServer(tmp_path_factory.mktemp("resume-redis"), free_port(), persist=False)
    server.start()
    env = genq_env(server.url, GENQ_MODEL=str(tiny_model_dir), GENQ_MODEL_NAME=TINY_NAME)
    gateway, base = start_gateway(env, log_dir)
    first = start_worker(env, log_dir, base, TINY_NAME)
    second = None
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            body = {
                "prompt": "Once",
                "max_new_tokens": 900,
                "temperature": 0.0,
                "ignore_eos": True,
                "return_token_ids": True,
            }
            job = client.post("/v1/jobs", json=body).json()
            url = f"/v1/jobs/{job['id']}/events"
            with connect_sse(client, "GET", url) as source:
                next(source.iter_sse())  # the first worker is generating
            first.stop(signal.SIGKILL)
            with redis.Redis.from_url(server.url) as r:
                sent_events = int(r.hget(keys.job(job["id"]), "tokens") or 0)

            second = start_worker(env, log_dir, base, TINY_NAME, module="bench.perturbed_worker")
            deadline = time.monotonic() + 90
            while client.get(f"/v1/jobs/{job['id']}").json()["status"] != "succeeded":
                assert time.monotonic() < deadline, "the orphaned job never finished"
                time.sleep(0.5)

            events = read_stream(client, "GET", url)
            final = orjson.loads(events[-1].data)
            result = final["result"]
            assert final["attempt"] == 2
            tokens = [orjson.loads(e.data) for e in events if e.event == "token"]
            assert [t["index"] for t in tokens] == list(range(len(tokens)))
            assert token_text(events) == result["text"]
            assert [i for t in tokens for i in t["ids"]] == result["token_ids"]
            assert len(result["token_ids"]) == result["usage"]["completion_tokens"] == 900

            # The first attempt decoded greedily; the second went on from its tokens, and then
            # made others than the first would have.
            resumed = sum(len(t["ids"]) for t in tokens[:sent_events])
            assert 0 < resumed < 900
            greedy = reference(tiny_lm, "Once", resumed + 1)
            assert result["token_ids"][:resumed] == greedy[:resumed]
            assert result["token_ids"][resumed] != greedy[resumed]
    finally:
        for proc in (second, first, gateway):
            if proc is not None:
                proc.stop()
        server.stop()

"""The queue as clients see it while no worker is up (a pool scaled to zero, say). The tests
share one stack; each leaves its queue as it found it, empty, so that any may run alone or in
any order."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from common.settings import DEFAULT_MODEL_NAME
from tests.procs import running_stack
from tests.sse import read_stream

MAX_DEPTH = 6


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[httpx.Client]:
    with (
        running_stack(
            tmp_path_factory.mktemp("idle-redis"),
            log_dir,
            False,  # no worker
            serve=None,
            GENQ_MAX_QUEUE_DEPTH=str(MAX_DEPTH),
            GENQ_CACHE_ENABLED="false",
            GENQ_PRIORITY_STEP_S="1",
        ) as (_, base, _),
        httpx.Client(base_url=base, timeout=10) as c,
    ):
        yield c


def submit(client: httpx.Client, priority: str = "normal") -> str:
    body = {"prompt": "hi", "priority": priority, "temperature": 0}
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.text
    job_id: str = resp.json()["id"]
    return job_id


def position(client: httpx.Client, job_id: str) -> int:
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "queued"
    value: int = job["position"]
    return value


def test_cancelling_a_queued_job_takes_it_off_the_queue(client: httpx.Client) -> None:
    depth = client.get("/v1/queue").json()["pools"][0]["depth"]
    job_id = client.post("/v1/jobs", json={"prompt": "never", "priority": "low"}).json()["id"]
    resp = client.delete(f"/v1/jobs/{job_id}")
    assert resp.status_code == 200
    job = resp.json()
    assert job["status"] == "cancelled"
    assert job["result"]["finish_reason"] == "cancelled"
    assert client.get("/v1/queue").json()["pools"][0]["depth"] == depth
    assert client.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"  # idempotent
    events = read_stream(client, "GET", f"/v1/jobs/{job_id}/events")
    assert [e.event for e in events] == ["done"]
    assert client.delete("/v1/jobs/unknown").status_code == 404


def test_abandoned_openai_stream_cancels_its_job(client: httpx.Client) -> None:
    body = {"model": "default", "prompt": "hi", "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as resp:
        job_id = resp.headers["x-genq-job-id"]
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
    deadline = time.monotonic() + 10
    while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] == "queued":
        assert time.monotonic() < deadline, "the abandoned job was not cancelled"
        time.sleep(0.05)
    assert job["status"] == "cancelled"


def test_waiting_ages_a_low_priority_job_past_fresh_normal_ones(client: httpx.Client) -> None:
    low = submit(client, "low")
    time.sleep(1.5)  # more than one priority step (GENQ_PRIORITY_STEP_S=1)
    normal = submit(client)
    assert position(client, low) < position(client, normal)
    for job_id in (low, normal):
        client.delete(f"/v1/jobs/{job_id}")


def test_positions_stats_priorities_and_admission(client: httpx.Client) -> None:
    # Identical greedy requests: with the cache turned off, each is a job of its own.
    normal = [submit(client) for _ in range(3)]
    assert len(set(normal)) == 3
    assert [position(client, j) for j in normal] == [0, 1, 2]
    # Jobs for a registered model are accepted before any worker is up.
    assert client.get(f"/v1/jobs/{normal[0]}").json()["model"] == f"{DEFAULT_MODEL_NAME}@1"

    low = submit(client, "low")
    high = submit(client, "high")
    assert position(client, high) == 0  # ahead of every normal job
    assert position(client, low) == 4  # behind them
    assert [position(client, j) for j in normal] == [1, 2, 3]

    (pool,) = client.get("/v1/queue").json()["pools"]
    assert pool["depth"] == pool["ready"] == 5
    assert pool["running"] == pool["workers_alive"] == 0
    assert pool["oldest_age_s"] >= 0

    waited = client.post("/v1/generate", json={"prompt": "hi", "timeout_s": 0.2})
    assert waited.status_code == 202
    assert waited.json()["status"] == "queued"

    full = client.post("/v1/jobs", json={"prompt": "hi"})
    assert full.status_code == 429
    assert full.json()["error"]["code"] == "queue_full"
    assert "GENQ_MAX_QUEUE_DEPTH" in full.json()["error"]["message"]
    assert int(full.headers["retry-after"]) > 0
    for job_id in [*normal, low, high, waited.json()["id"]]:
        client.delete(f"/v1/jobs/{job_id}")


def test_a_retry_after_queue_full_is_not_blocked_by_its_idempotency_key(
    client: httpx.Client,
) -> None:
    queued = []
    while (resp := client.post("/v1/jobs", json={"prompt": "hi"})).status_code == 202:
        queued.append(resp.json()["id"])
    assert resp.status_code == 429
    assert len(queued) == MAX_DEPTH  # filled by this test, from empty
    key = {"Idempotency-Key": "after-429"}
    assert client.post("/v1/jobs", json={"prompt": "x"}, headers=key).status_code == 429
    assert client.post("/v1/jobs", json={"prompt": "x"}, headers=key).status_code == 429
    assert client.post("/v1/jobs", json={"prompt": "y"}, headers=key).status_code == 429
    client.delete(f"/v1/jobs/{queued.pop()}")  # room for one
    retried = client.post("/v1/jobs", json={"prompt": "y"}, headers=key)
    assert retried.status_code == 202
    for job_id in [*queued, retried.json()["id"]]:
        client.delete(f"/v1/jobs/{job_id}")

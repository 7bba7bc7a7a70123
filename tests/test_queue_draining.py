"""A saturated pool: positions shrink as the queue drains, with start-time estimates."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import TINY_NAME
from tests.procs import running_stack


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, log_dir: Path
) -> Iterator[httpx.Client]:
    # One job at a time, so that jobs really wait in the queue.
    with (
        running_stack(
            tmp_path_factory.mktemp("drain-redis"),
            log_dir,
            serve=TINY_NAME,
            GENQ_MODEL=str(tiny_model_dir),
            GENQ_MODEL_NAME=TINY_NAME,
            GENQ_WORKER_MAX_JOBS="1",
        ) as (_, base, _),
        httpx.Client(base_url=base, timeout=30) as c,
    ):
        yield c


def test_position_decreases_and_start_is_estimated(client: httpx.Client) -> None:
    body = {"prompt": "Once", "max_new_tokens": 200, "temperature": 1.0}
    jobs = [client.post("/v1/jobs", json=body).json()["id"] for _ in range(6)]
    last = jobs[-1]
    seen: list[int] = []
    estimates: list[float] = []
    deadline = time.monotonic() + 60
    while (job := client.get(f"/v1/jobs/{last}").json())["status"] == "queued":
        assert time.monotonic() < deadline
        if not seen or job["position"] != seen[-1]:
            seen.append(job["position"])
            if job["estimated_start_at"] is not None:
                estimates.append(job["estimated_start_at"])
        time.sleep(0.02)
    assert seen == sorted(seen, reverse=True)
    assert len(seen) >= 3  # it moved up the queue step by step
    assert estimates  # once a few jobs had started, the pool's rate gave an estimate
    assert all(e >= job["created_at"] for e in estimates)

"""SIGTERM to a worker mid-job, with Redis up, stalled or gone: it exits cleanly within its
grace period, and its job runs again elsewhere."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from bench.faults import Stack
from tests.conftest import TINY_NAME
from tests.tiny_model import build_tiny_model
from worker.main import SHUTDOWN_MARGIN_S

# No wait for running jobs: the worker hands its job back at once, whatever the machine's speed.
COMPLETION_WAIT_S = 0
# Long enough to be running still when the worker is stopped, however fast the machine.
JOB_TOKENS = 4000


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with room for a long job."""
    path = tmp_path_factory.mktemp("long-context-model")
    return build_tiny_model(path, config={"max_position_embeddings": JOB_TOKENS + 64})


@pytest.fixture
def stack(tmp_path: Path, long_context_model: Path, log_dir: Path) -> Iterator[Stack]:
    stack = Stack(
        tmp_path,
        log_dir,
        GENQ_MODEL=str(long_context_model),
        GENQ_MODEL_NAME=TINY_NAME,
        GENQ_WORKER_JOB_COMPLETION_WAIT_S=str(COMPLETION_WAIT_S),
        GENQ_MAX_NEW_TOKENS_LIMIT=str(JOB_TOKENS),
    )
    yield stack
    stack.close()


def running_job(client: httpx.Client) -> str:
    body = {"prompt": "Once", "max_new_tokens": JOB_TOKENS, "temperature": 0}
    job_id: str = client.post("/v1/jobs", json=body).json()["id"]
    with connect_sse(client, "GET", f"/v1/jobs/{job_id}/events") as source:
        assert next(source.iter_sse()).event == "token"
    return job_id


def stop_worker(stack: Stack) -> int:
    worker = stack.workers.pop()
    worker.popen.send_signal(signal.SIGTERM)
    try:
        return worker.popen.wait(timeout=COMPLETION_WAIT_S + SHUTDOWN_MARGIN_S + 5)
    except subprocess.TimeoutExpired:
        worker.popen.kill()
        raise AssertionError("the worker outlived its grace period") from None


def finished(client: httpx.Client, job_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        resp = client.get(f"/v1/jobs/{job_id}")
        if resp.status_code == 200 and resp.json()["status"] == "succeeded":
            job: dict[str, object] = resp.json()
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} never finished")


@pytest.mark.parametrize("redis", ["up", "stalled", "gone"])
def test_sigterm_ends_the_worker_in_its_grace_and_the_job_runs_again(
    stack: Stack, redis: str
) -> None:
    with httpx.Client(base_url=stack.bases[0], timeout=30) as client:
        job_id = running_job(client)
        if redis == "stalled":
            stack.redis.pause()
        elif redis == "gone":
            stack.redis.stop()
        assert stop_worker(stack) == 0
        if redis == "stalled":
            stack.redis.resume()
        elif redis == "gone":
            stack.redis.start()
        stack.start_worker()
        job = finished(client, job_id)
    assert job["attempt"] == 2

"""`genq run` supervises its children, and its Redis is the one it started."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from genq.redis_server import RedisServer, free_port
from tests.conftest import TINY_NAME
from tests.procs import Proc, genq_env


def eventually(check: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def _serving(base: str) -> bool:
    try:
        live = httpx.get(f"{base}/v1/models", timeout=2).json()["data"]
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    return any(m["id"] == TINY_NAME and m["workers"] > 0 for m in live)


def _generates(base: str) -> bool:
    try:
        answer = httpx.post(
            f"{base}/v1/generate",
            json={"prompt": "Once upon a time", "max_new_tokens": 4, "timeout_s": 20},
            timeout=30,
        )
    except httpx.HTTPError:
        return False
    return answer.status_code == 200 and answer.json()["status"] == "succeeded"


def _redis_pids(log: Path) -> list[int]:
    return [
        int(p) for p in re.findall(r"(?i)redis on 127\.0\.0\.1:\d+ \(pid (\d+)", log.read_text())
    ]


def _worker_pids(log: Path) -> list[int]:
    return [int(p) for p in re.findall(r"started worker \(pid (\d+)\)", log.read_text())]


def test_killed_children_are_restarted_and_the_stack_serves_again(
    tiny_model_dir: Path, tmp_path: Path, log_dir: Path
) -> None:
    port, redis_port = free_port(), free_port()
    env = genq_env(
        "redis://unused",  # `genq run` points its children at its own Redis
        GENQ_MODEL=str(tiny_model_dir),
        GENQ_MODEL_NAME=TINY_NAME,
        GENQ_VAR_DIR=str(tmp_path / "var"),
        GENQ_EMBEDDED_REDIS_PORT=str(redis_port),
        GENQ_PORT=str(port),
    )
    base = f"http://127.0.0.1:{port}"
    stack = Proc("run", env, log_dir)
    try:
        assert eventually(lambda: _serving(base), timeout_s=180), stack.log.read_text()
        assert _generates(base)
        log = stack.log.read_text()
        assert "GENQ_ALLOW_ANONYMOUS=true" in log
        # The embedded Redis has a password, which the log never shows.
        password = (tmp_path / "var" / "redis" / "password").read_text().strip()
        assert password not in log
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=redis_port).ping()

        first = _worker_pids(stack.log)[-1]
        os.kill(first, signal.SIGKILL)
        assert eventually(lambda: len(_worker_pids(stack.log)) == 2, timeout_s=30)
        assert "worker exited with status -9; restarting it" in stack.log.read_text()
        assert eventually(lambda: _generates(base), timeout_s=120), stack.log.read_text()
        stack.check_alive()

        old_redis = _redis_pids(stack.log)[-1]
        os.kill(old_redis, signal.SIGKILL)
        assert eventually(lambda: "redis exited with status -9" in stack.log.read_text(), 30)
        assert eventually(lambda: _generates(base), timeout_s=120), stack.log.read_text()
        assert _redis_pids(stack.log)[-1] != old_redis

        stopping = time.monotonic()
        assert stack.stop(signal.SIGTERM) == 0
        print(f"\ngenq run stopped in {time.monotonic() - stopping:.1f}s")
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=redis_port, socket_connect_timeout=1).ping()
    finally:
        stack.stop()


def test_a_taken_redis_port_is_a_clear_error_and_the_other_redis_is_left_alone(
    tmp_path: Path,
) -> None:
    other = RedisServer(tmp_path / "other", free_port(), persist=False)
    other.start()
    try:
        env = genq_env(
            other.url,
            GENQ_MODEL=str(tmp_path / "unused-model"),
            GENQ_VAR_DIR=str(tmp_path / "var"),
            GENQ_EMBEDDED_REDIS_PORT=str(other.port),
            GENQ_PORT=str(free_port()),
        )
        result = subprocess.run(
            [sys.executable, "-m", "genq", "run"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 1
        assert f"port {other.port}" in result.stderr
        assert "GENQ_EMBEDDED_REDIS_PORT" in result.stderr
        assert "started worker" not in result.stderr
        assert other.running
        assert redis.Redis.from_url(other.url).ping()
    finally:
        other.stop()


def test_a_taken_gateway_port_is_a_clear_error(tmp_path: Path) -> None:
    # Its readiness checks would otherwise find the other server and call the stack ready.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = genq_env(
            "redis://unused",
            GENQ_MODEL=str(tmp_path / "unused-model"),
            GENQ_VAR_DIR=str(tmp_path / "var"),
            GENQ_EMBEDDED_REDIS_PORT=str(free_port()),
            GENQ_PORT=str(port),
        )
        result = subprocess.run(
            [sys.executable, "-m", "genq", "run"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert f"port {port}" in result.stderr
    assert "GENQ_PORT" in result.stderr
    assert "embedded Redis" not in result.stdout

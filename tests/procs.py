"""Real genq processes for tests: a worker and a gateway on free loopback ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson

from genq.redis_server import RedisServer, free_port


class Proc:
    """`python -m {module} {name}`: a genq process (or a program that runs one)."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path, module: str = "genq") -> None:
        self.name = name
        self.log = log_dir / f"{name}-{time.monotonic_ns()}.log"
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", module, name], env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"genq {self.name} exited:\n{self.log.read_text()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def genq_env(redis_url: str, **overrides: str) -> dict[str, str]:
    """Settings of test and benchmark stacks: on loopback, and anonymous (no API keys) unless
    `overrides` give keys."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env.update(
        GENQ_REDIS_URL=redis_url,
        GENQ_ALLOW_ANONYMOUS="true",
        GENQ_LOG_FORMAT="text",
        GENQ_WORKER_HEARTBEAT_S="1",
        GENQ_WORKER_JOB_COMPLETION_WAIT_S="2",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(overrides)
    return env


def start_gateway(env: dict[str, str], log_dir: Path, timeout_s: float = 60) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc("gateway", {**env, "GENQ_PORT": str(port)}, log_dir)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        proc.check_alive()
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"gateway not up after {timeout_s}s:\n{proc.log.read_text()}")
        time.sleep(0.1)


def start_worker(
    env: dict[str, str],
    log_dir: Path,
    base: str,
    model: str | None,
    timeout_s: float = 300,
    module: str = "genq",
) -> Proc:
    """Start a worker and wait until the gateway lists it as serving `model` (None: a worker
    that preloads nothing, ready once its heartbeat shows)."""
    proc = Proc("worker", env, log_dir, module)
    deadline = time.monotonic() + timeout_s
    headers = _reader_headers(env)
    while True:
        proc.check_alive()
        if _serving(base, model, headers):
            return proc
        if time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"worker not ready after {timeout_s}s:\n{proc.log.read_text()}")
        time.sleep(0.2)


def _reader_headers(env: dict[str, str]) -> dict[str, str]:
    """A key of the stack's GENQ_API_KEYS that may list models; none for an anonymous stack."""
    if "GENQ_API_KEYS" not in env:
        return {}
    keys = orjson.loads(env["GENQ_API_KEYS"])
    key = next(k for k, spec in keys.items() if "read" in spec.get("scopes", ["read"]))
    return {"Authorization": f"Bearer {key}"}


def _serving(base: str, model: str | None, headers: dict[str, str]) -> bool:
    """Whether the gateway lists a worker serving `model`; not yet while it answers 503 (its
    Redis just came back, say)."""
    if model is None:
        resp = httpx.get(f"{base}/v1/queue", timeout=5, headers=headers)
        pools = resp.json()["pools"] if resp.status_code == 200 else []
        return any(p["workers_alive"] > 0 for p in pools)
    resp = httpx.get(f"{base}/v1/models", timeout=5, headers=headers)
    live = resp.json()["data"] if resp.status_code == 200 else []
    return any(m["id"] == model and m["workers"] > 0 for m in live)


@contextmanager
def running_stack(
    data_dir: Path,
    log_dir: Path,
    worker: bool = True,
    /,
    *,
    serve: str | None,
    **settings: str,
) -> Iterator[tuple[RedisServer, str, dict[str, str]]]:
    """A Redis of its own, a gateway and, with `worker`, one worker serving `serve` (see
    `start_worker`). `worker` is positional so that no setting can take its name.

    Yields the Redis server, the gateway's base URL and the environment of the processes.
    """
    server = RedisServer(data_dir, free_port(), persist=False)
    server.start()
    env = genq_env(server.url, **settings)
    procs: list[Proc] = []
    try:
        gateway, base = start_gateway(env, log_dir)
        procs.append(gateway)
        if worker:
            procs.append(start_worker(env, log_dir, base, serve))
        yield server, base, env
    finally:
        for proc in reversed(procs):
            proc.stop()
        server.stop()

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio import Redis

from common.settings import DEFAULT_MODEL_NAME, Settings
from genq.redis_ha import RedisHA
from genq.redis_server import RedisServer, free_port
from tests.procs import Proc, genq_env, running_stack, start_gateway, start_worker
from tests.tiny_model import build_tiny_model
from worker.engine.model import LoadedModel
from worker.loading import converted_checkpoint, load_model
from worker.model_fetch import ensure_default_model

TINY_NAME = "tiny"
TINY_KEY = f"{TINY_NAME}@1"  # the built-in registry serves GENQ_MODEL as version 1
WEBHOOK_SECRET = "test-webhook-secret"
# Webhook receivers listen on a loopback address of their own (Linux routes all of 127/8).
WEBHOOK_RECEIVER_HOST = "127.0.0.2"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), free_port(), persist=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_ha(tmp_path: Path) -> Iterator[RedisHA]:
    """A primary, a replica and three sentinels of this test alone (a test may fail it over)."""
    ha = RedisHA(tmp_path / "redis-ha")
    ha.start()
    yield ha
    ha.stop()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir: Path) -> LoadedModel:
    return load_model(Settings(model=str(tiny_model_dir), model_name=TINY_NAME, device="cpu"))


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def stack_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis of its own for the running stack, which keeps state across tests."""
    server = RedisServer(tmp_path_factory.mktemp("stack-redis"), free_port(), persist=False)
    server.start()
    yield server
    server.stop()


@dataclass(frozen=True)
class Stack:
    base: str  # the gateway
    worker_metrics: str  # the worker's own /metrics


@pytest.fixture(scope="session")
def stack(stack_redis: RedisServer, tiny_model_dir: Path, log_dir: Path) -> Iterator[Stack]:
    """Gateway + one worker serving the tiny model."""
    metrics_port = free_port()
    env = genq_env(
        stack_redis.url,
        GENQ_MODEL=str(tiny_model_dir),
        GENQ_MODEL_NAME=TINY_NAME,
        GENQ_WORKER_METRICS_PORT=str(metrics_port),
        GENQ_WEBHOOK_SECRET=WEBHOOK_SECRET,
        # The receivers' address itself is allowed, on any port; `localhost` only by name, so
        # a webhook to it resolves to loopback addresses the allow-list does not name.
        GENQ_WEBHOOK_ALLOWED_HOSTS=f'["{WEBHOOK_RECEIVER_HOST}:*", "localhost:*"]',
        GENQ_WEBHOOK_ALLOW_HTTP="true",
        GENQ_WEBHOOK_RETRY_BASE_S="0.2",
    )
    gateway, base = start_gateway(env, log_dir)
    procs: list[Proc] = [gateway]
    try:
        procs.append(start_worker(env, log_dir, base, TINY_NAME))
        yield Stack(base, f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture(scope="module")
def default_stack(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[str]:
    """A stack of its own serving the default model (SmolLM2-135M-Instruct); yields the gateway."""
    data = tmp_path_factory.mktemp("e2e-redis")
    with running_stack(data, log_dir, serve=DEFAULT_MODEL_NAME) as (_, base, _):
        yield base


@pytest.fixture(scope="session")
def default_checkpoint() -> Path:
    """The default model as the transformers checkpoint its workers load (its GGUF file,
    de-quantized once into the model cache), for clients that need its tokenizer or weights."""
    cache_dir = Settings().model_cache_dir
    return converted_checkpoint(ensure_default_model(cache_dir), cache_dir)

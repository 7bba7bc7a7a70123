"""A Redis outage turns into fast 503s, and the gateway recovers by itself."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from genq.redis_server import RedisServer, free_port
from tests.procs import genq_env, start_gateway


def test_readyz_and_routes_follow_redis_down_and_back(
    tmp_path_factory: pytest.TempPathFactory, log_dir: Path
) -> None:
    server = RedisServer(tmp_path_factory.mktemp("outage-redis"), free_port(), persist=False)
    server.start()
    gateway, base = start_gateway(genq_env(server.url), log_dir)
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
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
            assert client.get("/readyz").status_code == 200
            assert client.post("/v1/jobs", json={"prompt": "hi"}).status_code == 202
    finally:
        gateway.stop()
        server.stop()

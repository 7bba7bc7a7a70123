"""`genq run`: embedded Redis, one worker and the gateway on this machine, for development."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import FrameType

from common.settings import Settings
from genq.redis_server import RedisServer
from worker.model_fetch import ensure_default_model

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 600


def _get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return json.loads(resp.read())


def _stack_ready(base: str) -> bool:
    try:
        _get_json(f"{base}/readyz")
        models = _get_json(f"{base}/v1/models")
    except (urllib.error.URLError, OSError, ValueError):
        return False
    assert isinstance(models, dict)
    return any(m.get("workers", 0) > 0 for m in models.get("data", []))


def _banner(base: str, started: float) -> str:
    return f"""
genq is ready in {time.monotonic() - started:.1f}s

  API      {base}
  Docs     {base}/docs
  Metrics  {base}/metrics

Try it:
  curl -s {base}/v1/generate -H 'content-type: application/json' \\
    -d '{{"messages": [{{"role": "user", "content": "What is the capital of France?"}}],
         "temperature": 0, "max_new_tokens": 32}}'

Ctrl-C stops the gateway, the worker and Redis.
"""


def run_stack(settings: Settings) -> int:
    started = time.monotonic()
    if settings.model is None:
        print("default model:", ensure_default_model(settings.model_cache_dir), flush=True)
    redis = RedisServer(settings.var_dir / "redis", settings.embedded_redis_port, persist=True)
    redis.start()
    print(f"embedded Redis on {redis.url} (data in {redis.data_dir})", flush=True)
    env = {**os.environ, "GENQ_REDIS_URL": redis.url}
    # Children get their own sessions so that a Ctrl-C reaches only this supervisor, which then
    # stops them in order: gateway and worker first, Redis last.
    children = {
        name: subprocess.Popen(
            [sys.executable, "-m", "genq", name], env=env, start_new_session=True
        )
        for name in ("worker", "gateway")
    }
    base = f"http://{settings.host}:{settings.port}"

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # Installed explicitly: a shell that starts us in the background leaves SIGINT ignored.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = 0
    try:
        ready = False
        while True:
            for name, proc in children.items():
                if proc.poll() is not None:
                    print(f"genq {name} exited with status {proc.returncode}", file=sys.stderr)
                    return 1
            if not ready and _stack_ready(base):
                ready = True
                print(_banner(base, started), flush=True)
            elif not ready and time.monotonic() - started > READY_TIMEOUT_S:
                print(f"not ready after {READY_TIMEOUT_S}s", file=sys.stderr)
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping genq...", flush=True)
    finally:
        for proc in children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in children.values():
            try:
                proc.wait(timeout=settings.worker_job_completion_wait_s + 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = 1
        redis.stop()
    return code

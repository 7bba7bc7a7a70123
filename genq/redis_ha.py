"""A replicated Redis on loopback ports: a primary, a replica and three sentinels, all from the
one `redis-server` binary. The tests' and the failover drill's stand-in for a Redis deployed
with Sentinel."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any, cast

import redis

from genq.redis_server import RedisServer, RedisServerError, find_redis_server, free_port

# The name the sentinels monitor the primary under (GENQ_REDIS_SENTINEL_SERVICE's default).
SERVICE = "genq"
# Short, for tests: a primary silent this long is down (production values are seconds).
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000


class SentinelServer(RedisServer):
    """`redis-server --sentinel` watching the primary on `primary_port`. Sentinel rewrites its
    config file as it learns the topology, so the file (mode 0600: it holds the passwords) is
    its own, in `data_dir`."""

    def __init__(
        self, data_dir: Path, port: int, *, primary_port: int, data_password: str, password: str
    ) -> None:
        super().__init__(data_dir, port, persist=False, password=password)
        self.primary_port = primary_port
        self.data_password = data_password

    def _command(self) -> list[str]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "sentinel.conf"
        config.touch(mode=0o600)
        config.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {self.port}",
                    f"dir {self.data_dir.resolve()}",
                    "logfile redis.log",
                    f"requirepass {self.password}",
                    # The sentinels of one deployment share a password and log in to each other.
                    f"sentinel sentinel-pass {self.password}",
                    f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} 2",
                    f"sentinel auth-pass {SERVICE} {self.data_password}",
                    f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
                    f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}",
                    "",
                ]
            )
        )
        return [find_redis_server(), str(config), "--sentinel"]

    def _stdin_config(self) -> bytes:
        return b""  # all in the config file, which Sentinel needs anyway

    def primary(self) -> tuple[str, int] | None:
        """The primary this sentinel names now; None while it names none."""
        client = redis.Redis(
            port=self.port, password=self.password, socket_timeout=1, socket_connect_timeout=1
        )
        try:
            reply = client.sentinel_get_master_addr_by_name(SERVICE)  # type: ignore[no-untyped-call]
        except redis.RedisError:
            return None
        finally:
            client.close()
        if not reply:
            return None
        host, port = reply
        return host.decode(), int(port)


class RedisHA:
    """Primary + replica + three sentinels (quorum 2). The data nodes share one password, the
    sentinels another, as a deployment with Sentinel would have them."""

    def __init__(self, data_dir: Path) -> None:
        self.password = secrets.token_urlsafe(24)
        self.sentinel_password = secrets.token_urlsafe(24)
        primary_port = free_port()
        self.primary = RedisServer(
            data_dir / "primary", primary_port, persist=False, password=self.password
        )
        self.replica = RedisServer(
            data_dir / "replica",
            free_port(),
            persist=False,
            password=self.password,
            replica_of=primary_port,
        )
        self.sentinels = [
            SentinelServer(
                data_dir / f"sentinel-{i}",
                free_port(),
                primary_port=primary_port,
                data_password=self.password,
                password=self.sentinel_password,
            )
            for i in range(3)
        ]

    @property
    def url(self) -> str:
        """GENQ_REDIS_URL with Sentinel: the data nodes' password (its host is not used)."""
        return f"redis://:{self.password}@127.0.0.1:{self.primary.port}/0"

    @property
    def sentinel_addresses(self) -> str:
        """GENQ_REDIS_SENTINELS."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def env(self) -> dict[str, str]:
        """The GENQ_* variables of a process using this deployment through Sentinel."""
        return {
            "GENQ_REDIS_URL": self.url,
            "GENQ_REDIS_SENTINELS": self.sentinel_addresses,
            "GENQ_REDIS_SENTINEL_SERVICE": SERVICE,
            "GENQ_REDIS_SENTINEL_PASSWORD": self.sentinel_password,
        }

    def start(self, timeout_s: float = 30.0) -> None:
        """Start every node and wait until the replica is in sync and every sentinel knows the
        replica and the other sentinels (a failover needs both)."""
        try:
            self.primary.start()
            self.replica.start()
            for sentinel in self.sentinels:
                sentinel.start()
            self._wait_until_formed(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_until_formed(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._formed():
            if time.monotonic() > deadline:
                raise RedisServerError("the replica or the sentinels did not come together")
            time.sleep(0.1)

    def _formed(self) -> bool:
        replica = redis.Redis(port=self.replica.port, password=self.password, socket_timeout=1)
        try:
            if _info(replica).get("master_link_status") != "up":
                return False
        finally:
            replica.close()
        for sentinel in self.sentinels:
            client = redis.Redis(port=sentinel.port, password=self.sentinel_password)
            try:
                state = client.sentinel_master(SERVICE)  # type: ignore[no-untyped-call]
            finally:
                client.close()
            if state["num-slaves"] < 1 or state["num-other-sentinels"] < len(self.sentinels) - 1:
                return False
        return True

    def primary_port(self) -> int | None:
        """The port of the primary the sentinels agree on (a majority); None without one."""
        named = [s.primary() for s in self.sentinels]
        for address in named:
            if address is not None and named.count(address) * 2 > len(named):
                return address[1]
        return None

    def wait_for_promotion(self, old_port: int, timeout_s: float = 30.0) -> int:
        """The new primary's port once a majority of sentinels names a node other than
        `old_port` and that node answers as a primary."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            port = self.primary_port()
            if port is not None and port != old_port and self._is_primary(port):
                return port
            time.sleep(0.05)
        raise RedisServerError(f"no replica was promoted within {timeout_s:.0f}s")

    def _is_primary(self, port: int) -> bool:
        client = redis.Redis(port=port, password=self.password, socket_timeout=1)
        try:
            return _info(client).get("role") == "master"
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        for server in [*self.sentinels, self.replica, self.primary]:
            server.stop()


def _info(client: redis.Redis) -> dict[str, Any]:
    return cast("dict[str, Any]", client.info("replication"))

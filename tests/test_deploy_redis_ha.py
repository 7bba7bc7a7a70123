"""The Sentinel setup's script (k8s/components/redis-ha/redis-ha.sh, which compose runs too) on
loopback: three data nodes and three sentinels started by it, as the pods start them, each node on
an address of its own (Linux routes all of 127/8). The first start, the primary killed, the old
primary back as a replica, and a handover before a stop. Only down-after-milliseconds is shorter
than the deployed 5 s, so that the failover comes within seconds."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from redis import Redis
from redis.exceptions import RedisError

from genq.redis_server import find_redis_server, free_port
from tests.deploy_files import ROOT

HA = ROOT / "k8s" / "components" / "redis-ha"
SCRIPT = HA / "redis-ha.sh"
SERVICE = "genq"
PASSWORD = "data-nodes-password"
SENTINEL_PASSWORD = "sentinels-password"
DOWN_AFTER_MS = 1000
WAIT_S = 30.0  # the longest any step may take before the test gives up


@dataclass
class Node:
    host: str
    port: int
    sentinel_port: int
    dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def client(self) -> Redis:
        return Redis(self.host, self.port, password=PASSWORD, socket_timeout=2)

    def sentinel(self) -> Redis:
        return Redis(self.host, self.sentinel_port, password=SENTINEL_PASSWORD, socket_timeout=2)


@dataclass
class Setup:
    nodes: list[Node]
    env: dict[str, str]

    def run(self, node: Node, mode: str, *, wait: bool = False) -> subprocess.CompletedProcess[str]:
        """`redis-ha.sh MODE` as the node's container runs it; `redis` and `sentinel` stay up."""
        port = node.port if mode != "sentinel" else node.sentinel_port
        env = {**self.env, "ANNOUNCE": f"{node.host}:{port}", "RUN_DIR": str(node.dir / mode)}
        (node.dir / mode).mkdir(exist_ok=True)
        if wait:
            return subprocess.run(
                ["sh", str(SCRIPT), mode], env=env, capture_output=True, text=True, timeout=60
            )
        log = (node.dir / f"{mode}.log").open("ab")
        node.procs[mode] = subprocess.Popen(
            ["sh", str(SCRIPT), mode], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        return subprocess.CompletedProcess([], 0)

    def named_primary(self) -> set[str]:
        """What the sentinels that answer name as the primary."""
        named = set()
        for node in self.nodes:
            try:
                host, port = command(
                    node.sentinel(), "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE
                )
                named.add(f"{host.decode()}:{port.decode()}")
            except (RedisError, TypeError):
                continue
        return named


def command(client: Redis, *args: object) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]  # redis-py's


def replication(node: Node) -> dict[str, Any]:
    return cast(dict[str, Any], node.client().info("replication"))


def role(node: Node) -> str:
    try:
        return str(command(node.client(), "ROLE")[0].decode())
    except RedisError:
        return "down"


def in_sync(node: Node) -> bool:
    try:
        info = replication(node)
    except RedisError:
        return False
    return bool(info["role"] == "master" or info.get("master_link_status") == "up")


def sentinels_know_the_set(setup: Setup) -> bool:
    """Every sentinel has found the replicas (from the primary's INFO, every 10 s) and the other
    sentinels (their hellos): before that a failover has no replica to promote or no majority."""
    others = len(setup.nodes) - 1
    try:
        return all(
            len(command(n.sentinel(), "SENTINEL", "REPLICAS", SERVICE)) == others
            and len(command(n.sentinel(), "SENTINEL", "SENTINELS", SERVICE)) == others
            for n in setup.nodes
        )
    except RedisError:
        return False


def until(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S} s: {what}")
        time.sleep(0.2)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    server = find_redis_server()
    path = f"{Path(server).parent}{os.pathsep}{os.environ['PATH']}"
    if shutil.which("redis-cli", path=path) is None or shutil.which("timeout") is None:
        pytest.skip("redis-cli or timeout is not installed here")
    (tmp_path / "password").write_text(PASSWORD + "\n")
    (tmp_path / "sentinel-password").write_text(SENTINEL_PASSWORD + "\n")
    nodes = [
        Node(f"127.0.0.{71 + i}", free_port(), free_port(), tmp_path / f"node{i}") for i in range(3)
    ]
    for node in nodes:
        node.dir.mkdir()
    sentinel_conf = (
        (HA / "sentinel.conf")
        .read_text()
        .replace(
            "down-after-milliseconds genq 5000", f"down-after-milliseconds genq {DOWN_AFTER_MS}"
        )
    )
    assert f"genq {DOWN_AFTER_MS}" in sentinel_conf
    (tmp_path / "sentinel.conf").write_text(sentinel_conf)
    # The deployed redis.conf binds every address on a fixed port and writes to /data; here
    # each node binds its own address and writes to its own folder.
    for node in nodes:
        (node.dir / "base.conf").write_text(
            f"bind {node.host}\ndir {node.dir}\nappendonly yes\nappendfsync everysec\n"
        )
    env = {
        "PATH": path,
        "REDIS_NODES": " ".join(n.address for n in nodes),
        "SENTINELS": " ".join(f"{n.host}:{n.sentinel_port}" for n in nodes),
        "REDIS_PASSWORD_FILE": str(tmp_path / "password"),
        "SENTINEL_PASSWORD_FILE": str(tmp_path / "sentinel-password"),
        "SENTINEL_CONF": str(tmp_path / "sentinel.conf"),
    }
    setup = Setup(nodes, env)
    yield setup
    for node in nodes:
        for proc in node.procs.values():
            proc.kill()
            proc.wait(timeout=10)


def start(setup: Setup, node: Node) -> None:
    setup.env["REDIS_CONF"] = f"{node.dir / 'base.conf'} {HA / 'redis-ha.conf'}"
    setup.run(node, "redis")


def test_the_script_starts_a_primary_replicas_and_sentinels_that_fail_over_and_hand_over(
    setup: Setup,
) -> None:
    first, second, third = setup.nodes
    for node in setup.nodes:
        start(setup, node)
        setup.run(node, "sentinel")
    until("one primary, two replicas in sync", lambda: all(in_sync(n) for n in setup.nodes))
    assert [role(n) for n in setup.nodes] == ["master", "slave", "slave"]
    until("the sentinels name the first node", lambda: setup.named_primary() == {first.address})
    assert all(setup.run(n, "ready", wait=True).returncode == 0 for n in setup.nodes)
    until("the sentinels know the replicas and each other", lambda: sentinels_know_the_set(setup))

    # An acknowledged write is on a replica (what genq's WAIT asks for).
    primary = first.client()
    primary.set("job", "queued")
    assert command(primary, "WAIT", 1, 1000) >= 1

    # The primary dies: the sentinels promote a replica, which has the write.
    first.procs.pop("redis").send_signal(signal.SIGKILL)
    until(
        "a replica promoted",
        lambda: len(named := setup.named_primary()) == 1 and first.address not in named,
    )
    (promoted,) = [n for n in setup.nodes if n.address in setup.named_primary()]
    until("the promoted node takes writes", lambda: role(promoted) == "master")
    assert promoted.client().get("job") == b"queued"

    # Back, the old primary follows the new one instead of starting as a second primary.
    start(setup, first)
    until("the old primary is a replica in sync", lambda: in_sync(first))
    assert role(first) == "slave"
    assert replication(first)["master_host"] == promoted.host

    # Before the primary stops, it hands over: another node is primary, and it a replica.
    handover = setup.run(promoted, "handover", wait=True)
    assert handover.returncode == 0, handover.stdout + handover.stderr
    assert "handed the primary over" in handover.stdout
    assert role(promoted) == "slave"
    (successor,) = setup.named_primary()
    assert successor != promoted.address
    assert successor in {n.address for n in (first, second, third)}
    until("the successor takes writes", lambda: any(role(n) == "master" for n in setup.nodes))
    # A replica's handover is nothing to do.
    again = setup.run(promoted, "handover", wait=True)
    assert again.returncode == 0
    assert again.stdout == ""

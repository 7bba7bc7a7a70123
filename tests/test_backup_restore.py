"""Backup and restore, run as docs/operations.md says: `genq backup` and `genq restore` on the
embedded Redis of `genq run`, and the deployments' script (k8s/components/redis-backup) with the
same redis-server and redis-cli."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import httpx
import orjson
import pytest
import redis
from httpx_sse import connect_sse

from common.settings import Settings
from genq.backup import find_redis_cli, restore_snapshot, snapshots, take_snapshot
from genq.devstack import embedded_redis_dir, save_password
from genq.redis_server import RedisServer, find_redis_server, free_port
from tests.conftest import TINY_NAME
from tests.procs import Proc, genq_env, start_gateway, start_worker
from tests.sse import read_stream, token_text

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "k8s" / "components" / "redis-backup" / "redis-backup.sh"


def genq_command(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "genq", *args], env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def submit(client: httpx.Client, key: str, body: dict[str, object]) -> httpx.Response:
    return client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})


def wait_until_ended(
    client: httpx.Client, job_id: str, timeout_s: float = 120
) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while True:
        job: dict[str, object] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']}"
        time.sleep(0.2)


def test_a_restored_backup_brings_back_the_jobs_of_its_time_and_only_those(
    tmp_path: Path, tiny_model_dir: Path, log_dir: Path
) -> None:
    # The embedded stack as `genq run` lays it out: Redis with its append-only file in
    # GENQ_VAR_DIR/redis and its password beside it; gateway and worker as processes of their own
    # so that the drill can stop the worker.
    var_dir, port = tmp_path / "var", free_port()
    data_dir = embedded_redis_dir(Settings(var_dir=var_dir, embedded_redis_port=port))
    cli_env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    cli_env.update(GENQ_VAR_DIR=str(var_dir), GENQ_EMBEDDED_REDIS_PORT=str(port))
    settings = {"GENQ_MODEL": str(tiny_model_dir), "GENQ_MODEL_NAME": TINY_NAME}
    server = RedisServer(data_dir, port, persist=True)
    server.start()
    save_password(server)
    procs: list[Proc] = []
    try:
        env = genq_env(server.url, **settings)
        gateway, base = start_gateway(env, log_dir)
        worker = start_worker(env, log_dir, base, TINY_NAME)
        procs += [gateway, worker]
        with httpx.Client(base_url=base, timeout=60) as client:
            # (1) Jobs finished, one running, others queued.
            finished = {}
            for i in range(3):
                body = {"prompt": f"Finished {i}", "max_new_tokens": 8, "temperature": 0}
                job = submit(client, f"finished-{i}", body).json()
                finished[f"finished-{i}"] = (body, wait_until_ended(client, job["id"]))
            long_body = {"prompt": "Once", "max_new_tokens": 900, "temperature": 1.0, "seed": 5}
            running = submit(client, "running", long_body).json()
            with connect_sse(client, "GET", f"/v1/jobs/{running['id']}/events") as source:
                assert next(source.iter_sse()).event == "token"
            worker.stop(signal.SIGKILL)  # the job stays `running`, under the dead worker's lease
            queued = {}
            for i in range(4):
                body = {"prompt": f"Queued {i}", "max_new_tokens": 8, "temperature": 0}
                queued[f"queued-{i}"] = (body, submit(client, f"queued-{i}", body).json())
            assert client.get(f"/v1/jobs/{running['id']}").json()["status"] == "running"

            # (2) Back up.
            printed = genq_command(cli_env, "backup", "--keep", "2")
            (snapshot,) = snapshots(var_dir / "backups")

            # Accepted after the backup: what a restore loses.
            after_body = {"prompt": "After the backup", "max_new_tokens": 8, "temperature": 0}
            after = submit(client, "after", after_body).json()

        # (3) Redis's data is lost: the stack stops and Redis's directory goes.
        gateway.stop()
        server.stop()
        shutil.rmtree(data_dir)

        # (4) Restore, and start the stack again.
        restored = genq_command(cli_env, "restore", str(snapshot.path))
        server.start()
        save_password(server)
        env = genq_env(server.url, **settings)
        gateway, base = start_gateway(env, log_dir)
        procs.append(gateway)
        procs.append(start_worker(env, log_dir, base, TINY_NAME))

        # (5) What the backup held is back.
        with httpx.Client(base_url=base, timeout=60) as client:
            for key, (body, job) in finished.items():
                again = client.get(f"/v1/jobs/{job['id']}").json()
                assert again["status"] == "succeeded"
                assert again["result"] == job["result"]
                assert submit(client, key, body).json()["id"] == job["id"]
            for key, (body, job) in queued.items():
                assert submit(client, key, body).json()["id"] == job["id"]
                assert wait_until_ended(client, job["id"])["status"] == "succeeded"

            # Its lease has lapsed by the restore: the reaper puts the job back on its queue,
            # and it runs again as attempt 2, its stream going on from the tokens of the backup.
            ended = wait_until_ended(client, running["id"])
            assert (ended["status"], ended["attempt"]) == ("succeeded", 2)
            events = read_stream(client, "GET", f"/v1/jobs/{running['id']}/events")
            assert token_text(events) == orjson.loads(events[-1].data)["result"]["text"]

            # The job accepted after the backup is gone; its retry makes a new one.
            assert client.get(f"/v1/jobs/{after['id']}").status_code == 404
            assert submit(client, "after", after_body).json()["id"] != after["id"]
        jobs = len(finished) + len(queued) + 1
        print(f"\n{jobs} jobs in the backup: {printed.strip()}\n{restored.strip()}")
    finally:
        for proc in reversed(procs):
            proc.stop()
        server.stop()


def test_backups_keep_the_newest_and_leave_no_partial_file(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    start = datetime(2026, 12, 8, 3, 0, tzinfo=UTC)
    for hour in range(4):
        take_snapshot(redis_server.url, tmp_path, keep=2, now=start + timedelta(hours=hour))
    kept = snapshots(tmp_path)
    assert [s.taken_at for s in kept] == [start + timedelta(hours=2), start + timedelta(hours=3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [s.path.name for s in kept]
    assert all(s.path.stat().st_mode & 0o077 == 0 for s in kept)


def test_a_restore_sets_aside_what_it_replaces(redis_server: RedisServer, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.set("genq:test:kept", "1")
    snapshot, _ = take_snapshot(redis_server.url, tmp_path / "backups", keep=1)
    client.close()
    data_dir = tmp_path / "redis"
    server = RedisServer(data_dir, free_port(), persist=True)
    server.start()
    redis.Redis.from_url(server.url).set("genq:test:newer", "1")
    server.stop()

    restored = restore_snapshot(snapshot.path, data_dir)

    assert restored.keys == 1
    assert restored.set_aside is not None
    # Redis 6's append-only file, or Redis 7's directory of them.
    assert {p.name for p in restored.set_aside.iterdir()} & {"appendonly.aof", "appendonlydir"}
    server.start()
    try:
        assert redis.Redis.from_url(server.url).keys("genq:test:*") == [b"genq:test:kept"]
    finally:
        server.stop()


def test_the_deployments_script_backs_up_prunes_and_restores(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The script the CronJob, the restore Job and compose's services run, with this machine's
    redis-server and redis-cli in place of the Redis image's."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.set("genq:test:job", "queued")
    client.set("genq:test:lease", "1", ex=3600)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in (find_redis_server(), find_redis_cli()):
        (bin_dir / Path(tool).name).symlink_to(tool)
    backups, data = tmp_path / "backups", tmp_path / "data"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": str(redis_server.port),
        "REDISCLI_AUTH": redis_server.password,
        "BACKUP_DIR": str(backups),
        "DATA_DIR": str(data),
        "KEEP": "1",
    }

    def script(*args: str) -> str:
        out = subprocess.run(
            ["sh", str(SCRIPT), *args], env=env, capture_output=True, text=True, check=False
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    script("backup")
    time.sleep(1.1)  # snapshot names tell seconds apart
    client.set("genq:test:later", "1")
    script("backup")
    (newest,) = snapshots(backups)
    assert newest.path.stat().st_mode & 0o077 == 0
    assert newest.path.name in script("list")
    script("fresh", "3600")  # compose's health check

    # An earlier life of the volume: the restore sets it aside, not in its way.
    (data / "appendonlydir").mkdir(parents=True)
    (data / "appendonlydir" / "earlier").touch()
    script("restore", newest.path.name)

    # Redis as the deployments start it (appendonly yes) loads what the script left.
    server = RedisServer(data, free_port(), persist=True)
    server.start()
    try:
        restored = redis.Redis.from_url(server.url)
        assert sorted(cast("list[bytes]", restored.keys("genq:test:*"))) == [
            b"genq:test:job",
            b"genq:test:later",
            b"genq:test:lease",
        ]
        assert cast(int, restored.ttl("genq:test:lease")) > 3000
    finally:
        server.stop()
    assert not (data / "appendonlydir" / "earlier").exists()
    assert list(data.glob("before-restore-*/appendonlydir/earlier"))


@pytest.mark.parametrize(
    "request_file", ["genq-20000101T000000Z.rdb", "../genq-20000101T000000Z.rdb"]
)
def test_the_script_refuses_a_snapshot_it_does_not_have(tmp_path: Path, request_file: str) -> None:
    (tmp_path / "backups").mkdir()
    out = subprocess.run(
        ["sh", str(SCRIPT), "restore", request_file],
        env={
            "PATH": os.environ["PATH"],
            "BACKUP_DIR": str(tmp_path / "backups"),
            "DATA_DIR": str(tmp_path / "data"),
        },
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode != 0
    assert not (tmp_path / "data").exists()

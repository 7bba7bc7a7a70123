"""The `genq` command."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from common.settings import Settings


def _settings() -> Settings:
    try:
        settings = Settings()
    except ValidationError as e:
        # Fail fast, naming every bad GENQ_ variable.
        print(f"invalid genq settings:\n{e}", file=sys.stderr)
        raise SystemExit(2) from e
    # A misspelt setting would otherwise do nothing, silently. Not a refusal by default: a
    # variable set for the next version must not stop this one (a rollback, a rolling update).
    for unknown in Settings.unknown_variables(os.environ):
        print(f"genq: warning: no setting reads {unknown}", file=sys.stderr)
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("gateway", help="run the HTTP gateway")
    sub.add_parser("worker", help="run a worker (loads GENQ_MODEL, serves GENQ_POOL)")
    sub.add_parser("run", help="dev stack: embedded Redis + worker + gateway")
    backup = sub.add_parser(
        "backup",
        help="snapshot Redis into a directory, keeping the newest ones (docs/operations.md)",
        description="Snapshot the Redis at GENQ_REDIS_URL (or GENQ_REDIS_URL_FILE) when set, "
        "else the embedded Redis of `genq run`; then delete all but the newest --keep.",
    )
    backup.add_argument(
        "--dir", type=Path, help="where snapshots go (default: GENQ_VAR_DIR/backups)"
    )
    backup.add_argument("--keep", type=int, default=24, help="snapshots kept (default: 24)")
    restore = sub.add_parser(
        "restore",
        help="make a snapshot the data of the embedded Redis (stop `genq run` first)",
    )
    restore.add_argument("snapshot", type=Path, help="a snapshot that `genq backup` wrote")
    model = sub.add_parser("model", help="model files")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    model_sub.add_parser("fetch", help="fetch the default model into GENQ_MODEL_CACHE_DIR")
    args = parser.parse_args(argv)
    settings = _settings()

    # Imports are local: the gateway image has no torch, the worker needs no FastAPI.
    if args.command == "gateway":
        from gateway.main import run_gateway

        run_gateway(settings)
    elif args.command == "worker":
        from worker.main import run_worker

        run_worker(settings)
    elif args.command == "run":
        from genq.devstack import run_stack

        return run_stack(settings)
    elif args.command == "backup":
        return _backup(settings, args.dir or settings.var_dir / "backups", args.keep)
    elif args.command == "restore":
        return _restore(settings, args.snapshot)
    else:
        from worker.model_fetch import ModelFetchError, ensure_default_model

        try:
            print(ensure_default_model(settings.model_cache_dir))
        except ModelFetchError as e:
            print(e, file=sys.stderr)
            return 1
    return 0


def _backup(settings: Settings, backup_dir: Path, keep: int) -> int:
    from genq.backup import BackupError, take_snapshot
    from genq.devstack import embedded_redis_url
    from genq.redis_server import RedisServerError

    try:
        if settings.model_fields_set & {"redis_url", "redis_url_file"}:
            url = settings.redis_url.get_secret_value()
        else:
            url = embedded_redis_url(settings)
        started = time.monotonic()
        snapshot, pruned = take_snapshot(url, backup_dir, keep=keep)
    except (BackupError, RedisServerError) as e:
        print(f"genq backup: {e}", file=sys.stderr)
        return 1
    took_s = time.monotonic() - started
    print(f"{snapshot.path}: {snapshot.size_bytes} bytes in {took_s:.2f}s")
    for old in pruned:
        print(f"deleted {old.path.name} (older than the newest {keep})")
    return 0


def _restore(settings: Settings, snapshot: Path) -> int:
    from genq.backup import BackupError, restore_snapshot
    from genq.devstack import embedded_redis_dir
    from genq.redis_server import RedisServerError, port_taken

    if port_taken(settings.embedded_redis_port):
        print(
            f"genq restore: port {settings.embedded_redis_port} is in use: stop `genq run` "
            "(its Redis) first",
            file=sys.stderr,
        )
        return 1
    data_dir = embedded_redis_dir(settings)
    try:
        restored = restore_snapshot(snapshot, data_dir)
    except (BackupError, RedisServerError) as e:
        print(f"genq restore: {e}", file=sys.stderr)
        return 1
    print(f"{data_dir} now holds {snapshot.name} ({restored.keys} keys): start `genq run`")
    if restored.set_aside is not None:
        print(f"the data it replaced is in {restored.set_aside}; delete it once all is well")
    return 0

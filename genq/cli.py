"""The `genq` command."""

from __future__ import annotations

import argparse
import os
import sys

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
    else:
        from worker.model_fetch import ModelFetchError, ensure_default_model

        try:
            print(ensure_default_model(settings.model_cache_dir))
        except ModelFetchError as e:
            print(e, file=sys.stderr)
            return 1
    return 0

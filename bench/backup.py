"""What a backup and a restore of genq's Redis cost, by the number of jobs Redis holds.

    python -m bench.backup [--jobs 100,1000,5000] [--max-new-tokens 32]

It starts a stack of its own (Redis with its append-only file, as `genq run` has it, a gateway
and one worker serving a tiny random model on the CPU), and for each count fills Redis with that
many finished jobs (their records, results and event streams), then prints the time of
`take_snapshot` (what `genq backup` runs) and of `restore_snapshot` (`genq restore`), and the
snapshot's size. Job records and streams are kept for GENQ_RESULT_TTL_S, so a snapshot holds the
jobs of that window.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx

from genq.backup import restore_snapshot, take_snapshot
from genq.redis_server import RedisServer, free_port
from tests.procs import genq_env, start_gateway, start_worker
from tests.tiny_model import build_tiny_model

_SUBMIT_CHUNK = 100  # GENQ_MAX_BATCH_REQUESTS


def fill(client: httpx.Client, jobs: int, max_new_tokens: int) -> None:
    """Submit `jobs` jobs and wait until every one has finished."""
    ids: list[str] = []
    for start in range(0, jobs, _SUBMIT_CHUNK):
        items = [
            {"prompt": f"Job {i}", "max_new_tokens": max_new_tokens, "ignore_eos": True}
            for i in range(start, min(jobs, start + _SUBMIT_CHUNK))
        ]
        resp = client.post("/v1/jobs/batch", json={"requests": items})
        resp.raise_for_status()
        ids += [item["job"]["id"] for item in resp.json()["items"]]
    for job_id in ids:
        while client.get(f"/v1/jobs/{job_id}").json()["status"] in ("queued", "running"):
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", default="100,1000,5000", help="cumulative job counts")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    counts = [int(n) for n in args.jobs.split(",")]

    with tempfile.TemporaryDirectory(prefix="genq-bench-backup-") as where:
        tmp = Path(where)
        server = RedisServer(tmp / "redis", free_port(), persist=True)
        server.start()
        env = genq_env(
            server.url,
            GENQ_MODEL=str(build_tiny_model(tmp / "model")),
            GENQ_MODEL_NAME="tiny",
            GENQ_CACHE_ENABLED="false",
            # One client fills Redis as fast as the worker goes.
            GENQ_RATE_LIMIT_REQUESTS_PER_MINUTE="0",
            GENQ_RATE_LIMIT_TOKENS_PER_MINUTE="0",
            GENQ_RATE_LIMIT_CONCURRENT="0",
        )
        (tmp / "logs").mkdir()
        gateway, base = start_gateway(env, tmp / "logs")
        worker = start_worker(env, tmp / "logs", base, "tiny")
        print(f"jobs of {args.max_new_tokens} tokens | snapshot | backup | restore")
        print("---|---|---|---")
        try:
            with httpx.Client(base_url=base, timeout=60) as client:
                held = 0
                for count in counts:
                    fill(client, count - held, args.max_new_tokens)
                    held = count
                    started = time.monotonic()
                    snapshot, _ = take_snapshot(server.url, tmp / "backups", keep=1)
                    backup_s = time.monotonic() - started
                    started = time.monotonic()
                    restore_snapshot(snapshot.path, tmp / "restored")
                    restore_s = time.monotonic() - started
                    print(
                        f"{count} | {snapshot.size_bytes / 1e6:.2f} MB "
                        f"({snapshot.size_bytes / count / 1e3:.1f} kB a job) | "
                        f"{backup_s:.2f} s | {restore_s:.2f} s",
                        flush=True,
                    )
                    time.sleep(1)  # snapshot names tell seconds apart
        finally:
            worker.stop()
            gateway.stop()
            server.stop()


if __name__ == "__main__":
    main()

"""The failover drill: the Redis primary killed under load, Sentinel promoting its replica.

    python -m bench.failover [--model PATH] [--clients 6] [--jobs 300] [--max-new-tokens 24]
                             [--json]
    python -m bench.failover --ack-cost 3000 [--json]

It starts a primary, a replica and three sentinels (`genq.redis_ha`), two gateways and a worker
that reach Redis only through the sentinels (GENQ_REDIS_SENTINELS; acknowledgement waits for one
replica), and `bench.faults`' careful clients: each submits a job (retrying a refusal with the
same Idempotency-Key), follows its event stream, resuming with Last-Event-ID wherever it breaks
off, and checks the whole stream once more at the end.

Once half the jobs are accepted, the primary gets SIGKILL. When the sentinels have promoted the
replica, the old node comes back as a replica of the new primary (what its supervisor would do:
an empty primary restarted in place would wipe its replica), and the load goes on until `--jobs`
jobs were accepted. Then every accepted job must have ended exactly once and succeeded, and every
stream's text, read across its resumptions, must equal the job's result. Printed: the time from
the kill to the promotion, to the old node serving as replica, and to the first new job accepted;
jobs accepted, succeeded, failed, lost and doubled; streams resumed and equal to their result.

`--ack-cost N` measures instead what acknowledgement costs: N submission-shaped transactions
through the gateway's client, without and with the WAIT for one replica.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from bench.faults import JOB_DEADLINE_S, Client, Observed, bench_run
from common.settings import Settings
from gateway.redisclient import create_gateway_redis
from genq.redis_ha import RedisHA
from tests.procs import Proc, genq_env, start_gateway, start_worker


class FailoverStack:
    """The replicated Redis, two gateways and a worker on Sentinel."""

    def __init__(self, data_dir: Path, log_dir: Path, **settings: str) -> None:
        self.ha = RedisHA(data_dir / "redis-ha")
        self.ha.start()
        self.procs: list[Proc] = []
        self.bases: list[str] = []
        try:
            env = genq_env(self.ha.url, **self.ha.env(), **settings)
            for _ in range(2):
                gateway, base = start_gateway(env, log_dir)
                self.procs.append(gateway)
                self.bases.append(base)
            model = settings.get("GENQ_MODEL_NAME")
            self.procs.append(start_worker(env, log_dir, self.bases[0], model))
        except BaseException:
            self.close()
            raise

    def exited(self) -> list[str]:
        return [
            f"{p.name} (status {p.popen.returncode})"
            for p in self.procs
            if p.popen.poll() is not None
        ]

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()
        self.ha.stop()


@dataclass
class Drill:
    promoted_s: float  # kill -> a majority of sentinels names the replica, which answers
    replica_back_s: float  # kill -> the old node serves as the new primary's replica
    first_accepted_s: float | None  # kill -> the first job accepted after it
    accepted: int
    succeeded: int
    failed: int
    lost: int
    doubled: int
    streams_resumed: int  # streams broken by the failover and resumed with Last-Event-ID
    streams_equal: int  # streams whose text, across resumptions, equals the job's result
    clients_saw: dict[str, int]
    exited: list[str]

    @property
    def clean(self) -> bool:
        return (
            self.failed == self.lost == self.doubled == 0
            and self.succeeded == self.accepted == self.streams_equal
            and not self.exited
        )


def drill(stack: FailoverStack, *, jobs: int, clients: int, body: dict[str, object]) -> Drill:
    """Load, SIGKILL the primary once half of `jobs` are accepted, bring the old node back as
    a replica after the promotion, go on until `jobs` are accepted, and account for them all."""
    seen, stop = Observed(), threading.Event()
    threads = [Client(stack.bases, body, seen, stop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        # Killed with streams open mid-job: half the clients at least.
        open_streams = max(1, clients // 2)
        _wait_for(
            lambda: len(seen.accepted) >= jobs // 2 and seen.open_streams >= open_streams, "load"
        )
        old = stack.ha.primary
        killed = time.monotonic()
        old.kill()
        new_port = stack.ha.wait_for_promotion(old.port)
        promoted = time.monotonic()
        old.replica_of = new_port
        old.start()
        back = time.monotonic()
        _wait_for(lambda: len(seen.accepted) >= jobs, "jobs after the failover")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=JOB_DEADLINE_S + 30)
    after = [t for t in seen.accepted.values() if t > killed]
    ended = {j: seen.finished[j] for j in seen.accepted if j in seen.finished}
    succeeded = {j for j, job in ended.items() if job.get("status") == "succeeded"}
    equal = [
        j
        for j in succeeded
        if seen.followed.get(j) == _result_text(ended[j]) and j not in seen.doubled
    ]
    return Drill(
        promoted_s=round(promoted - killed, 2),
        replica_back_s=round(back - killed, 2),
        first_accepted_s=round(min(after) - killed, 2) if after else None,
        accepted=len(seen.accepted),
        succeeded=len(succeeded),
        failed=len(ended) - len(succeeded),
        lost=len(seen.accepted) - len(ended),
        doubled=len(seen.doubled),
        streams_resumed=len(seen.resumed),
        streams_equal=len(equal),
        clients_saw=dict(seen.answers),
        exited=stack.exited(),
    )


def _result_text(job: dict[str, object]) -> str | None:
    result = job.get("result")
    return str(result["text"]) if isinstance(result, dict) else None


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s:.0f} s")
        time.sleep(0.05)


def report(result: Drill) -> str:
    first = "n/a" if result.first_accepted_s is None else f"{result.first_accepted_s:.2f}"
    return "\n".join(
        [
            f"primary SIGKILL -> replica promoted: {result.promoted_s:.2f} s",
            f"primary SIGKILL -> old node back as replica: {result.replica_back_s:.2f} s",
            f"primary SIGKILL -> first new job accepted: {first} s",
            f"jobs accepted {result.accepted}, succeeded {result.succeeded}, failed "
            f"{result.failed}, lost {result.lost}, doubled {result.doubled}",
            f"streams resumed across the failover {result.streams_resumed}; streams equal to "
            f"their result {result.streams_equal} of {result.accepted}",
            "clients saw: "
            + (", ".join(f"{k}: {v}" for k, v in sorted(result.clients_saw.items())) or "-"),
            f"genq processes exited: {', '.join(result.exited) or 'none'}",
        ]
    )


def ack_cost(ha: RedisHA, writes: int) -> dict[str, float]:
    """Median and 99th percentile (ms) of a transaction shaped like a submission's (a record and
    a queue entry) through the gateway's client, without and with the WAIT for one replica."""

    async def measure() -> dict[str, float]:
        settings = Settings(
            redis_url=ha.url,
            redis_sentinels=ha.sentinel_addresses,
            redis_sentinel_password=ha.sentinel_password,
        )
        commands, listeners = create_gateway_redis(settings)
        figures: dict[str, float] = {}
        try:
            for wait in (False, True):
                took = []
                for i in range(writes):
                    started = time.perf_counter()
                    async with commands.pipeline(transaction=True) as pipe:
                        if wait:
                            pipe.require_replicas(1, settings.redis_ack_timeout_ms)
                        pipe.hset(f"bench:{i}", mapping={"record": "x" * 500})
                        pipe.zadd("bench:queue", {f"bench:{i}": i})
                        await pipe.execute()
                    took.append((time.perf_counter() - started) * 1000)
                name = "with WAIT" if wait else "without WAIT"
                figures[f"{name} median (ms)"] = round(statistics.median(took), 3)
                figures[f"{name} p99 (ms)"] = round(statistics.quantiles(took, n=100)[98], 3)
        finally:
            await commands.aclose(close_connection_pool=True)
            await listeners.pool.aclose()
        return figures

    return asyncio.run(measure())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="checkpoint directory (default: the default model)")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--data-dir", type=Path, default=Path("var/bench-failover"))
    parser.add_argument(
        "--ack-cost",
        type=int,
        metavar="WRITES",
        help="instead of the drill: what waiting for a replica adds to a submission's write",
    )
    args = parser.parse_args()
    if args.ack_cost:
        ha = RedisHA(args.data_dir / f"ack-{uuid.uuid4().hex[:8]}")
        ha.start()
        try:
            figures = ack_cost(ha, args.ack_cost)
        finally:
            ha.stop()
        print(orjson.dumps(figures).decode() if args.json else figures)
        return

    run_dir, log_dir, settings, body = bench_run(args.data_dir, args.model, args.max_new_tokens)
    print("starting the stack...", file=sys.stderr, flush=True)
    stack = FailoverStack(run_dir, log_dir, **settings)
    try:
        result = drill(stack, jobs=args.jobs, clients=args.clients, body=body)
    finally:
        stack.close()
    if args.json:
        print(orjson.dumps({**asdict(result), "clean": result.clean}).decode())
    else:
        print(report(result))
    if not result.clean:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

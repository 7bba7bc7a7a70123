"""What the gateway's Redis probe costs, and what it buys during a stall.

    python -m bench.probe [--idle-s 60] [--stall-s 3] [--trials 5] [--json]

It runs a gateway (no worker) on a Redis of its own twice: with the probe as good as off
(`GENQ_REDIS_PROBE_INTERVAL_S=3600`: one PING at startup) and with the default settings. Each
time it measures:

- idle cost, over `--idle-s` seconds without a client: the commands per second Redis served
  (`INFO commandstats`, less the bench's own INFO), Redis's CPU (`INFO cpu`) and the gateway
  process's CPU, in percent of one core;
- `--trials` stalls: Redis is SIGSTOPped, and one submission is sent 0.6 s into it (past the
  probe's interval and timeout): the first request of a stall that the probe has had time to
  see;
- another stall of `--stall-s` seconds with a client submitting back to back from the SIGSTOP:
  how many submissions waited on Redis (for its command timeout), and how long after the SIGCONT a
  submission was accepted again.

The gateway's settings are the production defaults but for the probe's (and a heartbeat of 5 s,
so the reaper sweeps as it does in production).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import orjson
import psutil
import redis

from common.settings import Settings
from genq.redis_server import RedisServer, free_port
from tests.procs import genq_env, start_gateway

# The bench's own INFO calls are not the gateway's load.
_OWN_COMMANDS = ("cmdstat_info",)


@dataclass
class Figures:
    probe: str
    redis_commands_per_s: float
    redis_pings_per_s: float
    redis_cpu_percent: float
    gateway_cpu_percent: float
    # The first submission of a stall, 0.6 s into it (median and max over the trials).
    late_503_median_ms: float
    late_503_max_ms: float
    late_retry_after: str
    # A client submitting back to back through a stall of --stall-s seconds.
    stall_submissions: int
    stall_waited_on_redis: int
    stall_503_median_ms: float
    accepted_after_resume_s: float


def _redis_counters(client: redis.Redis) -> tuple[int, int, float]:
    """Commands served (the bench's own left out), PINGs served, CPU seconds."""
    stats = cast("dict[str, Any]", client.info("commandstats"))
    commands = sum(v["calls"] for k, v in stats.items() if k not in _OWN_COMMANDS)
    pings = stats.get("cmdstat_ping", {}).get("calls", 0)
    cpu = cast("dict[str, Any]", client.info("cpu"))
    return commands, pings, float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _submit(client: httpx.Client) -> tuple[int, float, str]:
    started = time.perf_counter()
    answer = client.post("/v1/jobs", json={"prompt": "hi"})
    return answer.status_code, time.perf_counter() - started, answer.headers.get("retry-after", "")


def _accepted_after(client: httpx.Client, since: float) -> float:
    while _submit(client)[0] != 202:
        time.sleep(0.02)
    return time.perf_counter() - since


def measure(
    probe: str, overrides: dict[str, str], idle_s: float, stall_s: float, trials: int
) -> Figures:
    timeout_s = Settings.model_fields["redis_command_timeout_s"].default
    with tempfile.TemporaryDirectory(prefix="bench-probe-") as tmp:
        server = RedisServer(Path(tmp) / "redis", free_port(), persist=False)
        server.start()
        env = genq_env(server.url, GENQ_WORKER_HEARTBEAT_S="5", **overrides)
        gateway, base = start_gateway(env, Path(tmp))
        bench = redis.Redis.from_url(server.url)
        try:
            with httpx.Client(base_url=base, timeout=30) as client:
                assert _submit(client)[0] == 202
                process = psutil.Process(gateway.popen.pid)
                time.sleep(2)  # past startup
                commands, pings, redis_cpu = _redis_counters(bench)
                gateway_cpu = _cpu_s(process)
                time.sleep(idle_s)
                commands_after, pings_after, redis_cpu_after = _redis_counters(bench)
                gateway_cpu_after = _cpu_s(process)

                late = []
                for _ in range(trials):
                    server.pause()
                    time.sleep(0.6)
                    status, late_s, retry_after = _submit(client)
                    assert status == 503, status
                    late.append(late_s)
                    server.resume()
                    _accepted_after(client, time.perf_counter())
                    time.sleep(3)  # past any breaker reset

                server.pause()
                stalled = time.perf_counter()
                latencies = []
                while time.perf_counter() - stalled < stall_s:
                    status, took_s, _ = _submit(client)
                    assert status == 503, status
                    latencies.append(took_s)
                server.resume()
                accepted_after_s = _accepted_after(client, time.perf_counter())
        finally:
            bench.close()
            gateway.stop()
            server.stop()
    return Figures(
        probe=probe,
        redis_commands_per_s=round((commands_after - commands) / idle_s, 2),
        redis_pings_per_s=round((pings_after - pings) / idle_s, 2),
        redis_cpu_percent=round(100 * (redis_cpu_after - redis_cpu) / idle_s, 3),
        gateway_cpu_percent=round(100 * (gateway_cpu_after - gateway_cpu) / idle_s, 3),
        late_503_median_ms=round(statistics.median(late) * 1000, 1),
        late_503_max_ms=round(max(late) * 1000, 1),
        late_retry_after=retry_after,
        stall_submissions=len(latencies),
        # Refused by the open breaker: milliseconds; by the command timeout: about a second.
        stall_waited_on_redis=sum(1 for s in latencies if s >= timeout_s / 2),
        stall_503_median_ms=round(statistics.median(latencies) * 1000, 1),
        accepted_after_resume_s=round(accepted_after_s, 3),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle-s", type=float, default=60)
    parser.add_argument("--stall-s", type=float, default=3)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    runs = [
        measure(
            "off", {"GENQ_REDIS_PROBE_INTERVAL_S": "3600"}, args.idle_s, args.stall_s, args.trials
        ),
        measure("default", {}, args.idle_s, args.stall_s, args.trials),
    ]
    if args.json:
        print(orjson.dumps([asdict(r) for r in runs]).decode())
        return
    for name in Figures.__dataclass_fields__:
        print(f"{name:26}" + "".join(f"{getattr(r, name)!s:>28}" for r in runs))


if __name__ == "__main__":
    main()

"""Queue-driven autoscaling of a worker pool, shown on the real local stack.

    python -m bench.autoscale [--peak-rps 5] [--plot docs/autoscale.png] [--json]

Starts Redis, a gateway and, as a controller decides, worker processes serving the default
model, all on this machine. A load generator submits jobs at a rate that rises, holds and falls
(to half the peak for a while, then to nothing); a quarter of the jobs generate 96 tokens,
the others 32.
Every poll the controller reads the count KEDA's `redis` trigger reads (ZCARD of the pool's arq
queue, `keys.queue(pool)`) and applies KEDA's and the HPA's rules (`bench.keda`); it starts
worker processes and stops them with SIGTERM, as the kubelet does, so they drain. The timings
are Kubernetes' scaled down to a run of a few minutes:

| ScaledObject (k8s/base/keda.yaml)       | Kubernetes | here |
|-----------------------------------------|------------|------|
| listLength (= GENQ_MAX_BATCH_SIZE)      | 32         | 4    |
| maxReplicaCount                         | 4          | 3    |
| pollingInterval                         | 15 s       | 2 s  |
| cooldownPeriod / initialCooldownPeriod  | 300 s      | 20 s / 30 s |
| scale-down stabilisation window         | 300 s      | 30 s |
| scale-down rate                         | 1 pod/60 s | 1 pod/10 s |
| GENQ_WORKER_JOB_COMPLETION_WAIT_S       | 30 s       | 10 s |

It prints the timeline (load, queue, replicas, p50/p95 latency of the jobs finished in each
window), writes a plot, and checks that scaling lost and repeated no job: every job succeeded on
its first attempt, its event stream holds token events with indexes 0, 1, 2, ... whose texts
make up the result, and one terminal event, last; every stopped worker exited by itself.
Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import orjson
from matplotlib.figure import Figure
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from bench.keda import KedaController, ScalingPolicy
from common import events, heartbeats, keys
from common.jobs import JobStatus, TokenEvent
from common.jobstore import JobStore
from common.settings import Settings
from genq.redis_server import RedisServer, free_port
from tests.procs import Proc, genq_env, start_gateway
from worker.model_fetch import ensure_default_model

POOL = "default"
BATCH = 4
DRAIN_WAIT_S = 10
# What the kubelet would wait (terminationGracePeriodSeconds) before killing a draining worker.
GRACE_S = DRAIN_WAIT_S + 10
POLL_S = 2.0
# How long after the load the pool may take to drain and scale to zero.
SETTLE_LIMIT_S = 180
WINDOW_S = 10.0
# Mixed lengths, as real traffic: every LONG_EVERY-th job generates LONG_TOKENS.
SHORT_TOKENS, LONG_TOKENS, LONG_EVERY = 32, 96, 4
POLICY = ScalingPolicy(
    list_length=BATCH,
    max_replicas=3,
    cooldown_s=20,
    initial_cooldown_s=30,
    scale_down_window_s=30,
    scale_down_pods=1,
    scale_down_period_s=10,
)
SETTINGS = {
    "GENQ_POOL": POOL,
    "GENQ_MAX_BATCH_SIZE": str(BATCH),
    "GENQ_WORKER_MAX_JOBS": str(2 * BATCH),
    "GENQ_WORKER_JOB_COMPLETION_WAIT_S": str(DRAIN_WAIT_S),
    "GENQ_CACHE_ENABLED": "false",  # every request is a job of its own
    # One anonymous client stands for all of them: no per-key limits on what is measured.
    "GENQ_RATE_LIMIT_REQUESTS_PER_MINUTE": "0",
    "GENQ_RATE_LIMIT_TOKENS_PER_MINUTE": "0",
    "GENQ_RATE_LIMIT_CONCURRENT": "0",
    "OMP_NUM_THREADS": "1",  # workers share the machine's cores instead of fighting over them
}


@dataclass(frozen=True)
class LoadShape:
    """Jobs per second, linear between (time, fraction of the peak) points: nothing, a rise, the
    peak held, a fall to half held (the pool scales in while its workers hold jobs), nothing."""

    peak_rps: float
    points: tuple[tuple[float, float], ...] = (
        (0, 0),
        (10, 0),
        (40, 1),
        (90, 1),
        (100, 0.5),
        (150, 0.5),
        (160, 0),
    )

    @property
    def end_s(self) -> float:
        return self.points[-1][0]

    def rate(self, t: float) -> float:
        for (t0, f0), (t1, f1) in itertools.pairwise(self.points):
            if t0 <= t < t1:
                return self.peak_rps * (f0 + (f1 - f0) * (t - t0) / (t1 - t0))
        return 0.0

    def arrivals(self, step_s: float = 0.01) -> list[float]:
        """Deterministic arrival times: one each time the integrated rate passes a whole job."""
        times: list[float] = []
        total, t = 0.0, 0.0
        while t < self.end_s:
            total += self.rate(t) * step_s
            t += step_s
            if total >= len(times) + 1:
                times.append(t)
        return times


def jobs_in_hand(metrics_port: int) -> str:
    """What a worker holds now, from its own `genq_worker_running_jobs` gauge."""
    try:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2).text
    except httpx.TransportError:
        return "jobs in hand unknown (metrics not served yet)"
    for family in text_string_to_metric_families(text):
        if family.name == "genq_worker_running_jobs":
            held = int(family.samples[0].value)
            return f"{held} job{'' if held == 1 else 's'} in hand"
    return "jobs in hand unknown"


@dataclass
class Replica:
    proc: Proc
    metrics_port: int
    started_s: float
    ready_s: float | None = None
    stopping_s: float | None = None
    exit_s: float | None = None
    exit_code: int | None = None
    killed: bool = False


@dataclass(frozen=True)
class Sample:
    t: float
    rate: float
    count: int
    replicas: int
    ready: int
    stopping: int


class Fleet:
    """Worker processes, started and stopped as a ReplicaSet would."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env, self.log_dir = env, log_dir
        self.replicas: list[Replica] = []

    def running(self) -> list[Replica]:
        """The replicas a ReplicaSet counts: started, neither stopping nor gone."""
        return [r for r in self.replicas if r.stopping_s is None and r.exit_s is None]

    def scale(self, now: float, desired: int, log: list[str]) -> None:
        """Start or stop workers to reach `desired`."""
        running = self.running()
        if desired != len(running):
            log.append(f"{now:6.1f}s  replicas {len(running)} -> {desired}")
        for _ in range(desired - len(running)):
            port = free_port()
            env = {**self.env, "GENQ_WORKER_METRICS_PORT": str(port)}
            self.replicas.append(Replica(Proc("worker", env, self.log_dir), port, now))
        # Not-ready pods go first, then the newest.
        victims = sorted(running, key=lambda r: (r.ready_s is not None, -r.started_s))
        for replica in victims[: max(0, len(running) - desired)]:
            in_hand = jobs_in_hand(replica.metrics_port)
            replica.proc.popen.send_signal(signal.SIGTERM)
            replica.stopping_s = now
            log.append(f"{now:6.1f}s  SIGTERM to worker {replica.proc.popen.pid}, {in_hand}")

    def observe(self, now: float, ready_pids: set[int], log: list[str]) -> None:
        for r in self.replicas:
            if r.ready_s is None and r.stopping_s is None and r.proc.popen.pid in ready_pids:
                r.ready_s = now
                log.append(
                    f"{now:6.1f}s  worker {r.proc.popen.pid} ready after {now - r.started_s:.1f}s"
                )
            if r.exit_s is None and (code := r.proc.popen.poll()) is not None:
                r.exit_s, r.exit_code = now, code
                drained = (
                    "" if r.stopping_s is None else f" {now - r.stopping_s:.1f}s after SIGTERM"
                )
                log.append(f"{now:6.1f}s  worker {r.proc.popen.pid} exited {code}{drained}")
            elif r.stopping_s is not None and r.exit_s is None and now - r.stopping_s > GRACE_S:
                r.proc.popen.kill()
                r.killed = True

    def alive(self) -> list[Replica]:
        return [r for r in self.replicas if r.exit_s is None]


async def submit_load(base: str, shape: LoadShape, t0: float, submitted: dict[str, float]) -> None:
    """Submit the shape's jobs on time; `submitted` maps each job id to its submission time."""
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:

        async def submit(i: int) -> None:
            body = {
                "prompt": f"Write one sentence about the number {i}.",
                "max_new_tokens": LONG_TOKENS if i % LONG_EVERY == 0 else SHORT_TOKENS,
                "temperature": 0,
            }
            at = time.monotonic() - t0
            reply = await client.post("/v1/jobs", json=body)
            reply.raise_for_status()
            submitted[reply.json()["id"]] = at

        async with asyncio.TaskGroup() as group:
            for i, at in enumerate(shape.arrivals()):
                await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
                group.create_task(submit(i))


async def control(
    redis: Redis, fleet: Fleet, shape: LoadShape, t0: float, loading: asyncio.Task[None]
) -> tuple[list[Sample], list[str]]:
    """The controller: poll, decide, scale, until the load is over and every worker is gone."""
    keda = KedaController(POLICY, started_at=0.0)
    samples: list[Sample] = []
    log: list[str] = []
    while True:
        now = time.monotonic() - t0
        count = int(await redis.zcard(keys.queue(POOL)))
        ready = {w.pid for w in await heartbeats.live_workers(redis, POOL)}
        fleet.observe(now, ready, log)
        fleet.scale(now, keda.desired(now, count, len(fleet.running())), log)
        running = fleet.running()
        ready_now = sum(r.ready_s is not None for r in running)
        stopping = len(fleet.alive()) - len(running)
        samples.append(Sample(now, shape.rate(now), count, len(running), ready_now, stopping))
        if loading.done() and not fleet.alive():
            return samples, log
        if now > shape.end_s + SETTLE_LIMIT_S:
            log.append(f"{now:6.1f}s  gave up: the pool did not scale to zero")
            return samples, log
        await asyncio.sleep(POLL_S)


@dataclass(frozen=True)
class Finished:
    t: float  # when it finished, on the run's clock
    latency_s: float  # from submission to its end, as the server recorded them


async def check_jobs(
    redis: Redis, submitted: dict[str, float], t0_epoch: float
) -> tuple[list[Finished], list[str]]:
    """Every job's end, and what is wrong with any of them."""
    s = Settings()
    store = JobStore(redis, ttl_s=s.result_ttl_s, events_maxlen=s.events_maxlen)
    finished, problems = [], []
    for job_id in submitted:
        job = await store.load(job_id)
        if job is None or job.result is None or job.finished_at is None:
            problems.append(f"{job_id}: {'lost' if job is None else job.status.value}")
            continue
        if job.status is not JobStatus.succeeded:
            problems.append(f"{job_id}: {job.status.value}")
        if job.attempt != 1:
            problems.append(f"{job_id}: started {job.attempt} times")
        stream = [events.decode(i, f) for i, f in await redis.xrange(keys.events(job_id))]
        tokens = [TokenEvent.model_validate_json(e.data) for e in stream if not e.type.terminal]
        terminal = [i for i, e in enumerate(stream) if e.type.terminal]
        if terminal != [len(stream) - 1]:
            problems.append(f"{job_id}: terminal events at {terminal} of {len(stream)}")
        if [t.index for t in tokens] != list(range(len(tokens))):
            problems.append(f"{job_id}: token indexes {[t.index for t in tokens]}")
        if "".join(t.text for t in tokens) != job.result.text:
            problems.append(f"{job_id}: the streamed text is not the result")
        finished.append(Finished(job.finished_at - t0_epoch, job.finished_at - job.created_at))
    return finished, problems


def fleet_problems(fleet: Fleet) -> list[str]:
    """Workers exit only when stopped; one stopped while ready drains and exits 0 by itself
    within the grace period."""
    problems = []
    for r in fleet.replicas:
        pid = r.proc.popen.pid
        if r.killed:
            problems.append(f"worker {pid} was killed {GRACE_S}s after SIGTERM")
        elif r.exit_s is None:
            problems.append(f"worker {pid} was still running at the end")
        elif r.stopping_s is None:
            tail = r.proc.log.read_text()[-1500:]
            problems.append(f"worker {pid} exited {r.exit_code} unasked:\n{tail}")
        elif r.ready_s is not None and r.exit_code != 0:
            problems.append(f"worker {pid} exited {r.exit_code} after SIGTERM")
    return problems


Row = dict[str, float | int | None]


def timeline(samples: list[Sample], submitted: list[float], done: list[Finished]) -> list[Row]:
    """One row per WINDOW_S: load, the queue count's peak, replicas at its end, latencies."""
    rows: list[Row] = []
    start = 0.0
    while start < samples[-1].t:
        stop = start + WINDOW_S
        window = [s for s in samples if start <= s.t < stop] or [samples[-1]]
        latencies = sorted(f.latency_s for f in done if start <= f.t < stop)
        rows.append(
            {
                "t_s": stop,
                "load_rps": sum(start <= t < stop for t in submitted) / WINDOW_S,
                "queue_max": max(s.count for s in window),
                "replicas": window[-1].replicas,
                "ready": window[-1].ready,
                "stopping": window[-1].stopping,
                "finished": len(latencies),
                "p50_s": statistics.median(latencies) if latencies else None,
                "p95_s": statistics.quantiles(latencies, n=20)[-1] if len(latencies) > 1 else None,
            }
        )
        start = stop
    return rows


def plot(samples: list[Sample], rows: list[Row], path: Path) -> None:
    t = [s.t for s in samples]
    fig = Figure(figsize=(9, 8))
    load, queue, reps, lat = fig.subplots(4, 1, sharex=True)
    load.plot(t, [s.rate for s in samples], label="offered load")
    load.set_ylabel("jobs/s")
    queue.plot(t, [s.count for s in samples], label="ZCARD of the queue (queued + running)")
    queue.step(
        t, [s.replicas * BATCH for s in samples], where="post", label="replicas x listLength"
    )
    queue.set_ylabel("jobs")
    reps.step(t, [s.replicas for s in samples], where="post", label="replicas")
    reps.step(t, [s.ready for s in samples], where="post", label="ready")
    reps.step(t, [s.stopping for s in samples], where="post", label="draining")
    reps.set_ylabel("workers")
    mid = [float(r["t_s"] or 0) - WINDOW_S / 2 for r in rows]
    lat.plot(mid, [r["p50_s"] for r in rows], marker="o", label="p50")
    lat.plot(mid, [r["p95_s"] for r in rows], marker="o", label="p95")
    lat.set_ylabel("latency (s)")
    lat.set_xlabel("time (s)")
    for ax in (load, queue, reps, lat):
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(
        f"bench.autoscale: KEDA redis trigger, listLength {BATCH}, "
        f"max {POLICY.max_replicas} replicas"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


@dataclass(frozen=True)
class Report:
    jobs: int
    workers_started: int
    problems: list[str]
    log: list[str]
    samples: list[Sample]
    timeline: list[Row]


async def run(shape: LoadShape, work_dir: Path) -> Report:
    server = RedisServer(work_dir / "redis", free_port(), persist=False)
    server.start()
    env = genq_env(server.url, **SETTINGS)
    fleet = Fleet(env, work_dir)
    redis = Redis.from_url(server.url)
    try:
        gateway, base = start_gateway(env, work_dir)
        try:
            t0, t0_epoch = time.monotonic(), time.time()
            submitted: dict[str, float] = {}
            loading = asyncio.create_task(submit_load(base, shape, t0, submitted))
            samples, log = await control(redis, fleet, shape, t0, loading)
            await loading
            done, problems = await check_jobs(redis, submitted, t0_epoch)
        finally:
            for replica in fleet.alive():
                replica.proc.stop()
            gateway.stop()
    finally:
        await redis.aclose()
        server.stop()
    return Report(
        jobs=len(submitted),
        workers_started=len(fleet.replicas),
        problems=problems + fleet_problems(fleet),
        log=log,
        samples=samples,
        timeline=timeline(samples, list(submitted.values()), done),
    )


def _figure(value: float | int | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_report(report: Report, plot_path: Path) -> None:
    print("time   load    queue  replicas  ready  draining  finished  p50 (s)  p95 (s)")
    for r in report.timeline:
        print(
            f"{_figure(r['t_s'], '4.0f')}s  {_figure(r['load_rps'], '4.1f')}/s  "
            f"{_figure(r['queue_max'], '5d')}  {_figure(r['replicas'], '8d')}  "
            f"{_figure(r['ready'], '5d')}  {_figure(r['stopping'], '8d')}  "
            f"{_figure(r['finished'], '8d')}  {_figure(r['p50_s'], '7.2f')}  "
            f"{_figure(r['p95_s'], '7.2f')}"
        )
    print("\nscaling:")
    for line in report.log:
        print(" ", line)
    print(f"\n{report.jobs} jobs, {report.workers_started} worker processes started")
    if report.problems:
        print(f"{len(report.problems)} problems:")
        for problem in report.problems[:50]:
            print(" ", problem)
    else:
        print(
            "every job succeeded once: one terminal event each, token indexes contiguous, "
            "streamed text = result; every stopped worker drained and exited 0"
        )
    print(f"plot: {plot_path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peak-rps", type=float, default=5.0, help="jobs per second at the peak")
    parser.add_argument("--plot", type=Path, default=Path("docs/autoscale.png"))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    ensure_default_model(Settings().model_cache_dir)
    with tempfile.TemporaryDirectory(prefix="genq-autoscale-") as tmp:
        report = asyncio.run(run(LoadShape(args.peak_rps), Path(tmp)))
    plot(report.samples, report.timeline, args.plot)
    if args.json:
        print(orjson.dumps(asdict(report)).decode())
    else:
        print_report(report, args.plot)
    sys.exit(1 if report.problems else 0)


if __name__ == "__main__":
    main()

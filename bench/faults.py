"""Faults injected into a running genq stack, and what its clients see.

    python -m bench.faults [--model PATH] [--clients 4] [--max-new-tokens 24]
                           [--only NAME,...] [--json]

It starts a stack of its own (a Redis with an append-only file, two gateways, one worker; the
default model unless --model names another), puts it under a steady load of careful clients,
and injects one fault after another (or those --only names), each time while jobs are running:

- `poison`: a poisoned request among running jobs (its row's scores turn NaN mid-decode, in a
  batch with others: `bench.fault_worker`'s poison trap);
- `worker-kill`: a worker killed with SIGKILL mid-job (the harness restarts it, as a supervisor
  would);
- `worker-term`: a worker stopped with SIGTERM mid-job (it drains and hands its jobs back);
- `engine-dies`, `step-hangs`, `loop-blocks`: a worker whose engine thread dies, whose engine
  step never returns, or whose event loop blocks (its watchdog exits it with status 3, a hang
  after `HANG_TIMEOUT_S`; the harness restarts it);
- `redis-pause`: Redis paused for 8 s (SIGSTOP, then SIGCONT);
- `redis-restart`: Redis killed with SIGKILL and restarted on its append-only file;
- `gateway-term`: a gateway stopped with SIGTERM while streams are open (clients move to the
  other one).

A client submits a job (retrying a refused submission with the same Idempotency-Key), follows
its event stream to the end (resuming with Last-Event-ID wherever it breaks off, on either
gateway), and then reads the whole stream again and checks it: one closing event, token indexes
without gap or repeat, streamed text (and logprobs) equal to the result. For each fault the
table (or, with --json, one JSON object a line, as each fault ends) shows what the clients saw,
the jobs accepted and how they ended: succeeded, failed (by error code), lost (accepted, never
ended), doubled (other than one closing event), and whether each job's stream equals its
result; the time until tokens flowed again after the fault ended and the longest stall. Only the
poisoned job may fail; nothing may be lost or doubled, and every stream must equal its result:
the exit status is 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from httpx_sse import connect_sse

from common.settings import Settings
from genq.redis_server import RedisServer, free_port
from tests.procs import Proc, genq_env, start_gateway, start_worker

# How long a client keeps trying before it calls a job lost.
JOB_DEADLINE_S = 180
# The watchdog timeout of a worker with a hang to inject: a hang is found this long after it
# began (the default, 300 s, leaves room for a slow step of a big model).
HANG_TIMEOUT_S = 5
# A prompt that holds it is poisoned by the fault workers' trap (`bench.fault_worker`).
POISON_MARKER = "<poison>"


@dataclass
class Observed:
    """What the clients saw, shared by the client threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    answers: Counter[str] = field(default_factory=Counter)  # "503", "resumed", ...
    token_times: list[float] = field(default_factory=list)
    accepted: dict[str, float] = field(default_factory=dict)  # job id -> when
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)  # job id -> final job
    doubled: set[str] = field(default_factory=set)  # jobs with other than one closing event
    # Jobs whose stream has a gap or a repeat, or, for one that succeeded, differs from its
    # result.
    stream_differs: set[str] = field(default_factory=set)
    followed: dict[str, str] = field(default_factory=dict)  # job id -> the text read live
    resumed: set[str] = field(default_factory=set)  # jobs whose stream resumed with Last-Event-ID
    open_streams: int = 0  # streams being read right now
    longest_refusal_s: float = 0.0
    longest_stall_s: float = 0.0  # the longest a job's stream went without a token

    def saw(self, what: str, took_s: float = 0.0) -> None:
        with self.lock:
            self.answers[what] += 1
            if what == "503":
                self.longest_refusal_s = max(self.longest_refusal_s, took_s)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """While a client reads a stream."""
        with self.lock:
            self.open_streams += 1
        try:
            yield
        finally:
            with self.lock:
                self.open_streams -= 1

    def token(self, since: float) -> float:
        """A token came; `since`: when the job's previous one did (or it was accepted)."""
        now = time.monotonic()
        with self.lock:
            self.token_times.append(now)
            self.longest_stall_s = max(self.longest_stall_s, now - since)
        return now


class Client(threading.Thread):
    """Submits jobs one after another and follows each one to its end."""

    def __init__(
        self, bases: list[str], body: dict[str, object], seen: Observed, stop: threading.Event
    ) -> None:
        super().__init__(daemon=True)
        self.bases = bases
        self.body = body
        self.seen = seen
        self.stop = stop
        self.turn = 0
        self.http = httpx.Client(timeout=httpx.Timeout(10, read=30))

    def base(self) -> str:
        return self.bases[self.turn % len(self.bases)]

    def other(self) -> None:
        """Move to the next gateway (the one in use is gone, or refusing)."""
        self.turn += 1

    def run(self) -> None:
        with self.http:
            while not self.stop.is_set():
                job_id = self.submit()
                if job_id is not None and self.follow(job_id):
                    self.check(job_id)

    def submit(self) -> str | None:
        key = uuid.uuid4().hex
        body = {**self.body, "prompt": f"{self.body['prompt']} {key[:8]}"}
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                resp = self.http.post(
                    f"{self.base()}/v1/jobs", json=body, headers={"Idempotency-Key": key}
                )
            except httpx.TransportError:
                self.seen.saw("connection error")
                self.other()
                time.sleep(0.2)
                continue
            if resp.status_code == 202:
                job_id: str = resp.json()["id"]
                with self.seen.lock:
                    self.seen.accepted.setdefault(job_id, time.monotonic())
                return job_id
            self.seen.saw(str(resp.status_code), time.monotonic() - started)
            self.other()
            time.sleep(float(resp.headers.get("retry-after", "1")) / 4)
        return None

    def follow(self, job_id: str) -> bool:
        """Read the stream to its closing event, resuming wherever it breaks off, and keep the
        text it delivered; False if the closing event never came."""
        last: str | None = None
        text: list[str] = []
        deadline = time.monotonic() + JOB_DEADLINE_S
        previous = self.seen.accepted[job_id]
        while time.monotonic() < deadline:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                with connect_sse(
                    self.http, "GET", f"{self.base()}/v1/jobs/{job_id}/events", headers=headers
                ) as source:
                    if source.response.status_code != 200:
                        self.seen.saw(str(source.response.status_code))
                        self.other()
                        time.sleep(0.25)
                        continue
                    with self.seen.reading():
                        for event in source.iter_sse():
                            if not event.data:  # a keep-alive
                                continue
                            data = orjson.loads(event.data)
                            if event.event == "error" and "status" not in data:
                                # A resumable break (no id: the last one still stands), not the
                                # job's end, whose data is the failed job.
                                self.seen.saw(f"stream {data['error']['code']}")
                                break
                            last = event.id
                            if event.event != "token":
                                with self.seen.lock:
                                    self.seen.followed[job_id] = "".join(text)
                                return True
                            text.append(data["text"])
                            previous = self.seen.token(previous)
            except httpx.TransportError:
                self.seen.saw("stream cut")
                self.other()
                time.sleep(0.25)
            if last is not None:
                self.seen.saw("resumed")
                with self.seen.lock:
                    self.seen.resumed.add(job_id)
        return False

    def check(self, job_id: str) -> None:
        """The whole stream once more, from the start: exactly one result, nothing repeated."""
        events = None
        deadline = time.monotonic() + JOB_DEADLINE_S
        while events is None:
            if time.monotonic() > deadline:
                return  # never verified: the job counts as lost
            try:
                url = f"{self.base()}/v1/jobs/{job_id}/events"
                with connect_sse(self.http, "GET", url) as source:
                    if source.response.status_code == 200:
                        events = list(source.iter_sse())
            except httpx.TransportError:
                pass
            if events is None:
                self.other()
                time.sleep(0.25)
        events = [e for e in events if e.data]
        closing = [e for e in events if e.event != "token"]
        tokens = [orjson.loads(e.data) for e in events if e.event == "token"]
        final = orjson.loads(closing[-1].data) if closing else {}
        result = final.get("result")
        same = [t["index"] for t in tokens] == list(range(len(tokens))) and (
            result is None
            or (
                result["text"] == "".join(t["text"] for t in tokens)
                # and what the client read live, across its resumptions
                and self.seen.followed.get(job_id) == result["text"]
                and _same_logprobs(result, tokens)
            )
        )
        with self.seen.lock:
            if len(closing) != 1 or job_id in self.seen.finished:
                self.seen.doubled.add(job_id)
            if not same:
                self.seen.stream_differs.add(job_id)
            self.seen.finished[job_id] = final


# A re-run computes the same tokens' logprobs in another batch: the last digits may differ.
_LOGPROB_TOLERANCE = 1e-3


def _same_logprobs(result: dict[str, Any], tokens: list[dict[str, Any]]) -> bool:
    """The token events carried the result's logprobs, where it has some: the stream of a job
    re-run after its worker died goes on with the same tokens, and logprobs equal but for
    rounding (those sent before the worker died are the first attempt's)."""
    final = result.get("logprobs")
    if final is None:
        return True
    streamed = [entry for token in tokens for entry in token.get("logprobs", [])]
    return [e["id"] for e in streamed] == [e["id"] for e in final] and all(
        abs(a["logprob"] - b["logprob"]) <= _LOGPROB_TOLERANCE
        for a, b in zip(streamed, final, strict=True)
    )


class Stack:
    """Redis (append-only file), two gateways and a worker, each of which a fault may hit."""

    def __init__(self, data_dir: Path, log_dir: Path, **settings: str) -> None:
        self.redis = RedisServer(data_dir / "redis", free_port(), persist=True)
        self.log_dir = log_dir
        self.redis.start()
        self.env = genq_env(self.redis.url, **settings)
        self.model = settings.get("GENQ_MODEL_NAME")
        self.gateways: list[Proc] = []
        self.bases: list[str] = []
        self.workers: list[Proc] = []
        try:
            for _ in range(2):
                gateway, base = start_gateway(self.env, log_dir)
                self.gateways.append(gateway)
                self.bases.append(base)
            self.start_worker()
        except BaseException:
            self.close()
            raise

    def start_worker(self, fault: str | None = None) -> Proc:
        """A worker with the poison trap (`bench.fault_worker`), and `fault` armed if given,
        under a watchdog timeout of HANG_TIMEOUT_S."""
        env = self.env
        if fault is not None:
            env = {**env, "FAULT": fault, "GENQ_WORKER_WATCHDOG_TIMEOUT_S": str(HANG_TIMEOUT_S)}
        proc = start_worker(
            env, self.log_dir, self.bases[0], self.model, module="bench.fault_worker"
        )
        self.workers.append(proc)
        return proc

    def replace_worker(self, sig: int) -> tuple[int, float]:
        """Signal the worker, wait for it to exit, start another; its exit status and how long
        it took to exit."""
        worker = self.workers.pop()
        started = time.monotonic()
        worker.popen.send_signal(sig)
        status = worker.popen.wait(timeout=120)
        took = time.monotonic() - started
        self.start_worker()
        return status, took

    def pause_redis(self, seconds: float) -> None:
        self.redis.pause()
        time.sleep(seconds)
        self.redis.resume()

    def restart_redis(self) -> None:
        """SIGKILL, then a new redis-server on the same port and append-only file."""
        assert self.redis.pid is not None
        os.kill(self.redis.pid, signal.SIGKILL)
        self.redis.stop()
        self.redis.start()

    def genq_exited(self) -> list[str]:
        return [
            f"{p.name} (status {p.popen.returncode})"
            for p in [*self.gateways, *self.workers]
            if p.popen.poll() is not None
        ]

    def close(self) -> None:
        for proc in [*self.workers, *self.gateways]:
            proc.stop()
        self.redis.stop()


@dataclass
class Outcome:
    """How one fault went, as the clients saw it."""

    fault: str  # its short name (FAULTS' key)
    description: str
    clients_saw: str
    accepted: int
    succeeded: int
    failed: dict[str, int]  # error code (or the status, for a job that ended otherwise) -> jobs
    lost: int  # accepted, never ended
    doubled: int  # other than one closing event
    stream_equal: int  # succeeded, and the stream equals the result
    stream_differs: int  # a gap or repeat in the stream, or a stream unlike the result
    rerun: int  # ended on a later attempt than their first: ran again, on another worker
    recovery_s: float | None  # from the end of the fault to the next token any client got
    stall_s: float  # the longest any job's stream went without a token
    exited: list[str]  # genq processes that exited, other than by the fault itself

    def problems(self, expected_failed: Mapping[str, int]) -> list[str]:
        """What went wrong, given the failures the fault itself causes."""
        return [
            what
            for what, wrong in (
                (f"failed {self.failed}", self.failed != expected_failed),
                (f"lost {self.lost}", self.lost > 0),
                (f"doubled {self.doubled}", self.doubled > 0),
                (f"stream differs {self.stream_differs}", self.stream_differs > 0),
                (f"exited {self.exited}", bool(self.exited)),
                ("no tokens after the fault", self.recovery_s is None),
            )
            if wrong
        ]


def outcome(
    seen: Observed, fault: str, description: str, note: str, ended: float, exited: list[str]
) -> Outcome:
    """The tally of what `seen` saw; `ended`: when the fault ended (time.monotonic())."""
    with seen.lock:
        after = [t for t in seen.token_times if t > ended]
        statuses = [seen.finished.get(job_id) for job_id in seen.accepted]
        saw: dict[str, object] = dict(seen.answers)
        if seen.longest_refusal_s:
            saw["503 slowest (ms)"] = round(seen.longest_refusal_s * 1000)
        succeeded = [
            job_id
            for job_id in seen.accepted
            if seen.finished.get(job_id, {}).get("status") == "succeeded"
        ]
        failed = Counter(
            (final.get("error") or {}).get("code") or str(final.get("status"))
            for final in statuses
            if final is not None and final.get("status") != "succeeded"
        )
        equal = [job_id for job_id in succeeded if job_id not in seen.stream_differs]
        rerun = sum(1 for final in statuses if final is not None and final.get("attempt", 1) > 1)
        if rerun:
            saw["ran again"] = rerun
        return Outcome(
            fault=fault,
            description=description,
            clients_saw="; ".join(
                filter(None, [", ".join(f"{k}: {v}" for k, v in sorted(saw.items())), note])
            )
            or "nothing unusual",
            accepted=len(seen.accepted),
            succeeded=len(succeeded),
            failed=dict(sorted(failed.items())),
            lost=statuses.count(None),
            doubled=len(seen.doubled),
            stream_equal=len(equal),
            stream_differs=len(seen.stream_differs),
            rerun=rerun,
            recovery_s=round(after[0] - ended, 2) if after else None,
            stall_s=round(seen.longest_stall_s, 2),
            exited=exited,
        )


@contextlib.contextmanager
def load(stack: Stack, clients: int, body: dict[str, object]) -> Iterator[Observed]:
    seen = Observed()
    stop = threading.Event()
    threads = [Client(stack.bases, body, seen, stop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield seen
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=JOB_DEADLINE_S + 30)


def run_fault(
    stack: Stack, name: str, *, clients: int, body: dict[str, object], settle_s: float = 3.0
) -> Outcome:
    """Load the stack, let jobs run for a moment, inject the fault (it returns a note on what
    it did), keep the load on until tokens flow again, then let every accepted job finish."""
    fault = FAULTS[name]
    with load(stack, clients, body) as seen:
        _wait_for(lambda: len(seen.token_times) >= clients * 3, 120, "tokens before the fault")
        note = fault.inject(stack, body, seen)
        ended = time.monotonic()
        _wait_for(lambda: any(t > ended for t in seen.token_times), 120, "tokens after the fault")
        time.sleep(settle_s)
    return outcome(seen, name, fault.description, note, ended, stack.genq_exited())


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s:.0f} s")
        time.sleep(0.05)


def poison(stack: Stack, body: dict[str, object], seen: Observed) -> str:
    """A job whose prompt holds the poison trap's marker, submitted and checked as the clients
    do theirs (so it counts among the fault's jobs): its row is poisoned only in a batch with
    other rows, so it must fail while they succeed. `ignore_eos` keeps it running until the
    trap strikes."""
    poisoned = {**body, "prompt": f"{body['prompt']} {POISON_MARKER}", "ignore_eos": True}
    client = Client(stack.bases, poisoned, seen, threading.Event())
    with client.http:
        job_id = client.submit()
        assert job_id is not None, "submitted until accepted: no stop was set"
        if client.follow(job_id):
            client.check(job_id)
    final = seen.finished.get(job_id)
    if final is None:
        return "the poisoned job never ended"
    code = (final.get("error") or {}).get("code")
    return f"the poisoned job ended {final['status']}" + (f" ({code})" if code else "")


def kill_worker(stack: Stack, body: dict[str, object], seen: Observed) -> str:
    status, _ = stack.replace_worker(signal.SIGKILL)
    return f"worker exit {status}"


def term_worker(stack: Stack, body: dict[str, object], seen: Observed) -> str:
    status, took = stack.replace_worker(signal.SIGTERM)
    return f"worker exit {status} after {took:.1f} s"


def unhealthy_worker(fault: str) -> Inject:
    """The worker is replaced by one with `fault` armed (`bench.fault_worker`), which takes
    the jobs over and strikes a few steps in; once its watchdog has exited it, a healthy worker
    takes its place and runs the jobs again."""

    def inject(stack: Stack, body: dict[str, object], seen: Observed) -> str:
        stack.workers.pop().stop()
        failing = stack.start_worker(fault)
        started = time.monotonic()
        status = failing.popen.wait(timeout=120)
        took = time.monotonic() - started
        stack.workers.remove(failing)
        stack.start_worker()
        return f"worker exit {status} {took:.1f} s after it served ({_tripped(failing)})"

    return inject


def _tripped(worker: Proc) -> str:
    """Why the worker's watchdog tripped, as its log says (text or JSON)."""
    for line in worker.log.read_text(errors="replace").splitlines():
        if (end := line.find("; the worker exits")) >= 0:
            # The last "watchdog: " before it: a text log's logger name ends so too.
            return line[line.rfind("watchdog: ", 0, end) : end]
    return "no watchdog"


def pause_redis(stack: Stack, body: dict[str, object], seen: Observed) -> str:
    stack.pause_redis(8)
    return ""


def restart_redis(stack: Stack, body: dict[str, object], seen: Observed) -> str:
    stack.restart_redis()
    return ""


def term_gateway(stack: Stack, body: dict[str, object], seen: Observed) -> str:
    gateway = stack.gateways[0]
    started = time.monotonic()
    gateway.popen.send_signal(signal.SIGTERM)
    status = gateway.popen.wait(timeout=60)
    took = time.monotonic() - started
    stack.gateways[0], stack.bases[0] = start_gateway(stack.env, stack.log_dir)
    return f"gateway exit {status} after {took:.1f} s"


# Injects a fault into the stack under load; returns a note on what it did.
Inject = Callable[[Stack, dict[str, object], Observed], str]


@dataclass(frozen=True)
class Fault:
    description: str
    inject: Inject
    # The jobs the fault itself fails, by error code; any other failure is the service's.
    fails: Mapping[str, int] = field(default_factory=dict)


FAULTS: dict[str, Fault] = {
    "poison": Fault("a poisoned request among running jobs", poison, fails={"numerical_error": 1}),
    "worker-kill": Fault("worker SIGKILL mid-job", kill_worker),
    "worker-term": Fault("worker SIGTERM mid-job", term_worker),
    "engine-dies": Fault("engine thread dies", unhealthy_worker("engine-dies")),
    "step-hangs": Fault(
        f"an engine step never returns (watchdog {HANG_TIMEOUT_S} s)",
        unhealthy_worker("step-hangs"),
    ),
    "loop-blocks": Fault(
        f"the event loop blocks (watchdog {HANG_TIMEOUT_S} s)", unhealthy_worker("loop-blocks")
    ),
    "redis-pause": Fault("Redis paused 8 s", pause_redis),
    "redis-restart": Fault("Redis SIGKILL + restart (AOF)", restart_redis),
    "gateway-term": Fault("gateway SIGTERM with open streams", term_gateway),
}


def table(outcomes: list[Outcome]) -> str:
    rows = [
        "| fault | what the clients saw | accepted | succeeded | failed | lost | doubled "
        "| stream = result | recovery (s) | longest stall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        recovery = "n/a" if o.recovery_s is None else f"{o.recovery_s:.2f}"
        failed = sum(o.failed.values())
        codes = ", ".join(f"{code}: {n}" for code, n in o.failed.items())
        rows.append(
            f"| {o.description} (`{o.fault}`) | {o.clients_saw} | {o.accepted} | {o.succeeded} "
            f"| {failed}{f' ({codes})' if codes else ''} | {o.lost} | {o.doubled} "
            f"| {o.stream_equal} yes, {o.stream_differs} no | {recovery} | {o.stall_s:.2f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="checkpoint directory (default: the default model)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument(
        "--only", type=_names, default=list(FAULTS), help=f"of {','.join(FAULTS)} (default: all)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object a fault")
    parser.add_argument("--data-dir", type=Path, default=Path("var/bench-faults"))
    args = parser.parse_args()

    run_dir, log_dir, settings, body = bench_run(args.data_dir, args.model, args.max_new_tokens)
    stack = Stack(run_dir, log_dir, **settings)
    outcomes = []
    try:
        for name in args.only:
            print(f"{name}...", file=sys.stderr, flush=True)
            outcomes.append(run_fault(stack, name, clients=args.clients, body=body))
            if args.json:
                print(orjson.dumps(asdict(outcomes[-1])).decode(), flush=True)
    finally:
        stack.close()
    if not args.json:
        print(table(outcomes))
    problems = [
        f"{o.fault}: {', '.join(wrong)}"
        for o in outcomes
        if (wrong := o.problems(FAULTS[o.fault].fails))
    ]
    if problems:
        print("\n".join(problems), file=sys.stderr)
        raise SystemExit(1)


def bench_run(
    data_dir: Path, model: str | None, max_new_tokens: int
) -> tuple[Path, Path, dict[str, str], dict[str, object]]:
    """A benchmark's stack directory, its log directory, its processes' settings and its jobs'
    body: the default model unless `model` names a checkpoint, and production timings."""
    defaults = Settings.model_fields
    settings = {
        "GENQ_LOG_FORMAT": "json",
        "GENQ_CACHE_ENABLED": "false",
        # The production timings, not the short ones of the test suite's processes.
        "GENQ_WORKER_HEARTBEAT_S": str(defaults["worker_heartbeat_s"].default),
        "GENQ_WORKER_JOB_COMPLETION_WAIT_S": str(defaults["worker_job_completion_wait_s"].default),
    }
    if model:
        settings |= {"GENQ_MODEL": model, "GENQ_MODEL_NAME": "bench"}
    data_dir.mkdir(parents=True, exist_ok=True)
    log_dir = data_dir / f"logs-{time.strftime('%Y%m%d-%H%M%S')}"
    log_dir.mkdir()
    body: dict[str, object] = {
        "prompt": "Tell me about",
        "max_new_tokens": max_new_tokens,
        "temperature": 1.0,
    }
    return data_dir / f"run-{uuid.uuid4().hex[:8]}", log_dir, settings, body


def _names(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if unknown := [name for name in names if name not in FAULTS]:
        raise argparse.ArgumentTypeError(f"no fault {', '.join(unknown)}; of {', '.join(FAULTS)}")
    return names


if __name__ == "__main__":
    main()

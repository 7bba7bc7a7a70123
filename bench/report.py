"""The serving benchmark: the whole stack under load, against the engine alone and against the
usual first attempt, in one run.

    python -m bench.report [--model PATH] [--duration 60] [--concurrency 1,4,16,32,64]
                           [--batch-sizes 1,4,8,16,32] [--write-docs] [--json]

It starts a stack of its own (as `make run` does: Redis, a gateway, a worker with the default
model, or --model; result cache off, no rate limits) and drives it with closed-loop clients,
each sending one request after another: chat prompts never seen before (numbered and tagged
with the run, so no cache can answer them), `max_new_tokens` 64, sampled (temperature 1.0) with
a distinct seed each, `ignore_eos`, so every request generates exactly 64 tokens. It measures:

- the concurrency sweep: OpenAI chat streaming at each concurrency;
- the routes at 16 clients: native SSE (`POST /v1/jobs` + its events), sync (`POST
  /v1/generate`), submit-and-poll, beside the OpenAI stream;
- the engine's batch size (`GENQ_MAX_BATCH_SIZE`) at 16 streaming clients, one worker each;
- in the same run, the engine alone (in this process, no queue, no HTTP) at each concurrency,
  and a plain FastAPI app calling `model.generate` per request (`bench.plain_server`) at each.

At each concurrency the three systems run back to back, so that the ratios the targets take
compare figures measured minutes apart, not half an hour.

For each: requests/s, generated tokens/s, time to first token, inter-token latency and
end-to-end latency at p50/p90/p99 (TTFT and ITL only where tokens stream), and the error rate.
Tokens/s counts each request's tokens as spread over its streaming time, within the measured
window (after a warm-up of `--warmup` seconds). With `--write-docs` it writes the tables and
plots (PNG) into docs/benchmarks.md between the markers of its kind of device, with the machine
described: a run on a GPU writes a second section, labelled with the card, beside the CPU one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import torch
from httpx_sse import EventSource

from bench.engine_workload import EngineDriver
from common.settings import Settings
from gateway.schemas import ChatMessage, GenerationRequest
from genq.redis_server import RedisServer, free_port
from tests.procs import Proc, genq_env, start_gateway, start_worker
from worker.engine.model import LoadedModel
from worker.engine.sampling import SamplingParams
from worker.loading import load_model
from worker.model_manager import decode_config, engine_limits

NEW_TOKENS = 64
TOPICS = [
    "how tides work",
    "why bread rises",
    "what a hash table is",
    "how bees find flowers",
    "why the sea is salty",
    "how a bicycle stays up",
    "what inflation is",
    "how vaccines work",
]
DOCS = Path("docs/benchmarks.md")
# One section per kind of device: a GPU run writes its own tables beside the CPU run's.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BEGIN, END = f"<!-- bench.report {DEVICE}: begin -->", f"<!-- bench.report {DEVICE}: end -->"


class Prompts:
    """Prompts no earlier run has seen: numbered and tagged with this run."""

    def __init__(self) -> None:
        self.run = uuid.uuid4().hex[:8]
        self.count = 0

    def next(self) -> str:
        self.count += 1
        topic = TOPICS[self.count % len(TOPICS)]
        return f"({self.run}-{self.count}) In a few sentences, explain {topic}."


@dataclass
class Sample:
    """One request: when it started and ended, when its tokens came, whether it failed."""

    started: float
    ended: float = 0.0
    token_times: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.started if self.token_times else None

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


@dataclass
class Figures:
    system: str
    route: str
    concurrency: int
    requests_per_s: float
    tokens_per_s: float
    error_rate: float
    ttft_s: dict[str, float] | None
    itl_s: dict[str, float] | None
    e2e_s: dict[str, float]
    requests: int


def _pct(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


def summarise(
    system: str, route: str, concurrency: int, samples: list[Sample], start: float, end: float
) -> Figures:
    """Figures of the requests of the window [start, end]: a request counts if it ended in it;
    its tokens count as spread evenly between its first token and its end."""
    window = end - start
    done = [s for s in samples if start <= s.ended <= end]
    ok = [s for s in done if s.error is None]
    tokens = 0.0
    for s in samples:
        if s.error is not None or not s.tokens:
            continue
        first = s.token_times[0] if s.token_times else s.started
        span = max(s.ended - first, 1e-9)
        inside = max(0.0, min(s.ended, end) - max(first, start))
        tokens += s.tokens * (inside / span if s.ended > first else float(start <= s.ended <= end))
    streamed = any(s.token_times for s in ok)
    return Figures(
        system=system,
        route=route,
        concurrency=concurrency,
        requests_per_s=len(ok) / window,
        tokens_per_s=tokens / window,
        error_rate=(len(done) - len(ok)) / len(done) if done else 0.0,
        ttft_s=_pct([t for s in ok if (t := s.ttft) is not None]) if streamed else None,
        itl_s=_pct([g for s in ok for g in s.gaps]) if streamed else None,
        e2e_s=_pct([s.ended - s.started for s in ok]),
        requests=len(ok),
    )


# --- clients ------------------------------------------------------------------------------------

Route = Callable[[httpx.AsyncClient, str, int], Awaitable[Sample]]


def _body(prompt: str, seed: int) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": prompt}],
        "max_new_tokens": NEW_TOKENS,
        "temperature": 1.0,
        "seed": seed,
        "ignore_eos": True,
    }


async def openai_stream(http: httpx.AsyncClient, prompt: str, seed: int) -> Sample:
    sample = Sample(time.perf_counter())
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": prompt}],
        "max_completion_tokens": NEW_TOKENS,
        "temperature": 1.0,
        "seed": seed,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            sample.error = f"HTTP {resp.status_code}"
        else:
            async for event in EventSource(resp).aiter_sse():
                if event.data == "[DONE]":
                    break
                chunk = orjson.loads(event.data)
                if "error" in chunk:
                    sample.error = chunk["error"]["code"]
                    break
                if chunk.get("usage"):
                    sample.tokens = chunk["usage"]["completion_tokens"]
                if any(c["delta"].get("content") for c in chunk.get("choices", [])):
                    sample.token_times.append(time.perf_counter())
    sample.ended = time.perf_counter()
    return sample


async def native_sse(http: httpx.AsyncClient, prompt: str, seed: int) -> Sample:
    sample = Sample(time.perf_counter())
    job_id = await _submit(http, prompt, seed, sample)
    if job_id is None:
        return sample
    async with http.stream("GET", f"/v1/jobs/{job_id}/events") as events:
        async for event in EventSource(events).aiter_sse():
            if event.event == "token":
                sample.token_times.append(time.perf_counter())
            elif event.event in ("done", "error"):
                _settle(sample, orjson.loads(event.data))
                break
    sample.ended = time.perf_counter()
    return sample


async def sync(http: httpx.AsyncClient, prompt: str, seed: int) -> Sample:
    sample = Sample(time.perf_counter())
    resp = await http.post("/v1/generate", json={**_body(prompt, seed), "timeout_s": 300})
    sample.ended = time.perf_counter()
    if resp.status_code == 200 and resp.json()["status"] == "succeeded":
        sample.tokens = resp.json()["result"]["usage"]["completion_tokens"]
    else:
        sample.error = f"HTTP {resp.status_code}"
    return sample


async def poll(http: httpx.AsyncClient, prompt: str, seed: int) -> Sample:
    sample = Sample(time.perf_counter())
    job_id = await _submit(http, prompt, seed, sample)
    if job_id is None:
        return sample
    while True:
        await asyncio.sleep(0.1)
        job = (await http.get(f"/v1/jobs/{job_id}")).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
    sample.ended = time.perf_counter()
    _settle(sample, job)
    return sample


async def _submit(http: httpx.AsyncClient, prompt: str, seed: int, sample: Sample) -> str | None:
    """The queued job's id; None (the sample ended with the error) when it was refused."""
    resp = await http.post("/v1/jobs", json=_body(prompt, seed))
    if resp.status_code != 202:
        sample.error, sample.ended = f"HTTP {resp.status_code}", time.perf_counter()
        return None
    return str(resp.json()["id"])


def _settle(sample: Sample, job: dict[str, Any]) -> None:
    """A finished job record's tokens, or what ended it otherwise."""
    if job.get("status") == "succeeded":
        sample.tokens = job["result"]["usage"]["completion_tokens"]
    else:
        sample.error = str(job.get("error") or job.get("status"))


async def plain(http: httpx.AsyncClient, prompt: str, seed: int) -> Sample:
    sample = Sample(time.perf_counter())
    resp = await http.post("/generate", json=_body(prompt, seed))
    sample.ended = time.perf_counter()
    if resp.status_code == 200:
        sample.tokens = resp.json()["completion_tokens"]
    else:
        sample.error = f"HTTP {resp.status_code}"
    return sample


ROUTES: dict[str, Route] = {
    "openai stream": openai_stream,
    "native SSE": native_sse,
    "sync": sync,
    "poll": poll,
}


async def _closed_loop(
    base: str, route: Route, concurrency: int, prompts: Prompts, warmup_s: float, duration_s: float
) -> tuple[list[Sample], float, float]:
    """`concurrency` clients, each sending requests one after another, until `duration_s`."""
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(600, connect=10)
    began = time.perf_counter()
    stop = began + warmup_s + duration_s
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout) as http:

        async def client(index: int) -> None:
            rng = random.Random(index)
            while time.perf_counter() < stop:
                try:
                    sample = await route(http, prompts.next(), rng.randrange(2**31))
                except httpx.HTTPError as e:
                    sample = Sample(time.perf_counter(), time.perf_counter(), error=repr(e))
                samples.append(sample)

        await asyncio.gather(*(client(i) for i in range(concurrency)))
    return samples, began + warmup_s, stop


def measure(
    system: str,
    base: str,
    route_name: str,
    route: Route,
    concurrency: int,
    prompts: Prompts,
    args: argparse.Namespace,
) -> Figures:
    samples, start, end = asyncio.run(
        _closed_loop(base, route, concurrency, prompts, args.warmup, args.duration)
    )
    figures = summarise(system, route_name, concurrency, samples, start, end)
    print(_line(figures), file=sys.stderr, flush=True)
    return figures


# --- the engine alone ---------------------------------------------------------------------------


def engine_alone(
    lm: LoadedModel, concurrency: int, prompts: Prompts, args: argparse.Namespace
) -> Figures:
    """The same workload through the engine in this process, configured as the stack's worker
    is (its settings' limits and decode path): no queue, no Redis, no HTTP."""
    settings = Settings(model=args.model)
    driver = EngineDriver(lm, engine_limits(settings), decode_config(settings))
    samples: dict[str, Sample] = {}
    rng = random.Random(0)
    began = time.perf_counter()
    start, stop = began + args.warmup, began + args.warmup + args.duration
    count = 0

    def submit() -> None:
        nonlocal count
        count += 1
        rid = str(count)
        request = GenerationRequest(messages=[ChatMessage(role="user", content=prompts.next())])
        params = SamplingParams(
            max_new_tokens=NEW_TOKENS, temperature=1.0, seed=rng.randrange(2**31), ignore_eos=True
        )
        samples[rid] = Sample(time.perf_counter())
        driver.submit_request(rid, request, params)

    for _ in range(concurrency):
        submit()
    while True:
        seen = len(driver.finished)
        driver.wait(lambda seen=seen: len(driver.finished) > seen)  # type: ignore[misc]
        for rid, at in driver.finished.items():
            sample = samples[rid]
            if not sample.ended:
                sample.ended = at
                sample.tokens = driver.tokens[rid]
                # The engine reports a request's first output and its end: its tokens are
                # taken as evenly spaced between them (ITL: the mean gap of each request).
                first = driver.first[rid]
                step = (at - first) / max(sample.tokens - 1, 1)
                sample.token_times = [first + i * step for i in range(max(sample.tokens, 1))]
                if time.perf_counter() < stop:
                    submit()
        if all(s.ended for s in samples.values()):
            break
    driver.close()
    figures = summarise(
        "engine alone", "in-process", concurrency, list(samples.values()), start, stop
    )
    print(_line(figures), file=sys.stderr, flush=True)
    return figures


# --- the systems --------------------------------------------------------------------------------


class Stack:
    """Redis, a gateway and one worker, as `make run` starts them; the worker restarted with
    other settings on demand."""

    def __init__(self, work: Path, model: str | None) -> None:
        self.redis = RedisServer(work / "redis", free_port(), persist=False)
        self.redis.start()
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        settings = {
            "GENQ_LOG_FORMAT": "json",
            "GENQ_CACHE_ENABLED": "false",
            "GENQ_RATE_LIMIT_REQUESTS_PER_MINUTE": "0",
            "GENQ_RATE_LIMIT_TOKENS_PER_MINUTE": "0",
            "GENQ_RATE_LIMIT_CONCURRENT": "0",
            # The production timings, not the short ones of the test suite's processes.
            "GENQ_WORKER_HEARTBEAT_S": str(Settings.model_fields["worker_heartbeat_s"].default),
        }
        if model:
            settings |= {"GENQ_MODEL": model, "GENQ_MODEL_NAME": "bench"}
        self.model = "bench" if model else None
        self.env = genq_env(self.redis.url, **settings)
        self.gateway, self.base = start_gateway(self.env, self.logs)
        self.worker: Proc | None = None

    def serve(self, **settings: str) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.worker = start_worker({**self.env, **settings}, self.logs, self.base, self.model)
        # Its first requests pay for lazy initialisation: one, then the measurements.
        with httpx.Client(base_url=self.base, timeout=300) as http:
            http.post("/v1/generate", json={**_body("Warm up.", 0), "max_new_tokens": 4})

    def close(self) -> None:
        for proc in (self.worker, self.gateway):
            if proc is not None:
                proc.stop()
        self.redis.stop()


class PlainServer:
    """bench.plain_server in a process of its own."""

    def __init__(self, model: str | None, logs: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "bench.plain_server", "--port", str(self.port)]
        if model:
            command += ["--model", model]
        self.log = (logs / "plain-server.log").open("wb")
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            try:
                httpx.post(f"{self.base}/generate", json=_body("Warm up.", 0), timeout=120)
                return
            except httpx.TransportError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the plain server did not start") from None
                time.sleep(0.5)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


# --- output -------------------------------------------------------------------------------------


def _ms(p: dict[str, float] | None, q: str) -> str:
    return "n/a" if not p else f"{p[q] * 1000:.0f}"


def _s(p: dict[str, float] | None, q: str) -> str:
    return "n/a" if not p else f"{p[q]:.2f}"


def _line(f: Figures) -> str:
    return (
        f"{f.system:>14} {f.route:>13} c={f.concurrency:<3} {f.tokens_per_s:7.1f} tok/s "
        f"{f.requests_per_s:5.2f} req/s ttft p50 {_ms(f.ttft_s, 'p50')} ms "
        f"e2e p50 {_s(f.e2e_s, 'p50')} s errors {f.error_rate:.1%} ({f.requests} requests)"
    )


def table(figures: list[Figures], first: str) -> str:
    rows = [
        f"| {first} | tokens/s | requests/s | TTFT p50 / p90 / p99 (ms) | ITL p50 / p90 / p99 "
        "(ms) | end to end p50 / p90 / p99 (s) | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        label = {"system": f.system, "route": f.route, "concurrency": str(f.concurrency)}[
            first.split()[0]
        ]
        ttft = (
            "n/a" if not f.ttft_s else " / ".join(_ms(f.ttft_s, q) for q in ("p50", "p90", "p99"))
        )
        itl = "n/a" if not f.itl_s else " / ".join(_ms(f.itl_s, q) for q in ("p50", "p90", "p99"))
        e2e = " / ".join(_s(f.e2e_s, q) for q in ("p50", "p90", "p99"))
        rows.append(
            f"| {label} | {f.tokens_per_s:.1f} | {f.requests_per_s:.2f} | {ttft} | {itl} | {e2e} "
            f"| {f.error_rate:.1%} |"
        )
    return "\n".join(rows)


def plots(results: dict[str, list[Figures]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fig, (tok, ttft) = plt.subplots(1, 2, figsize=(11, 4))
    for name, key in (
        ("genq (OpenAI stream)", "sweep"),
        ("engine alone", "engine"),
        ("plain FastAPI", "plain"),
    ):
        series = results[key]
        xs = [f.concurrency for f in series]
        tok.plot(xs, [f.tokens_per_s for f in series], marker="o", label=name)
        if all(f.ttft_s for f in series):
            ttft.plot(xs, [f.ttft_s["p50"] for f in series if f.ttft_s], marker="o", label=name)
    for ax, title in ((tok, "generated tokens/s"), (ttft, "time to first token p50 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    ttft.set_yscale("log")
    fig.tight_layout()
    made.append(out / f"report-concurrency-{DEVICE}.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)

    fig, (routes, batch) = plt.subplots(1, 2, figsize=(11, 4))
    routes.bar([f.route for f in results["routes"]], [f.tokens_per_s for f in results["routes"]])
    routes.set_title("tokens/s by route, 16 clients")
    batch.plot(
        [f.concurrency for f in results["batch"]],
        [f.tokens_per_s for f in results["batch"]],
        marker="o",
    )
    batch.set_xscale("log", base=2)
    batch.set_xlabel("GENQ_MAX_BATCH_SIZE")
    batch.set_title("tokens/s by batch size, 16 clients")
    for ax in (routes, batch):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    made.append(out / f"report-routes-batch-{DEVICE}.png")
    fig.savefig(made[-1], dpi=110)
    plt.close(fig)
    return made


def machine() -> str:
    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU only ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    )
    return (
        f"{device}; Python {platform.python_version()}, PyTorch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )


@dataclass
class Target:
    """A goal of docs/benchmarks.md, and where this run stands against it."""

    name: str
    value: float  # a throughput ratio, or a TTFT gap in seconds
    goal: float
    at_most: bool = False  # the value must not exceed the goal (else: reach it)

    @property
    def met(self) -> bool:
        return self.value <= self.goal if self.at_most else self.value >= self.goal

    def line(self) -> str:
        verdict = "met" if self.met else "missed"
        if self.at_most:
            return f"- {self.name}: {self.value * 1000:+.0f} ms ({verdict})"
        return f"- {self.name}: {self.value:.2f} ({verdict})"


def targets(results: dict[str, list[Figures]]) -> list[Target]:
    by = {k: {f.concurrency: f for f in v} for k, v in results.items() if k != "routes"}
    stack16, engine16, plain16 = by["sweep"][16], by["engine"][16], by["plain"][16]
    stack1, engine1, plain1 = by["sweep"][1], by["engine"][1], by["plain"][1]
    ttft_gap = (stack1.ttft_s or {"p50": 0})["p50"] - (engine1.ttft_s or {"p50": 0})["p50"]
    return [
        Target(
            "16 streaming clients: stack >= 0.9 x engine alone",
            stack16.tokens_per_s / engine16.tokens_per_s,
            0.9,
        ),
        Target(
            "16 clients: stack >= 5 x plain FastAPI",
            stack16.tokens_per_s / plain16.tokens_per_s,
            5.0,
        ),
        Target(
            "1 client: stack >= 0.95 x plain FastAPI",
            stack1.tokens_per_s / plain1.tokens_per_s,
            0.95,
        ),
        Target(
            "1 client: TTFT p50 within 25 ms of the engine's own",
            ttft_gap,
            0.025,
            at_most=True,
        ),
    ]


def markdown(
    results: dict[str, list[Figures]], images: list[Path], duration: float, model: str | None
) -> str:
    card = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "CPU"
    return "\n\n".join(
        [
            BEGIN,
            f"## Serving under load, {card} (`python -m bench.report`)",
            f"Machine: {machine()}. Model: {model or 'the default model'}, {NEW_TOKENS} new "
            "tokens a request (`ignore_eos`), chat prompts never seen before, sampled with "
            f"distinct seeds; closed loops of {duration:.0f} s each after a warm-up; at each "
            "concurrency genq, the engine alone and the plain app were measured back to back. "
            "The engine alone reports a request's first output and its end, so its ITL is each "
            "request's mean gap.",
            "### Concurrency: genq (OpenAI chat streaming), the engine alone, a plain FastAPI app",
            table(results["sweep"], "concurrency (genq)"),
            table(results["engine"], "concurrency (engine alone)"),
            table(results["plain"], "concurrency (plain FastAPI)"),
            "### Routes at 16 clients",
            table(results["routes"], "route"),
            "### GENQ_MAX_BATCH_SIZE at 16 streaming clients",
            table(results["batch"], "concurrency = batch size"),
            "### Targets",
            "\n".join(t.line() for t in targets(results)),
            "\n".join(f"![{p.stem}]({p.name})" for p in images),
            END,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="checkpoint directory (default: the default model)")
    parser.add_argument("--duration", type=float, default=60, help="seconds measured per point")
    parser.add_argument("--warmup", type=float, default=10, help="seconds before each window")
    parser.add_argument("--concurrency", default="1,4,16,32,64")
    parser.add_argument("--batch-sizes", default="1,4,8,16,32")
    parser.add_argument("--write-docs", action="store_true", help="write the tables and plots")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the Markdown file to write")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--work", type=Path, default=Path("var/bench-report"))
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if not {1, 16} <= set(levels):
        parser.error("--concurrency must include 1 and 16: the routes and the targets use them")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    work = args.work / time.strftime("%Y%m%d-%H%M%S")
    prompts = Prompts()
    results: dict[str, list[Figures]] = {
        k: [] for k in ("sweep", "routes", "batch", "engine", "plain")
    }

    # This machine's speed drifts by up to 2x within hours: the three systems are measured back
    # to back at each concurrency, so the ratios the targets take compare like with like.
    stack = Stack(work, args.model)
    plain_server: PlainServer | None = None
    try:
        plain_server = PlainServer(args.model, work)
        lm = load_model(Settings(model=args.model))
        stack.serve()
        for c in levels:
            results["sweep"].append(
                measure("genq", stack.base, "openai stream", openai_stream, c, prompts, args)
            )
            results["engine"].append(engine_alone(lm, c, prompts, args))
            results["plain"].append(
                measure("plain FastAPI", plain_server.base, "generate", plain, c, prompts, args)
            )
        for name, route in ROUTES.items():
            if name != "openai stream":
                results["routes"].append(
                    measure("genq", stack.base, name, route, 16, prompts, args)
                )
        results["routes"].insert(0, next(f for f in results["sweep"] if f.concurrency == 16))
        for size in batch_sizes:
            stack.serve(GENQ_MAX_BATCH_SIZE=str(size))
            figures = measure("genq", stack.base, "openai stream", openai_stream, 16, prompts, args)
            figures.concurrency = size
            results["batch"].append(figures)
    finally:
        stack.close()
        if plain_server is not None:
            plain_server.close()

    if args.write_docs:
        images = plots(results, args.docs.parent)
        text = args.docs.read_text() if args.docs.exists() else ""
        section = markdown(results, images, args.duration, args.model)
        if BEGIN in text:
            text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        args.docs.write_text(text)
    if args.json:
        out: dict[str, Any] = {k: [asdict(f) for f in v] for k, v in results.items()}
        out["targets"] = [{**asdict(t), "met": t.met} for t in targets(results)]
        print(orjson.dumps(out).decode())
    else:
        print("\n".join(t.line() for t in targets(results)))


if __name__ == "__main__":
    main()

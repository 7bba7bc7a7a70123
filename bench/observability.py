"""What metrics and tracing cost the worker, measured on the engine benchmark's workload.

    python -m bench.observability [--json] [--model PATH_OR_HUB_ID] [--rounds N]

- engine_tok_s: `bench.engine`'s closed loop with 16 requests in flight (steady state), run with
  the engine's metrics as shipped (`worker.metrics.observe_step` for every step's stats) and
  with that call replaced by a no-op, alternated over `--rounds` rounds so that the machine's
  drift falls on both alike; the overhead is the relative difference of the means;
- observe_step_us: the cost of one `observe_step` call alone, against the mean step time of
  the loop;
- tracing_us_per_job: the worker's spans of one job (`worker.spans`: queue wait, job, model
  load, prefill, decode, end) with tracing on (an SDK provider and a batch processor whose
  exporter drops everything) and off, against the mean time of a job in the loop. Tracing adds
  nothing per engine step: the engine itself has no spans.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from unittest import mock

import orjson
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from bench.engine_workload import engine_closed_loop, workload
from common import tracing
from common.contract import WorkItem, WorkRequest
from common.jobs import Job, JobResult, JobStatus, Usage
from common.settings import Settings
from worker import metrics, spans
from worker.engine import Generation, StepStats
from worker.loading import load_model

CONCURRENCY = 16


class _Drop(SpanExporter):
    def export(self, spans: object) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _skip(step: StepStats) -> None:
    """`observe_step` turned off."""


def observe_step_us(n: int = 20_000) -> float:
    stats = StepStats(
        model="bench@1",
        seconds=0.05,
        rows=16,
        tokens=16,
        running=16,
        waiting=0,
        waiting_for_memory=0,
        kv_tokens=2000,
        kv_budget=65536,
        prefix_queries=0,
        prefix_hits=0,
        prefix_cache_bytes=0,
    )
    started = time.perf_counter()
    for _ in range(n):
        metrics.observe_step(stats)
    return (time.perf_counter() - started) / n * 1e6


def job_spans_us(n: int) -> float:
    now = time.time()
    job = Job(id="j", status=JobStatus.running, model="m@1", created_at=now - 0.5)
    item = WorkItem(
        job_id="j",
        request=WorkRequest(prompt="hi"),
        seed=1,
        max_new_tokens=64,
        model="m@1",
        trace_context={"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01"},
    )
    outcome = Generation(
        text="x",
        finish_reason="length",
        prompt_tokens=60,
        cached_prompt_tokens=0,
        token_ids=[1] * 64,
        time_to_first_token_s=0.05,
        generation_s=0.4,
        prefill_s=0.05,
        decode_s=0.35,
    )
    final = job.model_copy(
        update={
            "status": JobStatus.succeeded,
            "finished_at": now,
            "result": JobResult(
                text="x",
                finish_reason="length",
                usage=Usage(prompt_tokens=60, completion_tokens=64),
            ),
        }
    )
    started = time.perf_counter()
    for _ in range(n):
        with spans.job_span(job, item, 1, "default"):
            spans.model_loaded("m@1", 0.0)
            spans.generated(job, outcome)
            spans.ended(final)
    return (time.perf_counter() - started) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--model", default=None, help="checkpoint; default: the default model")
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds of the engine loop")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    say = (lambda *_: None) if args.json else print

    lm = load_model(Settings(model=args.model))
    items = workload(lm, 256)
    say(f"model {lm.name} on {lm.device}; {CONCURRENCY} in flight, {args.rounds} rounds")
    on: list[float] = []
    off: list[float] = []
    for round_ in range(args.rounds):
        # Alternate which goes first, so that a trend over the run weighs on both.
        for metrics_on in (True, False) if round_ % 2 == 0 else (False, True):
            if metrics_on:
                rate = engine_closed_loop(lm, items, CONCURRENCY, total=96).steady_tok_s
            else:
                with mock.patch.object(metrics, "observe_step", _skip):
                    rate = engine_closed_loop(lm, items, CONCURRENCY, total=96).steady_tok_s
            (on if metrics_on else off).append(rate)
            say(f"round {round_ + 1}: metrics {'on ' if metrics_on else 'off'} {rate:8.1f} tok/s")
    mean_on, mean_off = statistics.mean(on), statistics.mean(off)
    overhead = (mean_off - mean_on) / mean_off
    step_s = CONCURRENCY / mean_on  # one token per row per step in steady state
    step_us = observe_step_us()
    tokens = statistics.mean(i.max_new_tokens for i in items)
    job_s = tokens / (mean_on / CONCURRENCY)
    off_us = job_spans_us(20_000)
    tracing.configure("bench", _Drop())
    try:
        on_us = job_spans_us(5_000)
    finally:
        tracing.disable()
    say(f"engine, metrics on   {mean_on:8.1f} tok/s (mean of {len(on)})")
    say(f"engine, metrics off  {mean_off:8.1f} tok/s (mean of {len(off)})")
    say(f"metrics overhead     {overhead * 100:8.2f} % of throughput")
    step_share = step_us / (step_s * 1e6) * 100
    say(f"observe_step         {step_us:8.2f} us per step ({step_share:.3f} % of a step)")
    say(f"mean step            {step_s * 1000:8.1f} ms")
    job_share = on_us / (job_s * 1e6) * 100
    say(
        f"tracing per job      {on_us:8.1f} us on, {off_us:.2f} us off ({job_share:.3f} % of a job)"
    )
    say(f"mean job             {job_s:8.2f} s")
    if args.json:
        print(
            orjson.dumps(
                {
                    "engine_tok_s_metrics_on": on,
                    "engine_tok_s_metrics_off": off,
                    "metrics_overhead": overhead,
                    "observe_step_us": step_us,
                    "step_s": step_s,
                    "tracing_us_per_job_on": on_us,
                    "tracing_us_per_job_off": off_us,
                    "job_s": job_s,
                }
            ).decode()
        )


if __name__ == "__main__":
    main()

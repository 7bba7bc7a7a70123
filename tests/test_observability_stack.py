"""genq's observability on the real stack (a Redis, a gateway and a worker serving the tiny model):
every metric docs/observability.md lists exists with its labels and moves when its event
happens (scrape, act, scrape); one job's log lines from the gateway and the worker share its
request id and trace id; its spans reach an OTLP receiver as one trace; and several gateway
processes report merged metrics."""

from __future__ import annotations

import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from httpx_sse import connect_sse

from genq.redis_server import RedisServer, free_port
from tests import keys
from tests.otlp_sink import Sink, otlp_sink
from tests.procs import Proc, genq_env, start_gateway, start_worker
from tests.scrape import Scrape, documented_metrics, scrape

# The stack serves API keys; its clients use the operator's (every scope, no rate limits).
OPERATOR = keys.bearer(keys.OPERATOR)
MODEL = {"pool": "default", "model": "tiny@1"}
NEVER = "\x00never"  # a stop string no generation contains: the jobs run to max_new_tokens
# Seconds on the tiny model; two of them do not fit GENQ_MAX_BATCH_TOKENS together.
LONG = {"model": "tiny", "max_new_tokens": 900, "temperature": 0, "stop": [NEVER]}
# Longer than the prefix cache's shortest match (16 tokens).
PROMPT = "The quick brown fox jumps over the lazy dog, twice over, and then rests."
# The metrics each test shows move (or set), and checks against the docs' labels; with ELSEWHERE,
# every documented metric. Each test checks it showed exactly its own (`showing`), so that the
# tests may run alone or in any order.
SHOWN = {
    "test_startup_and_memory_metrics": {
        "genq_worker_model_loads_total",
        "genq_model_load_time_seconds",
        "genq_worker_model_bytes",
        "genq_worker_rss_bytes",
        "genq_worker_memory_usage_bytes",
        "genq_worker_memory_limit_bytes",
        "genq_worker_memory_limit_exceeded",  # crossing it: tests/test_worker_metrics.py
    },
    "test_a_finished_job_moves_the_request_and_engine_metrics": {
        "genq_http_requests_total",
        "genq_http_request_duration_seconds",
        "genq_jobs_submitted_total",
        "genq_redis_command_duration_seconds",
        "genq_cache_hits_total",
        "genq_time_to_first_token_seconds",
        "genq_inter_token_latency_seconds",
        "genq_e2e_request_latency_seconds",
        "genq_request_queue_time_seconds",
        "genq_request_prefill_time_seconds",
        "genq_request_decode_time_seconds",
        "genq_prompt_tokens_total",
        "genq_generation_tokens_total",
        "genq_requests_finished_total",
        "genq_engine_step_tokens",
        "genq_engine_batch_size",
        "genq_engine_step_duration_seconds",
        "genq_prefix_cache_queries_total",
        "genq_prefix_cache_hits_total",
        "genq_worker_prefix_cache_bytes",
    },
    "test_running_and_waiting_work_shows_in_gauges_while_it_lasts": {
        "genq_requests_finished_total",
        "genq_sse_streams_open",
        "genq_queue_running_jobs",
        "genq_requests_running",
        "genq_requests_waiting",
        "genq_engine_rows_waiting_for_memory",
        "genq_kv_cache_usage_ratio",
        "genq_worker_running_jobs",
    },
    "test_queued_jobs_and_refusals_move_the_queue_and_rejection_metrics": {
        "genq_queue_depth",
        "genq_queue_ready_jobs",
        "genq_queue_oldest_age_seconds",
        "genq_workers_alive",
        "genq_requests_rejected_total",
        "genq_requests_failed_total",
    },
    "test_redis_outage_moves_redis_up_and_the_breaker": {
        "genq_redis_up",
        "genq_redis_breaker_state",
    },
}
# Metrics whose events the stack cannot show here, and where they are shown instead.
ELSEWHERE = {
    "genq_jobs_reaped_total": "tests/test_reaper.py (a worker that vanished)",
    "genq_rate_limiter_bypassed_total": "tests/test_ratelimit.py (a limiter that fails open)",
    "genq_redis_probe_failures_total": "tests/test_redis_outage.py (a Redis stalled by SIGSTOP)",
    "genq_worker_cuda_allocated_bytes": "CUDA workers only: absent here",
    "genq_worker_cuda_reserved_bytes": "CUDA workers only: absent here",
}


@dataclass
class Observed:
    base: str
    worker_metrics: str
    gateway: Proc
    worker: Proc
    redis: RedisServer
    sink: Sink
    checked: set[str] = field(default_factory=set)

    def gateway_metrics(self) -> Scrape:
        return scrape(f"{self.base}/metrics")

    def worker_scrape(self) -> Scrape:
        return scrape(self.worker_metrics)


def eventually(check: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def observed(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, log_dir: Path
) -> Iterator[Observed]:
    data = tmp_path_factory.mktemp("observed")
    registry = data / "models.yaml"
    registry.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {"name": "tiny", "source": str(tiny_model_dir), "preload": True},
                    # A pool without workers: its jobs stay queued.
                    {"name": "parked", "source": str(tiny_model_dir), "pool": "parked"},
                ]
            }
        )
    )
    server = RedisServer(data / "redis", free_port(), persist=False)
    server.start()
    metrics_port = free_port()
    procs: list[Proc] = []
    with otlp_sink() as (sink, endpoint):
        env = genq_env(
            server.url,
            GENQ_MODELS_FILE=str(registry),
            GENQ_LOG_FORMAT="json",
            GENQ_WORKER_METRICS_PORT=str(metrics_port),
            GENQ_API_KEYS=keys.keys_json(),
            GENQ_MAX_QUEUE_DEPTH="8",
            GENQ_MAX_BATCH_TOKENS="1200",
            GENQ_MEMORY_LIMIT_MB="100000",
            GENQ_REDIS_BREAKER_RESET_S="1",
            OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
            OTEL_BSP_SCHEDULE_DELAY="100",
        )
        try:
            gateway, base = start_gateway(env, log_dir)
            procs.append(gateway)
            worker = start_worker(env, log_dir, base, "tiny")
            procs.append(worker)
            yield Observed(
                base, f"http://127.0.0.1:{metrics_port}/metrics", gateway, worker, server, sink
            )
        finally:
            for proc in reversed(procs):
                proc.stop()
            server.stop()


@pytest.fixture
def showing(request: pytest.FixtureRequest, observed: Observed) -> Iterator[Observed]:
    """The stack, for a test of SHOWN: afterwards, it must have shown exactly its metrics, each
    in the processes the docs name and with the docs' labels."""
    observed.checked = set()
    yield observed
    name = request.node.name
    assert observed.checked == SHOWN[name], name
    documented = documented_metrics()
    scrapes = {"gateway": observed.gateway_metrics(), "worker": observed.worker_scrape()}
    for metric in SHOWN[name]:
        for process in documented[metric].processes:
            got = scrapes[process]
            base = re.sub(r"_total$", "", metric)
            assert base in got.families, (metric, process)
            for sample_name, labels in got.samples:
                if re.sub(r"_(total|bucket|sum|count|created)$", "", sample_name) == base:
                    assert {k for k, _ in labels} - {"le"} == documented[metric].labels, (
                        sample_name,
                        labels,
                    )


def rose(observed: Observed, before: Scrape, after: Scrape, name: str, **labels: str) -> None:
    assert after.value(name, **labels) > before.value(name, **labels), (name, labels)
    observed.checked.add(re.sub(r"_(bucket|sum|count)$", "", name))


def test_startup_and_memory_metrics(showing: Observed) -> None:
    observed = showing
    w = observed.worker_scrape()
    assert w.value("genq_worker_model_loads_total", **MODEL, outcome="loaded") == 1
    assert w.value("genq_model_load_time_seconds_count", **MODEL) == 1
    assert w.value("genq_worker_model_bytes", **MODEL) > 0
    for name in ("genq_worker_rss_bytes", "genq_worker_memory_usage_bytes"):
        assert w.value(name, pool="default") > 0, name
    assert w.value("genq_worker_memory_limit_bytes", pool="default") == 100_000 * 2**20
    assert w.has("genq_worker_memory_limit_exceeded", pool="default")
    assert w.value("genq_worker_memory_limit_exceeded", pool="default") == 0
    for name in ("genq_worker_cuda_allocated_bytes", "genq_worker_cuda_reserved_bytes"):
        assert name in w.families  # documented, and without a sample on the CPU
        assert not w.has(name)
    observed.checked |= {
        "genq_worker_model_loads_total",
        "genq_model_load_time_seconds",
        "genq_worker_model_bytes",
        "genq_worker_rss_bytes",
        "genq_worker_memory_usage_bytes",
        "genq_worker_memory_limit_bytes",
        "genq_worker_memory_limit_exceeded",  # crossing it: tests/test_worker_metrics.py
    }


def test_a_finished_job_moves_the_request_and_engine_metrics(showing: Observed) -> None:
    observed = showing
    body = {"model": "tiny", "prompt": PROMPT, "max_new_tokens": 8, "temperature": 0}
    g0, w0 = observed.gateway_metrics(), observed.worker_scrape()
    with httpx.Client(base_url=observed.base, timeout=60, headers=OPERATOR) as client:
        assert client.post("/v1/generate", json=body).status_code == 200
        g1, w1 = observed.gateway_metrics(), observed.worker_scrape()
        # Its twin is answered by it; a sampled request with the same prompt runs, on the
        # prompt's cached keys and values.
        assert client.post("/v1/generate", json=body).json()["cached"] is True
        sampled = {**body, "temperature": 1.0}
        assert client.post("/v1/generate", json=sampled).status_code == 200
    g2, w2 = observed.gateway_metrics(), observed.worker_scrape()

    route = {"method": "POST", "route": "/v1/generate"}
    rose(observed, g0, g1, "genq_http_requests_total", **route, status="200")
    rose(observed, g0, g1, "genq_http_request_duration_seconds_count", **route)
    rose(observed, g0, g1, "genq_jobs_submitted_total", **MODEL)
    rose(observed, g0, g1, "genq_redis_command_duration_seconds_count", command="MULTI")
    rose(observed, g1, g2, "genq_cache_hits_total")
    for name in (
        "genq_time_to_first_token_seconds_count",
        "genq_inter_token_latency_seconds_count",
        "genq_e2e_request_latency_seconds_count",
        "genq_request_queue_time_seconds_count",
        "genq_request_prefill_time_seconds_count",
        "genq_request_decode_time_seconds_count",
        "genq_prompt_tokens_total",
        "genq_generation_tokens_total",
        "genq_requests_finished_total",
        "genq_engine_step_tokens_count",
        "genq_engine_batch_size_count",
        "genq_engine_step_duration_seconds_count",
        "genq_prefix_cache_queries_total",
    ):
        rose(observed, w0, w1, name, **MODEL)
    rose(observed, w1, w2, "genq_prefix_cache_hits_total", **MODEL)
    assert w1.value("genq_generation_tokens_total", **MODEL) - w0.value(
        "genq_generation_tokens_total", **MODEL
    ) == pytest.approx(8)
    assert w1.value("genq_worker_prefix_cache_bytes", **MODEL) > 0
    observed.checked.add("genq_worker_prefix_cache_bytes")


def test_running_and_waiting_work_shows_in_gauges_while_it_lasts(showing: Observed) -> None:
    observed = showing
    with httpx.Client(base_url=observed.base, timeout=60, headers=OPERATOR) as client:
        first = client.post("/v1/jobs", json={**LONG, "prompt": "Once"}).json()["id"]
        second = client.post("/v1/jobs", json={**LONG, "prompt": "Hello"}).json()["id"]
        streamed: list[str] = []

        def follow() -> None:
            with connect_sse(client, "GET", f"/v1/jobs/{first}/events") as source:
                streamed.extend(e.event for e in source.iter_sse())

        reader = threading.Thread(target=follow)
        reader.start()
        w0 = observed.worker_scrape()

        def gateway_sees_it() -> bool:
            g = observed.gateway_metrics()
            return (
                g.value("genq_sse_streams_open") >= 1
                and g.value("genq_queue_running_jobs", pool="default") >= 1
            )

        def worker_sees_it() -> bool:
            w = observed.worker_scrape()
            return (
                w.value("genq_requests_running", **MODEL) >= 1
                and w.value("genq_requests_waiting", **MODEL) >= 1
                and w.value("genq_engine_rows_waiting_for_memory", **MODEL) >= 1
                and w.value("genq_kv_cache_usage_ratio", **MODEL) > 0.5
                and w.value("genq_worker_running_jobs", pool="default") >= 2
            )

        eventually(gateway_sees_it)
        eventually(worker_sees_it)
        for job_id in (first, second):
            assert client.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
        reader.join(timeout=30)
        assert streamed[-1] == "done"
    eventually(lambda: observed.gateway_metrics().value("genq_sse_streams_open") == 0)
    eventually(lambda: observed.worker_scrape().value("genq_requests_running", **MODEL) == 0)
    w1 = observed.worker_scrape()
    rose(observed, w0, w1, "genq_requests_finished_total", **MODEL, finish_reason="cancelled")
    observed.checked |= {
        "genq_sse_streams_open",
        "genq_queue_running_jobs",
        "genq_requests_running",
        "genq_requests_waiting",
        "genq_engine_rows_waiting_for_memory",
        "genq_kv_cache_usage_ratio",
        "genq_worker_running_jobs",
    }


def test_queued_jobs_and_refusals_move_the_queue_and_rejection_metrics(
    showing: Observed,
) -> None:
    observed = showing
    parked = {"pool": "parked"}
    g0 = observed.gateway_metrics()
    assert g0.value("genq_workers_alive", pool="default") == 1
    with httpx.Client(base_url=observed.base, timeout=60, headers=OPERATOR) as client:
        job = client.post("/v1/jobs", json={"model": "parked", "prompt": "x"}).json()["id"]
        time.sleep(0.05)
        g1 = observed.gateway_metrics()
        full = client.post(
            "/v1/jobs/batch", json={"requests": [{"model": "parked", "prompt": "x"}] * 8}
        )
        assert full.status_code == 429
        assert client.post("/v1/jobs", json={"prompt": "x", "colour": "red"}).status_code == 422
        big = client.post(
            "/v1/jobs", content=b"x" * 1_100_000, headers={"content-type": "application/json"}
        )
        assert big.status_code == 413
        # The operator's key holds the admin scope: its alias switch is served, and refused
        # to a key without that scope (403) and to a key the stack does not know (401).
        alias = {"target": "tiny"}
        assert client.put("/v1/admin/aliases/observed", json=alias).status_code == 204
        as_alice = keys.bearer(keys.ALICE)
        assert client.put("/v1/admin/aliases/x", json=alias, headers=as_alice).status_code == 403
        unknown = {"Authorization": "Bearer no"}
        assert client.put("/v1/admin/aliases/x", json=alias, headers=unknown).status_code == 401
        too_long = {"model": "tiny", "prompt": PROMPT * 4, "max_new_tokens": 1000}
        failed = client.post("/v1/generate", json=too_long).json()
        assert failed["error"]["code"] == "context_length_exceeded"
        assert client.delete(f"/v1/jobs/{job}").json()["status"] == "cancelled"
    g2, w2 = observed.gateway_metrics(), observed.worker_scrape()

    for name in ("genq_queue_depth", "genq_queue_ready_jobs", "genq_queue_oldest_age_seconds"):
        rose(observed, g0, g1, name, **parked)
    assert g2.value("genq_queue_depth", **parked) == 0  # and back, once cancelled
    assert g1.value("genq_workers_alive", **parked) == 0
    observed.checked.add("genq_workers_alive")
    # Rate-limit refusals: tests/test_security.py and tests/test_ratelimit.py.
    for reason in ("queue_full", "validation", "body_too_large", "forbidden", "unauthorized"):
        rose(observed, g0, g2, "genq_requests_rejected_total", reason=reason)
    assert w2.value("genq_requests_failed_total", **MODEL, code="context_length_exceeded") >= 1
    observed.checked.add("genq_requests_failed_total")


def test_redis_outage_moves_redis_up_and_the_breaker(showing: Observed) -> None:
    observed = showing
    assert observed.gateway_metrics().value("genq_redis_up") == 1
    observed.redis.pause()
    try:
        # Scrapes fail to read the queue, until the breaker opens and they fail at once.
        eventually(lambda: observed.gateway_metrics().value("genq_redis_up") == 0)
        eventually(
            lambda: observed.gateway_metrics().value("genq_redis_breaker_state", state="open") == 1
        )
    finally:
        observed.redis.resume()
    eventually(lambda: observed.gateway_metrics().value("genq_redis_up") == 1)
    eventually(
        lambda: observed.gateway_metrics().value("genq_redis_breaker_state", state="closed") == 1
    )
    observed.checked |= {"genq_redis_up", "genq_redis_breaker_state"}


def test_every_documented_metric_is_shown_by_a_test() -> None:
    shown = set().union(*SHOWN.values())
    assert shown.isdisjoint(ELSEWHERE)
    assert shown | set(ELSEWHERE) == set(documented_metrics())


def log_lines(proc: Proc) -> list[dict[str, Any]]:
    lines = []
    for raw in proc.log.read_text().splitlines():
        if raw.startswith("{"):
            lines.append(orjson.loads(raw))
    return lines


def test_one_job_s_log_lines_and_spans_share_its_request_and_trace_ids(
    observed: Observed,
) -> None:
    request_id = f"obs-{uuid.uuid4().hex[:8]}"
    trace_id = uuid.uuid4().hex
    secret = f"Observability secret {uuid.uuid4().hex}"
    headers = {"X-Request-ID": request_id, "traceparent": f"00-{trace_id}-{'1' * 16}-01"}
    body = {"model": "tiny", "prompt": secret, "max_new_tokens": 6, "temperature": 0}
    with httpx.Client(base_url=observed.base, timeout=60, headers=OPERATOR) as client:
        resp = client.post("/v1/generate", json=body, headers=headers)
    assert resp.status_code == 200
    assert resp.headers["x-request-id"] == request_id
    job = resp.json()
    timings = job["timings"]
    assert timings["prefill_s"] + timings["decode_s"] == pytest.approx(timings["generation_s"])
    for part in ("queue;dur=", "prefill;dur=", "decode;dur=", "total;dur="):
        assert part in resp.headers["server-timing"]

    def traced() -> bool:
        spans = observed.sink.of_trace(trace_id)
        names = {s.name for s in spans}
        return {"POST /v1/generate", "genq.enqueue", "genq.job", "genq.decode"} <= names

    eventually(traced)
    spans = {s.name: s for s in observed.sink.of_trace(trace_id)}
    assert spans["POST /v1/generate"].service == "genq-gateway"
    assert spans["genq.job"].service == "genq-worker"
    assert spans["genq.job"].parent_span_id == spans["genq.enqueue"].span_id
    assert spans["genq.decode"].parent_span_id == spans["genq.job"].span_id

    def lines_of_job() -> dict[str, list[dict[str, Any]]]:
        return {
            side: [line for line in log_lines(proc) if line.get("job_id") == job["id"]]
            for side, proc in (("gateway", observed.gateway), ("worker", observed.worker))
        }

    # The worker's last line (arq's) follows the result by a moment.
    eventually(lambda: len(lines_of_job()["worker"]) >= 2)
    found = lines_of_job()
    assert found["gateway"]  # the access line
    for side, lines in found.items():
        for line in lines:
            assert line["request_id"] == request_id, (side, line)
            assert line["trace_id"] == trace_id, (side, line)
    logs = observed.gateway.log.read_text() + observed.worker.log.read_text()
    assert secret not in logs  # prompts are never logged by default


def test_several_gateway_processes_serve_one_port_and_merge_their_metrics(
    redis_server: RedisServer, log_dir: Path
) -> None:
    env = genq_env(redis_server.url, GENQ_GATEWAY_PROCESSES="2")
    gateway, base = start_gateway(env, log_dir)
    try:
        (directory,) = re.findall(r"metrics in ([^)\s]+)", gateway.log.read_text())
        before = scrape(f"{base}/metrics").value("genq_http_requests_total", route="/v1/queue")
        for _ in range(20):  # new connections: the processes share them out
            assert httpx.get(f"{base}/v1/queue", timeout=10).status_code == 200
        counts = {
            scrape(f"{base}/metrics").value("genq_http_requests_total", route="/v1/queue")
            for _ in range(10)
        }
        assert counts == {before + 20}  # whichever process answers the scrape
        pids = {re.sub(r"\D", "", p.stem.rsplit("_", 1)[-1]) for p in Path(directory).glob("*.db")}
        assert len(pids) == 2
    finally:
        assert gateway.stop(signal.SIGTERM) == 0
    assert not Path(directory).exists()

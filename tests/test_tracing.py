"""A request's trace through the queue, in one process with an in-memory exporter: the gateway's
server and enqueue spans, the worker's spans of the job, and its webhook delivery share one
trace, each worker span linked to the gateway's by its parent."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from arq.jobs import deserialize_job
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from redis.asyncio import Redis

from common import keys, tracing
from common.catalog import CatalogSource
from common.contract import deserialize_payload
from common.jobstore import JobStore
from common.redisconn import create_redis
from common.settings import Settings
from gateway.app import create_app
from genq.redis_server import RedisServer
from tests.conftest import TINY_NAME, WEBHOOK_SECRET
from tests.otlp_sink import otlp_sink
from worker.job_runner import JobRunner
from worker.webhooks import WebhookSender

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


class _Receiver(BaseHTTPRequestHandler):
    traceparents: ClassVar[list[str | None]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        _Receiver.traceparents.append(self.headers.get("traceparent"))
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def webhook_url() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.configure("genq-test", exporter)
    yield exporter
    tracing.disable()


@pytest.fixture
def settings(redis_server: RedisServer, tiny_model_dir: Path) -> Settings:
    return Settings(
        redis_url=redis_server.url,
        model=str(tiny_model_dir),
        model_name=TINY_NAME,
        device="cpu",
        webhook_secret=WEBHOOK_SECRET,
        webhook_allowed_hosts=["127.0.0.1:*"],
        webhook_allow_http=True,
        allow_anonymous=True,
    )


@pytest.fixture
async def gateway(
    settings: Settings, spans: InMemorySpanExporter
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1"
        ) as client,
    ):
        yield client


def one(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def parent_id(span: ReadableSpan) -> int:
    assert span.parent is not None, span.name
    return span.parent.span_id


async def test_a_job_s_spans_from_gateway_to_worker_and_webhook_form_one_trace(
    redis: Redis,
    gateway: httpx.AsyncClient,
    settings: Settings,
    spans: InMemorySpanExporter,
    webhook_url: str,
) -> None:
    body = {"prompt": "Hello there", "max_new_tokens": 6, "temperature": 0, "webhook": webhook_url}
    resp = await gateway.post("/v1/jobs", json=body, headers={"traceparent": TRACEPARENT})
    assert resp.status_code == 202
    job_id = resp.json()["id"]

    # The worker's side, in this process: the work item as a worker reads it from the queue.
    raw = await redis.get(keys.arq_job(job_id))
    assert raw is not None
    item = deserialize_job(raw, deserializer=deserialize_payload).args[0]
    assert item["trace_context"]["traceparent"].split("-")[1] == TRACE_ID
    assert item["request_id"] == resp.headers["x-request-id"]
    arq = create_redis(settings)
    store = JobStore(arq, ttl_s=60, events_maxlen=100)
    runner = JobRunner(
        store, settings, arq, CatalogSource(settings), lambda: None, "w", lambda: False
    )
    runner.models.preload()
    await runner.start()
    try:
        assert await runner.run(job_id, item, attempt=1) == "succeeded"
    finally:
        await runner.stop()
    sender = WebhookSender(store, settings)
    try:
        assert await sender.deliver(job_id, webhook_url, attempt=1)
    finally:
        await sender.close()
        await arq.aclose()

    finished = spans.get_finished_spans()
    assert {s.context.trace_id for s in finished} == {int(TRACE_ID, 16)}
    server = one(finished, "POST /v1/jobs")
    assert server.kind is SpanKind.SERVER
    assert server.attributes is not None
    assert server.attributes["genq.request_id"] == resp.headers["x-request-id"]
    enqueue = one(finished, "genq.enqueue")
    assert enqueue.kind is SpanKind.PRODUCER
    assert parent_id(enqueue) == server.context.span_id
    job = one(finished, "genq.job")
    assert job.kind is SpanKind.CONSUMER
    assert parent_id(job) == enqueue.context.span_id
    assert parent_id(one(finished, "genq.queue_wait")) == enqueue.context.span_id
    prefill, decode = one(finished, "genq.prefill"), one(finished, "genq.decode")
    assert parent_id(prefill) == parent_id(decode) == job.context.span_id
    assert prefill.end_time is not None
    assert decode.start_time is not None
    assert prefill.end_time <= decode.start_time
    attributes = job.attributes
    assert attributes is not None
    assert attributes["gen_ai.usage.output_tokens"] == 6
    assert isinstance(attributes["gen_ai.usage.input_tokens"], int)
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert attributes["gen_ai.response.finish_reasons"] == ("length",)
    for name in (
        "gen_ai.latency.time_in_queue",
        "gen_ai.latency.time_to_first_token",
        "gen_ai.latency.e2e",
    ):
        assert 0 <= float(attributes[name]) < 60, name  # type: ignore[arg-type]
    assert "Hello there" not in str([s.attributes for s in finished])  # no prompt in spans
    delivery = one(finished, "genq.webhook.deliver")
    assert delivery.kind is SpanKind.CLIENT
    assert parent_id(delivery) == enqueue.context.span_id
    (received,) = _Receiver.traceparents[-1:]
    assert received is not None
    assert received.split("-")[1] == TRACE_ID


def test_tracing_is_off_without_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert not tracing.configure("genq-test")
    assert not tracing.enabled()
    assert tracing.inject() == {}
    with tracing.tracer().start_as_current_span("x") as span:
        assert not span.is_recording()
    with otlp_sink() as (sink, endpoint):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        try:
            assert tracing.configure("genq-test")
            with tracing.tracer().start_as_current_span("x") as span:
                assert span.is_recording()
                traceparent = tracing.inject()["traceparent"]
        finally:
            tracing.disable()  # flushes the batch to the sink
    (exported,) = sink.spans
    assert (exported.service, exported.name) == ("genq-test", "x")
    assert traceparent.split("-")[1] == exported.trace_id

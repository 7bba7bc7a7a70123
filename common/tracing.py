"""Tracing with OpenTelemetry: a request's spans in the gateway, its trip through the queue and
the worker's spans for queue wait, model load, prefill and decode, in one trace.

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set: then
no provider exists, spans are the API's no-op ones, the gateway is not instrumented and work
items carry no trace context, so tracing costs nothing. When it is set, spans go out over
OTLP/HTTP in batches; the exporter reads the standard `OTEL_*` variables (headers, timeout,
compression), and `OTEL_SERVICE_NAME` overrides the service name (`genq-gateway`,
`genq-worker`).

The trace context crosses the queue in the work item (`WorkItem.trace_context`, W3C
`traceparent`/`tracestate` through the global propagator), so a worker's spans are children of
the gateway's enqueue span.
"""

from __future__ import annotations

import os

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import NoOpTracer, Tracer

_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")

_provider: TracerProvider | None = None
_tracer: Tracer = NoOpTracer()


def configure(service: str, exporter: SpanExporter | None = None) -> bool:
    """Turn tracing on for this process if an OTLP endpoint is set, or with `exporter` (tests:
    spans go to it as each ends). Returns whether tracing is on."""
    processor: SpanProcessor
    if exporter is not None:
        processor = SimpleSpanProcessor(exporter)
    elif _otlp_configured():
        processor = BatchSpanProcessor(OTLPSpanExporter())
    else:
        return False
    global _provider, _tracer
    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or service})
    _provider = TracerProvider(resource=resource)
    _provider.add_span_processor(processor)
    _tracer = _provider.get_tracer("genq")
    return True


def disable() -> None:
    """Back to no tracing, flushing what was recorded."""
    global _provider, _tracer
    if _provider is not None:
        _provider.shutdown()
    _provider, _tracer = None, NoOpTracer()


def _otlp_configured() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return any(os.environ.get(name) for name in _ENDPOINT_VARIABLES)


def enabled() -> bool:
    return _provider is not None


def provider() -> TracerProvider | None:
    return _provider


def tracer() -> Tracer:
    return _tracer


def inject() -> dict[str, str]:
    """The current trace context as W3C headers, to put in a work item; empty when off."""
    carrier: dict[str, str] = {}
    if _provider is not None:
        propagate.inject(carrier)
    return carrier


def extract(carrier: dict[str, str]) -> Context:
    """The context a work item's `trace_context` names (an empty one when it names none)."""
    return propagate.extract(carrier)


def trace_id(carrier: dict[str, str]) -> str | None:
    """The trace id (32 hex digits) a carrier names, if any."""
    span = trace.get_current_span(propagate.extract(carrier)).get_span_context()
    return format(span.trace_id, "032x") if span.is_valid else None

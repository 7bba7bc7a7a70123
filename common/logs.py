"""Logging set-up: JSON lines (one object per record) by default, plain text for humans.

Every record written while a request or a job is being handled carries its `request_id`,
`job_id` and `trace_id`: the gateway binds them per request, the worker per job (the work item
brings the request id and the trace context), and a filter adds them to each record. Call sites
stay plain `logger.info("...", ...)`, and the lines of libraries (arq, uvicorn) get them too.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from dataclasses import dataclass

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

from common.settings import Settings

# The fields a record may carry, and the attribute names the text format reads.
CONTEXT_FIELDS = ("request_id", "job_id", "trace_id")


@dataclass
class LogContext:
    """What the lines of one request or one job are tagged with. Mutable on purpose: a job id
    learnt deep inside a handler tags the access log line written on the way out, and tasks
    started meanwhile (they copy the context, so they share this object) see it too."""

    request_id: str | None = None
    job_id: str | None = None
    # The trace a job belongs to, for lines written outside its spans (arq's, around the job);
    # inside a span, the span's trace id is used.
    trace_id: str | None = None


_current: ContextVar[LogContext | None] = ContextVar("genq_log_context", default=None)


def bind(*, request_id: str | None = None, job_id: str | None = None) -> LogContext:
    """A fresh context for the current task and what it starts: a request or a job."""
    context = LogContext(request_id=request_id, job_id=job_id)
    _current.set(context)
    return context


def current() -> LogContext:
    """The context of the request or job being handled, bound on first use."""
    context = _current.get()
    return context if context is not None else bind()


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        context = _current.get()
        if context is not None:
            if context.request_id is not None:
                record.request_id = context.request_id
            if context.job_id is not None:
                record.job_id = context.job_id
            if context.trace_id is not None:
                record.trace_id = context.trace_id
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            record.trace_id = format(span.trace_id, "032x")
            record.span_id = format(span.span_id, "016x")
        return True


class _TextFormatter(logging.Formatter):
    """`time level logger: message [request_id=… job_id=… trace_id=…]`."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        tags = [f"{f}={getattr(record, f)}" for f in CONTEXT_FIELDS if hasattr(record, f)]
        return f"{line} [{' '.join(tags)}]" if tags else line


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_ContextFilter())
    if settings.log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)

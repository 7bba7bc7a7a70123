"""`Server-Timing` of the synchronous routes: where a finished job's time went, for clients and
browser tools (durations in milliseconds)."""

from __future__ import annotations

from common.jobs import Timings

# Header name of each part, with its description.
_PARTS = (
    ("queue", "queued_s", "in the queue"),
    ("load", "model_load_s", "model load"),
    ("prefill", "prefill_s", "prefill"),
    ("decode", "decode_s", "decode"),
    ("total", "total_s", "submission to end"),
)


def server_timing(timings: Timings) -> str:
    parts = []
    for name, field, description in _PARTS:
        seconds = getattr(timings, field)
        if seconds is not None:
            parts.append(f'{name};dur={seconds * 1000:.1f};desc="{description}"')
    return ", ".join(parts)

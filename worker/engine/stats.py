"""What an engine measures, as plain data: each step hands its `StepStats` to the engine's
`on_stats` callback (vLLM v1's `SchedulerStats`). The engine knows no metrics library;
`worker.metrics` turns these into Prometheus series."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StepStats:
    """What one engine step measured."""

    model: str  # the model it decoded with (name@version): a swap changes it
    seconds: float
    rows: int  # in the forward pass; 0 for a step that ran none
    tokens: int  # the forward pass fed
    running: int  # rows in the batch after the step
    waiting: int
    waiting_for_memory: int
    kv_tokens: int  # the batch's cache after the step, padding included
    kv_budget: int
    prefix_queries: int  # prompt tokens looked up in the prefix cache
    prefix_hits: int  # of those, tokens found there
    prefix_cache_bytes: int  # what the prefix cache's entries take after the step


StatsCallback = Callable[[StepStats], None]

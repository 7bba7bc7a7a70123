"""The eager path's admission: which waiting rows join the left-padded running batch at a step."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from worker.engine.config import EngineLimits
from worker.engine.eager.batch import Batch
from worker.engine.memory import padded_peak
from worker.engine.prefix_cache import PrefixCache, PrefixHit
from worker.engine.rows import Row


def admit(
    waiting: deque[Row],
    batch: Batch | None,
    limits: EngineLimits,
    prefix_cache: PrefixCache,
    memory_for: Callable[[int], bool],
    kv_bytes_per_token: int,
) -> tuple[list[Row], list[PrefixHit | None]]:
    """Waiting rows (taken off `waiting`) that fit the batch size, the prefill budget, the KV
    token budget and the memory limit (`memory_for(bytes)`), in arrival order (a row that does
    not fit holds back those behind it, so large requests are not starved by small ones), with
    their cached prompt prefixes.

    The KV budget and the memory limit are checked against the cache the batch will really
    hold: rows are left-padded to the widest, so that is the peak, over the steps to come, of
    (rows still running) x (cache width), as if every row ran to its `max_new_tokens`."""
    running = batch.extents() if batch else []
    in_use = len(batch) * batch.cached_tokens if batch else 0
    admitted: list[Row] = []
    hits: list[PrefixHit | None] = []
    longest = 0
    while waiting and len(running) + len(admitted) < limits.max_batch_size:
        row = waiting[0]
        longest_if = max(longest, len(row.prefill_ids))
        first = not admitted
        if not first and longest_if * (len(admitted) + 1) > limits.max_prefill_tokens:
            break
        hit = (
            prefix_cache.lookup(row.prefill_ids, row.cache_scope) if prefix_cache.enabled else None
        )
        rows, prefixes = [*admitted, row], [*hits, hit]
        peak = padded_peak([*running, *Batch.prefill_extents(rows, prefixes)])
        if peak > limits.max_batch_tokens:
            break
        # An empty engine always takes one row: waiting could never free anything.
        if (running or not first) and not memory_for((peak - in_use) * kv_bytes_per_token):
            break
        waiting.popleft()
        admitted.append(row)
        hits.append(hit)
        longest = longest_if
    return admitted, hits

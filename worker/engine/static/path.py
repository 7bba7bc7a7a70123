"""The static decode path: rows in the slots of a cache allocated once (`batch.py`, `cache.py`),
decoded by bucketed steps that are compiled and replayed as CUDA graphs where that works
(`decoder.py`).

Each slot holds a whole request (checked at intake against `token_limit`) and the cache is
allocated already, so admission only counts slots and the prefill budget. With graphs a decode
step costs a fraction of one that also prefills: while rows decode, newcomers wait a few steps
to share one prefill.
"""

from __future__ import annotations

from collections import deque

import torch

from worker.engine.config import DecodeConfig, DecodeMode, EngineLimits
from worker.engine.decode_path import Admission, DecodePath, TokenLimit
from worker.engine.memory import MemoryMonitor, kv_bytes_per_token
from worker.engine.model import LoadedModel
from worker.engine.prefix_cache import PrefixCache, PrefixHit
from worker.engine.rows import Row
from worker.engine.static.batch import StaticBatch
from worker.engine.static.cache import geometry
from worker.engine.static.decoder import StaticDecoder


class StaticPath(DecodePath[StaticBatch]):
    def __init__(
        self,
        lm: LoadedModel,
        limits: EngineLimits,
        config: DecodeConfig,
        prefix_cache: PrefixCache,
        memory: MemoryMonitor,
    ) -> None:
        """Allocates the cache (`CacheTooSmall` or `torch.OutOfMemoryError` where it does not
        fit); `prepare` compiles and captures the decode steps."""
        super().__init__(lm, limits, prefix_cache, memory)
        self.config = config
        shape = geometry(
            lm,
            limits.max_batch_size,
            limits.max_batch_tokens,
            config.gpu_memory_fraction,
            kv_bytes_per_token(lm),
        )
        self.decoder = StaticDecoder(lm, shape, config)

    def prepare(self) -> None:
        self.decoder.prepare()

    @property
    def mode(self) -> DecodeMode:
        return self.decoder.mode

    @property
    def kv_budget(self) -> int:
        return self.decoder.geometry.tokens

    @property
    def token_limit(self) -> TokenLimit:
        shape = self.decoder.geometry
        return TokenLimit(shape.columns, "the tokens one slot of the KV cache holds", shape.source)

    def admit(self, waiting: deque[Row], step: int) -> Admission:
        """Waiting rows, in arrival order, while a slot is free and their right-padded prompts
        fit the prefill budget."""
        wait = self.config.prefill_wait_steps if self.decoder.graphs else 0
        if self.batch is not None and waiting[0].queued_step + wait > step:
            return Admission([], [], held_back=True)
        limits = self.limits
        running = len(self.rows)
        admitted: list[Row] = []
        hits: list[PrefixHit | None] = []
        longest = 0
        while waiting and running + len(admitted) < limits.max_batch_size:
            row = waiting[0]
            longest_if = max(longest, len(row.prefill_ids))
            if admitted and longest_if * (len(admitted) + 1) > limits.max_prefill_tokens:
                break
            cache = self.prefix_cache
            hit = cache.lookup(row.prefill_ids, row.cache_scope) if cache.enabled else None
            waiting.popleft()
            admitted.append(row)
            hits.append(hit)
            longest = longest_if
        return Admission(admitted, hits)

    def prefill(self, rows: list[Row], hits: list[PrefixHit | None]) -> StaticBatch:
        return self.decoder.prefill(rows, hits, self.batch)

    def forward(self, running: StaticBatch | None, prefill: StaticBatch | None) -> torch.Tensor:
        return self.decoder.forward(running, prefill)

    def swap(self, lm: LoadedModel) -> None:
        super().swap(lm)
        self.decoder.swap(lm)

    def reset(self) -> None:
        super().reset()
        self.decoder.reset()

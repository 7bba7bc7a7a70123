"""The seam between the engine and its decode paths.

An engine step schedules (which waiting rows join), executes (one forward pass and one sampling
pass over every row) and updates (the rows that ended leave). What differs between the eager
path (left-padded batches over a growing cache, `eager/`) and the static one (preallocated slots,
bucketed decode steps, CUDA graphs, `static/`) sits behind `DecodePath`, which also keeps the
running batch: the engine never branches on the path. `paths.choose_path` picks one.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import Generic, Protocol, Self, TypeVar

import torch

from worker.engine.config import DecodeMode, EngineLimits
from worker.engine.memory import MemoryMonitor
from worker.engine.model import LoadedModel
from worker.engine.prefix_cache import KV, PrefixCache, PrefixHit
from worker.engine.rows import Row, Step, score

logger = logging.getLogger(__name__)


class DecodeBatch(Protocol):
    """What both kinds of batch do (TGI's lifecycle): a prefill batch takes its forward pass,
    the running batch `extend`s with its rows, `advance` picks every row's token, `filter`
    drops the rows that ended."""

    rows: list[Row]

    def __len__(self) -> int: ...

    @property
    def cached_tokens(self) -> int: ...

    def prompt_kv(self, i: int) -> KV: ...

    def extend(self, other: Self) -> Self: ...

    def advance(self, logits: torch.Tensor, eos_ids: torch.Tensor) -> Step: ...

    def filter(self, dropped: list[int]) -> Self | None: ...

    def restore_cache_length(self, length: int) -> None: ...


@dataclass(frozen=True, slots=True)
class TokenLimit:
    """The KV-cache tokens one request may reserve (prompt + max_new_tokens), for the message
    of a request refused at intake: what bounds it and the setting that sets it."""

    tokens: int
    what: str
    setting: str


@dataclass(frozen=True, slots=True)
class Admission:
    """The rows a step admits, in order, with their cached prompt prefixes. `held_back`: rows
    wait on purpose (to share a later prefill), not for want of room."""

    rows: list[Row]
    hits: list[PrefixHit | None]
    held_back: bool = False


NOTHING = Admission([], [])

B = TypeVar("B", bound=DecodeBatch)


class DecodePath(ABC, Generic[B]):
    """One engine's way of decoding, and its running batch."""

    def __init__(
        self,
        lm: LoadedModel,
        limits: EngineLimits,
        prefix_cache: PrefixCache,
        memory: MemoryMonitor,
    ) -> None:
        self.lm = lm
        self.limits = limits
        self.prefix_cache = prefix_cache
        self.memory = memory
        self.eos_ids = _eos_tensor(lm)
        self.batch: B | None = None

    @property
    @abstractmethod
    def mode(self) -> DecodeMode:
        """How it decodes now; a fallback at run time may change it. Any thread may read it."""

    @property
    @abstractmethod
    def kv_budget(self) -> int:
        """KV-cache tokens the running batch may hold."""

    @property
    @abstractmethod
    def token_limit(self) -> TokenLimit: ...

    @abstractmethod
    def admit(self, waiting: deque[Row], step: int) -> Admission:
        """Take the rows that join the running batch at engine step `step` off `waiting`."""

    @abstractmethod
    def prefill(self, rows: list[Row], hits: list[PrefixHit | None]) -> B:
        """A batch of admitted rows, ready for their prefill pass beside the running batch."""

    @abstractmethod
    def forward(self, running: B | None, prefill: B | None) -> torch.Tensor:
        """The step's pass: next-token logits of the running rows, then the prefill rows (rows
        x vocab, fp32)."""

    def swap(self, lm: LoadedModel) -> None:
        """Decode with `lm`, the same architecture, from the next step on."""
        self.lm = lm
        self.eos_ids = _eos_tensor(lm)

    def reset(self) -> None:
        """After a failed step: no running rows."""
        self.batch = None

    def drained(self) -> None:
        """The last running row left."""

    @property
    def rows(self) -> list[Row]:
        """The running rows, in slot order (any thread may read it: `batch` is read once)."""
        batch = self.batch
        return batch.rows if batch is not None else []

    @property
    def kv_tokens(self) -> int:
        """KV-cache tokens the running batch holds, padding included."""
        batch = self.batch
        return len(batch) * batch.cached_tokens if batch is not None else 0

    def execute(self, admission: Admission) -> Step:
        """One forward pass over the running rows and the admitted ones, then a token for each;
        the admitted rows join the running batch. Out of memory, the pass is undone (the running
        rows decode this step again next time) and the error goes up with the admitted rows left
        out."""
        running = self.batch
        prefill = None
        if admission.rows:
            for row in admission.rows:
                row.started = time.perf_counter()
            score(self.lm, admission.rows)
            prefill = self.prefill(admission.rows, admission.hits)
        cached = running.cached_tokens if running is not None else 0
        try:
            logits = self.forward(running, prefill)
        except torch.OutOfMemoryError:
            if running is not None:
                running.restore_cache_length(cached)
            raise
        if prefill is not None:
            self._remember_prompts(prefill)
            running = prefill if running is None else running.extend(prefill)
        assert running is not None, "a step runs rows"
        self.batch = running
        return running.advance(logits, self.eos_ids)

    def drop(self, indexes: list[int]) -> None:
        """The running rows at `indexes` leave the batch."""
        assert self.batch is not None
        self.batch = self.batch.filter(indexes)
        if self.batch is None:
            self.drained()

    def _remember_prompts(self, batch: B) -> None:
        cache = self.prefix_cache
        if not cache.enabled:
            return
        try:
            for i, row in enumerate(batch.rows):
                if not cache.covers(row.prefill_ids, row.cache_scope):
                    cache.store(row.prefill_ids, batch.prompt_kv(i), row.cache_scope)
        except torch.OutOfMemoryError:
            # The cache only saves work: it gives its memory up, the rows keep theirs.
            logger.warning("out of memory caching prompts; prefix cache cleared")
            cache.clear()
            self.memory.release()


def _eos_tensor(lm: LoadedModel) -> torch.Tensor:
    return torch.tensor(sorted(lm.eos_token_ids), dtype=torch.long, device=lm.device)

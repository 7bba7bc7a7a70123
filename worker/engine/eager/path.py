"""The eager decode path: left-padded batches over a growing cache (`batch.py`), admitted within the
KV-token budget and the memory limit (`admission.py`), every step one fused forward pass, or the
model's own forward pass where it is compiled.

A compile error at run time (inductor's at a new shape, say) turns compiling off for good (said
once in the log and in the mode) and the step runs again eagerly: rows never fail for it.
"""

from __future__ import annotations

import logging
from collections import deque

import torch

from worker.engine.config import DecodeConfig, DecodeMode, EngineLimits, describe
from worker.engine.decode_path import NOTHING, Admission, DecodePath, TokenLimit
from worker.engine.eager.admission import admit
from worker.engine.eager.batch import Batch, forward_all
from worker.engine.eager.compiling import compile_forward, uncompile
from worker.engine.generation import is_device_error
from worker.engine.memory import MemoryMonitor, kv_bytes_per_token
from worker.engine.model import LoadedModel
from worker.engine.prefix_cache import PrefixCache, PrefixHit
from worker.engine.rows import Row

logger = logging.getLogger(__name__)


class EagerPath(DecodePath[Batch]):
    def __init__(
        self,
        lm: LoadedModel,
        limits: EngineLimits,
        config: DecodeConfig,
        prefix_cache: PrefixCache,
        memory: MemoryMonitor,
        note: str | None = None,
    ) -> None:
        super().__init__(lm, limits, prefix_cache, memory)
        self.config = config
        self._kv_bytes_per_token = kv_bytes_per_token(lm)
        self._compiled = False
        self._mode = DecodeMode("eager", note=note)

    def prepare(self) -> None:
        """Compile the model's forward pass where the model asks for it, as far as that works."""
        if not self.lm.compile:
            return
        compile_note = compile_forward(self.lm.model, self.lm.device, self.config.compile_backend)
        self._compiled = compile_note is None
        if compile_note is not None:
            logger.warning("%s (model %s)", compile_note, self.lm.name)
        note = "; ".join(n for n in (self._mode.note, compile_note) if n) or None
        self._mode = DecodeMode("eager", compiled=self._compiled, note=note)

    @property
    def mode(self) -> DecodeMode:
        return self._mode

    @property
    def kv_budget(self) -> int:
        return self.limits.max_batch_tokens

    @property
    def token_limit(self) -> TokenLimit:
        return TokenLimit(
            self.limits.max_batch_tokens, "the engine's token budget", "GENQ_MAX_BATCH_TOKENS"
        )

    def admit(self, waiting: deque[Row], step: int) -> Admission:
        rows, hits = admit(
            waiting,
            self.batch,
            self.limits,
            self.prefix_cache,
            self._memory_for,
            self._kv_bytes_per_token,
        )
        return Admission(rows, hits) if rows else NOTHING

    def _memory_for(self, kv_bytes: int) -> bool:
        if self.memory.can_admit(kv_bytes):
            return True
        if not len(self.prefix_cache):
            return False
        # Cached prompts yield to live rows.
        self.prefix_cache.clear()
        self.memory.release()
        return self.memory.can_admit(kv_bytes)

    def prefill(self, rows: list[Row], hits: list[PrefixHit | None]) -> Batch:
        return Batch.prefill(self.lm, rows, hits)

    def forward(self, running: Batch | None, prefill: Batch | None) -> torch.Tensor:
        batches = [b for b in (running, prefill) if b is not None]
        if not self._compiled:
            return forward_all(self.lm, batches)
        lengths = [b.cached_tokens for b in batches]
        try:
            return forward_all(self.lm, batches, compiled=True)
        except Exception as e:
            if is_device_error(e) or isinstance(e, torch.OutOfMemoryError):
                raise
            # This step and every later one run eagerly, from the caches as they were before
            # the pass.
            note = f"torch.compile failed at run time, running eagerly: {describe(e)}"
            logger.warning("%s (model %s)", note, self.lm.name, exc_info=e)
            uncompile(self.lm.model)
            self._compiled = False
            self._mode = DecodeMode("eager", note=note)
            for batch, length in zip(batches, lengths, strict=True):
                batch.restore_cache_length(length)
            return forward_all(self.lm, batches)

    def swap(self, lm: LoadedModel) -> None:
        super().swap(lm)
        if self._compiled and compile_forward(lm.model, lm.device, self.config.compile_backend):
            self._compiled = False
            self._mode = DecodeMode("eager", note="torch.compile failed for the swapped-in model")

    def drained(self) -> None:
        # Hand the cache's blocks back to the device.
        self.memory.release()

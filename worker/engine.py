"""The continuous-batching engine: one thread owns the model and, at every decode step, admits
waiting requests into the running batch and drops finished or cancelled ones.

Callers (arq job coroutines) `submit` requests and `cancel` them from any thread; the engine
reports every step's outputs, for all rows at once, through `on_step` (called on its thread).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker import metrics
from worker.batch import Batch, Row, RowOutput, advance, check_supported, forward_all, new_row
from worker.generation import (
    GenerationError,
    GenerationTimeout,
    OutOfMemory,
    PromptSource,
    build_prompt_ids,
    check_context,
)
from worker.loading import LoadedModel
from worker.memory import MemoryMonitor, kv_bytes_per_token
from worker.prefix_cache import PrefixCache
from worker.sampling import SamplingParams

logger = logging.getLogger(__name__)

StepCallback = Callable[[list[RowOutput]], None]

# How long an idle engine waits for work before it looks at its stop flag again.
_IDLE_WAIT_S = 0.5


@dataclass(frozen=True, slots=True)
class EngineLimits:
    max_batch_size: int = 32
    max_batch_tokens: int = 65_536  # KV-cache tokens reserved by all rows (prompt + max_new)
    max_prefill_tokens: int = 4_096  # padded prompt tokens prefilled in one step
    memory_limit_bytes: int = 0  # 0: off
    prefix_cache_bytes: int = 256 * 2**20  # 0: off


@dataclass(frozen=True, slots=True)
class EngineRequest:
    id: str
    request: PromptSource
    params: SamplingParams
    deadline: float  # time.monotonic() past which the request fails with `job_timeout`


@dataclass(frozen=True, slots=True)
class _Cancel:
    id: str


@dataclass(frozen=True, slots=True)
class _Swap:
    lm: LoadedModel


class Engine:
    def __init__(self, lm: LoadedModel, limits: EngineLimits, on_step: StepCallback) -> None:
        self.lm = lm
        self.limits = limits
        self.on_step = on_step
        check_supported(lm)
        self.memory = MemoryMonitor(lm.device, limits.memory_limit_bytes)
        self._kv_bytes_per_token = kv_bytes_per_token(lm)
        self.prefix_cache = PrefixCache(lm.name, limits.prefix_cache_bytes)
        self._inbox: queue.SimpleQueue[EngineRequest | _Cancel | _Swap] = queue.SimpleQueue()
        self._waiting: deque[Row] = deque()
        self._deadlines: dict[str, float] = {}
        self._batch: Batch | None = None
        self._admitted: list[Row] = []  # taken off the queue, not yet in the batch
        # Set by an out-of-memory prefill; admitting again waits until a running row finishes.
        self._admission_paused = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="genq-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def submit(self, request: EngineRequest) -> None:
        self._inbox.put(request)

    def cancel(self, request_id: str) -> None:
        """The row ends with finish_reason `cancelled` at the next step."""
        self._inbox.put(_Cancel(request_id))

    def swap_model(self, lm: LoadedModel) -> None:
        """Decode with `lm` from the next step on; rows in flight keep their KV cache, so `lm`
        must be `swappable` with the current model (a reload of the same architecture)."""
        self._inbox.put(_Swap(lm))

    @property
    def running(self) -> int:
        return len(self._batch) if self._batch else 0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception as e:
                # A bug must not leave jobs waiting forever on a dead thread: fail what the
                # engine holds and carry on with an empty batch.
                logger.exception("engine step failed; failing every row it held")
                self.on_step(self._fail_all(GenerationError(f"internal engine error: {e}")))

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: take new work, then one forward pass that decodes a token for every
        running row and prefills the admitted rows' prompts."""
        outputs = self._take_inbox(block=self._batch is None and not self._waiting)
        outputs += self._expire()
        self._admitted = self._admit()
        if self._admitted or self._batch is not None:
            outputs += self._generate()
        if outputs:
            self.on_step(outputs)
        metrics.BATCH_SIZE.labels(self.lm.name).set(self.running)
        metrics.WAITING_REQUESTS.labels(self.lm.name).set(len(self._waiting))
        self.memory.sample()

    def _take_inbox(self, *, block: bool) -> list[RowOutput]:
        outputs: list[RowOutput] = []
        try:
            item = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return outputs
        while True:
            if isinstance(item, _Cancel):
                outputs += self._cancel(item.id)
            elif isinstance(item, _Swap):
                logger.info("now decoding with %s (%s)", item.lm.name, item.lm.source)
                metrics.BATCH_SIZE.labels(self.lm.name).set(0)
                metrics.WAITING_REQUESTS.labels(self.lm.name).set(0)
                self.lm = item.lm
                self.prefix_cache.clear()  # keys and values of the old weights
            else:
                outputs += self._intake(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return outputs

    def _intake(self, request: EngineRequest) -> list[RowOutput]:
        try:
            prompt_ids = build_prompt_ids(self.lm, request.request)
            check_context(self.lm, len(prompt_ids), request.params.max_new_tokens)
        except GenerationError as e:
            return [RowOutput(request.id, error=e)]
        reserved = len(prompt_ids) + request.params.max_new_tokens
        if reserved > self.limits.max_batch_tokens:
            error = GenerationError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_new_tokens "
                f"({request.params.max_new_tokens}) exceed the engine's token budget "
                f"({self.limits.max_batch_tokens}, GENQ_MAX_BATCH_TOKENS)"
            )
            return [RowOutput(request.id, error=error)]
        self._deadlines[request.id] = request.deadline
        self._waiting.append(new_row(self.lm, request.id, prompt_ids, request.params))
        return []

    def _cancel(self, request_id: str) -> list[RowOutput]:
        for row in self._waiting:
            if row.request_id == request_id:
                self._waiting.remove(row)
                row.finish = "cancelled"
                self._deadlines.pop(request_id, None)
                return [RowOutput(request_id, row.stream.flush(), finished=row.generation())]
        if self._batch is not None:
            for i, row in enumerate(self._batch.rows):
                if row.request_id == request_id:
                    row.finish = "cancelled"
                    self._drop_rows([i])
                    return [RowOutput(request_id, row.stream.flush(), finished=row.generation())]
        return []

    def _expire(self) -> list[RowOutput]:
        now = time.monotonic()
        late = {rid for rid, deadline in self._deadlines.items() if deadline < now}
        if not late:
            return []
        error = GenerationTimeout("generation ran past GENQ_JOB_TIMEOUT_S")
        self._waiting = deque(r for r in self._waiting if r.request_id not in late)
        if self._batch is not None:
            self._drop_rows([i for i, r in enumerate(self._batch.rows) if r.request_id in late])
        for rid in late:
            del self._deadlines[rid]
        return [RowOutput(rid, error=error) for rid in late]

    def _admit(self) -> list[Row]:
        """Waiting rows that fit the batch size, the KV token budget, the prefill budget and
        the memory limit, in arrival order (a row that does not fit holds back those behind it,
        so large requests are not starved by small ones)."""
        if self._admission_paused:
            return []
        limits = self.limits
        running = self.running
        reserved = self._batch.reserved_tokens if self._batch else 0
        admitted: list[Row] = []
        longest = 0
        while self._waiting and running + len(admitted) < limits.max_batch_size:
            row = self._waiting[0]
            longest_if = max(longest, len(row.prompt_ids))
            first = not admitted
            if not first and longest_if * (len(admitted) + 1) > limits.max_prefill_tokens:
                break
            if reserved + row.reserved_tokens > limits.max_batch_tokens:
                break
            # An empty engine always takes one row: waiting could never free anything.
            kv_bytes = row.reserved_tokens * self._kv_bytes_per_token
            if (running or not first) and not self._memory_for(kv_bytes):
                break
            self._waiting.popleft()
            admitted.append(row)
            reserved += row.reserved_tokens
            longest = longest_if
        return admitted

    def _memory_for(self, kv_bytes: int) -> bool:
        if self.memory.can_admit(kv_bytes):
            return True
        if not len(self.prefix_cache):
            return False
        # Cached prompts yield to live rows.
        self.prefix_cache.clear()
        self.memory.release()
        return self.memory.can_admit(kv_bytes)

    def _generate(self) -> list[RowOutput]:
        running = self._batch
        prefill = self._prefill_batch(self._admitted) if self._admitted else None
        batches = [b for b in (running, prefill) if b is not None]
        cached = running.cached_tokens if running else 0
        try:
            logits = forward_all(self.lm, batches)
        except torch.OutOfMemoryError:
            if running is not None:
                running.restore_cache_length(cached)
            if prefill is not None:
                # The running rows decode again next step, without these.
                self._admitted = []
                return self._on_prefill_oom(prefill.rows)
            return self._on_decode_oom()
        self._admitted = []
        if prefill is not None and self.prefix_cache.enabled:
            self._remember_prompts(prefill)
        rows = [row for batch in batches for row in batch.rows]
        outputs: list[RowOutput] = []
        survivors: list[Batch] = []
        for batch, batch_logits in zip(batches, logits, strict=True):
            batch_outputs, after = advance(self.lm, batch, batch_logits)
            outputs += batch_outputs
            if after is not None:
                survivors.append(after)
        self._batch = Batch.concatenate(survivors) if survivors else None
        finished = [row for row in rows if row.finish is not None]
        if finished:
            self._forget(finished)
            self._admission_paused = False  # memory was freed
        if self._batch is None:
            self.memory.release()  # the batch drained: hand cached GPU blocks back
        return outputs

    def _prefill_batch(self, rows: list[Row]) -> Batch:
        for row in rows:
            row.started = time.perf_counter()
        cache = self.prefix_cache
        hits = [cache.lookup(row.prompt_ids) for row in rows] if cache.enabled else None
        return Batch.prefill(self.lm, rows, hits)

    def _remember_prompts(self, batch: Batch) -> None:
        try:
            for i, row in enumerate(batch.rows):
                if not self.prefix_cache.covers(row.prompt_ids):
                    self.prefix_cache.store(row.prompt_ids, batch.prompt_kv(i))
        except torch.OutOfMemoryError:
            # The cache only saves work: it gives its memory up, the rows keep theirs.
            logger.warning("out of memory caching prompts; prefix cache cleared")
            self.prefix_cache.clear()
            self.memory.release()

    def _on_prefill_oom(self, rows: list[Row]) -> list[RowOutput]:
        self.memory.release()
        if self._batch is not None:
            # The running rows hold the memory; these wait until some of them finish.
            logger.warning("out of memory prefilling %d rows; they wait", len(rows))
            self._waiting.extendleft(reversed(rows))
            self._admission_paused = True
            return []
        self._forget(rows)
        error = OutOfMemory("out of memory prefilling this prompt; retry with a shorter one")
        return [RowOutput(r.request_id, error=error) for r in rows]

    def _on_decode_oom(self) -> list[RowOutput]:
        # Fail the newest row only; the others decode this step again next iteration.
        batch = self._batch
        assert batch is not None
        newest = max(range(len(batch)), key=lambda i: batch.rows[i].started)
        victim = batch.rows[newest]
        logger.warning("out of memory decoding %d rows; failing %s", len(batch), victim.request_id)
        self._drop_rows([newest])
        self.memory.release()
        error = OutOfMemory("out of memory while generating; retry, or lower max_new_tokens")
        return [RowOutput(victim.request_id, error=error)]

    def _fail_all(self, error: GenerationError) -> list[RowOutput]:
        rows = [*self._waiting, *self._admitted, *(self._batch.rows if self._batch else [])]
        self._waiting.clear()
        self._admitted = []
        self._batch = None
        self._deadlines.clear()
        self.memory.release()
        return [RowOutput(row.request_id, error=error) for row in rows]

    def _drop_rows(self, indexes: list[int]) -> None:
        assert self._batch is not None
        dropped = set(indexes)
        for i in dropped:
            self._deadlines.pop(self._batch.rows[i].request_id, None)
        keep = [i for i in range(len(self._batch)) if i not in dropped]
        self._batch = self._batch.filter(keep)
        if self._batch is None:
            self.memory.release()

    def _forget(self, rows: list[Row]) -> None:
        for row in rows:
            self._deadlines.pop(row.request_id, None)

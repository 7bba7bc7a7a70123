"""The continuous-batching engine: one thread owns the model and, at every decode step, admits
waiting requests into the running batch and drops finished or cancelled ones.

Callers (arq job coroutines) `submit` requests and `cancel` them from any thread; the engine
reports every step's outputs, for all rows at once, through `on_step` (called on its thread).
Every request it accepts gets a last output (finished or failed), whatever goes wrong: a fault of
one row fails that row; a fault of a whole step fails the rows of that step, and a device error
or repeated step faults make the engine give up (`health().fatal`), answering every request with
`engine_error` until the worker restarts it.
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
    EngineFault,
    GenerationError,
    GenerationTimeout,
    OutOfMemory,
    PromptSource,
    build_prompt_ids,
    check_context,
    is_device_error,
)
from worker.loading import LoadedModel
from worker.memory import MemoryMonitor, kv_bytes_per_token, padded_peak
from worker.prefix_cache import PrefixCache, PrefixHit
from worker.sampling import SamplingParams

logger = logging.getLogger(__name__)

StepCallback = Callable[[list[RowOutput]], None]

# How long an idle engine waits for work before it looks at its stop flag again.
_IDLE_WAIT_S = 0.5
# Step faults in a row after which the engine gives up: something is broken for good.
_MAX_FAULTS_IN_ROW = 3


@dataclass(frozen=True, slots=True)
class EngineLimits:
    max_batch_size: int = 32
    max_batch_tokens: int = 65_536  # KV-cache tokens the padded batch may hold at its peak
    max_prefill_tokens: int = 4_096  # padded prompt tokens prefilled in one step
    memory_limit_bytes: int = 0  # 0: off
    prefix_cache_bytes: int = 256 * 2**20  # 0: off


@dataclass(frozen=True, slots=True)
class EngineRequest:
    id: str
    request: PromptSource
    params: SamplingParams
    deadline: float  # time.monotonic() past which the request fails with `job_timeout`
    cache_scope: str = ""  # the prefix-cache partition its prompt may match (an API key)


@dataclass(frozen=True, slots=True)
class EngineHealth:
    """What a watchdog polls, from any thread."""

    alive: bool  # the engine thread runs (False before `start()`)
    stopped: bool  # `stop()` was called: a thread that is no longer alive ended on purpose
    step_started: float | None  # time.monotonic() when the step in progress began; None: idle
    fatal: str | None  # why the engine gave up (or its thread died); None while it serves


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
        # Every request accepted and not yet answered, with its deadline: a request leaves it
        # when its last output goes into `_outputs`, so a failed step knows whom to answer.
        self._open: dict[str, float] = {}
        self._batch: Batch | None = None
        self._outputs: list[RowOutput] = []  # of the step in progress
        # Set by an out-of-memory prefill; admitting again waits until a running row finishes.
        self._admission_paused = False
        self._faults_in_row = 0
        self._fatal: str | None = None
        self._step_started: float | None = None
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

    def health(self) -> EngineHealth:
        return EngineHealth(
            alive=self._thread.is_alive(),
            stopped=self._stop.is_set(),
            step_started=self._step_started,
            fatal=self._fatal,
        )

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and self._fatal is None:
                self.step()
        except BaseException as e:
            # `step` answers its own faults; what gets here (`on_step` raising, say) ends the
            # thread, and `health()` shows a thread that died, for the watchdog to act on.
            self._fatal = f"the engine thread died: {e!r}"
            logger.critical("the engine thread died", exc_info=True)

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: take new work, then one forward pass that decodes a token for every
        running row and prefills the admitted rows' prompts. A fault of the step as a whole
        fails the rows it held (`_on_fault`); the outputs go to `on_step` once, at the end."""
        idle = self._batch is None and not self._waiting
        first = self._next_item(block=idle)
        started = self._step_started = time.monotonic()
        try:
            if first is not None:
                self._take_inbox(first)
            self._expire()
            decoding = self.running
            admitted, hits = self._admit()
            if admitted or self._batch is not None:
                self._emit(self._generate(admitted, hits))
            metrics.observe_step(self.lm.name, self._step_stats(started, decoding, admitted, hits))
        except Exception as e:
            self._on_fault(e)
        finally:
            self._step_started = None
        outputs, self._outputs = self._outputs, []
        if outputs:
            self.on_step(outputs)

    def _step_stats(
        self, started: float, decoding: int, admitted: list[Row], hits: list[PrefixHit | None]
    ) -> metrics.StepStats:
        batch = self._batch
        waiting = len(self._waiting)
        # Rows stay waiting beside a free row only when the KV budget or the memory limit holds
        # them back (the prefill budget always lets the first through).
        blocked = not admitted and self.running < self.limits.max_batch_size
        cached = sum(hit.length for hit in hits if hit is not None)
        prompts = sum(len(row.prompt_ids) for row in admitted)
        return metrics.StepStats(
            seconds=time.monotonic() - started,
            rows=decoding + len(admitted),
            tokens=decoding + prompts - cached,
            running=self.running,
            waiting=waiting,
            waiting_for_memory=waiting if blocked else 0,
            kv_tokens=len(batch) * batch.cached_tokens if batch else 0,
            kv_budget=self.limits.max_batch_tokens,
            prefix_queries=prompts if self.prefix_cache.enabled else 0,
            prefix_hits=cached,
        )

    def _next_item(self, *, block: bool) -> EngineRequest | _Cancel | _Swap | None:
        try:
            return self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return None

    def _take_inbox(self, item: EngineRequest | _Cancel | _Swap) -> None:
        while True:
            if isinstance(item, _Cancel):
                self._cancel(item.id)
            elif isinstance(item, _Swap):
                logger.info("now decoding with %s (%s)", item.lm.name, item.lm.source)
                metrics.forget_model(self.lm.name)
                self.lm = item.lm
                self.prefix_cache.clear()  # keys and values of the old weights
            else:
                self._intake(item)
            next_item = self._next_item(block=False)
            if next_item is None:
                return
            item = next_item

    def _intake(self, request: EngineRequest) -> None:
        # Open from here on: should anything below raise, the step's fault answers it.
        self._open[request.id] = request.deadline
        try:
            prompt_ids = build_prompt_ids(self.lm, request.request)
            check_context(self.lm, len(prompt_ids), request.params.max_new_tokens)
        except GenerationError as e:
            self._emit([RowOutput(request.id, error=e)])
            return
        row = new_row(self.lm, request.id, prompt_ids, request.params, request.cache_scope)
        if row.reserved_tokens > self.limits.max_batch_tokens:
            error = GenerationError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_new_tokens "
                f"({request.params.max_new_tokens}) exceed the engine's token budget "
                f"({self.limits.max_batch_tokens}, GENQ_MAX_BATCH_TOKENS)"
            )
            self._emit([RowOutput(request.id, error=error)])
            return
        self._waiting.append(row)

    def _cancel(self, request_id: str) -> None:
        for row in self._waiting:
            if row.request_id == request_id:
                self._waiting.remove(row)
                self._emit([row.end("cancelled")])
                return
        if self._batch is not None:
            for i, row in enumerate(self._batch.rows):
                if row.request_id == request_id:
                    self._drop_rows([i])
                    self._emit([row.end("cancelled")])
                    return

    def _emit(self, outputs: list[RowOutput]) -> None:
        """Outputs for `on_step`; a request whose last output this is leaves `_open`."""
        for output in outputs:
            if output.ended:
                self._open.pop(output.request_id, None)
        self._outputs += outputs

    def _expire(self) -> None:
        now = time.monotonic()
        late = {rid for rid, deadline in self._open.items() if deadline < now}
        if not late:
            return
        error = GenerationTimeout("generation ran past GENQ_JOB_TIMEOUT_S")
        self._waiting = deque(r for r in self._waiting if r.request_id not in late)
        if self._batch is not None:
            self._drop_rows([i for i, r in enumerate(self._batch.rows) if r.request_id in late])
        self._emit([RowOutput(rid, error=error) for rid in late])

    def _admit(self) -> tuple[list[Row], list[PrefixHit | None]]:
        """Waiting rows that fit the batch size, the prefill budget, the KV token budget and
        the memory limit, in arrival order (a row that does not fit holds back those behind it,
        so large requests are not starved by small ones), with their cached prompt prefixes.

        The KV budget and the memory limit are checked against the cache the batch will really
        hold: rows are left-padded to the widest, so that is the peak, over the steps to come, of
        (rows still running) x (cache width), as if every row ran to its `max_new_tokens`."""
        limits = self.limits
        if self._admission_paused or not self._waiting or self.running >= limits.max_batch_size:
            return [], []
        batch = self._batch
        running = batch.extents() if batch else []
        in_use = len(batch) * batch.cached_tokens if batch else 0
        admitted: list[Row] = []
        hits: list[PrefixHit | None] = []
        longest = 0
        while self._waiting and len(running) + len(admitted) < limits.max_batch_size:
            row = self._waiting[0]
            longest_if = max(longest, len(row.prompt_ids))
            first = not admitted
            if not first and longest_if * (len(admitted) + 1) > limits.max_prefill_tokens:
                break
            hit = (
                self.prefix_cache.lookup(row.prompt_ids, row.cache_scope)
                if self.prefix_cache.enabled
                else None
            )
            rows, prefixes = [*admitted, row], [*hits, hit]
            peak = padded_peak([*running, *Batch.prefill_extents(rows, prefixes)])
            if peak > limits.max_batch_tokens:
                break
            # An empty engine always takes one row: waiting could never free anything.
            kv_bytes = (peak - in_use) * self._kv_bytes_per_token
            if (running or not first) and not self._memory_for(kv_bytes):
                break
            self._waiting.popleft()
            admitted.append(row)
            hits.append(hit)
            longest = longest_if
        return admitted, hits

    def _memory_for(self, kv_bytes: int) -> bool:
        if self.memory.can_admit(kv_bytes):
            return True
        if not len(self.prefix_cache):
            return False
        # Cached prompts yield to live rows.
        self.prefix_cache.clear()
        self.memory.release()
        return self.memory.can_admit(kv_bytes)

    def _generate(self, admitted: list[Row], hits: list[PrefixHit | None]) -> list[RowOutput]:
        """The step's forward pass and its outputs, returned only once every row has advanced:
        a step that fails half way has emitted nothing for its rows, and `_on_fault` answers
        each of them once."""
        running = self._batch
        prefill = self._prefill_batch(admitted, hits) if admitted else None
        batches = [b for b in (running, prefill) if b is not None]
        cached = running.cached_tokens if running else 0
        try:
            logits = forward_all(self.lm, batches)
        except torch.OutOfMemoryError:
            if running is not None:
                running.restore_cache_length(cached)
            if prefill is not None:
                # The running rows decode again next step, without these.
                return self._on_prefill_oom(prefill.rows)
            return self._on_decode_oom()
        if prefill is not None and self.prefix_cache.enabled:
            self._remember_prompts(prefill)
        outputs: list[RowOutput] = []
        survivors: list[Batch] = []
        for batch, batch_logits in zip(batches, logits, strict=True):
            batch_outputs, after = advance(self.lm, batch, batch_logits)
            outputs += batch_outputs
            if after is not None:
                survivors.append(after)
        self._batch = Batch.concatenate(survivors) if survivors else None
        self._faults_in_row = 0
        if any(out.ended for out in outputs):
            self._admission_paused = False  # memory was freed
        if self._batch is None:
            self.memory.release()  # the batch drained: hand cached GPU blocks back
        return outputs

    def _prefill_batch(self, rows: list[Row], hits: list[PrefixHit | None]) -> Batch:
        for row in rows:
            row.started = time.perf_counter()
        return Batch.prefill(self.lm, rows, hits)

    def _remember_prompts(self, batch: Batch) -> None:
        try:
            for i, row in enumerate(batch.rows):
                if not self.prefix_cache.covers(row.prompt_ids, row.cache_scope):
                    self.prefix_cache.store(row.prompt_ids, batch.prompt_kv(i), row.cache_scope)
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

    def _on_fault(self, error: Exception) -> None:
        """A step failed as a whole, in the forward pass or anywhere no single row is to blame:
        the running batch is in no state to go on, so every row it held and every row admitted
        this step fails with `engine_error`; waiting rows wait on. A device error (sticky on
        CUDA) or too many faults in a row makes the engine give up: its thread ends, and the
        worker's watchdog restarts the worker, whose other jobs (waiting rows, new requests) then
        run on another worker."""
        self._faults_in_row += 1
        what = f"{type(error).__name__}: {error}"
        if self._fatal is None and is_device_error(error):
            self._fatal = f"device error ({what})"
        elif self._fatal is None and self._faults_in_row >= _MAX_FAULTS_IN_ROW:
            self._fatal = f"{self._faults_in_row} step faults in a row, the last: {what}"
        if self._fatal is None:
            logger.exception("engine step failed; failing the rows it held")
        else:
            logger.critical(
                "engine step failed; the engine gives up: %s", self._fatal, exc_info=error
            )
        keep = {row.request_id for row in self._waiting}
        fault = EngineFault(f"the engine failed a step ({what})")
        self._emit([RowOutput(rid, error=fault) for rid in self._open if rid not in keep])
        self._batch = None
        self._admission_paused = False
        self.prefix_cache.clear()  # it may hold what the failed step computed
        if self._fatal is None:
            self.memory.release()

    def _drop_rows(self, indexes: list[int]) -> None:
        assert self._batch is not None
        dropped = set(indexes)
        self._batch = self._batch.filter([i for i in range(len(self._batch)) if i not in dropped])
        if self._batch is None:
            self.memory.release()

"""The continuous-batching engine: one thread owns the model and, at every step, admits waiting
requests into the running batch, runs one forward pass and one sampling pass over all its rows,
and drops the rows that ended. Its text side, a thread of its own (`detokenizer.py`), turns each
step's token ids into text and reports the step's outputs, for all rows at once, through
`on_step`.

Callers (arq job coroutines) `submit` requests and `cancel` them from any thread. Every request
the engine accepts gets a last output (finished or failed), whatever goes wrong: a fault of one
row fails that row; a fault of a whole step fails the rows of that step, and a device error or
repeated step faults make the engine give up (`health().fatal`), answering every request it holds
with `engine_error`; the worker's watchdog then restarts the worker.
"""

from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from common.jobs import FinishReason
from worker import metrics
from worker.engine.batch import Batch, Row, forward_all, new_row
from worker.engine.compiling import compile_forward, uncompile
from worker.engine.detokenizer import Detokenizer, Ending, Record, StepCallback
from worker.engine.generation import (
    EngineFault,
    GenerationError,
    GenerationTimeout,
    OutOfMemory,
    PromptSource,
    build_prompt_ids,
    check_context,
    is_device_error,
)
from worker.engine.kv_cache import check_supported
from worker.engine.memory import MemoryMonitor, kv_bytes_per_token
from worker.engine.modes import DecodeConfig, DecodeMode, describe
from worker.engine.prefix_cache import PrefixCache, PrefixHit
from worker.engine.sampling import SamplingParams
from worker.engine.scheduling import EngineLimits, admit, admit_to_slots
from worker.engine.static_batch import StaticBatch
from worker.engine.static_cache import CacheTooSmall, geometry
from worker.engine.static_path import StaticDecoder, unsupported
from worker.loading import LoadedModel

logger = logging.getLogger(__name__)

# How long an idle engine waits for work before it looks at its stop flag again.
_IDLE_WAIT_S = 0.5
# Step faults in a row after which the engine gives up: something is broken for good.
_MAX_FAULTS_IN_ROW = 3


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
    fatal: str | None  # why the engine gave up (or a thread of it died); None while it serves


@dataclass(frozen=True, slots=True)
class _Cancel:
    id: str


@dataclass(frozen=True, slots=True)
class _Answered:
    """The text side ended the row (a stop string, a detokenizer fault): drop it."""

    id: str


@dataclass(frozen=True, slots=True)
class _Swap:
    lm: LoadedModel


class Engine:
    def __init__(
        self,
        lm: LoadedModel,
        limits: EngineLimits,
        on_step: StepCallback,
        decode: DecodeConfig | None = None,
    ) -> None:
        self.lm = lm
        self.limits = limits
        self.decode_config = decode or DecodeConfig()
        check_supported(lm)
        self.memory = MemoryMonitor(lm.device, limits.memory_limit_bytes)
        self._kv_bytes_per_token = kv_bytes_per_token(lm)
        self._eos_ids = _eos_tensor(lm)
        self.prefix_cache = PrefixCache(lm.name, limits.prefix_cache_bytes)
        self._inbox: queue.SimpleQueue[EngineRequest | _Cancel | _Answered | _Swap] = (
            queue.SimpleQueue()
        )
        self._waiting: deque[Row] = deque()
        # Every request accepted and not yet answered, with its deadline (and the deadlines in
        # a heap): a request leaves it when its end goes into the step's record, so a failed
        # step knows whom to answer. Its row, once it has one, is in `_rows`.
        self._open: dict[str, float] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._rows: dict[str, Row] = {}
        self._batch: Batch | StaticBatch | None = None
        # Set up by `_prepare`, on the engine thread before its first step: the static path
        # (None: the eager one), whether the model's own forward pass is compiled, and the mode.
        self._prepared = False
        self._static: StaticDecoder | None = None
        self._forward_compiled = False
        self._mode: DecodeMode | None = None
        self._steps = 0
        # This step left waiting rows out to prefill them later with more (the static path).
        self._held_back = False
        self._record = Record()  # of the step in progress, for the text side
        # Set by an out-of-memory prefill; admitting again waits until a running row finishes.
        self._admission_paused = False
        self._faults_in_row = 0
        self._fatal: str | None = None
        self._step_started: float | None = None
        self._stop = threading.Event()
        self._text = Detokenizer(on_step, lambda request_id: self._inbox.put(_Answered(request_id)))
        self._thread = threading.Thread(target=self._run, name="genq-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._text.stop()

    def submit(self, request: EngineRequest) -> None:
        self._inbox.put(request)

    def cancel(self, request_id: str) -> None:
        """The row ends with finish_reason `cancelled` at the next step."""
        self._inbox.put(_Cancel(request_id))

    def swap_model(self, lm: LoadedModel) -> None:
        """Decode with `lm` from the next step on; rows in flight keep their KV cache, so `lm`
        must be `swappable` with the current model (a reload of the same architecture)."""
        self._inbox.put(_Swap(lm))

    def flush(self) -> None:
        """Wait until the outputs of every step so far went to `on_step` (tests, benchmarks)."""
        self._text.flush()

    @property
    def running(self) -> int:
        return len(self._batch) if self._batch else 0

    @property
    def decode_mode(self) -> DecodeMode | None:
        """How it decodes (None until the engine thread has set up); any thread may read it."""
        return self._mode

    def health(self) -> EngineHealth:
        return EngineHealth(
            alive=self._thread.is_alive(),
            stopped=self._stop.is_set(),
            step_started=self._step_started,
            fatal=self._fatal or self._text.died,
        )

    def _run(self) -> None:
        try:
            self._prepare()
            while not self._stop.is_set() and self._fatal is None and self._text.died is None:
                self.step()
        except BaseException as e:
            # `step` answers its own faults; what gets here ends the thread, and `health()`
            # shows a thread that died, for the watchdog to act on.
            self._fatal = f"the engine thread died: {e!r}"
            logger.critical("the engine thread died", exc_info=True)

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: take new work, then one forward pass that decodes a token for every
        running row and prefills the admitted rows' prompts. A fault of the step as a whole
        fails the rows it held (`_on_fault`); what the step produced goes to the text side once,
        at the end."""
        if not self._prepared:
            self._prepare()
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
                self._generate(admitted, hits)
            metrics.observe_step(self.lm.name, self._step_stats(started, decoding, admitted, hits))
        except Exception as e:
            self._on_fault(e)
        finally:
            self._step_started = None
            self._steps += 1
        record, self._record = self._record, Record()
        if record:
            self._text.put(record)

    @torch.inference_mode()
    def _prepare(self) -> None:
        """Choose the decode path and set it up: the static path (its cache allocated, its
        buckets compiled and captured as far as that works) where configured and supported,
        else the eager one, its forward pass compiled if asked. Whatever does not work is said
        once, in the log and in the mode; requests are served either way."""
        self._prepared = True
        config, lm = self.decode_config, self.lm
        note = None
        if config.static == "on" or (config.static == "auto" and lm.device.type == "cuda"):
            note = unsupported(lm)
            if note is None:
                try:
                    self._static = self._static_decoder()
                except (CacheTooSmall, torch.OutOfMemoryError) as e:
                    note = str(e)
                    self.memory.release()
            if note is not None:
                note = f"the static decode path is off: {note}"
                logger.warning("%s (model %s)", note, lm.name)
        if self._static is not None:
            self._mode = self._static.mode
        else:
            if lm.compile:
                compile_note = compile_forward(lm.model, lm.device, config.compile_backend)
                self._forward_compiled = compile_note is None
                if compile_note is not None:
                    logger.warning("%s (model %s)", compile_note, lm.name)
                note = "; ".join(n for n in (note, compile_note) if n) or None
            self._mode = DecodeMode("eager", compiled=self._forward_compiled, note=note)
        logger.info("model %s decodes with %s", lm.name, self._mode.label)

    def _static_decoder(self) -> StaticDecoder:
        config, limits = self.decode_config, self.limits
        shape = geometry(
            self.lm,
            limits.max_batch_size,
            limits.max_batch_tokens,
            config.gpu_memory_fraction,
            self._kv_bytes_per_token,
        )
        static = StaticDecoder(self.lm, shape, config)
        static.prepare()
        return static

    def _step_stats(
        self, started: float, decoding: int, admitted: list[Row], hits: list[PrefixHit | None]
    ) -> metrics.StepStats:
        batch = self._batch
        waiting = len(self._waiting)
        # Rows stay waiting beside a free row only when the KV budget or the memory limit holds
        # them back (the prefill budget always lets the first through), or the static path
        # holds them for a later prefill.
        blocked = not admitted and not self._held_back and self.running < self.limits.max_batch_size
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
            kv_budget=(
                self._static.geometry.tokens if self._static else self.limits.max_batch_tokens
            ),
            prefix_queries=prompts if self.prefix_cache.enabled else 0,
            prefix_hits=cached,
        )

    def _next_item(self, *, block: bool) -> EngineRequest | _Cancel | _Answered | _Swap | None:
        try:
            return self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return None

    def _take_inbox(self, item: EngineRequest | _Cancel | _Answered | _Swap) -> None:
        while True:
            if isinstance(item, _Cancel):
                self._cancel(item.id)
            elif isinstance(item, _Answered):
                self._drop_answered(item.id)
            elif isinstance(item, _Swap):
                self._swap(item.lm)
            else:
                self._intake(item)
            next_item = self._next_item(block=False)
            if next_item is None:
                return
            item = next_item

    def _swap(self, lm: LoadedModel) -> None:
        logger.info("now decoding with %s (%s)", lm.name, lm.source)
        metrics.forget_model(self.lm.name)
        self.lm = lm
        self._eos_ids = _eos_tensor(lm)
        self.prefix_cache.clear()  # keys and values of the old weights
        if self._static is not None:
            self._static.swap(lm)
            self._mode = self._static.mode
        elif self._forward_compiled and compile_forward(
            lm.model, lm.device, self.decode_config.compile_backend
        ):
            self._forward_compiled = False
            self._mode = DecodeMode("eager", note="torch.compile failed for the swapped-in model")

    def _intake(self, request: EngineRequest) -> None:
        # Open from here on: should anything below raise, the step's fault answers it.
        self._open[request.id] = request.deadline
        heapq.heappush(self._deadlines, (request.deadline, request.id))
        try:
            prompt_ids = build_prompt_ids(self.lm, request.request)
            check_context(self.lm, len(prompt_ids), request.params.max_new_tokens)
        except GenerationError as e:
            self._end(request.id, error=e)
            return
        row = new_row(self.lm, request.id, prompt_ids, request.params, request.cache_scope)
        if self._static is not None:
            limit, what = self._static.geometry.columns, "the tokens one slot of the KV cache holds"
            source = self._static.geometry.source
        else:
            limit, what = self.limits.max_batch_tokens, "the engine's token budget"
            source = "GENQ_MAX_BATCH_TOKENS"
        if row.reserved_tokens > limit:
            error = GenerationError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_new_tokens "
                f"({request.params.max_new_tokens}) exceed {what} ({limit}, {source})"
            )
            self._end(request.id, error=error)
            return
        row.queued_step = self._steps
        self._rows[request.id] = row
        self._waiting.append(row)

    def _cancel(self, request_id: str) -> None:
        row = self._rows.get(request_id)
        if row is None:
            return
        if row in self._waiting:
            self._waiting.remove(row)
        else:
            self._drop(row)
        self._end(request_id, "cancelled")

    def _drop_answered(self, request_id: str) -> None:
        row = self._rows.get(request_id)
        if row is not None:
            self._drop(row)
            self._forget(request_id)

    def _end(
        self,
        request_id: str,
        reason: FinishReason | None = None,
        error: GenerationError | None = None,
    ) -> None:
        """The request's end, for the text side to answer; it leaves `_open`."""
        self._record.endings.append(Ending(request_id, self._rows.get(request_id), reason, error))
        self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        self._open.pop(request_id, None)
        self._rows.pop(request_id, None)

    def _expire(self) -> None:
        now = time.monotonic()
        late: set[str] = set()
        while self._deadlines and self._deadlines[0][0] < now:
            _, request_id = heapq.heappop(self._deadlines)
            if request_id in self._open:
                late.add(request_id)
        if not late:
            return
        error = GenerationTimeout("generation ran past GENQ_JOB_TIMEOUT_S")
        self._waiting = deque(r for r in self._waiting if r.request_id not in late)
        if self._batch is not None:
            self._drop_rows([i for i, r in enumerate(self._batch.rows) if r.request_id in late])
        for request_id in late:
            self._end(request_id, error=error)

    def _admit(self) -> tuple[list[Row], list[PrefixHit | None]]:
        self._held_back = False
        if self._admission_paused or not self._waiting:
            return [], []
        if self._static is not None:
            static = self._static
            # With graphs a decode step costs a fraction of one that also prefills: while rows
            # decode, newcomers wait a few steps to share one prefill.
            wait = self.decode_config.prefill_wait_steps if static.graphs else 0
            if self._batch is not None and self._waiting[0].queued_step + wait > self._steps:
                self._held_back = True
                return [], []
            return admit_to_slots(self._waiting, self.running, self.limits, self.prefix_cache)
        assert not isinstance(self._batch, StaticBatch)
        return admit(
            self._waiting,
            self._batch,
            self.limits,
            self.prefix_cache,
            self._memory_for,
            self._kv_bytes_per_token,
        )

    def _memory_for(self, kv_bytes: int) -> bool:
        if self.memory.can_admit(kv_bytes):
            return True
        if not len(self.prefix_cache):
            return False
        # Cached prompts yield to live rows.
        self.prefix_cache.clear()
        self.memory.release()
        return self.memory.can_admit(kv_bytes)

    def _generate(self, admitted: list[Row], hits: list[PrefixHit | None]) -> None:
        """The step's forward pass, then one sampling pass over every row, running and just
        admitted; the rows that ended leave the batch. A step that fails half way has handed
        nothing of its rows on, and `_on_fault` answers each of them once."""
        running = self._batch
        prefill = self._prefill_batch(admitted, hits) if admitted else None
        cached = running.cached_tokens if running else 0
        try:
            logits = self._forward(running, prefill)
        except torch.OutOfMemoryError:
            if running is not None:
                running.restore_cache_length(cached)
            if prefill is not None:
                # The running rows decode again next step, without these.
                self._on_prefill_oom(prefill.rows)
            else:
                self._on_decode_oom()
            return
        if prefill is not None and self.prefix_cache.enabled:
            self._remember_prompts(prefill)
        batch = _merged(running, prefill)
        step = batch.advance(logits, self._eos_ids)
        self._record.step = step  # from here on, the rows that ended are answered by the text side
        ended = [i for i, code in enumerate(step.codes) if code]
        for i in ended:
            self._forget(step.rows[i].request_id)
        self._batch = batch.filter(ended)
        self._faults_in_row = 0
        if ended:
            self._admission_paused = False  # memory was freed
        if self._batch is None:
            self._drained()

    def _prefill_batch(self, rows: list[Row], hits: list[PrefixHit | None]) -> Batch | StaticBatch:
        for row in rows:
            row.started = time.perf_counter()
        if self._static is not None:
            assert not isinstance(self._batch, Batch)
            return self._static.prefill(rows, hits, self._batch)
        return Batch.prefill(self.lm, rows, hits)

    def _forward(
        self, running: Batch | StaticBatch | None, prefill: Batch | StaticBatch | None
    ) -> torch.Tensor:
        """The step's pass: logits of the running rows, then the admitted ones."""
        if self._static is not None:
            assert not isinstance(running, Batch)
            assert not isinstance(prefill, Batch)
            logits = self._static.forward(running, prefill)
            self._mode = self._static.mode  # a fallback may have changed it
            return logits
        assert not isinstance(running, StaticBatch)
        assert not isinstance(prefill, StaticBatch)
        batches = [b for b in (running, prefill) if b is not None]
        if not self._forward_compiled:
            return forward_all(self.lm, batches)
        lengths = [b.cached_tokens for b in batches]
        try:
            return forward_all(self.lm, batches, compiled=True)
        except Exception as e:
            if is_device_error(e) or isinstance(e, torch.OutOfMemoryError):
                raise
            # A compile error at a new shape (inductor's, say): this step and every later one
            # run eagerly, from the caches as they were before the pass.
            note = f"torch.compile failed at run time, running eagerly: {describe(e)}"
            logger.warning("%s (model %s)", note, self.lm.name, exc_info=e)
            uncompile(self.lm.model)
            self._forward_compiled = False
            self._mode = DecodeMode("eager", note=note)
            for batch, length in zip(batches, lengths, strict=True):
                batch.restore_cache_length(length)
            return forward_all(self.lm, batches)

    def _remember_prompts(self, batch: Batch | StaticBatch) -> None:
        try:
            for i, row in enumerate(batch.rows):
                if not self.prefix_cache.covers(row.prompt_ids, row.cache_scope):
                    self.prefix_cache.store(row.prompt_ids, batch.prompt_kv(i), row.cache_scope)
        except torch.OutOfMemoryError:
            # The cache only saves work: it gives its memory up, the rows keep theirs.
            logger.warning("out of memory caching prompts; prefix cache cleared")
            self.prefix_cache.clear()
            self.memory.release()

    def _on_prefill_oom(self, rows: list[Row]) -> None:
        self.memory.release()
        if self._batch is not None:
            # The running rows hold the memory; these wait until some of them finish.
            logger.warning("out of memory prefilling %d rows; they wait", len(rows))
            self._waiting.extendleft(reversed(rows))
            self._admission_paused = True
            return
        error = OutOfMemory("out of memory prefilling this prompt; retry with a shorter one")
        for row in rows:
            self._end(row.request_id, error=error)

    def _on_decode_oom(self) -> None:
        # Fail the newest row only; the others decode this step again next iteration.
        batch = self._batch
        assert batch is not None
        victim = max(batch.rows, key=lambda row: row.started)
        logger.warning("out of memory decoding %d rows; failing %s", len(batch), victim.request_id)
        self._drop(victim)
        self.memory.release()
        error = OutOfMemory("out of memory while generating; retry, or lower max_new_tokens")
        self._end(victim.request_id, error=error)

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
        for request_id in [rid for rid in self._open if rid not in keep]:
            self._end(request_id, error=fault)
        self._batch = None
        if self._static is not None:
            self._static.reset()
        self._admission_paused = False
        self.prefix_cache.clear()  # it may hold what the failed step computed
        if self._fatal is None:
            self.memory.release()

    def _drop(self, row: Row) -> None:
        if self._batch is not None and row in self._batch.rows:
            self._drop_rows([self._batch.rows.index(row)])

    def _drop_rows(self, indexes: list[int]) -> None:
        assert self._batch is not None
        self._batch = self._batch.filter(indexes)
        if self._batch is None:
            self._drained()

    def _drained(self) -> None:
        # Hand cached GPU blocks back; on the static path the cache stays allocated anyway,
        # and the next prefill would only allocate its activations again.
        if self._static is None:
            self.memory.release()


def _merged(
    running: Batch | StaticBatch | None, prefill: Batch | StaticBatch | None
) -> Batch | StaticBatch:
    """The running batch with the rows just prefilled taken in (both of one path)."""
    if running is None:
        assert prefill is not None
        return prefill
    if prefill is None:
        return running
    if isinstance(running, StaticBatch):
        assert isinstance(prefill, StaticBatch)
        return running.extend(prefill)
    assert isinstance(prefill, Batch)
    return running.extend(prefill)


def _eos_tensor(lm: LoadedModel) -> torch.Tensor:
    return torch.tensor(sorted(lm.eos_token_ids), dtype=torch.long, device=lm.device)

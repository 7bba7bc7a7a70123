"""The continuous-batching engine: one thread owns the model and, at every step, schedules
(admits waiting requests into the running batch), executes (one forward pass and one sampling
pass over all its rows, through its decode path) and updates (drops the rows that ended). Its
text side, a thread of its own (`detokenizer.py`), turns each step's token ids into text and
reports the step's outputs, for all rows at once, through `on_step`; each step's measurements go
to `on_stats`.

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
from typing import Any

import torch

from common.jobs import FinishReason
from worker.engine.config import DecodeConfig, DecodeMode, EngineLimits
from worker.engine.decode_path import NOTHING, Admission, DecodePath
from worker.engine.detokenizer import Detokenizer, Record, StepCallback
from worker.engine.eager.kv_cache import check_supported
from worker.engine.generation import (
    EngineFault,
    GenerationError,
    GenerationTimeout,
    OutOfMemory,
    PromptSource,
    build_prompt_ids,
    check_context,
    check_token_ids,
    is_device_error,
    with_bad_words,
)
from worker.engine.grammar import Grammars
from worker.engine.logprobs import TokenTexts
from worker.engine.memory import MemoryMonitor
from worker.engine.model import LoadedModel, vocab
from worker.engine.paths import choose_path
from worker.engine.prefix_cache import PrefixCache
from worker.engine.resume import Resume, resume_row
from worker.engine.rows import Ending, Row, Step, new_row, score
from worker.engine.sampling import SamplingParams
from worker.engine.stats import StatsCallback, StepStats

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
    echo: bool = False  # its generation holds its prompt's text
    resume: Resume | None = None  # what an earlier attempt published, to go on from


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


_InboxItem = EngineRequest | _Cancel | _Answered | _Swap


def _ignore(stats: StepStats) -> None:
    pass


class Engine:
    def __init__(
        self,
        lm: LoadedModel,
        limits: EngineLimits,
        on_step: StepCallback,
        decode: DecodeConfig | None = None,
        on_stats: StatsCallback = _ignore,
    ) -> None:
        self.lm = lm
        self.limits = limits
        self.decode_config = decode or DecodeConfig()
        self.on_stats = on_stats
        check_supported(lm)
        self.memory = MemoryMonitor(lm.device, limits.memory_limit_bytes)
        self.prefix_cache = PrefixCache(limits.prefix_cache_bytes)
        self._inbox: queue.SimpleQueue[_InboxItem] = queue.SimpleQueue()
        self._waiting: deque[Row] = deque()
        # Every request accepted and not yet answered, with its deadline (and the deadlines in
        # a heap): a request leaves it when its end goes into the step's record, so a failed
        # step knows whom to answer. Its row, once it has one, is in `_rows`.
        self._open: dict[str, float] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._rows: dict[str, Row] = {}
        # Chosen and set up by the engine thread before its first step (`choose_path`).
        self._path: DecodePath[Any] | None = None
        self._steps = 0
        self._record = Record()  # of the step in progress, for the text side
        # Set by an out-of-memory prefill; admitting again waits until a running row finishes.
        self._admission_paused = False
        self._faults_in_row = 0
        self._fatal: str | None = None
        self._step_started: float | None = None
        self._stop = threading.Event()
        self._grammars = Grammars(lm.tokenizer, vocab(lm))
        texts = TokenTexts(lm.tokenizer)
        self._text = Detokenizer(
            on_step, lambda request_id: self._inbox.put(_Answered(request_id)), texts
        )
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
        return len(self._path.rows) if self._path is not None else 0

    @property
    def decode_mode(self) -> DecodeMode | None:
        """How it decodes (None until the engine thread has set up); any thread may read it."""
        return self._path.mode if self._path is not None else None

    def health(self) -> EngineHealth:
        return EngineHealth(
            alive=self._thread.is_alive(),
            stopped=self._stop.is_set(),
            step_started=self._step_started,
            fatal=self._fatal or self._text.died,
        )

    def _run(self) -> None:
        try:
            if self._path is None:
                self._prepare()
            while not self._stop.is_set() and self._fatal is None and self._text.died is None:
                self.step()
        except BaseException as e:
            # `step` answers its own faults; what gets here ends the thread, and `health()`
            # shows a thread that died, for the watchdog to act on.
            self._fatal = f"the engine thread died: {e!r}"
            logger.critical("the engine thread died", exc_info=True)

    @torch.inference_mode()
    def _prepare(self) -> DecodePath[Any]:
        config = self.decode_config
        self._path = choose_path(self.lm, self.limits, config, self.prefix_cache, self.memory)
        logger.info("model %s decodes with %s", self.lm.name, self._path.mode.label)
        return self._path

    @property
    def _ready(self) -> DecodePath[Any]:
        """The decode path, on the engine thread during a step (which sets it up first)."""
        assert self._path is not None, "a step sets the decode path up first"
        return self._path

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: take new work, schedule, then one forward pass that decodes a token for
        every running row and prefills the admitted rows' prompts, and drop the rows that ended.
        A fault of the step as a whole fails the rows it held (`_on_fault`); what the step
        produced goes to the text side once, at the end."""
        path = self._path or self._prepare()
        idle = not path.rows and not self._waiting
        first = self._next_item(block=idle)
        started = self._step_started = time.monotonic()
        try:
            if first is not None:
                self._take_inbox(first)
            self._expire()
            decoding = len(path.rows)
            admission = self._schedule(path)
            if admission.rows or path.rows:
                step = self._execute(path, admission)
                if step is not None:
                    self._update(path, step)
            self.on_stats(self._stats(path, started, decoding, admission))
        except Exception as e:
            self._on_fault(e)
        finally:
            self._step_started = None
            self._steps += 1
        record, self._record = self._record, Record()
        if record:
            self._text.put(record)

    def _schedule(self, path: DecodePath[Any]) -> Admission:
        if self._admission_paused or not self._waiting:
            return NOTHING
        return path.admit(self._waiting, self._steps)

    def _execute(self, path: DecodePath[Any], admission: Admission) -> Step | None:
        """The step's pass; None when it ran out of memory, which it has dealt with."""
        try:
            step = path.execute(admission)
        except torch.OutOfMemoryError:
            if admission.rows:
                # The running rows decode again next step, without these.
                self._on_prefill_oom(path, admission.rows)
            else:
                self._on_decode_oom(path)
            return None
        self._record.step = step  # from here on, the rows that ended are answered by the text side
        return step

    def _update(self, path: DecodePath[Any], step: Step) -> None:
        ended = [i for i, code in enumerate(step.codes) if code]
        for i in ended:
            self._forget(step.rows[i].request_id)
        path.drop(ended)
        self._faults_in_row = 0
        if ended:
            self._admission_paused = False  # memory was freed

    def _stats(
        self, path: DecodePath[Any], started: float, decoding: int, admission: Admission
    ) -> StepStats:
        running = len(path.rows)
        waiting = len(self._waiting)
        # Rows stay waiting beside a free row only when the KV budget or the memory limit holds
        # them back (the prefill budget always lets the first through), or the static path
        # holds them for a later prefill.
        blocked = not admission.rows and not admission.held_back
        blocked = blocked and running < self.limits.max_batch_size
        cached = sum(hit.length for hit in admission.hits if hit is not None)
        prompts = sum(len(row.prefill_ids) for row in admission.rows)
        return StepStats(
            model=self.lm.name,
            seconds=time.monotonic() - started,
            rows=decoding + len(admission.rows),
            tokens=decoding + prompts - cached,
            running=running,
            waiting=waiting,
            waiting_for_memory=waiting if blocked else 0,
            kv_tokens=path.kv_tokens,
            kv_budget=path.kv_budget,
            prefix_queries=prompts if self.prefix_cache.enabled else 0,
            prefix_hits=cached,
            prefix_cache_bytes=self.prefix_cache.nbytes,
        )

    def _next_item(self, *, block: bool) -> _InboxItem | None:
        try:
            return self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return None

    def _take_inbox(self, item: _InboxItem) -> None:
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
        self.lm = lm
        self.prefix_cache.clear()  # keys and values of the old weights
        self._ready.swap(lm)
        self._text.texts = TokenTexts(lm.tokenizer)
        self._grammars = Grammars(lm.tokenizer, vocab(lm))

    def _intake(self, request: EngineRequest) -> None:
        # Open from here on: should anything below raise, the step's fault answers it.
        self._open[request.id] = request.deadline
        heapq.heappush(self._deadlines, (request.deadline, request.id))
        params = request.params
        # A prompt read without a pass of the model (tokenized, echoed) fits any context.
        passes = params.max_new_tokens > 0 or params.prompt_logprobs is not None
        try:
            prompt_ids = build_prompt_ids(self.lm, request.request)
            if passes:
                check_context(self.lm, len(prompt_ids), params.max_new_tokens)
            check_token_ids(self.lm, params)
            params = with_bad_words(self.lm, params)
            matcher = self._grammars.matcher(params.grammar) if params.grammar else None
        except GenerationError as e:
            self._end(request.id, error=e)
            return
        row = new_row(
            self.lm, request.id, prompt_ids, params, request.cache_scope, echo=request.echo
        )
        row.matcher = matcher
        limit = self._ready.token_limit
        if passes and row.reserved_tokens > limit.tokens:
            error = GenerationError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_new_tokens "
                f"({request.params.max_new_tokens}) exceed {limit.what} "
                f"({limit.tokens}, {limit.setting})"
            )
            self._end(request.id, error=error)
            return
        self._rows[request.id] = row
        if request.resume is not None and self._resume(row, request.resume):
            return
        if not params.max_new_tokens:
            self._read_prompt(row)
            return
        row.queued_step = self._steps
        self._waiting.append(row)

    def _resume(self, row: Row, resume: Resume) -> bool:
        """Set `row` up to go on from `resume`; whether that answered the request (its earlier
        tokens already ended it, or cannot be continued)."""
        try:
            reason = resume_row(row, resume, self.lm.eos_token_ids)
        except GenerationError as e:
            self._end(row.request_id, error=e)
            return True
        if reason is not None:
            self._end(row.request_id, reason)
        return reason is not None

    def _read_prompt(self, row: Row) -> None:
        """A request for its prompt alone (max_new_tokens 0): scored if it asks, then answered
        without joining the batch."""
        try:
            score(self.lm, [row])
        except torch.OutOfMemoryError:
            self.memory.release()
            error = OutOfMemory("out of memory scoring this prompt; retry with a shorter one")
            self._end(row.request_id, error=error)
            return
        self._end(row.request_id, "length")

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
        path = self._ready
        dropped = [i for i, r in enumerate(path.rows) if r.request_id in late]
        if dropped:
            path.drop(dropped)
        for request_id in late:
            self._end(request_id, error=error)

    def _on_prefill_oom(self, path: DecodePath[Any], rows: list[Row]) -> None:
        self.memory.release()
        if path.rows:
            # The running rows hold the memory; these wait until some of them finish.
            logger.warning("out of memory prefilling %d rows; they wait", len(rows))
            self._waiting.extendleft(reversed(rows))
            self._admission_paused = True
            return
        error = OutOfMemory("out of memory prefilling this prompt; retry with a shorter one")
        for row in rows:
            self._end(row.request_id, error=error)

    def _on_decode_oom(self, path: DecodePath[Any]) -> None:
        # Fail the newest row only; the others decode this step again next iteration.
        rows = path.rows
        victim = max(rows, key=lambda row: row.started)
        logger.warning("out of memory decoding %d rows; failing %s", len(rows), victim.request_id)
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
        self._ready.reset()
        self._admission_paused = False
        self.prefix_cache.clear()  # it may hold what the failed step computed
        if self._fatal is None:
            self.memory.release()

    def _drop(self, row: Row) -> None:
        path = self._ready
        if row in path.rows:
            path.drop([path.rows.index(row)])

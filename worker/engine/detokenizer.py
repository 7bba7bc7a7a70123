"""The engine's text side, on a thread of its own: each step's token ids become `RowOutput`s.

The engine thread hands over one `Record` per step: the tokens the step's pass gave its rows, and
the rows and requests that ended for other reasons (cancelled, timed out, failed). Here, off the
step's path, each row's tokens go through its incremental detokenizer and stop strings, and the
step's outputs go to `on_step` in one call, in step order.

A row whose text reaches a stop string, or whose detokenizer raises, ends here: it is answered
at once (its text cut before the stop string, its tokens up to the one that completed it), and
the engine is told (`on_answered`) to drop it at its next step. Tokens the engine generated for
it in the meantime are ignored. The queue between the two threads holds at most
`_STEPS_AHEAD` records, so such a row ends within a step or two, and a stuck text side stops the
engine's steps, where the watchdog sees it.

Every request is answered here exactly once: a row answered early is marked, and whatever the
engine reports of it later is dropped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from common.jobs import FinishReason
from worker.engine.generation import (
    DetokenizationError,
    Generation,
    GenerationError,
    NumericalError,
    RowOutput,
)
from worker.engine.logprobs import TokenTexts
from worker.engine.rows import COMPLETE, EOS, FAILED, Ending, Row, Step

logger = logging.getLogger(__name__)

StepCallback = Callable[[list[RowOutput]], None]

_STEPS_AHEAD = 2
_STOP = None  # the record that ends the thread


@dataclass(slots=True)
class Record:
    """What one engine step hands the text side."""

    step: Step | None = None
    endings: list[Ending] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.step is not None or bool(self.endings)


class Detokenizer:
    def __init__(
        self, on_step: StepCallback, on_answered: Callable[[str], None], texts: TokenTexts
    ) -> None:
        self.on_step = on_step
        self.texts = texts  # the model's token texts, for log-probabilities
        self._on_answered = on_answered
        self._queue: queue.Queue[Record | None] = queue.Queue(maxsize=_STEPS_AHEAD)
        self._handed = 0  # records put
        self._done = 0  # records processed
        self._progress = threading.Condition()
        self.died: str | None = None  # why `on_step` failed; the engine gives up on it
        self._thread = threading.Thread(target=self._run, name="genq-detokenizer", daemon=True)
        self._thread.start()

    def put(self, record: Record) -> None:
        """Called by the engine thread; waits while the text side is `_STEPS_AHEAD` behind."""
        with self._progress:
            self._handed += 1
        self._queue.put(record)

    def flush(self) -> None:
        """Wait until every record put so far went to `on_step` (tests, benchmarks)."""
        with self._progress:
            self._progress.wait_for(lambda: self._done >= self._handed)

    def stop(self) -> None:
        """Hand what was put on, then end the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while (record := self._queue.get()) is not _STOP:
            try:
                if self.died is None:
                    self._hand_on(record)
            except BaseException as e:
                # The step's outputs are lost: nothing can answer their requests any more. The
                # engine gives up (`health().fatal`), and the records still coming are dropped.
                self.died = f"the detokenizer thread failed: {e!r}"
                logger.critical("the detokenizer thread failed", exc_info=True)
            finally:
                with self._progress:
                    self._done += 1
                    self._progress.notify_all()

    def _hand_on(self, record: Record) -> None:
        outputs: list[RowOutput] = []
        if record.step is not None:
            self._take_step(record.step, outputs)
        for ending in record.endings:
            if ending.row is None:
                outputs.append(RowOutput(ending.request_id, error=ending.error))
            elif not ending.row.answered:
                outputs.append(self._end(ending.row, ending.reason, ending.error))
        if outputs:
            self.on_step(outputs)

    def _take_step(self, step: Step, outputs: list[RowOutput]) -> None:
        now = time.perf_counter()
        logprobs = step.logprobs or [None] * len(step.rows)
        for row, token, code, scores in zip(
            step.rows, step.tokens, step.codes, logprobs, strict=True
        ):
            if row.answered:
                continue
            if row.first_token_s is None:
                row.first_token_s = now - row.started
            if scores is not None and not code & FAILED:
                entry = self.texts.entry(scores)
                row.logprobs.append(entry)
                row.unsent_logprobs.append(entry)
            if code:
                outputs.append(self._last_token(row, token, code))
                continue
            row.token_ids.append(token)
            try:
                text = row.stream.push(token)
            except DetokenizationError as e:
                outputs.append(self._end(row, error=e, early=True))
                continue
            if row.stream.stopped:
                outputs.append(self._end(row, "stop", text=text, early=True))
            elif text:
                outputs.append(self._output(row, text))

    @staticmethod
    def _output(row: Row, text: str, finished: Generation | None = None) -> RowOutput:
        """The row's new `text`, with the log-probabilities of the tokens it came from."""
        return RowOutput(
            row.request_id,
            text,
            finished=finished,
            tokens=len(row.token_ids),
            ids=row.take_unsent_ids(),
            prompt_tokens=len(row.prompt_ids),
            logprobs=row.take_unsent_logprobs() if row.params.logprobs is not None else None,
        )

    def _last_token(self, row: Row, token: int, code: int) -> RowOutput:
        """The output of a row the engine ended with this token (`Step.codes`)."""
        if code & FAILED:
            error = NumericalError(
                "the model's next-token scores for this request cannot be sampled: all NaN or "
                "-inf, or none its grammar allows"
            )
            return self._end(row, error=error)
        row.token_ids.append(token)
        if code & EOS:
            return self._end(row, "stop")
        try:
            text = row.stream.push(token)
        except DetokenizationError as e:
            return self._end(row, error=e)
        ended = row.stream.stopped or code & COMPLETE
        return self._end(row, "stop" if ended else "length", text=text)

    def _end(
        self,
        row: Row,
        reason: FinishReason | None = None,
        error: GenerationError | None = None,
        text: str = "",
        *,
        early: bool = False,
    ) -> RowOutput:
        """The row's last output: `text`, whatever its stream held back, and the generation.
        `early`: the engine still runs the row, and is told to drop it."""
        row.answered = True
        if early:
            self._on_answered(row.request_id)
        if error is None:
            try:
                text += row.stream.flush()
            except DetokenizationError as e:
                error = e
        if error is not None:
            return RowOutput(row.request_id, error=error)
        assert reason is not None, "a row ends with a reason or an error"
        return self._output(row, text, row.generation(reason, self.texts))

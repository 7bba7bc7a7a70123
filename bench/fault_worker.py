"""A genq worker with faults to inject, for `bench.faults` and the fault tests.

    python -m bench.fault_worker worker     # same settings as `genq worker`

It is `genq worker` with a poison trap: a row whose prompt holds `POISON_MARKER` gets NaN
next-token scores once it has taken `POISON_AFTER` tokens, at a step where other rows run beside
it, the way a model that overflows on one input poisons that row alone. The engine must fail that
row (`numerical_error`) and no other. No other prompt is touched, so the fault stack runs this
worker throughout.

`FAULT` (an environment variable) arms one more fault, which strikes once the engine has taken
`FAULT_ENGINE_STEPS` steps (default 20) with rows running:

- `engine-dies`: the engine thread dies;
- `step-hangs`: an engine step never returns;
- `loop-blocks`: the event loop blocks, never to run again.

Each is the watchdog's to turn into a restart (exit status 3) within
GENQ_WORKER_WATCHDOG_TIMEOUT_S, the worker's jobs released to run elsewhere.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from typing import Any

import torch

import worker.engine.engine as engine_module
from bench.faults import POISON_MARKER
from genq.cli import main
from worker.engine import Engine, EngineRequest
from worker.engine.decode_path import Admission, DecodePath
from worker.engine.model import LoadedModel
from worker.engine.rows import Row, RowBook, Step, new_row
from worker.engine.sampling import SamplingParams
from worker.engine.slots import SlotTensors

POISON_AFTER = 3
FAULTS = ("engine-dies", "step-hangs", "loop-blocks")
STEPS = int(os.environ.get("FAULT_ENGINE_STEPS", "20"))

# Rows of a poisoned prompt, with the tokens picked for them so far.
_poisoned: weakref.WeakKeyDictionary[Row, int] = weakref.WeakKeyDictionary()
_pick = RowBook._pick


def _trapped_new_row(
    lm: LoadedModel,
    request_id: str,
    prompt_ids: list[int],
    params: SamplingParams,
    cache_scope: str = "",
    *,
    echo: bool = False,
) -> Row:
    row = new_row(lm, request_id, prompt_ids, params, cache_scope, echo=echo)
    if POISON_MARKER in lm.tokenizer.decode(prompt_ids):
        _poisoned[row] = 0
    return row


def _poisoning_pick(
    self: RowBook, logits: torch.Tensor, slots: SlotTensors, eos_ids: torch.Tensor
) -> tuple[torch.Tensor, Step]:
    for i, row in enumerate(self.rows):
        if row in _poisoned:
            if _poisoned[row] >= POISON_AFTER and len(self.rows) > 1:
                logits[i] = float("nan")
            _poisoned[row] += 1
    return _pick(self, logits, slots, eos_ids)


class _Strike:
    """Counts the engine's steps with rows running, and strikes once past STEPS."""

    def __init__(self, fault: str) -> None:
        self.fault = fault
        self.taken = 0
        self.loop: asyncio.AbstractEventLoop | None = None  # the worker's, from `submit`

    def install(self) -> None:
        """In place of the engine's methods (functions, which the engine binds)."""
        step, execute, submit = Engine.step, Engine._execute, Engine.submit

        def submitting(engine: Engine, request: EngineRequest) -> None:
            # Job coroutines submit: this is the worker's event loop.
            self.loop = asyncio.get_running_loop()
            submit(engine, request)

        def stepping(engine: Engine) -> None:
            if engine.running:
                self.taken += 1
            if self.taken > STEPS and self.fault == "engine-dies":
                raise SystemExit("injected: the engine thread dies")
            if self.taken == STEPS + 1 and self.fault == "loop-blocks" and self.loop is not None:
                self.loop.call_soon_threadsafe(_block_forever)
            step(engine)

        def executing(engine: Engine, path: DecodePath[Any], admission: Admission) -> Step | None:
            # Inside the step, after it took its start time: what the watchdog times.
            if self.taken > STEPS and self.fault == "step-hangs":
                threading.Event().wait()
            return execute(engine, path, admission)

        Engine.submit = submitting  # type: ignore[method-assign, assignment]
        Engine.step = stepping  # type: ignore[method-assign, assignment]
        Engine._execute = executing  # type: ignore[method-assign, assignment]


def _block_forever() -> None:
    while True:
        time.sleep(60)


def install(fault: str | None) -> None:
    """The poison trap, and `fault` (one of FAULTS) if given."""
    engine_module.new_row = _trapped_new_row  # type: ignore[attr-defined]
    RowBook._pick = _poisoning_pick  # type: ignore[method-assign]
    if fault:
        if fault not in FAULTS:
            raise SystemExit(f"FAULT={fault}: not one of {', '.join(FAULTS)}")
        _Strike(fault).install()


if __name__ == "__main__":
    install(os.environ.get("FAULT"))
    raise SystemExit(main(["worker"]))

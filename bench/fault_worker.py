"""A genq worker whose engine thread dies a few steps into its work: the fault that its
watchdog must turn into a restart (exit status 3). For `bench.faults` and the fault tests.

    python -m bench.fault_worker worker     # same settings as `genq worker`
"""

from __future__ import annotations

import os

from genq.cli import main
from worker.engine import Engine

# Steps the engine takes before its thread dies; FAULT_ENGINE_STEPS overrides it.
STEPS = int(os.environ.get("FAULT_ENGINE_STEPS", "20"))

_step = Engine.step
_taken = 0


def _dying_step(engine: Engine) -> None:
    global _taken
    if engine.running:
        _taken += 1
    if _taken > STEPS:
        raise SystemExit("injected: the engine thread dies")
    _step(engine)


if __name__ == "__main__":
    Engine.step = _dying_step  # type: ignore[method-assign, assignment]
    raise SystemExit(main(["worker"]))

"""The watchdog: a worker whose engine thread died, or whose engine step or event loop is stuck,
stops proving it is alive and exits non-zero, so that its supervisor (`genq run`, Kubernetes)
restarts it and other workers take its jobs.

It runs in a thread of its own, so it sees a blocked event loop too. Its checks are plain reads of
state the engine threads and the loop update; a tripped watchdog first releases the leases of
the worker's jobs (best effort), so that they run elsewhere at once instead of when the leases
lapse.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable

from worker.engine import Engine

logger = logging.getLogger(__name__)

# Exit status of a worker stopped by its watchdog.
EXIT_UNHEALTHY = 3

_CHECK_EVERY_S = 1.0


class Watchdog:
    def __init__(
        self,
        engines: Callable[[], Iterable[Engine]],
        timeout_s: float,
        on_trip: Callable[[], None],
    ) -> None:
        self.engines = engines
        self.timeout_s = timeout_s
        self.on_trip = on_trip  # releases the worker's leases; must not rely on the event loop
        self.tripped: str | None = None
        self._loop_seen = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="genq-watchdog", daemon=True)

    @property
    def healthy(self) -> bool:
        return self.tripped is None

    def start(self) -> None:
        self._thread.start()

    def loop_alive(self) -> None:
        """Called by the event loop about once a second."""
        self._loop_seen = time.monotonic()

    def problem(self) -> str | None:
        """Why the worker cannot go on, if it cannot."""
        now = time.monotonic()
        if now - self._loop_seen > self.timeout_s:
            return f"the event loop has not run for {now - self._loop_seen:.0f} s"
        for engine in list(self.engines()):
            health = engine.health()
            if health.fatal is not None:
                return f"the engine of {engine.lm.name} cannot go on: {health.fatal}"
            if not health.alive and not health.stopped:
                return f"the engine thread of {engine.lm.name} died"
            if health.step_started is not None and now - health.step_started > self.timeout_s:
                return (
                    f"an engine step of {engine.lm.name} has run for "
                    f"{now - health.step_started:.0f} s (GENQ_WORKER_WATCHDOG_TIMEOUT_S)"
                )
        return None

    def _watch(self) -> None:
        while (problem := self.problem()) is None:
            time.sleep(_CHECK_EVERY_S)
        self.tripped = problem
        logger.critical("watchdog: %s; the worker exits for a restart", problem)
        try:
            self.on_trip()
        finally:
            os._exit(EXIT_UNHEALTHY)

"""The gateway's drain: set when it is told to stop, so that waits and streams end at once
instead of holding their connections open until the shutdown grace runs out."""

from __future__ import annotations

import asyncio


class Drain:
    def __init__(self) -> None:
        self.started = False
        self._stopping: asyncio.Future[None] | None = None

    def start(self) -> None:
        """Called from the signal handler, on the event loop's thread but outside its callbacks:
        the waiters are woken through `call_soon_threadsafe`, which is safe there."""
        self.started = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not serving yet: nothing waits
            return
        loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if self._stopping is not None and not self._stopping.done():
            self._stopping.set_result(None)

    def stopping(self) -> asyncio.Future[None]:
        """Done once the drain started. Shared by every waiter: pass it to `asyncio.wait`, which
        never cancels it, and never cancel it yourself."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_future()
            if self.started:
                self._stopping.set_result(None)
        return self._stopping

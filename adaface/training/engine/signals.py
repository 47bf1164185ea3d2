"""SIGINT/SIGTERM as a stop request: the loop finishes its optimizer step, saves a checkpoint and stops.

The handler only records the request (the loop polls it between steps, so nothing is torn mid-update); a second
SIGINT raises KeyboardInterrupt at once, for a person who does not want to wait for the checkpoint. The
previous handlers come back on exit.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class StopSignals:
    def __init__(self) -> None:
        self.requested: str | None = None  # the first signal's name, once one arrived
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt("second SIGINT: aborting without a checkpoint")
        if self.requested is None:
            self.requested = name
            print(f"\n{name} received: finishing the current step, then saving a checkpoint and stopping "
                  "(press Ctrl-C again to abort at once)", flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

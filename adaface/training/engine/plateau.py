"""A plateau detector on the moving average of the training loss.

The raw stage-1 loss is noisy (random IDs, timesteps and trajectory lengths), so the detector compares the
mean of the last `window` losses with the best such mean seen since the last reset. An improvement larger
than `tolerance` (relative) resets the patience counter; `patience` steps without one is a plateau. After a
plateau (and an expansion) the caller resets the detector, because the loss curve of the larger model starts
a new regime. All state is plain numbers so it checkpoints as JSON.
"""

from __future__ import annotations

from collections import deque
from typing import Any


class PlateauDetector:
    def __init__(self, window: int, tolerance: float, patience: int) -> None:
        if window < 1 or patience < 1 or tolerance < 0:
            raise ValueError("window and patience must be >= 1 and tolerance >= 0")
        self.window = window
        self.tolerance = tolerance
        self.patience = patience
        self.reset()

    def reset(self) -> None:
        self._losses: deque[float] = deque(maxlen=self.window)
        self.best: float | None = None
        self.since_best = 0

    @property
    def smoothed(self) -> float | None:
        """The moving average, once the window is full."""
        if len(self._losses) < self.window:
            return None
        return sum(self._losses) / self.window  # re-summed: a running sum would drift from a restored state

    def update(self, loss: float) -> bool:
        """Feed one step's loss; True when the smoothed loss has plateaued."""
        self._losses.append(float(loss))
        smoothed = self.smoothed
        if smoothed is None:
            return False
        if self.best is None or smoothed < self.best * (1.0 - self.tolerance):
            self.best = smoothed
            self.since_best = 0
            return False
        self.since_best += 1
        return self.since_best >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self._losses), "best": self.best, "since_best": self.since_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self._losses.extend(float(x) for x in state["losses"])
        self.best = state["best"]
        self.since_best = int(state["since_best"])

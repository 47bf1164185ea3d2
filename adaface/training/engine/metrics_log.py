"""A JSON-lines metrics log a person can plot: one object per line, flushed as written.

Lines carry an `event` ("step", "expansion", "checkpoint", "start", "summary", ...) and a `step`. On resume
from step S the log is cut back to what happened up to S (and a torn last line from a killed process is
dropped), so the resumed run's log reads exactly like an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records (a torn trailing line is skipped)."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


class MetricsLog:
    def __init__(self, path: str | os.PathLike, *, enabled: bool = True, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._fh = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            atomic_write_text(self.path, "")
        else:
            # "step" and "checkpoint" records at S happened before checkpoint S was complete; other events at
            # S (an expansion before step S+1) happen again after the resume
            kept = [r for r in read_jsonl(self.path)
                    if r.get("step", 0) < resume_step
                    or (r.get("step") == resume_step and r.get("event") in ("step", "checkpoint"))]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._fh = open(self.path, "a")

    def write(self, event: str, **fields: Any) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps({"event": event, **fields}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

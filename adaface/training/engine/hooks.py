"""Callbacks at the trainer's step boundaries, and an opt-in hook module named by an environment variable.

The trainer calls `Callbacks.emit(event, trainer, ...)` at fixed points of the loop, outside the optimizer step:

- "start"       (trainer)           after models, optimizer and a resumed state are in place, before step 1;
- "step_start"  (trainer)           before each optimizer step (trainer.state.step = steps completed so far);
- "step_end"    (trainer, metrics)  after a step was logged, before the stop/plateau agreement and checkpoint;
- "checkpoint"  (trainer, path)     after a checkpoint was written.

`ADAFACE_TRAINING_HOOK=module:function` (or `/path/to/file.py:function`) names a function the trainer calls once
with itself at start-up; it may register callbacks or wrap the stage's methods. The fault tests use it to send
signals or inject non-finite losses at a chosen step. Nothing is loaded when the variable is unset.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

HOOK_ENV = "ADAFACE_TRAINING_HOOK"
EVENTS = ("start", "step_start", "step_end", "checkpoint")


class Callbacks:
    def __init__(self) -> None:
        self._by_event: dict[str, list[Callable[..., Any]]] = {e: [] for e in EVENTS}

    def add(self, event: str, fn: Callable[..., Any]) -> None:
        if event not in self._by_event:
            raise ValueError(f"unknown trainer event {event!r}; expected one of {', '.join(EVENTS)}")
        self._by_event[event].append(fn)

    def emit(self, event: str, *args: Any) -> None:
        for fn in self._by_event[event]:
            fn(*args)


def load_env_hook() -> Callable[[Any], None] | None:
    """The function named by ADAFACE_TRAINING_HOOK, or None when it is unset."""
    spec = os.environ.get(HOOK_ENV, "").strip()
    if not spec:
        return None
    target, sep, func = spec.rpartition(":")
    if not sep or not target or not func:
        raise ValueError(f"{HOOK_ENV}: expected MODULE:FUNCTION or FILE.py:FUNCTION, got {spec!r}")
    if target.endswith(".py"):
        path = Path(target)
        mod_spec = importlib.util.spec_from_file_location(f"adaface_training_hook_{path.stem}", path)
        if mod_spec is None or not path.is_file():
            raise ValueError(f"{HOOK_ENV}: file not found: {target}")
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ValueError(f"{HOOK_ENV}: {target} has no function {func!r}")
    return fn

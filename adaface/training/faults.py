"""Fault injection for tests of the trainer's fault handling, installed through the trainer's hook variable:

    ADAFACE_TRAINING_HOOK=adaface.training.faults:install ADAFACE_FAULTS="sigterm@3:r1,nan_loss@5-6" python ...

`ADAFACE_FAULTS` is a comma-separated list of `KIND@STEPS[:rRANK]`; STEPS is N or N-M (1-based optimizer steps),
RANK limits the fault to one DDP rank. Kinds:
- `sigkill@N`, `sigint@N`, `sigterm@N`: the process sends itself that signal once step N was logged (before the
  ranks agree on stopping and before a checkpoint due at N);
- `nan_loss@N`: during step N every micro-batch's loss and the trainable gradients are NaN;
- `inf_grad@N`: during step N the trainable gradients are +inf (the loss stays finite).
Faults act through callbacks and a wrapper around the stage's `micro_loss`; the trainer itself has no test code.
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass
from typing import Any

FAULTS_ENV = "ADAFACE_FAULTS"
_SPEC = re.compile(r"^(?P<kind>sigkill|sigint|sigterm|nan_loss|inf_grad)@(?P<lo>\d+)(?:-(?P<hi>\d+))?"
                   r"(?::r(?P<rank>\d+))?$")


@dataclass(frozen=True)
class Fault:
    kind: str
    first: int
    last: int
    rank: int | None

    def applies(self, step: int, rank: int) -> bool:
        return self.first <= step <= self.last and (self.rank is None or self.rank == rank)


def parse_faults(text: str) -> list[Fault]:
    faults = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        m = _SPEC.match(item)
        if m is None:
            raise ValueError(f"{FAULTS_ENV}: bad fault {item!r} (want KIND@N[-M][:rRANK])")
        lo = int(m["lo"])
        faults.append(Fault(m["kind"], lo, int(m["hi"] or lo), None if m["rank"] is None else int(m["rank"])))
    return faults


def install(trainer: Any) -> None:
    """Register the faults of ADAFACE_FAULTS on a trainer (adaface.training.trainer.Trainer)."""
    faults = parse_faults(os.environ.get(FAULTS_ENV, ""))
    rank = trainer.info.rank
    signals = {"sigkill": signal.SIGKILL, "sigint": signal.SIGINT, "sigterm": signal.SIGTERM}

    def on_step_end(tr: Any, metrics: dict) -> None:
        for f in faults:
            if f.kind in signals and f.applies(tr.state.step, rank):
                os.kill(os.getpid(), signals[f.kind])

    trainer.callbacks.add("step_end", on_step_end)

    numeric = [f for f in faults if f.kind in ("nan_loss", "inf_grad")]
    if not numeric:
        return
    stage = trainer.stage
    micro_loss = stage.micro_loss

    def faulty_micro_loss(ms: Any) -> Any:
        loss, terms = micro_loss(ms)
        step = ms.step + 1
        for f in numeric:
            if not f.applies(step, rank):
                continue
            value = float("nan") if f.kind == "nan_loss" else float("inf")
            for p in stage.trainable.parameters():
                if p.grad is not None:
                    p.grad.fill_(value)
            if f.kind == "nan_loss":
                loss = loss * float("nan")
                terms = {k: (v * float("nan") if k.startswith("loss_") and not isinstance(v, list) else v)
                         for k, v in terms.items()}
        return loss, terms

    stage.micro_loss = faulty_micro_loss

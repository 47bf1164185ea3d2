"""Fault injection for tests of the trainer's fault handling, installed through the trainer's hook variable:

    ADAFACE_TRAINING_HOOK=adaface.training.engine.faults:install ADAFACE_FAULTS="sigterm@3:r1,nan_loss@5-6" python ...

`ADAFACE_FAULTS` is a comma-separated list of `KIND@STEPS[:rRANK]`; STEPS is N or N-M (1-based optimizer steps),
RANK limits the fault to one DDP rank. Kinds:
- `sigkill@N`, `sigint@N`, `sigterm@N`: the process sends itself that signal once step N was logged (before the
  ranks agree on stopping and before a checkpoint due at N);
- `sigkill_saved@N`, `sigterm_saved@N`: that signal once the checkpoint of step N was written (for the final step:
  after its checkpoint, before the final outputs);
- `enospc@N`: writing the checkpoint of step N fails as on a full disk (part of a tensor file is written, then
  `OSError(ENOSPC)` naming it);
- `nan_loss@N`: during step N every micro-batch's loss and the trainable gradients are NaN;
- `inf_grad@N`: during step N the trainable gradients are +inf (the loss stays finite).
Faults act through callbacks and a wrapper around the stage's `micro_loss`; the trainer itself has no test code.
"""

from __future__ import annotations

import errno
import os
import re
import signal
from dataclasses import dataclass
from typing import Any

FAULTS_ENV = "ADAFACE_FAULTS"
_SPEC = re.compile(r"^(?P<kind>sigkill|sigint|sigterm|sigkill_saved|sigterm_saved|enospc|nan_loss|inf_grad)"
                   r"@(?P<lo>\d+)(?:-(?P<hi>\d+))?"
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
    """Register the faults of ADAFACE_FAULTS on a trainer (adaface.training.engine.trainer.Trainer)."""
    faults = parse_faults(os.environ.get(FAULTS_ENV, ""))
    rank = trainer.info.rank
    signals = {"sigkill": signal.SIGKILL, "sigint": signal.SIGINT, "sigterm": signal.SIGTERM}

    def on_step_end(tr: Any, metrics: dict) -> None:
        for f in faults:
            if f.kind in signals and f.applies(tr.state.step, rank):
                os.kill(os.getpid(), signals[f.kind])

    trainer.callbacks.add("step_end", on_step_end)

    def on_checkpoint(tr: Any, path: Any) -> None:
        for f in faults:
            if f.kind.endswith("_saved") and f.applies(tr.state.step, rank):
                os.kill(os.getpid(), signals[f.kind.removesuffix("_saved")])

    trainer.callbacks.add("checkpoint", on_checkpoint)
    if any(f.kind == "enospc" for f in faults):
        _install_full_disk(trainer, [f for f in faults if f.kind == "enospc"], rank)

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


def _install_full_disk(trainer: Any, faults: list[Fault], rank: int) -> None:
    """Make the checkpoint writer fail like a full disk during the steps of `faults`: the tensor file gets some
    bytes, then OSError(ENOSPC) names it."""
    from . import checkpoint

    save_file = checkpoint.save_file

    def full_disk_save_file(tensors: Any, filename: str, metadata: Any = None) -> None:
        if any(f.applies(trainer.state.step, rank) for f in faults):
            with open(filename, "wb") as fh:
                fh.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        save_file(tensors, filename, metadata=metadata)

    checkpoint.save_file = full_disk_save_file

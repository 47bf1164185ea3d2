"""What the training tests share: tiny models saved once, the environment of a reproducible script run
(single-threaded, so runs are bit-for-bit reproducible; no fault injected unless asked), and a run's step records."""

from __future__ import annotations

import os
from pathlib import Path

# the fault-injection hook the scripts install when ADAFACE_FAULTS is set (adaface.training.engine.faults)
FAULT_HOOK = {"ADAFACE_TRAINING_HOOK": "adaface.training.engine.faults:install"}


def script_env(**extra: str) -> dict[str, str]:
    """The environment of a reproducible run: one thread, unbuffered output, no fault injected unless asked."""
    env = dict(os.environ)
    env.pop("ADAFACE_FAULTS", None)
    env.pop("ADAFACE_TRAINING_HOOK", None)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def tiny_stage2_models(root: Path, faces: int) -> dict[str, Path]:
    """Tiny SD-1.5 and Arc2Face folders, a tiny inverter and `faces` synthetic faces with masks, under `root`."""
    from adaface.training.method.stage1 import build_tiny_models
    from adaface.training.method.stage2 import tiny_inverter
    from adaface.training.method.synthetic_faces import write_synthetic_faces

    sd, a2f = build_tiny_models(root, seed=0)
    return {"sd": sd, "a2f": a2f, "inv": tiny_inverter(root, str(sd)),
            "data": write_synthetic_faces(root / "faces", faces, seed=0)}


def step_records(out: Path) -> dict[int, dict]:
    """{step: its metrics record} of a run's metrics.jsonl."""
    from adaface.training.engine.metrics_log import read_jsonl

    return {r["step"]: r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "step"}

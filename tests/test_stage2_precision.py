"""Stage 2 with the face-preserving loss on tensor-core precision tracks the exact-fp32 run.

Two tiny runs of training/stage2.py (subprocesses, the Triton kernels through the interpreter), identical but
for `--face-precision`: "ieee" (exact fp32 dots) and "fp16" (operands rounded to fp16, fp32 accumulation — what
a GPU's tensor cores compute; the interpreter's TF32 dot is plain fp32, so fp16 is the precision whose rounding
shows here). Bound: every step's face-preserving loss and total loss within 1e-3 relative of the exact run's
(fp16 operands carry ~5e-4 relative rounding into each dot, averaged over many rows; observed ~4e-5 over three
steps). The runs must also differ somewhere, which proves the option reaches the kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from adaface.testing.training_runs import tiny_stage2_models
from adaface.training.engine.metrics_log import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "stage2.py"
STEPS = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_stage2_models(tmp_path_factory.mktemp("tiny"), faces=4)


def _run(tiny, out: Path, precision: str) -> dict[int, dict]:
    args = [
        "--no-tiny", "--sd-model", str(tiny["sd"]), "--arc2face", str(tiny["a2f"]), "--inverter", str(tiny["inv"]),
        "--data-dir", str(tiny["data"]), "--output-dir", str(out), "--steps", str(STEPS), "--batch-size", "1",
        "--grad-accum", "1", "--stage1-p", "0", "--seed", "3", "--device", "cpu", "--deterministic", "--no-progress",
        "--ops-backend", "triton", "--face-precision", precision,
    ]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    res = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return {r["step"]: r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "step"}


def test_fp16_face_precision_tracks_the_exact_run(tiny, tmp_path):
    exact = _run(tiny, tmp_path / "ieee", "ieee")
    half = _run(tiny, tmp_path / "fp16", "fp16")
    assert sorted(exact) == sorted(half) and len(exact) == STEPS
    diffs = []
    for step in exact:
        for key in ("loss_face_preserve", "loss"):
            a, b = exact[step][key], half[step][key]
            assert abs(a - b) <= 1e-3 * abs(a), f"step {step} {key}: ieee {a} vs fp16 {b}"
            diffs.append(abs(a - b))
    assert max(diffs) > 0, "the fp16 run equals the exact one: --face-precision did not reach the kernels"

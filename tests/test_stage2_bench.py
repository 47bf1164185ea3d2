"""bench/bench_stage2_step.py: skips the full shape without CUDA, and runs the trainer's stage-2 step at a small
shape."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from adaface.testing.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    return load_script(ROOT / "bench" / "bench_stage2_step.py")


def test_bench_small_shape_runs_and_full_shape_skips_without_cuda(capsys):
    bench = _bench()
    if not torch.cuda.is_available():
        assert bench.run([]) is None
        assert "skipped" in capsys.readouterr().out
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = bench.run(["--shape", "small", "--steps", "1", "--warmup", "0", "--batch-size", "1"])
    finally:
        torch.set_num_threads(threads)
    assert res["steps_per_s"] > 0 and res["captured_layers"] == 4 and res["timed_steps"] == 1
    losses = res["last_losses"]
    assert {"loss", "loss_delta_attn_out", "loss_delta_attn_map", "loss_delta_prompt", "loss_face_preserve"} <= set(
        losses) and all(math.isfinite(v) for v in losses.values())

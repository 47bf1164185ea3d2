"""bench/bench_stage1_step.py: skips the full shape without CUDA, and runs the trainer's step at a small shape."""

from __future__ import annotations

from pathlib import Path

import torch

from adaface.testing.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    return load_script(ROOT / "bench" / "bench_stage1_step.py")


def test_bench_small_shape_runs_and_full_shape_skips_without_cuda(capsys):
    bench = _bench()
    if not torch.cuda.is_available():
        assert bench.run([]) is None
        assert "skipped" in capsys.readouterr().out
    res = bench.run(["--shape", "small", "--steps", "1", "--warmup", "0", "--batch-size", "1", "--multipliers", "2"])
    assert res["steps_per_s"] > 0 and res["inverter_multipliers"] == [2, 2, 2, 2]
    assert res["denoise_steps"] == 3 and res["timed_steps"] == 1

"""bench/bench_stage1_step.py and bench/bench_stage2_step.py: each skips the full shape without CUDA, and runs the
shared trainer's step of its stage at a small shape."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from adaface.testing.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def _bench(stage: str):
    return load_script(ROOT / "bench" / f"bench_{stage}_step.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the full shape runs where CUDA is")
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_bench_full_shape_skips_without_cuda(stage, capsys):
    assert _bench(stage).run([]) is None
    assert "skipped" in capsys.readouterr().out


def test_bench_stage1_small_shape_runs():
    res = _bench("stage1").run(["--shape", "small", "--steps", "1", "--warmup", "0", "--batch-size", "1",
                                "--multipliers", "2"])
    assert res["steps_per_s"] > 0 and res["inverter_multipliers"] == [2, 2, 2, 2]
    assert res["denoise_steps"] == 3 and res["timed_steps"] == 1


def test_bench_stage2_small_shape_runs():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = _bench("stage2").run(["--shape", "small", "--steps", "1", "--warmup", "0", "--batch-size", "1"])
    finally:
        torch.set_num_threads(threads)
    assert res["steps_per_s"] > 0 and res["captured_layers"] == 4 and res["timed_steps"] == 1
    losses = res["last_losses"]
    assert {"loss", "loss_delta_attn_out", "loss_delta_attn_map", "loss_delta_prompt", "loss_face_preserve"} <= set(
        losses) and all(math.isfinite(v) for v in losses.values())

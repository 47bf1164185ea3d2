"""`python -m adaface.plot RUN_DIR` on the metrics.jsonl of a real (short) tiny stage-1 run, and on bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adaface import plot

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """The tiny preset, shortened: 6 steps with a forced expansion at step 3."""
    out = tmp_path_factory.mktemp("stage1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(
        [sys.executable, "training/stage1.py", "--output-dir", str(out), "--steps", "6", "--expand-at", "3",
         "--denoise-steps", "1,2", "--denoise-step-weights", "0.5,0.5", "--warmup-steps", "2",
         "--checkpoint-every", "0", "--target-drop", "0", "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adaface.plot", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def _error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as info:
        plot.main(list(args))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m adaface.plot: error: ")
    return err[-1]


def test_plot_of_a_real_tiny_run(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    expansions = [r for r in records if r["event"] == "expansion"]
    assert len(steps) == 6 and [e["step"] for e in expansions] == [3]

    run = plot.read_run(run_dir / "metrics.jsonl")
    assert list(run.series) == ["loss", "loss_mse", "d", "lr"]  # stage 1's loss and its term, Prodigy's d and lr
    xs, ys = run.series["loss"]
    assert xs == [r["step"] for r in steps] and ys == [r["loss"] for r in steps]
    assert run.series["lr"][1] == [r["lr"] for r in steps] and run.series["d"][1] == [r["d"] for r in steps]
    assert [e["step"] for e in run.expansions] == [3] and run.skipped_lines == 0

    res = _cli(str(run_dir))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"wrote {run_dir / 'metrics.png'}: loss, loss_mse, d, lr over 6 steps, 1 expansion(s)"
    from PIL import Image

    with Image.open(run_dir / "metrics.png") as im:
        assert im.format == "PNG" and im.size == (1200, 840)  # 10 x 7 inches at 120 dpi
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 5  # drawn, not blank


def test_every_loss_term_is_drawn(run_dir, tmp_path, capsys):
    """Keys named loss or loss_* are the loss terms, whatever a trainer calls them; --extra-key adds others."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    out = []
    for line in lines:
        rec = json.loads(line)
        if rec["event"] == "step":
            rec.update(loss_delta=rec["step"] * 0.1, loss_id=float("nan") if rec["step"] == 2 else 1.0 / rec["step"],
                       loss_flag=True, lossy=0.5, loss_name="text")
        out.append(json.dumps(rec))
    out.append('{"event": "step", "step": 7, "loss": 0.1')  # a torn last line, as a killed run leaves
    (tmp_path / "metrics.jsonl").write_text("\n".join(out) + "\n")
    run = plot.read_run(tmp_path / "metrics.jsonl", ["grad_norm"])
    assert list(run.series) == ["loss", "loss_delta", "loss_id", "loss_mse", "grad_norm", "d", "lr"]
    assert run.skipped_lines == 1
    assert math.isnan(run.series["loss_id"][1][1])
    png = plot.plot(run, tmp_path / "terms.png", 0.5, ["grad_norm"])
    assert png.stat().st_size > 10_000
    argv = [str(tmp_path / "metrics.jsonl"), "--out", str(tmp_path / "cli.png"), "--extra-key", "grad_norm"]
    assert plot.main(argv) == 0
    assert capsys.readouterr().out.strip().endswith(
        "loss, loss_delta, loss_id, loss_mse, grad_norm, d, lr over 6 steps, 1 expansion(s) "
        "(1 unreadable line(s) skipped)")


def test_smoothing():
    assert plot.smooth([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # bias-corrected: no ramp from 0
    assert plot.smooth([0.0, 1.0], 0.5) == pytest.approx([0.0, 2 / 3])
    s = plot.smooth([1.0, math.inf, 3.0], 0.0)
    assert s[0] == 1.0 and math.isnan(s[1]) and s[2] == 3.0


def test_bad_input_one_line_errors(tmp_path, capsys):
    assert f"RUN_DIR {tmp_path / 'missing'}: folder not found" in _error(capsys, str(tmp_path / "missing"))
    assert "no metrics.jsonl in it" in _error(capsys, str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text("")
    assert "is empty; expected JSON lines" in _error(capsys, str(tmp_path))
    (tmp_path / "metrics.jsonl").write_bytes(b"\x00\xff garbage\nnot json\n[1, 2]\n")
    assert "holds no step records (3 lines" in _error(capsys, str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"event": "step", "step": 1, "mse": 0.5}\n')
    assert "hold no numeric 'loss' or 'loss_*' values" in _error(capsys, str(tmp_path))
    assert "--extra-key grad_norm: no step record" in _error(capsys, str(tmp_path), "--extra-key", "grad_norm")
    assert "--out" in _error(capsys, str(tmp_path), "--out", str(tmp_path / "plot.jpg"))
    assert "--out" in _error(capsys, str(tmp_path), "--out", str(tmp_path / "nowhere" / "plot.png"))
    assert "--smoothing must be in [0, 1)" in _error(capsys, str(tmp_path), "--smoothing", "1")
    assert plot.main([str(tmp_path), "--extra-key", "mse"]) == 0  # mse alone is enough when asked for
    assert (tmp_path / "metrics.png").is_file()


def test_stage2_step_kinds_are_separate_series(tmp_path):
    """A stage-2 log: composition steps (loss + delta terms) with stage-1 steps mixed in (loss_stage1, and their
    own `loss`): `loss` is drawn over the composition steps only, the stage-1 steps as loss_stage1."""
    recs = []
    for step in range(1, 11):
        rec = {"event": "step", "step": step, "d": 1e-5, "lr": min(1.0, step / 5)}
        if step % 4 == 0:
            rec.update(loss=0.002, loss_stage1=0.002, loss_mse=0.002)
        else:
            rec.update(loss=0.9, loss_delta_prompt=0.3, loss_face_preserve=0.03)
        recs.append(json.dumps(rec))
    (tmp_path / "metrics.jsonl").write_text("\n".join(recs) + "\n")
    run = plot.read_run(tmp_path / "metrics.jsonl")
    assert run.series["loss"] == ([1, 2, 3, 5, 6, 7, 9, 10], [0.9] * 8)
    assert run.series["loss_stage1"] == ([4, 8], [0.002, 0.002])
    assert run.labels == {"loss": "loss (composition steps)", "loss_stage1": "loss_stage1 (stage-1 steps)"}
    png = plot.plot(run, tmp_path / "metrics.png")
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (1200, 840)


def test_a_run_of_one_step_kind_is_not_split(run_dir):
    assert plot.read_run(run_dir / "metrics.jsonl").labels == {}

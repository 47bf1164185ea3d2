"""bench/memory_estimate.py: the row arithmetic, the largest-batch search, one real full-size row, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaface.testing.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


me = load_script(ROOT / "bench" / "memory_estimate.py")


def _affine(calls: list[int], fixed: float = 6.0, per_sample: float = 0.37):
    def estimate(batch: int, **kw) -> me.Row:
        calls.append(batch)
        return me.Row("stage1", batch, 512, "bf16", kw["checkpointing"], fixed + per_sample * batch, fixed, 0.0,
                      per_sample * batch, 0.0, 1, 0.0)
    return estimate


@pytest.mark.parametrize("budget", [6.5, 24.0, 48.0])
def test_largest_batch_is_the_last_one_that_fits(budget):
    calls: list[int] = []
    est = _affine(calls)
    measured = [est(1, checkpointing=True), est(4, checkpointing=True)]
    best, new = me.largest_batch(est, budget, measured, checkpointing=True)
    want = int((budget - 6.0) / 0.37 + 1e-9)
    assert best == want
    assert {r.batch for r in new} <= {want, want + 1} and len(calls) <= 4


def test_largest_batch_none_when_nothing_fits():
    calls: list[int] = []
    est = _affine(calls, fixed=30.0)
    best, _ = me.largest_batch(est, 24.0, [est(1, checkpointing=True), est(2, checkpointing=True)],
                               checkpointing=True)
    assert best is None


def test_full_size_stage1_row(tmp_path):
    out = tmp_path / "rows.json"
    assert me.main(["--stage", "stage1", "--batch", "1", "--checkpointing", "on", "--no-search",
                    "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["stage"] == "stage1" and row["batch"] == 1 and row["resolution"] == 512 and row["checkpointing"]
    parts = row["weights_gib"] + row["optimizer_gib"] + row["activations_gib"] + row["gradients_gib"]
    assert row["peak_gib"] == pytest.approx(parts)
    # two SD-1.5-sized UNets in bf16 (859.5M parameters each) are most of the weights
    assert 2 * 859.5e6 * 2 / 2**30 < row["weights_gib"] < 6.0
    # Prodigy: exp_avg, exp_avg_sq, s and p0 of the fp32 trainable inverter = 4x its gradients
    assert row["optimizer_gib"] == pytest.approx(4 * row["gradients_gib"])
    assert 0 < row["activations_gib"] < 4.0


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "batch sizes must be from 1 to"),
    (["--batch", "two"], "expected comma-separated batch sizes"),
    (["--resolution", "500"], "--resolution must be a multiple of 64"),
    (["--slice-p", "0"], "--slice-p must be >= 1"),
])
def test_bad_arguments_get_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        rc = me.main(argv)
        raise SystemExit(rc)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


def test_full_size_stage2_row(tmp_path):
    """The composition step at full size on meta: the fused losses reach their fakes, nothing reads a value."""
    out = tmp_path / "rows.json"
    assert me.main(["--stage", "stage2", "--batch", "1", "--checkpointing", "on", "--no-search",
                    "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["stage"] == "stage2" and row["batch"] == 1
    # stage 2 adds the VAE to stage 1's models; its activations hold two UNet passes with gradient
    assert row["weights_gib"] > 2 * 859.5e6 * 2 / 2**30 and 0 < row["activations_gib"] < 6.0

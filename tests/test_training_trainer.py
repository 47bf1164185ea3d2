"""The shared trainer (adaface.training.trainer) with a toy stage: the stage API (graph-carrying loss, terms,
extra state, no expansion), checkpoints and exact resume, in process and in a fraction of a second per run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from adaface.training.config import TrainingConfig
from adaface.training.metrics_log import read_jsonl
from adaface.training.trainer import MicroStep, RunContext, run_training


class ToyStage:
    """Linear regression: y = x @ w_true; the loss carries a graph, so the trainer back-propagates it."""

    name = "toy"
    checkpoint_name = "model"
    plateau_metric = "loss"

    def __init__(self, ctx: RunContext) -> None:
        torch.manual_seed(0)
        self.trainable = torch.nn.Linear(4, 1)
        self.w_true = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
        self.draws = 0  # extra state that must survive a resume

    def micro_loss(self, ms: MicroStep) -> tuple[torch.Tensor, dict[str, Any]]:
        x = torch.randn(8, 4, generator=ms.generator)
        with ms.autocast():
            pred = ms.model(x)
        self.draws += 1
        loss = torch.nn.functional.mse_loss(pred, x @ self.w_true.T)
        return loss, {"loss_half": loss.detach() / 2, "loss_parts": [loss.detach()], "samples": 8}

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.draws = int(state["draws"])

    def save_final(self, output_dir: Path) -> Path:
        from safetensors.torch import save_file

        path = output_dir / "final.safetensors"
        save_file({k: v.contiguous() for k, v in self.trainable.state_dict().items()}, str(path))
        return path


def toy_config(out: Path, **kw: Any) -> TrainingConfig:
    values = dict(steps=6, batch_size=8, grad_accum=2, d0=1e-2, warmup_steps=0, expansions="", device="cpu",
                  progress=False, output_dir=str(out), checkpoint_every=2, keep_checkpoints=3, deterministic=True)
    values.update(kw)
    return TrainingConfig(**values)


def steps_of(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "step"}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    result = run_training(toy_config(out), ToyStage)
    return out, result


def test_stage_api_losses_terms_and_state(toy_run):
    out, result = toy_run
    steps = steps_of(out)
    assert sorted(steps) == list(range(1, 7))
    rec = steps[1]
    assert rec["loss_half"] == pytest.approx(rec["loss"] / 2)  # a loss term: mean over the micro-batches
    assert len(rec["loss_parts"]) == 2 and rec["samples"] == 16  # lists per micro-batch, counters summed
    assert rec["loss"] == pytest.approx(sum(p[0] for p in rec["loss_parts"]) / 2)
    assert steps[6]["loss"] < steps[1]["loss"]  # it trains
    assert rec["multipliers"] is None and not rec["skipped"]
    state = json.loads((out / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["stage"] == {"draws": 12}
    assert (out / "final.safetensors").is_file() and result.summary["expansions"] == []


def test_resume_reproduces_the_uninterrupted_run(toy_run, tmp_path):
    ref, _ = toy_run
    out = tmp_path / "part"
    run_training(toy_config(out, steps=4), ToyStage)
    result = run_training(toy_config(out, steps=6, resume="latest"), ToyStage)
    got, want = steps_of(out), steps_of(ref)
    assert sorted(got) == sorted(want)
    for s in want:
        assert got[s]["loss"] == want[s]["loss"], s
    from safetensors.torch import load_file

    a, b = load_file(str(ref / "final.safetensors")), load_file(str(out / "final.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert result.summary["steps"] == 6

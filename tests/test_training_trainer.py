"""The shared trainer (adaface.training.engine.trainer) with a toy stage: the stage API (graph-carrying loss, terms,
extra state, no expansion), checkpoints and exact resume, in process and in a fraction of a second per run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from adaface.training.engine.config import TrainingConfig
from adaface.training.engine.metrics_log import read_jsonl
from adaface.training.engine.trainer import MicroStep, RunContext, run_training


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


# ---- faults, injected with adaface.training.engine.faults through the trainer's hook -------------------------------


@pytest.fixture()
def faults(monkeypatch):
    def install(spec: str) -> None:
        monkeypatch.setenv("ADAFACE_TRAINING_HOOK", "adaface.training.engine.faults:install")
        monkeypatch.setenv("ADAFACE_FAULTS", spec)
    return install


def _all_tensors_finite(folder: Path) -> bool:
    from safetensors.torch import load_file

    files = list(folder.rglob("*.safetensors"))
    assert files
    return all(bool(torch.isfinite(t.float()).all()) for f in files for t in load_file(str(f)).values())


def test_nonfinite_steps_are_skipped_counted_and_never_saved(tmp_path, faults, capsys):
    faults("nan_loss@3,inf_grad@5")
    out = tmp_path / "nan"
    result = run_training(toy_config(out), ToyStage)
    steps = steps_of(out)
    assert [s for s in steps if steps[s]["skipped"]] == [3, 5]
    assert steps[3]["loss"] is None and steps[5]["grad_norm"] is None  # non-finite values are logged as null
    assert steps[6]["skipped_steps"] == 2 and result.summary["skipped_steps"] == 2
    assert "step 3: non-finite loss or gradient" in capsys.readouterr().out
    assert _all_tensors_finite(out)  # every checkpoint and the final weights
    state = json.loads((out / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert len(state["plateau"]["losses"]) == 4  # the skipped steps never reached the plateau detector
    text = (out / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path, faults):
    from adaface.training.engine.trainer import TrainingError

    faults("nan_loss@2-6")
    out = tmp_path / "stop"
    with pytest.raises(TrainingError, match="3 consecutive steps had a non-finite loss"):
        run_training(toy_config(out, max_nonfinite_steps=3), ToyStage)
    assert max(steps_of(out)) == 4
    assert _all_tensors_finite(out / "checkpoints")


def test_sigint_saves_at_the_interrupted_step_and_resume_matches(toy_run, tmp_path, faults, monkeypatch):
    from adaface.training.engine.trainer import Interrupted

    ref, _ = toy_run
    faults("sigint@3")
    out = tmp_path / "int"
    with pytest.raises(Interrupted) as exc:
        run_training(toy_config(out), ToyStage)
    assert exc.value.signal_name == "SIGINT" and exc.value.step == 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    assert [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "interrupted"][0]["step"] == 3
    monkeypatch.delenv("ADAFACE_FAULTS")
    run_training(toy_config(out, resume="latest"), ToyStage)
    got, want = steps_of(out), steps_of(ref)
    assert sorted(got) == sorted(want) and all(got[s]["loss"] == want[s]["loss"] for s in want)


def test_second_sigint_aborts_at_once():
    import os
    import signal

    from adaface.training.engine.signals import StopSignals

    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"


def _damage(folder: Path, how: str) -> str:
    if how == "truncated":
        f = folder / "model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
        return str(f)
    if how == "bad_json":
        (folder / "state.json").write_text('{"step": 6, "multi')
        return str(folder / "state.json")
    (folder / "optimizer.safetensors").unlink()
    return "optimizer.safetensors"


@pytest.mark.parametrize("how", ["truncated", "bad_json", "missing_file"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(toy_run, tmp_path, how, capsys):
    ref, _ = toy_run
    out = tmp_path / how
    shutil.copytree(ref, out)
    named = _damage(out / "checkpoints" / "step-00000006", how)
    run_training(toy_config(out, steps=7, resume="latest"), ToyStage)
    text = capsys.readouterr().out
    assert "damaged" in text and named in text and "using" in text and "step-00000004" in text
    got, want = steps_of(out), steps_of(ref)
    assert [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "start"][-1]["step"] == 4
    assert got[5]["loss"] == want[5]["loss"] and got[6]["loss"] == want[6]["loss"]
    assert 7 in got


def test_resume_refuses_changed_config_and_fewer_steps(toy_run, tmp_path):
    from adaface.training.engine.config import ConfigError

    ref, _ = toy_run
    out = tmp_path / "cfg"
    shutil.copytree(ref, out)
    with pytest.raises(ConfigError, match=r"grad_accum: 2 -> 1.*only .*checkpoint_every"):
        run_training(toy_config(out, steps=8, grad_accum=1, resume="latest"), ToyStage)
    with pytest.raises(ConfigError, match=r"--steps: .* is at step 6 already"):
        run_training(toy_config(out, steps=4, resume="latest"), ToyStage)
    # allowed changes: steps, checkpoint cadence, rotation
    run_training(toy_config(out, steps=7, checkpoint_every=5, keep_checkpoints=1, resume="latest"), ToyStage)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000007"]


def test_resume_path_is_validated(toy_run, tmp_path):
    from adaface.training.engine.config import ConfigError

    ref, _ = toy_run
    (tmp_path / "not_a_ckpt").mkdir()
    with pytest.raises(ConfigError, match="not_a_ckpt is not a checkpoint folder"):
        run_training(toy_config(tmp_path / "a", resume=str(tmp_path / "not_a_ckpt")), ToyStage)

    class WiderToy(ToyStage):
        def __init__(self, ctx):
            super().__init__(ctx)
            self.trainable = torch.nn.Linear(5, 1)

    with pytest.raises(ConfigError, match="does not fit this model"):
        run_training(toy_config(tmp_path / "b", steps=8, resume=str(ref / "checkpoints" / "step-00000006")),
                     WiderToy)


def test_a_non_finite_checkpoint_is_never_written(tmp_path):
    from adaface.training.engine.ddp import DistInfo
    from adaface.training.engine.metrics_log import MetricsLog
    from adaface.training.engine.trainer import Trainer, TrainingError

    stage = ToyStage(None)
    trainer = Trainer(toy_config(tmp_path), stage, torch.device("cpu"), DistInfo(),
                      MetricsLog(tmp_path / "m.jsonl", enabled=False))
    with torch.no_grad():
        stage.trainable.weight[0, 1] = float("inf")
    with pytest.raises(TrainingError, match="non-finite values in model/weight"):
        trainer.save()
    assert not (tmp_path / "checkpoints").exists()


def _flip_a_tensor_byte(path: Path) -> None:
    """Flip one byte inside the tensor data (past the safetensors header): the header still parses."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + (len(data) - header) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_inside_a_tensor_is_damage_skipped_by_name(toy_run, tmp_path, capsys):
    ref, _ = toy_run
    out = tmp_path / "flip"
    shutil.copytree(ref, out)
    newest = out / "checkpoints" / "step-00000006"
    _flip_a_tensor_byte(newest / "model.safetensors")
    run_training(toy_config(out, steps=7, resume="latest"), ToyStage)
    text = capsys.readouterr().out
    assert f"{newest / 'model.safetensors'} is damaged: its SHA-256 does not match" in text
    assert "using" in text and "step-00000004" in text
    assert [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "start"][-1]["step"] == 4
    got, want = steps_of(out), steps_of(ref)
    assert got[5]["loss"] == want[5]["loss"] and got[6]["loss"] == want[6]["loss"]


def test_rotation_after_resuming_past_a_damaged_checkpoint_keeps_the_intact_ones(toy_run, tmp_path, capsys):
    from adaface.training.engine import checkpoint as ckpt

    ref, _ = toy_run
    out = tmp_path / "rot"
    shutil.copytree(ref, out)  # checkpoints 2, 4, 6
    damaged = out / "checkpoints" / "step-00000006"
    (damaged / "state.json").write_text('{"step": 6, "multi')
    # resumes from 4, saves 5 (a stop at step 5 would save there too) and keeps 2 checkpoints
    run_training(toy_config(out, steps=5, keep_checkpoints=2, resume="latest"), ToyStage)
    text = capsys.readouterr().out
    aside = out / "checkpoints" / "step-00000006.damaged"
    assert f"set aside as {aside}" in text
    kept = ckpt.list_checkpoints(out / "checkpoints")
    assert [p.name for p in kept] == ["step-00000004", "step-00000005"]
    for p in kept:
        ckpt.load_checkpoint(p)  # every kept checkpoint is intact
    assert aside.is_dir()
    # and the next resume starts from the newest intact one, not from the damaged copy
    run_training(toy_config(out, steps=6, keep_checkpoints=2, resume="latest"), ToyStage)
    assert [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "start"][-1]["step"] == 5
    assert steps_of(out)[6]["loss"] == steps_of(ref)[6]["loss"]


def test_rotation_never_deletes_the_checkpoint_just_written_for_a_later_one(toy_run, tmp_path):
    from adaface.training.engine import checkpoint as ckpt

    ref, _ = toy_run
    out = tmp_path / "older"
    shutil.copytree(ref, out)
    # resume from step 2 while 4 and 6 exist; with one kept, the new step 3 must survive
    run_training(toy_config(out, steps=3, keep_checkpoints=1, resume=str(out / "checkpoints" / "step-00000002")),
                 ToyStage)
    assert "step-00000003" in [p.name for p in ckpt.list_checkpoints(out / "checkpoints")]


def test_resume_at_the_final_step_finishes_the_run(toy_run, tmp_path, capsys):
    ref, _ = toy_run
    out = tmp_path / "final"
    shutil.copytree(ref, out)
    (out / "final.safetensors").unlink()
    run_training(toy_config(out, resume="latest"), ToyStage)
    assert "is at the final step 6: finishing the run" in capsys.readouterr().out
    assert (out / "final.safetensors").read_bytes() == (ref / "final.safetensors").read_bytes()
    assert steps_of(out) == steps_of(ref)
    assert [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "summary"][-1]["steps"] == 6


_UNREADABLE_CHILD = """
import json, sys
from pathlib import Path
from adaface.training.engine.config import TrainingConfig
from adaface.training.engine.ddp import DistInfo
from adaface.training.engine.trainer import find_resume_point
out = Path(sys.argv[1])
saved = json.loads((out / "checkpoints" / "step-00000004" / "state.json").read_text())["config"]
cfg = TrainingConfig(**{**saved, "resume": "latest", "steps": 7})
path, tensors, state = find_resume_point(cfg, out, DistInfo())
print("RESUMED", path)
"""


def test_an_unreadable_newest_checkpoint_is_skipped_and_set_aside(toy_run, tmp_path):
    import os
    import subprocess
    import sys
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("needs root to run the check as another user (as root, permissions do not apply)")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed: cannot drop privileges for the check")
    ref, _ = toy_run
    base = Path(tempfile.mkdtemp(prefix="adaface-perm-"))
    try:
        out = base / "run"
        shutil.copytree(ref, out)
        for p in [base, *base.rglob("*")]:
            os.chown(p, 65534, 65534)  # nobody
        os.chmod(base, 0o755)
        os.chmod(out / "checkpoints" / "step-00000006", 0o000)
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": root, "HOME": str(base)}
        res = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable,
                              "-c", _UNREADABLE_CHILD, str(out)], env=env, cwd=root, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "step-00000006 is unreadable (permission denied)" in res.stdout
        assert f"RESUMED {out / 'checkpoints' / 'step-00000004'}" in res.stdout
        assert (out / "checkpoints" / "step-00000006.damaged").is_dir()
    finally:
        shutil.rmtree(base, ignore_errors=True)

"""training/stage1.py end to end on tiny models: a short run (forced + plateau expansions, checkpoints, JSONL,
final inverter), exact resume after SIGKILL (injected by adaface.training.engine.faults), and 2-process DDP on the CPU
with gloo.

Each run is a subprocess on tiny models saved to disk once (loaded through the real --sd-model/--arc2face
paths), single-threaded so that runs are bit-for-bit reproducible.
Executed as a script (under torchrun) this file is the DDP worker: it trains, then writes its rank's weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "stage1.py"
TINY = str(ROOT / "training" / "configs" / "tiny.json")


def _ddp_worker(argv: list[str]) -> None:
    from adaface.testing.training_runs import save_rank_weights
    from adaface.training.engine.config import parse_config
    from adaface.training.method import stage1

    cfg = parse_config(argv, default_config=TINY, world_size=int(os.environ["WORLD_SIZE"]))
    save_rank_weights(stage1.run(cfg).trainable, cfg.output_dir)


if __name__ == "__main__":
    _ddp_worker(sys.argv[1:])
    sys.exit(0)

import pytest  # noqa: E402
import torch  # noqa: E402

from adaface.testing import training_runs as runs  # noqa: E402
from adaface.testing.training_runs import FAULT_HOOK as HOOK  # noqa: E402
from adaface.testing.training_runs import script_env as _env  # noqa: E402
from adaface.testing.training_runs import step_records as _steps  # noqa: E402
from adaface.training.engine.metrics_log import read_jsonl  # noqa: E402

STEPS = 14


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from adaface.training.method.stage1 import build_tiny_models

    sd, a2f = build_tiny_models(tmp_path_factory.mktemp("tiny_models"), seed=0)
    return sd, a2f


def _args(tiny_dirs, out: Path, steps: int = STEPS) -> list[str]:
    sd, a2f = tiny_dirs
    return [
        "--no-tiny", "--sd-model", str(sd), "--arc2face", str(a2f), "--output-dir", str(out),
        "--steps", str(steps), "--batch-size", "1", "--grad-accum", "2",
        "--denoise-steps", "1,2", "--denoise-step-weights", "0.5,0.5",
        "--warmup-steps", "2", "--d0", "1e-4",
        "--expansions", "2:all,2:0-1", "--expand-at", "4",
        "--plateau-window", "2", "--plateau-patience", "2", "--plateau-tolerance", "0.9",
        "--checkpoint-every", "3", "--keep-checkpoints", "2",
        "--device", "cpu", "--deterministic", "--no-progress",
    ]


@pytest.fixture(scope="module")
def reference_run(tiny_dirs, tmp_path_factory):
    return runs.uninterrupted_run(tmp_path_factory, SCRIPT, lambda out: _args(tiny_dirs, out), STEPS)


def test_short_run_outputs(reference_run):
    from adaface.models.prompt_inverter import PromptInverter

    out, stdout, steps = reference_run
    rec = steps[1]
    for key in ("loss", "loss_mse", "loss_steps", "lr", "d", "d_lr", "grad_norm", "samples_per_s", "multipliers"):
        assert key in rec, key
    assert len(rec["loss_steps"]) == 2  # one list of per-denoising-step losses per micro-batch
    events = read_jsonl(out / "metrics.jsonl")
    expansions = [r for r in events if r["event"] == "expansion"]
    assert expansions[0]["step"] == 4 and expansions[0]["reason"] == "forced"
    assert expansions[0]["multipliers"] == [2, 2, 2, 2]
    # the aggressive plateau settings fire the second stage on their own
    assert len(expansions) == 2 and expansions[1]["reason"] == "plateau"
    assert expansions[1]["multipliers"] == [4, 4, 2, 2]
    assert steps[STEPS]["multipliers"] == [4, 4, 2, 2]
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == [f"step-{STEPS - 2:08d}", f"step-{STEPS:08d}"]  # 12 and the final 14: keep 2
    state = json.loads((out / "checkpoints" / f"step-{STEPS:08d}" / "state.json").read_text())
    assert state["step"] == STEPS and state["multipliers"] == [4, 4, 2, 2] and "rng" in state
    inv = PromptInverter.from_pretrained(out / "inverter")
    assert inv.multipliers == [4, 4, 2, 2]
    summary = [r for r in events if r["event"] == "summary"][-1]
    assert summary["expansions"] == [4, expansions[1]["step"]]
    assert "[stage1] done:" in stdout and "last 10%" in stdout


def test_resume_after_sigkill_reproduces_losses(reference_run, tiny_dirs, tmp_path):
    ref_out, _, want = reference_run
    out = tmp_path / "killed"
    args = _args(tiny_dirs, out)
    # Deterministic kill: the fault hook SIGKILLs the trainer once step KILL_AT was logged. KILL_AT = 7 is past
    # the forced expansion at step 4 and the checkpoint at step 6, so step 7 was logged but never saved: the
    # resumed run must redo it from the step-6 checkpoint.
    kill_at = 7
    runs.run_killed_at(SCRIPT, args, out, kill_at)
    saved = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
    assert saved == ["step-00000003", "step-00000006"]  # step 7 is unsaved progress

    runs.run_script(SCRIPT, [*args, "--resume"])
    resumed = read_jsonl(out / "metrics.jsonl")
    assert any(r["event"] == "start" and r["resumed_from"] for r in resumed)
    got = _steps(out)
    assert sorted(got) == sorted(want)
    for s in sorted(want):
        for key in ("loss", "loss_mse", "loss_steps", "d", "lr", "multipliers"):
            assert got[s][key] == want[s][key], (s, key)
    runs.assert_same_final_weights(ref_out, out)


def test_random_ids_start_at_t_max_minus_one_real_faces_keep_t1(tiny_dirs, tmp_path, monkeypatch):
    """In stage1_loss (via Trainer.micro_step), a sample without an image (random ID, pure noise) takes its first
    denoising step at t_max - 1, while a real-image sample keeps its drawn t_1; spied on the teacher callable's t."""
    from diffusers import AutoencoderKL

    from adaface.training.engine.config import parse_config
    from adaface.training.engine.data import FaceBatch
    from adaface.training.engine.ddp import DistInfo, rank_seed
    from adaface.training.engine.metrics_log import MetricsLog
    from adaface.training.engine.trainer import Trainer
    from adaface.training.method import stage1
    from adaface.training.method.distill import sample_num_steps, sample_timesteps

    sd, _ = tiny_dirs
    cfg = parse_config(_args(tiny_dirs, tmp_path / "out") + ["--batch-size", "4", "--denoise-steps", "2,3",
                                                                     "--t-min", "100", "--t-max", "900"],
                       default_config=TINY)
    models = stage1.load_models(cfg, str(sd), str(tiny_dirs[1]), torch.device("cpu"), torch.float32)
    models.vae = AutoencoderKL.from_pretrained(str(sd), subfolder="vae").eval().requires_grad_(False)
    is_real = torch.tensor([True, False, True, False])

    class Source:  # two real faces, two random IDs; consumes no randomness, so the draws can be replayed
        def sample(self, batch, generator):
            images = torch.zeros(int(is_real.sum()), 3, cfg.resolution, cfg.resolution)
            return FaceBatch(arcface=torch.nn.functional.normalize(torch.randn(batch, 512), dim=-1),
                             is_real=is_real, images=images)

        def state_dict(self):
            return {}

    trainer = Trainer(cfg, stage1.Stage1(cfg, models, Source()), torch.device("cpu"), DistInfo(0, 1),
                      MetricsLog(tmp_path / "m.jsonl", enabled=False))
    seen = []
    unet = models.teacher.unet
    real_forward = unet.forward

    def spy(xt, t, *a, **k):
        seen.append(t.clone())
        return real_forward(xt, t, *a, **k)

    monkeypatch.setattr(unet, "forward", spy)
    for micro in range(2):
        seen.clear()
        trainer.micro_step(micro)
        g = torch.Generator().manual_seed(rank_seed(cfg.seed, 0, 0, micro))
        drawn = sample_timesteps(sample_num_steps(cfg.denoise_steps, cfg.denoise_step_weights, g), 4,
                                 cfg.t_min, cfg.t_max, g)
        assert len(seen) == drawn.shape[0]
        first = seen[0]
        assert first[~is_real].tolist() == [cfg.t_max - 1] * 2
        assert first[is_real].tolist() == drawn[0, is_real].tolist()
        assert all(v < cfg.t_max - 1 for v in drawn[0, is_real].tolist())  # the draw did not hit t_max - 1
        for i in range(1, len(seen)):  # later steps stay as drawn, for every sample
            assert seen[i].tolist() == drawn[i].tolist()


def test_ddp_two_processes_keep_parameters_identical(tiny_dirs, tmp_path):
    out = tmp_path / "ddp"
    args = _args(tiny_dirs, out, steps=5) + ["--expansions", "2:all", "--plateau-patience", "1000"]
    runs.run_ddp(Path(__file__).resolve(), args)
    from safetensors.torch import load_file

    r0 = load_file(str(out / "rank0.safetensors"))
    r1 = load_file(str(out / "rank1.safetensors"))
    ref = load_file(str(out / "inverter" / "model.safetensors"))
    assert r0.keys() == r1.keys() == ref.keys()
    assert any("extra_weight" in k for k in r0)  # the forced expansion happened on both ranks
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
        assert torch.equal(r0[k], ref[k]), k
    records = read_jsonl(out / "metrics.jsonl")
    start = [r for r in records if r["event"] == "start"][0]
    assert start["world_size"] == 2
    summary = [r for r in records if r["event"] == "summary"][-1]
    assert summary["ranks_max_param_diff"] == 0.0
    # the weights moved: training happened, not just a broadcast of the initial weights
    init = load_file(str(Path(str(tiny_dirs[0])) / "text_encoder" / "model.safetensors"))
    key = "text_encoder.encoder.layers.0.self_attn.q_proj.weight"
    init_key = [k for k in init if k.endswith("encoder.layers.0.self_attn.q_proj.weight")][0]
    assert not torch.equal(r0[key], init[init_key])


def test_sigint_saves_then_resume_matches_the_uninterrupted_run(reference_run, tiny_dirs, tmp_path):
    """SIGINT (sent by the fault hook once step 5 was logged): the script finishes that step, saves checkpoint 5,
    exits 130 with a message; --resume continues from it and every loss and the final inverter match."""
    ref_out, _, want = reference_run
    out = tmp_path / "interrupted"
    args = _args(tiny_dirs, out)
    env = {**_env(), **HOOK, "ADAFACE_FAULTS": "sigint@5"}
    res = runs.run_script(SCRIPT, args, env=env, check=False)
    assert res.returncode == 130, res.stderr[-3000:]
    assert "stopped by SIGINT after step 5" in res.stderr and "Traceback" not in res.stderr
    saved = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
    assert saved == ["step-00000003", "step-00000005"]
    # the message names the exact command that continues the run: run it as printed
    import shlex

    command = shlex.split(res.stderr.strip().splitlines()[-1].split("continue with --resume: ", 1)[1])
    assert command == ["python", str(SCRIPT), *args, "--resume"]
    runs.run_script(command[1], command[2:])
    got = _steps(out)
    assert sorted(got) == sorted(want)
    for s in want:
        assert got[s]["loss"] == want[s]["loss"] and got[s]["loss_steps"] == want[s]["loss_steps"], s
    runs.assert_same_final_weights(ref_out, out)


def test_ddp_sigterm_on_one_rank_stops_both_with_one_checkpoint(tiny_dirs, tmp_path):
    """2-process gloo DDP; the fault hook sends SIGTERM to rank 1 only, once step 2 was logged: the ranks agree,
    both stop after step 2, rank 0 writes the one checkpoint (step 2), and both exit with a message."""
    out = tmp_path / "ddp_term"
    args = _args(tiny_dirs, out, steps=5) + ["--expansions", "", "--plateau-patience", "1000"]
    res = runs.run_ddp(SCRIPT, args, env={**_env(), **HOOK, "ADAFACE_FAULTS": "sigterm@2:r1"}, check=False)
    text = res.stdout + res.stderr
    assert res.returncode != 0
    assert "stage1: stopped by SIGTERM after step 2" in text  # rank 1
    assert "stage1: stopped by a signal on another rank after step 2" in text  # rank 0
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved == ["step-00000002"]
    state = json.loads((out / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["step"] == 2
    records = read_jsonl(out / "metrics.jsonl")
    assert max(r["step"] for r in records if r["event"] == "step") == 2
    assert [r["step"] for r in records if r["event"] == "interrupted"] == [2]

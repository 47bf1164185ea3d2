"""Both training scripts stopped at their very end, or by a full disk, as a user meets it (a subprocess from the
repository root): a kill -9 after the final checkpoint and before inverter/, a SIGTERM in the last step, an
ENOSPC while a checkpoint is written. Every such run completes with `--resume` (same --steps), and its inverter
equals an uninterrupted run's bit for bit. Faults are aimed with adaface.training.engine.faults; runs are tiny,
single-threaded and deterministic.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from adaface.testing.training_runs import FAULT_HOOK as HOOK
from adaface.testing.training_runs import script_env as _env
from adaface.testing.training_runs import tiny_stage2_models

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_stage2_models(tmp_path_factory.mktemp("tiny"), faces=4)


def _args(stage: str, tiny, out: Path, every: int = 2) -> list[str]:
    common = ["--no-tiny", "--sd-model", str(tiny["sd"]), "--arc2face", str(tiny["a2f"]), "--output-dir", str(out),
              "--steps", str(STEPS), "--batch-size", "1", "--grad-accum", "1", "--checkpoint-every", str(every),
              "--keep-checkpoints", "2", "--device", "cpu", "--deterministic", "--no-progress"]
    if stage == "stage1":
        return [str(ROOT / "training" / "stage1.py"), *common, "--denoise-steps", "1,2",
                "--denoise-step-weights", "0.5,0.5", "--warmup-steps", "1", "--expansions", "2:all", "--expand-at", "2"]
    return [str(ROOT / "training" / "stage2.py"), *common, "--inverter", str(tiny["inv"]), "--data-dir",
            str(tiny["data"]), "--stage1-p", "0.5", "--seed", "2"]


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """An uninterrupted run of each stage."""
    outs = {}
    for stage in ("stage1", "stage2"):
        out = tmp_path_factory.mktemp(f"ref-{stage}")
        res = _run(_args(stage, tiny, out), _env())
        assert res.returncode == 0, res.stderr[-4000:]
        outs[stage] = out
    return outs


def _assert_same_inverter(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "config.json"):
        assert (a / "inverter" / name).read_bytes() == (b / "inverter" / name).read_bytes(), name


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_kill_after_the_final_checkpoint_then_resume_finishes(stage, tiny, reference, tmp_path):
    out = tmp_path / "run"
    argv = _args(stage, tiny, out)
    res = _run(argv, _env(**HOOK, ADAFACE_FAULTS=f"sigkill_saved@{STEPS}"))
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert (out / "checkpoints" / f"step-{STEPS:08d}" / "state.json").is_file()
    assert not (out / "inverter").exists()

    res = _run([*argv, "--resume"], _env())
    assert res.returncode == 0, res.stderr[-4000:]
    assert "is at the final step" in res.stdout and "finishing the run" in res.stdout
    _assert_same_inverter(out, reference[stage])
    if stage == "stage2":
        assert (out / "summary.json").read_text() == (reference[stage] / "summary.json").read_text()


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_sigterm_in_the_last_step_writes_the_inverter(stage, tiny, reference, tmp_path):
    out = tmp_path / "run"
    argv = _args(stage, tiny, out)
    res = _run(argv, _env(**HOOK, ADAFACE_FAULTS=f"sigterm@{STEPS}"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "SIGTERM during the last step" in res.stdout
    _assert_same_inverter(out, reference[stage])
    # and a --resume of the finished run (what the old message asked for) finishes it again, the same
    res = _run([*argv, "--resume"], _env())
    assert res.returncode == 0, res.stderr[-4000:]
    _assert_same_inverter(out, reference[stage])


@pytest.mark.parametrize("fail_at", [2, STEPS])
def test_full_disk_while_checkpointing_is_one_line_and_resume_completes(fail_at, tiny, reference, tmp_path):
    out = tmp_path / "run"
    argv = _args("stage1", tiny, out, every=1)
    res = _run(argv, _env(**HOOK, ADAFACE_FAULTS=f"enospc@{fail_at}"))
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.stderr
    assert last.startswith("stage1: error: No space left on device (") and ".safetensors)" in last, last
    assert "--resume" in last
    # the earlier checkpoint is intact, and nothing partial is left
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert left == [f"step-{s:08d}" for s in range(max(1, fail_at - 2), fail_at)], left
    from adaface.training.engine.checkpoint import load_checkpoint

    load_checkpoint(out / "checkpoints" / left[-1])
    assert not (out / "inverter").exists()

    res = _run([*argv, "--resume"], _env())
    assert res.returncode == 0, res.stderr[-4000:]
    _assert_same_inverter(out, reference["stage1"])


# ---- data loss (issue: never delete what a run did not write) -----------------------------------------------


@pytest.mark.parametrize("value", ["", "."])
def test_output_dir_empty_or_current_folder_is_refused(value, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "checkpoints").mkdir()
    (cwd / "checkpoints" / "notes.txt").write_text("another run")
    res = subprocess.run([sys.executable, str(ROOT / "training" / "stage1.py"), "--output-dir", value,
                          "--steps", "1", "--no-progress"], env=_env(), cwd=cwd, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.stderr and "--output-dir" in last, last
    assert sorted(p.name for p in cwd.rglob("*")) == ["checkpoints", "notes.txt"]


def test_overwrite_deletes_only_this_trainers_checkpoints(tiny, reference, tmp_path):
    import json
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference["stage1"] / "checkpoints", out / "checkpoints")
    # an earlier run's checkpoint that the new run does not write again (it stops at step 3)
    old = out / "checkpoints" / "step-00000007"
    shutil.copytree(out / "checkpoints" / f"step-{STEPS:08d}", old)
    state = json.loads((old / "state.json").read_text())
    (old / "state.json").write_text(json.dumps({**state, "step": 7}))
    foreign = {"notes.txt": "mine", "other-run/model.pt": "weights", "step-00000099/model.bin": "not ours"}
    for rel, text in foreign.items():
        (out / "checkpoints" / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / "checkpoints" / rel).write_text(text)
    res = _run([*_args("stage1", tiny, out), "--overwrite"], _env())
    assert res.returncode == 0, res.stderr[-4000:]
    for rel, text in foreign.items():
        assert (out / "checkpoints" / rel).read_text() == text, rel
    assert not old.exists()  # the earlier run's checkpoints are replaced
    _assert_same_inverter(out, reference["stage1"])


# ---- a start that fails on its first step leaves nothing behind ----------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("stage,extra", [
    ("stage1", ["--resolution", "1"]),  # a 0x0 latent: too small for the tiny UNet's down blocks
    ("stage1", ["--expansions", "2:0-9"]),  # layers beyond the inverter's 4
    ("stage2", ["--resolution", "1"]),
    ("stage2", ["--ops-backend", "cuda"]),
], ids=["stage1-resolution", "stage1-expansion-layers", "stage2-resolution", "stage2-ops-backend-cuda"])
def test_a_tiny_run_failing_on_its_first_step_leaves_nothing(stage, extra, tmp_path):
    import torch

    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("--ops-backend cuda works on this machine")
    parent = tmp_path / "runs"
    parent.mkdir()
    (parent / "keep.txt").write_text("unrelated")
    before = _snapshot(parent)
    out = parent / "run"
    res = _run([str(ROOT / "training" / f"{stage}.py"), "--output-dir", str(out), "--steps", "2", "--no-progress",
                *extra], _env())
    assert res.returncode != 0, res.stdout[-2000:]
    assert _snapshot(parent) == before, sorted(_snapshot(parent))
    if "--resolution" in extra:  # refused by name once the models say what sizes they take, not a traceback
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert res.stderr.strip().splitlines()[-1].startswith(f"{stage}: configuration error: --resolution 1")


def test_stage2_with_an_inverter_whose_multipliers_do_not_match_its_weights_leaves_nothing(tiny, tmp_path):
    import json
    import shutil

    bad = tmp_path / "bad_inverter"
    shutil.copytree(tiny["inv"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["multipliers"] = [2] + cfg["multipliers"][1:]  # the weights are of the unexpanded inverter
    (bad / "config.json").write_text(json.dumps(cfg))
    parent = tmp_path / "runs"
    parent.mkdir()
    out = parent / "run"
    res = _run([str(ROOT / "training" / "stage2.py"), "--output-dir", str(out), "--inverter", str(bad),
                "--steps", "2", "--no-progress"], _env())
    assert res.returncode != 0, res.stdout[-2000:]
    assert list(parent.iterdir()) == []


def test_a_real_full_disk_is_one_line_and_resume_completes_after_freeing_space(tmp_path):
    """A small tmpfs (where the tests may mount one): room for the tiny models and one checkpoint, not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the injected ENOSPC tests above cover the writer)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=260m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        out = disk / "run"
        argv = [str(ROOT / "training" / "stage1.py"), "--output-dir", str(out), "--steps", "3",
                "--checkpoint-every", "1", "--keep-checkpoints", "2", "--no-progress"]
        res = _run(argv, _env())
        assert res.returncode == 2, res.stderr[-3000:]
        last = res.stderr.strip().splitlines()[-1]
        assert "Traceback" not in res.stderr and last.startswith("stage1: error: No space left on device ("), last
        assert str(out / "checkpoints") in last, last
        left = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert left == ["step-00000001"], left  # intact, and nothing partial beside it
        from adaface.training.engine.checkpoint import load_checkpoint

        load_checkpoint(out / "checkpoints" / "step-00000001")
        subprocess.run(["mount", "-o", "remount,size=700m", str(disk)], check=True)
        res = _run([*argv, "--resume"], _env())
        assert res.returncode == 0, res.stderr[-3000:]
        assert (out / "inverter" / "model.safetensors").is_file()
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_a_hub_kernel_in_the_base_models_config_is_refused_before_loading(stage, tiny, tmp_path):
    """A shared SD-1.5 folder whose text encoder names a hub kernel would have transformers fetch and run code: the
    training scripts refuse it by file, offline, and write nothing."""
    import json
    import shutil

    sd = tmp_path / "sd15"
    shutil.copytree(tiny["sd"], sd)
    config = sd / "text_encoder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "attn_implementation": "kernels-community/x"}))
    out = tmp_path / "run"
    argv = _args(stage, {**tiny, "sd": sd}, out)
    res = _run(argv, _env(HF_HUB_OFFLINE="1"))
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.stderr and str(config) in last and "attn_implementation" in last, last
    assert not out.exists()

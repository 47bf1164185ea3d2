"""What the training tests share: tiny models saved once, the environment of a reproducible script run
(single-threaded, so runs are bit-for-bit reproducible; no fault injected unless asked), running a training script
(alone, SIGKILLed at a step, or as two gloo DDP processes), the DDP worker's per-rank weights, and a run's step
records and final weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import pytest

# the repository: the training scripts take their relative paths (configs, data) from there
REPO = Path(__file__).resolve().parents[2]

# the fault-injection hook the scripts install when ADAFACE_FAULTS is set (adaface.training.engine.faults)
FAULT_HOOK = {"ADAFACE_TRAINING_HOOK": "adaface.training.engine.faults:install"}


def script_env(**extra: str) -> dict[str, str]:
    """The environment of a reproducible run: one thread, unbuffered output, no fault injected unless asked."""
    env = dict(os.environ)
    env.pop("ADAFACE_FAULTS", None)
    env.pop("ADAFACE_TRAINING_HOOK", None)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def tiny_stage2_models(root: Path, faces: int) -> dict[str, Path]:
    """Tiny SD-1.5 and Arc2Face folders, a tiny inverter and `faces` synthetic faces with masks, under `root`."""
    from adaface.training.method.stage1 import build_tiny_models
    from adaface.training.method.stage2 import tiny_inverter
    from adaface.training.method.synthetic_faces import write_synthetic_faces

    sd, a2f = build_tiny_models(root, seed=0)
    return {"sd": sd, "a2f": a2f, "inv": tiny_inverter(root, str(sd)),
            "data": write_synthetic_faces(root / "faces", faces, seed=0)}


def step_records(out: Path) -> dict[int, dict]:
    """{step: its metrics record} of a run's metrics.jsonl."""
    from adaface.training.engine.metrics_log import read_jsonl

    return {r["step"]: r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "step"}


def _python(argv: Sequence[str], env: dict[str, str] | None, check: bool) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, *argv], env=script_env() if env is None else env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    if check:
        assert res.returncode == 0, res.stderr[-4000:]
    return res


def run_script(script: Path, args: Sequence[str], env: dict[str, str] | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """`python script *args` from the repository root (environment: `script_env()` unless given); with `check`,
    the run must exit 0."""
    return _python([str(script), *args], env, check)


def uninterrupted_run(tmp_path_factory: pytest.TempPathFactory, script: Path, args_for: Callable[[Path], list[str]],
                      steps: int) -> tuple[Path, str, dict[int, dict]]:
    """A run of `script` with arguments `args_for(out)` into a fresh folder `out` that exits 0 and logs every step
    1..`steps`: what the interrupted runs are compared with. (out, its stdout, its step records)."""
    out = tmp_path_factory.mktemp("ref")
    stdout = run_script(script, args_for(out)).stdout
    records = step_records(out)
    assert sorted(records) == list(range(1, steps + 1))
    return out, stdout, records


def run_ddp(target: Path, args: Sequence[str], env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """`target` (a training script, or a test file that is a DDP worker when run as a script) as two processes
    under torch.distributed.run (gloo on the CPU), as `run_script` runs one."""
    return _python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(target), *args],
                   env, check)


def run_killed_at(script: Path, args: Sequence[str], out: Path, kill_at: int) -> None:
    """A run that the fault hook SIGKILLs once step `kill_at` is logged (to `out`, the run's output folder)."""
    env = {**script_env(), **FAULT_HOOK, "ADAFACE_FAULTS": f"sigkill@{kill_at}"}
    res = run_script(script, args, env=env, check=False)
    assert res.returncode == -signal.SIGKILL, f"not killed by the hook (rc {res.returncode}): {res.stderr[-2000:]}"
    assert max(step_records(out)) == kill_at


def save_rank_weights(module: torch.nn.Module, output_dir: str | Path) -> None:
    """The DDP worker's end: this rank's trained weights as `output_dir/rank{RANK}.safetensors`."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in module.state_dict().items()},
              str(Path(output_dir) / f"rank{os.environ['RANK']}.safetensors"))


def assert_same_final_weights(a: Path, b: Path) -> None:
    """The final inverters of the runs with output folders `a` and `b` hold the same tensors, bit for bit."""
    from safetensors.torch import load_file

    wa = load_file(str(a / "inverter" / "model.safetensors"))
    wb = load_file(str(b / "inverter" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

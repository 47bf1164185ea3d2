"""What the training-step benchmarks share (bench/bench_stage1_step.py, bench/bench_stage2_step.py).

One argument parser, the run settings derived from it (device, batch, multipliers, dtypes), the models both
stages build the same way (text encoders, UNet, VAE at the full or the small shape; the inverter expanded and
trained, the rest frozen), the timed loop over the shared trainer's `train_step`, and the memory figures and
output every result gets. Each benchmark adds only what its stage differs in.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PAPER_MULTIPLIERS = (8, 8, 8, 4, 4, 4, 4, 4, 4, 4, 4, 4)  # the inverter's final per-layer multipliers
_PAPER_TEXT = ",".join(map(str, PAPER_MULTIPLIERS))


@dataclass(frozen=True)
class StepBenchmark:
    """A step benchmark's defaults, `(full, small)` per shape; `script` is the benchmark's own file."""

    script: Path
    batch: tuple[int, int]
    steps: tuple[int, int]
    small_multipliers: str
    batch_help: str = "samples per step"
    multipliers_note: str = ""

    @property
    def name(self) -> str:
        return self.script.stem

    def parser(self, description: str) -> argparse.ArgumentParser:
        """The options every step benchmark takes; a benchmark adds its stage's own to it."""
        p = argparse.ArgumentParser(description=description)
        p.add_argument("--shape", choices=("full", "small"), default="full")
        p.add_argument("--batch-size", type=int, default=None,
                       help=f"{self.batch_help} (default: {self.batch[0]} full, {self.batch[1]} small)")
        p.add_argument("--steps", type=int, default=None,
                       help=f"timed steps (default: {self.steps[0]} full, {self.steps[1]} small)")
        p.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, Triton compilation)")
        p.add_argument("--multipliers", default=None,
                       help=f"inverter multipliers, comma-separated or one int (default: {_PAPER_TEXT} full, "
                            f"{self.small_multipliers} small{self.multipliers_note})")
        p.add_argument("--mixed-precision", choices=("bf16", "fp16", "no"), default="bf16")
        p.add_argument("--no-gradient-checkpointing", action="store_true")
        p.add_argument("--json", default=None, help="also write the result here")
        return p

    def setting(self, args: argparse.Namespace) -> StepSetting | None:
        """The run's settings, or None (with a line saying so) when the full shape has no CUDA device."""
        from adaface._quiet import quiet_dependency_noise

        quiet_dependency_noise()
        if args.shape == "full" and not torch.cuda.is_available():
            print(f"{self.name}: skipped, the full shape needs a CUDA device (use --shape small on the CPU)")
            return None
        full = args.shape == "full"
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        mult_text = args.multipliers or (_PAPER_TEXT if full else self.small_multipliers)
        n_layers = 12 if full else 4
        mults = [int(x) for x in mult_text.split(",")]
        mults = mults * n_layers if len(mults) == 1 else mults
        amp = device.type == "cuda" and args.mixed_precision != "no"
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
        return StepSetting(
            args=args,
            device=device,
            batch=args.batch_size or self.batch[0 if full else 1],
            steps=args.steps or self.steps[0 if full else 1],
            multipliers=None if all(m == 1 for m in mults) else mults,
            n_layers=n_layers,
            mixed_precision=args.mixed_precision if amp else "no",
            weight_dtype=dtypes.get(args.mixed_precision) if amp else torch.float32,
        )

    def report(self, result: dict[str, Any], setting: StepSetting, stage: str,
               target_peak_gib: float | None = None) -> dict[str, Any]:
        """Adds the memory figures to `result`, prints it and writes it to --json."""
        args = setting.args
        if setting.device.type == "cuda":
            result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            if args.shape == "full" and args.mixed_precision in ("bf16", "fp16"):
                # the meta-device estimate of the same step, for calibration (bench/memory_estimate.py)
                from .scripts import load_script

                estimator = load_script(self.script.with_name("memory_estimate.py"))
                result["estimated_peak_gib"] = estimator.estimated_peak_gib(
                    stage, setting.batch, checkpointing=not args.no_gradient_checkpointing,
                    dtype=args.mixed_precision)
            if target_peak_gib is not None:
                result["target_peak_gib"] = target_peak_gib
                result["meets_target"] = result["peak_allocated_gib"] < target_peak_gib
        else:
            # ru_maxrss is KiB on Linux: the process's peak resident memory, models included
            result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(result, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return result


@dataclass(frozen=True)
class StepSetting:
    args: argparse.Namespace
    device: torch.device
    batch: int
    steps: int
    multipliers: list[int] | None  # None: the unexpanded inverter
    n_layers: int
    mixed_precision: str  # what runs: "no" without CUDA
    weight_dtype: torch.dtype  # of the frozen models

    @property
    def gradient_checkpointing(self) -> bool:
        return not self.args.no_gradient_checkpointing


def text_config_for(shape: str, tokenizer: Any):
    """The text encoders' config: CLIP ViT-L/14's (full) or the tiny one (small)."""
    from .full_size import clip_l_text_config
    from .tiny_models import TinyConfig, tiny_text_config

    return clip_l_text_config(tokenizer) if shape == "full" else tiny_text_config(TinyConfig())


def unet_for(shape: str):
    from .full_size import sd15_unet
    from .tiny_models import TinyConfig, tiny_unet

    return sd15_unet() if shape == "full" else tiny_unet(TinyConfig())


def vae_for(shape: str):
    from .full_size import sd15_vae
    from .tiny_models import TinyConfig, tiny_vae

    return sd15_vae() if shape == "full" else tiny_vae(TinyConfig())


def latent_size_for(shape: str) -> int:
    from .tiny_models import TinyConfig

    return 64 if shape == "full" else TinyConfig().latent_size


def prepare_models(setting: StepSetting, inverter: torch.nn.Module, unet: torch.nn.Module,
                   frozen: tuple[torch.nn.Module, ...]) -> None:
    """The inverter expanded to the run's multipliers and trained; `frozen` cast to the weight dtype; the UNet
    checkpointed when asked."""
    if setting.multipliers:
        inverter.expand(setting.multipliers, noise_ratio=0.1)
    for m in frozen:
        m.requires_grad_(False).to(setting.device, setting.weight_dtype)
    if setting.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    inverter.to(setting.device).train()


def timed_steps(trainer: Any, setting: StepSetting) -> tuple[float, dict[str, Any]]:
    """--warmup untimed steps, then the timed ones: (seconds, the last step's record)."""
    cuda = setting.device.type == "cuda"
    for _ in range(setting.args.warmup):
        trainer.train_step()
        trainer.state.step += 1
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    last: dict[str, Any] = {}
    for _ in range(setting.steps):
        last = trainer.train_step()
        trainer.state.step += 1
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, last

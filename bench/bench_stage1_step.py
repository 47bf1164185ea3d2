"""Benchmark one stage-1 training step: steps/s and peak memory.

    python bench/bench_stage1_step.py                 # full size on CUDA (skips, exit 0, without CUDA)
    python bench/bench_stage1_step.py --shape small   # tiny models, runs on the CPU too
    python bench/bench_stage1_step.py --json out.json --multipliers 1

Full shape: random-weight SD-1.5 UNet (student) and an Arc2Face UNet of the same architecture (teacher),
CLIP ViT-L/14 text encoders (SD's, Arc2Face's and the Prompt Inverter, expanded by default to the paper's
final multipliers 8,8,8,4,...,4), 512² images (64² latents), batch 4, 3 denoising steps, bf16 autocast with
bf16 frozen weights, gradient checkpointing of the student UNet, Prodigy. It runs the shared trainer's own
`Trainer.train_step` (adaface.training.trainer) on the stage-1 loss (adaface.training.stage1), so the figure is
the real step. Target: peak memory under 40 GB, so the paper's batch fits a 48 GB A6000 with room to spare.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

PAPER_MULTIPLIERS = "8,8,8,4,4,4,4,4,4,4,4,4"


def _models(shape: str, device: torch.device, weight_dtype: torch.dtype, multipliers: list[int] | None,
            tmp: Path, gradient_checkpointing: bool):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from adaface.models.arc2face import Arc2Face
    from adaface.models.prompt_inverter import PromptInverter
    from adaface.testing.tiny_models import TinyConfig, save_tiny_tokenizer, sd15_scheduler, tiny_text_config, tiny_unet
    from adaface.training.stage1 import Stage1Models

    tok = CLIPTokenizer.from_pretrained(str(save_tiny_tokenizer(tmp / "tokenizer")))
    if shape == "full":
        text_cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                  projection_dim=768, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)

        def unet():
            # SD-1.5's UNet (diffusers' defaults are SD-1.5's, except the 768-wide cross-attention)
            return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()

        latent = 64
    else:
        text_cfg = tiny_text_config(TinyConfig())

        def unet():
            return tiny_unet(TinyConfig())

        latent = TinyConfig().latent_size
    with torch.device(device):
        student_unet, teacher_unet = unet(), unet()
        sd_text, a2f_text, inv_text = (CLIPTextModel(text_cfg).eval() for _ in range(3))
    teacher = Arc2Face(a2f_text, tok, teacher_unet)
    inverter = PromptInverter(inv_text, tokenizer=tok)
    if multipliers:
        inverter.expand(multipliers, noise_ratio=0.1)
    for m in (student_unet, sd_text, teacher):
        m.requires_grad_(False).to(device, weight_dtype)
    if gradient_checkpointing:
        student_unet.enable_gradient_checkpointing()
    inverter.to(device).train()
    return Stage1Models(tok, sd_text, student_unet, teacher, inverter, sd15_scheduler().alphas_cumprod.float(), None,
                        0.18215, latent)


def run(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=("full", "small"), default="full")
    p.add_argument("--batch-size", type=int, default=None, help="default: 4 (full), 2 (small)")
    p.add_argument("--denoise-steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 5 full, 3 small)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, Triton compilation)")
    p.add_argument("--multipliers", default=None,
                   help=f"inverter multipliers, comma-separated or one int (default: {PAPER_MULTIPLIERS} full, "
                        "4 small; 1 for the unexpanded inverter)")
    p.add_argument("--mixed-precision", choices=("bf16", "fp16", "no"), default="bf16")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)

    if args.shape == "full" and not torch.cuda.is_available():
        print("bench_stage1_step: skipped, the full shape needs a CUDA device (use --shape small on the CPU)")
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from adaface.testing.device import device_name
    from adaface.training.config import Stage1Config
    from adaface.training.data import FaceIdSource
    from adaface.training.ddp import DistInfo
    from adaface.training.metrics_log import MetricsLog
    from adaface.training.stage1 import Stage1
    from adaface.training.trainer import Trainer, amp_dtype_for

    batch = args.batch_size or (4 if args.shape == "full" else 2)
    steps = args.steps or (5 if args.shape == "full" else 3)
    mult_text = args.multipliers or (PAPER_MULTIPLIERS if args.shape == "full" else "4")
    mults = [int(x) for x in mult_text.split(",")]
    n_layers = 12 if args.shape == "full" else 4
    mults = mults * n_layers if len(mults) == 1 else mults
    mults = None if all(m == 1 for m in mults) else mults
    amp = device.type == "cuda" and args.mixed_precision != "no"
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision) if amp else torch.float32
    cfg = Stage1Config(tiny=True, batch_size=batch, grad_accum=1, steps=10**6, denoise_steps=[args.denoise_steps],
                       denoise_step_weights=[1.0], t_min=1, t_max=1000, device=str(device),
                       mixed_precision=args.mixed_precision if amp else "no", warmup_steps=0,
                       gradient_checkpointing=not args.no_gradient_checkpointing, expansions="")

    with tempfile.TemporaryDirectory() as tmp:
        models = _models(args.shape, device, weight_dtype, mults, Path(tmp),
                                 not args.no_gradient_checkpointing)
        log = MetricsLog(Path(tmp) / "m.jsonl", enabled=False)
        trainer = Trainer(cfg, Stage1(cfg, models, FaceIdSource(None, 1.0)), device, DistInfo(), log,
                          amp_dtype_for(cfg, device))
        for _ in range(args.warmup):
            trainer.train_step()
            trainer.state.step += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
            trainer.state.step += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        trainable = sum(p.numel() for p in models.inverter.parameters() if p.requires_grad)

    result = {
        "bench": "stage1_step", "shape": args.shape, "device": device_name(device), "batch_size": batch,
        "denoise_steps": args.denoise_steps, "mixed_precision": cfg.mixed_precision,
        "gradient_checkpointing": cfg.gradient_checkpointing, "inverter_multipliers": mults or [1] * n_layers,
        "inverter_trainable_params": trainable, "timed_steps": steps, "steps_per_s": steps / elapsed,
        "samples_per_s": steps * batch / elapsed, "torch": torch.__version__,
    }
    if device.type == "cuda":
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        if args.shape == "full" and args.mixed_precision in ("bf16", "fp16"):
            # the meta-device estimate of the same step, for calibration (bench/memory_estimate.py)
            from adaface.testing.scripts import load_script

            estimator = load_script(Path(__file__).with_name("memory_estimate.py"))
            result["estimated_peak_gib"] = estimator.estimated_peak_gib(
                "stage1", batch, checkpointing=cfg.gradient_checkpointing, dtype=args.mixed_precision)
        result["target_peak_gib"] = 40.0
        result["meets_target"] = result["peak_allocated_gib"] < 40.0
    else:
        # ru_maxrss is KiB on Linux: the process's peak resident memory, models included
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    run()
    sys.exit(0)

"""Benchmark one stage-2 composition-distillation step: steps/s and peak memory.

    python bench/bench_stage2_step.py                 # full size on CUDA (skips, exit 0, without CUDA)
    python bench/bench_stage2_step.py --shape small   # tiny models, runs on the CPU too
    python bench/bench_stage2_step.py --json out.json

Full shape: random-weight SD-1.5 UNet (16 cross-attention layers, all captured), CLIP ViT-L/14 text encoders (SD's,
Arc2Face's and the Prompt Inverter at the paper's final multipliers 8,8,8,4,...,4), SD-1.5's VAE encoder, 512²
images (64² latents), batch 3 subjects x 4 prompts, bf16 autocast with bf16 frozen weights, gradient
checkpointing of the UNet, Prodigy. Every step is a composition step (no mixed-in stage-1 steps), run through the
shared trainer's own `Trainer.train_step` on `adaface.training.stage2.Stage2`, so the figure is the real step:
the delta loss on the attention outputs, maps and prompt embeddings and the face-preserving loss on every layer
by the fused ops.
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


class SyntheticFaces:
    """Random images with a centred elliptic face mask: the data a composition step needs, made in memory."""

    def __init__(self, resolution: int) -> None:
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, resolution), torch.linspace(-1, 1, resolution), indexing="ij")
        self.mask = ((xx / 0.45) ** 2 + (yy / 0.6) ** 2 <= 1).float()[None]

    def sample(self, batch: int, generator: torch.Generator):
        from adaface.training.data import FaceBatch, random_ids

        images = torch.rand(batch, 3, *self.mask.shape[-2:], generator=generator) * 2 - 1
        return FaceBatch(random_ids(batch, generator), torch.ones(batch, dtype=torch.bool), images,
                         self.mask.expand(batch, -1, -1, -1).clone(), ["person"] * batch)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _models(shape: str, device: torch.device, weight_dtype: torch.dtype, multipliers: list[int] | None, tmp: Path,
            gradient_checkpointing: bool, cfg):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from adaface.models.arc2face import Arc2Face
    from adaface.models.prompt_inverter import PromptInverter
    from adaface.models.unet_feature_capture import UNetFeatureCapture
    from adaface.testing.tiny_models import (
        TinyConfig,
        save_tiny_tokenizer,
        sd15_scheduler,
        tiny_text_config,
        tiny_unet,
        tiny_vae,
    )
    from adaface.training.composition_step import CompositionModels, capture_layers
    from adaface.training.stage1 import Stage1Models
    from adaface.training.stage2 import Stage2Models, composition_config

    tok = CLIPTokenizer.from_pretrained(str(save_tiny_tokenizer(tmp / "tokenizer")))
    with torch.device(device):
        if shape == "full":
            text_cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                      projection_dim=768, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            # SD-1.5's UNet (diffusers' defaults, 768-wide cross-attention) and VAE
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512).eval()
            latent = 64
        else:
            text_cfg = tiny_text_config(TinyConfig())
            unet, vae = tiny_unet(TinyConfig()), tiny_vae(TinyConfig())
            latent = TinyConfig().latent_size
        sd_text, a2f_text, inv_text = (CLIPTextModel(text_cfg).eval() for _ in range(3))
    teacher = Arc2Face(a2f_text, tok)
    inverter = PromptInverter(inv_text, tokenizer=tok)
    if multipliers:
        inverter.expand(multipliers, noise_ratio=0.1)
    for m in (unet, sd_text, teacher, vae):
        m.requires_grad_(False).to(device, weight_dtype)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    inverter.to(device).train()
    capture = UNetFeatureCapture(unet, capture_layers(unet, composition_config(cfg)))
    alphas = sd15_scheduler().alphas_cumprod.float().to(device)
    comp = CompositionModels(tok, sd_text, unet, capture, teacher, inverter, vae, 0.18215, alphas)
    s1 = Stage1Models(tok, sd_text, unet, teacher, inverter, alphas, vae, 0.18215, latent)
    return Stage2Models(comp, s1), latent * (8 if shape == "full" else 2)


def run(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=("full", "small"), default="full")
    p.add_argument("--batch-size", type=int, default=None, help="subjects per step (default: 3 full, 2 small)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 5 full, 2 small)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, Triton compilation)")
    p.add_argument("--multipliers", default=None,
                   help=f"inverter multipliers, comma-separated or one int (default: {PAPER_MULTIPLIERS} full, "
                        "1 small)")
    p.add_argument("--mixed-precision", choices=("bf16", "fp16", "no"), default="bf16")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--ops-backend", default="auto", help="adaface.ops backend of the fused losses")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)

    if args.shape == "full" and not torch.cuda.is_available():
        print("bench_stage2_step: skipped, the full shape needs a CUDA device (use --shape small on the CPU)")
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from adaface.testing.device import device_name
    from adaface.training.ddp import DistInfo
    from adaface.training.metrics_log import MetricsLog
    from adaface.training.stage2 import Stage2, Stage2Config
    from adaface.training.trainer import Trainer, amp_dtype_for

    batch = args.batch_size or (3 if args.shape == "full" else 2)
    steps = args.steps or (5 if args.shape == "full" else 2)
    mult_text = args.multipliers or (PAPER_MULTIPLIERS if args.shape == "full" else "1")
    n_layers = 12 if args.shape == "full" else 4
    mults = [int(x) for x in mult_text.split(",")]
    mults = mults * n_layers if len(mults) == 1 else mults
    mults = None if all(m == 1 for m in mults) else mults
    amp = device.type == "cuda" and args.mixed_precision != "no"
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision) if amp else torch.float32
    cfg = Stage2Config(tiny=True, batch_size=batch, grad_accum=1, steps=10**6, stage1_p=0.0, device=str(device),
                       mixed_precision=args.mixed_precision if amp else "no", warmup_steps=0,
                       gradient_checkpointing=not args.no_gradient_checkpointing, expansions="",
                       ops_backend=args.ops_backend)

    with tempfile.TemporaryDirectory() as tmp:
        models, resolution = _models(args.shape, device, weight_dtype, mults, Path(tmp),
                                     not args.no_gradient_checkpointing, cfg)
        faces = SyntheticFaces(resolution)
        trainer = Trainer(cfg, Stage2(cfg, models, faces, faces), device, DistInfo(),
                          MetricsLog(Path(tmp) / "m.jsonl", enabled=False), amp_dtype_for(cfg, device))
        for _ in range(args.warmup):
            trainer.train_step()
            trainer.state.step += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        last = {}
        for _ in range(steps):
            last = trainer.train_step()
            trainer.state.step += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        layers = len(models.composition.capture.layers)

    result = {
        "bench": "stage2_step", "shape": args.shape, "device": device_name(device), "batch_size": batch,
        "prompts_per_subject": 4, "resolution": resolution, "captured_layers": layers,
        "mixed_precision": cfg.mixed_precision, "gradient_checkpointing": cfg.gradient_checkpointing,
        "inverter_multipliers": mults or [1] * n_layers, "ops_backend": args.ops_backend, "timed_steps": steps,
        "steps_per_s": steps / elapsed, "subjects_per_s": steps * batch / elapsed,
        "last_losses": {k: v for k, v in last.items() if k.startswith("loss")}, "torch": torch.__version__,
    }
    if device.type == "cuda":
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        if args.shape == "full" and args.mixed_precision in ("bf16", "fp16"):
            # the meta-device estimate of the same step, for calibration (bench/memory_estimate.py)
            from adaface.testing.scripts import load_script

            estimator = load_script(Path(__file__).with_name("memory_estimate.py"))
            result["estimated_peak_gib"] = estimator.estimated_peak_gib(
                "stage2", batch, checkpointing=cfg.gradient_checkpointing, dtype=args.mixed_precision)
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

"""Benchmark one stage-2 composition-distillation step: steps/s and peak memory.

    python bench/bench_stage2_step.py                 # full size on CUDA (skips, exit 0, without CUDA)
    python bench/bench_stage2_step.py --shape small   # tiny models, runs on the CPU too
    python bench/bench_stage2_step.py --json out.json

Full shape: random-weight SD-1.5 UNet (16 cross-attention layers, all captured), CLIP ViT-L/14 text encoders (SD's,
Arc2Face's and the Prompt Inverter at the paper's final multipliers 8,8,8,4,...,4), SD-1.5's VAE encoder, 512²
images (64² latents), batch 3 subjects x 4 prompts, bf16 autocast with bf16 frozen weights, gradient
checkpointing of the UNet, Prodigy. Every step is a composition step (no mixed-in stage-1 steps), run through the
shared trainer's own `Trainer.train_step` on `adaface.training.method.stage2.Stage2`, so the figure is the real step:
the delta loss on the attention outputs, maps and prompt embeddings and the face-preserving loss on every layer
by the fused ops.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from adaface.testing.step_benchmark import StepBenchmark, StepSetting

BENCH = StepBenchmark(Path(__file__), batch=(3, 2), steps=(5, 2), small_multipliers="1",
                      batch_help="subjects per step")


class SyntheticFaces:
    """Random images with a centred elliptic face mask: the data a composition step needs, made in memory."""

    def __init__(self, resolution: int) -> None:
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, resolution), torch.linspace(-1, 1, resolution), indexing="ij")
        self.mask = ((xx / 0.45) ** 2 + (yy / 0.6) ** 2 <= 1).float()[None]

    def sample(self, batch: int, generator: torch.Generator):
        from adaface.training.engine.data import FaceBatch, random_ids

        images = torch.rand(batch, 3, *self.mask.shape[-2:], generator=generator) * 2 - 1
        return FaceBatch(random_ids(batch, generator), torch.ones(batch, dtype=torch.bool), images,
                         self.mask.expand(batch, -1, -1, -1).clone(), ["person"] * batch)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _models(setting: StepSetting, tmp: Path, cfg):
    from transformers import CLIPTextModel, CLIPTokenizer

    from adaface.models.arc2face import Arc2Face
    from adaface.models.prompt_inverter import PromptInverter
    from adaface.models.unet_feature_capture import UNetFeatureCapture
    from adaface.testing.step_benchmark import latent_size_for, prepare_models, text_config_for, unet_for, vae_for
    from adaface.testing.tiny_models import save_tiny_tokenizer, sd15_scheduler
    from adaface.training.method.composition_step import CompositionModels, capture_layers
    from adaface.training.method.stage1 import Stage1Models
    from adaface.training.method.stage2 import Stage2Models, composition_config

    shape, device = setting.args.shape, setting.device
    tok = CLIPTokenizer.from_pretrained(str(save_tiny_tokenizer(tmp / "tokenizer")))
    with torch.device(device):
        text_cfg = text_config_for(shape, tok)
        unet, vae = unet_for(shape), vae_for(shape)
        sd_text, a2f_text, inv_text = (CLIPTextModel(text_cfg).eval() for _ in range(3))
    latent = latent_size_for(shape)
    teacher = Arc2Face(a2f_text, tok)
    inverter = PromptInverter(inv_text, tokenizer=tok)
    prepare_models(setting, inverter, unet, frozen=(unet, sd_text, teacher, vae))
    capture = UNetFeatureCapture(unet, capture_layers(unet, composition_config(cfg)))
    alphas = sd15_scheduler().alphas_cumprod.float().to(device)
    comp = CompositionModels(tok, sd_text, unet, capture, teacher, inverter, vae, 0.18215, alphas)
    s1 = Stage1Models(tok, sd_text, unet, teacher, inverter, alphas, vae, 0.18215, latent)
    return Stage2Models(comp, s1), latent * (8 if shape == "full" else 2)


def run(argv: list[str] | None = None) -> dict | None:
    p = BENCH.parser(__doc__.splitlines()[0])
    p.add_argument("--ops-backend", default="auto", help="adaface.ops backend of the fused losses")
    args = p.parse_args(argv)
    setting = BENCH.setting(args)
    if setting is None:
        return None
    from adaface.testing.device import device_name
    from adaface.testing.step_benchmark import timed_steps
    from adaface.training.engine.ddp import DistInfo
    from adaface.training.engine.metrics_log import MetricsLog
    from adaface.training.engine.trainer import Trainer, amp_dtype_for
    from adaface.training.method.stage2 import Stage2, Stage2Config

    device, batch, steps = setting.device, setting.batch, setting.steps
    cfg = Stage2Config(tiny=True, batch_size=batch, grad_accum=1, steps=10**6, stage1_p=0.0, device=str(device),
                       mixed_precision=setting.mixed_precision, warmup_steps=0,
                       gradient_checkpointing=setting.gradient_checkpointing, expansions="",
                       ops_backend=args.ops_backend)

    with tempfile.TemporaryDirectory() as tmp:
        models, resolution = _models(setting, Path(tmp), cfg)
        faces = SyntheticFaces(resolution)
        trainer = Trainer(cfg, Stage2(cfg, models, faces, faces), device, DistInfo(),
                          MetricsLog(Path(tmp) / "m.jsonl", enabled=False), amp_dtype_for(cfg, device))
        elapsed, last = timed_steps(trainer, setting)
        layers = len(models.composition.capture.layers)

    result = {
        "bench": "stage2_step", "shape": args.shape, "device": device_name(device), "batch_size": batch,
        "prompts_per_subject": 4, "resolution": resolution, "captured_layers": layers,
        "mixed_precision": cfg.mixed_precision, "gradient_checkpointing": cfg.gradient_checkpointing,
        "inverter_multipliers": setting.multipliers or [1] * setting.n_layers, "ops_backend": args.ops_backend,
        "timed_steps": steps, "steps_per_s": steps / elapsed, "subjects_per_s": steps * batch / elapsed,
        "last_losses": {k: v for k, v in last.items() if k.startswith("loss")}, "torch": torch.__version__,
    }
    return BENCH.report(result, setting, "stage2")


if __name__ == "__main__":
    run()
    sys.exit(0)

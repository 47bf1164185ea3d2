"""Benchmark one stage-1 training step: steps/s and peak memory.

    python bench/bench_stage1_step.py                 # full size on CUDA (skips, exit 0, without CUDA)
    python bench/bench_stage1_step.py --shape small   # tiny models, runs on the CPU too
    python bench/bench_stage1_step.py --json out.json --multipliers 1

Full shape: random-weight SD-1.5 UNet (student) and an Arc2Face UNet of the same architecture (teacher),
CLIP ViT-L/14 text encoders (SD's, Arc2Face's and the Prompt Inverter, expanded by default to the paper's
final multipliers 8,8,8,4,...,4), 512² images (64² latents), batch 4, 3 denoising steps, bf16 autocast with
bf16 frozen weights, gradient checkpointing of the student UNet, Prodigy. It runs the shared trainer's own
`Trainer.train_step` (adaface.training.engine.trainer) on the stage-1 loss (adaface.training.method.stage1),
so the figure is
the real step. Target: peak memory under 40 GB, so the paper's batch fits a 48 GB A6000 with room to spare.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from adaface.testing.step_benchmark import StepBenchmark, StepSetting

BENCH = StepBenchmark(Path(__file__), batch=(4, 2), steps=(5, 3), small_multipliers="4",
                      multipliers_note="; 1 for the unexpanded inverter")


def _models(setting: StepSetting, tmp: Path):
    from transformers import CLIPTextModel, CLIPTokenizer

    from adaface.models.arc2face import Arc2Face
    from adaface.models.prompt_inverter import PromptInverter
    from adaface.testing.step_benchmark import latent_size_for, prepare_models, text_config_for, unet_for
    from adaface.testing.tiny_models import save_tiny_tokenizer, sd15_scheduler
    from adaface.training.method.stage1 import Stage1Models

    shape = setting.args.shape
    tok = CLIPTokenizer.from_pretrained(str(save_tiny_tokenizer(tmp / "tokenizer")))
    text_cfg = text_config_for(shape, tok)
    with torch.device(setting.device):
        student_unet, teacher_unet = unet_for(shape), unet_for(shape)
        sd_text, a2f_text, inv_text = (CLIPTextModel(text_cfg).eval() for _ in range(3))
    teacher = Arc2Face(a2f_text, tok, teacher_unet)
    inverter = PromptInverter(inv_text, tokenizer=tok)
    prepare_models(setting, inverter, student_unet, frozen=(student_unet, sd_text, teacher))
    return Stage1Models(tok, sd_text, student_unet, teacher, inverter, sd15_scheduler().alphas_cumprod.float(), None,
                        0.18215, latent_size_for(shape))


def run(argv: list[str] | None = None) -> dict | None:
    p = BENCH.parser(__doc__.splitlines()[0])
    p.add_argument("--denoise-steps", type=int, default=3)
    args = p.parse_args(argv)
    setting = BENCH.setting(args)
    if setting is None:
        return None
    from adaface.testing.device import device_name
    from adaface.testing.step_benchmark import timed_steps
    from adaface.training.engine.config import Stage1Config
    from adaface.training.engine.data import FaceIdSource
    from adaface.training.engine.ddp import DistInfo
    from adaface.training.engine.metrics_log import MetricsLog
    from adaface.training.engine.trainer import Trainer, amp_dtype_for
    from adaface.training.method.stage1 import Stage1

    device, batch, steps = setting.device, setting.batch, setting.steps
    cfg = Stage1Config(tiny=True, batch_size=batch, grad_accum=1, steps=10**6, denoise_steps=[args.denoise_steps],
                       denoise_step_weights=[1.0], t_min=1, t_max=1000, device=str(device),
                       mixed_precision=setting.mixed_precision, warmup_steps=0,
                       gradient_checkpointing=setting.gradient_checkpointing, expansions="")

    with tempfile.TemporaryDirectory() as tmp:
        models = _models(setting, Path(tmp))
        log = MetricsLog(Path(tmp) / "m.jsonl", enabled=False)
        trainer = Trainer(cfg, Stage1(cfg, models, FaceIdSource(None, 1.0)), device, DistInfo(), log,
                          amp_dtype_for(cfg, device))
        elapsed, _ = timed_steps(trainer, setting)
        trainable = sum(p.numel() for p in models.inverter.parameters() if p.requires_grad)

    result = {
        "bench": "stage1_step", "shape": args.shape, "device": device_name(device), "batch_size": batch,
        "denoise_steps": args.denoise_steps, "mixed_precision": cfg.mixed_precision,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "inverter_multipliers": setting.multipliers or [1] * setting.n_layers,
        "inverter_trainable_params": trainable, "timed_steps": steps, "steps_per_s": steps / elapsed,
        "samples_per_s": steps * batch / elapsed, "torch": torch.__version__,
    }
    return BENCH.report(result, setting, "stage1", target_peak_gib=40.0)


if __name__ == "__main__":
    run()
    sys.exit(0)

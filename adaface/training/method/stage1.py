"""Stage 1 -- face distillation (paper §3.1): the Prompt Inverter learns to make SD-1.5 imitate Arc2Face.

Per micro-batch: draw face IDs (random Gaussian, or real faces with their ArcFace embeddings), let Arc2Face
(teacher) encode them into its context and 16 image-space ID tokens, let the inverter map those tokens to 16
text-space embeddings, write them into `photo of a z` and encode that with the frozen SD text encoder (student
context), then distil the teacher UNet's noise predictions into the frozen SD UNet along one multi-timestep
trajectory (adaface.training.method.distill, eq. 2). Only the inverter trains.

`stage1_loss(models, batch, generator, ...)` is that micro-batch loss on its own, so stage 2 can mix stage-1
distillation iterations into its training; `Stage1` plugs it into the shared trainer (adaface.training.engine.trainer).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..engine.config import ConfigError, Stage1Config, parse_config
from ..engine.data import FaceBatch, FaceIdSource, RealFaces
from ..engine.errors import model_option
from ..engine.trainer import MicroStep, RunContext
from ._entry import StageEntry
from .distill import PREDICTION_TYPES, distill_trajectory, q_sample, sample_num_steps, trajectory_timesteps

STUDENT_PROMPT = "photo of a z"


@dataclass
class Stage1Models:
    tokenizer: Any
    text_encoder: torch.nn.Module  # frozen SD-1.5 text encoder (student prompt encoder)
    unet: torch.nn.Module  # frozen SD-1.5 UNet (student)
    teacher: Any  # adaface.models.Arc2Face with its UNet
    inverter: torch.nn.Module  # the only trainable part
    alphas_cumprod: torch.Tensor
    vae: torch.nn.Module | None
    vae_scale: float
    latent_size: int
    prediction_type: str = "epsilon"  # the scheduler's UNet output parameterisation (distill.PREDICTION_TYPES)


@dataclass(frozen=True)
class DistillSettings:
    """The multi-timestep distillation options (a subset of Stage1Config, so stage 2 can set its own)."""

    denoise_steps: Sequence[int] = (1, 3, 5)
    denoise_step_weights: Sequence[float] = (0.4, 0.3, 0.2)
    t_min: int = 1
    t_max: int = 1000
    loss_reduction: str = "sum"

    @classmethod
    def from_config(cls, cfg: Any) -> DistillSettings:
        return cls(tuple(cfg.denoise_steps), tuple(cfg.denoise_step_weights), cfg.t_min, cfg.t_max,
                   cfg.loss_reduction)


def build_tiny_models(root: Path, seed: int) -> tuple[Path, Path]:
    """A tiny SD-1.5 folder and an Arc2Face folder derived from it (copies of its UNet and text encoder).

    Arc2Face is a fine-tune of SD-1.5, so the tiny teacher starts from the tiny student's weights: the
    student can then match the teacher through its context alone, which keeps the problem learnable.
    """
    from adaface.testing.tiny_models import save_tiny_sd15

    sd, a2f = root / "sd15", root / "arc2face"
    remove_stale_builds(root)
    if (a2f / "encoder" / "config.json").is_file() and (sd / "model_index.json").is_file():
        return sd, a2f  # deterministic builders: reuse (resume, or a rerun with the same output dir)
    tmp = root / f".build-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_tiny_sd15(tmp / "sd15", seed=seed)
    (tmp / "arc2face").mkdir()
    for src, dst in (("unet", "arc2face"), ("text_encoder", "encoder"), ("tokenizer", "tokenizer")):
        shutil.copytree(tmp / "sd15" / src, tmp / "arc2face" / dst)
    for name in ("sd15", "arc2face"):
        shutil.rmtree(root / name, ignore_errors=True)
        os.replace(tmp / name, root / name)
    shutil.rmtree(tmp, ignore_errors=True)
    return sd, a2f


def remove_stale_builds(root: Path) -> list[Path]:
    """Remove `.build-PID` folders under root whose process is gone (a build killed half-way); returns them."""
    removed = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        m = re.fullmatch(r"\.build-(\d+)", p.name)
        if m is None or int(m.group(1)) == os.getpid() or _process_alive(int(m.group(1))):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _vae_scale_factor(sd_model: str) -> int:
    cfg_path = Path(sd_model) / "vae" / "config.json"
    if cfg_path.is_file():
        return 2 ** (len(json.loads(cfg_path.read_text())["block_out_channels"]) - 1)
    return 8  # SD-1.5


def check_resolution(resolution: int, sd_model: str, unet: Any) -> None:
    """--resolution must give a latent the UNet's down blocks can halve to at least one position each time."""
    vae_scale = _vae_scale_factor(sd_model)
    halvings = 2 ** (len(unet.config.down_block_types) - 1)
    step = vae_scale * halvings
    if resolution % step or resolution < step:
        raise ConfigError(f"--resolution {resolution}: must be a positive multiple of {step} for this model (VAE "
                          f"scale {vae_scale} x {halvings} for the UNet's down blocks)")


def sd_models() -> dict[str, type]:
    """The SD-1.5 pipeline's models the training stages build, by component folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    return {"text_encoder": CLIPTextModel, "unet": UNet2DConditionModel, "vae": AutoencoderKL}


class SDParts(NamedTuple):
    """What both stages load from `--sd-model` (the VAE aside: stage 1 needs it only for real images)."""

    pin: dict[str, Any]  # the revision every further load of `--sd-model` must use
    scheduler: Any
    prediction_type: str
    tokenizer: Any
    text_encoder: Any
    unet: Any


def load_sd_parts(sd_model: str, resolution: int) -> SDParts:
    """`--sd-model`'s scheduler, tokenizer, text encoder and UNet (evaluation mode), after its configs are checked.

    No config may load code or a hub kernel, nor declare a model larger than its weights (a hub id: checked on its
    snapshot, and every load pinned to the files checked)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from adaface.models._io import check_model_source

    with model_option("--sd-model", sd_model):
        _, pin = check_model_source(sd_model, sd_models())
    scheduler = DDPMScheduler.from_pretrained(sd_model, subfolder="scheduler", **pin)
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"--sd-model: the scheduler's prediction_type {prediction_type!r} is not supported "
                          f"({' or '.join(PREDICTION_TYPES)})")
    tokenizer = CLIPTokenizer.from_pretrained(sd_model, subfolder="tokenizer", **pin)
    text_encoder = CLIPTextModel.from_pretrained(sd_model, subfolder="text_encoder", **pin).eval()
    unet = UNet2DConditionModel.from_pretrained(sd_model, subfolder="unet", **pin).eval()
    check_resolution(resolution, sd_model, unet)
    return SDParts(pin, scheduler, prediction_type, tokenizer, text_encoder, unet)


def load_models(cfg: Stage1Config, sd_model: str, arc2face: str, device: torch.device,
                weight_dtype: torch.dtype) -> Stage1Models:
    """Student (SD-1.5 text encoder + UNet, frozen), teacher (Arc2Face, frozen), a fresh inverter, and the VAE
    when real images are used."""
    from diffusers import AutoencoderKL

    from adaface.models.arc2face import Arc2Face
    from adaface.models.prompt_inverter import PromptInverter

    pin, scheduler, prediction_type, tokenizer, text_encoder, unet = load_sd_parts(sd_model, cfg.resolution)
    with model_option("--arc2face", arc2face):
        teacher = Arc2Face.from_pretrained(arc2face, tokenizer=tokenizer)
    with model_option("--inverter-init" if cfg.inverter_init else "--sd-model", cfg.inverter_init or sd_model):
        inverter = PromptInverter(cfg.inverter_init or sd_model, tokenizer=tokenizer, mode=cfg.expand_mode)
    vae = None
    if cfg.data_dir and cfg.random_id_fraction < 1.0:
        vae = AutoencoderKL.from_pretrained(sd_model, subfolder="vae", **pin).eval()
        vae.requires_grad_(False).to(device, weight_dtype)
    for m in (text_encoder, unet, teacher):
        m.requires_grad_(False).to(device, weight_dtype)
    if cfg.gradient_checkpointing:
        # the student UNet is frozen but gradients flow through it to the context: checkpointing trades its
        # activation memory for a recompute; the teacher runs without a graph and needs none
        unet.enable_gradient_checkpointing()
    inverter.to(device).train()
    factor = _vae_scale_factor(sd_model)
    return Stage1Models(tokenizer, text_encoder, unet, teacher, inverter,
                        scheduler.alphas_cumprod.to(torch.float32), vae,
                        float(getattr(getattr(vae, "config", None), "scaling_factor", 0.18215)),
                        cfg.resolution // factor, prediction_type)


def encode_student_prompt(m: Stage1Models, subject: torch.Tensor) -> torch.Tensor:
    from adaface.models.subject_prompt import encode_prompt

    return encode_prompt(m.tokenizer, m.text_encoder, [STUDENT_PROMPT] * subject.shape[0],
                         subject.to(m.text_encoder.dtype))


def trajectory_start(m: Stage1Models, batch: FaceBatch, t1: torch.Tensor, g: torch.Generator,
                     device: torch.device) -> torch.Tensor:
    """x_{t_1}: a real face's latent noised to t_1; a random ID has no image, so it starts from pure noise."""
    b, size = batch.arcface.shape[0], m.latent_size
    noise = torch.randn(b, 4, size, size, generator=g)
    x = noise.clone()
    if batch.images is not None:
        with torch.no_grad():
            img = batch.images.to(device, m.vae.dtype)
            dist = m.vae.encode(img).latent_dist
            lat = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(device, img.dtype))
            lat = lat.float().cpu() * m.vae_scale
        x[batch.is_real] = q_sample(lat, t1[batch.is_real], noise[batch.is_real], m.alphas_cumprod)
    return x.to(device)


def stage1_loss(models: Stage1Models, batch: FaceBatch, generator: torch.Generator, *,
                settings: DistillSettings, inverter: torch.nn.Module | None = None,
                backward_scale: float | None = 1.0,
                autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                ) -> tuple[torch.Tensor, dict[str, Any]]:
    """The stage-1 distillation loss of one micro-batch (paper eq. 2), back-propagated into the inverter.

    `inverter` defaults to `models.inverter` (pass its DDP wrapper under torchrun). With `backward_scale` set, the
    gradient of `backward_scale x loss` is accumulated into the inverter here, one UNet graph at a time, and the
    returned loss is detached; with None nothing is back-propagated. Randomness (trajectory length, timesteps,
    noise) comes from `generator`, after the caller drew `batch` from it.
    Returns (combined loss, terms): `loss_mse` is the mean MSE per denoising step (comparable across trajectory
    lengths), `loss_steps` the per-denoising-step MSEs, `real_samples` the number of real faces in the batch.
    """
    m, s, g = models, settings, generator
    inverter = m.inverter if inverter is None else inverter
    device = next(m.unet.parameters()).device
    k = sample_num_steps(s.denoise_steps, s.denoise_step_weights, g)
    # A random ID has no image, so its trajectory starts from pure noise, which is x_t only at the top of the
    # schedule: its first step is at t_max - 1 (the later, smaller steps stay as drawn); real faces keep t_1.
    ts = trajectory_timesteps(k, batch.is_real, s.t_min, s.t_max, g)
    x = trajectory_start(m, batch, ts[0], g, device)  # fp32: cast only at the UNet calls
    arcface = batch.arcface.to(device)

    # teacher context and ID tokens (no graph), then the student context through the inverter (with graph)
    with autocast():
        with torch.no_grad():
            teacher_ctx = m.teacher.prompt_embeds(arcface)
            p = m.teacher.id_position
            id_tokens = teacher_ctx[:, p:p + m.teacher.num_id_tokens].float()
        subject = inverter(id_tokens)
        student_ctx = encode_student_prompt(m, subject)

    def teacher(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast():
            return m.teacher.unet(xt.to(m.teacher.unet.dtype), t, encoder_hidden_states=teacher_ctx).sample

    def student(xt: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        with autocast():
            return m.unet(xt.to(m.unet.dtype), t, encoder_hidden_states=ctx.to(m.unet.dtype)).sample

    # the trajectory: per-step MSEs, gradients accumulated into the inverter
    res = distill_trajectory(x, ts, teacher, student, student_ctx, m.alphas_cumprod, g,
                             reduction=s.loss_reduction, backward_scale=backward_scale,
                             prediction_type=m.prediction_type)
    steps = torch.stack(res.step_mse).to(torch.float64)
    loss = (steps * res.weight).sum()
    return loss, {"loss_mse": steps.mean(), "loss_steps": list(res.step_mse),
                  "real_samples": int(batch.is_real.sum())}


class Stage1:
    """Stage 1 as the shared trainer sees it (adaface.training.engine.trainer.Stage)."""

    name = "stage1"
    checkpoint_name = "inverter"
    plateau_metric = "loss_mse"

    def __init__(self, cfg: Stage1Config, models: Stage1Models, source: FaceIdSource) -> None:
        self.cfg, self.models, self.source = cfg, models, source
        self.settings = DistillSettings.from_config(cfg)
        self.trainable = models.inverter

    @classmethod
    def build(cls, ctx: RunContext) -> Stage1:
        cfg: Stage1Config = ctx.cfg  # type: ignore[assignment]
        # the data first: its problems are reported before any model loads
        real = None
        if cfg.data_dir:
            real = RealFaces(cfg.data_dir, cfg.resolution, cfg.seed, ctx.info, on_bad_data=cfg.on_bad_data)
        if cfg.tiny:
            from ..engine.ddp import barrier

            tiny_root = ctx.output_dir / "tiny_models" / f"seed{cfg.seed}"
            if ctx.info.is_main:
                build_tiny_models(tiny_root, cfg.seed)
            barrier()
            sd_model, arc2face = str(tiny_root / "sd15"), str(tiny_root / "arc2face")
        else:
            sd_model, arc2face = cfg.sd_model, cfg.arc2face
        models = load_models(cfg, sd_model, arc2face, ctx.device, ctx.weight_dtype)
        return cls(cfg, models, FaceIdSource(real, cfg.random_id_fraction))

    def micro_loss(self, ms: MicroStep) -> tuple[torch.Tensor, dict[str, Any]]:
        batch = self.source.sample(self.cfg.batch_size, ms.generator)
        return stage1_loss(self.models, batch, ms.generator, settings=self.settings, inverter=ms.model,
                           backward_scale=ms.backward_scale, autocast=ms.autocast)

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.source.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state["data"])

    def save_final(self, output_dir: Path) -> Path:
        return self.models.inverter.save_pretrained(output_dir / "inverter")


_ENTRY = StageEntry("stage1", Stage1.build, parse_config)
run = _ENTRY.run  # train stage 1 according to a validated config (adaface.training.engine.config.parse_config)
main = _ENTRY.main  # the `training/stage1.py` command line (returns the exit status)

"""AdaFace stage 1 — face distillation: train the Prompt Inverter to make SD-1.5 imitate Arc2Face.

    python training/stage1.py                          # tiny preset (training/configs/tiny.json), CPU, minutes
    python training/stage1.py --config training/configs/paper.json \\
        --sd-model stable-diffusion-v1-5/stable-diffusion-v1-5 --arc2face models/ --output-dir runs/stage1
    torchrun --nproc_per_node 2 training/stage1.py --config ...   # DDP
    python training/stage1.py ... --resume                # continue from the latest checkpoint

Per optimizer step and micro-batch: draw face IDs (random Gaussian, or real faces with their ArcFace
embeddings), let Arc2Face (teacher) encode them into its context and 16 image-space ID tokens, let the
inverter map those tokens to 16 text-space embeddings, write them into `photo of a z` and encode that with the
frozen SD text encoder (student context), then distil the teacher UNet's noise predictions into the frozen SD
UNet along one multi-timestep trajectory (adaface.training.distill). Only the inverter trains. When the
smoothed loss plateaus (or at --expand-at), the inverter's attention is expanded by the next stage of
--expansions and the Prodigy state is rebuilt (adaface.training.optim).

Outputs in OUTPUT_DIR: metrics.jsonl (one JSON object per step/event), checkpoints/step-NNNNNNNN/ (safetensors
+ JSON, the last K), inverter/ (PromptInverter.save_pretrained) and, for the tiny preset, tiny_models/.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adaface.training import checkpoint as ckpt
from adaface.training.config import ConfigError, Stage1Config, parse_config
from adaface.training.data import FaceIdSource, RealFaces
from adaface.training.ddp import (
    DistInfo,
    all_reduce_mean,
    barrier,
    broadcast_flag,
    dist_env,
    init_distributed,
    max_param_difference,
    rank_seed,
    shared_seed,
    shutdown_distributed,
)
from adaface.training.distill import (
    DistillResult,
    combined_loss,
    distill_trajectory,
    losses_to_floats,
    q_sample,
    sample_num_steps,
    trajectory_timesteps,
)
from adaface.training.expansion import ExpansionSchedule, format_stage
from adaface.training.metrics_log import MetricsLog, read_jsonl
from adaface.training.optim import (
    build_optimizer,
    build_scheduler,
    load_scheduler_state,
    scheduler_state,
    snapshot_state,
    transfer_state,
)
from adaface.training.plateau import PlateauDetector

DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "tiny.json")
STUDENT_PROMPT = "photo of a z"

# Test hook (tests/test_training_stage1.py): with ADAFACE_TEST_SIGKILL_AT_STEP=N the trainer sends SIGKILL to
# itself in the middle of optimizer step N + 1 (after its forward/backward passes, before its update), i.e. after
# step N was completed, logged and (if due) checkpointed. The kill is deterministic, and everything after the last
# checkpoint is unsaved progress that a --resume must redo. Never set it outside tests.
TEST_SIGKILL_ENV = "ADAFACE_TEST_SIGKILL_AT_STEP"


def _test_sigkill_step() -> int | None:
    value = os.environ.get(TEST_SIGKILL_ENV, "").strip()
    return int(value) if value else None


# ---- models ------------------------------------------------------------------------------------------------


@dataclass
class Models:
    tokenizer: Any
    text_encoder: torch.nn.Module  # frozen SD-1.5 text encoder (student prompt encoder)
    unet: torch.nn.Module  # frozen SD-1.5 UNet (student)
    teacher: Any  # adaface.models.Arc2Face with its UNet
    inverter: torch.nn.Module  # the only trainable part
    alphas_cumprod: torch.Tensor
    vae: torch.nn.Module | None
    vae_scale: float
    latent_size: int


def build_tiny_models(root: Path, seed: int) -> tuple[Path, Path]:
    """A tiny SD-1.5 folder and an Arc2Face folder derived from it (copies of its UNet and text encoder).

    Arc2Face is a fine-tune of SD-1.5, so the tiny teacher starts from the tiny student's weights: the
    student can then match the teacher through its context alone, which keeps the problem learnable.
    """
    from adaface.testing.tiny_models import save_tiny_sd15

    sd, a2f = root / "sd15", root / "arc2face"
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


def _vae_scale_factor(sd_model: str) -> int:
    import json

    cfg_path = Path(sd_model) / "vae" / "config.json"
    if cfg_path.is_file():
        return 2 ** (len(json.loads(cfg_path.read_text())["block_out_channels"]) - 1)
    return 8  # SD-1.5


def load_models(cfg: Stage1Config, sd_model: str, arc2face: str, device: torch.device,
                weight_dtype: torch.dtype) -> Models:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from adaface.models.arc2face import Arc2Face
    from adaface.models.prompt_inverter import PromptInverter

    tokenizer = CLIPTokenizer.from_pretrained(sd_model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(sd_model, subfolder="text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(sd_model, subfolder="unet").eval()
    scheduler = DDPMScheduler.from_pretrained(sd_model, subfolder="scheduler")
    teacher = Arc2Face.from_pretrained(arc2face, tokenizer=tokenizer)
    inverter = PromptInverter(cfg.inverter_init or sd_model, tokenizer=tokenizer, mode=cfg.expand_mode)
    vae = None
    if cfg.data_dir and cfg.random_id_fraction < 1.0:
        vae = AutoencoderKL.from_pretrained(sd_model, subfolder="vae").eval()
        vae.requires_grad_(False).to(device, weight_dtype)
    for m in (text_encoder, unet, teacher):
        m.requires_grad_(False).to(device, weight_dtype)
    if cfg.gradient_checkpointing:
        # the student UNet is frozen but gradients flow through it to the context: checkpointing trades its
        # activation memory for a recompute; the teacher runs without a graph and needs none
        unet.enable_gradient_checkpointing()
    inverter.to(device).train()
    factor = _vae_scale_factor(sd_model)
    return Models(tokenizer, text_encoder, unet, teacher, inverter,
                  scheduler.alphas_cumprod.to(torch.float32), vae,
                  float(getattr(getattr(vae, "config", None), "scaling_factor", 0.18215)),
                  cfg.resolution // factor)


# ---- training state ----------------------------------------------------------------------------------------


@dataclass
class TrainState:
    step: int = 0  # completed optimizer steps
    pending_expansion: bool = False  # the plateau detector fired at the end of the last step
    expansions: list[dict] = field(default_factory=list)


def named_trainable(inverter: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in inverter.named_parameters() if p.requires_grad}


class Trainer:
    """The optimizer, scheduler, DDP wrapper, expansion and checkpoint state, and one optimizer step."""

    def __init__(self, cfg: Stage1Config, models: Models, device: torch.device, info: DistInfo,
                 source: FaceIdSource, log: MetricsLog) -> None:
        self.cfg, self.m, self.device, self.info, self.source, self.log = cfg, models, device, info, source, log
        self.schedule = ExpansionSchedule.parse(cfg.expansions)
        self.schedule.check_layers(len(models.inverter.multipliers))
        self.detector = PlateauDetector(cfg.plateau_window, cfg.plateau_tolerance, cfg.plateau_patience)
        self.state = TrainState()
        self.amp_dtype = _amp_dtype(cfg, device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.sigkill_at_step = _test_sigkill_step()
        self._build_optimizer()

    # -- optimizer / DDP -------------------------------------------------------------------------------------
    def _build_optimizer(self) -> None:
        named = named_trainable(self.m.inverter)
        self.names = {p: n for n, p in named.items()}
        c = self.cfg
        self.optimizer = build_optimizer(named.values(), lr=c.lr, d0=c.d0, d_coef=c.d_coef, weight_decay=c.weight_decay,
                                         safeguard_warmup=c.safeguard_warmup, bias_correction=c.bias_correction)
        self.scheduler = build_scheduler(self.optimizer, c.warmup_steps)
        self.model = self.m.inverter
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.m.inverter, device_ids=ids, broadcast_buffers=False)

    def expand(self, reason: str) -> None:
        """Next stage of the schedule; same noise on every rank; optimizer state carried over (see optim.py)."""
        inv = self.m.inverter
        before = inv.multipliers
        target = self.schedule.next_multipliers(before)
        stage = format_stage(self.schedule.stages[self.schedule.done])
        old_state, old_group = snapshot_state(self.optimizer, self.names)
        sched = scheduler_state(self.scheduler)
        gen = torch.Generator().manual_seed(shared_seed(self.cfg.seed, "expand", self.schedule.done))
        inv.expand(target, noise_ratio=self.cfg.expand_noise_ratio, generator=gen)
        self.schedule.advance()
        self.detector.reset()
        self._build_optimizer()
        report = transfer_state(self.optimizer, named_trainable(inv), old_state, old_group)
        load_scheduler_state(self.scheduler, sched)
        counts = {k: sum(v == k for v in report.values()) for k in ("kept", "grown", "fresh")}
        n_params = sum(p.numel() for p in named_trainable(inv).values())
        event = {"step": self.state.step, "reason": reason, "stage": stage, "multipliers_before": before,
                 "multipliers": inv.multipliers, "trainable_params": n_params, "optimizer_state": counts}
        self.state.expansions.append(event)
        self.log.write("expansion", **event)
        if self.info.is_main:
            _print(f"[stage1] step {self.state.step}: expansion {stage} ({reason}) -> multipliers {inv.multipliers}, "
                   f"{n_params / 1e6:.2f}M trainable params; optimizer state {counts}")

    # -- one optimizer step ----------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _x_start(self, batch, t1: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b, size = batch.arcface.shape[0], self.m.latent_size
        noise = torch.randn(b, 4, size, size, generator=g)
        x = noise.clone()
        if batch.images is not None:
            # a real face: its latent noised to t_1; a random ID has no image, so it starts from pure noise
            with torch.no_grad():
                img = batch.images.to(self.device, self.m.vae.dtype)
                dist = self.m.vae.encode(img).latent_dist
                lat = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(self.device, img.dtype))
                lat = lat.float().cpu() * self.m.vae_scale
            x[batch.is_real] = q_sample(lat, t1[batch.is_real], noise[batch.is_real], self.m.alphas_cumprod)
        return x.to(self.device)

    def _micro_step(self, micro: int) -> tuple[DistillResult, int]:
        c, m = self.cfg, self.m
        g = torch.Generator().manual_seed(rank_seed(c.seed, self.info.rank, self.state.step, micro))
        batch = self.source.sample(c.batch_size, g)
        k = sample_num_steps(c.denoise_steps, c.denoise_step_weights, g)
        # A random ID has no image, so its trajectory starts from pure noise, which is x_t only at the top of the
        # schedule: its first step is at t_max - 1 (the later, smaller steps stay as drawn); real faces keep t_1.
        ts = trajectory_timesteps(k, batch.is_real, c.t_min, c.t_max, g)
        x = self._x_start(batch, ts[0], g).to(m.unet.dtype)
        arcface = batch.arcface.to(self.device)
        with self._autocast():
            with torch.no_grad():
                teacher_ctx = m.teacher.prompt_embeds(arcface)
                p = m.teacher.id_position
                id_tokens = teacher_ctx[:, p:p + m.teacher.num_id_tokens].float()
            subject = self.model(id_tokens)
            student_ctx = _encode_prompt(m, subject)

        def teacher(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with self._autocast():
                return m.teacher.unet(xt, t, encoder_hidden_states=teacher_ctx).sample

        def student(xt: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
            with self._autocast():
                return m.unet(xt, t, encoder_hidden_states=ctx).sample

        scale = 1.0 / c.grad_accum * (self.scaler.get_scale() if self.scaler is not None else 1.0)
        res = distill_trajectory(x, ts, teacher, student, student_ctx, m.alphas_cumprod, g,
                                 reduction=c.loss_reduction, backward_scale=scale)
        return res, int(batch.is_real.sum())

    def train_step(self) -> dict[str, Any]:
        c = self.cfg
        results: list[DistillResult] = []
        n_real = 0
        for micro in range(c.grad_accum):
            last = micro == c.grad_accum - 1
            sync = contextlib.nullcontext() if (last or not self.info.enabled) else self.model.no_sync()
            with sync:
                res, real = self._micro_step(micro)
            results.append(res)
            n_real += real
        if self.sigkill_at_step is not None and self.state.step == self.sigkill_at_step:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)  # test hook (TEST_SIGKILL_ENV): die mid-step, nothing saved
        # the per-denoising-step losses of all micro-batches reach the host in one copy (one sync per step)
        flat = iter(losses_to_floats([t for r in results for t in r.step_mse]))
        step_losses = [[next(flat) for _ in r.step_mse] for r in results]
        losses = [combined_loss(s, r.weight) for s, r in zip(step_losses, results)]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = list(self.names)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip if c.grad_clip > 0 else math.inf)
        group = self.optimizer.param_groups[0]
        lr, d = float(group["lr"]), float(group["d"])  # what this step uses (Prodigy updates d in step())
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # per-denoising-step MSE: comparable across trajectories of different length k
        mse = sum(sum(s) / len(s) for s in step_losses) / len(step_losses)
        loss, mse = all_reduce_mean([sum(losses) / len(losses), mse], self.device)
        return {"loss": loss, "mse": mse, "step_losses": step_losses, "grad_norm": float(grad_norm),
                "lr": lr, "d": d, "d_lr": d * lr, "d_next": float(self.optimizer.param_groups[0]["d"]),
                "real_samples": n_real}

    # -- checkpoints -----------------------------------------------------------------------------------------
    def checkpoint_root(self) -> Path:
        return Path(self.cfg.output_dir) / "checkpoints"

    def save(self) -> Path | None:
        if not self.info.is_main:
            return None
        opt_tensors, opt_meta = ckpt.optimizer_state_to_flat(self.optimizer, self.names)
        rng_tensors, rng_meta = ckpt.capture_rng_state()
        state = {
            "multipliers": self.m.inverter.multipliers,
            "optimizer": opt_meta,
            "scheduler": scheduler_state(self.scheduler),
            "grad_scaler": _scaler_state(self.scaler),
            "expansion_schedule": self.schedule.state_dict(),
            "plateau": self.detector.state_dict(),
            "pending_expansion": self.state.pending_expansion,
            "expansions": self.state.expansions,
            "data": self.source.state_dict(),
            "rng": rng_meta,
            "config": self.cfg.to_json(),
        }
        tensors = {"inverter": self.m.inverter.state_dict(), "optimizer": opt_tensors, "rng": rng_tensors}
        return ckpt.save_checkpoint(self.checkpoint_root(), self.state.step, tensors, state,
                                    keep=self.cfg.keep_checkpoints)

    def load(self, path: Path) -> None:
        tensors, state = ckpt.load_checkpoint(path)
        inv = self.m.inverter
        if state["multipliers"] != inv.multipliers:
            inv.expand(state["multipliers"], noise_ratio=0.0)  # the weights come from the checkpoint
        inv.load_state_dict(tensors["inverter"], strict=True)
        self.schedule.load_state_dict(state["expansion_schedule"])
        self._build_optimizer()
        ckpt.optimizer_state_from_flat(self.optimizer, self.names, tensors["optimizer"], state["optimizer"])
        load_scheduler_state(self.scheduler, state["scheduler"])
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.detector.load_state_dict(state["plateau"])
        self.source.load_state_dict(state["data"])
        ckpt.restore_rng_state(tensors["rng"], state["rng"])
        self.state = TrainState(step=int(state["step"]), pending_expansion=bool(state["pending_expansion"]),
                                expansions=list(state["expansions"]))


def _encode_prompt(m: Models, subject: torch.Tensor) -> torch.Tensor:
    from adaface.models.subject_prompt import encode_prompt

    return encode_prompt(m.tokenizer, m.text_encoder, [STUDENT_PROMPT] * subject.shape[0],
                         subject.to(m.text_encoder.dtype))


def _scaler_state(scaler: torch.amp.GradScaler | None) -> dict | None:
    if scaler is None:
        return None
    return {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in scaler.state_dict().items()}


def _amp_dtype(cfg: Stage1Config, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or cfg.mixed_precision == "no":
        return None
    if cfg.mixed_precision == "fp16":
        return torch.float16
    if cfg.mixed_precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _print(msg: str) -> None:
    print(msg, flush=True)


def _resolve_device(cfg: Stage1Config, info: DistInfo) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", info.local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: CUDA requested but not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return dev


# ---- summary -----------------------------------------------------------------------------------------------


def loss_drop(records: list[dict], key: str = "mse") -> tuple[float, float, float]:
    """(mean of the first 10% of step losses, mean of the last 10%, relative drop)."""
    by_step = {r["step"]: r[key] for r in records if r.get("event") == "step"}
    values = [by_step[s] for s in sorted(by_step)]
    if not values:
        return math.nan, math.nan, math.nan
    n = max(1, len(values) // 10)
    first, last = sum(values[:n]) / n, sum(values[-n:]) / n
    return first, last, (first - last) / first if first > 0 else math.nan


# ---- main --------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    inverter: torch.nn.Module
    summary: dict[str, Any]


def run(cfg: Stage1Config) -> RunResult:
    """Train according to a validated config; returns the (unwrapped) inverter and the summary."""
    info = dist_env()
    device = _resolve_device(cfg, info)
    info = init_distributed(device)
    try:
        return _run(cfg, info, device)
    finally:
        shutdown_distributed()


def _run(cfg: Stage1Config, info: DistInfo, device: torch.device) -> RunResult:
    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(cfg.seed + info.rank)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)

    resume_path = None
    if cfg.resume:
        resume_path = ckpt.latest_checkpoint(out / "checkpoints") if cfg.resume == "latest" else Path(cfg.resume)
        if resume_path is None and info.is_main:
            _print(f"[stage1] --resume: no checkpoint in {out / 'checkpoints'}; starting from scratch")

    if not resume_path and info.is_main and (out / "checkpoints").is_dir():
        shutil.rmtree(out / "checkpoints")  # validation allowed this start only with --overwrite
    if cfg.tiny:
        tiny_root = out / "tiny_models" / f"seed{cfg.seed}"
        if info.is_main:
            build_tiny_models(tiny_root, cfg.seed)
        barrier()
        sd_model, arc2face = str(tiny_root / "sd15"), str(tiny_root / "arc2face")
    else:
        sd_model, arc2face = cfg.sd_model, cfg.arc2face
    amp = _amp_dtype(cfg, device)
    models = load_models(cfg, sd_model, arc2face, device, amp or torch.float32)
    real = RealFaces(cfg.data_dir, cfg.resolution, cfg.seed, info) if cfg.data_dir else None
    source = FaceIdSource(real, cfg.random_id_fraction)

    log = MetricsLog(out / "metrics.jsonl", enabled=info.is_main,
                     resume_step=None if resume_path is None else _checkpoint_step(resume_path))
    trainer = Trainer(cfg, models, device, info, source, log)
    if resume_path is not None:
        trainer.load(resume_path)
    start = trainer.state.step
    n_params = sum(p.numel() for p in named_trainable(models.inverter).values())
    log.write("start", step=start, resumed_from=str(resume_path) if resume_path else None, world_size=info.world_size,
              device=str(device), trainable_params=n_params, multipliers=models.inverter.multipliers,
              config=cfg.to_json())

    bar = None
    if info.is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="stage1", unit="step", dynamic_ncols=True)
    samples_per_step = cfg.batch_size * cfg.grad_accum * info.world_size
    forced = set(cfg.expand_at)
    while trainer.state.step < cfg.steps:
        st = trainer.state
        if (st.pending_expansion or st.step in forced) and not trainer.schedule.exhausted():
            trainer.expand("forced" if st.step in forced else "plateau")
        st.pending_expansion = False
        t0 = time.perf_counter()
        metrics = trainer.train_step()
        st.step += 1
        dt = time.perf_counter() - t0
        plateau = trainer.detector.update(metrics["mse"]) and not trainer.schedule.exhausted()
        st.pending_expansion = broadcast_flag(plateau, device)
        log.write("step", step=st.step, **metrics, smoothed=trainer.detector.smoothed,
                  multipliers=models.inverter.multipliers, samples_per_s=samples_per_step / dt)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['mse']:.4g}", d=f"{metrics['d']:.3g}")
        last = st.step == cfg.steps
        if (cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0) or last:
            path = trainer.save()
            log.write("checkpoint", step=st.step, path=str(path) if path else None)
            barrier()
    if bar is not None:
        bar.close()

    in_sync = max_param_difference(list(named_trainable(models.inverter).values()), device)
    summary: dict[str, Any] = {"steps": cfg.steps, "world_size": info.world_size,
                               "multipliers": models.inverter.multipliers, "ranks_max_param_diff": in_sync}
    if info.is_main:
        inv_dir = models.inverter.save_pretrained(out / "inverter")
        first, last_, drop = loss_drop(read_jsonl(out / "metrics.jsonl"))
        elapsed = time.perf_counter() - t_start
        summary.update(first10=first, last10=last_, drop=drop, seconds=elapsed, inverter=str(inv_dir),
                       expansions=[e["step"] for e in trainer.state.expansions])
        verdict = ""
        if cfg.target_drop > 0:
            verdict = " PASS" if drop >= cfg.target_drop else " FAIL"
            verdict += f" (target >= {cfg.target_drop:.0%})"
        log.write("summary", step=cfg.steps, **summary)
        _print(f"[stage1] done: {cfg.steps} steps in {elapsed:.1f}s; loss per denoising step first 10% {first:.4g} "
               f"-> last 10% {last_:.4g} ({drop:+.1%} drop){verdict}; expansions at steps "
               f"{summary['expansions']}, multipliers {summary['multipliers']}; inverter saved to {inv_dir}")
    log.close()
    return RunResult(models.inverter, summary)


def _checkpoint_step(path: Path) -> int:
    import json

    return int(json.loads((path / ckpt.STATE_FILE).read_text())["step"])


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv, default_config=DEFAULT_CONFIG, world_size=dist_env().world_size)
    except ConfigError as e:
        print(f"stage1: configuration error: {e}", file=sys.stderr)
        return 2
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())

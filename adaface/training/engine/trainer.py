"""The training loop shared by both stages: optimizer and expansion, DDP, checkpoints and resume, metrics, progress.

How a stage plugs in
--------------------
A stage is an object with these members (see `Stage`); the scripts in training/ build one and call
`run_training(cfg, build_stage)`:

- `name: str` -- shown in messages and on the progress bar ("stage1");
- `trainable: torch.nn.Module` -- the only module the optimizer trains (its parameters with requires_grad).
  If the config's `expansions` schedule is not empty, it must offer `multipliers`,
  `expand(multipliers, noise_ratio=, generator=)` and `expansion_size(multipliers)` (the elements `expand` would
  add, which a resume compares with the checkpoint's weights first), as `PromptInverter` does; with
  `expansions=""` nothing is ever expanded, so a stage starting from an already expanded inverter simply sets that;
- `checkpoint_name: str` -- the file name of the trainable module's tensors in a checkpoint ("inverter");
- `plateau_metric: str` -- the per-step metric the plateau detector watches ("loss" or one of the loss terms);
- `micro_loss(ms: MicroStep) -> (loss, terms)` -- one micro-batch. `loss` is a scalar tensor; if it carries a
  graph (`requires_grad`), the trainer back-propagates `loss * ms.backward_scale`; a detached loss means the
  stage back-propagated itself with `ms.backward_scale` (stage 1 does, one UNet graph at a time). Call the
  trainable module through `ms.model` (the DDP wrapper under torchrun), draw all randomness from
  `ms.generator` (seeded per rank, step and micro-batch: a resumed run draws what an uninterrupted one would),
  and run forward passes under `ms.autocast()`. `terms` maps names to 0-dim tensors, floats or lists of them:
  names starting with `loss_` are losses (averaged over micro-batches and ranks, logged per step), a list is
  logged per micro-batch, any other name is a host-side counter summed over micro-batches. Return tensors, not
  floats: the trainer copies every value of a step to the host at once (one device sync per step);
- `state_dict() -> dict` / `load_state_dict(dict)` -- extra JSON state to checkpoint (e.g. a data sampler);
- `save_final(output_dir) -> Path` -- write the trained result at the end (e.g. `save_pretrained`).

A stage that starts from a trained stage-1 inverter loads it with `PromptInverter.from_pretrained(folder)` (it
comes back with its multipliers, already expanded) and runs with `expansions=""`. To mix stage-1 distillation
iterations into another stage, call `adaface.training.method.stage1.stage1_loss(models, batch, ms.generator,
settings=..., inverter=ms.model, backward_scale=ms.backward_scale, autocast=ms.autocast)` from `micro_loss`
with probability p (drawn from `ms.generator`), and return its (loss, terms): it back-propagates itself.

`build_stage(ctx: RunContext) -> Stage` receives the resolved device, the DDP rank info and the autocast dtype,
and loads the models. Each step's metrics (`loss`, the terms, `grad_norm`, `lr`, `d`, ...) go to
OUTPUT_DIR/metrics.jsonl, checkpoints to OUTPUT_DIR/checkpoints/ (adaface.training.engine.checkpoint), the progress bar
shows `loss`. A stage's config is a `TrainingConfig` subclass (adaface.training.engine.config).

Faults: a step whose loss or gradient is not finite is skipped (nothing reaches the weights, the plateau
detector or a checkpoint) and counted; `max_nonfinite_steps` consecutive ones stop the run with an error.
SIGINT/SIGTERM finish the current step, save a checkpoint and stop (all ranks agree first); in the last step
they let the run finish (the final outputs take seconds), and a signal while those are written waits for them.
A second SIGINT aborts at once. Every checkpoint is checked finite before it is written and read back (with its
SHA-256) before older ones are pruned. `--resume` uses the newest intact checkpoint (damaged or unreadable newer
ones are named and set aside as `step-N.damaged`) and refuses a config that differs from the checkpoint's
outside RESUMABLE_CHANGES (steps, checkpoint_every, keep_checkpoints, max_nonfinite_steps, progress,
target_drop, num_threads, device, output_dir), or `steps` below its step; `steps` equal to its step finishes a
run stopped between its last checkpoint and its final outputs. A fresh run that fails before its first step
removes what it added to OUTPUT_DIR; `--overwrite` deletes only the checkpoint folders this trainer wrote.
Test code reaches the loop through `adaface.training.engine.hooks` (callbacks, ADAFACE_TRAINING_HOOK) and
`adaface.training.engine.faults` (signals and non-finite values at chosen steps); `cli_main` turns a stage into a
command line (one-line errors; exit 0, 1 failed, 2 configuration or a file that could not be written, such as a
full disk, 128 + N stopped by signal N).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from . import checkpoint as ckpt
from .config import ConfigError, TrainingConfig
from .ddp import (
    DistInfo,
    agree_flags,
    all_reduce_mean,
    barrier,
    dist_env,
    init_distributed,
    max_param_difference,
    rank_seed,
    shared_seed,
    shutdown_distributed,
)
from .expansion import ExpansionSchedule, format_stage
from .hooks import Callbacks, load_env_hook
from .metrics_log import MetricsLog, read_jsonl
from .optim import (
    build_for_config,
    describe_d,
    load_scheduler_state,
    scheduler_state,
    snapshot_state,
    transfer_state,
)
from .plateau import PlateauDetector
from .signals import StopSignals


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. too many non-finite steps); the message says why, the script exits != 0."""


@dataclass
class MicroStep:
    """What a stage's `micro_loss` gets for one micro-batch."""

    step: int  # optimizer steps completed before this one
    micro: int  # micro-batch index within the step
    generator: torch.Generator  # CPU generator seeded by (seed, rank, step, micro)
    model: torch.nn.Module  # the trainable module, DDP-wrapped under torchrun: call it for the forward pass
    backward_scale: float  # 1 / grad_accum (x the fp16 loss scale)
    autocast: Callable[[], contextlib.AbstractContextManager]


class Stage(Protocol):
    name: str
    trainable: torch.nn.Module
    checkpoint_name: str
    plateau_metric: str

    def micro_loss(self, ms: MicroStep) -> tuple[torch.Tensor, dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def save_final(self, output_dir: Path) -> Path: ...


@dataclass
class RunContext:
    cfg: TrainingConfig
    device: torch.device
    info: DistInfo
    amp_dtype: torch.dtype | None  # autocast dtype on CUDA; None: fp32
    output_dir: Path

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype for frozen models' weights."""
        return self.amp_dtype or torch.float32


@dataclass
class TrainState:
    step: int = 0  # completed optimizer steps (skipped non-finite steps included)
    pending_expansion: bool = False  # the plateau detector fired at the end of the last step
    expansions: list[dict] = field(default_factory=list)
    skipped_steps: int = 0  # non-finite steps skipped so far
    nonfinite_streak: int = 0  # consecutive ones


def named_trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def _print(msg: str) -> None:
    print(msg, flush=True)


class Trainer:
    """The optimizer, scheduler, DDP wrapper, expansion and checkpoint state of one run, and its optimizer step."""

    def __init__(self, cfg: TrainingConfig, stage: Stage, device: torch.device, info: DistInfo, log: MetricsLog,
                 amp_dtype: torch.dtype | None = None) -> None:
        self.cfg, self.stage, self.device, self.info, self.log = cfg, stage, device, info, log
        self.module = stage.trainable
        self.schedule = ExpansionSchedule.parse(cfg.expansions)
        if self.schedule.stages:
            if not hasattr(self.module, "multipliers"):
                raise ConfigError(f"--expansions: {stage.name}'s trainable module cannot be expanded; pass "
                                  "--expansions ''")
            self.schedule.check_layers(len(self.module.multipliers))
        self.detector = PlateauDetector(cfg.plateau_window, cfg.plateau_tolerance, cfg.plateau_patience)
        self.state = TrainState()
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        self.callbacks = Callbacks()
        self._build_optimizer()

    @property
    def multipliers(self) -> list[int] | None:
        return getattr(self.module, "multipliers", None)

    # -- optimizer / DDP -------------------------------------------------------------------------------------
    def _build_optimizer(self) -> None:
        named = named_trainable(self.module)
        self.names = {p: n for n, p in named.items()}
        self.optimizer, self.scheduler = build_for_config(named.values(), self.cfg)
        self.model = self.module
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.module, device_ids=ids, broadcast_buffers=False)

    def expand(self, reason: str) -> None:
        """Next stage of the schedule; same noise on every rank; optimizer state carried over (see optim.py)."""
        inv = self.module
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
            _print(f"[{self.stage.name}] step {self.state.step}: expansion {stage} ({reason}) -> multipliers "
                   f"{inv.multipliers}, {n_params / 1e6:.2f}M trainable params; optimizer state {counts}")

    # -- one optimizer step ----------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def micro_step(self, micro: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """One micro-batch of the stage's loss, back-propagated (scaled for accumulation and fp16)."""
        c = self.cfg
        g = torch.Generator().manual_seed(rank_seed(c.seed, self.info.rank, self.state.step, micro))
        scale = 1.0 / c.grad_accum * (self.scaler.get_scale() if self.scaler is not None else 1.0)
        ms = MicroStep(self.state.step, micro, g, self.model, scale, self.autocast)
        loss, terms = self.stage.micro_loss(ms)
        if loss.requires_grad:
            (loss * scale).backward()
        return loss.detach(), terms

    def train_step(self) -> dict[str, Any]:
        """Forward/backward over the micro-batches, then the update unless the loss or gradient is not finite."""
        c = self.cfg
        # forward and backward of every micro-batch; DDP all-reduces the gradients on the last one only
        results = []
        for micro in range(c.grad_accum):
            last = micro == c.grad_accum - 1
            sync = contextlib.nullcontext() if (last or not self.info.enabled) else self.model.no_sync()
            with sync:
                results.append(self.micro_step(micro))

        # gradient norm (clipped), then every value of the step reaches the host in one copy
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.names), c.grad_clip if c.grad_clip > 0 else math.inf)
        micro_values, grad_norm_f = _to_host(results, grad_norm)
        metrics = _aggregate(micro_values)
        losses = [k for k, v in metrics.items() if _is_loss(k) and not isinstance(v, list)]
        # the mean over ranks: a non-finite value on any rank makes every rank skip the update
        *reduced, grad_norm_f = all_reduce_mean([metrics[k] for k in losses] + [grad_norm_f], self.device)
        metrics.update(zip(losses, reduced))

        # the update, only with a finite loss and gradient (the same decision on every rank: both are reduced)
        group = self.optimizer.param_groups[0]
        lr, d = float(group["lr"]), float(group["d"])  # what this step uses (Prodigy updates d in step())
        finite = math.isfinite(grad_norm_f) and all(math.isfinite(metrics[k]) for k in losses)
        if finite:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
        elif self.scaler is not None:
            self.scaler.update()  # lowers the fp16 loss scale; the optimizer does not step
        self.optimizer.zero_grad(set_to_none=True)
        return {**metrics, "grad_norm": grad_norm_f, "lr": lr, "d": d, "d_lr": d * lr,
                "d_next": float(self.optimizer.param_groups[0]["d"]), "skipped": not finite}

    # -- checkpoints -----------------------------------------------------------------------------------------
    def checkpoint_root(self) -> Path:
        return Path(self.cfg.output_dir) / "checkpoints"

    def save(self) -> Path | None:
        if not self.info.is_main:
            return None
        opt_tensors, opt_meta = ckpt.optimizer_state_to_flat(self.optimizer, self.names)
        rng_tensors, rng_meta = ckpt.capture_rng_state()
        state = {
            "multipliers": self.multipliers,
            "optimizer": opt_meta,
            "scheduler": scheduler_state(self.scheduler),
            "grad_scaler": _scaler_state(self.scaler),
            "expansion_schedule": self.schedule.state_dict(),
            "plateau": self.detector.state_dict(),
            "pending_expansion": self.state.pending_expansion,
            "expansions": self.state.expansions,
            "skipped_steps": self.state.skipped_steps,
            "nonfinite_streak": self.state.nonfinite_streak,
            "stage": self.stage.state_dict(),
            "rng": rng_meta,
            "config": self.cfg.to_json(),
        }
        tensors = {self.stage.checkpoint_name: self.module.state_dict(), "optimizer": opt_tensors,
                   "rng": rng_tensors}
        bad = [f"{group}/{name}" for group in (self.stage.checkpoint_name, "optimizer")
               for name, t in tensors[group].items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise TrainingError(f"refusing to write checkpoint {self.state.step}: non-finite values in "
                                f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
        return ckpt.save_checkpoint(self.checkpoint_root(), self.state.step, tensors, state,
                                    keep=self.cfg.keep_checkpoints)

    def load(self, path: Path) -> None:
        tensors, state = ckpt.load_checkpoint(path)
        self.load_state(tensors, state)

    def load_state(self, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> None:
        inv = self.module
        if state["multipliers"] is not None and state["multipliers"] != inv.multipliers:
            check_declared_expansion(inv, state["multipliers"], tensors[self.stage.checkpoint_name],
                                     self.stage.checkpoint_name)
            inv.expand(state["multipliers"], noise_ratio=0.0)  # the weights come from the checkpoint
        inv.load_state_dict(tensors[self.stage.checkpoint_name], strict=True)
        self.schedule.load_state_dict(state["expansion_schedule"])
        self._build_optimizer()
        ckpt.optimizer_state_from_flat(self.optimizer, self.names, tensors["optimizer"], state["optimizer"])
        load_scheduler_state(self.scheduler, state["scheduler"])
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.detector.load_state_dict(state["plateau"])
        self.stage.load_state_dict(state["stage"])
        ckpt.restore_rng_state(tensors["rng"], state["rng"])
        self.state = TrainState(step=int(state["step"]), pending_expansion=bool(state["pending_expansion"]),
                                expansions=list(state["expansions"]),
                                skipped_steps=int(state.get("skipped_steps", 0)),
                                nonfinite_streak=int(state.get("nonfinite_streak", 0)))


def check_declared_expansion(module: torch.nn.Module, multipliers: Any, stored: dict[str, torch.Tensor],
                             name: str) -> None:
    """Refuse a checkpoint whose state.json declares multipliers its weights do not hold, before `expand`
    allocates them: the expanded module must have exactly as many elements as `<name>.safetensors` (already read,
    so resuming never allocates more than the checkpoint's own size)."""
    size = getattr(module, "expansion_size", None)
    if size is None:
        raise ValueError(f"{ckpt.STATE_FILE} declares multipliers {multipliers!r}, but the trainable module "
                         "cannot be expanded")
    try:
        added = size(multipliers)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{ckpt.STATE_FILE}: multipliers {multipliers!r}: {e}") from None
    declared = sum(t.numel() for t in module.state_dict().values()) + added
    held = sum(t.numel() for t in stored.values())
    if declared != held:
        raise ValueError(f"{ckpt.STATE_FILE} declares multipliers {multipliers} ({declared:,} elements) but "
                         f"{name}.safetensors holds {held:,}; refused before allocating (the declared sizes must "
                         "match the weights)")


def _is_loss(name: str) -> bool:
    return name == "loss" or name.startswith("loss_")


def _flatten(values: Any) -> Iterator[torch.Tensor]:
    if isinstance(values, torch.Tensor):
        yield values
    elif isinstance(values, (list, tuple)):
        for v in values:
            yield from _flatten(v)


def _rebuild(values: Any, it: Iterator[float]) -> Any:
    if isinstance(values, torch.Tensor):
        return next(it)
    if isinstance(values, (list, tuple)):
        return [_rebuild(v, it) for v in values]
    return float(values) if isinstance(values, float) else values


def _to_host(results: list[tuple[torch.Tensor, dict[str, Any]]],
             grad_norm: torch.Tensor) -> tuple[list[dict[str, Any]], float]:
    """Every tensor of a step's micro-batch results (and the gradient norm) as Python numbers, in one copy."""
    tensors = [t for loss, terms in results for t in (loss, *_flatten(list(terms.values())))]
    tensors.append(grad_norm)
    flat = torch.stack([t.detach().reshape(()).to(torch.float64) for t in tensors]).tolist()
    it = iter(flat)
    out = []
    for loss, terms in results:
        rec = {"loss": _rebuild(loss, it)}
        rec.update({k: _rebuild(v, it) for k, v in terms.items()})
        out.append(rec)
    return out, next(it)


def _aggregate(micro_values: list[dict[str, Any]]) -> dict[str, Any]:
    """Scalar losses: the mean over micro-batches; lists: one per micro-batch; other numbers: the sum."""
    out: dict[str, Any] = {}
    for name in micro_values[0]:
        vals = [m[name] for m in micro_values]
        if isinstance(vals[0], list):
            out[name] = vals
        elif _is_loss(name):
            out[name] = sum(vals) / len(vals)
        else:
            out[name] = sum(vals)
    return out


def _scaler_state(scaler: torch.amp.GradScaler | None) -> dict | None:
    if scaler is None:
        return None
    return {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in scaler.state_dict().items()}


# ---- run ---------------------------------------------------------------------------------------------------


def amp_dtype_for(cfg: TrainingConfig, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or cfg.mixed_precision == "no":
        return None
    if cfg.mixed_precision == "fp16":
        return torch.float16
    if cfg.mixed_precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def resolve_device(cfg: TrainingConfig, info: DistInfo) -> torch.device:
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


def loss_drop(records: list[dict], key: str = "loss") -> tuple[float, float, float]:
    """(mean of the first 10% of step losses, mean of the last 10%, relative drop); skipped steps are left out."""
    by_step = {r["step"]: r[key] for r in records if r.get("event") == "step" and not r.get("skipped")}
    values = [by_step[s] for s in sorted(by_step)]
    if not values:
        return math.nan, math.nan, math.nan
    n = max(1, len(values) // 10)
    first, last = sum(values[:n]) / n, sum(values[-n:]) / n
    return first, last, (first - last) / first if first > 0 else math.nan


@dataclass
class RunResult:
    trainable: torch.nn.Module
    summary: dict[str, Any]


def run_training(cfg: TrainingConfig, build_stage: Callable[[RunContext], Stage]) -> RunResult:
    """Train a stage according to a validated config; returns its (unwrapped) trainable module and the summary."""
    info = dist_env()
    device = resolve_device(cfg, info)
    info = init_distributed(device)
    try:
        return _run(cfg, build_stage, info, device)
    finally:
        shutdown_distributed()


# Config keys a resumed run may change; any other difference from the checkpoint's config is refused, because
# it would make the resumed run a different experiment from the one the checkpoint continues.
RESUMABLE_CHANGES = frozenset({"steps", "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps", "progress",
                               "target_drop", "num_threads", "device", "output_dir", "resume", "overwrite"})


def check_resume_config(cfg: TrainingConfig, saved: dict[str, Any], step: int, path: Path) -> None:
    """Refuse a resume whose config differs from the checkpoint's in a key outside RESUMABLE_CHANGES, or that asks
    for fewer steps than were done (as many finishes the run: its final outputs are written from the checkpoint)."""
    current = cfg.to_json()
    changed = sorted(k for k in set(current) | set(saved)
                     if k not in RESUMABLE_CHANGES and current.get(k) != saved.get(k))
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ConfigError(f"--resume: the config differs from the one {path} was trained with ({detail}); only "
                          f"{', '.join(sorted(RESUMABLE_CHANGES))} may change on resume")
    if cfg.steps < step:
        raise ConfigError(f"--steps: {path} is at step {step} already; pass --steps {step} to finish that run "
                          f"(write its final outputs) or larger than {step} to train further")


def find_resume_point(cfg: TrainingConfig, out: Path, info: DistInfo
                      ) -> tuple[Path, dict[str, dict[str, torch.Tensor]], dict[str, Any]] | None:
    """(path, tensors, state) of the checkpoint to resume from, or None to start afresh. With `--resume` the newest
    intact checkpoint in OUTPUT_DIR/checkpoints (damaged newer ones are reported by path); with `--resume PATH`
    that folder, which must be a checkpoint."""
    if not cfg.resume:
        return None
    try:
        if cfg.resume == "latest":
            found = ckpt.load_latest_intact(out / "checkpoints")
            if found is None:
                if info.is_main:
                    _print(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from scratch")
                return None
            path, tensors, state, damaged = found
            if info.is_main:
                for bad, msg in damaged:
                    # set aside, so that rotation never counts it among the kept (nor deletes an intact one for it)
                    try:
                        aside = f"; set aside as {ckpt.set_aside(bad)}"
                    except OSError as e:
                        aside = f"; could not set it aside ({e.strerror or e})"
                    _print(f"--resume: skipping a damaged checkpoint: {msg}{aside}")
                if damaged:
                    _print(f"--resume: using {path}")
        else:
            path = Path(cfg.resume)
            tensors, state = ckpt.load_checkpoint(path)
    except ckpt.CheckpointError as e:
        raise ConfigError(f"--resume: {e}") from None
    if not isinstance(state.get("config"), dict):
        raise ConfigError(f"--resume: {path} holds no training config (not a checkpoint of this trainer)")
    check_resume_config(cfg, state["config"], int(state["step"]), path)
    return path, tensors, state


def _run(cfg: TrainingConfig, build_stage: Callable[[RunContext], Stage], info: DistInfo,
         device: torch.device) -> RunResult:
    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(cfg.seed + info.rank)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)

    # resume point (the newest intact checkpoint); a fresh start clears an earlier run's checkpoints (validation
    # allowed that only with --overwrite), and only the folders this trainer wrote
    resumed = find_resume_point(cfg, out, info)
    written = _OutputRecord(out, enabled=info.is_main and resumed is None)
    try:
        return _train(cfg, build_stage, info, device, out, resumed, t_start, written)
    except BaseException:
        written.remove_new()
        raise


class _OutputRecord:
    """What a fresh run adds to OUTPUT_DIR until its first step is done: if it fails before that (an option that
    passed validation but does not fit the models), those entries are removed, so nothing blocks a rerun."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.out, self.enabled = out, enabled
        self.existed = out.is_dir()
        self.before = set(os.listdir(out)) if self.existed else set()

    def done(self) -> None:
        self.enabled = False  # a step was logged: what the run wrote is its record

    def remove_new(self) -> None:
        if not self.enabled or not self.out.is_dir():
            return
        new = sorted(set(os.listdir(self.out)) - self.before)
        for name in new:
            p = self.out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
        if not self.existed:
            with contextlib.suppress(OSError):
                self.out.rmdir()
        if new:
            _print(f"the run failed before its first step; removed what it wrote in {self.out}: {', '.join(new)}")
        self.enabled = False


def _train(cfg: TrainingConfig, build_stage: Callable[[RunContext], Stage], info: DistInfo, device: torch.device,
           out: Path, resumed: tuple[Path, dict, dict] | None, t_start: float, written: _OutputRecord) -> RunResult:
    # the stage's models and data, the trainer, the resumed state
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    amp = amp_dtype_for(cfg, device)
    stage = build_stage(RunContext(cfg, device, info, amp, out))
    name = stage.name
    trainer = Trainer(cfg, stage, device, info, MetricsLog(out / "metrics.jsonl", enabled=False), amp)
    if resumed is None and info.is_main:  # only once the models loaded: a failed start deletes nothing
        for p in ckpt.clear_checkpoints(out / "checkpoints"):
            _print(f"--overwrite: left {p} in place (not written by this trainer)")
    resume_path = None
    if resumed is not None:  # before the metrics log is cut back to the resumed step: a refusal changes nothing
        resume_path, tensors, state = resumed
        try:
            trainer.load_state(tensors, state)
        except (KeyError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"--resume: {resume_path} does not fit this model ({first})") from None
    log = trainer.log = MetricsLog(out / "metrics.jsonl", enabled=info.is_main,
                                   resume_step=None if resumed is None else int(resumed[2]["step"]))
    hook = load_env_hook()
    if hook is not None:
        hook(trainer)
    start = trainer.state.step
    n_params = sum(p.numel() for p in named_trainable(stage.trainable).values())
    log.write("start", step=start, resumed_from=str(resume_path) if resume_path else None, world_size=info.world_size,
              device=str(device), trainable_params=n_params, multipliers=trainer.multipliers, config=cfg.to_json())
    trainer.callbacks.emit("start", trainer)

    if start == cfg.steps and info.is_main:
        _print(f"[{name}] {resume_path} is at the final step {start}: finishing the run (writing its final outputs "
               "from that checkpoint)")
    bar = None
    if info.is_main and cfg.progress and start < cfg.steps:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=name, unit="step", dynamic_ncols=True)
    samples_per_step = cfg.batch_size * cfg.grad_accum * info.world_size
    forced = set(cfg.expand_at)
    stop_signal: str | None = None
    # the handlers stay in place while the final outputs are written: a signal then is noted, not a kill
    with StopSignals() as signals:
        while trainer.state.step < cfg.steps:
            st = trainer.state
            # a due expansion (plateau at the end of the last step, or forced before this one)
            if (st.pending_expansion or st.step in forced) and not trainer.schedule.exhausted():
                trainer.expand("forced" if st.step in forced else "plateau")
            st.pending_expansion = False
            trainer.callbacks.emit("step_start", trainer)

            # one optimizer step (skipped when its loss or gradient is not finite)
            t0 = time.perf_counter()
            metrics = trainer.train_step()
            st.step += 1
            dt = time.perf_counter() - t0
            if metrics["skipped"]:
                st.skipped_steps += 1
                st.nonfinite_streak += 1
            else:
                st.nonfinite_streak = 0
            plateau = (not metrics["skipped"] and trainer.detector.update(metrics[stage.plateau_metric])
                       and not trainer.schedule.exhausted())

            # log it
            log.write("step", step=st.step, **_json_metrics(metrics), smoothed=trainer.detector.smoothed,
                      multipliers=trainer.multipliers, skipped_steps=st.skipped_steps,
                      samples_per_s=samples_per_step / dt)
            written.done()
            if metrics["skipped"] and info.is_main:
                _print(f"[{name}] step {st.step}: non-finite loss or gradient (loss {metrics['loss']}, grad norm "
                       f"{metrics['grad_norm']}); step skipped, weights unchanged ({st.nonfinite_streak} in a row, "
                       f"{st.skipped_steps} in all)")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4g}", d=f"{metrics['d']:.3g}")
            trainer.callbacks.emit("step_end", trainer, metrics)

            # every rank agrees on the plateau (rank 0's) and on a stop request (anyone's)
            st.pending_expansion, stopping = agree_flags(plateau, signals.requested is not None, device)
            if st.nonfinite_streak >= cfg.max_nonfinite_steps:
                raise TrainingError(f"{st.nonfinite_streak} consecutive steps had a non-finite loss or gradient "
                                    f"(--max-nonfinite-steps {cfg.max_nonfinite_steps}); stopping at step {st.step}. "
                                    "The last checkpoint holds the last good weights")

            # checkpoint when due, at the end, or on a stop request
            last = st.step == cfg.steps
            if (cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0) or last or stopping:
                path = trainer.save()
                log.write("checkpoint", step=st.step, path=str(path) if path else None)
                trainer.callbacks.emit("checkpoint", trainer, path)
                barrier()
            if stopping and not last:
                stop_signal = signals.requested or "a signal on another rank"
                break
            if stopping and info.is_main:
                # the run is complete: finishing takes seconds, and leaves nothing for a resume to do
                _print(f"[{name}] {signals.requested or 'a stop signal'} during the last step: the run is complete; "
                       "writing its final outputs, then stopping")
        if bar is not None:
            bar.close()

        if stop_signal is not None:
            log.write("interrupted", step=trainer.state.step, signal=stop_signal)
            log.close()
            raise Interrupted(stop_signal, trainer.state.step, trainer.checkpoint_root())

        in_sync = max_param_difference(list(named_trainable(stage.trainable).values()), device)
        summary: dict[str, Any] = {"steps": cfg.steps, "world_size": info.world_size,
                                   "multipliers": trainer.multipliers, "ranks_max_param_diff": in_sync,
                                   "skipped_steps": trainer.state.skipped_steps}
        if info.is_main:
            try:
                final = stage.save_final(out)
            except Exception as e:
                os_error = ckpt.as_os_error(e, out)
                if os_error is None:
                    raise
                raise os_error from None
            first, last_, drop = loss_drop(read_jsonl(out / "metrics.jsonl"), stage.plateau_metric)
            elapsed = time.perf_counter() - t_start
            summary.update(first10=first, last10=last_, drop=drop, seconds=elapsed, saved=str(final),
                           expansions=[e["step"] for e in trainer.state.expansions])
            verdict = ""
            if cfg.target_drop > 0:
                verdict = " PASS" if drop >= cfg.target_drop else " FAIL"
                verdict += f" (target >= {cfg.target_drop:.0%})"
            log.write("summary", step=cfg.steps, **summary)
            _print(f"[{name}] done: {cfg.steps} steps in {elapsed:.1f}s; {stage.plateau_metric} first 10% "
                   f"{first:.4g} -> last 10% {last_:.4g} ({drop:+.1%} drop){verdict}; expansions at steps "
                   f"{summary['expansions']}, multipliers {summary['multipliers']}; saved to {final}")
            _print(f"[{name}] {describe_d(cfg.d0, float(trainer.optimizer.param_groups[0]['d']), cfg.steps)}")
            if signals.requested is not None:
                _print(f"[{name}] {signals.requested} received while finishing; the final outputs are complete")
        log.close()
    return RunResult(stage.trainable, summary)


class Interrupted(Exception):
    """A stop signal ended the run after a checkpoint; the script reports it and exits 128 + signal number."""

    def __init__(self, signal_name: str, step: int, checkpoints: Path) -> None:
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint saved in {checkpoints}, "
                         "continue with --resume")
        self.signal_name, self.step = signal_name, step


def _json_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Strict JSON: a non-finite value (of a skipped step) is written as null."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v
    return {k: clean(v) for k, v in metrics.items()}


def cli_main(name: str, argv: list[str] | None, parse: Callable[[list[str] | None, int], TrainingConfig],
             build_stage: Callable[[RunContext], Stage]) -> int:
    """A training script's main: parse and validate the config, train; user errors are one line, not a traceback.

    Exit status: 0 done, 1 the run failed (TrainingError), 2 a configuration error or a file that could not be
    written or read (a full disk: the message names the file; the checkpoints written before are intact),
    128 + N stopped by signal N after saving a checkpoint."""
    import sys

    from ..._quiet import quiet_dependency_noise

    quiet_dependency_noise()
    cfg = None
    try:
        cfg = parse(argv, dist_env().world_size)
        run_training(cfg, build_stage)
    except ConfigError as e:
        print(f"{name}: configuration error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"{name}: {e}: {resume_command(argv)}", file=sys.stderr)
        return 128 + {"SIGINT": 2, "SIGTERM": 15}.get(e.signal_name, 15)
    except Exception as e:
        # a failed read or write (a full disk), also as the error types of libraries that wrap it (safetensors)
        error = ckpt.as_os_error(e, cfg.output_dir if cfg is not None else ".")
        if error is None:
            raise
        print(f"{name}: error: {file_error(error, cfg.output_dir if cfg is not None else None)}", file=sys.stderr)
        return 2
    return 0


def resume_command(argv: list[str] | None) -> str:
    """The command line that continues this run: the same one with --resume."""
    import shlex
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--resume" or a.startswith("--resume=") for a in args):
        args.append("--resume")
    return shlex.join(["python", sys.argv[0], *args])


def file_error(e: OSError, output_dir: str | None = None) -> str:
    """One line for a failed read or write: what failed, the path (OUTPUT_DIR when the error names none), and how
    to go on."""
    import errno

    what = e.strerror or str(e)
    where = f" ({e.filename})" if e.filename else (f" (writing in {output_dir})" if output_dir else "")
    advice = ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "; the checkpoints written before are intact: free space, then rerun with --resume"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "; check the permissions of that path"
    return f"{what}{where}{advice}"

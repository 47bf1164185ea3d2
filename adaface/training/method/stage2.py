"""Stage 2 -- composition distillation (paper §2.3–2.4) on the shared trainer.

Starts from a stage-1 Prompt Inverter. Each optimizer step is, with probability `stage1_p` (drawn from the run's
seed, the same on every rank), a stage-1 face-distillation step (adaface.training.method.stage1.stage1_loss) that holds
the subject's authenticity, else a composition step (adaface.training.method.composition_step): the compositional delta
loss on cross-attention outputs, attention maps and prompt embeddings, and the elastic face-preserving loss.
Real faces with masks come from a prepared data folder (`--data-dir`); the tiny preset writes synthetic ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..engine.config import (
    EMBEDDINGS_FILE,
    ConfigError,
    DistillationConfig,
    TrainingConfig,
    _check_model_source,
    _f,
    _text_hidden_size,
    check_model_dimensions,
    parse_config,
    validate_distillation,
    validate_training,
)
from ..engine.data import MANIFEST, FaceIdSource, RealFaces
from ..engine.ddp import shared_seed
from ..engine.errors import model_option
from ..engine.trainer import MicroStep, RunContext
from ._entry import StageEntry
from .composition_step import (
    DELTA_TERMS,
    TERMS,
    CompositionBatch,
    CompositionConfig,
    CompositionModels,
    capture_layers,
    composition_step,
)
from .compositions import CompositionPool
from .stage1 import DistillSettings, Stage1Models, build_tiny_models, stage1_loss

DESCRIPTION = "AdaFace stage 2: composition distillation of the Prompt Inverter (paper §2.3-2.4)."


@dataclass
class Stage2Config(DistillationConfig, TrainingConfig):
    """Stage 2 on top of the shared options (defaults: the paper's real run)."""

    # --- the paper's stage-2 run (overrides of the shared defaults) -----------------------------------------
    steps: int = _f(120_000, "optimizer steps")
    batch_size: int = _f(3, "subjects per process per micro-batch (each gives four prompts)")
    d_coef: float = _f(0.5, "Prodigy d_coef (the paper's effective learning-rate knob)")
    expansions: str = _f("", "expansion schedule (stage 2 keeps the stage-1 inverter's multipliers: '')")
    output_dir: str = _f("runs/stage2", "where metrics.jsonl, checkpoints/ and the final inverter/ go")
    # --- models ---------------------------------------------------------------------------------------------
    tiny: bool = _f(False, "tiny random models under OUTPUT_DIR/tiny_models, a fresh tiny inverter (unless "
                           "--inverter) and synthetic faces with masks (unless --data-dir)")
    sd_model: str | None = _f(None, "SD-1.5 folder or hub id (tokenizer, text encoder, UNet, scheduler, VAE)")
    arc2face: str | None = _f(None, "Arc2Face folder or hub id (its encoder gives the ID tokens; its UNet is the "
                                    "teacher of the mixed-in stage-1 steps)")
    inverter: str | None = _f(None, "the stage-1 Prompt Inverter folder (training/stage1.py's OUTPUT_DIR/inverter)")
    # --- data -----------------------------------------------------------------------------------------------
    data_dir: str | None = _f(None, "prepared face folder with masks (python -m adaface.prepare_data: manifest.jsonl, "
                                    f"images/, masks/, {EMBEDDINGS_FILE})")
    on_bad_data: str = _f("skip", "data failing the start-up checks: 'skip' (listed, left out) or 'refuse'",
                          choices=("skip", "refuse"))
    resolution: int = _f(512, "image size in pixels (latents are RESOLUTION / VAE scale factor)")
    synthetic_faces: int = _f(12, "with --tiny and no --data-dir: how many synthetic faces to write")
    # --- prompts --------------------------------------------------------------------------------------------
    compositions: str | None = _f(None, "composition pool file replacing the built-in one: a JSON object of lists "
                                        "(actions, clothing, objects, backgrounds, styles, lighting, shots) or a "
                                        "text file of one composition per line")
    default_class_word: str = _f("person", "class word of subjects whose data gives none (man, woman, ...)")
    # --- composition step -----------------------------------------------------------------------------------
    comp_t_min: int = _f(500, "smallest timestep of a composition step")
    comp_t_max: int = _f(800, "largest timestep of a composition step (exclusive)")
    delta_layers: str = _f("*", "cross-attention layers of the delta loss: comma-separated indices (0-15 on SD-1.5: "
                                "6 down, 1 mid, 9 up) or name patterns like 'up_blocks.*' (paper: all)")
    face_layers: str = _f("*", "cross-attention layers of the face-preserving loss, as --delta-layers (paper: all)")
    layer_weights: str = _f("", "per-layer weights PATTERN=W,...; unlisted layers weigh 1 (reference code: "
                                "'up_blocks.2.*=0.5' for the 32x32 decoder layers)")
    pool_above: int = _f(8, "maps with a side above this are average-pooled (kernel 4, stride 2) before the delta loss")
    pool_face: bool = _f(False, "pool for the face-preserving loss too (the fused kernel handles the full maps)")
    normalize_q: bool = _f(True, "non-affine batch norm on the queries before the face-preserving loss")
    normalize_features: bool = _f(True, "non-affine layer norm on the attention outputs before the losses")
    subject_single_grad: float = _f(0.1, "gradient fraction reaching the subject-single branch in the delta losses on "
                                          "the UNet's attention outputs and maps (not in the paper: the authors' "
                                          "released training)")
    prompt_single_grad: float = _f(1.0, "gradient fraction reaching the subject-single prompt embeddings in the "
                                        "prompt-embedding delta (the paper reduces none; 1 = full gradient)")
    face_q_grad: float = _f(0.1, "gradient fraction reaching the subject-single queries in the face-preserving loss "
                                 "(not in the paper: the authors' released training)")
    face_feat_grad: float = _f(0.01, "gradient fraction reaching the subject-single features in the face-preserving "
                                     "loss (not in the paper: the authors' released training)")
    w_delta_attn_out: float = _f(1e-3, "weight of the delta loss on cross-attention outputs (eq. 4 weighs the three "
                                       "feature kinds equally; the scale is not in the paper: the authors' released "
                                       "training used 1e-4 to 3e-3)")
    w_delta_attn_map: float = _f(1e-3, "weight of the delta loss on the subject tokens' attention maps (eq. 4: equal "
                                       "to the other two kinds)")
    w_delta_prompt: float = _f(1e-3, "weight of the delta loss on the prompt embeddings (eq. 4: equal to the other "
                                     "two kinds)")
    w_face_preserve: float = _f(1e-3, "weight of the face-preserving loss (eq. 8; not in the paper: the authors' "
                                      "released training used 1e-3 to 3e-3)")
    ops_backend: str = _f("auto", "adaface.ops backend of the fused losses", choices=("auto", "torch", "triton",
                                                                                     "cuda", "cpp"))
    face_precision: str = _f("auto", "matmul precision of the face-preserving loss's Triton kernels: auto (tensor "
                                     "cores on a GPU: tf32 where torch allows TF32, else the autocast dtype), tf32, "
                                     "bf16, fp16, or ieee (exact fp32)",
                             choices=("auto", "tf32", "bf16", "fp16", "ieee"))
    # --- mixed stage-1 steps --------------------------------------------------------------------------------
    stage1_p: float = _f(5 / 6, "probability that an optimizer step is a stage-1 face-distillation step, else a "
                                "composition step (not in the paper: the authors' released training ran about one "
                                "composition step in six, the stage-1 steps holding the subject's authenticity)")


def _selection(text: str) -> list[int | str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    return [int(s) if s.lstrip("-").isdigit() else s for s in items]


def _layer_weights(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in (s.strip() for s in text.split(",") if s.strip()):
        pattern, sep, value = item.rpartition("=")
        try:
            out[pattern] = float(value)
        except ValueError:
            pattern = ""
        if not sep or not pattern or not math.isfinite(out.get(pattern, math.nan)) or out[pattern] < 0:
            raise ConfigError(f"--layer-weights: expected PATTERN=WEIGHT with a weight >= 0, got {item!r}")
    return out


def composition_config(cfg: Stage2Config) -> CompositionConfig:
    return CompositionConfig(
        delta_layers=_selection(cfg.delta_layers), face_layers=_selection(cfg.face_layers),
        layer_weights=_layer_weights(cfg.layer_weights), pool_above=cfg.pool_above, pool_face=cfg.pool_face,
        normalize_q=cfg.normalize_q, normalize_features=cfg.normalize_features,
        subject_single_grad=cfg.subject_single_grad, prompt_single_grad=cfg.prompt_single_grad,
        face_q_grad=cfg.face_q_grad, face_feat_grad=cfg.face_feat_grad,
        w_delta_attn_out=cfg.w_delta_attn_out, w_delta_attn_map=cfg.w_delta_attn_map,
        w_delta_prompt=cfg.w_delta_prompt, w_face_preserve=cfg.w_face_preserve, t_min=cfg.comp_t_min,
        t_max=cfg.comp_t_max, default_class_word=cfg.default_class_word, backend=cfg.ops_backend,
        face_precision=cfg.face_precision)


def load_pool(cfg: Stage2Config) -> CompositionPool:
    try:
        return CompositionPool.from_file(cfg.compositions) if cfg.compositions else CompositionPool.default()
    except ValueError as e:
        raise ConfigError(str(e)) from None


# ---- validation (before any model loads) ---------------------------------------------------------------------


def _unet_layer_names(cfg: Stage2Config) -> list[str] | None:
    """The UNet's cross-attention layer names from its config alone (built on the meta device: no weights)."""
    from diffusers import UNet2DConditionModel

    from adaface.models.unet_feature_capture import cross_attention_layers

    if cfg.tiny:
        from adaface.testing.tiny_models import tiny_unet

        with torch.device("meta"):
            return cross_attention_layers(tiny_unet())
    path = Path(cfg.sd_model).expanduser() / "unet" / "config.json"
    if not path.is_file():
        return None  # a hub id: checked when the model loads
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads(path.read_text()))
    return cross_attention_layers(unet)


def check_inverter(option: str, folder: str, width: int | None) -> None:
    """A stage-1 inverter folder (config.json + model.safetensors of the PromptInverter format) of the SD text
    encoder's width."""
    from adaface.models.prompt_inverter import CONFIG_NAME, FORMAT, WEIGHTS_NAME

    p = Path(folder).expanduser()
    if not p.is_dir():
        raise ConfigError(f"{option}: stage-1 inverter folder not found: {folder}")
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (p / n).is_file()]
    if missing:
        raise ConfigError(f"{option}: {folder} lacks {', '.join(missing)} (expected training/stage1.py's "
                          "OUTPUT_DIR/inverter)")
    try:
        data = json.loads((p / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{option}: {p / CONFIG_NAME} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{option}: {p / CONFIG_NAME} is not a Prompt Inverter config (format "
                          f"{data.get('format') if isinstance(data, dict) else None!r})")
    hidden = (data.get("text_config") or {}).get("hidden_size")
    if width is not None and hidden != width:
        raise ConfigError(f"{option}: the inverter is {hidden} wide but the SD text encoder is {width} wide "
                          "(an inverter trained for another base model)")


def validate_stage2(cfg: Stage2Config, world_size: int = 1) -> None:
    """One-line ConfigErrors naming the option; reads only small files."""
    validate_training(cfg, world_size)
    if not 0.0 <= cfg.stage1_p <= 1.0:
        raise ConfigError(f"--stage1-p must be in [0, 1], got {cfg.stage1_p}")
    for name in ("random_id_fraction", "subject_single_grad", "prompt_single_grad", "face_q_grad", "face_feat_grad"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(cfg, name)}")
    for name in ("w_delta_attn_out", "w_delta_attn_map", "w_delta_prompt", "w_face_preserve", "pool_above"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    for lo, hi, what in ((cfg.comp_t_min, cfg.comp_t_max, "--comp-t-min/--comp-t-max"),
                         (cfg.t_min, cfg.t_max, "--t-min/--t-max")):
        if not 0 <= lo < hi <= 1000:
            raise ConfigError(f"{what}: need 0 <= min < max <= 1000, got {lo}, {hi}")
    if cfg.resolution < 1 or cfg.synthetic_faces < 1:
        raise ConfigError("--resolution and --synthetic-faces must be >= 1")
    validate_distillation(cfg)
    if not cfg.default_class_word.strip():
        raise ConfigError("--default-class-word must not be empty")
    _layer_weights(cfg.layer_weights)
    load_pool(cfg)

    # models: the inverter must exist and match the SD text encoder's width
    if cfg.tiny:
        for name in ("sd_model", "arc2face"):
            if getattr(cfg, name):
                raise ConfigError(f"--{name.replace('_', '-')} cannot be combined with --tiny (use --no-tiny)")
        from adaface.testing.tiny_models import TinyConfig

        if cfg.inverter:
            check_inverter("--inverter", cfg.inverter, TinyConfig().hidden_size)
    else:
        for name in ("sd_model", "arc2face", "inverter", "data_dir"):
            if not getattr(cfg, name):
                raise ConfigError(f"--{name.replace('_', '-')} is required without --tiny")
        _check_model_source("--sd-model", cfg.sd_model, ("unet", "text_encoder", "tokenizer", "scheduler", "vae"))
        _check_model_source("--arc2face", cfg.arc2face, ("arc2face", "encoder"))
        check_model_dimensions(cfg.sd_model, cfg.arc2face, None)
        sd = Path(cfg.sd_model).expanduser()
        width = _text_hidden_size(sd, "text_encoder") if sd.is_dir() else None
        check_inverter("--inverter", cfg.inverter, width[0] if width else None)

    # data: a prepared folder, because the face-preserving loss needs the masks
    if cfg.data_dir:
        d = Path(cfg.data_dir).expanduser()
        if not d.is_dir():
            raise ConfigError(f"--data-dir: folder not found: {cfg.data_dir}")
        if not (d / MANIFEST).is_file():
            raise ConfigError(f"--data-dir: {cfg.data_dir} has no {MANIFEST}, so no face masks (stage 2's "
                              "face-preserving loss needs them): prepare it with python -m adaface.prepare_data")
        if not (d / EMBEDDINGS_FILE).is_file():
            raise ConfigError(f"--data-dir: {cfg.data_dir} has no {EMBEDDINGS_FILE}")

    # layer selections must name layers of this UNet
    names = _unet_layer_names(cfg)
    if names is not None:
        from adaface.models.unet_feature_capture import select_layers

        for option, text in (("--delta-layers", cfg.delta_layers), ("--face-layers", cfg.face_layers)):
            try:
                select_layers(names, _selection(text))
            except ValueError as e:
                raise ConfigError(f"{option}: {e}") from None


def parse_stage2_config(argv: list[str] | None = None, default_config: str | None = None,
                        world_size: int = 1) -> Stage2Config:
    return parse_config(argv, default_config=default_config, world_size=world_size, config_cls=Stage2Config,
                        validator=validate_stage2, description=DESCRIPTION)


# ---- models ----------------------------------------------------------------------------------------------------


@dataclass
class Stage2Models:
    composition: CompositionModels
    stage1: Stage1Models  # the same modules, as stage1_loss takes them (teacher with its UNet)


def tiny_inverter(root: Path, sd_model: str) -> Path:
    """A tiny stage-1 inverter folder: initialised from the tiny SD text encoder, as stage 1 starts."""
    from adaface.models.prompt_inverter import PromptInverter

    folder = root / "inverter"
    if not (folder / "config.json").is_file():
        PromptInverter(sd_model).save_pretrained(folder)
    return folder


def load_models(cfg: Stage2Config, sd_model: str, arc2face: str, inverter: str, device: torch.device,
                weight_dtype: torch.dtype) -> Stage2Models:
    from diffusers import AutoencoderKL

    from adaface.models.arc2face import Arc2Face
    from adaface.models.prompt_inverter import PromptInverter
    from adaface.models.unet_feature_capture import UNetFeatureCapture

    from .stage1 import _vae_scale_factor, load_sd_parts

    # the scheduler's prediction type matters to the stage-1 steps only
    pin, scheduler, prediction_type, tokenizer, text_encoder, unet = load_sd_parts(sd_model, cfg.resolution)
    vae = AutoencoderKL.from_pretrained(sd_model, subfolder="vae", **pin).eval()
    with model_option("--arc2face", arc2face):
        teacher = Arc2Face.from_pretrained(arc2face, tokenizer=tokenizer, load_unet=cfg.stage1_p > 0)
    with model_option("--inverter", inverter):
        inv = PromptInverter.from_pretrained(inverter)
    for m in (text_encoder, unet, vae, teacher):
        m.requires_grad_(False).to(device, weight_dtype)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # gradients flow through the frozen UNet to the prompt embeddings
    inv.to(device).train()
    try:
        capture = UNetFeatureCapture(unet, capture_layers(unet, composition_config(cfg)))
    except ValueError as e:
        raise ConfigError(f"--delta-layers/--face-layers: {e}") from None
    alphas = scheduler.alphas_cumprod.to(torch.float32)
    scale = float(getattr(vae.config, "scaling_factor", 0.18215))
    comp = CompositionModels(tokenizer, text_encoder, unet, capture, teacher, inv, vae, scale, alphas)
    s1 = Stage1Models(tokenizer, text_encoder, unet, teacher, inv, alphas, vae, scale,
                      cfg.resolution // _vae_scale_factor(sd_model), prediction_type)
    return Stage2Models(comp, s1)


# ---- the stage -------------------------------------------------------------------------------------------------


class Stage2:
    """Stage 2 as the shared trainer sees it (adaface.training.engine.trainer.Stage)."""

    name = "stage2"
    checkpoint_name = "inverter"
    plateau_metric = "loss"  # no expansion in stage 2; the summary's first/last 10% are of the total loss

    def __init__(self, cfg: Stage2Config, models: Stage2Models, faces: Any, ids: Any) -> None:
        """`faces`: the composition steps' source (real faces with masks only); `ids`: the stage-1 steps' source
        (the same faces, and random IDs). Both `FaceIdSource`-like; `faces` holds the data position."""
        self.cfg, self.models, self.faces, self.ids = cfg, models, faces, ids
        self.trainable = models.composition.inverter
        self.comp_cfg = composition_config(cfg)
        self.pool = load_pool(cfg)
        self.settings = DistillSettings(tuple(cfg.denoise_steps), tuple(cfg.denoise_step_weights), cfg.t_min,
                                        cfg.t_max, cfg.loss_reduction)

    @classmethod
    def build(cls, ctx: RunContext) -> Stage2:
        cfg: Stage2Config = ctx.cfg  # type: ignore[assignment]
        from ..engine.ddp import barrier

        data_dir, inverter = cfg.data_dir, cfg.inverter
        if cfg.tiny:
            tiny_root = ctx.output_dir / "tiny_models" / f"seed{cfg.seed}"
            if ctx.info.is_main:
                build_tiny_models(tiny_root, cfg.seed)
                inverter = inverter or str(tiny_inverter(tiny_root, str(tiny_root / "sd15")))
                if not data_dir:
                    from .synthetic_faces import write_synthetic_faces

                    data_dir = str(write_synthetic_faces(ctx.output_dir / "synthetic_faces", cfg.synthetic_faces,
                                                         seed=cfg.seed))
            barrier()
            sd_model, arc2face = str(tiny_root / "sd15"), str(tiny_root / "arc2face")
            inverter = inverter or str(tiny_root / "inverter")
            data_dir = data_dir or str(ctx.output_dir / "synthetic_faces")
        else:
            sd_model, arc2face = cfg.sd_model, cfg.arc2face
        # the data first: its problems are reported before any model loads
        real = RealFaces(data_dir, cfg.resolution, cfg.seed, ctx.info, on_bad_data=cfg.on_bad_data)
        if not real.prepared:
            raise ConfigError(f"--data-dir: {data_dir} has no {MANIFEST}, so no face masks")
        models = load_models(cfg, sd_model, arc2face, inverter, ctx.device, ctx.weight_dtype)
        return cls(cfg, models, FaceIdSource(real, 0.0), FaceIdSource(real, cfg.random_id_fraction))

    def is_stage1_step(self, step: int) -> bool:
        """Whether optimizer step `step` is a stage-1 step: drawn from the run's seed, the same on every rank and
        for every micro-batch of the step (so a step's metrics have one set of terms)."""
        g = torch.Generator().manual_seed(shared_seed(self.cfg.seed, "stage1-step", step))
        return float(torch.rand((), generator=g)) < self.cfg.stage1_p

    def micro_loss(self, ms: MicroStep) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.is_stage1_step(ms.step):
            # a stage-1 face-distillation step (it back-propagates itself, one UNet graph at a time)
            batch = self.ids.sample(self.cfg.batch_size, ms.generator)
            loss, terms = stage1_loss(self.models.stage1, batch, ms.generator, settings=self.settings,
                                      inverter=ms.model, backward_scale=ms.backward_scale, autocast=ms.autocast)
            return loss, {"loss_stage1": loss, **terms, "stage1_steps": 1}
        # a composition step: the trainer back-propagates the returned loss
        batch = self.faces.sample(self.cfg.batch_size, ms.generator)
        comp = CompositionBatch(batch.arcface, batch.images, batch.masks, batch.class_words)
        models = dataclasses.replace(self.models.composition, inverter=ms.model)
        with ms.autocast():
            res = composition_step(models, comp, self.comp_cfg, self.pool, ms.generator)
        return res.loss, {**res.terms, "composition_steps": 1}

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.faces.state_dict()}  # both sources read the same faces

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.faces.load_state_dict(state["data"])

    def save_final(self, output_dir: Path) -> Path:
        """The trained inverter (OUTPUT_DIR/inverter) and the composition summary (OUTPUT_DIR/summary.json)."""
        path = self.models.composition.inverter.save_pretrained(output_dir / "inverter")
        write_summary(output_dir)
        return path


# ---- summary ---------------------------------------------------------------------------------------------------


def composition_summary(records: list[dict]) -> dict[str, Any]:
    """Over the composition steps: the sum of the delta terms in the first and last tenth, its relative drop, and
    the range of the face-preserving term."""
    steps = [r for r in sorted((r for r in records if r.get("event") == "step"), key=lambda r: r["step"])
             if not r.get("skipped") and all(isinstance(r.get(k), (int, float)) for k in TERMS)]
    out: dict[str, Any] = {"composition_steps": len(steps),
                           "stage1_steps": sum(1 for r in records if r.get("event") == "step" and "loss_stage1" in r)}
    if not steps:
        return out
    n = max(1, len(steps) // 10)
    sums = [sum(r[k] for k in DELTA_TERMS) for r in steps]
    first, last = sum(sums[:n]) / n, sum(sums[-n:]) / n
    face = [r["loss_face_preserve"] for r in steps]
    out.update(delta_sum_first10=first, delta_sum_last10=last, delta_drop=(first - last) / first if first else math.nan,
               face_preserve_first10=sum(face[:n]) / n, face_preserve_last10=sum(face[-n:]) / n,
               face_preserve_min=min(face), face_preserve_max=max(face),
               face_preserve_finite=all(math.isfinite(v) for v in face))
    return out


def write_summary(output_dir: Path) -> dict[str, Any]:
    """composition_summary of OUTPUT_DIR/metrics.jsonl, written to OUTPUT_DIR/summary.json and printed."""
    from ..engine.checkpoint import atomic_write_text
    from ..engine.metrics_log import read_jsonl

    summary = composition_summary(read_jsonl(output_dir / "metrics.jsonl"))
    atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if "delta_sum_first10" in summary:
        print(f"[stage2] {summary['composition_steps']} composition steps, {summary['stage1_steps']} stage-1 steps; "
              f"delta terms (sum) first 10% {summary['delta_sum_first10']:.4f} -> last 10% "
              f"{summary['delta_sum_last10']:.4f} ({summary['delta_drop']:+.1%} drop); face-preserving "
              f"{summary['face_preserve_first10']:.4f} -> {summary['face_preserve_last10']:.4f} (range "
              f"{summary['face_preserve_min']:.4f}..{summary['face_preserve_max']:.4f})", flush=True)
    return summary


_ENTRY = StageEntry("stage2", Stage2.build, parse_stage2_config)
run = _ENTRY.run  # train stage 2 according to a validated config (parse_stage2_config)
main = _ENTRY.main  # the `training/stage2.py` command line (returns the exit status)

"""Stage-1 configuration: one dataclass, a JSON config file, command-line overrides and start-up validation.

Precedence, lowest first: the dataclass defaults (the paper's real-run values), the JSON config file
(`--config`), then command-line options. Every field has a `help` string, so `--help` documents every option.
Validation runs before any model is loaded and raises `ConfigError` naming the offending option.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .expansion import parse_expansions
from .face_files import EMBEDDINGS_FILE, IMAGE_SUFFIXES, list_face_images  # noqa: F401 (re-exported)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _opt(name: str) -> str:
    return "--" + name.replace("_", "-")


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainingConfig:
    """Options every stage shares: optimizer, expansion, hardware, output (a stage's config subclasses it)."""

    # --- optimisation -----------------------------------------------------------------------------------
    steps: int = _f(240_000, "optimizer steps")
    batch_size: int = _f(4, "samples per process per micro-batch")
    grad_accum: int = _f(2, "micro-batches accumulated per optimizer step")
    d_coef: float = _f(2.0, "Prodigy d_coef (the paper's effective learning-rate knob)")
    lr: float = _f(1.0, "Prodigy lr multiplier (leave at 1)")
    d0: float = _f(1e-6, "Prodigy's initial step-size estimate: d rises from here once the gradients agree with the "
                                "distance travelled (not during the warm-up, and not within the tiny preset's 120 "
                                "steps of random models); the run's last line says what d did")
    weight_decay: float = _f(0.01, "Prodigy decoupled weight decay")
    warmup_steps: int = _f(600, "linear learning-rate warm-up steps")
    safeguard_warmup: bool = _f(True, "Prodigy safeguard_warmup (recommended with a warm-up)")
    bias_correction: bool = _f(True, "Prodigy use_bias_correction")
    grad_clip: float = _f(0.5, "gradient-norm clipping threshold (0 disables)")
    seed: int = _f(0, "random seed (each rank adds its rank)")
    max_nonfinite_steps: int = _f(20, "stop with an error after this many consecutive steps with a non-finite loss or "
                                      "gradient (each is skipped: the weights stay as they were)")
    # --- dynamic model expansion ------------------------------------------------------------------------
    expansions: str = _f("4:all,2:0-2", "expansion schedule, applied one entry per plateau: FACTOR:LAYERS[,...] with "
                                        "LAYERS 'all' or a list like 0-2 or 0+3 ('' disables)")
    expand_at: list[int] = _f([], "force the next scheduled expansion before this step (repeatable)")
    expand_mode: str = _f("qv", "projections copied on expansion: any of q, k, v (paper: qv)")
    expand_noise_ratio: float = _f(0.1, "noise std of the new copies, relative to the weights' mean row std")
    plateau_window: int = _f(500, "steps in the moving average of the loss used by the plateau detector")
    plateau_tolerance: float = _f(0.01, "relative improvement of the smoothed loss that resets the patience")
    plateau_patience: int = _f(5000, "steps without such an improvement that count as a plateau")
    # --- hardware ---------------------------------------------------------------------------------------
    device: str = _f("auto", "'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'")
    mixed_precision: str = _f("auto", "autocast dtype on CUDA: 'auto' (bf16 when supported), 'bf16', 'fp16' or 'no'; "
                                      "the CPU always runs fp32", choices=("auto", "bf16", "fp16", "no"))
    gradient_checkpointing: bool = _f(True, "gradient checkpointing of the frozen UNets and text encoder")
    num_threads: int = _f(0, "CPU threads for torch (0: torch's default); 1 is fastest for the tiny models")
    deterministic: bool = _f(False, "torch.use_deterministic_algorithms (exact resume on CPU)")
    # --- output -----------------------------------------------------------------------------------------
    output_dir: str = _f("runs/stage1", "where metrics.jsonl, checkpoints/ and the final inverter/ go")
    checkpoint_every: int = _f(2000, "optimizer steps between checkpoints (0: only the final one)")
    keep_checkpoints: int = _f(3, "keep the last K checkpoints")
    resume: str | None = _f(None, "resume from the latest checkpoint in OUTPUT_DIR ('--resume') or from a given "
                                  "checkpoint folder ('--resume PATH')")
    overwrite: bool = _f(False, "start afresh even if OUTPUT_DIR holds checkpoints of an earlier run (they are "
                                "deleted); without it such a start is refused, so a forgotten --resume loses nothing")
    progress: bool = _f(True, "show a tqdm progress bar")
    target_drop: float = _f(0.0, "if > 0, the summary reports PASS when the last-10%% mean loss is at least this "
                                 "fraction below the first-10%% mean")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DistillationConfig:
    """Face distillation's options (paper §2.2, eq. 2): all of stage 1's loss, and stage 2's mixed-in stage-1 steps."""

    # --- multi-timestep distillation ---------------------------------------------------------------------
    random_id_fraction: float = _f(0.4, "fraction of samples with random Gaussian IDs when --data-dir is given (stage "
                                        "2: in its stage-1 steps)")
    denoise_steps: list[int] = _f([1, 3, 5], "choices for the number k of denoising steps per trajectory")
    denoise_step_weights: list[float] = _f([0.4, 0.3, 0.2], "probabilities of the DENOISE_STEPS choices "
                                                            "(normalised)")
    t_min: int = _f(1, "smallest timestep sampled")
    t_max: int = _f(1000, "largest timestep sampled (exclusive)")
    loss_reduction: str = _f("sum", "how per-step losses combine: 'sum' (paper, eq. 2) or 'sqrt_k' (sum / sqrt(k), "
                                    "reference code)", choices=("sum", "sqrt_k"))


@dataclass
class Stage1Config(DistillationConfig, TrainingConfig):
    """Stage 1: models, face data and multi-timestep distillation on top of the shared options."""

    # --- models -----------------------------------------------------------------------------------------
    tiny: bool = _f(False, "build tiny random models (teacher derived from the student) under OUTPUT_DIR/tiny_models "
                           "instead of loading --sd-model/--arc2face/--inverter-init")
    sd_model: str | None = _f(None, "SD-1.5 folder or hub id (student: tokenizer, text encoder, UNet, scheduler, VAE)")
    arc2face: str | None = _f(None, "Arc2Face folder or hub id (teacher: encoder/ and arc2face/ UNet)")
    inverter_init: str | None = _f(None, "CLIP text encoder (folder or hub id) initialising the Prompt Inverter; "
                                         "default: SD_MODEL's text_encoder")
    # --- data -------------------------------------------------------------------------------------------
    data_dir: str | None = _f(None, "prepared face folder (python -m adaface.prepare_data: manifest.jsonl, crops, "
                                    f"masks, {EMBEDDINGS_FILE}) or a folder of images plus {EMBEDDINGS_FILE} (one "
                                    "512-d ArcFace embedding per image, keyed by file name); without it every ID is "
                                    "random")
    on_bad_data: str = _f("skip", "what to do with data that fails the start-up checks (an image that does not decode, "
                                  "an embedding that is non-finite, zero or not 512-d): 'skip' (listed, then left "
                                  "out) or 'refuse' (stop before training)", choices=("skip", "refuse"))
    resolution: int = _f(512, "image size in pixels (latents are RESOLUTION / VAE scale factor)")


def load_config_file(path: str | os.PathLike, config_cls: type[TrainingConfig] | None = None) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: file not found: {p}")
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config: {p} is not a JSON text file (undecodable byte at offset {e.start})") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config: {p} is not valid JSON: {e}") from e
    except RecursionError:
        raise ConfigError(f"--config: {p} is nested too deeply to be a config") from None
    except OSError as e:
        raise ConfigError(f"--config: {p} cannot be read ({e.strerror or e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {p} must hold a JSON object")
    by_name = {f.name: f for f in fields(config_cls or Stage1Config)}
    unknown = sorted(set(data) - set(by_name))
    if unknown:
        raise ConfigError(f"--config: unknown option(s) in {p}: {', '.join(unknown)}")
    for name, value in data.items():
        check_type(name, value, str(by_name[name].type), f" (in {p})")
    return data


def _type_ok(value: Any, typ: str) -> bool:
    if typ.endswith(" | None"):
        return value is None or _type_ok(value, typ[: -len(" | None")])
    if typ == "bool":
        return isinstance(value, bool)
    if typ == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if typ == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if typ == "str":
        return isinstance(value, str)
    if typ.startswith("list[") and typ.endswith("]"):
        return isinstance(value, list) and all(_type_ok(v, typ[5:-1]) for v in value)
    raise TypeError(f"unsupported option type {typ!r}")


_TYPE_WORDS = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string",
               "list[int]": "a list of integers", "list[float]": "a list of finite numbers"}


def check_type(name: str, value: Any, typ: str, where: str = "") -> None:
    """A one-line ConfigError unless `value` has the option's type (JSON config values are checked with it)."""
    if not _type_ok(value, typ):
        base = typ[: -len(" | None")] if typ.endswith(" | None") else typ
        want = _TYPE_WORDS.get(base, base) + (" or null" if typ.endswith(" | None") else "")
        raise ConfigError(f"{_opt(name)} must be {want}, got {json.dumps(value)}{where}")


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.replace(" ", "").split(",") if x]


def build_parser(default_config: str | None = None, config_cls: type[TrainingConfig] | None = None,
                 description: str = "AdaFace stage 1: face distillation of Arc2Face into the Prompt Inverter.",
                 ) -> argparse.ArgumentParser:
    """The CLI: `--config` plus one option per config field; unset options keep the config file's values."""
    config_cls = config_cls or Stage1Config
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", default=default_config,
                        help="JSON config file (its keys are the option names with underscores)")
    preset: dict[str, Any] = {}
    if default_config and Path(default_config).is_file():
        preset = load_config_file(default_config, config_cls)
    for f in fields(config_cls):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        helptext = f.metadata["help"]
        if f.name in preset:
            helptext += f" [default: {preset[f.name]!r} from {Path(default_config).name}; built-in {default!r}]"
        else:
            helptext += f" [default: {default!r}]"
        kw: dict[str, Any] = {"help": helptext, "dest": f.name}
        if f.name == "resume":
            parser.add_argument(_opt(f.name), nargs="?", const="latest", metavar="PATH", **kw)
            continue
        if f.type in ("bool",):
            parser.add_argument(_opt(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "expand_at":
            parser.add_argument(_opt(f.name), type=int, action="append", metavar="STEP", **kw)
        elif f.type == "list[int]":
            parser.add_argument(_opt(f.name), type=_int_list, metavar="A,B,..", **kw)
        elif f.type == "list[float]":
            parser.add_argument(_opt(f.name), type=_float_list, metavar="A,B,..", **kw)
        else:
            typ = {"int": int, "float": float}.get(str(f.type), str)
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
            parser.add_argument(_opt(f.name), type=typ, metavar=f.name.upper(), **kw)
    return parser


def parse_config(argv: list[str] | None = None, default_config: str | None = None, world_size: int = 1,
                 config_cls: type[TrainingConfig] | None = None, validator: Any = None,
                 description: str | None = None) -> Any:
    """Parse the command line, layer it over the config file, validate the result (no model is touched).

    A stage passes its own `config_cls` (a TrainingConfig subclass) and `validator(cfg, world_size)`; the
    defaults are stage 1's."""
    config_cls = config_cls or Stage1Config
    kw = {} if description is None else {"description": description}
    parser = build_parser(default_config, config_cls, **kw)
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config_path = args.pop("config", None)
    if config_path:
        values.update(load_config_file(config_path, config_cls))
    values.update(args)
    cfg = config_cls(**values)
    (validator or validate)(cfg, world_size)
    return cfg


def _check_model_source(option: str, value: str, required: tuple[str, ...],
                        alternatives: tuple[tuple[str, ...], ...] = ()) -> None:
    """A local folder must exist with its sub-folders (`required`, or one of the `alternatives` layouts);
    anything else must look like a hub id."""
    p = Path(value).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"{option}: {value} is not a folder")
        missing = [r for r in required if not (p / r).exists()]
        if missing and any(all((p / r).exists() for r in alt) for alt in alternatives):
            return
        if missing:
            also = "".join(f" (or {', '.join(alt)})" for alt in alternatives)
            raise ConfigError(f"{option}: {value} lacks {', '.join(missing)}{also} (expected the released folder "
                              "layout)")
        return
    looks_local = value.startswith((".", "/", "~")) or value.count("/") != 1 or not HUB_ID.match(value)
    if looks_local:
        raise ConfigError(f"{option}: model folder not found: {value}")
    why_not = _hub_unavailable(value)
    if why_not:
        raise ConfigError(f"{option}: model folder not found: {value} (as a hub id: {why_not})")


def _hub_unavailable(repo_id: str) -> str | None:
    """Why a hub id cannot be fetched now (None: it is cached, or the hub answers), so a folder name that merely
    looks like a hub id fails at once instead of after minutes of download retries."""
    from huggingface_hub import constants

    if (Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}").is_dir():
        return None
    if constants.HF_HUB_OFFLINE:
        return "not in the local cache, and HF_HUB_OFFLINE is set"
    import socket
    from urllib.parse import urlparse

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError as e:
        return f"not in the local cache, and {url.hostname} cannot be reached ({e.__class__.__name__})"
    return None


def _read_json(path: Path) -> dict | None:
    """A config's content for the cross-checks; None when there is none to check (a file that is missing or
    refused, over a JSON limit or invalid, is reported by name when its model loads)."""
    from ...models._io import read_json

    try:
        data = read_json(path)
    except OSError:
        return None
    return data if isinstance(data, dict) else None


def _text_hidden_size(folder: Path, subfolder: str | None = None) -> tuple[int, Path] | None:
    """hidden_size from a CLIP text encoder's config.json: folder[/subfolder], or a pipeline folder's text_encoder/.
    A full CLIPConfig holds it under text_config. None when no such file exists (nothing to check)."""
    base = folder / subfolder if subfolder else folder
    for path in (base / "config.json", base / "text_encoder" / "config.json"):
        data = _read_json(path)
        if data is None:
            continue
        if "hidden_size" not in data and isinstance(data.get("text_config"), dict):
            data = data["text_config"]
        if isinstance(data.get("hidden_size"), int):
            return data["hidden_size"], path
    return None


def _cross_attention_dims(path: Path) -> set[int] | None:
    data = _read_json(path)
    if data is None or "cross_attention_dim" not in data:
        return None
    dim = data["cross_attention_dim"]
    return set(dim) if isinstance(dim, (list, tuple)) else {dim}


def check_model_dimensions(sd_model: str, arc2face: str, inverter_init: str | None) -> None:
    """When the model sources are local folders, check from their config.json files (before loading any weights)
    that the SD text encoder, the Arc2Face encoder and the inverter's initial text encoder have one hidden size,
    and that both UNets cross-attend to contexts of that size. Missing config files are not checked here."""
    sd, a2f = Path(sd_model).expanduser(), Path(arc2face).expanduser()
    inv = Path(inverter_init).expanduser() if inverter_init else None
    if not (sd.is_dir() and a2f.is_dir() and (inv is None or inv.is_dir())):
        return  # a hub id: nothing local to read
    sizes = {
        "--sd-model": _text_hidden_size(sd, "text_encoder"),
        "--arc2face": _text_hidden_size(a2f, "encoder"),
        "--inverter-init": _text_hidden_size(inv) if inv is not None else None,
    }
    known = {opt: v for opt, v in sizes.items() if v is not None}
    if len({h for h, _ in known.values()}) > 1:
        detail = "; ".join(f"{opt} text encoder hidden size {h} ({path})" for opt, (h, path) in known.items())
        raise ConfigError(f"--sd-model/--arc2face/--inverter-init: the text encoders' hidden sizes differ: {detail}. "
                          "The inverter's output feeds the SD text encoder and the Arc2Face ID tokens feed the "
                          "inverter, so all three must match")
    if not known:
        return
    hidden = next(iter(known.values()))[0]
    for opt, path in (("--sd-model", sd / "unet" / "config.json"), ("--arc2face", a2f / "arc2face" / "config.json")):
        dims = _cross_attention_dims(path)
        if dims is not None and dims != {hidden}:
            raise ConfigError(f"{opt}: the UNet's cross_attention_dim {sorted(dims)} ({path}) does not match the text "
                              f"encoders' hidden size {hidden} (--sd-model/--arc2face/--inverter-init)")


def validate_training(cfg: TrainingConfig, world_size: int = 1) -> None:
    """The shared options' checks (every stage's validator calls this first)."""
    for f in fields(cfg):
        check_type(f.name, getattr(cfg, f.name), str(f.type))
    positive = ("steps", "batch_size", "grad_accum", "keep_checkpoints", "plateau_window", "plateau_patience",
                "max_nonfinite_steps")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{_opt(name)} must be >= 1, got {getattr(cfg, name)}")
    for name in ("warmup_steps", "checkpoint_every", "num_threads"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{_opt(name)} must be >= 0, got {getattr(cfg, name)}")
    for name in ("d_coef", "lr", "d0"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{_opt(name)} must be > 0, got {getattr(cfg, name)}")
    for name in ("weight_decay", "grad_clip", "expand_noise_ratio", "plateau_tolerance", "target_drop"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{_opt(name)} must be >= 0, got {getattr(cfg, name)}")
    if cfg.mixed_precision not in ("auto", "bf16", "fp16", "no"):
        raise ConfigError(f"--mixed-precision: 'auto', 'bf16', 'fp16' or 'no', got {cfg.mixed_precision!r}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise ConfigError(f"--device: 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}")
    if not cfg.expand_mode or set(cfg.expand_mode) - set("qkv"):
        raise ConfigError(f"--expand-mode: letters from 'qkv', got {cfg.expand_mode!r}")
    try:
        parse_expansions(cfg.expansions)
    except ValueError as e:
        raise ConfigError(f"--expansions: {e}") from e
    if any(s < 0 or s >= cfg.steps for s in cfg.expand_at):
        raise ConfigError(f"--expand-at: steps must be in [0, {cfg.steps}), got {cfg.expand_at}")
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"--device: {cfg.device} requested but no CUDA device is available (use 'auto' or 'cpu')")
    if cfg.resume and cfg.resume != "latest" and not Path(cfg.resume).is_dir():
        raise ConfigError(f"--resume: checkpoint folder not found: {cfg.resume}")
    _check_output_dir(cfg.output_dir)
    ckpt_dir = Path(cfg.output_dir) / "checkpoints"
    if not cfg.resume and not cfg.overwrite and ckpt_dir.is_dir() and any(ckpt_dir.glob("step-*")):
        raise ConfigError(f"--output-dir: {cfg.output_dir} holds checkpoints of an earlier run; pass --resume to "
                          "continue it or --overwrite to start afresh")


def _check_output_dir(path: str) -> None:
    """OUTPUT_DIR must be a folder of its own (not empty, not the current folder: a run writes and, with
    --overwrite, replaces files there) that is writable or can be created. Nothing is created here: the run
    creates it, so a refused or failed start leaves nothing behind."""
    if not path.strip():
        raise ConfigError("--output-dir must name a folder, got ''")
    out = Path(path).expanduser()
    try:
        if out.resolve() == Path.cwd().resolve():
            raise ConfigError(f"--output-dir: {path} is the current folder; name a folder of its own for the run "
                              "(e.g. runs/NAME)")
    except OSError:
        pass  # no current folder (deleted under us): nothing to compare
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir: {path} exists and is not a folder")
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--output-dir: {path} cannot be created ({existing} is not a folder)")
    probe = existing / f".write-test-{os.getpid()}"  # a real write: os.access says yes to root everywhere
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--output-dir: {path} is not writable ({e.strerror or e} in {existing})") from None


def validate_distillation(cfg: Any) -> None:
    """The multi-timestep distillation options (stage 1, and stage 2's mixed-in stage-1 steps)."""
    if not cfg.t_min < cfg.t_max <= 1000:
        raise ConfigError(f"--t-min/--t-max: need t_min < t_max <= 1000, got {cfg.t_min}, {cfg.t_max}")
    if not cfg.denoise_steps or min(cfg.denoise_steps) < 1:
        raise ConfigError(f"--denoise-steps: need positive step counts, got {cfg.denoise_steps}")
    if max(cfg.denoise_steps) > cfg.t_max - cfg.t_min:
        raise ConfigError(f"--denoise-steps: {max(cfg.denoise_steps)} steps do not fit in [t_min, t_max)")
    if len(cfg.denoise_step_weights) != len(cfg.denoise_steps):
        raise ConfigError("--denoise-step-weights: need one weight per --denoise-steps choice, got "
                          f"{len(cfg.denoise_step_weights)} for {len(cfg.denoise_steps)}")
    if min(cfg.denoise_step_weights) < 0 or sum(cfg.denoise_step_weights) <= 0:
        raise ConfigError(f"--denoise-step-weights: need non-negative weights with a positive sum, got "
                          f"{cfg.denoise_step_weights}")
    if cfg.loss_reduction not in ("sum", "sqrt_k"):
        raise ConfigError(f"--loss-reduction: 'sum' or 'sqrt_k', got {cfg.loss_reduction!r}")


def validate(cfg: Stage1Config, world_size: int = 1) -> None:
    """Reject impossible configurations with a message naming the option; reads only small files."""
    validate_training(cfg, world_size)
    for name in ("resolution",):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{_opt(name)} must be >= 1, got {getattr(cfg, name)}")
    if cfg.t_min < 0:
        raise ConfigError(f"--t-min must be >= 0, got {cfg.t_min}")
    if not 0.0 <= cfg.random_id_fraction <= 1.0:
        raise ConfigError(f"--random-id-fraction must be in [0, 1], got {cfg.random_id_fraction}")
    validate_distillation(cfg)

    if cfg.on_bad_data not in ("skip", "refuse"):
        raise ConfigError(f"--on-bad-data: 'skip' or 'refuse', got {cfg.on_bad_data!r}")
    if cfg.tiny:
        for name in ("sd_model", "arc2face", "inverter_init"):
            if getattr(cfg, name):
                raise ConfigError(f"{_opt(name)} cannot be combined with --tiny (use --no-tiny or a real config)")
    else:
        for name in ("sd_model", "arc2face"):
            if not getattr(cfg, name):
                raise ConfigError(f"{_opt(name)} is required without --tiny")
        _check_model_source("--sd-model", cfg.sd_model, ("unet", "text_encoder", "tokenizer", "scheduler"))
        _check_model_source("--arc2face", cfg.arc2face, ("arc2face", "encoder"))
        if cfg.inverter_init:
            # a CLIP text encoder folder, or an SD-1.5 pipeline folder (its text_encoder/), as the loader accepts
            _check_model_source("--inverter-init", cfg.inverter_init, ("config.json",),
                                alternatives=(("text_encoder/config.json",),))
        check_model_dimensions(cfg.sd_model, cfg.arc2face, cfg.inverter_init)

    global_batch = cfg.batch_size * world_size
    if cfg.data_dir:
        d = Path(cfg.data_dir).expanduser()
        if not d.is_dir():
            raise ConfigError(f"--data-dir: folder not found: {cfg.data_dir}")
        if not (d / EMBEDDINGS_FILE).is_file():
            raise ConfigError(f"--data-dir: {cfg.data_dir} has no {EMBEDDINGS_FILE} (precomputed ArcFace embeddings)")
        from .data import list_entries

        images = list_entries(d)[0]
        if not images:
            raise ConfigError(f"--data-dir: {cfg.data_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no "
                              "usable manifest.jsonl entries")
        if cfg.random_id_fraction < 1.0 and len(images) < world_size:
            raise ConfigError(f"--data-dir: {len(images)} images cannot be sharded over {world_size} processes")
        if cfg.random_id_fraction == 0.0 and len(images) < global_batch:
            raise ConfigError(f"--batch-size: {cfg.batch_size} x {world_size} process(es) exceeds the "
                              f"{len(images)} images in --data-dir with --random-id-fraction 0")

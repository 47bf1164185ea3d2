"""`python -m adaface.generate`: images or AnimateDiff videos of a subject with an unmodified SD-1.5 pipeline.

The subject (face photos, an ArcFace embedding file or a random ID) becomes 16 subject embeddings
(`adaface.subject.SubjectEncoder`); `encode_prompt` writes them where the placeholder word stands in each
prompt and the pipeline's own text encoder gives `prompt_embeds`; the negative prompt goes through the same
encoder as diffusers would encode it. Outputs, in `--out`:

    settings.json             every option, the resolved seed and device, and one entry per output file
    subject_arcface.npy       the identity used (512-d), which `python -m adaface.evaluate` can compare against
    p00_000.png ...           images: prompt index, image index
    p00_000.gif, p00_000/     videos: a GIF and its frames as PNGs
    contact_sheet.png         every image (a video's first frame) in one grid: a row per prompt

Each output has its own seed (`--seed` + its running index, on a CPU generator), so any single image can be
reproduced alone and on any device. `--out` must be a new or empty folder; `--overwrite` replaces an earlier
run there (its outputs are deleted first, so no stale file is mixed in).

Videos longer than the motion module's window (`--context-length`, by default the adapter's
`motion_max_seq_length`) use diffusers' FreeNoise: overlapping windows of that length, `--context-stride`
frames apart, with their noise re-used and their outputs blended. diffusers' FreeNoise encodes the prompt
itself (it accepts no `prompt_embeds`), so there the subject goes in as a textual inversion loaded into the
pipeline, which gives the same prompt embeddings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from ._cli import (
    DTYPES,
    HelpFormatter,
    OptionError,
    check_file,
    check_source,
    loading,
    resolve_device,
    resolve_dtype,
    save_strict_json,
)
from ._file_checks import (
    check_image,
    check_model_files,
    check_readable,
    check_writable_dir,
    check_writable_file,
    os_error_line,
    read_json_file,
    read_text_file,
)

SETTINGS_NAME = "settings.json"
ARCFACE_NAME = "subject_arcface.npy"
CONTACT_SHEET_NAME = "contact_sheet.png"
REPORT_NAME = "eval_report.json"  # written into a run folder by `python -m adaface.evaluate`
OUTPUT_PATTERN = re.compile(r"^p\d{2,}_\d{3,}(\.png|\.gif)?$")  # every image, GIF and frame folder of a run
FREE_NOISE_TOKEN = "<adaface-subject>"  # the subject's textual-inversion token inside a FreeNoise pipeline
DEFAULT_CONTEXT_STRIDE = 4
MAX_FPS = 100.0  # GIF frame delays are whole hundredths of a second
# Defaults that take hours per call on a CPU (a warning says so when a run uses them there).
CPU_SLOW_PIXELS = 512 * 512
SCHEDULERS = ("auto", "ddim", "dpm", "euler", "pndm")
# Seeds are int64 values: every output's seed (--seed + its index) and --random-id must fit, on any torch.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# Documented bounds: outputs per prompt, and the image side (the VAE works on 8-pixel blocks).
MAX_NUM_IMAGES = 1000
MIN_SIDE, MAX_SIDE = 16, 4096
TEXT_LENGTH = 77  # CLIP's token window, BOS and EOS included


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m adaface.generate",
        description="Generate images (or AnimateDiff videos) of a face subject with AdaFace subject embeddings "
        "in an ordinary SD-1.5 prompt.",
        formatter_class=HelpFormatter,
    )
    models = p.add_argument_group("models")
    models.add_argument("--base", required=True,
                        help="SD-1.5 pipeline: a diffusers folder (model_index.json) or a hub id; its tokenizer "
                        "and text encoder encode the prompt, and Arc2Face uses its tokenizer")
    models.add_argument("--arc2face", required=True,
                        help="Arc2Face: the released folder (encoder/ is used; the arc2face/ UNet is not needed) "
                        "or a hub id")
    models.add_argument("--inverter", required=True,
                        help="trained AdaFace Prompt Inverter folder (config.json + model.safetensors)")
    models.add_argument("--face-root",
                        help="insightface model root holding the antelopev2 pack (needed with --images)")
    models.add_argument("--strict", action="store_true",
                        help="with --images, refuse a face recognizer other than Arc2Face's arcface.onnx; refuse "
                        "prompts longer than CLIP's 77 tokens (default: warn of both)")

    subject = p.add_argument_group("subject (exactly one)")
    src = subject.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", metavar="PHOTO",
                     help="face photo(s) of the subject; several are averaged into one identity")
    src.add_argument("--embedding", metavar="FILE",
                     help="precomputed ArcFace embedding, .npy or .safetensors, [512] or [N, 512]")
    src.add_argument("--random-id", type=int, metavar="SEED", help="a random identity from this seed")
    subject.add_argument("--on-no-face", choices=("error", "random"), default="error",
                         help="what to do with a photo in which no face is found")

    prompts = p.add_argument_group("prompts")
    prompts.add_argument("--prompt", action="append", metavar="TEXT",
                         help="prompt with the subject placeholder, e.g. 'a photo of z in the forest'; repeat "
                         "for several prompts (default: 'a photo of z' when no --prompts-file)")
    prompts.add_argument("--prompts-file", metavar="FILE",
                         help="text file with one prompt per line (added to --prompt)")
    prompts.add_argument("--placeholder", default="z", help="the word that stands for the subject in the prompts")
    prompts.add_argument("--negative-prompt", default="",
                         help="negative prompt, encoded by the same text encoder (used when --guidance > 1)")

    gen = p.add_argument_group("sampling")
    gen.add_argument("--num-images", type=int, default=4,
                     help=f"images (or videos) per prompt, 1 to {MAX_NUM_IMAGES}")
    gen.add_argument("--steps", type=int, default=30, help="denoising steps")
    gen.add_argument("--guidance", type=float, default=7.5,
                     help="classifier-free guidance scale, >= 0 (at most 1: no guidance)")
    gen.add_argument("--seed", type=int, help="seed of the first output (others use seed+1, ...); random if omitted")
    gen.add_argument("--height", type=int, default=512,
                     help=f"output height in pixels, a multiple of 8 from {MIN_SIDE} to {MAX_SIDE}")
    gen.add_argument("--width", type=int, default=512,
                     help=f"output width in pixels, a multiple of 8 from {MIN_SIDE} to {MAX_SIDE}")
    gen.add_argument("--scheduler", choices=SCHEDULERS, default="auto",
                     help="sampler; auto: the pipeline's own for images, DDIM (AnimateDiff's settings) for videos")
    gen.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1, ...")
    gen.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                     help="model dtype; auto: float16 on CUDA, float32 on CPU")

    video = p.add_argument_group("video (AnimateDiff)")
    video.add_argument("--video", action="store_true", help="generate videos with AnimateDiffPipeline")
    video.add_argument("--motion-adapter", help="AnimateDiff MotionAdapter folder or hub id (needed with --video)")
    video.add_argument("--num-frames", type=int, default=16,
                       help="frames per video; more than --context-length uses FreeNoise's sliding windows")
    video.add_argument("--context-length", type=int,
                       help="FreeNoise window: frames the motion module sees at once (default and maximum: the "
                            "adapter's motion_max_seq_length)")
    video.add_argument("--context-stride", type=int,
                       help=f"FreeNoise: frames between the starts of consecutive windows (default "
                            f"{DEFAULT_CONTEXT_STRIDE}, at most --context-length)")
    video.add_argument("--fps", type=float, default=8.0, help=f"frame rate of the GIF, at most {MAX_FPS:g}")

    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, metavar="DIR", help="output folder: new or empty (created if missing)")
    out.add_argument("--overwrite", action="store_true",
                     help="--out holds an earlier run: delete its outputs first, then write this run there")
    out.add_argument("--save-embeddings", metavar="PATH.safetensors",
                     help="also write the subject as a textual-inversion file; A1111 and ComfyUI use the file's "
                          "name as the trigger word, so name it after the person (alice.safetensors)")
    out.add_argument("--ti-token", default="<z>",
                     help="token under which --save-embeddings writes the subject: pipelines that load the file "
                          "with load_textual_inversion say this token; this command's prompts use --placeholder")
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file).expanduser()
        text = read_text_file(path, "--prompts-file", args.prompts_file)
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise OptionError(f"--prompts-file {args.prompts_file}: no prompts in it")
    return prompts or [f"a photo of {args.placeholder}"]


def check_args(args: argparse.Namespace) -> list[str]:
    """Every check that needs no model; returns the prompts. Raises OptionError naming the option."""
    from .models.subject_prompt import split_on_placeholder

    for name in ("num_images", "steps", "num_frames"):
        if getattr(args, name) < 1:
            raise OptionError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.num_images > MAX_NUM_IMAGES:
        raise OptionError(f"--num-images must be at most {MAX_NUM_IMAGES}, got {args.num_images}")
    for name in ("height", "width"):
        v = getattr(args, name)
        if not MIN_SIDE <= v <= MAX_SIDE or v % 8:
            raise OptionError(f"--{name} must be a multiple of 8 from {MIN_SIDE} to {MAX_SIDE}, got {v}")
    if not math.isfinite(args.guidance) or args.guidance < 0:
        raise OptionError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if not math.isfinite(args.fps) or not 0 < args.fps <= MAX_FPS:
        raise OptionError(f"--fps must be a number in (0, {MAX_FPS:g}] (GIF delays are 1/100 s steps), got {args.fps}")
    if not args.placeholder.strip() or any(c.isspace() for c in args.placeholder):
        raise OptionError(f"--placeholder must be one word, got {args.placeholder!r}")
    prompts = read_prompts(args)
    for prompt in prompts:
        try:
            split_on_placeholder(prompt, args.placeholder)
        except ValueError as e:
            raise OptionError(f"--prompt: {e}") from e
    count = len(prompts) * args.num_images
    if args.seed is not None and not SEED_MIN <= args.seed <= SEED_MAX - (count - 1):
        raise OptionError(
            f"--seed must be between {SEED_MIN} and {SEED_MAX - (count - 1)}, got {args.seed}: the {count} outputs "
            f"use --seed + 0 ... --seed + {count - 1}, and each must fit in a 64-bit signed integer"
        )
    if args.random_id is not None and not SEED_MIN <= args.random_id <= SEED_MAX:
        raise OptionError(f"--random-id must be between {SEED_MIN} and {SEED_MAX}, got {args.random_id}")

    check_out(args)
    if args.save_embeddings is not None:
        check_writable_file(args.save_embeddings, "--save-embeddings")
    args.base = check_source(args.base, "--base", ["model_index.json"], "an SD-1.5 pipeline folder")
    args.arc2face = check_source(args.arc2face, "--arc2face", ["encoder/config.json"], "an Arc2Face folder")
    inverter = Path(args.inverter).expanduser()
    if not (inverter / "config.json").exists() or not (inverter / "model.safetensors").exists():
        raise OptionError(
            f"--inverter {args.inverter}: not a Prompt Inverter folder (needs config.json + model.safetensors)"
        )
    check_model_folders(args)
    check_prompt_lengths(args, prompts)
    if args.images:
        if not args.face_root:
            raise OptionError("--face-root is needed with --images (the insightface root with antelopev2)")
        for image in args.images:
            check_file(image, "--images")
            check_image(Path(image).expanduser(), "--images", image)
    if args.face_root:
        from .models.face_encoder import find_model_pack

        try:
            find_model_pack(args.face_root)
        except FileNotFoundError as e:
            raise OptionError(f"--face-root {args.face_root}: {e}") from e
    if args.embedding:
        from .subject import EMBEDDING_SUFFIXES, load_arcface_embedding

        path = check_file(args.embedding, "--embedding", EMBEDDING_SUFFIXES)
        check_readable(path, "--embedding", args.embedding)
        try:
            load_arcface_embedding(path)
        except ValueError as e:
            raise OptionError(f"--embedding {e}") from e
    if args.video and not args.motion_adapter:
        raise OptionError("--video needs --motion-adapter (an AnimateDiff MotionAdapter folder or hub id)")
    if args.motion_adapter and not args.video:
        raise OptionError("--motion-adapter is only used with --video")
    if args.motion_adapter:
        args.motion_adapter = check_source(args.motion_adapter, "--motion-adapter", ["config.json"],
                                           "a MotionAdapter folder")
    check_frames(args)
    if args.save_embeddings and Path(args.save_embeddings).suffix != ".safetensors":
        raise OptionError(f"--save-embeddings {args.save_embeddings}: the file name must end in .safetensors")
    if not args.ti_token.strip() or any(c.isspace() for c in args.ti_token):
        raise OptionError(f"--ti-token must be one word without spaces, got {args.ti_token!r}")
    return prompts


def check_model_folders(args: argparse.Namespace) -> None:
    """Every local model's config and safetensors files are whole (headers and sizes; nothing is loaded)."""
    check_model_files(Path(args.inverter).expanduser(), "--inverter", args.inverter)
    for option, value, sub in (("--base", args.base, ""), ("--arc2face", args.arc2face, "encoder"),
                               ("--motion-adapter", args.motion_adapter, "")):
        if value and Path(value).is_dir():
            folder = Path(value) / sub
            check_model_files(folder, option, value if not sub else f"{value}/{sub}")


def check_prompt_lengths(args: argparse.Namespace, prompts: list[str]) -> None:
    """With a local --base tokenizer: the subject's slots must lie inside CLIP's 77 tokens (an error naming the
    prompt), and text past 77 tokens, which the pipeline cuts off, is a warning (an error with --strict)."""
    from .models.subject_prompt import split_on_placeholder, subject_input_ids

    folder = Path(args.base) / "tokenizer"
    if not folder.is_dir():
        return  # a hub id: checked when the pipeline encodes the prompt
    from transformers import CLIPTokenizer

    config = read_json_file(Path(args.inverter).expanduser() / "config.json", "--inverter", args.inverter)
    slots = config.get("num_id_tokens", 16) if isinstance(config, dict) else 16
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise OptionError(f"--base {args.base}: its tokenizer cannot be read ({e})") from e
    for prompt in prompts:
        try:
            subject_input_ids(tokenizer, prompt, slots, args.placeholder, TEXT_LENGTH)
        except ValueError as e:
            raise OptionError(f"--prompt: {e}; put the placeholder earlier or shorten the prompt") from e
        before, after = split_on_placeholder(prompt, args.placeholder)
        length = 2 + slots + sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t in (before, after)
                                 if t.strip())
        if length > TEXT_LENGTH:
            message = (f"--prompt {prompt!r}: {length} tokens with the {slots} subject slots; CLIP reads "
                       f"{TEXT_LENGTH}, so the end is cut off")
            if args.strict:
                raise OptionError(f"{message} (--strict)")
            print(f"warning: {message}", file=sys.stderr)


def motion_window(source: str) -> int:
    """The motion adapter's `motion_max_seq_length` from its config (a local file or the hub's config only)."""
    path = Path(source) / "config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except ValueError as e:
            raise OptionError(f"--motion-adapter {source}: config.json is not valid JSON ({e})") from e
    else:
        from diffusers import MotionAdapter

        with loading("--motion-adapter", source):
            config = MotionAdapter.load_config(source)
    window = config.get("motion_max_seq_length")
    if window is None:  # an older config without the key: MotionAdapter's own default applies
        import inspect

        from diffusers import MotionAdapter

        window = inspect.signature(MotionAdapter.__init__).parameters["motion_max_seq_length"].default
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise OptionError(f"--motion-adapter {source}: config.json has no valid motion_max_seq_length ({window!r})")
    return window


def check_frames(args: argparse.Namespace) -> None:
    """--num-frames against the adapter's window (read from its config, before any model loads); sets
    `args.free_noise` and resolves the FreeNoise window options."""
    args.free_noise = False
    if not args.video:
        for name in ("context_length", "context_stride"):
            if getattr(args, name) is not None:
                raise OptionError(f"--{name.replace('_', '-')} is only used with --video")
        return
    window = motion_window(args.motion_adapter)
    length = window if args.context_length is None else args.context_length
    if not 1 <= length <= window:
        raise OptionError(
            f"--context-length must be between 1 and the motion adapter's motion_max_seq_length {window}, got {length}"
        )
    stride = DEFAULT_CONTEXT_STRIDE if args.context_stride is None else args.context_stride
    if not 1 <= stride <= length:
        raise OptionError(f"--context-stride must be between 1 and --context-length ({length}), got {stride}")
    args.context_length, args.context_stride = length, stride
    args.free_noise = args.num_frames > length


def earlier_run(out: Path) -> list[Path] | None:
    """What an earlier `generate` run wrote into `out` (its settings, identity, outputs, frames, contact sheet,
    evaluation report, a textual-inversion file saved inside it); None if `out` holds no generate run."""
    settings_path = out / SETTINGS_NAME
    try:
        settings = json.loads(settings_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(settings, dict) or settings.get("tool") != "adaface.generate":
        return None
    files = {settings_path, out / ARCFACE_NAME, out / CONTACT_SHEET_NAME, out / REPORT_NAME}
    for entry in settings.get("outputs") or []:
        if isinstance(entry, dict) and isinstance(entry.get("file"), str):
            files.add(out / entry["file"])
    # An interrupted run wrote an output it had not listed yet: its names follow the pattern.
    files.update(f for f in out.iterdir() if OUTPUT_PATTERN.match(f.name))
    embeddings = (settings.get("subject") or {}).get("embeddings_file")
    if isinstance(embeddings, str) and Path(embeddings).parent == out.resolve():
        files.add(out / Path(embeddings).name)
    root = out.resolve()
    return sorted(f for f in files if (f.exists() or f.is_symlink()) and f.resolve().parent == root)


def check_out(args: argparse.Namespace) -> None:
    """--out must be new or empty; --overwrite accepts an earlier generate run (cleared when this run starts)."""
    out = check_writable_dir(args.out, "--out")
    args.clear = []
    if not out.is_dir() or not any(out.iterdir()):
        return  # nothing to replace: --overwrite is a no-op, so scripts may always pass it
    previous = earlier_run(out)
    if not args.overwrite:
        what = "an earlier generate run" if previous is not None else "files"
        raise OptionError(f"--out {args.out}: not empty (holds {what}); pass --overwrite to replace an earlier "
                          "run, or choose a new folder")
    if previous is None:
        raise OptionError(f"--overwrite: --out {args.out} is not empty and holds no generate run ({SETTINGS_NAME} "
                          "with tool adaface.generate); only a run's own outputs are ever deleted")
    args.clear = previous


def clear_earlier_run(files: list[Path]) -> None:
    for f in files:
        if f.is_dir() and not f.is_symlink():
            shutil.rmtree(f)
        else:
            f.unlink(missing_ok=True)


def make_scheduler(name: str, config: Any, video: bool) -> Any:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

    if name == "auto" and not video:
        return None
    if name == "auto" or (name == "ddim" and video):
        # diffusers' recommended AnimateDiff sampler settings (its AnimateDiff documentation).
        return DDIMScheduler.from_config(config, clip_sample=False, timestep_spacing="linspace",
                                         beta_schedule="linear", steps_offset=1)
    cls = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler,
           "pndm": PNDMScheduler}[name]
    return cls.from_config(config)


def load_pipeline(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    """StableDiffusionPipeline, or AnimateDiffPipeline with the MotionAdapter for --video."""
    if args.video:
        from diffusers import AnimateDiffPipeline, MotionAdapter

        with loading("--motion-adapter", args.motion_adapter):
            adapter = MotionAdapter.from_pretrained(args.motion_adapter, torch_dtype=dtype)
        with loading("--base", args.base):
            pipe = AnimateDiffPipeline.from_pretrained(args.base, motion_adapter=adapter, torch_dtype=dtype)
        if args.free_noise:
            pipe.enable_free_noise(context_length=args.context_length, context_stride=args.context_stride)
    else:
        from diffusers import StableDiffusionPipeline

        with loading("--base", args.base):
            pipe = StableDiffusionPipeline.from_pretrained(args.base, torch_dtype=dtype)
    scheduler = make_scheduler(args.scheduler, pipe.scheduler.config, args.video)
    if scheduler is not None:
        pipe.scheduler = scheduler
    return pipe.to(device)


def load_subject_encoder(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    from .models.arc2face import Arc2Face
    from .models.prompt_inverter import PromptInverter
    from .subject import SubjectEncoder

    with loading("--arc2face", args.arc2face):
        # Arc2Face ships no tokenizer: it was trained with SD-1.5's, which --base holds.
        arc2face = Arc2Face.from_pretrained(args.arc2face, tokenizer=args.base, load_unet=False)
    with loading("--inverter", args.inverter):
        inverter = PromptInverter.from_pretrained(args.inverter)
    try:
        return SubjectEncoder(arc2face.to(device=device, dtype=dtype), inverter.to(device=device, dtype=dtype),
                              face_root=args.face_root)
    except ValueError as e:
        raise OptionError(f"--inverter {args.inverter} does not fit --arc2face {args.arc2face}: {e}") from e


def subject_source(args: argparse.Namespace) -> dict:
    if args.images:
        return {"images": [str(Path(i).expanduser().resolve()) for i in args.images]}
    if args.embedding:
        return {"embedding": str(Path(args.embedding).expanduser().resolve())}
    return {"random_id": args.random_id}


def save_frames(frames: list, folder: Path, gif: Path, fps: float) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for k, frame in enumerate(frames):
        frame.save(folder / f"{k:03d}.png")
        names.append(f"{folder.name}/{k:03d}.png")
    frames[0].save(gif, save_all=True, append_images=list(frames[1:]), duration=round(1000 / fps), loop=0)
    return names


def warn_if_slow_on_cpu(args: argparse.Namespace, prompts: list[str], device: torch.device) -> None:
    if device.type != "cpu" or args.height * args.width < CPU_SLOW_PIXELS:
        return
    count = len(prompts) * args.num_images
    what = f"{count} video(s) of {args.num_frames} frames" if args.video else f"{count} image(s)"
    print(f"warning: {what} at {args.width}x{args.height}, {args.steps} steps, on the CPU: expect hours; for a "
          "try-out pass e.g. --height 64 --width 64 --steps 4 --num-images 1", file=sys.stderr)


def report_stand_ins(args: argparse.Namespace, subject: Any) -> None:
    if not subject.random_stand_ins:
        return
    whose = "the whole identity is random" if subject.all_random else "averaged in with the other photos"
    print(f"--on-no-face random: no face found in {', '.join(subject.random_stand_ins)}; a random identity stands in "
          f"for {'it' if len(subject.random_stand_ins) == 1 else 'them'} ({whose}; recorded in {SETTINGS_NAME})",
          file=sys.stderr)


def free_noise_prompt(prompt: str, placeholder: str) -> str:
    """The prompt with the subject as the pipeline's textual-inversion token (FreeNoise encodes prompts itself)."""
    from .models.subject_prompt import placeholder_pattern

    return placeholder_pattern(placeholder).sub(lambda _: FREE_NOISE_TOKEN, prompt)


def generate(args: argparse.Namespace, prompts: list[str]) -> dict:
    """Load the models, encode the subject, run the pipeline; returns the settings written to settings.json."""
    import numpy as np

    from .models.subject_prompt import save_textual_inversion

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    warn_if_slow_on_cpu(args, prompts, device)

    subject_encoder = load_subject_encoder(args, device, dtype)
    recognizer = None
    if args.images:  # Arc2Face was conditioned on its own arcface.onnx: record (and check) what embeds the photos
        from .models.face_encoder import RecognizerMismatch, check_recognizer

        recognizer = subject_encoder.face_encoder.recognizer_file
        try:
            warning = check_recognizer(recognizer, strict=args.strict)
        except RecognizerMismatch as e:
            raise OptionError(f"--strict: {e}") from e
        if warning:
            print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    try:
        identity = subject_encoder.resolve_identity(
            images=args.images, embedding=args.embedding, random_id=args.random_id, on_no_face=args.on_no_face,
            generator=torch.Generator().manual_seed(seed))
    except ValueError as e:  # no face in a photo, unreadable photo
        raise OptionError(f"--images: {e}") from e
    report_stand_ins(args, identity)
    arcface = identity.arcface
    subject = subject_encoder(arcface).float()
    del subject_encoder  # the pipeline needs the memory more

    # Nothing is written before every model has loaded: a failure or Ctrl-C while loading leaves --out as it was.
    pipe = load_pipeline(args, device, dtype)
    settings = run_settings(args, prompts, seed, device, dtype, pipe, identity)
    settings["recognizer"] = recognizer

    out = Path(args.out).expanduser()
    clear_earlier_run(args.clear)
    with RunFiles(out) as written:
        # settings.json first: whatever follows, a rerun with --overwrite recognises the folder as a run.
        written.add(out / SETTINGS_NAME)
        save_strict_json(settings, out / SETTINGS_NAME)
        written.add(out / ARCFACE_NAME)
        np.save(out / ARCFACE_NAME, arcface.cpu().numpy().astype(np.float32))
        if args.save_embeddings:
            written.add(Path(args.save_embeddings).expanduser())
            save_textual_inversion(subject, Path(args.save_embeddings).expanduser(), token=args.ti_token)
        run_pipeline(args, prompts, pipe, subject, settings, out, device, dtype, written)
    return settings


class RunFiles:
    """The files one run writes. If the run fails (or is interrupted) before its first output is complete, they
    are removed again, and so is `out` if this run created it: the folder is left as it was. Once an output is
    complete the run is kept as far as it got (settings.json lists it; --overwrite replaces it)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.created = not out.exists()
        self.paths: list[Path] = []
        self.kept = False

    def __enter__(self) -> RunFiles:
        self.out.mkdir(parents=True, exist_ok=True)
        return self

    def add(self, path: Path) -> None:
        self.paths.append(path)

    def keep(self) -> None:
        self.kept = True

    def __exit__(self, kind: object, *_: object) -> None:
        if kind is None or self.kept:
            return
        for path in reversed(self.paths):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
        if self.created:
            with contextlib.suppress(OSError):
                self.out.rmdir()  # only if empty


def run_pipeline(args: argparse.Namespace, prompts: list[str], pipe: Any, subject: torch.Tensor, settings: dict,
                 out: Path, device: torch.device, dtype: torch.dtype, written: RunFiles) -> None:
    """Every output, settings.json rewritten after each, then the contact sheet."""
    from .models.subject_prompt import encode_prompt

    seed = settings["seed"]
    negative = None
    if args.free_noise:
        pipe.load_textual_inversion({FREE_NOISE_TOKEN: subject.to(device, dtype)})
    elif args.guidance > 1.0:  # diffusers only uses negative embeddings under classifier-free guidance
        negative, _ = pipe.encode_prompt(args.negative_prompt, device, 1, False)
    index = 0
    sheet: list[list[Any]] = []
    with torch.no_grad():
        for p, prompt in enumerate(prompts):
            if args.free_noise:
                text = dict(prompt=free_noise_prompt(prompt, args.placeholder),
                            negative_prompt=args.negative_prompt)
            else:
                text = dict(prompt_embeds=encode_prompt(pipe.tokenizer, pipe.text_encoder, prompt,
                                                        subject.to(device), placeholder=args.placeholder),
                            negative_prompt_embeds=negative)
            sheet.append([])
            for i in range(args.num_images):
                item_seed = seed + index
                index += 1
                common = dict(
                    **text, num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.height,
                    width=args.width, generator=torch.Generator().manual_seed(item_seed),
                )
                name = f"p{p:02d}_{i:03d}"
                entry = {"prompt_index": p, "prompt": prompt, "seed": item_seed}
                written.add(out / (f"{name}.gif" if args.video else f"{name}.png"))
                if args.video:
                    written.add(out / name)
                    frames = pipe(num_frames=args.num_frames, **common).frames[0]
                    entry["file"] = f"{name}.gif"
                    entry["frames"] = save_frames(frames, out / name, out / f"{name}.gif", args.fps)
                    sheet[-1].append(frames[0])
                else:
                    result = pipe(**common)
                    result.images[0].save(out / f"{name}.png")
                    entry["file"] = f"{name}.png"
                    nsfw = getattr(result, "nsfw_content_detected", None)
                    entry["nsfw"] = bool(nsfw[0]) if nsfw else None
                    sheet[-1].append(result.images[0])
                settings["outputs"].append(entry)
                # Rewritten after every output, so an interrupted run can still be evaluated.
                save_strict_json(settings, out / SETTINGS_NAME)
                written.keep()
    contact_sheet(sheet).save(out / CONTACT_SHEET_NAME)
    settings["contact_sheet"] = CONTACT_SHEET_NAME
    save_strict_json(settings, out / SETTINGS_NAME)


def contact_sheet(rows: list[list[Any]]) -> Any:
    """One image: a row per prompt, its outputs left to right (all outputs of a run have one size)."""
    from PIL import Image

    width, height = rows[0][0].size
    sheet = Image.new("RGB", (width * max(len(r) for r in rows), height * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            sheet.paste(image.convert("RGB"), (x * width, y * height))
    return sheet


def run_settings(args: argparse.Namespace, prompts: list[str], seed: int, device: torch.device,
                 dtype: torch.dtype, pipe: Any, identity: Any) -> dict:
    import diffusers
    import transformers

    from . import __version__

    settings = {
        "tool": "adaface.generate",
        "adaface_version": __version__,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
        "options": {k: v for k, v in vars(args).items() if k not in ("clear", "free_noise")},
        "prompts": prompts,
        "placeholder": args.placeholder,
        "seed": seed,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "pipeline": type(pipe).__name__,
        "scheduler": {"class": type(pipe.scheduler).__name__, "config": dict(pipe.scheduler.config)},
        "subject": {**subject_source(args), "arcface_file": ARCFACE_NAME,
                    "embeddings_file": str(Path(args.save_embeddings).expanduser().resolve())
                    if args.save_embeddings else None,
                    # photos without a face for which a random vector stood in (--on-no-face random)
                    "random_stand_ins": identity.random_stand_ins, "all_random": identity.all_random},
        "kind": "video" if args.video else "image",
        "outputs": [],
    }
    if args.video:
        settings["video"] = {"num_frames": args.num_frames, "free_noise": args.free_noise,
                             "context_length": args.context_length, "context_stride": args.context_stride}
    # Round trip through JSON once: scheduler configs hold tuples and numpy values.
    return json.loads(json.dumps(settings, default=str, allow_nan=False))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        prompts = check_args(args)
        settings = generate(args, prompts)
    except OptionError as e:
        parser.error(str(e))
    except OSError as e:  # a full disk, a folder made read-only mid-run: what and where, not a traceback
        parser.error(os_error_line(e))
    n = len(settings["outputs"])
    print(f"wrote {n} {settings['kind']}{'s' if n != 1 else ''} and {SETTINGS_NAME} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

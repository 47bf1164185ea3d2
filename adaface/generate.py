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

Several subjects (`--subject z=alice.jpg --subject y=random:7`) each get their own placeholder; a prompt may use
any of them, each once, and each placeholder becomes its subject's 16 embeddings. `--region z=left` confines a
subject's tokens to a part of the image in every cross-attention layer (`adaface.models.regional_attention`),
against the blending of identities that attend over the whole image. Their identities go to `subject{k}_arcface.npy`
(k in --subject order) and `--save-embeddings` writes one textual-inversion file per subject.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import random
import re
import shutil
import sys
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from ._cli import (
    DTYPES,
    OptionError,
    check_file,
    check_source,
    loading,
    resolve_device,
    resolve_dtype,
    save_strict_json,
)
from ._command import command_errors, command_parser
from ._file_checks import (
    check_image,
    check_model_files,
    check_readable,
    check_writable_dir,
    check_writable_file,
    read_text_file,
)

SETTINGS_NAME = "settings.json"
MAX_PROMPTS_FILE_BYTES = 2**20  # --prompts-file: a megabyte of prompts is thousands of runs
ARCFACE_NAME = "subject_arcface.npy"
# the identity files a run writes: ARCFACE_NAME for one subject, subject{k}_arcface.npy for several
ARCFACE_PATTERN = re.compile(r"^(subject_arcface|subject\d{1,3}_arcface)\.npy$")
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
SLOTS_PER_SUBJECT = 16  # Arc2Face's ID tokens, which the Prompt Inverter turns into 16 prompt embeddings (§2.1)
PROMPT_POSITIONS = 75  # a 77-token prompt less its start and end tokens
# Documented bounds: outputs per prompt, and the image side (the VAE works on 8-pixel blocks).
MAX_NUM_IMAGES = 1000
MIN_SIDE, MAX_SIDE = 16, 4096
TEXT_LENGTH = 77  # CLIP's token window, BOS and EOS included


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("generate", "Generate images (or AnimateDiff videos) of a face subject with AdaFace "
                       "subject embeddings in an ordinary SD-1.5 prompt.")
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

    subject = p.add_argument_group("subject: one with --images, --embedding or --random-id, or one or more "
                                   "with --subject")
    src = subject.add_mutually_exclusive_group()
    src.add_argument("--images", nargs="+", metavar="PHOTO",
                     help="face photo(s) of the subject; several are averaged into one identity")
    src.add_argument("--embedding", metavar="FILE",
                     help="precomputed ArcFace embedding, .npy or .safetensors, [512] or [N, 512]")
    src.add_argument("--random-id", type=int, metavar="SEED", help="a random identity from this seed")
    subject.add_argument("--on-no-face", choices=("error", "random"), default="error",
                         help="what to do with a photo in which no face is found")
    subject.add_argument("--subject", action="append", metavar="PLACEHOLDER=SOURCE",
                         help="a subject and the word that stands for it in the prompts; SOURCE is face photos "
                         "(z=alice1.jpg,alice2.jpg), random:SEED (y=random:7) or embedding:FILE (y=embedding:bob.npy); "
                         "repeat for several people in one picture")
    subject.add_argument("--region", action="append", metavar="PLACEHOLDER=REGION",
                         help="confine a subject to a part of the image: left, right, top, bottom or a box "
                         "x0,y0,x1,y1 in fractions of the width and height (z=left, y=0.5,0,1,1)")
    subject.add_argument("--allow-overlap", action="store_true", help="let --region boxes overlap")

    prompts = p.add_argument_group("prompts")
    prompts.add_argument("--prompt", action="append", metavar="TEXT",
                         help="prompt with the subject placeholder, e.g. 'a photo of z in the forest'; repeat "
                         "for several prompts (default: 'a photo of z' when no --prompts-file)")
    prompts.add_argument("--prompts-file", metavar="FILE",
                         help="text file with one prompt per line (added to --prompt)")
    prompts.add_argument("--placeholder", default="z",
                         help="the word that stands for the subject in the prompts (with --images, --embedding or "
                         "--random-id; --subject names its own)")
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
    add_pipeline_options(gen)

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
                          "name as the trigger word, so name it after the person (alice.safetensors); with several "
                          "subjects, one file each, PATH's name plus _PLACEHOLDER, with token <PLACEHOLDER>")
    out.add_argument("--ti-token", default="<z>",
                     help="token under which --save-embeddings writes the subject: pipelines that load the file "
                          "with load_textual_inversion say this token; this command's prompts use --placeholder")
    return p


def add_pipeline_options(group: argparse._ArgumentGroup) -> None:
    """--scheduler, --device and --dtype: how the pipeline runs (the demo's models take them too)."""
    group.add_argument("--scheduler", choices=SCHEDULERS, default="auto",
                       help="sampler; auto: the pipeline's own for images, DDIM (AnimateDiff's settings) for videos")
    group.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1, ...")
    group.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                       help="model dtype; auto: float16 on CUDA, float32 on CPU")


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = check_file(args.prompts_file, "--prompts-file")
        if path.stat().st_size > MAX_PROMPTS_FILE_BYTES:
            raise OptionError(f"--prompts-file {args.prompts_file}: {path.stat().st_size:,} bytes, over the limit "
                              f"of {MAX_PROMPTS_FILE_BYTES:,} (one prompt a line)")
        text = read_text_file(path, "--prompts-file", args.prompts_file)
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise OptionError(f"--prompts-file {args.prompts_file}: no prompts in it")
    return prompts or [f"a photo of {' and '.join(s.placeholder for s in args.subjects)}"]


def subject_specs(args: argparse.Namespace) -> list:
    """The subjects: each --subject, or the one subject of --images / --embedding / --random-id."""
    from .subject import SubjectSpec

    single = args.images or args.embedding or args.random_id is not None
    if args.subject and single:
        raise OptionError("--subject: name every subject with --subject, or the one subject with --images, "
                          "--embedding or --random-id, not both")
    if not args.subject:
        if not single:
            raise OptionError("a subject is needed: --images, --embedding or --random-id (one subject), or "
                              "--subject PLACEHOLDER=SOURCE (one or more)")
        return [SubjectSpec(args.placeholder, images=args.images, embedding=args.embedding,
                            random_id=args.random_id)]
    specs = []
    for text in args.subject:
        if isinstance(text, SubjectSpec):  # built by a caller (the demo), not typed
            specs.append(text)
            continue
        try:
            specs.append(SubjectSpec.parse(text))
        except ValueError as e:
            raise OptionError(f"--subject {e}") from e
    placeholders = [s.placeholder for s in specs]
    for placeholder in placeholders:
        if placeholders.count(placeholder) > 1:
            raise OptionError(f"--subject: {placeholders.count(placeholder)} subjects use the placeholder "
                              f"{placeholder!r}; each subject needs its own")
    return specs


def subject_option(args: argparse.Namespace, spec: Any, kind: str) -> str:
    """The option that named a subject's source of `kind` (images, embedding, random_id), for messages."""
    if not args.subject:
        return f"--{kind.replace('_', '-')}"
    return f"--subject {spec.placeholder}=" + {"images": "PHOTOS", "embedding": "embedding:FILE",
                                                "random_id": "random:SEED"}[kind]


def check_regions(args: argparse.Namespace) -> dict:
    """--region PLACEHOLDER=REGION for existing subjects, inside the image, not empty, not overlapping."""
    from .models.regional_attention import NAMED_REGIONS, Region

    placeholders = [s.placeholder for s in args.subjects]
    regions: dict[str, Region] = {}
    for text in args.region or []:
        placeholder, sep, spec = text.partition("=")
        placeholder = placeholder.strip()
        if not sep:
            raise OptionError(f"--region {text}: expected PLACEHOLDER=REGION, REGION one of "
                              f"{', '.join(NAMED_REGIONS)} or x0,y0,x1,y1")
        if placeholder not in placeholders:
            raise OptionError(f"--region {text}: no subject has the placeholder {placeholder!r} (subjects: "
                              f"{', '.join(placeholders)})")
        if placeholder in regions:
            raise OptionError(f"--region {text}: subject {placeholder!r} already has a region")
        try:
            regions[placeholder] = Region.parse(spec)
        except ValueError as e:
            raise OptionError(f"--region {text}: {e}") from e
    if not args.allow_overlap:
        for (a, ra), (b, rb) in combinations(regions.items(), 2):
            if ra.overlaps(rb):
                raise OptionError(f"--region: the regions of {a!r} ({ra.spec()}) and {b!r} ({rb.spec()}) overlap; "
                                  "pass --allow-overlap to allow it")
    return regions


def check_subject_prompts(args: argparse.Namespace, prompts: list[str]) -> None:
    """Each prompt uses its subjects once each and has room for their slots; each subject is in some prompt."""
    from .models.subject_prompt import find_placeholders

    placeholders = [s.placeholder for s in args.subjects]
    used: set[str] = set()
    for prompt in prompts:
        try:
            found = find_placeholders(prompt, placeholders)
        except ValueError as e:
            raise OptionError(f"--prompt: {e}") from e
        if len(found) * SLOTS_PER_SUBJECT > PROMPT_POSITIONS:
            raise OptionError(
                f"--subject: the prompt {prompt!r} uses {len(found)} subjects, whose {len(found)} x "
                f"{SLOTS_PER_SUBJECT} slots exceed the {PROMPT_POSITIONS} positions of a 77-token prompt; use at "
                f"most {PROMPT_POSITIONS // SLOTS_PER_SUBJECT} subjects per prompt"
            )
        used.update(f[0] for f in found)
    for placeholder in placeholders:
        if placeholder not in used:
            option = f"--subject {placeholder}" if args.subject else "--placeholder"
            raise OptionError(f"{option}: the placeholder {placeholder!r} appears in no prompt")


def check_prompt_lengths(args: argparse.Namespace, prompts: list[str]) -> None:
    """With a local --base tokenizer: every subject's slots must lie inside CLIP's 77 tokens (an error naming the
    prompt), and text past 77 tokens, which the pipeline cuts off, is a warning (an error with --strict). A hub id's
    tokenizer is only fetched with the pipeline; encoding raises the same slot error then."""
    folder = Path(args.base) / "tokenizer"
    if not folder.is_dir():
        return
    from transformers import CLIPTokenizer

    from .models.subject_prompt import find_placeholders, subject_slots

    try:
        with loading("--base", args.base):
            tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise OptionError(f"--base {args.base}: its tokenizer cannot be read ({e})") from e
    slots = {s.placeholder: SLOTS_PER_SUBJECT for s in args.subjects}
    for prompt in prompts:
        try:
            subject_slots(tokenizer, prompt, slots, min(TEXT_LENGTH, tokenizer.model_max_length))
        except ValueError as e:
            raise OptionError(f"--prompt: {e}; put the placeholder earlier or shorten the prompt") from e
        found = find_placeholders(prompt, list(slots))
        cuts = [0, *[i for _, begin, end in found for i in (begin, end)], len(prompt)]
        pieces = [prompt[cuts[i]:cuts[i + 1]] for i in range(0, len(cuts), 2)]
        length = 2 + sum(slots[p] for p, _, _ in found) + sum(
            len(tokenizer(t, add_special_tokens=False).input_ids) for t in pieces if t.strip())
        if length > TEXT_LENGTH:
            message = (f"--prompt {prompt!r}: {length} tokens with the subjects' slots; CLIP reads {TEXT_LENGTH}, so "
                       "the end is cut off")
            if args.strict:
                raise OptionError(f"{message} (--strict)")
            print(f"warning: {message}", file=sys.stderr)


def embeddings_files(args: argparse.Namespace) -> list[tuple[Path, str]] | None:
    """(textual-inversion file, its token) per subject for --save-embeddings: the path and --ti-token for one
    subject; PATH's name plus _PLACEHOLDER and token <PLACEHOLDER> for each of several."""
    if not args.save_embeddings:
        return None
    path = Path(args.save_embeddings).expanduser()
    if len(args.subjects) == 1:
        return [(path, args.ti_token)]
    files = []
    for spec in args.subjects:
        word = spec.placeholder.strip("<>")
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", word)
        token = spec.placeholder if spec.placeholder.startswith("<") and spec.placeholder.endswith(">") \
            else f"<{word}>"
        files.append((path.with_name(f"{path.stem}_{name}{path.suffix}"), token))
    return files


def arcface_file(args: argparse.Namespace, k: int) -> str:
    return ARCFACE_NAME if len(args.subjects) == 1 else f"subject{k}_arcface.npy"


def check_args(args: argparse.Namespace) -> list[str]:
    """Every check that needs no model; returns the prompts. Raises OptionError naming the option."""
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
    args.subjects = subject_specs(args)
    args.regions = check_regions(args)
    prompts = read_prompts(args)
    check_subject_prompts(args, prompts)
    count = len(prompts) * args.num_images
    if args.seed is not None and not SEED_MIN <= args.seed <= SEED_MAX - (count - 1):
        raise OptionError(
            f"--seed must be between {SEED_MIN} and {SEED_MAX - (count - 1)}, got {args.seed}: the {count} outputs "
            f"use --seed + 0 ... --seed + {count - 1}, and each must fit in a 64-bit signed integer"
        )
    for spec in args.subjects:
        if spec.random_id is not None and not SEED_MIN <= spec.random_id <= SEED_MAX:
            raise OptionError(f"{subject_option(args, spec, 'random_id')} must be between {SEED_MIN} and "
                              f"{SEED_MAX}, got {spec.random_id}")

    check_out(args)
    if args.save_embeddings is not None:
        check_writable_file(args.save_embeddings, "--save-embeddings")
    args.base = check_source(args.base, "--base", ["model_index.json"], "an SD-1.5 pipeline folder")
    check_prompt_lengths(args, prompts)
    args.arc2face = check_source(args.arc2face, "--arc2face", ["encoder/config.json"], "an Arc2Face folder")
    inverter = Path(args.inverter).expanduser()
    if not (inverter / "config.json").exists() or not (inverter / "model.safetensors").exists():
        raise OptionError(
            f"--inverter {args.inverter}: not a Prompt Inverter folder (needs config.json + model.safetensors)"
        )
    check_model_folders(args)
    for spec in args.subjects:
        if spec.images:
            option = subject_option(args, spec, "images")
            if not args.face_root:
                raise OptionError(f"--face-root is needed with {option} (the insightface root with antelopev2)")
            for image in spec.images:
                check_file(image, option)
                check_image(Path(image).expanduser(), option, image)
    if args.face_root:
        from .models.face_encoder import find_model_pack

        try:
            find_model_pack(args.face_root)
        except FileNotFoundError as e:
            raise OptionError(f"--face-root {args.face_root}: {e}") from e
    for spec in args.subjects:
        if spec.embedding:
            from .subject import EMBEDDING_SUFFIXES, load_arcface_embedding

            option = subject_option(args, spec, "embedding")
            path = check_file(spec.embedding, option, EMBEDDING_SUFFIXES)
            check_readable(path, option, spec.embedding)
            try:
                load_arcface_embedding(path)
            except ValueError as e:
                raise OptionError(f"{option} {e}") from e
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
    files = embeddings_files(args)
    if files and len({f for f, _ in files}) < len(files):
        raise OptionError(f"--save-embeddings {args.save_embeddings}: the subjects' placeholders give the same "
                          "file name twice; choose placeholders that differ in letters or digits")
    return prompts


def check_model_folders(args: argparse.Namespace) -> None:
    """Every local model's config and safetensors files are whole (headers and sizes; nothing is loaded)."""
    check_model_files(Path(args.inverter).expanduser(), "--inverter", args.inverter)
    for option, value, sub in (("--base", args.base, ""), ("--arc2face", args.arc2face, "encoder"),
                               ("--motion-adapter", args.motion_adapter, "")):
        if value and Path(value).is_dir():
            folder = Path(value) / sub
            check_model_files(folder, option, value if not sub else f"{value}/{sub}")


def motion_window(source: str) -> int:
    """The motion adapter's `motion_max_seq_length` from its config (a local file, or the hub repo's checked
    snapshot of configs)."""
    from .models._io import check_model_source, read_json

    path = Path(source) / "config.json"
    try:
        if not path.is_file():
            with loading("--motion-adapter", source):
                path = check_model_source(source)[0] / "config.json"
        config = read_json(path, what="config")
    except OSError as e:
        raise OptionError(f"--motion-adapter {source}: {e}") from e
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
    from .models._io import read_json

    settings_path = out / SETTINGS_NAME
    try:  # a regular file within the JSON limits (a FIFO or a huge file is no earlier run)
        settings = read_json(settings_path, what=SETTINGS_NAME)
    except (OSError, ValueError):
        return None
    if not isinstance(settings, dict) or settings.get("tool") != "adaface.generate":
        return None
    files = {settings_path, out / ARCFACE_NAME, out / CONTACT_SHEET_NAME, out / REPORT_NAME}
    # Names come from a file anyone can plant: only outputs' own names, or a file this run recorded byte for byte.
    for entry in settings.get("outputs") or []:
        if isinstance(entry, dict) and isinstance(entry.get("file"), str) and OUTPUT_PATTERN.match(entry["file"]):
            files.add(out / entry["file"])
    # An interrupted run wrote an output it had not listed yet: its names follow the pattern.
    files.update(f for f in out.iterdir() if OUTPUT_PATTERN.match(f.name))
    written = settings.get("written") or {}
    entries = [settings.get("subject") or {}, *[e for e in settings.get("subjects") or [] if isinstance(e, dict)]]
    for entry in entries:
        # a textual-inversion file inside --out only when this run recorded it byte for byte
        embeddings = entry.get("embeddings_file")
        if isinstance(embeddings, str) and Path(embeddings).parent == out.resolve():
            name = Path(embeddings).name
            if isinstance(written, dict) and written.get(name) is not None and written[name] == fingerprint(out / name):
                files.add(out / name)
        arcface = entry.get("arcface_file")
        if isinstance(arcface, str) and ARCFACE_PATTERN.match(arcface):
            files.add(out / arcface)
    root = out.resolve()
    return sorted(f for f in files if (f.exists() or f.is_symlink()) and f.resolve().parent == root)


def fingerprint(path: Path) -> dict | None:
    """Size and SHA-256 of a regular file (None otherwise): what --overwrite checks before deleting a named file."""
    if not path.is_file() or path.is_symlink():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


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
    from .models._io import check_model_source

    # Every config is checked (for a hub id: on its snapshot) before diffusers acts on any, and the load is
    # pinned to the files checked.
    if args.video:
        from diffusers import AnimateDiffPipeline, MotionAdapter

        with loading("--motion-adapter", args.motion_adapter):
            _, pin = check_model_source(args.motion_adapter, {"": MotionAdapter})
            adapter = MotionAdapter.from_pretrained(args.motion_adapter, torch_dtype=dtype, **pin)
        with loading("--base", args.base):
            _, pin = check_model_source(args.base, "pipeline")
            pipe = AnimateDiffPipeline.from_pretrained(args.base, motion_adapter=adapter, torch_dtype=dtype, **pin)
        if args.free_noise:
            pipe.enable_free_noise(context_length=args.context_length, context_stride=args.context_stride)
    else:
        from diffusers import StableDiffusionPipeline

        with loading("--base", args.base):
            _, pin = check_model_source(args.base, "pipeline")
            pipe = StableDiffusionPipeline.from_pretrained(args.base, torch_dtype=dtype, **pin)
    scheduler = make_scheduler(args.scheduler, pipe.scheduler.config, args.video)
    if scheduler is not None:
        pipe.scheduler = scheduler
    return pipe.to(device)


def load_subject_encoder(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    from .models._io import load_tokenizer
    from .models.arc2face import Arc2Face
    from .models.prompt_inverter import PromptInverter
    from .subject import SubjectEncoder

    with loading("--base", args.base):
        # Arc2Face ships no tokenizer: it was trained with SD-1.5's, which --base holds.
        tokenizer = load_tokenizer(args.base)
    with loading("--arc2face", args.arc2face):
        arc2face = Arc2Face.from_pretrained(args.arc2face, tokenizer=tokenizer, load_unet=False)
    with loading("--inverter", args.inverter):
        inverter = PromptInverter.from_pretrained(args.inverter)
    try:
        return SubjectEncoder(arc2face.to(device=device, dtype=dtype), inverter.to(device=device, dtype=dtype),
                              face_root=args.face_root)
    except ValueError as e:
        raise OptionError(f"--inverter {args.inverter} does not fit --arc2face {args.arc2face}: {e}") from e


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


def report_stand_ins(args: argparse.Namespace, subject: Any, placeholder: str | None = None) -> None:
    if not subject.random_stand_ins:
        return
    whose = "the whole identity is random" if subject.all_random else "averaged in with the other photos"
    of = f" (subject {placeholder})" if placeholder else ""
    print(f"--on-no-face random{of}: no face found in {', '.join(subject.random_stand_ins)}; a random identity "
          f"stands in for {'it' if len(subject.random_stand_ins) == 1 else 'them'} ({whose}; recorded in "
          f"{SETTINGS_NAME})",
          file=sys.stderr)


def free_noise_tokens(placeholders: list[str]) -> dict[str, str]:
    """Each subject's textual-inversion token inside a FreeNoise pipeline."""
    if len(placeholders) == 1:
        return {placeholders[0]: FREE_NOISE_TOKEN}
    return {p: f"{FREE_NOISE_TOKEN[:-1]}-{k}>" for k, p in enumerate(placeholders)}


def free_noise_prompt(prompt: str, placeholder: str | dict[str, str]) -> str:
    """The prompt with each subject as its textual-inversion token (FreeNoise encodes prompts itself); `placeholder`
    is the one subject's placeholder, or {placeholder: token} for several."""
    from .models.subject_prompt import placeholder_pattern

    tokens = {placeholder: FREE_NOISE_TOKEN} if isinstance(placeholder, str) else placeholder
    for word, token in tokens.items():
        prompt = placeholder_pattern(word).sub(lambda _, t=token: t, prompt)
    return prompt


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
    if any(spec.images for spec in args.subjects):
        # Arc2Face was conditioned on its own arcface.onnx: record (and check) what embeds the photos
        from .models.face_encoder import RecognizerMismatch, check_recognizer

        recognizer = subject_encoder.face_encoder.recognizer_file
        try:
            warning = check_recognizer(recognizer, strict=args.strict)
        except RecognizerMismatch as e:
            raise OptionError(f"--strict: {e}") from e
        if warning:
            print(f"WARNING: {warning}", file=sys.stderr, flush=True)
    several = len(args.subjects) > 1
    identities, subjects = [], {}
    for k, spec in enumerate(args.subjects):
        try:
            identity = subject_encoder.resolve_identity(
                images=spec.images, embedding=spec.embedding, random_id=spec.random_id, on_no_face=args.on_no_face,
                generator=torch.Generator().manual_seed(seed + k))
        except ValueError as e:  # no face in a photo, unreadable photo
            raise OptionError(f"{subject_option(args, spec, 'images')}: {e}") from e
        report_stand_ins(args, identity, spec.placeholder if several else None)
        identities.append(identity)
        subjects[spec.placeholder] = subject_encoder(identity.arcface).float()
    del subject_encoder  # the pipeline needs the memory more

    # Nothing is written before every model has loaded: a failure or Ctrl-C while loading leaves --out as it was.
    pipe = load_pipeline(args, device, dtype)
    settings = run_settings(args, prompts, seed, device, dtype, pipe, identities)
    settings["recognizer"] = recognizer

    out = Path(args.out).expanduser()
    clear_earlier_run(args.clear)
    with RunFiles(out) as written:
        # settings.json first: whatever follows, a rerun with --overwrite recognises the folder as a run.
        written.add(out / SETTINGS_NAME)
        save_strict_json(settings, out / SETTINGS_NAME)
        for k, identity in enumerate(identities):
            written.add(out / arcface_file(args, k))
            np.save(out / arcface_file(args, k), identity.arcface.cpu().numpy().astype(np.float32))
        files = embeddings_files(args) or []
        for (path, token), embeds in zip(files, subjects.values()):
            written.add(path)
            save_textual_inversion(embeds, path, token=token)
        # textual-inversion files inside --out, which --overwrite may delete: recorded byte for byte
        settings["written"] = {
            path.name: fingerprint(path) for path, _ in files if path.expanduser().resolve().parent == out.resolve()
        }
        save_strict_json(settings, out / SETTINGS_NAME)
        run_pipeline(args, prompts, pipe, subjects, settings, out, device, dtype, written)
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


def run_pipeline(args: argparse.Namespace, prompts: list[str], pipe: Any, subjects: dict[str, torch.Tensor],
                 settings: dict, out: Path, device: torch.device, dtype: torch.dtype, written: RunFiles) -> None:
    """Every output, settings.json rewritten after each, then the contact sheet."""
    from .models.subject_prompt import encode_subjects_prompt, subject_slots

    seed = settings["seed"]
    negative = None
    tokens = free_noise_tokens(list(subjects))
    if args.free_noise:
        pipe.load_textual_inversion([{tokens[p]: e.to(device, dtype)} for p, e in subjects.items()])
    elif args.guidance > 1.0:  # diffusers only uses negative embeddings under classifier-free guidance
        negative, _ = pipe.encode_prompt(args.negative_prompt, device, 1, False)
    # the regional processors are installed here and removed when the loop ends, however it ends
    regional: Any = contextlib.nullcontext()
    if args.regions:
        from .models.regional_attention import RegionalAttention

        regional = RegionalAttention(pipe.unet, args.regions)
    index = 0
    sheet: list[list[Any]] = []
    with torch.no_grad(), regional:
        for p, prompt in enumerate(prompts):
            if args.free_noise:
                text = dict(prompt=free_noise_prompt(prompt, tokens), negative_prompt=args.negative_prompt)
                _, slots = subject_slots(pipe.tokenizer, prompt, {w: e.shape[0] for w, e in subjects.items()},
                                         pipe.tokenizer.model_max_length)
            else:
                embeds, slots = encode_subjects_prompt(pipe.tokenizer, pipe.text_encoder, prompt,
                                                       {w: e.to(device) for w, e in subjects.items()})
                text = dict(prompt_embeds=embeds, negative_prompt_embeds=negative)
            if args.regions:
                configure_regions(regional, args, pipe, slots, subjects)
            sheet.append([])
            for i in range(args.num_images):
                item_seed = seed + index
                index += 1
                name = output_name(p, i)
                written.add(out / (f"{name}.gif" if args.video else f"{name}.png"))
                if args.video:
                    written.add(out / name)
                entry, picture = render_output(args, pipe, text, p, i, prompt, item_seed, out)
                sheet[-1].append(picture)
                settings["outputs"].append(entry)
                # Rewritten after every output, so an interrupted run can still be evaluated.
                save_strict_json(settings, out / SETTINGS_NAME)
                written.keep()
    contact_sheet(sheet).save(out / CONTACT_SHEET_NAME)
    settings["contact_sheet"] = CONTACT_SHEET_NAME
    save_strict_json(settings, out / SETTINGS_NAME)


def configure_regions(regional: Any, args: argparse.Namespace, pipe: Any, slots: dict[str, int],
                      subjects: dict[str, torch.Tensor]) -> None:
    """Point the regional processors at this prompt's subject slots, at the run's latent size."""
    latent = (args.height // pipe.vae_scale_factor, args.width // pipe.vae_scale_factor)
    # diffusers' pipelines stack the negative prompt first when they guide (guidance > 1)
    regional.configure(slots, {w: e.shape[0] for w, e in subjects.items()}, latent, guided=args.guidance > 1.0)


def output_name(prompt_index: int, image_index: int) -> str:
    return f"p{prompt_index:02d}_{image_index:03d}"


def render_output(args: argparse.Namespace, pipe: Any, text: dict, prompt_index: int, image_index: int,
                  prompt: str, seed: int, out: Path) -> tuple[dict, Any]:
    """One output into `out` (a PNG, or a GIF and its frames); returns its settings.json entry and the picture the
    contact sheet shows (a video's first frame). `text` is the prompt as the pipeline takes it."""
    common = dict(
        **text, num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.height,
        width=args.width, generator=torch.Generator().manual_seed(seed),
    )
    name = output_name(prompt_index, image_index)
    entry: dict[str, Any] = {"prompt_index": prompt_index, "prompt": prompt, "seed": seed}
    if args.video:
        frames = pipe(num_frames=args.num_frames, **common).frames[0]
        entry["file"] = f"{name}.gif"
        entry["frames"] = save_frames(frames, out / name, out / f"{name}.gif", args.fps)
        return entry, frames[0]
    result = pipe(**common)
    result.images[0].save(out / f"{name}.png")
    entry["file"] = f"{name}.png"
    nsfw = getattr(result, "nsfw_content_detected", None)
    entry["nsfw"] = bool(nsfw[0]) if nsfw else None
    return entry, result.images[0]


def contact_sheet(rows: list[list[Any]]) -> Any:
    """One image: a row per prompt, its outputs left to right (all outputs of a run have one size)."""
    from PIL import Image

    width, height = rows[0][0].size
    sheet = Image.new("RGB", (width * max(len(r) for r in rows), height * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            sheet.paste(image.convert("RGB"), (x * width, y * height))
    return sheet


def subject_entries(args: argparse.Namespace, seed: int, identities: list) -> list[dict]:
    """What settings.json records of each subject: placeholder, source, region, files and seeds."""
    files = embeddings_files(args) or [(None, None)] * len(args.subjects)
    entries = []
    for k, (spec, identity, (path, token)) in enumerate(zip(args.subjects, identities, files)):
        region = args.regions.get(spec.placeholder)
        entries.append({
            "placeholder": spec.placeholder, **spec.source(), "arcface_file": arcface_file(args, k),
            "region": None if region is None else [region.x0, region.y0, region.x1, region.y1],
            "embeddings_file": str(path.resolve()) if path else None, "ti_token": token,
            # the random identity's seed, or the seed of the random vectors standing in for faceless photos
            "seed": spec.random_id if spec.random_id is not None else seed + k,
            "random_stand_ins": identity.random_stand_ins, "all_random": identity.all_random,
        })
    return entries


def run_settings(args: argparse.Namespace, prompts: list[str], seed: int, device: torch.device,
                 dtype: torch.dtype, pipe: Any, identities: list) -> dict:
    import diffusers
    import transformers

    from . import __version__

    settings = {
        "tool": "adaface.generate",
        "adaface_version": __version__,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
        "options": {k: v for k, v in vars(args).items() if k not in ("clear", "free_noise", "subjects", "regions")},
        "prompts": prompts,
        "placeholder": args.subjects[0].placeholder,
        "seed": seed,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "pipeline": type(pipe).__name__,
        "scheduler": {"class": type(pipe.scheduler).__name__, "config": dict(pipe.scheduler.config)},
        # per subject; photos without a face for which a random vector stood in (--on-no-face random) are listed
        # under random_stand_ins
        "subjects": subject_entries(args, seed, identities),
        "kind": "video" if args.video else "image",
        "outputs": [],
    }
    if len(args.subjects) == 1:  # the one subject, where single-subject readers look for it
        settings["subject"] = {k: v for k, v in settings["subjects"][0].items()
                               if k not in ("placeholder", "region", "ti_token", "seed")}
    if args.video:
        settings["video"] = {"num_frames": args.num_frames, "free_noise": args.free_noise,
                             "context_length": args.context_length, "context_stride": args.context_stride}
    # Round trip through JSON once: scheduler configs hold tuples and numpy values.
    return json.loads(json.dumps(settings, default=str, allow_nan=False))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ._quiet import quiet_dependency_noise

    quiet_dependency_noise()
    with command_errors(parser, os_errors=True):
        prompts = check_args(args)
        settings = generate(args, prompts)
    n = len(settings["outputs"])
    print(f"wrote {n} {settings['kind']}{'s' if n != 1 else ''} and {SETTINGS_NAME} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

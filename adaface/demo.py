"""`python -m adaface.demo`: a Gradio page to try AdaFace: face photos (or a random ID) + prompts → images or clips.

The models are those of `python -m adaface.generate` (the same options, local folders or hub ids), loaded once
at start-up through generate's own loaders; requests wait in Gradio's queue and run one at a time. Each request
is checked by `generate.check_args` and writes a folder that `generate` would write (PNGs or GIF + frames,
`settings.json`, `subject_arcface.npy`, the subject's textual-inversion file), so `python -m adaface.evaluate`
scores it as it scores a command-line run. Each output is shown with its ArcFace similarity to the photos (to the
random identity for a random ID): the best detected face's mean cosine to the references, as the evaluation
computes it; for a clip, the mean over the frames with a face. Bad input (no face, an unreadable file, a prompt
without the placeholder) is reported in the page.

A second person is optional: photos or a random ID, their own placeholder (`y` by default) and, with the
left / right layout, each person's tokens confined to their half of the picture (`--region z=left --region y=right`
of generate). Each output then shows a score per person and which detected face (its number and box) it refers to.

`--tiny` serves tiny random models of the real classes (built once into `--tiny-dir`) for a try-out without
weights: the page works end to end, the pictures are noise.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import generate
from ._cli import OptionError, resolve_device, resolve_dtype
from ._command import command_errors, command_parser

EMBEDDINGS_NAME = "subject.safetensors"
INSTALL_HINT = 'gradio is not installed: pip install -e ".[demo]" (or pip install gradio)'
TINY_SIZE = 64  # the tiny models' native 16 px is too small to look at


class DemoError(ValueError):
    """A request the page cannot run; the message is shown to the user as it is (one line)."""


# ----------------------------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("demo", "A web page (Gradio) to generate images and AnimateDiff clips of a face subject "
                       "with AdaFace.")
    models = p.add_argument_group("models (as python -m adaface.generate)")
    models.add_argument("--base", help="SD-1.5 pipeline: a diffusers folder (model_index.json) or a hub id")
    models.add_argument("--arc2face", help="Arc2Face: the released folder (encoder/ is used) or a hub id")
    models.add_argument("--inverter", help="trained AdaFace Prompt Inverter folder (config.json + model.safetensors)")
    models.add_argument("--face-root",
                        help="insightface model root holding the antelopev2 pack: needed for photos and for the "
                        "ArcFace similarity shown with each output")
    models.add_argument("--motion-adapter", help="AnimateDiff MotionAdapter folder or hub id: enables the video tab")
    generate.add_pipeline_options(models)
    models.add_argument("--tiny", action="store_true",
                        help="serve tiny random models (built once into --tiny-dir) for a try-out; model options "
                        "given as well replace the tiny ones")
    models.add_argument("--tiny-dir", metavar="DIR",
                        help="where --tiny builds its models (default: ~/.cache/adaface/tiny-demo)")

    page = p.add_argument_group("page")
    page.add_argument("--placeholder", default="z", help="the word that stands for the subject in the prompts")
    page.add_argument("--ti-token", default="<z>", help="token of the downloadable textual-inversion file")
    page.add_argument("--max-images", type=int, default=8, help="most images (or clips) one request may ask for")
    page.add_argument("--queue-size", type=int, default=16, help="most requests waiting in the queue")
    page.add_argument("--out", metavar="DIR",
                      help="folder for the requests' outputs, one subfolder each (default: a new temporary folder)")

    server = p.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0 serves the whole network)")
    server.add_argument("--port", type=int, default=7860, help="port to listen on")
    return p


def default_tiny_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "adaface" / "tiny-demo"


def build_tiny_models(root: str | os.PathLike) -> dict[str, str]:
    """The tiny stand-ins of every model the demo uses, in the released layouts; reused when already built."""
    root = Path(root).expanduser()
    folders = {"base": root / "sd15", "arc2face": root / "arc2face", "inverter": root / "inverter",
               "motion_adapter": root / "motion", "face_root": root / "insightface"}
    done = root / "complete"
    if not done.is_file():
        import shutil

        from .models.prompt_inverter import PromptInverter
        from .testing.tiny_models import (
            save_tiny_antelopev2,
            save_tiny_arc2face,
            save_tiny_sd15,
            tiny_motion_adapter,
            tiny_text_encoder,
        )

        tmp = root / f".build-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_tiny_sd15(tmp / "sd15")
        save_tiny_arc2face(tmp / "arc2face")
        PromptInverter(tiny_text_encoder(seed=2), tokenizer=tmp / "sd15" / "tokenizer").save_pretrained(
            tmp / "inverter")
        tiny_motion_adapter().save_pretrained(str(tmp / "motion"))
        save_tiny_antelopev2(tmp / "insightface")
        for folder in folders.values():  # a folder at a time, so an interrupted build is never "complete"
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp / folder.name, folder)
        shutil.rmtree(tmp, ignore_errors=True)
        done.write_text("tiny demo models\n")
    return {k: str(v) for k, v in folders.items()}


def generate_args(args: argparse.Namespace) -> argparse.Namespace:
    """generate's options for these models, with every generate default: what its loaders and checks read."""
    argv = ["--random-id", "0", "--out", str(args.out)]
    for name in ("base", "arc2face", "inverter"):
        value = getattr(args, name)
        if not value:
            raise OptionError(f"--{name} is needed (or --tiny for tiny random models)")
        argv += [f"--{name}", value]
    for name in ("face_root", "motion_adapter"):
        if getattr(args, name):
            argv += [f"--{name.replace('_', '-')}", getattr(args, name)]
    argv += ["--scheduler", args.scheduler, "--device", args.device, "--dtype", args.dtype,
             "--placeholder", args.placeholder, "--ti-token", args.ti_token]
    if args.motion_adapter:
        argv.append("--video")
    gen = generate.build_parser().parse_args(argv)
    generate.check_args(gen)  # the same one-line errors as generate, before any model loads
    return gen


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    for name in ("max_images", "queue_size"):
        if getattr(args, name) < 1:
            raise OptionError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.port < 65536:
        raise OptionError(f"--port must be between 0 and 65535, got {args.port}")
    if args.tiny_dir and not args.tiny:
        raise OptionError("--tiny-dir is only used with --tiny")
    out = Path(args.out).expanduser() if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise OptionError(f"--out {args.out}: exists and is not a folder")
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="adaface-demo-")
    return args


# ----------------------------------------------------------------------------------------------------------------
# requests
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Request:
    """One press of a Generate button."""

    prompts: list[str]
    photos: list[str] = field(default_factory=list)
    random_id: int | None = None
    negative_prompt: str = ""
    seed: int | None = None  # None: a random one, recorded in settings.json
    steps: int = 30
    guidance: float = 7.5
    num_images: int = 1
    height: int = 512
    width: int = 512
    video: bool = False
    num_frames: int = 16
    fps: float = 8.0
    # an optional second person: photos or a random ID, their placeholder, and whether the two are placed
    # left (the first) and right (the second)
    second_photos: list[str] = field(default_factory=list)
    second_random_id: int | None = None
    second_placeholder: str = "y"
    left_right: bool = False

    @property
    def has_second(self) -> bool:
        return bool(self.second_photos) or self.second_random_id is not None


@dataclass
class Output:
    file: Path
    prompt: str
    seed: int
    scored: bool  # False: no face model to score with
    similarity: float | None  # None: no face found
    face_fraction: float | None = None  # clips: the share of frames with a face
    # two people: {placeholder: {"arcface", "face", "box"}} (images) or {"arcface", "face_fraction"} (clips)
    subjects: dict | None = None

    def caption(self) -> str:
        if self.subjects is not None and self.scored:
            return f"{self.prompt} · seed {self.seed} · " + "; ".join(
                f"{name}: {_subject_score(m)}" for name, m in self.subjects.items())
        if not self.scored:
            score = "not scored"
        elif self.similarity is None:
            score = "no face detected in this generated image"
        else:
            score = f"ArcFace {self.similarity:.3f}"
        if self.face_fraction is not None:
            score += f", face in {self.face_fraction:.0%} of frames"
        return f"{self.prompt} · seed {self.seed} · {score}"


@dataclass
class Result:
    folder: Path
    outputs: list[Output]
    embeddings_file: Path | list[Path]  # one textual-inversion file per person
    settings_file: Path
    note: str = ""


def _subject_score(match: dict) -> str:
    if match["arcface"] is None:
        return "face not found"
    if "box" in match:
        box = ",".join(f"{v:.0f}" for v in match["box"])
        return f"ArcFace {match['arcface']:.3f} (face #{match['face']} at {box})"
    return f"ArcFace {match['arcface']:.3f} (face in {match['face_fraction']:.0%} of frames)"


def parse_prompts(text: str, placeholder: str | list[str]) -> list[str]:
    """One prompt per non-empty line, each with the placeholder exactly once (with several: each at most once,
    at least one of them)."""
    from .models.subject_prompt import find_placeholders

    placeholders = [placeholder] if isinstance(placeholder, str) else list(placeholder)
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise DemoError(f"write at least one prompt, e.g. 'a photo of {' and '.join(placeholders)} in the forest'")
    for k, prompt in enumerate(prompts, 1):
        try:
            find_placeholders(prompt, placeholders)
        except ValueError as e:
            raise DemoError(f"prompt {k}: {e}") from e
    return prompts


class Studio:
    """The models, loaded once, and the function that runs a request with them."""

    def __init__(self, gen_args: argparse.Namespace, out_root: str | os.PathLike) -> None:
        self.args = gen_args
        self.out_root = Path(out_root).expanduser()
        self.placeholder = gen_args.placeholder
        self.device = resolve_device(gen_args.device)
        self.dtype = resolve_dtype(gen_args.dtype, self.device)
        self.subject_encoder = generate.load_subject_encoder(gen_args, self.device, self.dtype)
        if self.has_faces:
            self.subject_encoder.face_encoder  # noqa: B018 - loaded now, not on the first request
        self.pipe = generate.load_pipeline(self._request_args(video=False), self.device, self.dtype)
        self.video_pipe = None
        if gen_args.motion_adapter:
            # clips stay within the motion module's window (max_frames), so without FreeNoise
            self.video_pipe = generate.load_pipeline(self._request_args(video=True, free_noise=False), self.device,
                                                     self.dtype)
        self._count = 0

    # -- what the page offers ------------------------------------------------------------------------------
    @property
    def has_faces(self) -> bool:
        return self.args.face_root is not None

    @property
    def native_size(self) -> int:
        return int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    @property
    def max_frames(self) -> int | None:
        """The motion module's length: AnimateDiff clips are at most this long."""
        if self.video_pipe is None:
            return None
        return int(self.video_pipe.unet.config.motion_max_seq_length)

    # -- one request ---------------------------------------------------------------------------------------
    def _request_args(self, video: bool, **options: Any) -> argparse.Namespace:
        args = copy.copy(self.args)
        args.video = video
        if not video:
            # generate refuses video-only options without --video
            args.motion_adapter = args.context_length = args.context_stride = None
        for key, value in options.items():
            setattr(args, key, value)
        return args

    def _check(self, req: Request) -> argparse.Namespace:
        placeholders = [self.placeholder]
        if req.has_second:
            second = (req.second_placeholder or "").strip()
            if not second or any(c.isspace() or c in ",=" for c in second):
                raise DemoError(f"the second person's placeholder must be one word, got {second!r}")
            if second == self.placeholder:
                raise DemoError(f"the second person needs a placeholder other than {self.placeholder!r}")
            if req.second_photos and req.second_random_id is not None:
                raise DemoError("second person: use either photos or a random ID, not both")
            if req.second_photos and not self.has_faces:
                raise DemoError("photos need a face model: start the demo with --face-root (or use a random ID)")
            placeholders.append(second)
        elif req.left_right:
            raise DemoError("the left / right layout needs a second person (photos or a random ID)")
        prompts = parse_prompts("\n".join(req.prompts), placeholders)
        if req.photos and req.random_id is not None:
            raise DemoError("use either photos or a random ID, not both")
        if not req.photos and req.random_id is None:
            raise DemoError("upload at least one face photo, or choose a random ID")
        if req.photos and not self.has_faces:
            raise DemoError("photos need a face model: start the demo with --face-root (or use a random ID)")
        if req.video and self.video_pipe is None:
            raise DemoError("videos need an AnimateDiff motion module: start the demo with --motion-adapter")
        if req.video and not 1 <= req.num_frames <= self.max_frames:
            raise DemoError(f"frames must be between 1 and {self.max_frames} (the motion module's length), "
                            f"got {req.num_frames}")
        self._count += 1
        folder = self.out_root / f"{time.strftime('%Y%m%d-%H%M%S')}-{self._count:04d}"
        args = self._request_args(
            req.video, images=list(req.photos) or None, random_id=req.random_id, prompt=prompts,
            prompts_file=None, negative_prompt=req.negative_prompt or "", seed=req.seed, steps=int(req.steps),
            guidance=float(req.guidance), num_images=int(req.num_images), height=int(req.height),
            width=int(req.width), num_frames=int(req.num_frames), fps=float(req.fps), out=str(folder),
            save_embeddings=str(folder / EMBEDDINGS_NAME), on_no_face="error", subject=None, region=None,
            allow_overlap=False,
        )
        if req.has_second:
            from .subject import SubjectSpec

            first = SubjectSpec(self.placeholder, images=args.images, random_id=args.random_id)
            other = SubjectSpec(placeholders[1], images=list(req.second_photos) or None,
                                random_id=req.second_random_id)
            args.images = args.random_id = None
            args.subject = [first, other]
            if req.left_right:
                args.region = [f"{self.placeholder}=left", f"{placeholders[1]}=right"]
        try:
            generate.check_args(args)  # ranges, seeds, sizes and files exactly as the command line checks them
        except OptionError as e:
            raise DemoError(_short_paths(str(e), list(req.photos))) from e
        return args

    def subject(self, spec: Any, seed: int) -> tuple[Any, Any, Any]:
        """(identity [512], subject embeddings [16, H], ArcFace references [R, 512] or None) of one subject."""
        import torch

        from .subject import random_arcface

        try:
            arcface = self.subject_encoder.arcface(images=spec.images, random_id=spec.random_id,
                                                   on_no_face="error", generator=torch.Generator().manual_seed(seed))
        except (ValueError, FileNotFoundError, TypeError) as e:  # no face, unreadable or missing photo
            raise DemoError(_short_paths(str(e), spec.images or [])) from e
        refs = None
        if spec.images:
            refs = self.subject_encoder.face_encoder.embed_each(spec.images)
        elif self.has_faces:
            refs = random_arcface(spec.random_id)[None]
        return arcface, self.subject_encoder(arcface).float(), refs

    def face_previews(self, photos: list[str]) -> tuple[list[tuple[Any, str]], str]:
        """What each uploaded photo contributes: a thumbnail of the face its identity is taken from (the largest
        one, as the embedding takes it) with a caption, and one line per photo for the page."""
        from PIL import Image

        from .models.face_encoder import largest_face, load_rgb

        thumbs: list[tuple[Any, str]] = []
        lines: list[str] = []
        for i, path in enumerate(photos):
            name = Path(path).name
            try:
                rgb = load_rgb(path, i)
                faces = self.subject_encoder.face_encoder.detect(rgb)
            except (ValueError, OSError) as e:
                lines.append(f"{name}: cannot be read ({_short_paths(str(e), [path])})")
                continue
            if not faces:
                lines.append(f"{name}: no face detected in this photo; it cannot be used")
                continue
            face = largest_face(faces)
            thumbs.append((face_thumbnail(Image.fromarray(rgb), face.bbox), name))
            if len(faces) > 1:
                order = sorted(faces, key=lambda f: (float(f.bbox[0]), float(f.bbox[1])))
                k = next(j for j, f in enumerate(order) if f is face) + 1
                lines.append(f"{name}: {len(faces)} faces; the largest is used (face {k} of {len(faces)} from the "
                             "left), shown above")
            else:
                lines.append(f"{name}: one face, shown above")
        return thumbs, "\n".join(f"- {line}" for line in lines)

    def run(self, req: Request) -> Result:
        import numpy as np

        from .models._io import atomic_save_json
        from .models.regional_attention import RegionalAttention
        from .models.subject_prompt import save_textual_inversion
        from .subject import Identity

        args = self._check(req)
        seed = args.seed if args.seed is not None else random.randrange(2**31)
        identities, subjects, refs = [], {}, {}
        for k, spec in enumerate(args.subjects):
            arcface, subjects[spec.placeholder], refs[spec.placeholder] = self.subject(spec, seed + k)
            # photos without a face are refused here (on_no_face="error"), so no random vector stands in for one
            identities.append(Identity(arcface, num_photos=len(spec.images or [])))
        several = len(subjects) > 1
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        for k, identity in enumerate(identities):
            np.save(folder / generate.arcface_file(args, k), identity.arcface.cpu().numpy().astype(np.float32))
        ti_files = generate.embeddings_files(args)
        for (path, token), embeds in zip(ti_files, subjects.values()):
            save_textual_inversion(embeds, path, token=token)

        pipe = self.video_pipe if args.video else self.pipe
        settings = generate.run_settings(args, args.prompt, seed, self.device, self.dtype, pipe, identities)
        settings["tool"] = "adaface.demo"
        # which ArcFace model embedded the photos, as generate records it
        settings["recognizer"] = self.subject_encoder.face_encoder.recognizer_file \
            if any(s.images for s in args.subjects) else None
        negative = None
        if args.guidance > 1.0:  # diffusers only uses negative embeddings under classifier-free guidance
            negative, _ = pipe.encode_prompt(args.negative_prompt, self.device, 1, False)
        outputs: list[Output] = []
        scored = all(r is not None for r in refs.values())
        regional = RegionalAttention(pipe.unet, args.regions) if args.regions else None
        try:
            self._generate(args, pipe, subjects, refs if scored else None, regional, seed, negative, folder,
                           settings, outputs)
        finally:
            if regional is not None:
                regional.remove()
        atomic_save_json(settings, folder / generate.SETTINGS_NAME)
        note = "" if scored else "no ArcFace similarity: start the demo with --face-root to see it"
        files = [path for path, _ in ti_files]
        return Result(folder, outputs, files[0] if not several else files, folder / generate.SETTINGS_NAME, note)

    def _generate(self, args: argparse.Namespace, pipe: Any, subjects: dict, refs: dict | None, regional: Any,
                  seed: int, negative: Any, folder: Path, settings: dict, outputs: list) -> None:
        import torch

        from .models.subject_prompt import encode_subjects_prompt

        several = len(subjects) > 1
        index = 0
        with torch.no_grad():
            for p, prompt in enumerate(args.prompt):
                embeds, slots = encode_subjects_prompt(pipe.tokenizer, pipe.text_encoder, prompt,
                                                       {w: e.to(self.device) for w, e in subjects.items()})
                if regional is not None:
                    generate.configure_regions(regional, args, pipe, slots, subjects)
                text = dict(prompt_embeds=embeds, negative_prompt_embeds=negative)
                for i in range(args.num_images):
                    item_seed = seed + index
                    index += 1
                    entry, _ = generate.render_output(args, pipe, text, p, i, prompt, item_seed, folder)
                    if several:
                        matches = self.subject_similarity(folder, entry, refs) if refs is not None else None
                        out = Output(folder / entry["file"], prompt, item_seed, refs is not None, None,
                                     subjects=matches)
                        entry["subjects_similarity"] = matches
                    else:
                        ref = None if refs is None else next(iter(refs.values()))
                        out = Output(folder / entry["file"], prompt, item_seed, refs is not None,
                                     *self.similarity(folder, entry, ref))
                        entry["arcface_similarity"] = out.similarity
                        if args.video:
                            entry["face_fraction"] = out.face_fraction
                    settings["outputs"].append(entry)
                    outputs.append(out)

    def subject_similarity(self, folder: Path, entry: dict, refs: dict) -> dict:
        """Per subject of the output's prompt: for an image, its score and the detected face it refers to (by
        the evaluation's one-to-one matching); for a clip, the mean over frames where its face was found."""
        from .evaluate import Item, subject_scores

        files = entry.get("frames") or [entry["file"]]
        items = [Item(folder / f, entry["prompt"], entry["file"]) for f in files]
        rows = [m for m, _ in subject_scores(self.subject_encoder.face_encoder, items, refs)]
        if "frames" not in entry:
            return rows[0]
        result = {}
        for name in rows[0]:
            found = [r[name]["arcface"] for r in rows if r[name]["arcface"] is not None]
            result[name] = {"arcface": sum(found) / len(found) if found else None,
                            "face_fraction": len(found) / len(rows)}
        return result

    def similarity(self, folder: Path, entry: dict, refs: Any) -> tuple[float | None, float | None]:
        """(ArcFace similarity, share of frames with a face for clips) of one output, by the evaluation's rule."""
        from .evaluate import Item, arcface_scores

        video = "frames" in entry
        if refs is None:
            return None, None
        items = [Item(folder / f, entry["prompt"], entry["file"]) for f in entry.get("frames") or [entry["file"]]]
        scores = [s for s, _ in arcface_scores(self.subject_encoder.face_encoder, items, refs)]
        found = [s for s in scores if s is not None]
        mean = sum(found) / len(found) if found else None
        return mean, (len(found) / len(scores) if video else None)


def face_thumbnail(image: Any, bbox: Any, size: int = 128, margin: float = 0.25) -> Any:
    """The face box with a margin (clipped to the photo), scaled to fit `size`."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    box = (max(0, int(x1 - mx)), max(0, int(y1 - my)), min(image.width, int(x2 + mx) + 1),
           min(image.height, int(y2 + my) + 1))
    crop = image.crop(box)
    crop.thumbnail((size, size))
    return crop


def _short_paths(message: str, photos: list[str]) -> str:
    """Uploaded photos live in Gradio's cache under long random folders: name them by their file names."""
    for path in photos:
        message = message.replace(str(path), Path(path).name)
    return message


# ----------------------------------------------------------------------------------------------------------------
# the page
# ----------------------------------------------------------------------------------------------------------------


def _seed(value: Any) -> int | None:
    return None if value is None or int(value) < 0 else int(value)


def _files(value: Any) -> list[str]:
    if not value:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [str(getattr(v, "name", v)) for v in items]


def respond(studio: Studio, req_fields: dict) -> tuple[list, str, list[str] | None]:
    """A request from the page's fields → (gallery items, status text, downloadable files)."""
    try:
        use_random = bool(req_fields.pop("use_random"))
        random_id = req_fields.pop("random_id")
        photos = _files(req_fields.pop("photos"))
        if req_fields.pop("second", False):  # the page's optional second person
            second_random = bool(req_fields.pop("second_use_random"))
            second_id = req_fields.pop("second_random_id")
            second_photos = _files(req_fields.pop("second_photos"))
            req_fields["second_photos"] = [] if second_random else second_photos
            req_fields["second_random_id"] = int(second_id or 0) if second_random else None
            if not second_random and not second_photos:
                raise DemoError("second person: upload at least one face photo, or choose a random ID")
        else:
            for key in ("second_use_random", "second_random_id", "second_photos", "second_placeholder",
                        "left_right"):
                req_fields.pop(key, None)
        req = Request(
            prompts=(req_fields.pop("prompts") or "").splitlines(),
            photos=[] if use_random else photos,
            random_id=int(random_id or 0) if use_random else None,
            seed=_seed(req_fields.pop("seed")),
            **req_fields,
        )
        result = studio.run(req)
    except DemoError as e:
        return [], f"**Error:** {e}", None
    gallery = [(str(o.file), o.caption()) for o in result.outputs]
    lines = [f"{len(result.outputs)} {'clip' if req.video else 'image'}(s) in `{result.folder}`"]
    lines += [f"- {o.file.name}: {o.caption()}" for o in result.outputs]
    if result.note:
        lines.append(result.note)
    ti = result.embeddings_file if isinstance(result.embeddings_file, list) else [result.embeddings_file]
    return gallery, "\n".join(lines), [*map(str, ti), str(result.settings_file)]


def build_app(studio: Studio, *, max_images: int = 8, default_size: int | None = None) -> Any:
    import gradio as gr

    ph = studio.placeholder
    size = default_size or studio.native_size
    with gr.Blocks(title="AdaFace", analytics_enabled=False) as app:
        gr.Markdown(f"# AdaFace\nUpload face photos of one person (or pick a random identity), write prompts with "
                    f"**{ph}** where the person goes, and generate. Each output shows its ArcFace similarity to "
                    "the photos.")
        with gr.Row():
            with gr.Column(scale=1):
                photos = gr.File(label="Face photo(s)", file_count="multiple", file_types=["image"],
                                 elem_id="photos", interactive=studio.has_faces)
                face_gallery = gr.Gallery(label="Face used from each photo", columns=4, height=160,
                                          object_fit="contain", elem_id="faces", visible=studio.has_faces)
                faces_note = gr.Markdown(elem_id="faces-note")
                with gr.Row():
                    use_random = gr.Checkbox(label="Random ID instead of photos", value=not studio.has_faces,
                                             elem_id="use-random")
                    random_id = gr.Number(label="Random ID", value=0, precision=0, elem_id="random-id")
                prompts = gr.Textbox(label=f"Prompts, one per line ({ph} stands for the subject)",
                                     value=f"a photo of {ph}", lines=3, elem_id="prompts")
                with gr.Accordion("Second person (optional)", open=False):
                    second = gr.Checkbox(label="Add a second person", value=False, elem_id="second")
                    second_photos = gr.File(label="Their face photo(s)", file_count="multiple",
                                            file_types=["image"], elem_id="second-photos",
                                            interactive=studio.has_faces)
                    with gr.Row():
                        second_use_random = gr.Checkbox(label="Random ID instead of photos",
                                                        value=not studio.has_faces, elem_id="second-use-random")
                        second_random_id = gr.Number(label="Random ID", value=1, precision=0,
                                                     elem_id="second-random-id")
                    with gr.Row():
                        second_placeholder = gr.Textbox(label="Their placeholder", value="y",
                                                        elem_id="second-placeholder")
                        left_right = gr.Checkbox(label=f"{ph} on the left, the second person on the right",
                                                 value=True, elem_id="left-right")
                negative = gr.Textbox(label="Negative prompt", value="", elem_id="negative")
                with gr.Row():
                    seed = gr.Number(label="Seed (-1: random)", value=0, precision=0, elem_id="seed")
                    count = gr.Slider(1, max_images, value=1, step=1, label="Images per prompt", elem_id="count")
                with gr.Row():
                    steps = gr.Slider(1, 100, value=30 if size >= 256 else 4, step=1, label="Steps")
                    guidance = gr.Slider(1.0, 20.0, value=7.5, step=0.5, label="Guidance")
                with gr.Accordion("Size", open=False):
                    height = gr.Slider(64 if size >= 64 else 8, 1024, value=size, step=8, label="Height")
                    width = gr.Slider(64 if size >= 64 else 8, 1024, value=size, step=8, label="Width")
            with gr.Column(scale=1):
                with gr.Tabs():
                    with gr.Tab("Images"):
                        image_button = gr.Button("Generate images", variant="primary", elem_id="generate")
                    with gr.Tab("Video"):
                        max_frames = studio.max_frames or 16
                        frames = gr.Slider(1, max_frames, value=min(16, max_frames), step=1, label="Frames")
                        fps = gr.Slider(1, 30, value=8, step=1, label="Frames per second")
                        video_button = gr.Button("Generate video", variant="primary", elem_id="generate-video",
                                                 interactive=studio.video_pipe is not None)
                        if studio.video_pipe is None:
                            gr.Markdown("Start the demo with `--motion-adapter` to generate clips.")
                gallery = gr.Gallery(label="Outputs", columns=2, object_fit="contain", height=420,
                                     elem_id="gallery")
                status = gr.Markdown(elem_id="status")
                downloads = gr.File(label="Textual-inversion file and settings", file_count="multiple",
                                    interactive=False, elem_id="downloads")

        progress_bar = gr.Progress(track_tqdm=True)  # Gradio shows the pipelines' tqdm bars in the page
        shared = [photos, use_random, random_id, prompts, negative, seed, steps, guidance, count, height, width,
                  second, second_photos, second_use_random, second_random_id, second_placeholder, left_right]

        def fields(photos, use_random, random_id, prompts, negative, seed, steps, guidance, count, height, width,
                   second, second_photos, second_use_random, second_random_id, second_placeholder,
                   left_right) -> dict:
            return dict(photos=photos, use_random=use_random, random_id=random_id, prompts=prompts,
                        negative_prompt=negative, seed=seed, steps=steps, guidance=guidance, num_images=count,
                        height=height, width=width, second=second, second_photos=second_photos,
                        second_use_random=second_use_random, second_random_id=second_random_id,
                        second_placeholder=second_placeholder, left_right=left_right)

        # explicit parameters: Gradio places the progress tracker by its position in the signature
        def images(photos, use_random, random_id, prompts, negative, seed, steps, guidance, count, height, width,
                   second, second_photos, second_use_random, second_random_id, second_placeholder, left_right,
                   progress=progress_bar):
            return respond(studio, fields(photos, use_random, random_id, prompts, negative, seed, steps, guidance,
                                          count, height, width, second, second_photos, second_use_random,
                                          second_random_id, second_placeholder, left_right))

        def video(photos, use_random, random_id, prompts, negative, seed, steps, guidance, count, height, width,
                  second, second_photos, second_use_random, second_random_id, second_placeholder, left_right,
                  frames, fps, progress=progress_bar):
            values = fields(photos, use_random, random_id, prompts, negative, seed, steps, guidance, count, height,
                            width, second, second_photos, second_use_random, second_random_id, second_placeholder,
                            left_right)
            return respond(studio, dict(values, video=True, num_frames=frames, fps=fps))

        def show_faces(photos):
            return studio.face_previews(_files(photos)) if studio.has_faces else ([], "")

        photos.change(show_faces, photos, [face_gallery, faces_note], concurrency_id="models")
        # one concurrency group for both buttons: the models serve one request at a time
        image_button.click(images, shared, [gallery, status, downloads], concurrency_id="models")
        video_button.click(video, [*shared, frames, fps], [gallery, status, downloads], concurrency_id="models")
    return app


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ._quiet import quiet_dependency_noise

    quiet_dependency_noise()
    try:
        import gradio  # noqa: F401
    except ImportError:
        parser.exit(2, f"{parser.prog}: error: {INSTALL_HINT}\n")
    with command_errors(parser):
        check_args(args)
        if args.tiny:
            try:
                tiny = build_tiny_models(args.tiny_dir or default_tiny_dir())
            except ImportError as e:
                raise OptionError(f"--tiny needs onnx for its tiny face models ({e}): "
                                  'pip install -e ".[demo]"') from e
            for key, value in tiny.items():
                if not getattr(args, key):
                    setattr(args, key, value)
        gen_args = generate_args(args)
        studio = Studio(gen_args, args.out)
    app = build_app(studio, max_images=args.max_images, default_size=TINY_SIZE if args.tiny else None)
    app.queue(max_size=args.queue_size, default_concurrency_limit=1)
    print(f"[demo] models loaded on {studio.device}; outputs go to {args.out}", flush=True)
    app.launch(server_name=args.host, server_port=args.port, show_error=False, ssr_mode=False,
               allowed_paths=[str(Path(args.out).expanduser())])
    return 0


if __name__ == "__main__":
    sys.exit(main())

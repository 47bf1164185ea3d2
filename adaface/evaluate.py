"""`python -m adaface.evaluate`: identity and prompt fidelity of generated images (paper §3.3, Table 1).

Metrics, as the reference evaluation computes them:
- ArcFace similarity: for each generated image, every detected face's ArcFace embedding against every reference
  (the mean cosine over references), the best face kept. Images where no face is detected are not averaged in;
  they are counted (`num_no_face`, `no_face_rate`), and `arcface_no_face_as_zero` averages them in as 0.
- CLIP-T: CLIP image-text cosine between each image and its prompt with the subject placeholder replaced by a
  class word (`--class-word`, e.g. "man"), with `--clip` (a CLIPModel, ViT-B/32 in the paper). An article is put
  before the class word ("a photo of z" → "a photo of a man") unless the word before the placeholder or the class
  word itself already starts with one.
- CLIP-I (same CLIP model) and DINO (`--dino`, ViT-S/16 in the paper): mean pairwise cosine between generated
  images and the reference photos; only when reference photos are given (an embedding file has no pixels).

Inputs: a run folder written by `python -m adaface.generate` (its `settings.json` gives each file's prompt, the
placeholder and the subject's reference photos, or the saved identity for embedding / random-ID runs and for
photos in which no face was found). Any folder of images works too, with `--prompt` and `--references` /
`--embedding`.

Several subjects (a run of `generate --subject z=... --subject y=...`): each subject is scored in the images whose
prompt names it, against its own recorded identity (its reference photos, else its saved ArcFace vector). The
detected faces are matched to the image's subjects one to one, best-matching pair first (the highest mean cosine to
a subject's references); a subject left without a face is "not found" in that image. Each image records, per
subject, the score and which detected face it refers to (its index and box); the summary has a line per subject.
CLIP-T replaces every placeholder with the class word; CLIP-I and DINO are left out (one reference set per image
would mix the subjects).

Videos: every frame is scored as an image, and each clip gets identity-consistency figures (`per_video`, and
their means over clips in the summary): the mean, minimum and standard deviation of its frames' ArcFace
similarity (frames with a face), the fraction of frames with a detected face, and CLIP-I between consecutive
frames (mean and minimum of the cosine of frame t and frame t + 1).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ._cli import (
    OptionError,
    check_file,
    check_source,
    loading,
    model_type,
    resolve_device,
    save_strict_json,
)
from ._command import command_errors, command_parser
from ._file_checks import (
    check_image,
    check_model_files,
    check_readable,
    check_writable_dir,
    check_writable_file,
    read_json_file,
)

SETTINGS_NAME = "settings.json"
REPORT_NAME = "eval_report.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CONTACT_SHEET_NAME = "contact_sheet.png"  # generate's grid of a run's images: never scored itself
CLIP_TYPES = ("clip",)
DINO_TYPES = ("vit", "dinov2")
# Words after which the class word needs no article of its own ("a photo of the z", "my z").
DETERMINERS = frozenset("a an the this that these those my your his her its our their one".split())


@dataclass
class Item:
    """One scored image: a generated image or one frame of a generated video."""

    file: Path
    prompt: str
    source: str  # the output it belongs to (the GIF for a frame)
    frame: int | None = None  # the frame's index within its video; None for an image


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("evaluate", "Score generated images: ArcFace similarity to the subject, CLIP-T, and CLIP-I "
                       "/ DINO against reference photos.")
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="?",
                   help="folder of generated images (a generate --out folder)")
    p.add_argument("--face-root", required=True, help="insightface model root holding the antelopev2 pack")
    p.add_argument("--clip", required=True, help="CLIPModel folder or hub id (openai/clip-vit-base-patch32)")
    p.add_argument("--dino", help="DINO ViT folder or hub id (facebook/dino-vits16) for the DINO score")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--references", nargs="+", metavar="PHOTO",
                     help="reference photos of the subject (default: those in settings.json); RUN_DIR may follow "
                          "them (the last folder given is taken as RUN_DIR)")
    ref.add_argument("--embedding", metavar="FILE",
                     help="reference ArcFace embedding .npy/.safetensors (default: settings.json's identity)")
    p.add_argument("--prompt",
                   help="prompt of every image (overrides settings.json's); needed when RUN_DIR has no settings.json")
    p.add_argument("--placeholder", help="subject placeholder in the prompts (default: settings.json's, else z)")
    p.add_argument("--class-word", default="person",
                   help="what replaces the placeholder for CLIP-T, e.g. man, woman; an article is added where the "
                        "prompt has none ('a photo of z' -> 'a photo of a person')")
    p.add_argument("--device", default="auto", help="torch device for CLIP / DINO: auto, cpu, cuda, ...")
    p.add_argument("--batch-size", type=int, default=16, help="images per CLIP / DINO forward pass")
    p.add_argument("--out", help=f"report path (default: RUN_DIR/{REPORT_NAME})")
    return p


def class_prompt(prompt: str, placeholder: str, class_word: str) -> str:
    """The prompt with the placeholder as the class word, with an article where the prompt gives it none."""
    from .models.subject_prompt import placeholder_pattern  # encode_prompt's own whole-word rule

    def noun_phrase(match: re.Match) -> str:
        before = re.findall(r"[A-Za-z]+", prompt[:match.start()])
        first = class_word.split()[0].lower()
        if (before and before[-1].lower() in DETERMINERS) or first in DETERMINERS:
            return class_word
        return f"{'an' if first[0] in 'aeiou' else 'a'} {class_word}"

    return placeholder_pattern(placeholder).sub(noun_phrase, prompt)


def read_run(args: argparse.Namespace) -> tuple[list[Item], dict]:
    """The images to score (with their prompts) and the run's settings ({} without settings.json)."""
    if not args.run_dir or not args.run_dir.strip():
        raise OptionError("RUN_DIR: an empty path is not a run folder (name the folder)")
    run = Path(args.run_dir).expanduser()
    if run.exists() and not run.is_dir():
        raise OptionError(f"RUN_DIR {args.run_dir}: not a folder")
    check_readable(run, "RUN_DIR", args.run_dir, "folder")
    settings_path = run / SETTINGS_NAME
    if settings_path.exists():
        settings = read_json_file(settings_path, "RUN_DIR", f"{args.run_dir}: {SETTINGS_NAME}")
        if not isinstance(settings, dict):
            raise OptionError(f"RUN_DIR {args.run_dir}: {SETTINGS_NAME} is not a generate settings file "
                              "(not a JSON object)")
        try:
            outputs = settings["outputs"]
            items = []
            for out in outputs:
                prompt = args.prompt or out["prompt"]
                if out.get("frames"):
                    items += [Item(inside_run(run, name, args.run_dir), prompt, out["file"], k)
                              for k, name in enumerate(out["frames"])]
                else:
                    items.append(Item(inside_run(run, out["file"], args.run_dir), prompt, out["file"]))
        except (KeyError, TypeError, AttributeError) as e:
            raise OptionError(f"RUN_DIR {args.run_dir}: {SETTINGS_NAME} is not a generate settings file "
                              f"(no valid outputs list: {type(e).__name__} {e})") from e
    else:
        settings = {}
        if not args.prompt:
            raise OptionError(f"--prompt is needed: {run} has no {SETTINGS_NAME} to take the prompts from")
        files = sorted(f for f in run.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.name != CONTACT_SHEET_NAME)
        items = [Item(f, args.prompt, f.name) for f in files]
    missing = [str(i.file) for i in items if not i.file.is_file()]
    if missing:
        raise OptionError(f"RUN_DIR {args.run_dir}: {len(missing)} listed image(s) missing, e.g. {missing[0]}")
    if not items:
        raise OptionError(f"RUN_DIR {args.run_dir}: no images to score")
    for item in items:  # a damaged or unreadable image stops the run here, not in the middle of the scoring
        check_image(item.file, "RUN_DIR", f"{args.run_dir}: {item.file.relative_to(run)}")
    return items, settings


def inside_run(run: Path, name: object, run_dir: str) -> Path:
    """A file named in settings.json, which must lie inside the run folder (no absolute paths, no `..`)."""
    if not isinstance(name, str) or not name:
        raise OptionError(f"RUN_DIR {run_dir}: {SETTINGS_NAME} names an output {name!r}, expected a file name")
    path = run / name
    root = run.resolve()
    if Path(name).is_absolute() or not path.resolve().is_relative_to(root):
        raise OptionError(f"RUN_DIR {run_dir}: {SETTINGS_NAME} names {name!r}, outside the run folder; only files "
                          "inside it are read")
    return path


def reference_source(args: argparse.Namespace, settings: dict) -> dict:
    """{'images': [...]} or {'embedding': path}: the options first, then what the run recorded."""
    from .subject import EMBEDDING_SUFFIXES, load_arcface_embedding

    if args.references:
        for r in args.references:
            check_file(r, "--references")
            check_image(Path(r).expanduser(), "--references", r)
        return {"images": [str(Path(r).expanduser()) for r in args.references]}
    if args.embedding:
        path = check_file(args.embedding, "--embedding", EMBEDDING_SUFFIXES)
        check_readable(path, "--embedding", args.embedding)
        try:
            load_arcface_embedding(path)
        except ValueError as e:
            raise OptionError(f"--embedding {e}") from e
        return {"embedding": str(path)}
    subject = settings.get("subject")
    return recorded_reference(args, subject if isinstance(subject, dict) else {})


def recorded_reference(args: argparse.Namespace, subject: dict, name: str = "") -> dict:
    """A subject's references as the run recorded them: its photos with a face, else its identity file."""
    from .subject import load_arcface_embedding

    # Photos in which generate found no face (a random vector stood in) are no reference for the identity.
    stand_ins = set(subject.get("random_stand_ins") or [])
    images = [i for i in subject.get("images") or [] if isinstance(i, str) and i not in stand_ins]
    if images and all(Path(i).is_file() for i in images):
        for i in images:
            check_image(Path(i), "RUN_DIR", f"{args.run_dir}: {SETTINGS_NAME} reference photo {i}")
        return {"images": images}
    for key in ("embedding", "arcface_file"):
        value = subject.get(key)
        if not isinstance(value, str) or not value:
            continue
        run = Path(args.run_dir).expanduser()
        # the user's own embedding file (recorded as an absolute path) or the identity the run saved inside it
        path = Path(value) if key == "embedding" else inside_run(run, value, args.run_dir)
        if path.is_file():
            check_readable(path, "RUN_DIR", f"{args.run_dir}: {SETTINGS_NAME} {key} {value}")
            try:
                load_arcface_embedding(path)
            except ValueError as e:
                raise OptionError(f"RUN_DIR {args.run_dir}: {SETTINGS_NAME} {key}: {e}") from e
            return {"embedding": str(path)}
    if name:
        raise OptionError(f"RUN_DIR {args.run_dir}: subject {name!r} has no reference photos or identity file that "
                          "still exist")
    raise OptionError(
        "--references or --embedding is needed: the run records no reference photos or identity that still exist"
    )


def subject_references(args: argparse.Namespace, settings: dict) -> dict[str, dict] | None:
    """{placeholder: reference source} of a run with several subjects; None for a one-subject run."""
    subjects = [s for s in settings.get("subjects") or [] if isinstance(s, dict)]
    if len(subjects) < 2:
        return None
    if args.references or args.embedding:
        option = "--references" if args.references else "--embedding"
        raise OptionError(f"{option}: the run has {len(subjects)} subjects, each scored against its own recorded "
                          "identity; drop the option")
    if args.placeholder:
        raise OptionError("--placeholder: the run names its subjects' placeholders itself")
    return {s["placeholder"]: recorded_reference(args, s, s["placeholder"]) for s in subjects}


def check_args(args: argparse.Namespace) -> tuple[list[Item], dict, dict, str]:
    """Every check that needs no model: the items, settings, reference source and placeholder."""
    if args.batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not args.class_word.strip():
        raise OptionError("--class-word must not be empty")
    items, settings = read_run(args)
    several = subject_references(args, settings)
    refs = {"subjects": several} if several else reference_source(args, settings)
    placeholder = args.placeholder or settings.get("placeholder") or "z"
    from .models.face_encoder import find_model_pack

    try:
        find_model_pack(args.face_root)
    except FileNotFoundError as e:
        raise OptionError(f"--face-root {args.face_root}: {e}") from e
    args.clip = check_source(args.clip, "--clip", ["config.json"], "a CLIPModel folder")
    if Path(args.clip).is_dir():
        check_model_type(args.clip, "--clip", CLIP_TYPES, "a CLIP model (e.g. openai/clip-vit-base-patch32)")
        check_model_files(Path(args.clip), "--clip", args.clip)
    if args.dino:
        args.dino = check_source(args.dino, "--dino", ["config.json"], "a DINO ViT folder")
        if Path(args.dino).is_dir():
            check_model_type(args.dino, "--dino", DINO_TYPES, "a DINO ViT (e.g. facebook/dino-vits16)")
            check_model_files(Path(args.dino), "--dino", args.dino)
    if args.out is not None:
        check_writable_file(args.out, "--out")
        if Path(args.out).suffix != ".json":
            raise OptionError(f"--out {args.out}: the report is JSON; give a .json path")
    else:
        check_writable_dir(args.run_dir, "RUN_DIR")  # the report goes into it
    return items, settings, refs, placeholder


def check_model_type(source: str, option: str, types: tuple[str, ...], what: str) -> None:
    found = model_type(source, option)
    if found not in types:
        raise OptionError(f"{option} {source}: expected {what}, but its config.json says model_type {found!r}")


# ----------------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------------


def reference_arcface(encoder: Any, refs: dict) -> torch.Tensor:
    """The reference embeddings `[R, 512]`: one per reference photo, or the rows of the embedding file."""
    from .subject import load_arcface_embedding

    if "images" in refs:
        try:
            return encoder.embed_each(refs["images"])
        except ValueError as e:
            raise OptionError(f"--references: {e}") from e
    try:
        return load_arcface_embedding(refs["embedding"])
    except ValueError as e:
        raise OptionError(f"--embedding {e}") from e


def detect_faces(encoder: Any, item: Item) -> tuple[torch.Tensor, list[list[float]]]:
    """Every detected face of an image: unit ArcFace embeddings `[F, 512]` and boxes `[x0, y0, x1, y1]` (pixels)."""
    import numpy as np

    from .models.face_encoder import load_rgb

    if not encoder.has_detector:
        raise OptionError(f"--face-root: the pack in {encoder.pack} has no face detector (scrfd_*.onnx)")
    bgr = np.ascontiguousarray(load_rgb(item.file)[:, :, ::-1])
    faces = [f for f in encoder.app.get(bgr) if getattr(f, "embedding", None) is not None]
    if not faces:
        return torch.zeros(0, 512), []
    emb = F.normalize(torch.from_numpy(np.stack([np.asarray(f.embedding, np.float32) for f in faces])), dim=-1)
    return emb, [[round(float(v), 1) for v in f.bbox[:4]] for f in faces]


def arcface_scores(encoder: Any, items: list[Item], refs: torch.Tensor) -> list[tuple[float | None, int]]:
    """(score or None when no face, number of faces) per item; score = max over faces of mean cosine to refs."""
    refs = F.normalize(refs.float(), dim=-1)
    scores = []
    for item in items:
        emb, _ = detect_faces(encoder, item)
        scores.append(((emb @ refs.T).mean(1).max().item() if len(emb) else None, len(emb)))
    return scores


def match_subjects(emb: torch.Tensor, boxes: list, refs: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Detected faces matched to subjects one to one, the most similar pair first; per subject its score (mean
    cosine of the face to the subject's references), the face's index and box, or None for all three."""
    sims = {name: (emb @ F.normalize(r.float(), dim=-1).T).mean(1) for name, r in refs.items()}
    pairs = sorted(((sims[name][k].item(), name, k) for name in refs for k in range(len(emb))), reverse=True)
    result = {name: {"arcface": None, "face": None, "box": None} for name in refs}
    taken: set[int] = set()
    for score, name, k in pairs:
        if result[name]["face"] is None and k not in taken:
            result[name] = {"arcface": score, "face": k, "box": boxes[k]}
            taken.add(k)
    return result


def subject_scores(encoder: Any, items: list[Item], refs: dict[str, torch.Tensor]) -> list[tuple[dict, int]]:
    """Per item: ({placeholder: match} for the subjects its prompt names, number of faces)."""
    from .models.subject_prompt import placeholder_pattern

    rows = []
    for item in items:
        emb, boxes = detect_faces(encoder, item)
        present = {name: r for name, r in refs.items() if placeholder_pattern(name).search(item.prompt)}
        rows.append((match_subjects(emb, boxes, present), len(emb)))
    return rows


def _features(out: Any) -> torch.Tensor:
    # transformers 4 returns the projected features; 5 wraps them in an output object's pooler_output.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _open_rgb(files: list) -> list:
    from PIL import Image

    images = []
    for f in files:
        with Image.open(f) as im:
            images.append(im.convert("RGB"))
    return images


@torch.no_grad()
def clip_image_features(model: Any, processor: Any, files: list, device: torch.device, batch: int) -> torch.Tensor:
    rows = []
    for i in range(0, len(files), batch):
        pixels = processor(images=_open_rgb(files[i:i + batch]), return_tensors="pt")["pixel_values"]
        rows.append(_features(model.get_image_features(pixel_values=pixels.to(device, model.dtype))).float().cpu())
    return F.normalize(torch.cat(rows), dim=-1)


@torch.no_grad()
def clip_text_features(model: Any, processor: Any, texts: list[str], device: torch.device) -> torch.Tensor:
    tok = processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    out = model.get_text_features(input_ids=tok["input_ids"].to(device),
                                  attention_mask=tok["attention_mask"].to(device))
    return F.normalize(_features(out).float().cpu(), dim=-1)


@torch.no_grad()
def dino_features(model: Any, processor: Any, files: list, device: torch.device, batch: int) -> torch.Tensor:
    rows = []
    for i in range(0, len(files), batch):
        pixels = processor(images=_open_rgb(files[i:i + batch]), return_tensors="pt")["pixel_values"]
        hidden = model(pixel_values=pixels.to(device, model.dtype)).last_hidden_state
        rows.append(hidden[:, 0].float().cpu())  # the CLS token, as DINO's evaluations use it
    return F.normalize(torch.cat(rows), dim=-1)


def video_consistency(items: list[Item], arc: list[tuple[float | None, int]], img: torch.Tensor) -> list[dict]:
    """Per clip: its frames' ArcFace mean / min / std (frames with a face), face rate, consecutive-frame CLIP-I."""
    clips: dict[str, list[int]] = {}
    for k, item in enumerate(items):
        if item.frame is not None:
            clips.setdefault(item.source, []).append(k)
    rows = []
    for source, ks in clips.items():
        ks = sorted(ks, key=lambda k: items[k].frame)
        scores = torch.tensor([arc[k][0] for k in ks if arc[k][0] is not None], dtype=torch.float64)
        feats = img[ks].double()
        consecutive = (feats[:-1] * feats[1:]).sum(-1) if len(ks) > 1 else None
        has_scores = scores.numel() > 0
        rows.append({
            "output": source,
            "num_frames": len(ks),
            "face_rate": scores.numel() / len(ks),
            "arcface_mean": scores.mean().item() if has_scores else None,
            "arcface_min": scores.min().item() if has_scores else None,
            "arcface_std": scores.std(unbiased=False).item() if has_scores else None,
            "clip_i_consecutive": consecutive.mean().item() if consecutive is not None else None,
            "clip_i_consecutive_min": consecutive.min().item() if consecutive is not None else None,
        })
    return rows


VIDEO_KEYS = ("face_rate", "arcface_mean", "arcface_min", "arcface_std", "clip_i_consecutive",
              "clip_i_consecutive_min")


def video_summary(per_video: list[dict]) -> dict:
    """Each per-clip figure averaged over the clips that have it (a clip without any face has no ArcFace)."""
    summary: dict[str, Any] = {"num_videos": len(per_video)}
    for key in VIDEO_KEYS:
        values = [v[key] for v in per_video if v[key] is not None]
        summary[key] = sum(values) / len(values) if values else None
    return summary


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "std": None, "count": 0}
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": t.mean().item(), "std": t.std(unbiased=False).item(), "count": len(values)}


def evaluate(args: argparse.Namespace, items: list[Item], settings: dict, refs: dict, placeholder: str) -> dict:
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

    from . import __version__
    from .models._io import check_model_source
    from .models.face_encoder import FaceEncoder

    device = resolve_device(args.device)
    if not Path(args.clip).is_dir():  # a hub id: its configs are fetched alone and checked, before the model
        check_model_type(args.clip, "--clip", CLIP_TYPES, "a CLIP model (e.g. openai/clip-vit-base-patch32)")
    if args.dino and not Path(args.dino).is_dir():
        check_model_type(args.dino, "--dino", DINO_TYPES, "a DINO ViT (e.g. facebook/dino-vits16)")
    encoder = FaceEncoder(args.face_root)
    several = refs.get("subjects")
    per_subject = None
    if several:
        ref_arcface = {name: reference_arcface(encoder, r) for name, r in several.items()}
        per_subject = subject_scores(encoder, items, ref_arcface)
        # an image's identity score: the mean over its subjects whose faces were found
        arc = []
        for matches, num_faces in per_subject:
            found = [m["arcface"] for m in matches.values() if m["arcface"] is not None]
            arc.append((sum(found) / len(found) if found else None, num_faces))
    else:
        ref_arcface = reference_arcface(encoder, refs)
        arc = arcface_scores(encoder, items, ref_arcface)

    with loading("--clip", args.clip):  # pinned to the files checked (a hub id: its snapshot's commit)
        _, pin = check_model_source(args.clip, {"": CLIPModel})
        clip = CLIPModel.from_pretrained(args.clip, **pin).eval().to(device)
        processor = CLIPProcessor.from_pretrained(args.clip, **pin)
    files = [i.file for i in items]
    placeholders = list(several) if several else [placeholder]
    eval_prompts = []
    for item in items:
        text = item.prompt
        for word in placeholders:
            text = class_prompt(text, word, args.class_word)
        eval_prompts.append(text)
    img = clip_image_features(clip, processor, files, device, args.batch_size)
    unique = sorted(set(eval_prompts))
    txt = clip_text_features(clip, processor, unique, device)
    clip_t = [(img[k] @ txt[unique.index(p)]).item() for k, p in enumerate(eval_prompts)]
    clip_i = dino = None
    if "images" in refs:
        clip_i = (img @ clip_image_features(clip, processor, refs["images"], device, args.batch_size).T).mean(1)
        if args.dino:
            with loading("--dino", args.dino):
                _, pin = check_model_source(args.dino, {"": AutoModel})
                dmodel = AutoModel.from_pretrained(args.dino, **pin).eval().to(device)
                dproc = AutoImageProcessor.from_pretrained(args.dino, **pin)
            gen = dino_features(dmodel, dproc, files, device, args.batch_size)
            dino = (gen @ dino_features(dmodel, dproc, refs["images"], device, args.batch_size).T).mean(1)

    with_face = [s for s, _ in arc if s is not None]
    n = len(items)
    per_image = [
        {"file": str(it.file.relative_to(Path(args.run_dir).expanduser()))
         if it.file.is_relative_to(Path(args.run_dir).expanduser()) else str(it.file),
         "output": it.source, "frame": it.frame, "prompt": it.prompt, "clip_prompt": eval_prompts[k],
         "arcface": arc[k][0], "num_faces": arc[k][1], "clip_t": clip_t[k],
         "clip_i": None if clip_i is None else clip_i[k].item(), "dino": None if dino is None else dino[k].item()}
        for k, it in enumerate(items)
    ]
    if per_subject is not None:
        for row, (matches, _) in zip(per_image, per_subject):
            row["subjects"] = matches
    details = {
        "arcface": _stats(with_face),
        "clip_t": _stats(clip_t),
        "clip_i": _stats(clip_i.tolist()) if clip_i is not None else None,
        "dino": _stats(dino.tolist()) if dino is not None else None,
    }
    summary = {
        "num_images": n,
        "arcface": details["arcface"]["mean"],
        "arcface_no_face_as_zero": sum(with_face) / n,
        "num_no_face": n - len(with_face),
        "no_face_rate": (n - len(with_face)) / n,
        "clip_t": details["clip_t"]["mean"],
        "clip_i": details["clip_i"]["mean"] if clip_i is not None else None,
        "dino": details["dino"]["mean"] if dino is not None else None,
    }
    if per_subject is not None:
        summary["subjects"] = subjects_summary(per_image, list(several))
    per_video = video_consistency(items, arc, img)
    if per_video:
        summary["video"] = video_summary(per_video)
    return {
        "tool": "adaface.evaluate",
        "adaface_version": __version__,
        "run_dir": str(Path(args.run_dir).expanduser().resolve()),
        "summary": summary,
        "details": details,
        "references": {"subjects": {name: {**r, "count": int(ref_arcface[name].shape[0])}
                                    for name, r in several.items()}}
        if several else {**refs, "count": int(ref_arcface.shape[0])},
        "options": {"clip": args.clip, "dino": args.dino, "face_root": args.face_root, "class_word": args.class_word,
                    "placeholder": placeholder, "device": str(device)},
        "per_image": per_image,
        **({"per_video": per_video} if per_video else {}),
    }


def subjects_summary(per_image: list[dict], names: list[str]) -> dict[str, dict]:
    """Per subject: its mean ArcFace over the images that name it and show its face, and where it was not found."""
    summary = {}
    for name in names:
        rows = [r for r in per_image if name in r["subjects"]]
        scores = [r["subjects"][name]["arcface"] for r in rows if r["subjects"][name]["arcface"] is not None]
        summary[name] = {
            "arcface": sum(scores) / len(scores) if scores else None,
            "num_images": len(rows),
            "num_found": len(scores),
            "not_found": [r["file"] for r in rows if r["subjects"][name]["arcface"] is None],
        }
    return summary


def subject_lines(report: dict) -> list[str]:
    """A line per subject of a several-subject run: its score and the images where its face was not found."""
    lines = []
    for name, s in (report["summary"].get("subjects") or {}).items():
        score = "n/a" if s["arcface"] is None else f"{s['arcface']:.3f}"
        line = f"subject {name}: arcface {score} (its face found in {s['num_found']}/{s['num_images']} images)"
        if s["not_found"]:
            shown = ", ".join(s["not_found"][:3]) + (", ..." if len(s["not_found"]) > 3 else "")
            line += f"; face not found in {shown}"
        lines.append(line)
    return lines


def summary_line(report: dict) -> str:
    s = report["summary"]

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    faces = s["num_images"] - s["num_no_face"]
    line = (f"arcface {fmt(s['arcface'])} ({faces}/{s['num_images']} with a face) | clip-t {fmt(s['clip_t'])} | "
            f"clip-i {fmt(s['clip_i'])} | dino {fmt(s['dino'])}")
    v = s.get("video")
    if v:
        line += (f" | {v['num_videos']} video(s): frame arcface mean/min/std {fmt(v['arcface_mean'])}/"
                 f"{fmt(v['arcface_min'])}/{fmt(v['arcface_std'])}, faces in {v['face_rate']:.0%} of frames, "
                 f"consecutive clip-i {fmt(v['clip_i_consecutive'])}")
    return line


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.run_dir is None:
        # `--references a.jpg b.jpg RUN_DIR`: nargs="+" took the run folder too; a folder is no photo
        if args.references and len(args.references) > 1 and Path(args.references[-1]).expanduser().is_dir():
            args.run_dir = args.references.pop()
        else:
            parser.error("the following arguments are required: RUN_DIR")
    from ._quiet import quiet_dependency_noise

    quiet_dependency_noise()
    with command_errors(parser):
        items, settings, refs, placeholder = check_args(args)
        report = evaluate(args, items, settings, refs, placeholder)
    out = Path(args.out).expanduser() if args.out else Path(args.run_dir).expanduser() / REPORT_NAME
    with command_errors(parser, os_errors=True, where=f"--out {out}"):  # a full disk
        try:
            save_strict_json(report, out)
        except ValueError as e:  # a non-finite score: a broken model or image, not a number to report
            parser.error(f"--out {out}: {e}")
    print(summary_line(report))
    for line in subject_lines(report):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

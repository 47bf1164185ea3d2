"""`python -m adaface.evaluate`: identity and prompt fidelity of generated images (METHOD.md §5).

Metrics, as the reference evaluation computes them:
- ArcFace similarity: for each generated image, every detected face's ArcFace embedding against every reference
  (the mean cosine over references), the best face kept. Images where no face is detected are not averaged in;
  they are counted (`num_no_face`, `no_face_rate`), and `arcface_no_face_as_zero` averages them in as 0.
- CLIP-T: CLIP image-text cosine between each image and its prompt with the subject placeholder replaced by a
  class word (`--class-word`, e.g. "man"), with `--clip` (CLIP ViT-B/32 in the paper).
- CLIP-I (same CLIP model) and DINO (`--dino`, ViT-S/16 in the paper): mean pairwise cosine between generated
  images and the reference photos; only when reference photos are given (an embedding file has no pixels).

Inputs: a run folder written by `python -m adaface.generate` (its `settings.json` gives each file's prompt, the
placeholder and the subject's reference photos, or the saved identity for embedding / random-ID runs). Video
runs are scored frame by frame. Any folder of images works too, with `--prompt` and `--references`/`--embedding`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ._cli import HelpFormatter, OptionError, check_file, check_source, loading, resolve_device

SETTINGS_NAME = "settings.json"
REPORT_NAME = "eval_report.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Item:
    """One scored image: a generated image or one frame of a generated video."""

    file: Path
    prompt: str
    source: str  # the output it belongs to (the GIF for a frame)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m adaface.evaluate",
        description="Score generated images: ArcFace similarity to the subject, CLIP-T, and CLIP-I / DINO "
        "against reference photos.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="folder of generated images (a generate --out folder)")
    p.add_argument("--face-root", required=True, help="insightface model root holding the antelopev2 pack")
    p.add_argument("--clip", required=True, help="CLIPModel folder or hub id (openai/clip-vit-base-patch32)")
    p.add_argument("--dino", help="DINO ViT folder or hub id (facebook/dino-vits16) for the DINO score")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--references", nargs="+", metavar="PHOTO",
                     help="reference photos of the subject (default: those in settings.json)")
    ref.add_argument("--embedding", metavar="FILE",
                     help="reference ArcFace embedding .npy/.safetensors (default: settings.json's identity)")
    p.add_argument("--prompt",
                   help="prompt of every image (overrides settings.json's); needed when RUN_DIR has no settings.json")
    p.add_argument("--placeholder", help="subject placeholder in the prompts (default: settings.json's, else z)")
    p.add_argument("--class-word", default="person",
                   help="what replaces the placeholder for CLIP-T, e.g. man, woman, 'a person'")
    p.add_argument("--device", default="auto", help="torch device for CLIP / DINO: auto, cpu, cuda, ...")
    p.add_argument("--batch-size", type=int, default=16, help="images per CLIP / DINO forward pass")
    p.add_argument("--out", help=f"report path (default: RUN_DIR/{REPORT_NAME})")
    return p


def class_prompt(prompt: str, placeholder: str, class_word: str) -> str:
    from .models.subject_prompt import placeholder_pattern  # encode_prompt's own whole-word rule

    return placeholder_pattern(placeholder).sub(lambda _: class_word, prompt)


def read_run(args: argparse.Namespace) -> tuple[list[Item], dict]:
    """The images to score (with their prompts) and the run's settings ({} without settings.json)."""
    run = Path(args.run_dir).expanduser()
    if not run.is_dir():
        raise OptionError(f"RUN_DIR {args.run_dir}: folder not found")
    settings_path = run / SETTINGS_NAME
    if settings_path.is_file():
        try:
            settings = json.loads(settings_path.read_text())
            outputs = settings["outputs"]
        except (ValueError, KeyError) as e:
            raise OptionError(f"RUN_DIR {args.run_dir}: {SETTINGS_NAME} is not a generate settings file ({e})") from e
        items = []
        for out in outputs:
            prompt = args.prompt or out["prompt"]
            for name in out.get("frames") or [out["file"]]:
                items.append(Item(run / name, prompt, out["file"]))
    else:
        settings = {}
        if not args.prompt:
            raise OptionError(f"--prompt is needed: {run} has no {SETTINGS_NAME} to take the prompts from")
        files = sorted(f for f in run.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        items = [Item(f, args.prompt, f.name) for f in files]
    missing = [str(i.file) for i in items if not i.file.is_file()]
    if missing:
        raise OptionError(f"RUN_DIR {args.run_dir}: {len(missing)} listed image(s) missing, e.g. {missing[0]}")
    if not items:
        raise OptionError(f"RUN_DIR {args.run_dir}: no images to score")
    return items, settings


def reference_source(args: argparse.Namespace, settings: dict) -> dict:
    """{'images': [...]} or {'embedding': path}: the options first, then what the run recorded."""
    if args.references:
        return {"images": [str(check_file(r, "--references")) for r in args.references]}
    if args.embedding:
        from .subject import EMBEDDING_SUFFIXES

        return {"embedding": str(check_file(args.embedding, "--embedding", EMBEDDING_SUFFIXES))}
    subject = settings.get("subject", {})
    images = subject.get("images")
    if images and all(Path(i).is_file() for i in images):
        return {"images": images}
    for key in ("embedding", "arcface_file"):
        value = subject.get(key)
        if value:
            path = Path(args.run_dir).expanduser() / value  # an absolute value stays absolute
            if path.is_file():
                return {"embedding": str(path)}
    raise OptionError(
        "--references or --embedding is needed: the run records no reference photos or identity that still exist"
    )


def check_args(args: argparse.Namespace) -> tuple[list[Item], dict, dict, str]:
    """Every check that needs no model: the items, settings, reference source and placeholder."""
    if args.batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not args.class_word.strip():
        raise OptionError("--class-word must not be empty")
    items, settings = read_run(args)
    refs = reference_source(args, settings)
    placeholder = args.placeholder or settings.get("placeholder") or "z"
    from .models.face_encoder import find_model_pack

    try:
        find_model_pack(args.face_root)
    except FileNotFoundError as e:
        raise OptionError(f"--face-root {args.face_root}: {e}") from e
    args.clip = check_source(args.clip, "--clip", ["config.json"], "a CLIPModel folder")
    if args.dino:
        args.dino = check_source(args.dino, "--dino", ["config.json"], "a DINO ViT folder")
    if args.out and Path(args.out).suffix != ".json":
        raise OptionError(f"--out {args.out}: the report is JSON; give a .json path")
    return items, settings, refs, placeholder


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


def arcface_scores(encoder: Any, items: list[Item], refs: torch.Tensor) -> list[tuple[float | None, int]]:
    """(score or None when no face, number of faces) per item; score = max over faces of mean cosine to refs."""
    import numpy as np

    from .models.face_encoder import load_rgb

    if not encoder.has_detector:
        raise OptionError(f"--face-root: the pack in {encoder.pack} has no face detector (scrfd_*.onnx)")
    refs = F.normalize(refs.float(), dim=-1)
    scores = []
    for item in items:
        bgr = np.ascontiguousarray(load_rgb(item.file)[:, :, ::-1])
        faces = [f for f in encoder.app.get(bgr) if getattr(f, "embedding", None) is not None]
        if not faces:
            scores.append((None, 0))
            continue
        emb = F.normalize(torch.from_numpy(np.stack([np.asarray(f.embedding, np.float32) for f in faces])), dim=-1)
        scores.append(((emb @ refs.T).mean(1).max().item(), len(faces)))
    return scores


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


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "std": None, "count": 0}
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": t.mean().item(), "std": t.std(unbiased=False).item(), "count": len(values)}


def evaluate(args: argparse.Namespace, items: list[Item], settings: dict, refs: dict, placeholder: str) -> dict:
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

    from . import __version__
    from .models.face_encoder import FaceEncoder

    device = resolve_device(args.device)
    encoder = FaceEncoder(args.face_root)
    ref_arcface = reference_arcface(encoder, refs)
    arc = arcface_scores(encoder, items, ref_arcface)

    with loading("--clip", args.clip):
        clip = CLIPModel.from_pretrained(args.clip).eval().to(device)
        processor = CLIPProcessor.from_pretrained(args.clip)
    files = [i.file for i in items]
    eval_prompts = [class_prompt(i.prompt, placeholder, args.class_word) for i in items]
    img = clip_image_features(clip, processor, files, device, args.batch_size)
    unique = sorted(set(eval_prompts))
    txt = clip_text_features(clip, processor, unique, device)
    clip_t = [(img[k] @ txt[unique.index(p)]).item() for k, p in enumerate(eval_prompts)]
    clip_i = dino = None
    if "images" in refs:
        clip_i = (img @ clip_image_features(clip, processor, refs["images"], device, args.batch_size).T).mean(1)
        if args.dino:
            with loading("--dino", args.dino):
                dmodel = AutoModel.from_pretrained(args.dino).eval().to(device)
                dproc = AutoImageProcessor.from_pretrained(args.dino)
            gen = dino_features(dmodel, dproc, files, device, args.batch_size)
            dino = (gen @ dino_features(dmodel, dproc, refs["images"], device, args.batch_size).T).mean(1)

    with_face = [s for s, _ in arc if s is not None]
    n = len(items)
    per_image = [
        {"file": str(it.file.relative_to(Path(args.run_dir).expanduser()))
         if it.file.is_relative_to(Path(args.run_dir).expanduser()) else str(it.file),
         "output": it.source, "prompt": it.prompt, "clip_prompt": eval_prompts[k],
         "arcface": arc[k][0], "num_faces": arc[k][1], "clip_t": clip_t[k],
         "clip_i": None if clip_i is None else clip_i[k].item(), "dino": None if dino is None else dino[k].item()}
        for k, it in enumerate(items)
    ]
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
    return {
        "tool": "adaface.evaluate",
        "adaface_version": __version__,
        "run_dir": str(Path(args.run_dir).expanduser().resolve()),
        "summary": summary,
        "details": details,
        "references": {**refs, "count": int(ref_arcface.shape[0])},
        "options": {"clip": args.clip, "dino": args.dino, "face_root": args.face_root, "class_word": args.class_word,
                    "placeholder": placeholder, "device": str(device)},
        "per_image": per_image,
    }


def summary_line(report: dict) -> str:
    s = report["summary"]

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    faces = s["num_images"] - s["num_no_face"]
    return (f"arcface {fmt(s['arcface'])} ({faces}/{s['num_images']} with a face) | clip-t {fmt(s['clip_t'])} | "
            f"clip-i {fmt(s['clip_i'])} | dino {fmt(s['dino'])}")


def main(argv: list[str] | None = None) -> int:
    from .models._io import atomic_save_json

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        items, settings, refs, placeholder = check_args(args)
        report = evaluate(args, items, settings, refs, placeholder)
    except OptionError as e:
        parser.error(str(e))
    out = Path(args.out).expanduser() if args.out else Path(args.run_dir).expanduser() / REPORT_NAME
    atomic_save_json(report, out)
    print(summary_line(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m adaface.prepare_data IMAGES --out OUT --face-root ROOT`: photos → the folder both stages train on.

Every jpg / png / webp under IMAGES (recursively; the originals are never modified) gets one manifest line with
its status; each usable one also a face-centred crop, a face mask and an ArcFace embedding (layout:
`adaface.faces.prepared_folder`). Per image: decode (in `--workers` threads) → detect faces → pick the largest
(or skip photos with several) → embed it with the pack's recognizer → crop → mask, by the best method available
(`--masks auto`: BiSeNet face parsing when facexlib and its weights are installed, else the contour of the pack's
106 landmarks, else the detection box and 5 keypoints) → class word (`--class-words`, else the pack's gender
model). Bad inputs are reported in the manifest and the summary, and the exit status stays 0.

A rerun skips inputs already done (same path, size and mtime) and adds new or changed ones; a run killed at any
point is completed by a rerun into the same folder an uninterrupted run writes.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ._cli import OptionError, check_file
from ._command import command_errors, command_parser
from ._file_checks import (
    check_readable,
    check_readable_tree,
    check_writable_dir,
    read_json_file,
    safetensors_problem,
)
from .faces.crop import face_crop_transform
from .faces.masks import box_mask, landmark_mask
from .models.face_encoder import largest_face

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MASK_CHOICES = ("auto", "parser", "landmarks", "box")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("prepare_data", "Prepare a folder of face photos for training: crops, face masks, ArcFace "
                       "embeddings and a manifest (the --data-dir of both training stages).")
    p.add_argument("images", metavar="IMAGES", help="folder of photos (searched recursively: jpg, png, webp)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; a rerun resumes it)")
    p.add_argument("--face-root", required=True,
                   help="insightface model root holding the antelopev2 pack (the recognizer; with --detector "
                   "insightface also the detector; 2d106det.onnx / genderage.onnx are used when present)")
    p.add_argument("--size", type=int, default=512, help="side of the square training crops, in pixels")
    p.add_argument("--masks", choices=MASK_CHOICES, default="auto",
                   help="face mask method; auto: parser if available, else landmarks if the pack has "
                   "2d106det.onnx, else box")
    p.add_argument("--parser-weights", metavar="FILE",
                   help="BiSeNet weights (parsing_bisenet.pth) for --masks parser; default: facexlib's weights "
                   "folder (never downloaded)")
    p.add_argument("--detector", choices=("insightface", "dlib"), default="insightface",
                   help="face detector: the pack's SCRFD, or dlib's HOG frontal-face detector (needs dlib-bin)")
    p.add_argument("--det-thresh", type=float, default=0.5, help="SCRFD detection score threshold")
    p.add_argument("--several-faces", choices=("largest", "skip"), default="largest",
                   help="photos with several faces: use the largest by box area, or skip them")
    p.add_argument("--min-face", type=int, default=64,
                   help="smallest usable face: the shorter side of its box, in photo pixels")
    p.add_argument("--class-words", metavar="CSV",
                   help="CSV of 'path,class_word' rows (an image's relative path or a folder) for stage 2's "
                   "class prompts; default: the pack's gender model (man / woman) when it has one")
    p.add_argument("--strict", action="store_true",
                   help="refuse a recognizer other than Arc2Face's arcface.onnx (default: warn)")
    p.add_argument("--workers", type=int, default=2, help="threads decoding images in parallel")
    p.add_argument("--commit-every", type=int, default=64,
                   help="images per durable commit (a kill loses at most this many results)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the face models run (onnxruntime's CUDA provider and torch for the parser)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no model; raises OptionError naming the option."""
    from .faces.dlib_detector import dlib_available
    from .faces.parsing import facexlib_available, find_parser_weights
    from .models.face_encoder import find_model_pack

    if not args.images or not args.images.strip():
        raise OptionError("IMAGES: an empty path is not a folder of photos (name the folder)")
    images = Path(args.images).expanduser()
    if images.exists() and not images.is_dir():
        raise OptionError(f"IMAGES {args.images}: not a folder")
    check_readable_tree(images, "IMAGES", args.images)
    out = check_writable_dir(args.out, "--out")
    if out.resolve() == images.resolve() or images.resolve() in out.resolve().parents:
        raise OptionError(f"--out {args.out}: must not be inside IMAGES {args.images} (it would be read as input)")
    check_prepared_folder(out, args.out)
    unreadable = [path for _, path in scan_images(images) if not os.access(path, os.R_OK)]
    if unreadable:  # recorded as done, they would be skipped by every rerun once the permission is fixed
        more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        raise OptionError(f"IMAGES {args.images}: permission denied: this user cannot read {unreadable[0]}{more}")
    try:
        args.pack = find_model_pack(args.face_root)
    except FileNotFoundError as e:
        raise OptionError(f"--face-root {args.face_root}: {e}") from e
    if not 64 <= args.size <= 4096:
        raise OptionError(f"--size must be between 64 and 4096 pixels, got {args.size}")
    for name in ("min_face", "workers", "commit_every"):
        if getattr(args, name) < 1:
            raise OptionError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0.0 < args.det_thresh < 1.0:
        raise OptionError(f"--det-thresh must be between 0 and 1, got {args.det_thresh}")
    if args.detector == "dlib" and not dlib_available():
        raise OptionError("--detector dlib: dlib is not installed (pip install dlib-bin)")
    if args.parser_weights is not None:
        check_file(args.parser_weights, "--parser-weights", (".pth",))
        check_readable(Path(args.parser_weights).expanduser(), "--parser-weights", args.parser_weights)
    if args.masks == "parser":
        if not facexlib_available():
            raise OptionError("--masks parser: facexlib is not installed (pip install facexlib), or use --masks auto")
        if find_parser_weights(args.parser_weights) is None:
            raise OptionError("--masks parser: no BiSeNet weights (parsing_bisenet.pth) in facexlib's weights "
                              "folder; pass --parser-weights FILE, or use --masks auto")
    if args.class_words is not None:
        from .faces.class_words import ClassWords

        path = check_file(args.class_words, "--class-words", (".csv",))
        check_readable(path, "--class-words", args.class_words)
        try:
            args.class_word_table = ClassWords.from_csv(path)
        except (ValueError, UnicodeDecodeError) as e:
            raise OptionError(f"--class-words {e}") from e
    else:
        args.class_word_table = None
    if args.device == "cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise OptionError("--device cuda: onnxruntime has no CUDA provider here (install onnxruntime-gpu)")


def check_prepared_folder(out: Path, value: str) -> None:
    """A folder an earlier run wrote must be whole before this run adds to it: its settings, its embeddings and
    the shards of a killed run. Embeddings are recomputed from the photos, so the way out is to delete them."""
    from .faces.prepared_folder import EMBEDDINGS, PENDING, SETTINGS

    if not out.is_dir():
        return
    if (out / SETTINGS).exists():
        settings = read_json_file(out / SETTINGS, "--out", f"{value}: {SETTINGS}")
        if not isinstance(settings, dict):
            raise OptionError(f"--out {value}: {SETTINGS} is not a JSON object; delete it and rerun with the options "
                              "the folder was prepared with")
    shards = sorted((out / PENDING).glob("*.safetensors")) if (out / PENDING).is_dir() else []
    for path in [out / EMBEDDINGS, *shards]:
        if not path.exists():
            continue
        check_readable(path, "--out", f"{value}: {path.relative_to(out)}")
        problem = safetensors_problem(path)
        if problem:
            raise OptionError(f"--out {value}: {path.relative_to(out)} is {problem}; delete it and rerun this "
                              "command: the embeddings are recomputed from the photos (the crops and masks are kept)")


def scan_images(root: Path) -> list[tuple[str, Path]]:
    """(key, path) of every image file under `root`, keys being '/'-separated relative paths, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(IMAGE_SUFFIXES):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


@dataclass
class Decoded:
    key: str
    path: Path
    size: int
    mtime_ns: int
    rgb: np.ndarray | None = None
    status: str = "ok"
    error: str | None = None


def decode(item: tuple[str, Path]) -> Decoded:
    """Read one photo (EXIF orientation applied) as RGB; a bad file gives a status instead of an exception."""
    from PIL import ImageOps, UnidentifiedImageError

    key, path = item
    try:
        st = path.stat()
    except OSError as e:
        return Decoded(key, path, -1, -1, status="unreadable", error=f"{type(e).__name__}: {e}")
    out = Decoded(key, path, st.st_size, st.st_mtime_ns)
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read forever, a device never end
        out.status, out.error = "not_a_file", "not a regular file (a FIFO, device or socket)"
        return out
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            out.rgb = np.asarray(im.convert("RGB"))
    except (PermissionError, FileNotFoundError) as e:
        out.status, out.error = "unreadable", f"{type(e).__name__}: {e}"
    except UnidentifiedImageError:
        out.status, out.error = "not_an_image", "not a readable jpg/png/webp image"
    except Image.DecompressionBombError as e:
        out.status, out.error = "too_large", str(e).splitlines()[0]
    except (OSError, SyntaxError, ValueError) as e:
        out.status, out.error = "corrupt", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"
    return out


def ordered_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator:
    """`pool.map` in input order with at most `window` results in flight (decoded photos are large)."""
    it = iter(items)
    pending: deque = deque(pool.submit(fn, x) for _, x in zip(range(window), it))
    while pending:
        result = pending.popleft().result()
        for x in it:
            pending.append(pool.submit(fn, x))
            break
        yield result


def resolve_mask_method(args: argparse.Namespace, encoder: Any) -> str:
    from .faces.parsing import facexlib_available, find_parser_weights

    if args.masks != "auto":
        if args.masks == "landmarks" and encoder.landmark_model is None:
            raise OptionError(f"--masks landmarks: the pack in {encoder.pack} has no 2d106det.onnx")
        return args.masks
    if facexlib_available() and find_parser_weights(args.parser_weights) is not None:
        return "parser"
    if args.parser_weights is not None:
        warn(f"--parser-weights {args.parser_weights}: facexlib is not installed, so the parser cannot run; "
             "masks come from the landmarks or the box instead")
    return "landmarks" if encoder.landmark_model is not None else "box"


class Preparer:
    """One decoded photo → (manifest entry, crop, mask, embedding); the models are loaded once."""

    def __init__(self, args: argparse.Namespace, encoder: Any, detector: Any, mask_method: str) -> None:
        self.args, self.encoder, self.detector, self.mask_method = args, encoder, detector, mask_method
        self.parser = None
        if mask_method == "parser":
            from .faces.parsing import FaceParser, find_parser_weights

            self.parser = FaceParser(find_parser_weights(args.parser_weights), device=args.device)

    def __call__(self, item: Decoded) -> tuple[dict, Any, Any, np.ndarray | None]:
        entry: dict[str, Any] = {"key": item.key, "source_size": item.size, "source_mtime_ns": item.mtime_ns}
        min_face = self.args.min_face

        def reject(status: str, error: str) -> tuple[dict, None, None, None]:
            entry.update(status=status, error=error)
            return entry, None, None, None

        if item.rgb is None:
            return reject(item.status, item.error or item.status)
        h, w = item.rgb.shape[:2]
        if min(h, w) < min_face:
            return reject("too_small", f"the image is {w}x{h}, smaller than --min-face {min_face}")
        faces = self.detector.detect(item.rgb)
        if not faces:
            return reject("no_face", "no face detected")
        entry["faces"] = len(faces)
        if len(faces) > 1 and self.args.several_faces == "skip":
            return reject("several_faces", f"{len(faces)} faces detected (--several-faces skip)")
        face = largest_face(faces)
        box = [round(float(v), 2) for v in face.bbox]
        entry["box"] = box
        if min(box[2] - box[0], box[3] - box[1]) < min_face:
            return reject("too_small", f"the face box is {box[2] - box[0]:.0f}x{box[3] - box[1]:.0f}, smaller "
                          f"than --min-face {min_face}")
        embedding = self.encoder.embed_face(item.rgb, face)
        transform = face_crop_transform(face.kps, self.args.size)
        crop = transform.crop(Image.fromarray(item.rgb))
        if self.mask_method == "parser":
            mask = self.parser.mask(crop)
        elif self.mask_method == "landmarks":
            mask = landmark_mask(self.encoder.landmarks_106(item.rgb, face), transform)
        else:
            mask = box_mask(face.bbox, face.kps, transform)
        table = self.args.class_word_table
        word = table(item.key) if table is not None else None
        if word is None:
            word = self.encoder.class_word(item.rgb, face)
        entry.update(status="ok", mask_method=self.mask_method, recognizer=self.encoder.recognizer_file,
                     class_word=word)
        return entry, crop, mask, embedding


def load_models(args: argparse.Namespace) -> tuple[Any, Any]:
    """The pack's FaceEncoder (recognizer, landmarks, gender) and the detector (the pack's or dlib's)."""
    from .models.face_encoder import FaceEncoder

    providers = ("CUDAExecutionProvider", "CPUExecutionProvider") if args.device == "cuda" else (
        "CPUExecutionProvider",)
    encoder = FaceEncoder(args.pack, providers=providers, det_thresh=args.det_thresh,
                          landmarks=args.masks in ("auto", "landmarks"), genderage=True)
    if args.detector == "dlib":
        from .faces.dlib_detector import DlibFaceDetector

        return encoder, DlibFaceDetector()
    if not encoder.has_detector:
        raise OptionError(f"--face-root {args.face_root}: the pack {encoder.pack} has no face detector "
                          "(scrfd_10g_bnkps.onnx); add it or use --detector dlib")
    return encoder, encoder


def warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def prepare(args: argparse.Namespace) -> dict:
    """Run the whole preparation; returns the summary (counts per status, this run's work, throughput)."""
    from tqdm import tqdm

    from .faces.prepared_folder import PreparedFolder, SettingsMismatch
    from .models.face_encoder import RecognizerMismatch, check_recognizer

    encoder, detector = load_models(args)
    try:
        recognizer_warning = check_recognizer(encoder.recognizer_file, strict=args.strict)
    except RecognizerMismatch as e:
        raise OptionError(f"--strict: {e}") from e
    if recognizer_warning:
        warn(recognizer_warning)
    mask_method = resolve_mask_method(args, encoder)
    settings = {"size": args.size, "detector": args.detector, "mask_method": mask_method,
                "min_face": args.min_face, "several_faces": args.several_faces, "det_thresh": args.det_thresh,
                "recognizer": encoder.recognizer_file}
    try:
        folder = PreparedFolder(Path(args.out).expanduser(), settings, commit_every=args.commit_every)
    except SettingsMismatch as e:
        raise OptionError(f"--out {e}") from e
    files = scan_images(Path(args.images).expanduser())
    todo = [(key, path) for key, path in files if not folder.is_done(key, *_stat(path))]
    preparer = Preparer(args, encoder, detector, mask_method)

    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=args.workers) as pool, \
                tqdm(total=len(todo), unit="img", desc="preparing", file=sys.stderr) as bar:
            for item in ordered_map(pool, decode, todo, window=2 * args.workers):
                try:
                    entry, crop, mask, embedding = preparer(item)
                except Exception as e:  # one photo a model cannot handle must not stop the other 400,000
                    reason = str(e).splitlines()[0] if str(e) else ""
                    entry = {"key": item.key, "source_size": item.size, "source_mtime_ns": item.mtime_ns,
                             "status": "error", "error": f"{type(e).__name__}: {reason}"}
                    crop = mask = embedding = None
                if crop is not None:
                    entry["image"], entry["mask"] = folder.write_outputs(item.key, crop, mask)
                folder.record(entry, embedding)
                bar.update(1)
    except KeyboardInterrupt:
        folder.commit()  # keep what is done; a rerun continues from here
        raise
    elapsed = time.perf_counter() - start
    folder.finish(args.class_word_table)
    summary = {"inputs": len(files), "processed": len(todo), "skipped": len(files) - len(todo),
               "seconds": elapsed, "images_per_s": len(todo) / elapsed if elapsed > 0 and todo else None,
               "counts": folder.counts(), "mask_method": mask_method, "recognizer": encoder.recognizer_file,
               "recognizer_warning": recognizer_warning}
    return summary


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:  # gone or unreadable since the scan: `decode` reports it
        return -1, -1
    return st.st_size, st.st_mtime_ns


def print_summary(summary: dict, out: str) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in summary["counts"].items()) or "nothing"
    rate = f" ({summary['images_per_s']:.1f} images/s)" if summary["images_per_s"] else ""
    print(f"{out}: {summary['inputs']} inputs, {summary['processed']} processed now{rate}, "
          f"{summary['skipped']} already done; manifest: {counts}; masks: {summary['mask_method']}; "
          f"recognizer: {summary['recognizer']}")
    if summary["recognizer_warning"]:
        warn(summary["recognizer_warning"])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ._quiet import quiet_dependency_noise

    quiet_dependency_noise()
    try:
        with command_errors(parser, os_errors=True, note="(the results committed so far are kept; rerun to continue)"):
            check_args(args)
            summary = prepare(args)
    except KeyboardInterrupt:
        print(f"interrupted: the results so far are saved in {args.out}; rerun the same command to continue",
              file=sys.stderr)
        return 130
    print_summary(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

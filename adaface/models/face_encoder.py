"""Face2Vec (paper Fig. 2): face photos → one 512-d L2-normalised ArcFace embedding, through insightface.

`FaceEncoder(root)` loads an insightface model pack from a local folder only — `root` may be the pack folder
itself (holding the .onnx files), an insightface root holding `models/<name>/`, or a folder holding `<name>/`.
insightface would try to download a missing pack (which fails offline, and is never wanted silently); here a
missing pack raises FileNotFoundError naming every place looked and what to put there.

`encoder(images)`: paths, PIL images or numpy arrays (RGB, HxWx3 uint8, as PIL gives them). Each image's
largest face by box area `(x2 - x1) * (y2 - y1)` is embedded; several images give the mean, renormalised.
`encoder(crops, aligned=True)` skips detection for pre-aligned 112×112 crops (the recognition model alone);
a pack without a detector supports only that. No face raises ValueError naming the image, unless
`on_no_face="random"` (then a random unit vector from `generator` stands in, as the reference allows).

Per-face steps for data preparation: `detect` (boxes + 5 keypoints), `embed_face`, and, when the pack holds them
and they are asked for, `landmarks_106` (`2d106det.onnx`) and `class_word` (`genderage.onnx`: man / woman).

The recognizer matters: Arc2Face was conditioned on the embeddings of its own `arcface.onnx`, while a stock
antelopev2 pack recognises with `glintr100.onnx`, a different embedding space. `recognizer_file` names the file
in use and `check_recognizer` turns a mismatch into a warning (or, strict, an error).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

PathLike = str | os.PathLike
EMBED_DIM = 512
ARC2FACE_RECOGNIZER = "arcface.onnx"
LANDMARK_TASK = "landmark_2d_106"
GENDERAGE_TASK = "genderage"
PACK_HINT = (
    "put the insightface 'antelopev2' pack there (scrfd_10g_bnkps.onnx, glintr100.onnx or Arc2Face's "
    "arcface.onnx, 2d106det.onnx, 1k3d68.onnx, genderage.onnx); it cannot be downloaded automatically"
)


def find_model_pack(root: PathLike, name: str = "antelopev2") -> Path:
    """The folder holding the pack's .onnx files; FileNotFoundError listing where it looked."""
    root = Path(root).expanduser()
    looked = [root, root / "models" / name, root / name]
    for folder in looked:
        if folder.is_dir() and any(folder.glob("*.onnx")):
            return folder
    raise FileNotFoundError(
        f"no insightface model pack {name!r} found; looked for .onnx files in: {', '.join(map(str, looked))}. "
        + PACK_HINT
    )


def largest_face(faces: Sequence[Any]) -> Any:
    """The face with the largest box area (x2 - x1) * (y2 - y1)."""
    return max(faces, key=lambda f: float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])))


class RecognizerMismatch(ValueError):
    """The recognition model is not the one Arc2Face was conditioned on."""


def check_recognizer(file_name: str, *, strict: bool = False) -> str | None:
    """None when `file_name` is Arc2Face's `arcface.onnx`; else a warning, or RecognizerMismatch when strict."""
    if file_name == ARC2FACE_RECOGNIZER:
        return None
    message = (
        f"the face recognizer is {file_name}, not Arc2Face's {ARC2FACE_RECOGNIZER}: Arc2Face was conditioned on "
        f"{ARC2FACE_RECOGNIZER}'s embedding space, so {file_name} embeddings lose identity fidelity; put "
        f"{ARC2FACE_RECOGNIZER} (from the Arc2Face release) in the antelopev2 pack and delete {file_name}"
    )
    if strict:
        raise RecognizerMismatch(message)
    return message


def _describe(image: object, index: int) -> str:
    return str(image) if isinstance(image, (str, os.PathLike)) else f"image #{index} ({type(image).__name__})"


def load_rgb(image: object, index: int = 0) -> np.ndarray:
    """A path / PIL image / numpy array → RGB uint8 HxWx3, with errors naming the image."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read {path} as an image ({e.__class__.__name__}: {e})") from e
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{_describe(image, index)}: numpy images must be HxWx3 RGB, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"{_describe(image, index)}: numpy images must be uint8, got {image.dtype}")
        return image
    raise TypeError(f"images must be paths, PIL images or numpy arrays, got {type(image).__name__} at #{index}")


def _bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[:, :, ::-1])  # insightface works on OpenCV's BGR order


class FaceEncoder:
    """insightface FaceAnalysis (detector + ArcFace) from a local model pack; see the module docstring."""

    def __init__(
        self,
        root: PathLike,
        name: str = "antelopev2",
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        det_size: tuple[int, int] = (640, 640),
        det_thresh: float = 0.5,
        landmarks: bool = False,
        genderage: bool = False,
    ) -> None:
        self.pack = find_model_pack(root, name)
        from insightface.app import FaceAnalysis
        from insightface.model_zoo import model_zoo

        extra = [task for task, wanted in ((LANDMARK_TASK, landmarks), (GENDERAGE_TASK, genderage)) if wanted]
        self.app = None
        try:
            # A directory `name` makes insightface load it in place: it never reaches its download path.
            app = FaceAnalysis(
                name=str(self.pack), allowed_modules=["detection", "recognition", *extra], providers=list(providers)
            )
            app.prepare(ctx_id=-1, det_thresh=det_thresh, det_size=det_size)
            # The per-face models run only when asked (`landmarks_106`, `class_word`), not inside `app.get`.
            models = {task: app.models.pop(task) for task in extra if task in app.models}
            self.app, self.recognizer = app, app.models.get("recognition")
        except AssertionError:  # no detection model in the pack: recognition of aligned crops only
            models = {}
            for onnx_file in sorted(self.pack.glob("*.onnx")):
                model = model_zoo.get_model(str(onnx_file), providers=list(providers))
                if model is None or model.taskname not in ("recognition", *extra) or model.taskname in models:
                    continue
                model.prepare(ctx_id=-1)
                models[model.taskname] = model
            self.recognizer = models.pop("recognition", None)
        if self.recognizer is None:
            raise FileNotFoundError(f"no recognition (ArcFace) model in {self.pack}; " + PACK_HINT)
        self.landmark_model = models.get(LANDMARK_TASK)
        self.genderage_model = models.get(GENDERAGE_TASK)

    @property
    def recognizer_file(self) -> str:
        """The recognition model's file name, e.g. `arcface.onnx` (Arc2Face's) or `glintr100.onnx` (stock)."""
        return Path(self.recognizer.model_file).name

    @property
    def has_detector(self) -> bool:
        return self.app is not None

    def detect(self, rgb: np.ndarray) -> list[Any]:
        """Every face in an RGB uint8 image: insightface `Face`s with `bbox` [4], `kps` [5, 2], `det_score`; faces
        whose keypoints fall outside the image are dropped and the boxes are clipped to it (`faces_inside`)."""
        from insightface.app.common import Face

        from ..faces.boxes import faces_inside

        if self.app is None:
            raise ValueError(f"the model pack in {self.pack} has no face detector")
        bboxes, kpss = self.app.det_model.detect(_bgr(rgb), max_num=0)
        if kpss is None:
            raise ValueError(f"the face detector in {self.pack} gives no 5-point keypoints, which alignment needs")
        faces = [
            Face(bbox=bboxes[i, :4].astype(np.float32), kps=kpss[i].astype(np.float32), det_score=float(bboxes[i, 4]))
            for i in range(bboxes.shape[0])
        ]
        return faces_inside(faces, rgb.shape[1], rgb.shape[0])

    def embed_face(self, rgb: np.ndarray, face: Any) -> np.ndarray:
        """The L2-normalised 512-d embedding of one detected face (aligned by its 5 keypoints), float32."""
        feat = np.asarray(self.recognizer.get(_bgr(rgb), face), np.float32).reshape(-1)
        return feat / max(float(np.linalg.norm(feat)), 1e-12)

    def landmarks_106(self, rgb: np.ndarray, face: Any) -> np.ndarray | None:
        """The 106 2-D landmarks of one face in image pixels `[106, 2]`, or None without `2d106det.onnx`."""
        if self.landmark_model is None:
            return None
        return np.asarray(self.landmark_model.get(_bgr(rgb), face), np.float32)[:, :2]

    def class_word(self, rgb: np.ndarray, face: Any) -> str | None:
        """'man' or 'woman' from the pack's gender model, or None without `genderage.onnx`."""
        if self.genderage_model is None:
            return None
        gender, _age = self.genderage_model.get(_bgr(rgb), face)
        return "man" if int(gender) == 1 else "woman"  # insightface's convention: 1 is male

    def embed_each(
        self,
        images: object,
        *,
        aligned: bool = False,
        on_no_face: str = "error",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One L2-normalised embedding per image, `[N, 512]` float32."""
        import torch
        import torch.nn.functional as F

        if on_no_face not in ("error", "random"):
            raise ValueError(f"on_no_face must be 'error' or 'random', got {on_no_face!r}")
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("images must hold at least one image")
        rows = []
        for i, item in enumerate(items):
            bgr = _bgr(load_rgb(item, i))
            if aligned:
                size = self.recognizer.input_size
                if tuple(bgr.shape[1::-1]) != tuple(size):
                    raise ValueError(
                        f"{_describe(item, i)}: aligned crops must be {size[0]}x{size[1]}, "
                        f"got {bgr.shape[1]}x{bgr.shape[0]}"
                    )
                rows.append(torch.from_numpy(np.asarray(self.recognizer.get_feat(bgr), np.float32).reshape(-1)))
                continue
            if self.app is None:
                raise ValueError(
                    f"the model pack in {self.pack} has no face detector: pass aligned=True with 112x112 crops"
                )
            faces = [f for f in self.app.get(bgr) if getattr(f, "embedding", None) is not None]
            if not faces:
                if on_no_face == "random":
                    rows.append(torch.randn(EMBED_DIM, generator=generator))
                    continue
                raise ValueError(f"no face found in {_describe(item, i)}")
            rows.append(torch.from_numpy(np.asarray(largest_face(faces).embedding, np.float32).reshape(-1)))
        return F.normalize(torch.stack(rows).float(), dim=-1)

    def __call__(self, images: object, **kwargs: Any) -> torch.Tensor:
        """The identity of all `images`: the mean of their embeddings, renormalised, `[512]`."""
        import torch.nn.functional as F

        return F.normalize(self.embed_each(images, **kwargs).mean(0), dim=-1)

"""Face-parsing masks with BiSeNet (the paper's mask source, §3.1) through `facexlib`, from local weights only.

facexlib's own `init_parsing_model` downloads its weights when they are missing; here they are looked up and
loaded directly (`torch.load(..., weights_only=True)`, never arbitrary unpickling), so nothing is downloaded.
`find_parser_weights` says where they were found, or None: then the parser is unavailable and `--masks auto`
falls through to the landmark mask.

BiSeNet labels the 19 CelebAMask-HQ classes of a 512×512 face crop; the mask keeps the face and its hair (skin,
brows, eyes, glasses, ears, earrings, nose, mouth, lips, hair) and drops background, neck, clothes and hats. Hair
is in because the face-preserving loss (paper §2.4, eq. 8) must protect it: the paper's motivating failure is a
composition's hat overwriting the subject's hair (Fig. 6). A hat in a training photo is not the subject's.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
from PIL import Image

WEIGHTS_NAME = "parsing_bisenet.pth"
PARSE_SIZE = 512
# skin, l/r brow, l/r eye, glasses, l/r ear, earring, nose, mouth, u/l lip (1-13); hair (17)
FACE_LABELS = (*range(1, 14), 17)


def facexlib_available() -> bool:
    return importlib.util.find_spec("facexlib") is not None


def find_parser_weights(explicit: str | os.PathLike | None = None) -> Path | None:
    """`explicit` when given (it must exist), else facexlib's own weights folder when it holds the file."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        return path if path.is_file() else None
    spec = importlib.util.find_spec("facexlib")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "weights" / WEIGHTS_NAME  # where facexlib would have saved a download
    return path if path.is_file() else None


class FaceParser:
    """BiSeNet (facexlib's class) on CPU or CUDA; `mask(crop)` → an "L" mask of the crop's size."""

    def __init__(self, weights: str | os.PathLike, device: str = "cpu") -> None:
        import torch
        from facexlib.parsing.bisenet import BiSeNet

        self.torch = torch
        self.device = torch.device(device)
        self.model = BiSeNet(num_class=19)
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
        self.model.load_state_dict(state, strict=True)
        self.model.eval().to(self.device)

    def mask(self, crop: Image.Image) -> Image.Image:
        torch = self.torch
        size = crop.size
        rgb = np.asarray(crop.convert("RGB").resize((PARSE_SIZE, PARSE_SIZE), Image.Resampling.BILINEAR))
        x = torch.from_numpy(rgb.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None].to(self.device)
        with torch.no_grad():
            logits = self.model(x)[0]  # BiSeNet returns (out, out16, out32); `out` is at the input size
        labels = logits.argmax(1)[0].cpu().numpy()
        return Image.fromarray(mask_from_labels(labels), "L").resize(size, Image.Resampling.BILINEAR)


def mask_from_labels(labels: np.ndarray) -> np.ndarray:
    """[H, W] CelebAMask-HQ labels → uint8 mask, 255 on FACE_LABELS (the face and its hair)."""
    return np.isin(labels, FACE_LABELS).astype(np.uint8) * 255

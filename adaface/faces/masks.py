"""Face masks of a training crop from geometry: the landmarks' contour, or the detection box and 5 keypoints.

Both are drawn in crop pixels (see `adaface.faces.crop.CropTransform`) as 8-bit "L" images, 255 on the face,
with a soft edge of `feather` pixels (the elastic face-preserving loss weighs its positions by the mask, paper
§2.4, eq. 8). The parser mask (BiSeNet, `adaface.faces.parsing`) is the most precise and is preferred when
available; these two stand in without it:
- `landmark_mask`: the convex hull of the 106 landmarks (jaw line, brows, eyes, nose, mouth) and a cap above them;
- `box_mask`: the ellipse inscribed in the detection box, joined with the hull of the 5 keypoints, and a cap.

Landmarks stop at the brows and a detection box near the hairline, but the mask must hold the forehead and the
hair too (the face-preserving loss protects what the mask covers, and the paper's motivating failure is a
composition's hat overwriting the hair, §2.4, Fig. 6). So both add a half-ellipse "cap" above the face, as wide
as it and `HAIR_CAP` of its height tall. The training crop is upright (eyes level), so up is -y in crop pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .crop import CropTransform

MASK_METHODS = ("parser", "landmarks", "box")
# cap height as a fraction of the face's height: landmarks span brows to chin, a detection box about the
# hairline to the chin, and the top of the head sits about 0.6 / 0.35 of that above them
HAIR_CAP = {"landmarks": 0.6, "box": 0.35}


def _convex_hull(points: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.convexHull(np.asarray(points, np.float32).reshape(-1, 1, 2)).reshape(-1, 2)


def _soften(mask: Image.Image, feather: float) -> Image.Image:
    return mask.filter(ImageFilter.GaussianBlur(feather)) if feather > 0 else mask


def _polygon(draw: ImageDraw.ImageDraw, points: np.ndarray) -> None:
    hull = _convex_hull(points)
    if len(hull) >= 3:
        draw.polygon([(float(x), float(y)) for x, y in hull], fill=255)


def hair_cap(points: np.ndarray, fraction: float, num: int = 48) -> np.ndarray:
    """`[num, 2]` crop pixels: the upper half-ellipse on top of `points` (crop pixels), as wide as they are and
    `fraction` of their height tall."""
    (x0, y0), (x1, y1) = points.min(0), points.max(0)
    angles = np.linspace(np.pi, 2 * np.pi, num)
    return np.stack([(x0 + x1) / 2 + (x1 - x0) / 2 * np.cos(angles), y0 + fraction * (y1 - y0) * np.sin(angles)],
                    axis=1)


def landmark_mask(landmarks: np.ndarray, transform: CropTransform, feather: float = 2.0) -> Image.Image:
    """The convex hull of the landmarks (photo pixels, `[N, 2]`) and the hair cap above them, in the crop."""
    mask = Image.new("L", (transform.size, transform.size), 0)
    points = transform.to_crop(landmarks)
    _polygon(ImageDraw.Draw(mask), np.concatenate([points, hair_cap(points, HAIR_CAP["landmarks"])]))
    return _soften(mask, feather)


def box_mask(box: np.ndarray, kps: np.ndarray, transform: CropTransform, feather: float = 2.0) -> Image.Image:
    """The ellipse inscribed in the detection box [x1, y1, x2, y2] with the hair cap, plus the hull of the 5
    keypoints, in the crop.

    The ellipse is traced in photo pixels and mapped into the crop, so it stays inscribed in the box however the
    crop is rotated.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    angles = np.linspace(0.0, 2 * np.pi, 96, endpoint=False)
    ellipse = np.stack([(x1 + x2) / 2 + (x2 - x1) / 2 * np.cos(angles),
                        (y1 + y2) / 2 + (y2 - y1) / 2 * np.sin(angles)], axis=1)
    mask = Image.new("L", (transform.size, transform.size), 0)
    draw = ImageDraw.Draw(mask)
    face = transform.to_crop(ellipse)
    _polygon(draw, np.concatenate([face, hair_cap(face, HAIR_CAP["box"])]))
    _polygon(draw, transform.to_crop(kps))
    return _soften(mask, feather)

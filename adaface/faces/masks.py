"""Face masks of a training crop from geometry: the landmarks' contour, or the detection box and 5 keypoints.

Both are drawn in crop pixels (see `adaface.faces.crop.CropTransform`) as 8-bit "L" images, 255 on the face,
with a soft edge of `feather` pixels (the elastic face-preserving loss weighs its positions by the mask, paper
§2.4, eq. 8). The parser mask (BiSeNet, `adaface.faces.parsing`) is the most precise and is preferred when
available; these two stand in without it:
- `landmark_mask`: the convex hull of the 106 landmarks (jaw line, brows, eyes, nose, mouth);
- `box_mask`: the ellipse inscribed in the detection box, joined with the hull of the 5 keypoints.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .crop import CropTransform

MASK_METHODS = ("parser", "landmarks", "box")


def _convex_hull(points: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.convexHull(np.asarray(points, np.float32).reshape(-1, 1, 2)).reshape(-1, 2)


def _soften(mask: Image.Image, feather: float) -> Image.Image:
    return mask.filter(ImageFilter.GaussianBlur(feather)) if feather > 0 else mask


def _polygon(draw: ImageDraw.ImageDraw, points: np.ndarray) -> None:
    hull = _convex_hull(points)
    if len(hull) >= 3:
        draw.polygon([(float(x), float(y)) for x, y in hull], fill=255)


def landmark_mask(landmarks: np.ndarray, transform: CropTransform, feather: float = 2.0) -> Image.Image:
    """The convex hull of the landmarks (photo pixels, `[N, 2]`) in the crop."""
    mask = Image.new("L", (transform.size, transform.size), 0)
    _polygon(ImageDraw.Draw(mask), transform.to_crop(landmarks))
    return _soften(mask, feather)


def box_mask(box: np.ndarray, kps: np.ndarray, transform: CropTransform, feather: float = 2.0) -> Image.Image:
    """The ellipse inscribed in the detection box [x1, y1, x2, y2] plus the hull of the 5 keypoints, in the crop.

    The ellipse is traced in photo pixels and mapped into the crop, so it stays inscribed in the box however the
    crop is rotated.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    angles = np.linspace(0.0, 2 * np.pi, 96, endpoint=False)
    ellipse = np.stack([(x1 + x2) / 2 + (x2 - x1) / 2 * np.cos(angles),
                        (y1 + y2) / 2 + (y2 - y1) / 2 * np.sin(angles)], axis=1)
    mask = Image.new("L", (transform.size, transform.size), 0)
    draw = ImageDraw.Draw(mask)
    _polygon(draw, transform.to_crop(ellipse))
    _polygon(draw, transform.to_crop(kps))
    return _soften(mask, feather)

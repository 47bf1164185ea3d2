"""Detected faces kept to the photo: detectors return boxes that reach past the image edges (negative or
too-large coordinates, e.g. a face cut by the frame), and a random test detector can put a face anywhere.

A face is kept when its five keypoints (eyes, nose, mouth corners) lie inside the image, because alignment and
recognition need them; its box is then clipped to the image. Other faces are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def clip_box(bbox: np.ndarray, width: int, height: int) -> np.ndarray:
    """[x1, y1, x2, y2] clipped to the image [0, width] × [0, height] (float32)."""
    b = np.asarray(bbox, np.float32).copy()
    b[[0, 2]] = np.clip(b[[0, 2]], 0, width)
    b[[1, 3]] = np.clip(b[[1, 3]], 0, height)
    return b


def keypoints_inside(kps: np.ndarray, width: int, height: int) -> bool:
    k = np.asarray(kps, np.float64).reshape(-1, 2)
    return bool(np.isfinite(k).all() and (k[:, 0] >= 0).all() and (k[:, 0] <= width).all()
                and (k[:, 1] >= 0).all() and (k[:, 1] <= height).all())


def faces_inside(faces: Sequence[Any], width: int, height: int) -> list[Any]:
    """The faces whose keypoints lie in the image, each with its box clipped to the image (in place); a face
    whose clipped box has no area is dropped too."""
    kept = []
    for face in faces:
        if not keypoints_inside(face.kps, width, height):
            continue
        face.bbox = clip_box(face.bbox, width, height)
        if face.bbox[2] > face.bbox[0] and face.bbox[3] > face.bbox[1]:
            kept.append(face)
    return kept

"""The face-centred training crop: an upright square around a face, from its 5 keypoints, as FFHQ is aligned.

The square follows the FFHQ alignment rule (eyes, mouth → centre, scale and roll): its half-side is the larger
of 2 × the eye distance and 1.8 × the eye-to-mouth distance, its centre sits 0.1 of the way from the eyes'
midpoint towards the mouth's, and it is rotated so the eyes are level. Pixels outside the photo are black.

`CropTransform` maps between photo pixels and crop pixels, so boxes, keypoints and landmarks found in the photo
can be drawn into the crop (masks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class CropTransform:
    """`photo = A @ crop + t` for pixel coordinates (x, y); `size` is the crop's side in pixels."""

    A: np.ndarray  # [2, 2]
    t: np.ndarray  # [2]
    size: int

    def to_crop(self, points: np.ndarray) -> np.ndarray:
        """Photo pixel coordinates `[N, 2]` → crop pixel coordinates `[N, 2]`."""
        pts = np.asarray(points, np.float64).reshape(-1, 2)
        return np.linalg.solve(self.A, (pts - self.t).T).T

    def crop(self, image: Image.Image) -> Image.Image:
        """The `size`×`size` crop of an RGB photo (bicubic; black outside the photo)."""
        # PIL's affine transform takes the output → input map, row-major (a, b, c, d, e, f).
        data = (self.A[0, 0], self.A[0, 1], self.t[0], self.A[1, 0], self.A[1, 1], self.t[1])
        return image.transform((self.size, self.size), Image.Transform.AFFINE, data,
                               resample=Image.Resampling.BICUBIC, fillcolor=(0, 0, 0))


def face_crop_transform(kps: np.ndarray, size: int) -> CropTransform:
    """The crop of side `size` for a face with 5 keypoints (left eye, right eye, nose, left/right mouth corner)."""
    kps = np.asarray(kps, np.float64).reshape(5, 2)
    eye_avg = (kps[0] + kps[1]) / 2
    mouth_avg = (kps[3] + kps[4]) / 2
    eye_to_eye = kps[1] - kps[0]
    eye_to_mouth = mouth_avg - eye_avg
    # x: the crop's horizontal half-axis, tilted with the eyes, in photo pixels.
    x = eye_to_eye - np.array([-eye_to_mouth[1], eye_to_mouth[0]])
    x /= max(float(np.hypot(*x)), 1e-6)
    x *= max(float(np.hypot(*eye_to_eye)) * 2.0, float(np.hypot(*eye_to_mouth)) * 1.8, 1.0)
    y = np.array([-x[1], x[0]])
    centre = eye_avg + eye_to_mouth * 0.1
    top_left = centre - x - y
    A = np.stack([2 * x / size, 2 * y / size], axis=1)
    return CropTransform(A=A, t=top_left, size=size)

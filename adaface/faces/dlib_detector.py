"""dlib's HOG frontal-face detector as an alternative to the pack's SCRFD (`--detector dlib`).

Its trained model is compiled into dlib itself (no weights file), so it works wherever the `dlib-bin` wheel is
installed. It finds frontal faces only and gives boxes without keypoints: the 5 keypoints that alignment needs
are placed at fixed positions of its box (eyes at 36% of the box height, nose at 60%, mouth corners at 80%,
where the eyes, nose and mouth of a frontal face fall in dlib's boxes), so crops and embeddings are rougher than
SCRFD's. The recognizer and the other per-face models still come from the antelopev2 pack.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .boxes import faces_inside

# (x, y) of left eye, right eye, nose, left and right mouth corner, as fractions of the box.
BOX_KEYPOINTS = np.array([[0.30, 0.36], [0.70, 0.36], [0.50, 0.60], [0.34, 0.80], [0.66, 0.80]], np.float32)


def dlib_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("dlib") is not None


class DlibFaceDetector:
    """`detect(rgb)` → insightface `Face`s (bbox, kps, det_score) like `FaceEncoder.detect`."""

    def __init__(self, upsample: int = 1, threshold: float = 0.0) -> None:
        import dlib

        self.detector = dlib.get_frontal_face_detector()
        self.upsample = upsample
        self.threshold = threshold

    def detect(self, rgb: np.ndarray) -> list[Any]:
        from insightface.app.common import Face

        rects, scores, _ = self.detector.run(np.ascontiguousarray(rgb), self.upsample, self.threshold)
        faces = []
        for rect, score in zip(rects, scores):
            x1, y1, x2, y2 = rect.left(), rect.top(), rect.right(), rect.bottom()
            bbox = np.array([x1, y1, x2, y2], np.float32)
            kps = np.array([x1, y1], np.float32) + BOX_KEYPOINTS * np.array([x2 - x1, y2 - y1], np.float32)
            faces.append(Face(bbox=bbox, kps=kps, det_score=float(score)))
        return faces_inside(faces, rgb.shape[1], rgb.shape[0])

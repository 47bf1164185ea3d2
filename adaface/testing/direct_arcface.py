"""ArcFace vectors of the faces in a photo computed without adaface's FaceEncoder or insightface's FaceAnalysis,
as an independent check of both: insightface's SCRFD detector, its 5-point alignment to a 112x112 crop, then the
pack's recognition ONNX model run by onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def direct_arcface_faces(pack: Path, rgb: np.ndarray) -> list[tuple[float, np.ndarray]]:
    """(box area in pixels, unit ArcFace vector) per face SCRFD detects in the RGB image `rgb`, in its order;
    `pack` is an antelopev2 folder (scrfd_10g_bnkps.onnx, glintr100.onnx)."""
    import onnxruntime as ort
    from insightface.model_zoo.scrfd import SCRFD
    from insightface.utils import face_align

    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    detector = SCRFD(str(pack / "scrfd_10g_bnkps.onnx"))
    detector.prepare(-1, input_size=(640, 640), det_thresh=0.5)
    boxes, kpss = detector.detect(bgr, max_num=0, metric="default")
    session = ort.InferenceSession(str(pack / "glintr100.onnx"), providers=["CPUExecutionProvider"])
    faces = []
    for box, kps in zip(boxes, kpss):
        crop = face_align.norm_crop(bgr, landmark=kps, image_size=112)[:, :, ::-1]  # aligned, back to RGB
        blob = ((crop.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
        feat = session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(blob)})[0][0]
        faces.append((float((box[2] - box[0]) * (box[3] - box[1])), feat / np.linalg.norm(feat)))
    return faces

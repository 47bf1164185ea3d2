"""`python -m adaface.prepare_data --detector dlib` on the real photos insightface ships (`insightface/data/images`).

dlib's HOG frontal-face detector is a real trained detector compiled into the `dlib-bin` wheel, so these tests
find real faces in real photos: the group photo `t1.jpg` (six people), the portrait `Tom_Hanks_54745.png` and
`mask_blue.jpg` (a surgical mask's texture: no face). The recognizer and gender
model are the tiny random ones (their outputs are not judged here); boxes, crops and masks are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaface import prepare_data
from adaface.faces.crop import face_crop_transform
from adaface.faces.dlib_detector import DlibFaceDetector
from adaface.faces.masks import HAIR_CAP
from adaface.testing.tiny_face_models import save_tiny_antelopev2_full

PHOTOS = ("t1.jpg", "Tom_Hanks_54745.png", "mask_blue.jpg")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    import insightface

    src = Path(insightface.__file__).parent / "data" / "images"
    folder = tmp_path_factory.mktemp("real") / "photos"
    folder.mkdir()
    for name in PHOTOS:
        shutil.copy(src / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    save_tiny_antelopev2_full(root, with_detector=False, landmarks=False)  # recognizer + gender model only
    return root


def test_dlib_finds_the_faces_of_the_real_photos(photos):
    detector = DlibFaceDetector()
    counts = {}
    for name in PHOTOS:
        rgb = np.asarray(Image.open(photos / name).convert("RGB"))
        faces = detector.detect(rgb)
        counts[name] = len(faces)
        for face in faces:
            x1, y1, x2, y2 = face.bbox
            assert 0 <= x1 < x2 <= rgb.shape[1] and 0 <= y1 < y2 <= rgb.shape[0]  # clipped to the photo
            # the keypoints lie inside the box: eyes above the nose above the mouth
            assert (face.kps[:, 0] > x1).all() and (face.kps[:, 0] < x2).all()
            assert face.kps[0, 1] < face.kps[2, 1] < face.kps[3, 1]
    assert counts == {"t1.jpg": 6, "Tom_Hanks_54745.png": 1, "mask_blue.jpg": 0}


def test_prepare_real_photos_largest_face_and_masks_inside_the_box(photos, pack, tmp_path):
    out = tmp_path / "out"
    argv = [str(photos), "--out", str(out), "--face-root", str(pack), "--detector", "dlib", "--min-face", "40"]
    assert prepare_data.main(argv) == 0
    entries = {e["key"]: e for e in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert {k: e["status"] for k, e in entries.items()} == {
        "t1.jpg": "ok", "Tom_Hanks_54745.png": "ok", "mask_blue.jpg": "no_face"}
    group = entries["t1.jpg"]
    assert group["faces"] == 6
    for name in ("t1.jpg", "Tom_Hanks_54745.png"):
        entry = entries[name]
        rgb = np.asarray(Image.open(photos / name).convert("RGB"))
        face = max(DlibFaceDetector().detect(rgb), key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
        np.testing.assert_allclose(entry["box"], face.bbox, atol=0.01)  # the largest face's box, in the photo
        assert entry["mask_method"] == "box" and entry["class_word"] in ("man", "woman")
        x1, y1, x2, y2 = entry["box"]
        transform = face_crop_transform(face.kps, 512)
        corners = transform.to_crop(np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]]))
        (bx1, by1), (bx2, by2) = corners.min(0), corners.max(0)
        mask = np.asarray(Image.open(out / entry["mask"]))
        ys, xs = np.nonzero(mask > 127)
        assert xs.min() >= bx1 - 2 and xs.max() <= bx2 + 2 and ys.max() <= by2 + 2
        # above the box only the hair cap (HAIR_CAP['box'] of the face's height)
        assert by1 - HAIR_CAP["box"] * (by2 - by1) - 2 <= ys.min() < by1 - 2
        assert mask[int((by1 + by2) / 2), int((bx1 + bx2) / 2)] == 255
        # the face is centred in the crop and fills a sensible part of it (FFHQ-like framing)
        assert abs((bx1 + bx2) / 2 - 256) < 40 and 120 < bx2 - bx1 < 400
        crop = np.asarray(Image.open(out / entry["image"]))
        assert crop.shape == (512, 512, 3) and crop[int(by1):int(by2), int(bx1):int(bx2)].std() > 10

    skip = tmp_path / "skip"
    assert prepare_data.main([*argv[:2], str(skip), *argv[3:], "--several-faces", "skip"]) == 0
    statuses = {e["key"]: e["status"] for e in map(json.loads, (skip / "manifest.jsonl").read_text().splitlines())}
    assert statuses == {"t1.jpg": "several_faces", "Tom_Hanks_54745.png": "ok", "mask_blue.jpg": "no_face"}

"""FaceEncoder: insightface FaceAnalysis on a tiny antelopev2-layout pack (tiny ONNX detector + ArcFace)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from adaface.models.face_encoder import FaceEncoder, largest_face
from adaface.testing.tiny_models import save_tiny_antelopev2


@pytest.fixture(scope="module")
def full_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("insightface")
    save_tiny_antelopev2(root)
    return root


@pytest.fixture(scope="module")
def encoder(full_root):
    return FaceEncoder(full_root)


def _face_image(size=200, box=(50, 150, 60, 160)):
    img = np.zeros((size, size, 3), np.uint8)
    img[box[0]:box[1], box[2]:box[3]] = (230, 200, 180)
    return img


def _crop(seed):
    return np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)


def test_aligned_crops_go_through_the_recognition_model(tmp_path):
    import onnxruntime

    pack = save_tiny_antelopev2(tmp_path, with_detector=False)
    enc = FaceEncoder(tmp_path)
    assert not enc.has_detector
    crops = [_crop(0), _crop(1)]
    each = enc.embed_each(crops, aligned=True)
    # Independent reference: onnxruntime on insightface's ArcFace preprocessing ((x - 127.5) / 127.5, RGB, NCHW).
    sess = onnxruntime.InferenceSession(str(pack / "glintr100.onnx"), providers=["CPUExecutionProvider"])
    blob = ((np.stack(crops).astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)
    ref = torch.nn.functional.normalize(torch.from_numpy(sess.run(None, {"input.1": blob})[0]), dim=-1)
    torch.testing.assert_close(each, ref, atol=1e-5, rtol=1e-4)
    mean = enc(crops, aligned=True)
    torch.testing.assert_close(mean, torch.nn.functional.normalize(ref.mean(0), dim=0), atol=1e-5, rtol=1e-4)
    assert mean.shape == (512,)
    with pytest.raises(ValueError, match="no face detector"):
        enc(_face_image())
    with pytest.raises(ValueError, match="112x112"):
        enc(np.zeros((100, 100, 3), np.uint8), aligned=True)


def test_detects_and_embeds_faces_from_paths_pil_and_numpy(encoder, tmp_path):
    from PIL import Image

    img = _face_image()
    Image.fromarray(img).save(tmp_path / "face.png")
    from_path = encoder(tmp_path / "face.png")
    assert from_path.shape == (512,) and from_path.norm().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(encoder(Image.fromarray(img)), from_path)
    torch.testing.assert_close(encoder(img), from_path)
    other = encoder(_face_image(box=(20, 120, 90, 190)))
    assert (other - from_path).abs().max() > 1e-4


def test_no_face_names_the_file(encoder, tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(ValueError, match="no face found in .*empty.png"):
        encoder([_face_image(), tmp_path / "empty.png"])
    rnd = encoder(tmp_path / "empty.png", on_no_face="random", generator=torch.Generator().manual_seed(0))
    assert rnd.norm().item() == pytest.approx(1.0, abs=1e-5)


def test_unreadable_and_missing_files(encoder, tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read .*notes.jpg as an image"):
        encoder(tmp_path / "notes.jpg")
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        encoder(tmp_path / "missing.jpg")
    with pytest.raises(TypeError, match="paths, PIL images or numpy"):
        encoder(3)


def test_missing_model_folder_is_an_error_not_a_download(tmp_path, monkeypatch):
    import insightface.app.face_analysis as fa

    def no_download(*args, **kwargs):
        raise AssertionError("insightface tried to download")

    monkeypatch.setattr(fa, "ensure_available", no_download)
    with pytest.raises(FileNotFoundError) as info:
        FaceEncoder(tmp_path / "nowhere")
    msg = str(info.value)
    assert str(tmp_path / "nowhere" / "models" / "antelopev2") in msg and "glintr100.onnx" in msg


def test_largest_face_uses_box_area():
    faces = [SimpleNamespace(bbox=np.array(b, np.float32)) for b in ([0, 0, 10, 50], [0, 0, 30, 20], [5, 5, 12, 12])]
    assert largest_face(faces) is faces[1]  # 600 > 500 > 49


@pytest.fixture(scope="module")
def full_pack_encoder(tmp_path_factory):
    from adaface.testing.tiny_face_models import save_tiny_antelopev2_full

    root = tmp_path_factory.mktemp("full")
    save_tiny_antelopev2_full(root, recognizer="arcface.onnx")
    return FaceEncoder(root, landmarks=True, genderage=True)


def test_per_face_steps_match_insightface_face_analysis(full_pack_encoder):
    """detect / embed_face / landmarks_106 / class_word against FaceAnalysis running all its models itself."""
    from insightface.app import FaceAnalysis

    enc = full_pack_encoder
    assert enc.recognizer_file == "arcface.onnx"
    img = np.full((256, 256, 3), 20, np.uint8)
    img[64:128, 64:128] = 230
    img[128:192, 128:192] = 200
    faces = enc.detect(img)
    assert len(faces) == 2 and all(f.kps.shape == (5, 2) for f in faces)
    app = FaceAnalysis(name=str(enc.pack), providers=["CPUExecutionProvider"],
                       allowed_modules=["detection", "recognition", "landmark_2d_106", "genderage"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    ref = app.get(np.ascontiguousarray(img[:, :, ::-1]))
    assert len(ref) == 2
    for face in faces:
        match = min(ref, key=lambda r: np.abs(r.bbox - face.bbox).sum())
        np.testing.assert_allclose(face.bbox, match.bbox, atol=1e-4)
        np.testing.assert_allclose(enc.embed_face(img, face), match.normed_embedding, atol=1e-5)
        np.testing.assert_allclose(enc.landmarks_106(img, face), match.landmark_2d_106, atol=1e-4)
        assert enc.class_word(img, face) == ("man" if match.sex == "M" else "woman")
    assert len(enc.app.models) == 2  # the per-face models do not run inside app.get


def test_optional_models_absent_give_none_and_load_without_a_detector(encoder, tmp_path):
    from adaface.testing.tiny_face_models import save_tiny_antelopev2_full

    face = encoder.detect(_face_image())[0]
    assert encoder.recognizer_file == "glintr100.onnx"
    assert encoder.landmarks_106(_face_image(), face) is None and encoder.class_word(_face_image(), face) is None
    save_tiny_antelopev2_full(tmp_path, with_detector=False)
    no_detector = FaceEncoder(tmp_path, landmarks=True, genderage=True)
    assert not no_detector.has_detector
    assert no_detector.landmark_model is not None and no_detector.genderage_model is not None
    assert no_detector.landmarks_106(_face_image(), face).shape == (106, 2)
    with pytest.raises(ValueError, match="no face detector"):
        no_detector.detect(_face_image())


def test_check_recognizer_warns_or_refuses():
    from adaface.models.face_encoder import RecognizerMismatch, check_recognizer

    assert check_recognizer("arcface.onnx") is None and check_recognizer("arcface.onnx", strict=True) is None
    warning = check_recognizer("glintr100.onnx")
    assert "glintr100.onnx" in warning and "arcface.onnx" in warning
    with pytest.raises(RecognizerMismatch, match="glintr100.onnx"):
        check_recognizer("glintr100.onnx", strict=True)

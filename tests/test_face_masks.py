"""Face masks hold the face and its hair (paper §2.4, Fig. 6: the face-preserving loss must protect the hair):
the parser keeps BiSeNet's hair label, the landmark and box masks reach above the brows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from adaface.faces.crop import CropTransform
from adaface.faces.masks import box_mask, landmark_mask
from adaface.faces.parsing import FACE_LABELS, FaceParser, mask_from_labels
from adaface.testing.stub_facexlib import install_stub_facexlib

SIZE = 512
IDENTITY = CropTransform(A=np.eye(2), t=np.zeros(2), size=SIZE)  # crop pixels = photo pixels
# CelebAMask-HQ labels on an 8x8 grid (64 px cells): hat on top, hair, the face, neck and clothes below
LABEL_ROWS = [18, 17, 17, 1, 1, 1, 14, 16]
HAIR, HAT, SKIN, BACKGROUND = 17, 18, 1, 0


class StubBiSeNet(torch.nn.Module):
    """BiSeNet's interface (num_class, forward → (out, out16, out32) at the input size) with fixed labels."""

    def __init__(self, num_class: int) -> None:
        super().__init__()
        self.register_buffer("logits", torch.zeros(1, num_class, 8, 8))

    def forward(self, x):
        out = torch.nn.functional.interpolate(self.logits, size=x.shape[-2:], mode="nearest")
        return out, out, out


@pytest.fixture
def stub_parser(tmp_path, monkeypatch):
    install_stub_facexlib(monkeypatch, StubBiSeNet)
    net = StubBiSeNet(19)
    labels = torch.tensor(LABEL_ROWS)[:, None].expand(8, 8).clone()
    labels[:, 0] = BACKGROUND  # a background column on the left
    net.logits.scatter_(1, labels[None, None], 10.0)
    weights = tmp_path / "parsing_bisenet.pth"
    torch.save(net.state_dict(), weights)
    return FaceParser(weights), labels


def test_parser_mask_covers_the_hair(stub_parser):
    parser, labels = stub_parser
    assert HAIR in FACE_LABELS and HAT not in FACE_LABELS and SKIN in FACE_LABELS
    mask = np.asarray(parser.mask(Image.new("RGB", (SIZE, SIZE))))
    cells = mask.reshape(8, 64, 8, 64)[:, 16:48, :, 16:48].mean((1, 3))  # each cell's inner part
    want = np.isin(labels.numpy(), [HAIR, SKIN])
    assert (cells[want] == 255).all() and (cells[~want] == 0).all()
    assert want[1:3, 1:].all()  # the hair rows are there and covered
    np.testing.assert_array_equal(mask_from_labels(np.array([[HAIR, HAT, 14, 16, 0, 1, 13]])),
                                  [[255, 0, 0, 0, 0, 255, 255]])


def face_landmarks() -> np.ndarray:
    """A 106-landmark-like face in crop pixels: jaw arc (y 250..450), brows at y 200, eyes, nose, mouth."""
    t = np.linspace(0, np.pi, 33)
    jaw = np.stack([256 - 150 * np.cos(t), 250 + 200 * np.sin(t)], 1)
    brows = np.stack([np.linspace(150, 362, 18), np.full(18, 200.0)], 1)
    eyes = np.stack([np.tile(np.linspace(170, 220, 8), 2) + np.repeat([0, 122], 8), np.full(16, 240.0)], 1)
    inner = np.stack([np.full(39, 256.0), np.linspace(250, 400, 39)], 1)
    return np.concatenate([jaw, brows, eyes, inner])


def covered(mask: Image.Image, x: float, y: float) -> bool:
    return np.asarray(mask)[int(y), int(x)] > 127


def test_landmark_mask_reaches_above_the_brows():
    lm = face_landmarks()
    brow_top, chin = lm[:, 1].min(), lm[:, 1].max()
    mask = landmark_mask(lm, IDENTITY)
    height = chin - brow_top
    assert covered(mask, 256, 300) and covered(mask, 256, brow_top + 5)  # the face
    for above in (0.1, 0.3, 0.5):  # forehead and hair above the brows
        assert covered(mask, 256, brow_top - above * height), above
    assert covered(mask, 170, brow_top - 0.2 * height)  # the sides of the forehead too
    assert not covered(mask, 256, brow_top - 0.7 * height) and not covered(mask, 30, 30)
    assert not covered(mask, 256, chin + 10)  # nothing below the chin


def test_box_mask_reaches_above_the_box():
    box = np.array([120.0, 180.0, 392.0, 470.0])  # a detection box: about the hairline to the chin
    kps = np.array([[200, 260], [312, 260], [256, 330], [210, 390], [302, 390]], float)
    mask = box_mask(box, kps, IDENTITY)
    height = box[3] - box[1]
    assert covered(mask, 256, 325) and covered(mask, 200, 260)
    for above in (0.1, 0.25):
        assert covered(mask, 256, box[1] - above * height), above
    assert not covered(mask, 256, box[1] - 0.45 * height) and not covered(mask, 256, box[3] + 10)
    assert not covered(mask, box[0] - 10, 325) and not covered(mask, box[2] + 10, 325)

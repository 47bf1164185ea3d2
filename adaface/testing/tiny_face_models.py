"""Tiny random ONNX stand-ins for the antelopev2 pack's per-face models, routed by insightface as the real ones.

insightface's model router picks a model's class by its input shape: 192×192 is the 106-point landmark model
(`2d106det.onnx`, output `[N, 212]` in [-1, 1] crop coordinates), 96×96 the attribute model (`genderage.onnx`,
output `[N, 3]`: two gender logits and age / 100). Node names avoid the `Sub`/`Mul` prefixes, so insightface
applies the same input normalisation it applies to the released files.
"""

from __future__ import annotations

import os
from pathlib import Path

from .tiny_models import _onnx_model, save_tiny_antelopev2, scrfd_onnx

LANDMARK_INPUT = 192
GENDERAGE_INPUT = 96


def _pool_linear_onnx(size: int, out_dim: int, seed: int, name: str, squash: bool, scale: float = 0.05):
    """[N, 3, size, size] → 8×8 average pool → linear → `out_dim` (through tanh when `squash`)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    pool = size // 8
    weight = rng.standard_normal((3 * 64, out_dim)).astype(np.float32) * scale
    nodes = [
        helper.make_node("AveragePool", ["data"], ["pooled"], name="pool", kernel_shape=[pool, pool],
                         strides=[pool, pool]),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
        helper.make_node("MatMul", ["flat", "fc_weight"], ["linear" if squash else "fc1"], name="fc"),
    ]
    if squash:
        nodes.append(helper.make_node("Tanh", ["linear"], ["fc1"], name="squash"))
    inp = helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, size, size])
    out = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", out_dim])
    return _onnx_model(nodes, [inp], [out], [numpy_helper.from_array(weight, "fc_weight")], name)


def tiny_landmark_106_onnx(seed: int = 0):
    """A `2d106det`-shaped landmark model: 106 (x, y) pairs in [-1, 1] of its 192×192 face crop (small weights
    keep the points near the crop's centre, inside the detection box, as a real model's are)."""
    return _pool_linear_onnx(LANDMARK_INPUT, 212, seed, "tiny_2d106det", squash=True, scale=0.01)


def tiny_genderage_onnx(seed: int = 0):
    """A `genderage`-shaped attribute model: [female logit, male logit, age / 100]."""
    return _pool_linear_onnx(GENDERAGE_INPUT, 3, seed, "tiny_genderage", squash=False)


def tiny_scrfd_blob_onnx():
    """An SCRFD-shaped detector (`scrfd_onnx`, outputs as `tiny_scrfd_onnx`) that finds one face per bright
    32-pixel cell of its 128×128 input: only stride 32 scores (the finer strides score 0), and brighter cells give
    bigger boxes, centred on the cell with sides `2p · 32` pixels, where p = sigmoid(10 · (mean brightness − 0.5))
    is the score. So a bright square on a dark photo is one face, two squares are two faces, and the brighter is
    the larger.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    consts = [
        numpy_helper.from_array(np.array([0.0], np.float32), "zero"),
        numpy_helper.from_array(
            np.array([0.25, 0.3, 0.75, 0.3, 0.5, 0.55, 0.3, 0.8, 0.7, 0.8], np.float32), "kps_dist"
        ),
        # Anchors sit at their cell's top-left corner: shift the boxes by half a cell to centre them on it.
        numpy_helper.from_array(np.array([-0.5, -0.5, 0.5, 0.5], np.float32), "box_centre"),
    ]

    def heads(stride: int, t: str) -> list:
        return [
            helper.make_node("Tile", [f"{t}_p", f"{t}_tile4"], [f"{t}_p4"], name=f"{t}_p4"),
            helper.make_node("Add", [f"{t}_p4", "box_centre"], [f"bbox_{stride}"], name=f"{t}_box"),
            helper.make_node("Mul", [f"{t}_p", "zero"], [f"{t}_z"], name=f"{t}_z"),
            helper.make_node("Tile", [f"{t}_z", f"{t}_tile10"], [f"{t}_z10"], name=f"{t}_z10"),
            helper.make_node("Add", [f"{t}_z10", "kps_dist"], [f"kps_{stride}"], name=f"{t}_kps"),
            helper.make_node("Identity", [f"{t}_p" if stride == 32 else f"{t}_z"], [f"score_{stride}"],
                             name=f"{t}_score"),
        ]

    return scrfd_onnx("tiny_scrfd_blob", consts, heads)


def save_tiny_antelopev2_full(
    root: str | os.PathLike,
    *,
    recognizer: str = "glintr100.onnx",
    with_detector: bool = True,
    landmarks: bool = True,
    genderage: bool = True,
    seed: int = 0,
) -> Path:
    """`save_tiny_antelopev2` with the one-face-per-blob detector (`tiny_scrfd_blob_onnx`), plus
    `2d106det.onnx` and `genderage.onnx`; `recognizer` names the ArcFace file (`glintr100.onnx` as the stock
    pack, `arcface.onnx` as Arc2Face's). Returns the pack folder."""
    import onnx

    pack = save_tiny_antelopev2(root, with_detector=False, seed=seed)
    if with_detector:
        onnx.save(tiny_scrfd_blob_onnx(), str(pack / "scrfd_10g_bnkps.onnx"))
    if recognizer != "glintr100.onnx":
        (pack / "glintr100.onnx").rename(pack / recognizer)
    if landmarks:
        onnx.save(tiny_landmark_106_onnx(seed), str(pack / "2d106det.onnx"))
    if genderage:
        onnx.save(tiny_genderage_onnx(seed), str(pack / "genderage.onnx"))
    return pack

"""Tiny random ONNX stand-ins for the antelopev2 pack's per-face models, routed by insightface as the real ones.

insightface's model router picks a model's class by its input shape: 192×192 is the 106-point landmark model
(`2d106det.onnx`, output `[N, 212]` in [-1, 1] crop coordinates), 96×96 the attribute model (`genderage.onnx`,
output `[N, 3]`: two gender logits and age / 100). Node names avoid the `Sub`/`Mul` prefixes, so insightface
applies the same input normalisation it applies to the released files.
"""

from __future__ import annotations

import os
from pathlib import Path

from .tiny_models import TINY_DET_INPUT, _onnx_model, save_tiny_antelopev2

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
    """An SCRFD-shaped detector (outputs as `tiny_scrfd_onnx`) that finds one face per bright 32-pixel cell of
    its 128×128 input: only stride 32 scores (the finer strides score 0), and brighter cells give bigger boxes,
    centred on the cell with sides `2p · 32` pixels, where p = sigmoid(10 · (mean brightness − 0.5)) is the score.
    So a bright square on a dark photo is one face, two squares are two faces, and the brighter is the larger.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    s = TINY_DET_INPUT
    consts = [
        numpy_helper.from_array(np.array([10.0], np.float32), "gain"),
        numpy_helper.from_array(np.array([0.5], np.float32), "offset"),
        numpy_helper.from_array(np.array([0.0], np.float32), "zero"),
        numpy_helper.from_array(
            np.array([0.25, 0.3, 0.75, 0.3, 0.5, 0.55, 0.3, 0.8, 0.7, 0.8], np.float32), "kps_dist"
        ),
        # Anchors sit at their cell's top-left corner: shift the boxes by half a cell to centre them on it.
        numpy_helper.from_array(np.array([-0.5, -0.5, 0.5, 0.5], np.float32), "box_centre"),
    ]
    nodes = [helper.make_node("ReduceMean", ["input.1"], ["gray"], name="gray", axes=[1], keepdims=1)]
    scores, boxes, kpss = [], [], []
    for stride in (8, 16, 32):
        t = f"s{stride}"
        consts.append(numpy_helper.from_array(np.array([1, -1, 1], np.int64), f"{t}_shape1"))
        consts.append(numpy_helper.from_array(np.array([1, 1, 4], np.int64), f"{t}_tile4"))
        consts.append(numpy_helper.from_array(np.array([1, 1, 10], np.int64), f"{t}_tile10"))
        nodes += [
            helper.make_node("AveragePool", ["gray"], [f"{t}_pool"], name=f"{t}_pool",
                             kernel_shape=[stride, stride], strides=[stride, stride]),
            helper.make_node("Sub", [f"{t}_pool", "offset"], [f"{t}_centred"], name=f"{t}_centre"),
            helper.make_node("Mul", [f"{t}_centred", "gain"], [f"{t}_logit"], name=f"{t}_gain"),
            helper.make_node("Sigmoid", [f"{t}_logit"], [f"{t}_prob"], name=f"{t}_sigmoid"),
            helper.make_node("Transpose", [f"{t}_prob"], [f"{t}_hw"], name=f"{t}_t", perm=[0, 2, 3, 1]),
            helper.make_node("Concat", [f"{t}_hw", f"{t}_hw"], [f"{t}_anchors"], name=f"{t}_cat", axis=3),
            helper.make_node("Reshape", [f"{t}_anchors", f"{t}_shape1"], [f"{t}_p"], name=f"{t}_reshape"),
            helper.make_node("Tile", [f"{t}_p", f"{t}_tile4"], [f"{t}_p4"], name=f"{t}_p4"),
            helper.make_node("Add", [f"{t}_p4", "box_centre"], [f"bbox_{stride}"], name=f"{t}_box"),
            helper.make_node("Mul", [f"{t}_p", "zero"], [f"{t}_z"], name=f"{t}_z"),
            helper.make_node("Tile", [f"{t}_z", f"{t}_tile10"], [f"{t}_z10"], name=f"{t}_z10"),
            helper.make_node("Add", [f"{t}_z10", "kps_dist"], [f"kps_{stride}"], name=f"{t}_kps"),
        ]
        if stride == 32:
            nodes.append(helper.make_node("Identity", [f"{t}_p"], [f"score_{stride}"], name=f"{t}_score"))
        else:
            nodes.append(helper.make_node("Identity", [f"{t}_z"], [f"score_{stride}"], name=f"{t}_score"))
        n = (s // stride) ** 2 * 2
        scores.append(helper.make_tensor_value_info(f"score_{stride}", TensorProto.FLOAT, [1, n, 1]))
        boxes.append(helper.make_tensor_value_info(f"bbox_{stride}", TensorProto.FLOAT, [1, n, 4]))
        kpss.append(helper.make_tensor_value_info(f"kps_{stride}", TensorProto.FLOAT, [1, n, 10]))
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, s, s])
    return _onnx_model(nodes, [inp], scores + boxes + kpss, consts, "tiny_scrfd_blob")


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

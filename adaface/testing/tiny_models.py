"""Tiny, randomly initialised models of the real classes, saved to disk in the real folder layouts.

No weights can be downloaded where this library is developed and tested, so every test and the built-in
tiny training preset load these through the same code paths as the released checkpoints:
- `save_tiny_tokenizer`: a CLIPTokenizer over a small byte-level BPE vocabulary (the real CLIP BPE files
  are not available), model_max_length 77.
- `save_tiny_sd15`: an SD-1.5-shaped StableDiffusionPipeline folder (model_index.json, unet/, vae/,
  text_encoder/, tokenizer/, scheduler/).
The width of the text encoders is 512 on purpose: Arc2Face writes the 512-d ArcFace vector into a token
embedding, so the encoders must be at least that wide for the real Arc2Face code path to run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# Words the tiny BPE merges into single tokens: the prompts of Arc2Face, AdaFace and the tests.
TINY_WORDS = (
    "photo", "of", "a", "id", "person", "man", "woman", "boy", "girl", "in", "the", "forest", "on",
    "beach", "wearing", "hat", "z", "portrait", "city", "at", "night", "with", "dog", "and", "an",
    "painting", "style", "red", "snow", "face",
)


@dataclass(frozen=True)
class TinyConfig:
    hidden_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    intermediate_size: int = 512
    max_position: int = 77
    unet_channels: tuple[int, int] = (32, 64)
    unet_head_dim: int = 8
    latent_size: int = 8
    vae_channels: tuple[int, int] = (32, 32)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-unicode map (a fact of the BPE format)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def tiny_bpe(words: tuple[str, ...] = TINY_WORDS) -> tuple[dict[str, int], list[str]]:
    """A byte-level vocabulary (every byte, alone and word-final) plus merges that make `words` single tokens."""
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        if len(parts) == 1:
            continue
        current = parts[0]
        for nxt in parts[1:]:
            rule = f"{current} {nxt}"
            if rule not in merges:
                merges.append(rule)
            current = current + nxt
            if current not in vocab_list:
                vocab_list.append(current)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def save_tiny_tokenizer(path: str | os.PathLike) -> Path:
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_bpe()
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer.from_pretrained(str(path), model_max_length=77)
    tok.save_pretrained(str(path))
    return path


def tiny_text_config(cfg: TinyConfig = TinyConfig(), vocab_size: int | None = None):
    from transformers import CLIPTextConfig

    vocab = tiny_bpe()[0]
    if vocab_size is None:
        vocab_size = len(vocab)
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position,
        projection_dim=cfg.hidden_size,
        hidden_act="quick_gelu",
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )


def tiny_text_encoder(cfg: TinyConfig = TinyConfig(), seed: int = 0):
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(tiny_text_config(cfg)).eval()


def tiny_unet(cfg: TinyConfig = TinyConfig(), seed: int = 0):
    """SD-1.5-shaped: cross-attention down block, plain down block, cross-attention mid and up blocks."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=cfg.unet_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cfg.hidden_size,
        attention_head_dim=cfg.unet_head_dim,
        norm_num_groups=8,
    ).eval()


def tiny_vae(cfg: TinyConfig = TinyConfig(), seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        block_out_channels=cfg.vae_channels,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=cfg.latent_size * 2 ** (len(cfg.vae_channels) - 1),
    ).eval()


def sd15_scheduler():
    """SD-1.5's training noise schedule (scaled-linear betas 0.00085 → 0.012, 1000 steps)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, steps_offset=1,
    )


def save_tiny_sd15(path: str | os.PathLike, cfg: TinyConfig = TinyConfig(), seed: int = 0) -> Path:
    """A StableDiffusionPipeline folder in the released SD-1.5 layout, with tiny random weights."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    path = Path(path)
    tok_dir = save_tiny_tokenizer(path / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(cfg, seed),
        text_encoder=tiny_text_encoder(cfg, seed),
        tokenizer=CLIPTokenizer.from_pretrained(str(tok_dir)),
        unet=tiny_unet(cfg, seed),
        scheduler=sd15_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Arc2Face, AnimateDiff and insightface: tiny stand-ins in the released layouts (appended for the models issue).
# ---------------------------------------------------------------------------------------------------------------


def save_tiny_arc2face(
    path: str | os.PathLike, cfg: TinyConfig = TinyConfig(), seed: int = 1, with_tokenizer: bool = False
) -> Path:
    """The released Arc2Face layout: `arc2face/` (diffusers UNet, safetensors) and `encoder/` (CLIPTextModel
    as `config.json` + `pytorch_model.bin`, keys under `text_model.` as transformers 4.x wrote them).

    The release ships no tokenizer (Arc2Face uses SD-1.5's); `with_tokenizer=True` adds a `tokenizer/` folder.
    """
    path = Path(path)
    tiny_unet(cfg, seed).save_pretrained(str(path / "arc2face"), safe_serialization=True)
    enc = tiny_text_encoder(cfg, seed)
    enc_dir = path / "encoder"
    enc_dir.mkdir(parents=True, exist_ok=True)
    config = enc.config.to_dict()
    config["architectures"] = ["CLIPTextModel"]
    config.pop("_attn_implementation_autoset", None)
    (enc_dir / "config.json").write_text(json.dumps(config, indent=2))
    inner = getattr(enc, "text_model", enc)
    state = {f"text_model.{k}": v.clone() for k, v in inner.state_dict().items()}
    # Test fixture only: the Arc2Face release ships this pickle-format file, and the loader under test must read it
    # with torch's weights_only loader. The library itself never writes pickles.
    torch.save(state, enc_dir / "pytorch_model.bin")
    if with_tokenizer:
        save_tiny_tokenizer(path / "tokenizer")
    return path


def tiny_motion_adapter(cfg: TinyConfig = TinyConfig(), seed: int = 0):
    """An AnimateDiff MotionAdapter matching `tiny_unet`'s blocks."""
    from diffusers import MotionAdapter

    torch.manual_seed(seed)
    return MotionAdapter(
        block_out_channels=cfg.unet_channels,
        motion_layers_per_block=1,
        motion_num_attention_heads=2,
        motion_norm_num_groups=8,
        motion_max_seq_length=8,
        use_motion_mid_block=False,
    ).eval()


TINY_FACE_INPUT = 112
TINY_DET_INPUT = 128


def _onnx_model(nodes, inputs, outputs, initializers, name: str):
    from onnx import helper

    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="adaface-tiny")
    model.ir_version = 8  # readable by older onnxruntime releases too
    return model


def tiny_arcface_onnx(seed: int = 0):
    """A recognition model insightface's ArcFaceONNX accepts: [N, 3, 112, 112] → [N, 512] (pool + linear)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    pooled = 3 * (TINY_FACE_INPUT // 8) ** 2
    weight = numpy_helper.from_array(rng.standard_normal((pooled, 512)).astype(np.float32), "fc_weight")
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], name="pool", kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
        helper.make_node("MatMul", ["flat", "fc_weight"], ["683"], name="fc"),
    ]
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, TINY_FACE_INPUT, TINY_FACE_INPUT])
    out = helper.make_tensor_value_info("683", TensorProto.FLOAT, ["N", 512])
    return _onnx_model(nodes, [inp], [out], [weight], "tiny_arcface")


def scrfd_onnx(name: str, consts: list, heads: Callable[[int, str], list]):
    """The SCRFD layout insightface reads (9 batched outputs: scores, boxes, 5 keypoints at strides 8/16/32, two
    anchors per location) around a brightness probe of the 128×128 input.

    Per stride, tensor `{t}_p` (t = f"s{stride}") is each anchor's sigmoid(10 · (mean brightness of its stride
    cell − 0.5)) on insightface's normalised input, shaped [1, h·w·2, 1]. `heads(stride, t)` returns the nodes
    that make `score_{stride}`, `bbox_{stride}` and `kps_{stride}` from it; `consts` are their initializers (the
    per-stride shape `{t}_shape1` and tile counts `{t}_tile4`, `{t}_tile10` are provided, as are `gain` and
    `offset`).
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    s = TINY_DET_INPUT
    consts = [
        numpy_helper.from_array(np.array([10.0], np.float32), "gain"),
        numpy_helper.from_array(np.array([0.5], np.float32), "offset"),
        *consts,
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
            # [1, 1, h, w] → [1, h, w, 1] → two anchors per location → [1, h·w·2, 1]
            helper.make_node("Transpose", [f"{t}_prob"], [f"{t}_hw"], name=f"{t}_t", perm=[0, 2, 3, 1]),
            helper.make_node("Concat", [f"{t}_hw", f"{t}_hw"], [f"{t}_anchors"], name=f"{t}_cat", axis=3),
            helper.make_node("Reshape", [f"{t}_anchors", f"{t}_shape1"], [f"{t}_p"], name=f"{t}_reshape"),
            *heads(stride, t),
        ]
        n = (s // stride) ** 2 * 2
        scores.append(helper.make_tensor_value_info(f"score_{stride}", TensorProto.FLOAT, [1, n, 1]))
        boxes.append(helper.make_tensor_value_info(f"bbox_{stride}", TensorProto.FLOAT, [1, n, 4]))
        kpss.append(helper.make_tensor_value_info(f"kps_{stride}", TensorProto.FLOAT, [1, n, 10]))
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, s, s])
    return _onnx_model(nodes, [inp], scores + boxes + kpss, consts, name)


def tiny_scrfd_onnx():
    """An SCRFD-shaped detector (`scrfd_onnx`) that "detects" bright regions.

    An anchor's score is sigmoid(10 · (mean brightness of its stride cell − 0.5)) on insightface's normalised
    input at every stride, its box spans one stride around the anchor and its keypoints sit at fixed face-like
    offsets. A dark image has no face; a bright square on a dark background is one.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    consts = [
        numpy_helper.from_array(np.array([0.5, 0.5, 0.5, 0.5], np.float32), "box_dist"),
        numpy_helper.from_array(
            np.array([-0.2, -0.2, 0.2, -0.2, 0.0, 0.0, -0.15, 0.2, 0.15, 0.2], np.float32), "kps_dist"
        ),
    ]

    def heads(stride: int, t: str) -> list:
        return [
            helper.make_node("Identity", [f"{t}_p"], [f"score_{stride}"], name=f"{t}_score"),
            helper.make_node("Mul", [f"score_{stride}", "offset"], [f"{t}_zero0"], name=f"{t}_z0"),
            helper.make_node("Sub", [f"{t}_zero0", f"{t}_zero0"], [f"{t}_zero"], name=f"{t}_z"),
            helper.make_node("Tile", [f"{t}_zero", f"{t}_tile4"], [f"{t}_z4"], name=f"{t}_z4"),
            helper.make_node("Add", [f"{t}_z4", "box_dist"], [f"bbox_{stride}"], name=f"{t}_box"),
            helper.make_node("Tile", [f"{t}_zero", f"{t}_tile10"], [f"{t}_z10"], name=f"{t}_z10"),
            helper.make_node("Add", [f"{t}_z10", "kps_dist"], [f"kps_{stride}"], name=f"{t}_kps"),
        ]

    return scrfd_onnx("tiny_scrfd", consts, heads)


def save_tiny_antelopev2(root: str | os.PathLike, *, with_detector: bool = True, seed: int = 0) -> Path:
    """An insightface model root `root/models/antelopev2/` with a tiny detector and recognition model.

    File names follow the release (`scrfd_10g_bnkps.onnx`, `glintr100.onnx`); returns the pack folder.
    """
    import onnx

    pack = Path(root) / "models" / "antelopev2"
    pack.mkdir(parents=True, exist_ok=True)
    onnx.save(tiny_arcface_onnx(seed), str(pack / "glintr100.onnx"))
    if with_detector:
        onnx.save(tiny_scrfd_onnx(), str(pack / "scrfd_10g_bnkps.onnx"))
    return pack


def save_tiny_clip(path: str | os.PathLike, tokenizer_dir: str | os.PathLike) -> Path:
    """A tiny CLIPModel (text + vision) with a CLIPProcessor over the tiny tokenizer, for CLIP-T/CLIP-I."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    try:  # transformers 5: the PIL processor by name (CLIPImageProcessor itself would ask for torchvision)
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    vocab = tiny_bpe()[0]
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(small, vocab_size=len(vocab), max_position_embeddings=77,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(small, image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(str(path))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir))
                  ).save_pretrained(str(path))
    return Path(path)


def save_tiny_dino(path: str | os.PathLike) -> Path:
    """A tiny DINO-shaped ViTModel with its image processor, for the DINO metric."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       image_size=32, patch_size=8)
    ViTModel(config).save_pretrained(str(path))  # with the pooler, as AutoModel rebuilds it
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(path))
    return Path(path)

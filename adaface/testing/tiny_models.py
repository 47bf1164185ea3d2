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

    if vocab_size is None:
        vocab_size = len(tiny_bpe()[0])
    vocab = tiny_bpe()[0]
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

"""The released models' architectures with random weights, on any device (`meta` for memory estimates).

SD-1.5's UNet and VAE, CLIP ViT-L/14's text transformer (SD-1.5's text encoder, Arc2Face's encoder and the
Prompt Inverter's initialisation share it). Weights are random: these are for measuring speed and memory.
"""

from __future__ import annotations

from typing import Any

import torch


def clip_l_text_config(tokenizer: Any):
    """CLIP ViT-L/14's text transformer: 12 layers, width 768, 12 heads, 77 positions, 49408 tokens."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=768, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def sd15_unet():
    """SD-1.5's UNet (diffusers' defaults are SD-1.5's, except the 768-wide cross-attention and 8 heads)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()


def sd15_vae():
    """SD-1.5's VAE: 4 latent channels, downsampling ×8."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         sample_size=512).eval()


def clip_l_text_encoder(tokenizer: Any):
    from transformers import CLIPTextModel

    return CLIPTextModel(clip_l_text_config(tokenizer)).eval()


def frozen(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return module.requires_grad_(False).to(dtype=dtype)

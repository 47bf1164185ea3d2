"""Running a Hugging Face CLIP text transformer from token embeddings, in transformers 4.x and 5.x layouts.

AdaFace and Arc2Face both feed the text transformer *embeddings* (ID vectors written into token slots), but
transformers 5's `CLIPTextModel.forward` only takes `input_ids`. These helpers run the model's own modules
(embeddings → encoder layers → final layer norm) so the result equals `model(input_ids)` when the
embeddings are the token table's rows, and so per-layer hidden states are available for the inverter.

Layouts: transformers ≥ 5 flattened `CLIPTextModel` (`model.embeddings`, `model.encoder`,
`model.final_layer_norm`) and passes one 4-D mask plus `is_causal=True` to each layer; transformers 4.x
keeps them under `model.text_model` and passes an additive padding mask and an additive causal mask.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ClipTextParts:
    embeddings: nn.Module
    layers: nn.ModuleList
    final_layer_norm: nn.Module
    config: object
    legacy_layers: bool  # transformers 4.x layer signature (separate causal mask, tuple output)


def clip_text_parts(model: nn.Module) -> ClipTextParts:
    """The embeddings, encoder layers and final layer norm of a CLIPTextModel / CLIPTextTransformer."""
    inner = getattr(model, "text_model", model)
    encoder = getattr(inner, "encoder", None)
    layers = getattr(encoder, "layers", None)
    if layers is None or not hasattr(inner, "embeddings") or not hasattr(inner, "final_layer_norm"):
        raise TypeError(
            f"expected a CLIPTextModel or CLIPTextTransformer (with embeddings, encoder.layers, final_layer_norm), "
            f"got {type(model).__name__}"
        )
    config = getattr(model, "config", None) or getattr(inner, "config", None)
    params = inspect.signature(type(layers[0]).forward).parameters
    return ClipTextParts(inner.embeddings, layers, inner.final_layer_norm, config, "causal_attention_mask" in params)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder layers of a CLIPTextModel / CLIPTextTransformer / CLIPEncoder (each has `.self_attn`)."""
    if hasattr(model, "layers") and isinstance(model.layers, nn.ModuleList):
        return model.layers
    return clip_text_parts(model).layers


def _legacy_masks(
    hidden: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """transformers 4.x: additive [B, 1, L, L] padding and causal masks in the hidden states' dtype."""
    b, n = hidden.shape[:2]
    neg = torch.finfo(hidden.dtype).min
    causal = torch.full((n, n), neg, dtype=hidden.dtype, device=hidden.device).triu(1)
    causal = causal.view(1, 1, n, n).expand(b, 1, n, n)
    pad = None
    if attention_mask is not None:
        keep = attention_mask.to(torch.bool).view(b, 1, 1, n).expand(b, 1, n, n)
        pad = torch.zeros((b, 1, n, n), dtype=hidden.dtype, device=hidden.device).masked_fill(~keep, neg)
    return pad, causal


@functools.cache
def _no_cache_kwarg() -> str:
    """create_causal_mask's name for its (unused here) KV-cache argument: `past_key_values` up to transformers
    5.17 or so, `cache` in later 5.x releases."""
    from transformers.masking_utils import create_causal_mask

    params = inspect.signature(create_causal_mask).parameters
    return "cache" if "cache" in params else "past_key_values"


def _causal_mask(config, hidden: torch.Tensor, attention_mask: torch.Tensor | None):
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask,
                              **{_no_cache_kwarg(): None})


def run_clip_text(
    model: nn.Module,
    token_embeds: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the text transformer on token embeddings `[B, L, H]` (position embeddings are added here).

    Returns `(last_hidden_state, hidden_states)`: the final-layer-normed output `[B, L, H]` and the list
    `[embeddings, layer_1, ..., layer_N]` of un-normed hidden states, as transformers' `hidden_states`.
    `attention_mask` is the usual `[B, L]` padding mask (1 = token, 0 = padding); the causal mask always applies.
    """
    parts = clip_text_parts(model)
    if token_embeds.dim() != 3:
        raise ValueError(f"token_embeds must be [B, L, H], got shape {tuple(token_embeds.shape)}")
    hidden = parts.embeddings(inputs_embeds=token_embeds)
    states = [hidden]
    if parts.legacy_layers:
        pad, causal = _legacy_masks(hidden, attention_mask)
        for layer in parts.layers:
            hidden = layer(hidden, pad, causal)[0]
            states.append(hidden)
    else:
        mask = _causal_mask(parts.config, hidden, attention_mask)
        for layer in parts.layers:
            hidden = layer(hidden, mask, is_causal=True)
            states.append(hidden)
    return parts.final_layer_norm(hidden), states

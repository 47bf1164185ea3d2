"""Dynamic Model Expansion for Hugging Face CLIP text encoders (paper §2.2): a drop-in `CLIPAttention`.

`expand_clip_attention(model, multipliers)` swaps every layer's `self_attn` for an `ExpandedCLIPAttention`
holding E paired copies of the expanded projections (mode "qv": Q and V, the paper; mode "kv": K and V, the
reference code's `CLIPAttentionMKV`). All copies of a query share one softmax over (copy, key) slots, computed
by `adaface.ops.expanded_attention`.

Parameter layout (chosen so an optimizer can be rebuilt cheaply after each expansion):
- the original `q_proj`/`k_proj`/`v_proj`/`out_proj` `nn.Linear` modules are kept as they are — same objects,
  same parameter names, untouched weights. They are copy 0.
- an expanded projection `p` with E > 1 adds two parameters, `{p}_extra_weight` `[E-1, out, in]` and
  `{p}_extra_bias` `[E-1, out]` (copies 1..E-1). At E = 1 they do not exist, so a multiplier-1 layer has exactly
  the parameters (and state-dict keys) of `CLIPAttention`. Expanding again *replaces* these two parameters;
  every other parameter, and its optimizer state, stays.

Expansion rule (paper §2.2, "Dynamic Model Expansion": N identical copies, Gaussian noise on the new ones).
Growing E → E' (E' a multiple of E) keeps copies 0..E-1 as they are and appends copies E..E'-1, copy c being a
duplicate of copy `c mod E` (`expansion_sources`). Every existing copy is thus duplicated E'/E times: its slots
appear E'/E times in the joint softmax with equal logits, so each slot's weight is split evenly and, with noise
ratio 0, the layer computes exactly what it computed before — also when the existing copies already differ
(a second plateau, ×4 → ×8). A multiplier that is not a multiple of E cannot keep the function and is refused.
Noise then goes on the new copies only: Gaussian, std = `noise_ratio` × mean over output rows of the row's
(unbiased) std of the source copy's weight; biases are duplicated without noise. Noise is drawn per projection
in q, k, v order, one `randn([E'-E, out, in])` each, from `generator` (on its device) when given.

Masks: transformers 5 hands the module `attention_mask` as None (sdpa, with `is_causal=True`), a bool 4-D
mask (sdpa with padding), an additive float 4-D mask (eager) or the raw 2-D padding mask (flash-attention
implementations); transformers 4.x hands it an additive padding mask plus `causal_attention_mask`. All are
accepted. Flex attention's `BlockMask` is not: use attn_implementation "eager" or "sdpa". Attention dropout is
not applied (CLIP text encoders use 0.0). Tested with transformers 5.x; the 4.x signature is supported
but not exercised by the tests here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._clip_text import encoder_layers

_PROJECTIONS = ("q", "k", "v")
MODES = {"qv": "the paper: Q and V expanded, K shared", "kv": "reference code: K and V expanded, Q shared"}


def _check_mode(mode: object) -> str:
    ok = isinstance(mode, str) and mode and all(c in _PROJECTIONS for c in mode) and len(set(mode)) == len(mode)
    if not ok:
        raise ValueError(f"mode must be a non-empty string of distinct letters from 'qkv' ('qv' or 'kv'), got {mode!r}")
    return "".join(p for p in _PROJECTIONS if p in mode)


def _check_multiplier(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _check_noise_ratio(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"noise_ratio must be a finite number >= 0, got {value!r}")
    return float(value)


def expansion_sources(current: int, multiplier: int) -> list[int]:
    """The copy each new copy duplicates when E = `current` grows to `multiplier`: copy c ← copy c mod E.

    One list per expansion, in the order the new copies are appended (copies E..E'-1). Shared with the
    optimizer-state transfer (`adaface.training.engine.optim`), which gives each new copy its source's state.
    """
    current = _check_multiplier("current multiplier", current)
    multiplier = _check_multiplier("multiplier", multiplier)
    if multiplier < current:
        raise ValueError(
            f"multiplier {multiplier} is below the layer's current {current}; copies are never removed one by one "
            "(use restore_clip_attention to go back to the original layer)"
        )
    if multiplier % current:
        raise ValueError(
            f"multiplier {multiplier} is not a multiple of the layer's current {current}: only duplicating every "
            "copy the same number of times keeps the layer's function (e.g. 4 -> 8)"
        )
    return [c % current for c in range(current, multiplier)]


class ExpandedCLIPAttention(nn.Module):
    """CLIP self-attention with E paired copies of the projections named in `mode`, one joint softmax.

    Build it from a loaded `CLIPAttention` with `from_clip_attention` (shares its Linear modules) and grow it
    with `expand`. `forward` takes the same arguments as `CLIPAttention.forward` in transformers 4.x and 5.x
    and returns `(attn_output, None)`; asked for attention weights (`output_attentions`), it raises a ValueError.
    """

    def __init__(
        self,
        q_proj: nn.Linear,
        k_proj: nn.Linear,
        v_proj: nn.Linear,
        out_proj: nn.Linear,
        *,
        num_heads: int,
        scale: float | None = None,
        mode: str = "qv",
        config: object = None,
    ) -> None:
        super().__init__()
        self.mode = _check_mode(mode)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.embed_dim = out_proj.out_features
        self.num_heads = int(num_heads)
        if self.embed_dim % self.num_heads or q_proj.out_features != self.embed_dim:
            raise ValueError(f"embed_dim {self.embed_dim} is not num_heads ({num_heads}) x head_dim")
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = self.head_dim**-0.5 if scale is None else float(scale)
        self.config = config
        self.is_causal = False  # as CLIPAttention: causality comes from the caller's mask / is_causal
        self.dropout = 0.0
        self.multiplier = 1
        for p in self.mode:
            self.register_parameter(f"{p}_extra_weight", None)
            self.register_parameter(f"{p}_extra_bias", None)
        self.__dict__["_original"] = None  # the replaced CLIPAttention, kept out of the module tree

    @classmethod
    def from_clip_attention(cls, attn: nn.Module, *, mode: str = "qv") -> ExpandedCLIPAttention:
        """Wrap a loaded CLIPAttention: its Linear modules are shared, not copied; E starts at 1."""
        for name in ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads"):
            if not hasattr(attn, name):
                raise TypeError(
                    f"attn must be a transformers CLIPAttention (missing {name!r}), got {type(attn).__name__}"
                )
        new = cls(
            attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj,
            num_heads=attn.num_heads, scale=getattr(attn, "scale", None), mode=mode,
            config=getattr(attn, "config", None),
        )
        new.train(attn.training)
        new.__dict__["_original"] = attn
        return new

    def to_clip_attention(self) -> nn.Module:
        """The original CLIPAttention, holding copy 0 (the current Linear modules); extra copies are dropped."""
        original = self.__dict__["_original"]
        if original is None:
            if self.config is None:
                raise ValueError("this ExpandedCLIPAttention was not built from a CLIPAttention and has no config")
            from transformers.models.clip.modeling_clip import CLIPAttention

            original = CLIPAttention(self.config)
        original.q_proj, original.k_proj, original.v_proj = self.q_proj, self.k_proj, self.v_proj
        original.out_proj = self.out_proj
        original.train(self.training)
        return original

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, multiplier={self.multiplier}, num_heads={self.num_heads}"

    @torch.no_grad()
    def expand(
        self, multiplier: int, *, noise_ratio: float = 0.1, generator: torch.Generator | None = None
    ) -> list[nn.Parameter]:
        """Grow to `multiplier` copies (see the module docstring for the rule); returns the new Parameters."""
        multiplier = _check_multiplier("multiplier", multiplier)
        _check_noise_ratio(noise_ratio)
        sources = expansion_sources(self.multiplier, multiplier)
        if not sources:
            return []
        new_params = []
        for p in self.mode:
            lin = getattr(self, f"{p}_proj")
            old_w, old_b = getattr(self, f"{p}_extra_weight"), getattr(self, f"{p}_extra_bias")
            copies = lin.weight.detach().unsqueeze(0)
            if old_w is not None:
                copies = torch.cat([copies, old_w.detach()])
            fresh = copies[sources]
            if noise_ratio > 0:
                std = noise_ratio * copies.float().std(dim=2).mean(dim=1)[sources]
                gen_device = generator.device if generator is not None else fresh.device
                noise = torch.randn(fresh.shape, generator=generator, device=gen_device, dtype=torch.float32)
                fresh = (fresh.float() + std.view(-1, 1, 1) * noise.to(fresh.device)).to(fresh.dtype)
            weight = fresh if old_w is None else torch.cat([old_w.detach(), fresh])
            new_params.append(nn.Parameter(weight, requires_grad=lin.weight.requires_grad))
            setattr(self, f"{p}_extra_weight", new_params[-1])
            if lin.bias is not None:
                biases = lin.bias.detach().unsqueeze(0)
                if old_b is not None:
                    biases = torch.cat([biases, old_b.detach()])
                bias = biases[sources] if old_b is None else torch.cat([old_b.detach(), biases[sources]])
                new_params.append(nn.Parameter(bias, requires_grad=lin.bias.requires_grad))
                setattr(self, f"{p}_extra_bias", new_params[-1])
        self.multiplier = multiplier
        return new_params

    def _project(self, p: str, x: torch.Tensor) -> torch.Tensor:
        """[B, L, C] → [B, H, L, E, head_dim] (E = 1 for a shared projection)."""
        lin = getattr(self, f"{p}_proj")
        extra_w = getattr(self, f"{p}_extra_weight", None)
        if extra_w is None:
            y, copies = lin(x), 1
        else:
            # One GEMM over all copies: concatenating the weights is cheaper than E separate launches.
            weight = torch.cat([lin.weight.unsqueeze(0), extra_w]).flatten(0, 1)
            bias = None
            if lin.bias is not None:
                bias = torch.cat([lin.bias.unsqueeze(0), getattr(self, f"{p}_extra_bias")]).flatten()
            y, copies = F.linear(x, weight, bias), extra_w.shape[0] + 1
        b, n = x.shape[:2]
        return y.view(b, n, copies, self.num_heads, self.head_dim).permute(0, 3, 1, 2, 4)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        causal_attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, None]:
        from adaface.ops import expanded_attention

        if output_attentions is None:  # transformers may ask through the config instead of the call
            output_attentions = getattr(self.config, "output_attentions", False)
        if output_attentions:
            # The joint softmax over (copy, key) slots is fused and never materialised; an empty tuple of
            # attentions would read as a model without attention layers.
            raise ValueError(
                "ExpandedCLIPAttention does not return attention weights (its joint softmax over copies x keys is "
                "fused): call the model with output_attentions=False, or restore_clip_attention first"
            )
        b, n, _ = hidden_states.shape
        q, k, v = (self._project(p, hidden_states) for p in _PROJECTIONS)
        key_padding_mask, attn_mask = _normalise_masks(attention_mask, causal_attention_mask, n)
        out = expanded_attention(
            q, k, v,
            causal=bool(kwargs.get("is_causal", False)),
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            scale=self.scale,
        )
        out = out.transpose(1, 2).reshape(b, n, self.embed_dim)
        return self.out_proj(out), None


def _normalise_masks(
    attention_mask: object, causal_attention_mask: object, length: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Every mask form transformers may pass → (bool key-padding mask [B, S], bool or additive 4-D mask)."""
    key_padding, full = None, []
    for name, m in (("attention_mask", attention_mask), ("causal_attention_mask", causal_attention_mask)):
        if m is None:
            continue
        if not isinstance(m, torch.Tensor):
            raise TypeError(
                f"ExpandedCLIPAttention: {name} of type {type(m).__name__} is not supported (flex attention's "
                "BlockMask?); load the model with attn_implementation='eager' or 'sdpa'"
            )
        if m.dim() == 2:
            # Flash-attention implementations pass the raw [B, S] padding mask (1 = token).
            if m.is_floating_point():
                raise ValueError(f"ExpandedCLIPAttention: a 2-D {name} must be bool or integer (1 = attend)")
            m = m.to(torch.bool)
            key_padding = m if key_padding is None else key_padding & m
        elif m.dim() in (3, 4):
            full.append(m if m.dim() == 4 else m.unsqueeze(1))
        else:
            raise ValueError(f"ExpandedCLIPAttention: {name} must be 2-D, 3-D or 4-D, got shape {tuple(m.shape)}")
    if not full:
        return key_padding, None
    if all(m.dtype == torch.bool for m in full):
        mask = full[0]
        for m in full[1:]:
            mask = mask & m
        return key_padding, mask
    mask = None
    for m in full:
        add = torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill(~m, float("-inf")) \
            if m.dtype == torch.bool else m.float()
        mask = add if mask is None else mask + add
    return key_padding, mask


def _layer_multipliers(multipliers: int | Sequence[int], n_layers: int) -> list[int]:
    if isinstance(multipliers, int) and not isinstance(multipliers, bool):
        return [_check_multiplier("multipliers", multipliers)] * n_layers
    if not isinstance(multipliers, Sequence) or isinstance(multipliers, str):
        raise TypeError(
            f"multipliers must be an int or a sequence of {n_layers} ints, got {type(multipliers).__name__}"
        )
    if len(multipliers) != n_layers:
        raise ValueError(f"multipliers must have one entry per layer ({n_layers}), got {len(multipliers)}")
    return [_check_multiplier(f"multipliers[{i}]", m) for i, m in enumerate(multipliers)]


def expand_clip_attention_with_params(
    model: nn.Module,
    multipliers: int | Sequence[int],
    *,
    mode: str = "qv",
    noise_ratio: float = 0.1,
    generator: torch.Generator | None = None,
) -> list[tuple[str, nn.Parameter]]:
    """As `expand_clip_attention`, but returns the `(name, Parameter)` pairs it created (names in `model`)."""
    mode = _check_mode(mode)
    _check_noise_ratio(noise_ratio)
    layers = encoder_layers(model)
    targets = _layer_multipliers(multipliers, len(layers))
    for i, layer in enumerate(layers):  # validate everything before changing anything
        attn = layer.self_attn
        if isinstance(attn, ExpandedCLIPAttention):
            if attn.mode != mode:
                raise ValueError(f"layer {i} is already expanded with mode {attn.mode!r}, cannot expand it as {mode!r}")
            try:
                expansion_sources(attn.multiplier, targets[i])
            except ValueError as e:
                raise ValueError(f"multipliers[{i}] (layer {i}): {e}") from e
    created: set[int] = set()
    for i, layer in enumerate(layers):
        if not isinstance(layer.self_attn, ExpandedCLIPAttention):
            layer.self_attn = ExpandedCLIPAttention.from_clip_attention(layer.self_attn, mode=mode)
        created.update(id(p) for p in layer.self_attn.expand(targets[i], noise_ratio=noise_ratio, generator=generator))
    return [(name, p) for name, p in model.named_parameters() if id(p) in created]


def expansion_elements(model: nn.Module, multipliers: int | Sequence[int], *, mode: str = "qv") -> int:
    """How many tensor elements `expand_clip_attention(model, multipliers, mode=mode)` would add, computed from
    the current shapes without allocating anything (a loader compares it with the weights it holds first)."""
    mode = _check_mode(mode)
    layers = encoder_layers(model)
    added = 0
    for layer, target in zip(layers, _layer_multipliers(multipliers, len(layers))):
        attn = layer.self_attn
        current = getattr(attn, "multiplier", 1)
        for p in getattr(attn, "mode", mode):
            lin = getattr(attn, f"{p}_proj")
            per_copy = lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)
            added += (target - current) * per_copy
    return added


def expand_clip_attention(
    model: nn.Module,
    multipliers: int | Sequence[int],
    *,
    mode: str = "qv",
    noise_ratio: float = 0.1,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Swap in `ExpandedCLIPAttention` in place and grow each layer to its multiplier; returns `model`.

    `multipliers`: one int for every layer or one per layer, the *total* number of copies (the stage-1
    schedule 1 → 4 → [8, 8, 8, 4, ...]); a layer already at its multiplier is left as it is. Works on
    CLIPTextModel (transformers 4.x and 5.x), CLIPTextTransformer and CLIPEncoder.
    """
    expand_clip_attention_with_params(model, multipliers, mode=mode, noise_ratio=noise_ratio, generator=generator)
    return model


def clip_attention_multipliers(model: nn.Module) -> list[int]:
    """Per-layer number of copies (1 for an unpatched layer)."""
    return [getattr(layer.self_attn, "multiplier", 1) for layer in encoder_layers(model)]


def restore_clip_attention(model: nn.Module) -> nn.Module:
    """Undo `expand_clip_attention` in place: every layer gets back a CLIPAttention holding copy 0."""
    for layer in encoder_layers(model):
        if isinstance(layer.self_attn, ExpandedCLIPAttention):
            layer.self_attn = layer.self_attn.to_clip_attention()
    return model

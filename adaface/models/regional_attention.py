"""Confine each subject's prompt tokens to a region of the image in a diffusers UNet's cross-attention.

With two identities in one prompt, every subject token is attended from the whole image and the identities blend
(FastComposer, Xiao et al. 2023). `RegionalAttention(unet, {"z": Region.parse("left"), "y": ...})` wraps the
processor of every spatial cross-attention layer (each `Attention` with `is_cross_attention`, so AnimateDiff's
temporal motion modules are left alone) in a `RegionalProcessor`: for the subject prompt's batch rows it adds an
additive mask on the key dimension, `-inf` from every latent position outside a subject's region to that
subject's token slots and 0 elsewhere, and calls the processor it replaces (diffusers' own attention
computation, SDPA or not) with it. Positions outside all regions attend to the prompt's other tokens as before.

    regional = RegionalAttention(pipe.unet, regions)
    regional.configure(slots={"z": 5, "y": 23}, num_tokens=16, latent_size=(64, 64), guided=True)
    pipe(prompt_embeds=...)          # guided: the first half of the batch is the negative prompt, left alone
    regional.remove()                # the original processor objects are back

A region is a box in fractions of the image; it is resized to a layer's resolution by the centres of its cells (a
cell belongs to the region when its centre lies in `[x0, x1) × [y0, y1)`), so `left` and `right` split every
layer exactly. A layer's resolution is the latent size halved (rounded up, as the UNet's strided convolutions do)
until it has the layer's number of positions. Until `configure` is called, and for subjects absent from the
current prompt or without a region, the processors pass their inputs through untouched: the UNet's output is then
bitwise that of the wrapped processors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ._wrapped_processors import SUFFIX as _SUFFIX
from ._wrapped_processors import WrappingProcessor, install, restore

NAMED_REGIONS = {
    "left": (0.0, 0.0, 0.5, 1.0),
    "right": (0.5, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.5),
    "bottom": (0.0, 0.5, 1.0, 1.0),
}


@dataclass(frozen=True)
class Region:
    """A box `x0, y0, x1, y1` in fractions of the image width and height (x to the right, y down)."""

    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self) -> None:
        box = (self.x0, self.y0, self.x1, self.y1)
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in box):
            raise ValueError(f"region {self.spec()}: every coordinate must be a fraction in [0, 1]")
        if not (self.x0 < self.x1 and self.y0 < self.y1):
            raise ValueError(f"region {self.spec()} is empty: it needs x0 < x1 and y0 < y1")

    @classmethod
    def parse(cls, text: str) -> Region:
        """`left`, `right`, `top`, `bottom` or `x0,y0,x1,y1` (fractions) → a Region; ValueError otherwise."""
        name = text.strip().lower()
        if name in NAMED_REGIONS:
            return cls(*NAMED_REGIONS[name])
        parts = [p.strip() for p in text.split(",")]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != 4:
            raise ValueError(f"region {text!r}: expected {', '.join(NAMED_REGIONS)} or x0,y0,x1,y1 (fractions)")
        return cls(*values)

    def spec(self) -> str:
        return ",".join(f"{v:g}" for v in (self.x0, self.y0, self.x1, self.y1))

    def overlaps(self, other: Region) -> bool:
        """True when the two boxes share an area (touching edges do not count)."""
        return min(self.x1, other.x1) > max(self.x0, other.x0) and min(self.y1, other.y1) > max(self.y0, other.y0)

    def cells(self, height: int, width: int) -> torch.Tensor:
        """`[height * width]` bool, row-major: the grid cells whose centres lie in the box."""
        ys = (torch.arange(height, dtype=torch.float64) + 0.5) / height
        xs = (torch.arange(width, dtype=torch.float64) + 0.5) / width
        inside_y = (ys >= self.y0) & (ys < self.y1)
        inside_x = (xs >= self.x0) & (xs < self.x1)
        return (inside_y[:, None] & inside_x[None, :]).reshape(-1)


def layer_grid(num_positions: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a UNet layer with `num_positions` positions for a `latent_size` latent."""
    h, w = latent_size
    for _ in range(16):
        if h * w == num_positions:
            return h, w
        if h == 1 and w == 1:
            break
        h, w = -(-h // 2), -(-w // 2)
    raise ValueError(f"a cross-attention layer has {num_positions} positions, which is no downsampling of the "
                     f"{latent_size[0]}x{latent_size[1]} latent")


def spatial_cross_attention_layers(unet: torch.nn.Module) -> list[str]:
    """Names of the UNet's attention modules that attend to the prompt (not self- or temporal attention)."""
    from diffusers.models.attention_processor import Attention

    processors = getattr(unet, "attn_processors", None)
    if processors is None:
        raise TypeError(f"unet must be a diffusers model with attention processors, got {type(unet).__name__}")
    return [name for name, module in unet.named_modules()
            if isinstance(module, Attention) and module.is_cross_attention and name + _SUFFIX in processors]


class RegionalProcessor(WrappingProcessor):
    """Calls the processor it wraps, adding its owner's region mask to the attention mask of cross-attention."""

    def __init__(self, inner: Any, owner: RegionalAttention) -> None:
        super().__init__(inner)
        self.owner = owner

    def call(self, attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
             attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> torch.Tensor:
        if encoder_hidden_states is not None:
            positions = hidden_states.shape[1] if hidden_states.dim() == 3 else math.prod(hidden_states.shape[2:])
            mask = self.owner.key_mask(hidden_states.shape[0], positions, encoder_hidden_states.shape[1],
                                       hidden_states.dtype, hidden_states.device)
            if mask is not None:
                attention_mask = mask if attention_mask is None else attention_mask + mask
        return super().call(attn, hidden_states, encoder_hidden_states, attention_mask, kwargs)


class RegionalAttention:
    """Installs `RegionalProcessor`s on every spatial cross-attention layer of `unet`; `remove()` restores them."""

    def __init__(self, unet: torch.nn.Module, regions: dict[str, Region]) -> None:
        for placeholder, region in regions.items():
            if not isinstance(region, Region):
                raise TypeError(f"region of {placeholder!r} must be a Region, got {type(region).__name__}")
        self.unet = unet
        self.regions = dict(regions)
        self.layers = spatial_cross_attention_layers(unet)
        if not self.layers:
            raise ValueError("unet has no cross-attention layers to confine")
        self._original = install(unet, self.layers, lambda inner, _: RegionalProcessor(inner, self),
                                 RegionalProcessor, "regional attention")
        self.installed = True
        self._spans: list[tuple[Region, int, int]] = []
        self._latent_size: tuple[int, int] | None = None
        self._guided = False
        self._cache: dict[tuple, torch.Tensor] = {}

    def configure(self, slots: dict[str, int], num_tokens: int | dict[str, int], latent_size: tuple[int, int],
                  guided: bool) -> None:
        """The current prompt: where each subject's slots start (`{placeholder: index}`, subjects absent from the
        prompt left out), how many slots a subject has, the latent's (height, width), and whether the batch is
        classifier-free guided (negative prompt first, as diffusers' pipelines stack it; only the second half,
        the subject prompt, is masked)."""
        counts = num_tokens if isinstance(num_tokens, dict) else {p: num_tokens for p in slots}
        self._spans = [(self.regions[p], start, start + counts[p]) for p, start in slots.items() if p in self.regions]
        self._latent_size = (int(latent_size[0]), int(latent_size[1]))
        self._guided = bool(guided)
        self._cache.clear()

    def clear(self) -> None:
        """Back to passing everything through (as before `configure`)."""
        self._spans = []
        self._cache.clear()

    def key_mask(self, batch: int, positions: int, keys: int, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor | None:
        """The additive mask `[batch, positions, keys]` for one layer call, or None when nothing is confined."""
        if not self._spans:
            return None
        key = (batch, positions, keys, dtype, device)
        mask = self._cache.get(key)
        if mask is None:
            mask = self._build(batch, positions, keys, dtype, device)
            self._cache[key] = mask
        return mask

    def _build(self, batch: int, positions: int, keys: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self._latent_size is None:
            raise RuntimeError("RegionalAttention.configure was not called with the latent size")
        h, w = layer_grid(positions, self._latent_size)
        row = torch.zeros(positions, keys, dtype=dtype)
        for region, start, end in self._spans:
            if end > keys:
                raise ValueError(f"subject slots {start}..{end - 1} lie beyond the prompt's {keys} tokens")
            row[~region.cells(h, w), start:end] = float("-inf")
        mask = torch.zeros(batch, positions, keys, dtype=dtype)
        if self._guided:
            if batch % 2:
                raise ValueError(f"a guided batch must hold negative and subject rows alike, got {batch} rows")
            mask[batch // 2:] = row
        else:
            mask[:] = row
        return mask.to(device)

    def remove(self) -> None:
        """Put back the processors found at installation."""
        if self.installed:
            restore(self.unet, self.layers, self._original)
            self.installed = False
            self._cache.clear()

    def __enter__(self) -> RegionalAttention:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

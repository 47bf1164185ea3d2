"""Capture a diffusers UNet's cross-attention features through its attention processors.

`UNetFeatureCapture(unet, layers)` wraps the processor of each selected cross-attention layer (`attn2`) in a
`CaptureProcessor` that calls the processor it replaces unchanged, so the UNet's output is bitwise the same as
with the stock processors (SDPA, bf16 and gradient checkpointing included), and keeps references to that call's
inputs and output while a recording is open:

    capture = UNetFeatureCapture(unet, ["up_blocks.*"])          # or indices: [13, 14, 15]
    with capture.recording() as features:
        unet(x, t, encoder_hidden_states=ctx)
    f = features["up_blocks.3.attentions.2.transformer_blocks.0.attn2"]
    f.query()    # [B, N, C]  queries, heads concatenated (the layer's own to_q on its input)
    f.maps()     # [B, heads, N, S] attention probabilities over the S prompt tokens (Attention.get_attention_scores)
    f.output     # [B, N, C']  the layer's output features
    capture.remove()                                              # the original processors are back

Queries and maps are computed when asked for, outside the processor, from the recorded inputs with the layer's
own modules: the processor adds no operation to the forward pass, so checkpoint recomputation replays exactly the
stock computation, and a caller that reads only `output` pays nothing more. Gradients flow through all three.

Layers are named like `unet.attn_processors` without the `.processor` suffix and ordered as the UNet runs them
(down blocks, mid block, up blocks): SD-1.5 has 16 — 6 down, 1 mid, 9 up, at 64², 32², 16², 8² latents for 512²
images. A selection item is an index into that order (negative counts from the end) or an fnmatch pattern.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._wrapped_processors import SUFFIX as _SUFFIX
from ._wrapped_processors import WrappingProcessor, install, restore

CROSS_ATTENTION = "attn2"


def _block_rank(name: str) -> tuple[int, int, str]:
    """Execution order of a UNet layer name: down blocks, mid block, up blocks (attn_processors lists up before mid)."""
    m = re.match(r"(down_blocks|mid_block|up_blocks)\.?(\d*)", name)
    if m is None:
        return 3, 0, name
    kind = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[m.group(1)]
    return kind, int(m.group(2) or 0), name


def cross_attention_layers(unet: torch.nn.Module) -> list[str]:
    """Names of the UNet's cross-attention layers (`...attn2`), in the order the UNet runs them."""
    processors = getattr(unet, "attn_processors", None)
    if processors is None:
        raise TypeError(f"unet must be a diffusers model with attention processors, got {type(unet).__name__}")
    names = [k[: -len(_SUFFIX)] for k in processors if k.endswith(f"{CROSS_ATTENTION}{_SUFFIX}")]
    # numeric order within a block kind, then the name (attentions.N.transformer_blocks.M inside a block)
    return sorted(names, key=lambda n: (_block_rank(n)[:2], _natural(n)))


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def select_layers(names: Sequence[str], selection: Sequence[int | str]) -> list[str]:
    """The layers `selection` names (indices into `names` or fnmatch patterns), in `names`' order, each once.

    Raises ValueError naming the item when an index is out of range or a pattern matches no layer, or when the
    selection is empty.
    """
    if isinstance(selection, (str, int)):
        selection = [selection]
    if not selection:
        raise ValueError("layer selection is empty: give layer indices or name patterns")
    chosen: set[str] = set()
    for item in selection:
        if isinstance(item, bool):
            raise ValueError(f"layer selection item {item!r}: expected an index or a name pattern")
        if isinstance(item, int) or (isinstance(item, str) and re.fullmatch(r"-?\d+", item.strip())):
            i = int(item)
            if not -len(names) <= i < len(names):
                raise ValueError(f"layer index {i} is out of range: the UNet has {len(names)} cross-attention "
                                 f"layers (0..{len(names) - 1})")
            chosen.add(names[i])
        elif isinstance(item, str):
            hits = [n for n in names if fnmatch.fnmatchcase(n, item)]
            if not hits:
                raise ValueError(f"layer pattern {item!r} names no cross-attention layer (they are e.g. "
                                 f"{names[0] if names else 'none'})")
            chosen.update(hits)
        else:
            raise ValueError(f"layer selection item {item!r}: expected an index or a name pattern")
    return [n for n in names if n in chosen]


@dataclass
class LayerFeatures:
    """One processor call of one layer: its inputs, the output, and queries/maps recomputed on demand."""

    attn: torch.nn.Module  # the diffusers Attention module
    hidden_states: torch.Tensor  # [B, N, C_in], the processor's input
    context: torch.Tensor  # [B, S, D], encoder_hidden_states as given to the processor
    attention_mask: torch.Tensor | None
    output: torch.Tensor  # [B, N, C_out], what the processor returned

    def query(self) -> torch.Tensor:
        """Queries with heads concatenated, [B, N, heads·head_dim]."""
        return self.attn.to_q(self.hidden_states)

    def key(self) -> torch.Tensor:
        context = self.context
        if self.attn.norm_cross:
            context = self.attn.norm_encoder_hidden_states(context)
        return self.attn.to_k(context)

    def maps(self, query: torch.Tensor | None = None) -> torch.Tensor:
        """Attention probabilities [B, heads, N, S] as the layer's softmax computes them (its scale, mask, upcast)."""
        attn = self.attn
        q = self.query() if query is None else query
        b, n = q.shape[:2]
        mask = self.attention_mask
        if mask is not None:
            mask = attn.prepare_attention_mask(mask, self.context.shape[1], b)
        probs = attn.get_attention_scores(attn.head_to_batch_dim(q), attn.head_to_batch_dim(self.key()), mask)
        return probs.view(b, attn.heads, n, -1)

    @property
    def num_positions(self) -> int:
        return int(self.hidden_states.shape[1])


class CaptureProcessor(WrappingProcessor):
    """Calls the processor it wraps unchanged; while its capture is recording, keeps that call's inputs and output."""

    def __init__(self, inner: Any, name: str, capture: UNetFeatureCapture) -> None:
        super().__init__(inner)
        self.name = name
        self.capture = capture

    def call(self, attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
             attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> torch.Tensor:
        out = super().call(attn, hidden_states, encoder_hidden_states, attention_mask, kwargs)
        store = self.capture._store
        # checkpoint recomputation during backward calls the processor again: nothing is recorded then
        if store is not None and encoder_hidden_states is not None:
            store[self.name] = LayerFeatures(attn, hidden_states, encoder_hidden_states, attention_mask, out)
        return out


def _check_capturable(name: str, attn: torch.nn.Module) -> None:
    """The recomputation of queries assumes the plain cross-attention layout SD-1.5's attn2 layers have."""
    for attr in ("spatial_norm", "group_norm", "norm_q", "norm_k"):
        if getattr(attn, attr, None) is not None:
            raise ValueError(f"layer {name}: cannot capture an attention layer with {attr}")
    if getattr(attn, "residual_connection", False) or getattr(attn, "rescale_output_factor", 1.0) != 1.0:
        raise ValueError(f"layer {name}: cannot capture an attention layer with a residual or rescaled output")


class UNetFeatureCapture:
    """Installs `CaptureProcessor`s on the selected cross-attention layers of `unet`; `remove()` restores them."""

    def __init__(self, unet: torch.nn.Module, layers: Sequence[int | str] = ("*",)) -> None:
        self.unet = unet
        self.all_layers = cross_attention_layers(unet)
        if not self.all_layers:
            raise ValueError("unet has no cross-attention (attn2) layers to capture")
        self.layers = select_layers(self.all_layers, layers)
        modules = dict(unet.named_modules())
        for name in self.layers:
            _check_capturable(name, modules[name])
        self._store: dict[str, LayerFeatures] | None = None
        self._original = install(unet, self.layers, lambda inner, name: CaptureProcessor(inner, name, self),
                                 CaptureProcessor, "a feature capture")
        self.installed = True

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, LayerFeatures]]:
        """Record the selected layers' features of the forward passes run inside; yields {layer name: features}."""
        if not self.installed:
            raise RuntimeError("this feature capture was removed")
        if self._store is not None:
            raise RuntimeError("a recording is already open")
        store: dict[str, LayerFeatures] = {}
        self._store = store
        try:
            yield store
        finally:
            self._store = None

    def remove(self) -> None:
        """Put back the processors found at installation."""
        if self.installed:
            restore(self.unet, self.layers, self._original)
            self.installed = False

    def __enter__(self) -> UNetFeatureCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

"""Attention processors that wrap the ones a diffusers UNet already has: one call signature, one way in and out.

`RegionalProcessor` (regional attention) and `CaptureProcessor` (feature capture) each change or watch one call
and then run the processor they replaced, so whatever attention implementation the UNet had keeps running.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

SUFFIX = ".processor"  # a layer's key in `unet.attn_processors` is its module name plus this


class WrappingProcessor:
    """Takes the arguments diffusers passes an attention processor and hands them to `call`, which by default runs
    the wrapped processor unchanged; subclasses override `call` to change its mask or keep what it saw."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if temb is not None:  # passed on only when given: not every processor takes it
            kwargs["temb"] = temb
        return self.call(attn, hidden_states, encoder_hidden_states, attention_mask, kwargs)

    def call(self, attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
             attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> torch.Tensor:
        return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask, **kwargs)


def install(unet: torch.nn.Module, layers: Sequence[str], wrap: Callable[[Any, str], WrappingProcessor],
            kind: type, what: str) -> dict[str, Any]:
    """Replace the processor of each of `layers` by `wrap(processor, layer)`; refuses a layer that already has a
    `kind` processor (`what`, for the message). Returns every processor found, for `restore`."""
    original = dict(unet.attn_processors)
    procs = dict(original)
    for name in layers:
        key = name + SUFFIX
        if isinstance(procs[key], kind):
            raise ValueError(f"layer {name} already has {what} installed")
        procs[key] = wrap(procs[key], name)
    unet.set_attn_processor(procs)
    return original


def restore(unet: torch.nn.Module, layers: Sequence[str], original: dict[str, Any]) -> None:
    """Put back the processors `install` found on `layers`, leaving the other layers' as they are now."""
    current = dict(unet.attn_processors)
    for name in layers:
        current[name + SUFFIX] = original[name + SUFFIX]
    unet.set_attn_processor(current)

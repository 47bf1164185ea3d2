"""Gradients for kernel tests, where only some inputs require grad."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def input_grads(
    out: torch.Tensor, inputs: Sequence[torch.Tensor], weight: torch.Tensor | None = None
) -> list[torch.Tensor | None]:
    """Gradients of Σ weight·out w.r.t. each input that requires grad, None for the others (and for empty outputs)."""
    live = [x for x in inputs if x.requires_grad]
    if not live or out.numel() == 0:
        return [None] * len(inputs)
    loss = out.sum() if weight is None else (out * weight).sum()
    got = iter(torch.autograd.grad(loss, live))
    return [next(got) if x.requires_grad else None for x in inputs]

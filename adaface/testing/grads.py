"""Gradients for kernel tests, where only some inputs require grad."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .tolerances import assert_close


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


def assert_grads_close(
    names: Sequence[str],
    grads: Sequence[torch.Tensor | None],
    ref_grads: Sequence[torch.Tensor | None],
    lowp_grads: Sequence[torch.Tensor | None],
    *,
    dtype: torch.dtype,
    atol: float | None = None,
) -> None:
    """Each input's gradient against the fp32 reference's (`assert_close`; `lowp_grads`: the reference's in the
    inputs' fp16/bf16 dtype, or Nones): None exactly where the reference has none, else `dtype` and its shape."""
    for name, g, r, lp in zip(names, grads, ref_grads, lowp_grads):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == dtype and g.shape == r.shape, name
        assert_close(g, r, lp, name=f"grad {name}", atol=atol)

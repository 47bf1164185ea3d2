"""Compositional delta loss (paper eq. 4–6): 1 − cos between two orthogonally-subtracted feature deltas.

Per row of the last dimension C:
    Δs = ortho(subj_comp, subj_single),  Δc = ortho(cls_comp, cls_single)
    loss_row = 1 − cos(Δs, Δc)       (cosine as torch.nn.functional.cosine_similarity, eps 1e-8)
with ortho(a, b) = a − (a·b)/(b·b + eps)·b. Losses are returned in fp32.

Zero deltas: where a composition feature equals its single one exactly or is all zero (subj_comp == subj_single
or subj_comp == 0, likewise for the class, over the whole row), the delta is zero and has no direction: what ortho
leaves is eps-sized rounding noise that backends resolve differently, with gradients ~1/eps. Such a row's loss is
defined as 1 (cos = 0, as for unrelated deltas) with zero gradient, on every backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaface.kernels._runtime import COSINE_EPS

from ._backend import resolve_backend
from ._checks import check_eps, check_features, check_same, check_tensor
from .ortho import ortho_subtract_reference

_OP = "delta_cosine_loss"
REDUCTIONS = ("mean", "sum", "none")


def reduce_rows(loss_rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss_rows.mean() if loss_rows.numel() else loss_rows.sum()
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows


def delta_cosine_loss_reference(
    subj_single: torch.Tensor,
    subj_comp: torch.Tensor,
    cls_single: torch.Tensor,
    cls_comp: torch.Tensor,
    *,
    eps: float = 1e-6,
    reduction: str = "mean",
    upcast: bool = True,
) -> torch.Tensor:
    """Plain PyTorch. `upcast=True` computes in fp32; `upcast=False` in the inputs' dtype."""
    zero = zero_delta_rows(subj_single, subj_comp, cls_single, cls_comp)
    if upcast:  # upcast the inputs, not the deltas: ortho's result in fp16/bf16 would round the small deltas
        subj_single, subj_comp, cls_single, cls_comp = (
            t.float() for t in (subj_single, subj_comp, cls_single, cls_comp)
        )
    delta_s = ortho_subtract_reference(subj_comp, subj_single, eps, upcast=upcast)
    delta_c = ortho_subtract_reference(cls_comp, cls_single, eps, upcast=upcast)
    loss_rows = (1 - F.cosine_similarity(delta_s, delta_c, dim=-1, eps=COSINE_EPS)).float()
    return reduce_rows(with_zero_deltas(loss_rows, zero), reduction)


def zero_delta_rows(subj_single: torch.Tensor, subj_comp: torch.Tensor, cls_single: torch.Tensor,
                    cls_comp: torch.Tensor) -> torch.Tensor:
    """[...] bool: rows where the subject's or the class's composition delta is exactly zero (the composition
    feature equals the single one, or is zero: ortho of either is 0 up to eps-sized rounding)."""
    subject = (subj_comp == subj_single).all(-1) | (subj_comp == 0).all(-1)
    cls = (cls_comp == cls_single).all(-1) | (cls_comp == 0).all(-1)
    return subject | cls


def with_zero_deltas(loss_rows: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The documented value of a zero-delta row: 1, with no gradient (torch.where routes none to it)."""
    return torch.where(zero, torch.ones_like(loss_rows), loss_rows)


def delta_cosine_loss(
    subj_single: torch.Tensor,
    subj_comp: torch.Tensor,
    cls_single: torch.Tensor,
    cls_comp: torch.Tensor,
    *,
    eps: float = 1e-6,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """`1 − cos(ortho(subj_comp, subj_single), ortho(cls_comp, cls_single))` per row of `[..., C]` inputs.

    `reduction`: "mean" (scalar), "sum" (scalar) or "none" (shape `[...]`); fp32 result. Gradients flow to
    every input that requires grad (detach the class side yourself when it is the teacher).
    """
    named = {"subj_single": subj_single, "subj_comp": subj_comp, "cls_single": cls_single, "cls_comp": cls_comp}
    for name, t in named.items():
        check_tensor(_OP, name, t, min_ndim=1, layout="[..., C]")
    check_same(_OP, named)
    check_features(_OP, "subj_single", subj_single)
    check_eps(_OP, eps)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{_OP}: `reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    which = resolve_backend(backend, subj_single.device, _OP, supports=("torch", "triton", "cuda", "cpp"))
    if which == "torch":
        return delta_cosine_loss_reference(subj_single, subj_comp, cls_single, cls_comp, eps=eps, reduction=reduction)
    if which == "triton":
        from adaface.kernels.delta_cosine import delta_cosine_rows_triton as rows_kernel
    else:  # "cuda" / "cpp"
        from ._extension import delta_cosine_rows_ext as rows_kernel
    rows = rows_kernel(subj_single, subj_comp, cls_single, cls_comp, float(eps))
    return reduce_rows(with_zero_deltas(rows, zero_delta_rows(subj_single, subj_comp, cls_single, cls_comp)),
                       reduction)

"""Orthogonal subtraction (paper eq. 5–6): the part of `a` orthogonal to `b`, over the last dimension.

Edge case: where b·b + eps is 0 (a zero row of `b` with eps = 0) the coefficient is 0, so the result is `a` (the
part of `a` orthogonal to the zero vector), with finite gradients, on every backend.
"""

from __future__ import annotations

import torch

from ._backend import resolve_backend
from ._checks import check_eps, check_features, check_same, check_tensor

_OP = "ortho_subtract"


def ortho_subtract_reference(
    a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6, *, upcast: bool = True
) -> torch.Tensor:
    """Plain PyTorch: a − (a·b)/(b·b + eps)·b, returned in a's dtype.

    `upcast=True` computes in fp32; `upcast=False` computes in the inputs' dtype, which is how tests
    measure PyTorch's own error in fp16/bf16.
    """
    a_c, b_c = (a.float(), b.float()) if upcast else (a, b)
    denom = (b_c * b_c).sum(-1, keepdim=True) + eps
    # denom is 0 only for b = 0 with eps = 0, where a·b is 0 too: dividing by 1 there gives coefficient 0, not NaN
    coef = (a_c * b_c).sum(-1, keepdim=True) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return (a_c - coef * b_c).to(a.dtype)


def ortho_subtract(a: torch.Tensor, b: torch.Tensor, *, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """`a − (a·b)/(b·b + eps)·b` over the last dimension; `a` and `b` of one shape `[..., C]`."""
    check_tensor(_OP, "a", a, min_ndim=1, layout="[..., C]")
    check_tensor(_OP, "b", b, min_ndim=1, layout="[..., C]")
    check_same(_OP, {"a": a, "b": b})
    check_features(_OP, "a", a)
    check_eps(_OP, eps)
    which = resolve_backend(backend, a.device, _OP, supports=("torch", "triton"))
    if which == "triton":
        from adaface.kernels.ortho_subtract import ortho_subtract_triton

        return ortho_subtract_triton(a, b, float(eps))
    return ortho_subtract_reference(a, b, eps)

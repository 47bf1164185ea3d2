"""Input validation shared by the public ops: errors name the argument and what was expected."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(
    op: str,
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    min_ndim: int | None = None,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    layout: str | None = None,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    where = f" ({layout})" if layout else ""
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: `{name}` must have {ndim} dimensions{where}, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(
            f"{op}: `{name}` must have at least {min_ndim} dimension(s){where}, got shape {tuple(t.shape)}"
        )
    if dtypes and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{op}: `{name}` must have dtype in ({names}), got {t.dtype}")
    return t


def check_same(op: str, named: dict[str, torch.Tensor], *, shape: bool = True) -> None:
    """All tensors share device and dtype (and shape, when asked)."""
    items = list(named.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{op}: `{name}` is on {t.device} but `{first_name}` is on {first.device}")
        if t.dtype != first.dtype:
            raise ValueError(f"{op}: `{name}` has dtype {t.dtype} but `{first_name}` has {first.dtype}")
        if shape and t.shape != first.shape:
            raise ValueError(
                f"{op}: `{name}` must have the shape of `{first_name}` {tuple(first.shape)}, "
                f"got {tuple(t.shape)}"
            )


def check_eps(op: str, eps: float) -> None:
    """A finite number >= 0 (an infinite eps would silently turn the orthogonal subtraction off)."""
    ok = isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps >= 0
    if not ok:
        raise ValueError(f"{op}: `eps` must be a finite non-negative number, got {eps!r}")


def check_features(op: str, name: str, t: torch.Tensor, dim: int = -1, what: str = "features (C)") -> None:
    """A dimension the op reduces over must not be empty: a loss over nothing has no meaningful value."""
    if t.shape[dim] == 0:
        raise ValueError(f"{op}: `{name}` has no {what}: dimension {dim} of shape {tuple(t.shape)} is 0")


def check_scale(op: str, scale: object, *, allow_none: bool = False) -> None:
    """A finite int or float (not a bool, which is an int to Python), or None where the op has a default."""
    if scale is None and allow_none:
        return
    ok = isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale)
    if not ok:
        expected = "a finite number or None" if allow_none else "a finite number"
        raise ValueError(f"{op}: `scale` must be {expected}, got {scale!r}")


def check_row_weights(op: str, name: str, weights: torch.Tensor) -> None:
    """Float row weights must be finite and non-negative.

    On the CPU the values are read at once (a one-line error naming the first bad value). On an accelerator the
    check is a device-side assertion, so the training step keeps running without a host sync; it fails at the
    next synchronisation. Tensors without values (`meta`, the memory estimates) and torch.compile tracing (a
    data-dependent check would break the graph) are not checked."""
    if weights.dtype == torch.bool or weights.device.type == "meta" or torch.compiler.is_compiling():
        return
    good = torch.isfinite(weights) & (weights >= 0)
    message = f"{op}: `{name}` must hold finite non-negative row weights"
    if weights.device.type != "cpu":
        torch._assert_async(good.all(), message)
        return
    if not bool(good.all()):
        bad = weights[~good][0].item()
        raise ValueError(f"{message}, got {bad!r}")

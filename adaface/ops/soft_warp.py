"""Elastic face-preserving loss (paper eq. 7–8): soft-warp the composition features onto the single ones.

    A = softmax(scale · q_subj q_compᵀ) over M        (scale 1: the paper's logits are unscaled on purpose)
    warped = A · feat_comp
    loss = masked mean over rows n of (1 − cos(warped[n], feat_subj[n]))
This is attention with q = q_subj, k = q_comp, v = feat_comp followed by a row cosine; the kernels never
build the N×M matrix. The loss is returned in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaface.kernels._runtime import COSINE_EPS

from ._backend import resolve_backend
from ._checks import check_features, check_row_weights, check_scale, check_tensor

_OP = "soft_warp_loss"


def _mask_weights(mask: torch.Tensor | None, B: int, N: int, device: torch.device) -> torch.Tensor:
    """[B, N] fp32 row weights (1 = row counts)."""
    if mask is None:
        return torch.ones(B, N, device=device, dtype=torch.float32)
    return mask.to(torch.float32)


def masked_row_mean(loss_rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ w·loss / Σ w (a weighted mean, so a soft mask resized to a layer's resolution works too), and exactly
    0 (with a valid graph) when no row is selected."""
    total = weights.sum()
    return (loss_rows * weights).sum() / torch.where(total > 0, total, torch.ones_like(total))


def soft_warp_rows_reference(
    q_subj: torch.Tensor,
    q_comp: torch.Tensor,
    feat_subj: torch.Tensor,
    feat_comp: torch.Tensor,
    *,
    scale: float = 1.0,
    upcast: bool = True,
) -> torch.Tensor:
    """Plain PyTorch per-row losses [B, N] fp32 (every row): materialises the [B, N, M] matrix.

    `upcast=False` computes in the inputs' dtype."""
    ct = torch.float32 if upcast else q_subj.dtype
    logits = torch.einsum("bnd,bmd->bnm", q_subj.to(ct), q_comp.to(ct)) * scale
    attn = torch.softmax(logits.float(), dim=-1).to(ct)
    warped = torch.einsum("bnm,bmc->bnc", attn, feat_comp.to(ct))
    return (1 - F.cosine_similarity(warped, feat_subj.to(ct), dim=-1, eps=COSINE_EPS)).float()


def soft_warp_loss_reference(
    q_subj: torch.Tensor,
    q_comp: torch.Tensor,
    feat_subj: torch.Tensor,
    feat_comp: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    upcast: bool = True,
) -> torch.Tensor:
    """Plain PyTorch: the masked mean of `soft_warp_rows_reference`. `upcast=False` computes in the inputs' dtype."""
    loss_rows = soft_warp_rows_reference(q_subj, q_comp, feat_subj, feat_comp, scale=scale, upcast=upcast)
    B, N = q_subj.shape[:2]
    return masked_row_mean(loss_rows, _mask_weights(mask, B, N, q_subj.device))


def _validate(q_subj, q_comp, feat_subj, feat_comp, mask, scale) -> None:
    check_tensor(_OP, "q_subj", q_subj, ndim=3, layout="[B, N, Dq]")
    check_tensor(_OP, "q_comp", q_comp, ndim=3, layout="[B, M, Dq]")
    check_tensor(_OP, "feat_subj", feat_subj, ndim=3, layout="[B, N, C]")
    check_tensor(_OP, "feat_comp", feat_comp, ndim=3, layout="[B, M, C]")
    B, N, Dq = q_subj.shape
    M = q_comp.shape[1]
    C = feat_subj.shape[2]
    # the softmax runs over the M keys and the cosine over the C features: neither may be empty
    check_features(_OP, "q_comp", q_comp, 1, "keys (M)")
    check_features(_OP, "q_subj", q_subj, 2, "query features (Dq)")
    check_features(_OP, "feat_subj", feat_subj, 2, "features (C)")
    expected = {
        "q_comp": (q_comp, (B, M, Dq), "[B, M, Dq]"),
        "feat_subj": (feat_subj, (B, N, C), "[B, N, C]"),
        "feat_comp": (feat_comp, (B, M, C), "[B, M, C]"),
    }
    for name, (t, shape, layout) in expected.items():
        if t.dtype != q_subj.dtype:
            raise ValueError(f"{_OP}: `{name}` has dtype {t.dtype} but `q_subj` has {q_subj.dtype}")
        if t.device != q_subj.device:
            raise ValueError(f"{_OP}: `{name}` is on {t.device} but `q_subj` is on {q_subj.device}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{_OP}: `{name}` must have shape {layout} = {shape}, got {tuple(t.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{_OP}: `mask` must be a tensor [B, N] or None, got {type(mask).__name__}")
        if tuple(mask.shape) != (B, N):
            raise ValueError(f"{_OP}: `mask` must have shape [B, N] = {(B, N)}, got {tuple(mask.shape)}")
        if not (mask.dtype == torch.bool or mask.is_floating_point()):
            raise ValueError(f"{_OP}: `mask` must be bool or float (non-negative row weights), got {mask.dtype}")
        if mask.device != q_subj.device:
            raise ValueError(f"{_OP}: `mask` is on {mask.device} but `q_subj` is on {q_subj.device}")
        check_row_weights(_OP, "mask", mask)
    check_scale(_OP, scale)


PRECISIONS = ("auto", "ieee", "tf32", "bf16", "fp16")


def resolve_precision(precision: str, dtype: torch.dtype, device: torch.device) -> str:
    """The matmul precision of the Triton kernels: `precision` itself unless "auto". "auto": fp16/bf16 inputs in
    their own dtype; fp32 inputs on tensor cores on a GPU — TF32 where `torch.backends.cuda.matmul.allow_tf32`
    is set, else the autocast dtype (`torch.get_autocast_dtype("cuda")`) — and exact fp32 ("ieee") elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"{_OP}: `precision` must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if dtype in (torch.float16, torch.bfloat16):
        return "fp16" if dtype == torch.float16 else "bf16"
    if device.type != "cuda":
        return "ieee"
    if torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp16" if torch.get_autocast_dtype("cuda") == torch.float16 else "bf16"


def soft_warp_loss(
    q_subj: torch.Tensor,
    q_comp: torch.Tensor,
    feat_subj: torch.Tensor,
    feat_comp: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    backend: str = "auto",
    precision: str = "auto",
) -> torch.Tensor:
    """Masked mean of `1 − cos(softmax(scale·q_subj q_compᵀ) feat_comp, feat_subj)`; scalar fp32.

    q_subj [B, N, Dq], q_comp [B, M, Dq], feat_subj [B, N, C], feat_comp [B, M, C], mask [B, N] (bool or
    non-negative float row weights, e.g. a soft face mask resized to the layer; None = every row). The loss is
    the weighted mean over rows; an all-zero mask gives 0 with a valid graph.
    `precision` (Triton backend; `resolve_precision`): the matmul operands' precision, "bf16"/"fp16" (fp32
    accumulation), "tf32", "ieee" (exact fp32) or "auto"; the other backends compute in fp32 or the inputs'
    dtype and accept "auto" and "ieee" only.
    """
    _validate(q_subj, q_comp, feat_subj, feat_comp, mask, scale)
    which = resolve_backend(backend, q_subj.device, _OP, supports=("torch", "triton", "cuda", "cpp"))
    chosen = resolve_precision(precision, q_subj.dtype, q_subj.device)
    if which != "triton" and precision not in ("auto", "ieee"):
        raise ValueError(f"{_OP}: `precision` {precision!r} needs backend 'triton' (backend {which!r} computes in "
                         "fp32 or the inputs' dtype: use 'auto' or 'ieee')")
    if which == "torch":
        return soft_warp_loss_reference(q_subj, q_comp, feat_subj, feat_comp, mask, scale=scale)
    if which == "triton":
        from adaface.kernels.soft_warp import soft_warp_rows_triton as rows_kernel
    else:  # "cuda" / "cpp"
        from ._extension import soft_warp_rows_ext as rows_kernel
    # the kernels return per-row losses; the (weighted) mean over rows is the same for every backend
    weights = _mask_weights(mask, *q_subj.shape[:2], q_subj.device)
    if which == "triton":
        rows = rows_kernel(q_subj, q_comp, feat_subj, feat_comp, weights, float(scale), chosen)
    else:
        rows = rows_kernel(q_subj, q_comp, feat_subj, feat_comp, weights, float(scale))
    return masked_row_mean(rows, weights)

"""Inputs for the soft-warp loss, shared by tests/test_soft_warp.py and bench/test_bench_soft_warp.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaface.kernels._runtime import COSINE_EPS
from adaface.ops.soft_warp import _mask_weights, masked_row_mean

MASK_KINDS = ("none", "bool", "float", "zeros", "ones")


def make_mask(kind: str, B: int, N: int, device: torch.device, generator: torch.Generator | None = None,
              p: float = 0.5) -> torch.Tensor | None:
    """None, a random bool mask (each row kept with probability p), the same as 0/1 floats, all 0, all 1."""
    if kind == "none":
        return None
    if kind == "zeros":
        return torch.zeros(B, N, dtype=torch.bool, device=device)
    if kind == "ones":
        return torch.ones(B, N, dtype=torch.bool, device=device)
    sel = (torch.rand(B, N, generator=generator) < p).to(device)
    if kind == "bool":
        return sel
    if kind == "float":
        return sel.to(torch.float32)
    raise ValueError(f"unknown mask kind {kind!r}")


def make_inputs(
    B: int, N: int, M: int, Dq: int, C: int, *, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu", seed: int = 0, huge_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q_subj [B,N,Dq], q_comp [B,M,Dq], feat_subj [B,N,C], feat_comp [B,M,C]).

    Default: unit-variance features and q scaled so the unscaled logits have unit variance.
    huge_logits: q entries of size 60/Dq^¼ so the unscaled logits have std ~3.6e3 and reach ~1e4 (the paper's
    unscaled Q·Qᵀ at its worst), and the columns are noisy copies of a few prototypes, so rows keep a few
    near-tied columns (a softmax that is not fully one-hot: the gradients w.r.t. q are not all ~0).
    """
    g = torch.Generator().manual_seed(seed)
    if huge_logits:
        amp = 60.0 / Dq**0.25
        q_subj = torch.randn(B, N, Dq, generator=g) * amp
        protos = torch.randn(B, 7, Dq, generator=g) * amp
        pick = torch.randint(0, 7, (M,), generator=g)
        q_comp = protos[:, pick] + 0.01 * torch.randn(B, M, Dq, generator=g)
    else:
        amp = Dq ** -0.25
        q_subj = torch.randn(B, N, Dq, generator=g) * amp
        q_comp = torch.randn(B, M, Dq, generator=g) * amp
    feat_subj = torch.randn(B, N, C, generator=g)
    feat_comp = torch.randn(B, M, C, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q_subj, q_comp, feat_subj, feat_comp))  # type: ignore


def sdpa_soft_warp_loss(q_subj, q_comp, feat_subj, feat_comp, mask=None, *, scale: float = 1.0) -> torch.Tensor:
    """The strongest PyTorch composition: scaled_dot_product_attention on the selected rows, then the cosine.

    SDPA takes q/k of one head dim and v of another, as [B, heads=1, L, D]. With a mask the selected rows of
    each batch item are gathered with a boolean index (a host sync per item, as an eager composition must) and
    attend to that item's columns only.
    """
    B, N = q_subj.shape[:2]
    weights = _mask_weights(mask, B, N, q_subj.device)
    if mask is None:
        warped = F.scaled_dot_product_attention(q_subj.unsqueeze(1), q_comp.unsqueeze(1), feat_comp.unsqueeze(1),
                                                scale=scale).squeeze(1)
        rows = 1 - F.cosine_similarity(warped.float(), feat_subj.float(), dim=-1, eps=COSINE_EPS)
        return masked_row_mean(rows, weights)
    total = q_subj.new_zeros((), dtype=torch.float32)
    for b in range(B):
        sel = weights[b] != 0
        q = q_subj[b][sel]
        warped = F.scaled_dot_product_attention(q[None, None], q_comp[b][None, None], feat_comp[b][None, None],
                                                scale=scale)[0, 0]
        rows = 1 - F.cosine_similarity(warped.float(), feat_subj[b][sel].float(), dim=-1, eps=COSINE_EPS)
        total = total + (rows * weights[b][sel]).sum()
    return total / torch.clamp(weights.sum(), min=1.0)


def soft_warp_flops(B: int, R: int, M: int, Dq: int, C: int, backward: bool) -> float:
    """Useful matmul flops for R selected rows: forward S and PV; backward adds dP, dV, dq_subj, dq_comp."""
    fwd = 2.0 * B * R * M * (Dq + C)
    if not backward:
        return fwd
    return fwd + 2.0 * B * R * M * (2 * C + 2 * Dq)

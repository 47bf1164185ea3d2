"""Stage-2 losses (paper §2.3–2.4) on captured UNet features and prompt embeddings.

- `delta_loss`: the compositional delta loss of eq. 4 for one feature kind, per row (a spatial position or a
  token, the last dimension as the vector), `1 − cos(ortho(subj_comp, subj_single), ortho(cls_comp, cls_single))`
  (eq. 5–6) by the fused `adaface.ops.delta_cosine_loss`, then a weighted mean over rows. The class side is the
  teacher and is detached. Rows whose subject or class delta is exactly zero (the two prompts gave the very same
  feature, as the causal prefix of the prompt embeddings does) are masked out: their cosine is undefined, and
  counting them would add a constant 1 without gradient.
- `map_delta_loss`: eq. 4 on the attention maps of the subject tokens: per head, the attention a layer puts on
  the subject's tokens (summed over its 16 slots, or over the class word's tokens on the class side) is one
  spatial map, and the delta and cosine are taken over the spatial positions, one row per head. A composition
  that only rescales the subject's attention spatially, the same way as the class's, gives deltas of the same
  direction and a loss of 0; a subject whose map ignores the composition gives unrelated deltas.
- `face_preserve_loss`: the elastic face-preserving loss of eq. 7–8 by the fused `adaface.ops.soft_warp_loss`:
  softmax of the *unscaled* Q_subj·Q_compᵀ (paper footnote 2) warps the subject-composition features onto the
  subject-single ones; 1 − cos is averaged over the face mask, resized to the layer as soft row weights.
- The normalisations before them: non-affine batch norm on the queries (per channel over the two subject
  branches' positions), non-affine layer norm on the output features; average pooling of maps larger than a side
  (`pool_above`, kernel 4, stride 2); and `scale_grad`, which leaves a value unchanged and multiplies its gradient,
  for the reduced gradient of the subject-single branch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from adaface import ops


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """`x` in the forward pass; its gradient multiplied by `factor` in the backward pass (0: detached)."""
    if factor == 1.0 or not x.requires_grad:
        return x
    if factor == 0.0:
        return x.detach()
    return _ScaleGrad.apply(x, float(factor))


def layer_hw(num_positions: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer with `num_positions` positions in a UNet run on latents of `latent_hw` (powers of 2 down)."""
    h, w = latent_hw
    factor = 1
    while (h // factor) * (w // factor) > num_positions and factor < max(h, w):
        factor *= 2
    hh, ww = math.ceil(h / factor), math.ceil(w / factor)
    if hh * ww != num_positions:
        raise ValueError(f"a layer with {num_positions} positions does not tile latents of {h}x{w}")
    return hh, ww


def pool_rows(x: torch.Tensor, hw: tuple[int, int], pool_above: int, kernel: int = 4,
              stride: int = 2) -> torch.Tensor:
    """[B, N, C] rows of an (h, w) map, average-pooled (kernel, stride) when min(h, w) > pool_above."""
    h, w = hw
    if min(h, w) <= pool_above:
        return x
    b, n, c = x.shape
    grid = x.transpose(1, 2).reshape(b, c, h, w)
    return F.avg_pool2d(grid, kernel, stride).flatten(2).transpose(1, 2)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """Non-affine layer norm over channels, in fp32."""
    return F.layer_norm(x.float(), x.shape[-1:])


def batch_norm_rows(*xs: torch.Tensor) -> list[torch.Tensor]:
    """Non-affine batch norm per channel over every row of all `xs` ([B, N, C] each), in fp32."""
    flat = torch.cat([x.float().reshape(-1, x.shape[-1]) for x in xs])
    normed = F.batch_norm(flat, None, None, training=True)
    sizes = [x.shape[0] * x.shape[1] for x in xs]
    return [p.view(x.shape) for p, x in zip(normed.split(sizes), xs)]


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ w·v / Σ w, and 0 with a valid graph when every weight is 0 (no host sync)."""
    total = weights.sum()
    return (values * weights).sum() / torch.where(total > 0, total, torch.ones_like(total))


def nonzero_delta_rows(single: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    """[...] bool: rows whose composition feature differs from the single one somewhere (a non-zero delta)."""
    return (single != comp).any(dim=-1)


def delta_loss(subj_single: torch.Tensor, subj_comp: torch.Tensor, cls_single: torch.Tensor,
               cls_comp: torch.Tensor, row_weights: torch.Tensor | None = None, *, subject_single_grad: float = 1.0,
               eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """Eq. 4 for one feature kind on [..., C] rows: weighted mean of the fused delta-cosine loss per row.

    `row_weights` [...] (default 1); rows with a zero subject or class delta get weight 0. The class side is
    detached; the subject-single side's gradient is multiplied by `subject_single_grad`.
    """
    cls_single, cls_comp = cls_single.detach(), cls_comp.detach()
    keep = nonzero_delta_rows(subj_single, subj_comp) & nonzero_delta_rows(cls_single, cls_comp)
    weights = keep.float() if row_weights is None else row_weights.float() * keep
    rows = ops.delta_cosine_loss(scale_grad(subj_single, subject_single_grad), subj_comp, cls_single, cls_comp,
                                 eps=eps, reduction="none", backend=backend)
    return weighted_mean(rows, weights)


def token_attention_maps(maps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, S] attention probabilities, [B, S] token weights (1 on the tokens) → [B, heads, N] fp32: per
    head, the attention on those tokens at each spatial position."""
    return torch.einsum("bhns,bs->bhn", maps, tokens.to(maps.dtype)).float()


def map_delta_loss(subj_single: torch.Tensor, subj_comp: torch.Tensor, cls_single: torch.Tensor,
                   cls_comp: torch.Tensor, hw: tuple[int, int], pool_above: int, *, subject_single_grad: float = 1.0,
                   eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """Eq. 4 on [B, heads, N] spatial attention maps (`token_attention_maps`) of one layer: each map pooled like
    the features (`pool_rows`), then `delta_loss` with one row per head and the positions as the vector."""
    def rows(x: torch.Tensor) -> torch.Tensor:
        return pool_rows(x.transpose(1, 2), hw, pool_above).transpose(1, 2).contiguous()

    return delta_loss(rows(subj_single), rows(subj_comp), rows(cls_single), rows(cls_comp),
                      subject_single_grad=subject_single_grad, eps=eps, backend=backend)


def face_preserve_loss(q_single: torch.Tensor, q_comp: torch.Tensor, feat_single: torch.Tensor,
                       feat_comp: torch.Tensor, mask: torch.Tensor | None, *, q_grad: float = 1.0,
                       feat_grad: float = 1.0, backend: str = "auto", precision: str = "auto") -> torch.Tensor:
    """Eq. 7–8 on one layer: [B, N, Dq] queries and [B, N, C] features of the subject-single / -composition
    branches, `mask` [B, N] soft row weights (the face); unscaled logits. `q_grad` / `feat_grad` multiply the
    gradient reaching the subject-single queries / features; `precision`: the kernels' matmul precision."""
    return ops.soft_warp_loss(scale_grad(q_single, q_grad), q_comp, scale_grad(feat_single, feat_grad), feat_comp,
                              mask, scale=1.0, backend=backend, precision=precision)


def mask_rows(masks: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """[B, 1, R, R] face masks in [0, 1] → [B, h·w] soft row weights at a layer's resolution (area average)."""
    return F.interpolate(masks.float(), size=hw, mode="area").flatten(1)


def layer_weight(name: str, weights: dict[str, float]) -> float:
    """The weight of a layer: the first matching fnmatch pattern of `weights`, else 1."""
    import fnmatch

    for pattern, w in weights.items():
        if fnmatch.fnmatchcase(name, pattern):
            return float(w)
    return 1.0


def layer_average(losses: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ w_l L_l / Σ w_l over layers with non-zero weight."""
    total = sum(weights)
    if not losses or total <= 0:
        raise ValueError("no layer with a positive weight to average over")
    return sum(w * loss for w, loss in zip(weights, losses)) / total

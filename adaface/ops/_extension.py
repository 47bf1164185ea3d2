"""The C++/CUDA backend of the losses: `torch.ops.adaface.*_ext_*` from the compiled extension `adaface._C`.

The ops' schemas and their CPU/CUDA kernels are registered in C++ (csrc/losses_cpu.cpp, csrc/losses_cuda.cu);
this module loads the extension (torch first, through `load_extension`), and adds what torch.compile and
autograd need: fake (meta) implementations of the four ops and the autograd links from each forward to its
backward. Importing it without the extension raises the build instructions of `_backend`.

Ops, named adaface::{op}_{backend}_{fwd|bwd} (rows = the input shape without the last dim):
    delta_cosine_ext_fwd(subj_single, subj_comp, cls_single, cls_comp, eps) -> (loss[rows], stats[R, 8])
    delta_cosine_ext_bwd(grad, subj_single, subj_comp, cls_single, cls_comp, stats, eps, needs) -> 4 grads
        (`needs` = which inputs need a gradient, 0/1 each)
    soft_warp_ext_fwd(q_subj, q_comp, feat_subj, feat_comp, weights, scale)
        -> (rows [B, N], warped [B, N, C], lse2 [B, N], order [B, N] int32, count [B] int32)
    soft_warp_ext_bwd(grad_rows, q_subj, q_comp, feat_subj, feat_comp, weights, warped, lse2, order, count, scale,
                      need_qs, need_qc, need_fs, need_fc) -> (d q_subj, d q_comp, d feat_subj, d feat_comp)
The soft-warp pair has the schema of the Triton pair: one saved state for every backend
(adaface.ops._soft_warp_autograd).
A gradient that is not needed comes back as an empty tensor (shape [0]) and is returned to autograd as None.
"""

from __future__ import annotations

import torch

from ._backend import load_extension
from ._soft_warp_autograd import register_soft_warp_autograd, soft_warp_fwd_fake

load_extension()  # registers the schemas and kernels of torch.ops.adaface.*_ext_* (raises with build hints)

DELTA_STATS = 8
_LIB = "adaface"


def _ops():
    return torch.ops.adaface


# ---------------------------------------------------------------------------------------------------------
# fake (meta) implementations: shapes and dtypes only, used by torch.compile / FakeTensor tracing


@torch.library.register_fake(f"{_LIB}::delta_cosine_ext_fwd")
def _delta_fwd_fake(subj_single, subj_comp, cls_single, cls_comp, eps):
    rows_shape = subj_single.shape[:-1]
    loss = subj_single.new_empty(rows_shape, dtype=torch.float32)
    return loss, subj_single.new_empty((loss.numel(), DELTA_STATS), dtype=torch.float32)


@torch.library.register_fake(f"{_LIB}::delta_cosine_ext_bwd")
def _delta_bwd_fake(grad, subj_single, subj_comp, cls_single, cls_comp, stats, eps, needs):
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format) if n else t.new_empty((0,))
        for t, n in zip((subj_single, subj_comp, cls_single, cls_comp), needs)
    )


torch.library.register_fake(f"{_LIB}::soft_warp_ext_fwd", soft_warp_fwd_fake)


@torch.library.register_fake(f"{_LIB}::soft_warp_ext_bwd")
def _soft_warp_bwd_fake(grad_rows, q_subj, q_comp, feat_subj, feat_comp, weights, warped, lse, order, count, scale,
                        need_qs, need_qc, need_fs, need_fc):
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format) if n else t.new_empty((0,))
        for t, n in zip((q_subj, q_comp, feat_subj, feat_comp), (need_qs, need_qc, need_fs, need_fc))
    )


# ---------------------------------------------------------------------------------------------------------
# autograd: forward op → backward op


def _delta_setup(ctx, inputs, output):
    subj_single, subj_comp, cls_single, cls_comp, eps = inputs
    _, stats = output
    ctx.save_for_backward(subj_single, subj_comp, cls_single, cls_comp, stats)
    ctx.eps = eps


def _delta_backward(ctx, grad_loss, _grad_stats):
    subj_single, subj_comp, cls_single, cls_comp, stats = ctx.saved_tensors
    needs = [int(bool(n)) for n in ctx.needs_input_grad[:4]]
    if not any(needs) or grad_loss is None:
        return None, None, None, None, None
    grads = _ops().delta_cosine_ext_bwd(
        grad_loss.contiguous(), subj_single, subj_comp, cls_single, cls_comp, stats, ctx.eps, needs
    )
    return (*(g if n else None for g, n in zip(grads, needs)), None)


torch.library.register_autograd(f"{_LIB}::delta_cosine_ext_fwd", _delta_backward, setup_context=_delta_setup)
register_soft_warp_autograd(f"{_LIB}::soft_warp_ext_fwd", _ops().soft_warp_ext_bwd)


# ---------------------------------------------------------------------------------------------------------
# entry points used by adaface.ops.delta_cosine / adaface.ops.soft_warp (inputs already validated)


def delta_cosine_rows_ext(
    subj_single: torch.Tensor, subj_comp: torch.Tensor, cls_single: torch.Tensor, cls_comp: torch.Tensor, eps: float
) -> torch.Tensor:
    """Per-row `1 − cos(ortho(subj_comp, subj_single), ortho(cls_comp, cls_single))`, shape `[...]`, fp32."""
    loss, _ = _ops().delta_cosine_ext_fwd(subj_single, subj_comp, cls_single, cls_comp, float(eps))
    return loss


def soft_warp_rows_ext(
    q_subj: torch.Tensor,
    q_comp: torch.Tensor,
    feat_subj: torch.Tensor,
    feat_comp: torch.Tensor,
    weights: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Per-row `1 − cos(softmax(scale·q_subj q_compᵀ) feat_comp, feat_subj)`, [B, N] fp32; 0 where weight is 0."""
    rows, *_ = _ops().soft_warp_ext_fwd(q_subj, q_comp, feat_subj, feat_comp, weights.float(), float(scale))
    return rows

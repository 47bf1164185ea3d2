"""The C++/CUDA backend of the losses: `torch.ops.adaface.*_ext` from the compiled extension `adaface._C`.

The ops' schemas and their CPU/CUDA kernels are registered in C++ (csrc/losses_cpu.cpp, csrc/losses_cuda.cu);
this module loads the extension (torch first, through `load_extension`), and adds what torch.compile and
autograd need: fake (meta) implementations of the four ops and `register_autograd` linking each forward to
its backward op. Importing it without the extension raises the build instructions of `_backend`.

Ops (rows = the input shape without the last dim; `needs` = which inputs need a gradient, 0/1 each):
    delta_cosine_fwd_ext(subj_single, subj_comp, cls_single, cls_comp, eps) -> (loss[rows], stats[R, 8])
    delta_cosine_bwd_ext(grad, subj_single, subj_comp, cls_single, cls_comp, stats, eps, needs) -> 4 grads
    soft_warp_fwd_ext(q_subj, q_comp, feat_subj, feat_comp, weights, scale) -> (rows[B,N], lse[B,N], warped[B,N,C])
    soft_warp_bwd_ext(grad_rows, q_subj, q_comp, feat_subj, feat_comp, weights, lse, warped, scale, needs)
        -> (d q_subj, d q_comp, d feat_subj, d feat_comp)
A gradient that is not needed comes back as an empty tensor (shape [0]) and is returned to autograd as None.
Test hooks of the CPU GEMM behind the soft-warp kernels (csrc/gemm_cpu.cpp), not part of the API:
    cpu_gemm_ext(a, b, c=None) -> c + a·b;  cpu_gemm_impl_ext(0 auto | 1 ATen) -> previous;  cpu_gemm_uses_avx512_ext()
"""

from __future__ import annotations

import torch

from ._backend import load_extension

load_extension()  # registers the schemas and kernels of torch.ops.adaface.*_ext (raises with build hints)

DELTA_STATS = 8
_LIB = "adaface"


def _ops():
    return torch.ops.adaface


# ---------------------------------------------------------------------------------------------------------
# fake (meta) implementations: shapes and dtypes only, used by torch.compile / FakeTensor tracing


@torch.library.register_fake(f"{_LIB}::delta_cosine_fwd_ext")
def _delta_fwd_fake(subj_single, subj_comp, cls_single, cls_comp, eps):
    rows_shape = subj_single.shape[:-1]
    loss = subj_single.new_empty(rows_shape, dtype=torch.float32)
    return loss, subj_single.new_empty((loss.numel(), DELTA_STATS), dtype=torch.float32)


@torch.library.register_fake(f"{_LIB}::delta_cosine_bwd_ext")
def _delta_bwd_fake(grad, subj_single, subj_comp, cls_single, cls_comp, stats, eps, needs):
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format) if n else t.new_empty((0,))
        for t, n in zip((subj_single, subj_comp, cls_single, cls_comp), needs)
    )


@torch.library.register_fake(f"{_LIB}::soft_warp_fwd_ext")
def _soft_warp_fwd_fake(q_subj, q_comp, feat_subj, feat_comp, weights, scale):
    B, N = q_subj.shape[:2]
    C = feat_subj.shape[2]
    rows = q_subj.new_empty((B, N), dtype=torch.float32)
    return rows, q_subj.new_empty((B, N), dtype=torch.float32), q_subj.new_empty((B, N, C), dtype=torch.float32)


@torch.library.register_fake(f"{_LIB}::soft_warp_bwd_ext")
def _soft_warp_bwd_fake(grad_rows, q_subj, q_comp, feat_subj, feat_comp, weights, lse, warped, scale, needs):
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format) if n else t.new_empty((0,))
        for t, n in zip((q_subj, q_comp, feat_subj, feat_comp), needs)
    )


# ---------------------------------------------------------------------------------------------------------
# autograd: forward op → backward op


def _needs(ctx, count: int) -> list[int]:
    return [int(bool(n)) for n in ctx.needs_input_grad[:count]]


def _delta_setup(ctx, inputs, output):
    subj_single, subj_comp, cls_single, cls_comp, eps = inputs
    _, stats = output
    ctx.save_for_backward(subj_single, subj_comp, cls_single, cls_comp, stats)
    ctx.eps = eps


def _delta_backward(ctx, grad_loss, _grad_stats):
    subj_single, subj_comp, cls_single, cls_comp, stats = ctx.saved_tensors
    needs = _needs(ctx, 4)
    if not any(needs) or grad_loss is None:
        return None, None, None, None, None
    grads = _ops().delta_cosine_bwd_ext(
        grad_loss.contiguous(), subj_single, subj_comp, cls_single, cls_comp, stats, ctx.eps, needs
    )
    return (*(g if n else None for g, n in zip(grads, needs)), None)


torch.library.register_autograd(f"{_LIB}::delta_cosine_fwd_ext", _delta_backward, setup_context=_delta_setup)


def _soft_warp_setup(ctx, inputs, output):
    q_subj, q_comp, feat_subj, feat_comp, weights, scale = inputs
    _, lse, warped = output
    ctx.save_for_backward(q_subj, q_comp, feat_subj, feat_comp, weights, lse, warped)
    ctx.scale = scale


def _soft_warp_backward(ctx, grad_rows, _grad_lse, _grad_warped):
    q_subj, q_comp, feat_subj, feat_comp, weights, lse, warped = ctx.saved_tensors
    needs = _needs(ctx, 4)
    if not any(needs) or grad_rows is None:
        return None, None, None, None, None, None
    grads = _ops().soft_warp_bwd_ext(
        grad_rows.contiguous(), q_subj, q_comp, feat_subj, feat_comp, weights, lse, warped, ctx.scale, needs
    )
    return (*(g if n else None for g, n in zip(grads, needs)), None, None)


torch.library.register_autograd(f"{_LIB}::soft_warp_fwd_ext", _soft_warp_backward, setup_context=_soft_warp_setup)


# ---------------------------------------------------------------------------------------------------------
# entry points used by adaface.ops.delta_cosine / adaface.ops.soft_warp (inputs already validated)


def delta_cosine_rows_ext(
    subj_single: torch.Tensor, subj_comp: torch.Tensor, cls_single: torch.Tensor, cls_comp: torch.Tensor, eps: float
) -> torch.Tensor:
    """Per-row `1 − cos(ortho(subj_comp, subj_single), ortho(cls_comp, cls_single))`, shape `[...]`, fp32."""
    loss, _ = _ops().delta_cosine_fwd_ext(subj_single, subj_comp, cls_single, cls_comp, float(eps))
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
    rows, _, _ = _ops().soft_warp_fwd_ext(q_subj, q_comp, feat_subj, feat_comp, weights.float(), float(scale))
    return rows

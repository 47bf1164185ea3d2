"""The saved state every soft-warp kernel backend shares: its fake (meta) forward and its autograd wiring.

It sits below both the public op (adaface.ops.soft_warp) and the compiled extension's registrations
(adaface.ops._extension), so neither imports the other to wire a backend.
"""

from __future__ import annotations

import torch

from ..kernels._runtime import soft_warp_saved_state_like

# ---------------------------------------------------------------------------------------------------------
# The kernel backends' autograd. Every backend (Triton, CUDA, C++) has a forward op
#     fwd(q_subj, q_comp, feat_subj, feat_comp, weights, scale) -> (rows, warped, lse2, order, count)
# and a backward op
#     bwd(grad_rows, q_subj, q_comp, feat_subj, feat_comp, weights, warped, lse2, order, count, scale,
#         need_qs, need_qc, need_fs, need_fc) -> 4 gradients (an empty tensor where not needed)
# with one saved state: rows [B, N] fp32 (the per-row losses, 0 where weight is 0); warped [B, N, C] fp32
# (softmax(scale·q_subj q_compᵀ) feat_comp); lse2 [B, N] fp32 = log2 Σ_m 2^(scale·log2(e)·q_n·k_m);
# order [B, N] int32 (per batch the selected rows, weight != 0, ascending, then the others) and count [B] int32
# (how many are selected). warped and lse2 are defined on the selected rows only.


def soft_warp_fwd_fake(q_subj, q_comp, feat_subj, feat_comp, weights, scale):
    """Shapes and dtypes of the saved state, for a forward op's register_fake."""
    return soft_warp_saved_state_like(q_subj, feat_comp)


def register_soft_warp_autograd(fwd_op: str, bwd_op) -> None:
    """Link a backend's forward op (qualified name) to its backward op through the saved state above."""

    def setup_context(ctx, inputs, output):
        q_subj, q_comp, feat_subj, feat_comp, weights, scale = inputs
        _, warped, lse2, order, count = output
        ctx.save_for_backward(q_subj, q_comp, feat_subj, feat_comp, weights, warped, lse2, order, count)
        ctx.scale = scale
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the saved outputs (warped: [B, N, C])

    def backward(ctx, grad_rows, *_unused):
        needs = [bool(n) for n in ctx.needs_input_grad[:4]]
        if not any(needs) or grad_rows is None:
            return None, None, None, None, None, None
        grads = bwd_op(grad_rows.contiguous(), *ctx.saved_tensors, ctx.scale, *needs)
        return (*(g if n else None for g, n in zip(grads, needs)), None, None)

    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)

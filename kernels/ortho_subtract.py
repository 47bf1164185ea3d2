"""Orthogonal subtraction: out = a − c·b with c = (a·b) / (b·b + eps), per row of the last dimension.

Forward, per row (D = b·b + eps):
    s_ab = Σ a·b,  s_bb = Σ b·b,  c = s_ab / D,  out = a − c·b
    (D = 0 only for b = 0 with eps = 0, where s_ab = 0: D is taken as 1, so c = 0 and out = a, not 0/0.)
Backward, with g = dL/dout and s_gb = Σ g·b:
    da = g − (s_gb / D)·b
    db = −c·g − (s_gb / D)·a + 2·c·(s_gb / D)·b
Each direction is two streaming passes over a row (reduce, then write); rows longer than the block are
walked in BLOCK-sized chunks, so any row length works with one program per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import policy_for_this_process

TILE_KEYS = {"BLOCK": 16}


@triton.jit
def _ratio_to_b(x_row, b_row, n_cols, eps, BLOCK: tl.constexpr):
    """(x·b) / (b·b + eps) of one row, in fp32: the reducing pass both directions start with."""
    acc_xb = tl.zeros([BLOCK], dtype=tl.float32)
    acc_bb = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n_cols
        x = tl.load(x_row + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_row + offs, mask=m, other=0.0).to(tl.float32)
        acc_xb += x * b
        acc_bb += b * b
    denom = tl.sum(acc_bb, 0) + eps
    # a zero b with eps = 0: no component along b (0/0 would be NaN)
    return tl.sum(acc_xb, 0) / tl.where(denom > 0, denom, 1.0)


@triton.jit
def _ortho_fwd_kernel(a_ptr, b_ptr, out_ptr, coef_ptr, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    a_row = a_ptr + row * n_cols
    b_row = b_ptr + row * n_cols
    coef = _ratio_to_b(a_row, b_row, n_cols, eps, BLOCK)
    tl.store(coef_ptr + row, coef)
    out_row = out_ptr + row * n_cols
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n_cols
        a = tl.load(a_row + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_row + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_row + offs, (a - coef * b).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _ortho_bwd_kernel(
    g_ptr, a_ptr, b_ptr, coef_ptr, da_ptr, db_ptr, n_cols, eps,
    BLOCK: tl.constexpr, NEED_DA: tl.constexpr, NEED_DB: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g_row = g_ptr + row * n_cols
    a_row = a_ptr + row * n_cols
    b_row = b_ptr + row * n_cols
    r = _ratio_to_b(g_row, b_row, n_cols, eps, BLOCK)
    coef = tl.load(coef_ptr + row)
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n_cols
        g = tl.load(g_row + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_row + offs, mask=m, other=0.0).to(tl.float32)
        if NEED_DA:
            tl.store(da_ptr + row * n_cols + offs, (g - r * b).to(da_ptr.dtype.element_ty), mask=m)
        if NEED_DB:
            a = tl.load(a_row + offs, mask=m, other=0.0).to(tl.float32)
            db = -coef * g - r * a + 2.0 * coef * r * b
            tl.store(db_ptr + row * n_cols + offs, db.to(db_ptr.dtype.element_ty), mask=m)


def gpu_tiles(n_cols: int) -> dict[str, int]:
    """One program per row; a row longer than BLOCK is walked in BLOCK-sized chunks."""
    return {"BLOCK": min(triton.next_power_of_2(max(n_cols, 16)), 4096)}


interpreter_tiles = gpu_tiles
tiles = policy_for_this_process(gpu_tiles, interpreter_tiles)  # what the launchers use (kernels/_runtime.py)


def ortho_subtract_fwd(a: torch.Tensor, b: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, coef) with coef [rows] in fp32, saved for the backward."""
    n_cols = a.shape[-1]
    a2 = a.contiguous().view(-1, n_cols)
    b2 = b.contiguous().view(-1, n_cols)
    rows = a2.shape[0]
    out = torch.empty_like(a2)
    coef = torch.empty(rows, device=a.device, dtype=torch.float32)
    if rows > 0 and n_cols > 0:
        _ortho_fwd_kernel[(rows,)](a2, b2, out, coef, n_cols, eps, BLOCK=tiles(n_cols)["BLOCK"])
    elif rows > 0:
        coef.zero_()
    return out.view(a.shape), coef


def ortho_subtract_bwd(
    grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, coef: torch.Tensor, eps: float,
    need_da: bool = True, need_db: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    n_cols = a.shape[-1]
    g2 = grad.contiguous().view(-1, n_cols)
    a2 = a.contiguous().view(-1, n_cols)
    b2 = b.contiguous().view(-1, n_cols)
    rows = a2.shape[0]
    da = torch.empty_like(a2) if need_da else None
    db = torch.empty_like(b2) if need_db else None
    if rows > 0 and n_cols > 0 and (need_da or need_db):
        _ortho_bwd_kernel[(rows,)](
            g2, a2, b2, coef, da if need_da else a2, db if need_db else b2, n_cols, eps,
            BLOCK=tiles(n_cols)["BLOCK"], NEED_DA=need_da, NEED_DB=need_db,
        )
    return (da.view(a.shape) if need_da else None), (db.view(b.shape) if need_db else None)


# torch.library registration: the forward and backward are opaque custom ops with fake (meta)
# implementations, tied together by register_autograd, so torch.compile traces them without breaks.
@torch.library.custom_op("adaface::ortho_subtract_triton_fwd", mutates_args=())
def _fwd_op(a: torch.Tensor, b: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return ortho_subtract_fwd(a, b, eps)


@_fwd_op.register_fake
def _(a: torch.Tensor, b: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows = a.numel() // a.shape[-1] if a.shape[-1] else a.shape[:-1].numel()
    return torch.empty_like(a), a.new_empty((rows,), dtype=torch.float32)


@torch.library.custom_op("adaface::ortho_subtract_triton_bwd", mutates_args=())
def _bwd_op(
    grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, coef: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    da, db = ortho_subtract_bwd(grad, a, b, coef, eps)
    return da, db


@_bwd_op.register_fake
def _(grad, a, b, coef, eps):
    return torch.empty_like(a), torch.empty_like(b)


def _setup_context(ctx, inputs, output):
    a, b, eps = inputs
    _, coef = output
    ctx.save_for_backward(a, b, coef)
    ctx.eps = eps


def _backward(ctx, grad_out, _grad_coef):
    a, b, coef = ctx.saved_tensors
    da, db = _bwd_op(grad_out, a, b, coef, ctx.eps)
    return da, db, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def ortho_subtract_triton(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """`a − (a·b)/(b·b + eps)·b` per row of the last dimension, in a's dtype; differentiable w.r.t. a and b."""
    out, _ = _fwd_op(a, b, float(eps))
    return out

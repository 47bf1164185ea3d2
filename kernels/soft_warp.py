"""Soft-warp (elastic face-preserving) row losses: flash-attention forward/backward followed by a row cosine.

Per batch b, with q = q_subj [N, Dq], k = q_comp [M, Dq], v = feat_comp [M, C], f = feat_subj [N, C]:

Forward (streaming over M, the N×M matrix is never stored), as FlashAttention-2 does it: a program owns a block
of selected rows and all C output columns (or, for wide C, a chunk of them: `_fwd_plan`), as one or two
power-of-two pieces (320 = 256 + 64, 72 = 64 + 16) with an fp32 accumulator each; it loads its rows' q once
(in up to two pieces) and makes one pass over the key blocks, loading only K and V there (pipelined):
    S = scale · q kᵀ                              (S = Σ_pieces q[:, d] k[:, d]ᵀ, each piece's dot accumulating
                                                  into the running S; q streamed in chunks where it is too
                                                  wide to keep in registers)
    online softmax per row: m = max_j S, l = Σ_j exp(S − m), lse = m + log l   (kept in base 2 internally)
    O = warped = softmax(S) v = Σ_j exp(S − lse) v_j      (fp32; a further output chunk recomputes S)
    cosine exactly as torch.nn.functional.cosine_similarity(O, f, eps):
        n_o = max(|O|, eps),  n_f = max(|f|, eps),  cos = O·f / (n_o n_f),  row = 1 − cos
Saved for the backward: O (fp32 [B, N, C]), lse ([B, N] fp32) and the compacted row order / count.

Row selection: rows with weight 0 are never computed. `order[b]` lists the selected rows first (a stable
argsort of `weight == 0`, done on the device, no host sync) and `count[b]` how many there are; row-parallel
programs whose block lies past `count[b]` do no work, column-parallel programs loop only to `count[b]`.
Unselected rows get loss 0 and zero gradients.

Backward, with g = dL/drow (per row). torch's cosine clamps the norms under no_grad, so the gradient of
cos goes through the unclamped norms |O|, |f| and the clamped divisors n_o, n_f:
    dO = dL/dO = a·f + b_o·O,      dL/df = a·O + b_f·f,
    a = −g / (n_o n_f),  b_o = g·cos / (n_o |O|),  b_f = g·cos / (n_f |f|)     (b = 0 where the norm is 0)
  (for |O|, |f| ≥ eps this is −g·(f/(|O||f|) − cos·O/|O|²), as usual).
Then flash-attention backward with that dO (dO is rounded once to the matmul dtype, and D is computed from
that rounded dO and the fp32 O, so that D and the dP below agree; with near one-hot softmax rows
dP − D is a small difference of large numbers):
    D = rowsum(dO ∘ O)                                   (fp32; exactly 0 in exact arithmetic, since cos is
                                                          scale invariant in O so dO ⊥ O: what is computed is
                                                          the rounding residue that makes dP − D consistent)
    P = exp(S − lse)  (recomputed),   dP = dO vᵀ          (blocked over C)
    dS = P ∘ (dP − D)
    dq_subj = scale · dS k,   dq_comp = scale · dSᵀ q,   dfeat_comp = Pᵀ dO
A small row kernel computes dO, D and dfeat_subj first; then, as FlashAttention-2 splits it, a column kernel per
key block loops over the selected rows, computing S and dP once per (row, key) tile and accumulating dq_comp and
dfeat_comp together, and a row pass per block of selected rows loops over the keys, computing S and dP once per
tile again, for dq_subj. Per tile that is S, dP, dq_comp, dfeat_comp, S, dP, dq_subj: 4·Dq + 3·C of matmul width
(the paper's Dq = C = 320: 2,240 · 2·N·M FLOPs per batch). The row pass recomputes S and dP rather than the
column kernel adding dq_subj atomically: every gradient element is summed by one program in a fixed order, so
the gradients are deterministic (bit for bit, run to run). A program owns all of an output's feature columns as
up to two power-of-two pieces (`bwd_pieces`: 320 = 256 + 64); wider features (SD-1.5's 640, 1280) are split into
equal chunks over programs, each redoing S and dP. S and dP contract over Dq and C in BLOCK_D / BLOCK_C chunks
(a whole 256-wide fp32 operand would take 128 registers per thread), so a row step reads its q_subj and dO rows
twice, in chunks and in pieces (cache traffic, no extra matmul). The kernels run only for the inputs that
require grad; a column kernel for one of dq_comp / dfeat_comp skips the other's accumulators (and, for
dfeat_comp alone, dP).
Precision of the matmuls (`precision`, resolved by adaface.ops.soft_warp): "bf16" / "fp16" round the operand
tiles to that dtype and accumulate in fp32 (dO is stored in it); "tf32" feeds fp32 tiles to TF32 tensor cores
(fp32 accumulation); "ieee" is exact fp32 on the CUDA cores. Softmax statistics, O, D and the cosine are fp32
whatever the precision. Under the interpreter bf16 tiles are cast to fp32 (its bf16 tl.dot is wrong) and its
TF32 dot computes in fp32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._runtime import COSINE_EPS, interpreting, policy_for_this_process, soft_warp_saved_state_like

LOG2E = math.log2(math.e)

# allocation hooks (tests swap them for NaN-filled allocators to catch elements a kernel forgets to write)
_empty = torch.empty
_empty_like = torch.empty_like


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _dot_rows(
    a_ptr, ra, ma, b_ptr, rb, mb, K,
    BA: tl.constexpr, BB: tl.constexpr, BK: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr,
):
    """[BA, BB] fp32 = Σ_k a[ra, k] · b[rb, k] over the contiguous last dimension K, in BK chunks."""
    acc = tl.zeros([BA, BB], dtype=tl.float32)
    offs_k = tl.arange(0, BK)
    for k0 in range(0, K, BK):
        km = (k0 + offs_k) < K
        a = tl.load(a_ptr + ra[:, None] * K + (k0 + offs_k)[None, :], mask=ma[:, None] & km[None, :], other=0.0)
        bt = tl.load(b_ptr + rb[None, :] * K + (k0 + offs_k)[:, None], mask=mb[None, :] & km[:, None], other=0.0)
        acc += tl.dot(a.to(COMPUTE), bt.to(COMPUTE), input_precision=PREC)
    return acc


@triton.jit
def _rows_tile(ptr, rows, rmask, lo, K, W: tl.constexpr):
    """[len(rows), W] = ptr[rows, lo:lo + W] of a row-major [·, K] matrix (zero past K and on masked rows)."""
    offs = lo + tl.arange(0, W)
    return tl.load(ptr + rows[:, None] * K + offs[None, :], mask=rmask[:, None] & (offs < K)[None, :], other=0.0)


@triton.jit
def _rows_tile_t(ptr, rows, rmask, lo, K, W: tl.constexpr):
    """[W, len(rows)]: `_rows_tile` transposed (the key tile as the right operand of q kᵀ)."""
    offs = lo + tl.arange(0, W)
    return tl.load(ptr + rows[None, :] * K + offs[:, None], mask=rmask[None, :] & (offs < K)[:, None], other=0.0)


@triton.jit
def _store_rows(ptr, rows, rmask, lo, K, x, W: tl.constexpr):
    """ptr[rows, lo:lo + W] = x (columns below K, unmasked rows) of a row-major [·, K] matrix."""
    offs = lo + tl.arange(0, W)
    tl.store(ptr + rows[:, None] * K + offs[None, :], x, mask=rmask[:, None] & (offs < K)[None, :])


@triton.jit
def _fwd_kernel(
    qs_ptr, qc_ptr, fc_ptr, order_ptr, count_ptr, o_ptr, lse_ptr,
    N, M, Dq, C, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, Q_RESIDENT: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr,
):
    """BLOCK_N selected rows × the C0 + C1 output columns from pid_c·(C0 + C1) (C1 = 0: one piece), in one pass
    over the keys. Q_RESIDENT: the rows' q (Dq ≤ D0 + D1) is loaded once, in two pieces, and the key loop
    loads only K and V (pipelined by the launch's num_stages); otherwise q is streamed with each key block in
    D0-wide chunks (`_dot_rows`)."""
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    cnt = tl.load(count_ptr + b)
    start_n = pid_n * BLOCK_N
    if start_n < cnt:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        rmask = offs_n < cnt
        rows = tl.load(order_ptr + b * N + offs_n, mask=rmask, other=0).to(tl.int64)
        qs_b = qs_ptr + b * N * Dq
        qc_b = qc_ptr + b * M * Dq
        fc_b = fc_ptr + b * M * C
        o_b = o_ptr + b * N * C
        c_lo = pid_c * (C0 + C1)
        if Q_RESIDENT:
            q0 = _rows_tile(qs_b, rows, rmask, 0, Dq, D0).to(COMPUTE)
            if D1 > 0:
                q1 = _rows_tile(qs_b, rows, rmask, D0, Dq, D1).to(COMPUTE)
        m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc0 = tl.zeros([BLOCK_N, C0], dtype=tl.float32)
        if C1 > 0:
            acc1 = tl.zeros([BLOCK_N, C1], dtype=tl.float32)
        for start_m in range(0, M, BLOCK_M):
            offs_m = (start_m + tl.arange(0, BLOCK_M)).to(tl.int64)
            colm = offs_m < M
            if Q_RESIDENT:
                k0 = _rows_tile_t(qc_b, offs_m, colm, 0, Dq, D0)
                s = tl.dot(q0, k0.to(COMPUTE), input_precision=PREC)
                if D1 > 0:
                    k1 = _rows_tile_t(qc_b, offs_m, colm, D0, Dq, D1)
                    s = tl.dot(q1, k1.to(COMPUTE), s, input_precision=PREC)
            else:
                s = _dot_rows(qs_b, rows, rmask, qc_b, offs_m, colm, Dq, BLOCK_N, BLOCK_M, D0, COMPUTE, PREC)
            s = tl.where(colm[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            p = p.to(COMPUTE)
            v0 = _rows_tile(fc_b, offs_m, colm, c_lo, C, C0)
            acc0 = tl.dot(p, v0.to(COMPUTE), acc0 * alpha[:, None], input_precision=PREC)
            if C1 > 0:
                v1 = _rows_tile(fc_b, offs_m, colm, c_lo + C0, C, C1)
                acc1 = tl.dot(p, v1.to(COMPUTE), acc1 * alpha[:, None], input_precision=PREC)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        _store_rows(o_b, rows, rmask, c_lo, C, acc0 / l_safe[:, None], C0)
        if C1 > 0:
            _store_rows(o_b, rows, rmask, c_lo + C0, C, acc1 / l_safe[:, None], C1)
        if pid_c == 0:
            tl.store(lse_ptr + b * N + rows, m_i + tl.log2(l_safe), mask=rmask)


@triton.jit
def _row_block(w_ptr, N, BLOCK_R: tl.constexpr):
    """This row program's batch, rows, rows inside N, and rows selected (weight ≠ 0) — grid (row blocks, B)."""
    b = tl.program_id(1).to(tl.int64)
    offs_r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rv = offs_r < N
    wt = tl.load(w_ptr + b * N + offs_r, mask=rv, other=0.0)
    return b, offs_r, rv, rv & (wt != 0)


@triton.jit
def _row_sums(o_b, fs_b, offs_r, sel, C, BLOCK_R: tl.constexpr, BLOCK_CC: tl.constexpr):
    """Per row: O·f, |O|², |f|² (fp32), over C in BLOCK_CC chunks; unselected rows load nothing."""
    acc_of = tl.zeros([BLOCK_R, BLOCK_CC], dtype=tl.float32)
    acc_oo = tl.zeros([BLOCK_R, BLOCK_CC], dtype=tl.float32)
    acc_ff = tl.zeros([BLOCK_R, BLOCK_CC], dtype=tl.float32)
    offs_c = tl.arange(0, BLOCK_CC)
    for c0 in range(0, C, BLOCK_CC):
        m = sel[:, None] & ((c0 + offs_c) < C)[None, :]
        idx = offs_r[:, None] * C + (c0 + offs_c)[None, :]
        o = tl.load(o_b + idx, mask=m, other=0.0)
        f = tl.load(fs_b + idx, mask=m, other=0.0).to(tl.float32)
        acc_of += o * f
        acc_oo += o * o
        acc_ff += f * f
    return tl.sum(acc_of, 1), tl.sum(acc_oo, 1), tl.sum(acc_ff, 1)


@triton.jit
def _cos_fwd_kernel(
    o_ptr, fs_ptr, w_ptr, loss_ptr, N, C, eps,
    BLOCK_R: tl.constexpr, BLOCK_CC: tl.constexpr,
):
    b, offs_r, rv, sel = _row_block(w_ptr, N, BLOCK_R)
    s_of, s_oo, s_ff = _row_sums(o_ptr + b * N * C, fs_ptr + b * N * C, offs_r, sel, C, BLOCK_R, BLOCK_CC)
    n_o = tl.maximum(tl.sqrt(s_oo), eps)
    n_f = tl.maximum(tl.sqrt(s_ff), eps)
    cos = s_of / (n_o * n_f)
    tl.store(loss_ptr + b * N + offs_r, tl.where(sel, 1.0 - cos, 0.0), mask=rv)


@triton.jit
def _bwd_prep_kernel(
    g_ptr, o_ptr, fs_ptr, w_ptr, do_ptr, di_ptr, dfs_ptr, N, C, eps,
    BLOCK_R: tl.constexpr, BLOCK_CC: tl.constexpr, NEED_DO: tl.constexpr, NEED_DFS: tl.constexpr,
):
    b, offs_r, rv, sel = _row_block(w_ptr, N, BLOCK_R)
    o_b = o_ptr + b * N * C
    fs_b = fs_ptr + b * N * C
    s_of, s_oo, s_ff = _row_sums(o_b, fs_b, offs_r, sel, C, BLOCK_R, BLOCK_CC)
    g = tl.load(g_ptr + b * N + offs_r, mask=sel, other=0.0)
    nrm_o = tl.sqrt(s_oo)
    nrm_f = tl.sqrt(s_ff)
    n_o = tl.maximum(nrm_o, eps)
    n_f = tl.maximum(nrm_f, eps)
    cos = s_of / (n_o * n_f)
    coef_a = -g / (n_o * n_f)
    coef_o = tl.where(nrm_o > 0, g * cos / (n_o * tl.where(nrm_o > 0, nrm_o, 1.0)), 0.0)
    coef_f = tl.where(nrm_f > 0, g * cos / (n_f * tl.where(nrm_f > 0, nrm_f, 1.0)), 0.0)
    di = tl.zeros([BLOCK_R], dtype=tl.float32)
    offs_c = tl.arange(0, BLOCK_CC)
    for c0 in range(0, C, BLOCK_CC):
        cmask = ((c0 + offs_c) < C)[None, :]
        m = sel[:, None] & cmask
        idx = offs_r[:, None] * C + (c0 + offs_c)[None, :]
        o = tl.load(o_b + idx, mask=m, other=0.0)
        f = tl.load(fs_b + idx, mask=m, other=0.0).to(tl.float32)
        if NEED_DO:
            d_o = (coef_a[:, None] * f + coef_o[:, None] * o).to(do_ptr.dtype.element_ty)
            tl.store(do_ptr + b * N * C + idx, d_o, mask=m)
            di += tl.sum(d_o.to(tl.float32) * o, 1)
        if NEED_DFS:
            d_f = coef_a[:, None] * o + coef_f[:, None] * f
            tl.store(dfs_ptr + b * N * C + idx, d_f.to(dfs_ptr.dtype.element_ty), mask=rv[:, None] & cmask)
    if NEED_DO:
        tl.store(di_ptr + b * N + offs_r, di, mask=sel)


@triton.jit
def _bwd_dq_kernel(
    qs_ptr, qc_ptr, fc_ptr, do_ptr, lse_ptr, di_ptr, order_ptr, count_ptr, dqs_ptr,
    N, M, Dq, C, qk_scale, scale,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr,
):
    """dq_subj rows (programs over the compacted row order; positions past count write zero rows): S and dP once
    per (row block, key block) tile, dq_subj = scale · dS k. Program (pid_n, pid_o) owns the columns
    pid_o·(D0 + D1) + [0, D0 + D1) as the pieces D0, D1 (D1 = 0: none)."""
    pid_n = tl.program_id(0)
    pid_o = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    cnt = tl.load(count_ptr + b)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    rmask = offs_n < cnt
    rows = tl.load(order_ptr + b * N + offs_n, mask=in_n, other=0).to(tl.int64)  # rows·C may pass 2^31
    qs_b = qs_ptr + b * N * Dq
    qc_b = qc_ptr + b * M * Dq
    fc_b = fc_ptr + b * M * C
    do_b = do_ptr + b * N * C
    lse = tl.load(lse_ptr + b * N + rows, mask=rmask, other=0.0)
    di = tl.load(di_ptr + b * N + rows, mask=rmask, other=0.0)
    d_lo = pid_o * (D0 + D1)
    acc0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    if D1 > 0:
        acc1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    hi = tl.where(start_n < cnt, M, 0)
    for start_m in range(0, hi, BLOCK_M):
        offs_m = (start_m + tl.arange(0, BLOCK_M)).to(tl.int64)
        colm = offs_m < M
        s = _dot_rows(qs_b, rows, rmask, qc_b, offs_m, colm, Dq, BLOCK_N, BLOCK_M, BLOCK_D, COMPUTE, PREC)
        p = tl.where(rmask[:, None] & colm[None, :], tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        dp = _dot_rows(do_b, rows, rmask, fc_b, offs_m, colm, C, BLOCK_N, BLOCK_M, BLOCK_C, COMPUTE, PREC)
        ds = (p * (dp - di[:, None])).to(COMPUTE)
        acc0 += tl.dot(ds, _rows_tile(qc_b, offs_m, colm, d_lo, Dq, D0).to(COMPUTE), input_precision=PREC)
        if D1 > 0:
            acc1 += tl.dot(ds, _rows_tile(qc_b, offs_m, colm, d_lo + D0, Dq, D1).to(COMPUTE), input_precision=PREC)
    dqs_b = dqs_ptr + b * N * Dq
    _store_rows(dqs_b, rows, in_n, d_lo, Dq, (acc0 * scale).to(dqs_b.dtype.element_ty), D0)
    if D1 > 0:
        _store_rows(dqs_b, rows, in_n, d_lo + D0, Dq, (acc1 * scale).to(dqs_b.dtype.element_ty), D1)


@triton.jit
def _bwd_col_kernel(
    qs_ptr, qc_ptr, fc_ptr, do_ptr, lse_ptr, di_ptr, order_ptr, count_ptr, dqc_ptr, dfc_ptr,
    N, M, Dq, C, qk_scale, scale,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr,
    NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr,
):
    """One key block, looping over the selected rows: S (and, for dq_comp, dP) once per tile, accumulating
    dq_comp = scale · dSᵀ q_subj (NEED_DK) and dfeat_comp = Pᵀ dO (NEED_DV). Program (pid_m, pid_o) owns
    dq_comp's columns pid_o·(D0 + D1) + [0, D0 + D1) as the pieces D0, D1 and dfeat_comp's
    pid_o·(C0 + C1) + [0, C0 + C1) as C0, C1 (a second piece of 0: none)."""
    pid_m = tl.program_id(0)
    pid_o = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    cnt = tl.load(count_ptr + b)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # keys·C may pass 2^31
    colm = offs_m < M
    qs_b = qs_ptr + b * N * Dq
    qc_b = qc_ptr + b * M * Dq
    fc_b = fc_ptr + b * M * C
    do_b = do_ptr + b * N * C
    d_lo = pid_o * (D0 + D1)
    c_lo = pid_o * (C0 + C1)
    if NEED_DK:
        dk0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
        if D1 > 0:
            dk1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    if NEED_DV:
        dv0 = tl.zeros([BLOCK_M, C0], dtype=tl.float32)
        if C1 > 0:
            dv1 = tl.zeros([BLOCK_M, C1], dtype=tl.float32)
    for start_n in range(0, cnt, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        rmask = offs_n < cnt
        rows = tl.load(order_ptr + b * N + offs_n, mask=rmask, other=0).to(tl.int64)
        st = _dot_rows(qc_b, offs_m, colm, qs_b, rows, rmask, Dq, BLOCK_M, BLOCK_N, BLOCK_D, COMPUTE, PREC)
        lse = tl.load(lse_ptr + b * N + rows, mask=rmask, other=0.0)
        pt = tl.where(colm[:, None] & rmask[None, :], tl.exp2(st * qk_scale - lse[None, :]), 0.0)
        if NEED_DK:
            dpt = _dot_rows(fc_b, offs_m, colm, do_b, rows, rmask, C, BLOCK_M, BLOCK_N, BLOCK_C, COMPUTE, PREC)
            di = tl.load(di_ptr + b * N + rows, mask=rmask, other=0.0)
            dst = (pt * (dpt - di[None, :])).to(COMPUTE)
            dk0 += tl.dot(dst, _rows_tile(qs_b, rows, rmask, d_lo, Dq, D0).to(COMPUTE), input_precision=PREC)
            if D1 > 0:
                dk1 += tl.dot(dst, _rows_tile(qs_b, rows, rmask, d_lo + D0, Dq, D1).to(COMPUTE), input_precision=PREC)
        if NEED_DV:
            ptc = pt.to(COMPUTE)
            dv0 += tl.dot(ptc, _rows_tile(do_b, rows, rmask, c_lo, C, C0).to(COMPUTE), input_precision=PREC)
            if C1 > 0:
                dv1 += tl.dot(ptc, _rows_tile(do_b, rows, rmask, c_lo + C0, C, C1).to(COMPUTE), input_precision=PREC)
    if NEED_DK:
        dqc_b = dqc_ptr + b * M * Dq
        _store_rows(dqc_b, offs_m, colm, d_lo, Dq, (dk0 * scale).to(dqc_b.dtype.element_ty), D0)
        if D1 > 0:
            _store_rows(dqc_b, offs_m, colm, d_lo + D0, Dq, (dk1 * scale).to(dqc_b.dtype.element_ty), D1)
    if NEED_DV:
        dfc_b = dfc_ptr + b * M * C
        _store_rows(dfc_b, offs_m, colm, c_lo, C, dv0.to(dfc_b.dtype.element_ty), C0)
        if C1 > 0:
            _store_rows(dfc_b, offs_m, colm, c_lo + C0, C, dv1.to(dfc_b.dtype.element_ty), C1)


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------

# every tile size the launchers read, with its least value (tl.dot's 16); FWD_: the forward's, BWD_: the backward's
TILE_KEYS = {k: 16 for k in ("BLOCK_R", "BLOCK_CC", "FWD_BLOCK_N", "FWD_BLOCK_M", "FWD_D0", "FWD_C0",
                              "BWD_BLOCK_N", "BWD_BLOCK_M", "BWD_DQ_BLOCK_N", "BWD_DQ_BLOCK_M", "BWD_BLOCK_D",
                              "BWD_BLOCK_C", "BWD_OUT", "BWD_BLOCK_R", "BWD_BLOCK_CC")}
TILE_KEYS.update(FWD_D1=0, FWD_C1=0)  # a second piece of 0: none


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _cover(n: int) -> tuple[int, int]:
    """The narrowest one or two powers of two ≥ 16 (larger first, 0: no second) whose sum is ≥ n."""
    first = 16
    while first * 2 <= n:
        first *= 2
    rest = n - first
    if rest <= 0:
        return first, 0
    second = _pow2(rest, 16, first)
    return (first * 2, 0) if second == first else (first, second)


# The forward's tile plan (`_fwd_plan`). A program keeps across its key loop the fp32 accumulator of its W output
# columns and, when resident, its rows' q; per key block it holds the V tile as a matmul operand. On sm_80
# Triton's MMA keeps whole operand fragments in registers, and a warp's MMA covers at least 16 rows, so a warp
# holds the whole q of its 16 rows: with 64 rows and 8 warps (4 along the rows × 2 along the columns) q of
# Dq = 320 and W = 320 spilled in every precision. Hence 32 rows and 8 warps (2 × 4): a thread holds W/8
# accumulator words, Dq·b/8 words of resident q (b bytes per operand element) and FWD_BLOCK_M·W·b/512 words of
# V. Their sum stays within FWD_WORDS, the part of 255 registers that ptxas fits with the softmax and the K tile
# without spilling at SD-1.5's shapes (bench/kernel_resources.py); the CUDA cores' dot ("ieee") holds a strip
# of both operands per thread, counted as b = 8. So fp32 q (TF32) of 320 features is streamed with each key
# block in FWD_STREAM_D-wide chunks, bf16/fp16 q is resident. One pipeline stage's K and V tiles,
# FWD_BLOCK_M·(Dq or the streamed chunk + W) input elements (copied to shared memory as loaded, fp32 inputs at
# 4 bytes whatever the precision), stay within FWD_STAGE_BYTES: two stages within sm_86's 99 KB.
FWD_WORDS = 160
FWD_STAGE_BYTES = 48 * 1024
FWD_STREAM_D = 64


def _fwd_plan(Dq: int, C: int, op_bytes: int, in_bytes: int) -> dict[str, int]:
    """The forward's key block, q pieces and output chunk: the least modelled matmul work (per row and key,
    ⌈C / W⌉ · (Dq padded + W) for W output columns per program: each further chunk recomputes the scores) within
    the register and shared-memory budgets; ties go to a resident q, then a wider key block, then one piece.
    At SD-1.5's layers: 320 features in one program per row block; 640 in one (two 320-wide for "ieee");
    1280 in two 640-wide chunks (four 320-wide for "ieee")."""
    best, best_key = None, None
    for rank_m, block_m in enumerate((32, 16)):
        for resident in (True, False):
            d0, d1 = _cover(Dq) if resident else (_pow2(Dq, 16, FWD_STREAM_D), 0)
            dk = d0 + d1 if resident else triton.cdiv(Dq, d0) * d0
            q_words = dk * op_bytes / 8 if resident else 0
            c0 = 16
            while c0 <= 1024:
                for c1 in [0] + [w for w in (16, 32, 64, 128, 256, 512) if w <= c0 // 2]:
                    w = c0 + c1
                    fits = (w / 8 + q_words + block_m * w * op_bytes / 512 <= FWD_WORDS
                            and block_m * ((dk if resident else d0) + w) * in_bytes <= FWD_STAGE_BYTES)
                    key = (triton.cdiv(C, w) * (dk + w), not resident, rank_m, c1 > 0, w)
                    if fits and (best_key is None or key < best_key):
                        best_key = key
                        best = {"FWD_BLOCK_M": block_m, "FWD_D0": d0, "FWD_D1": d1, "FWD_C0": c0, "FWD_C1": c1}
                c0 *= 2
    assert best is not None  # the streamed plan with W = 16 fits both budgets at any Dq
    return best


def bwd_pieces(Dq: int, C: int, cap: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The pieces (`_cover`) of the dq_subj / dq_comp columns and of the dfeat_comp columns that one backward
    program owns; chunk j owns the columns j·(P0 + P1) + [0, P0 + P1). Every chunk redoes S and dP (a cost
    ∝ Dq + C), so the fewest chunks win whose pieces stay within cap + cap / 4 columns per output: one at the
    paper's 320 = 256 + 64 (cap 256), 2 × (256 + 64) at SD-1.5's 640, 4 × (256 + 64) at 1280."""
    n = 1
    while True:
        pd, pc = _cover(triton.cdiv(Dq, n)), _cover(triton.cdiv(C, n))
        if max(sum(pd), sum(pc)) <= cap + cap // 4:
            return pd, pc
        n += 1


# The backward's CUDA tiles (`_bwd_gpu_tiles`). The column kernel keeps BWD_BLOCK_M × (its dq_comp + dfeat_comp
# columns, ≤ 2 · 320 at cap 256) fp32 accumulators across its row loop: 80 registers per thread at 32 keys and 8
# warps; the operand tiles, S / dP and their addresses take the rest of 255, and ptxas fits the paper's 320 + 320
# without spilling only with 16-row steps, unpipelined (num_stages 1; the row pass pipelines its S / dP chunk
# loops over 2 stages). S and dP contract in 64-wide chunks: a whole 256-wide fp32 operand would be 128 registers
# per thread. The CUDA cores' dot ("ieee") holds a strip of both operands per thread for the whole step, so it
# takes 16-key column blocks. Shared memory stays under 21 KB per block (bench/kernel_resources.py).
def _bwd_gpu_tiles(C: int, precision: str) -> dict[str, int]:
    return {
        "BWD_BLOCK_N": 16, "BWD_BLOCK_M": 16 if precision == "ieee" else 32, "BWD_DQ_BLOCK_N": 32,
        "BWD_DQ_BLOCK_M": 16, "BWD_BLOCK_D": 64, "BWD_BLOCK_C": 64, "BWD_OUT": 256, "BWD_BLOCK_R": 16,
        "BWD_BLOCK_CC": _pow2(C, 16, 128), "BWD_WARPS": 8, "BWD_STAGES_COL": 1, "BWD_STAGES_DQ": 2,
    }


_OPERAND_BYTES = {"ieee": 8, "tf32": 4, "bf16": 2, "fp16": 2}


def gpu_tiles(N: int, M: int, Dq: int, C: int, precision: str = "bf16", elem: int = 4) -> dict[str, int]:
    """The CUDA launch configuration (every tile a power of two ≥ 16, as tl.dot needs) for `precision`'s
    matmuls on inputs of `elem` bytes (FWD_: the forward's keys, BWD_: the backward's, BLOCK_R / BLOCK_CC: the
    cosine's)."""
    return {
        "BLOCK_R": 16, "BLOCK_CC": _pow2(C, 16, 256),
        "FWD_BLOCK_N": 32, **_fwd_plan(Dq, C, _OPERAND_BYTES[precision], elem), "FWD_WARPS": 8, "FWD_STAGES": 2,
        **_bwd_gpu_tiles(C, precision),
    }


def interpreter_tiles(N: int, M: int, Dq: int, C: int, precision: str = "bf16", elem: int = 4) -> dict[str, int]:
    """Few, large programs (the interpreter's cost is per program and per op). The forward sums the scores over
    the same Dq chunks as the backward (q resident up to 128 features, else streamed in 128-wide chunks) and
    owns up to 320 output columns per program."""
    block_d = _pow2(Dq, 16, 128)
    c0, c1 = _cover(min(C, 320))
    return {
        "BLOCK_R": _pow2(N, 16, 64), "BLOCK_CC": _pow2(C, 16, 128),
        "FWD_BLOCK_N": _pow2(N, 16, 64), "FWD_BLOCK_M": _pow2(M, 16, 64), "FWD_D0": block_d, "FWD_D1": 0,
        "FWD_C0": c0, "FWD_C1": c1, "FWD_WARPS": 4, "FWD_STAGES": 2,
        "BWD_BLOCK_N": _pow2(N, 16, 64), "BWD_BLOCK_M": _pow2(M, 16, 64), "BWD_DQ_BLOCK_N": _pow2(N, 16, 64),
        "BWD_DQ_BLOCK_M": _pow2(M, 16, 64), "BWD_BLOCK_D": block_d, "BWD_BLOCK_C": _pow2(C, 16, 128),
        "BWD_OUT": 128, "BWD_BLOCK_R": _pow2(N, 16, 64), "BWD_BLOCK_CC": _pow2(C, 16, 128), "BWD_WARPS": 4,
        "BWD_STAGES_COL": 1, "BWD_STAGES_DQ": 2,
    }


def _fwd_pieces(cfg: dict[str, int]) -> tuple[int, int, int, int]:
    """(D0, D1, C0, C1) of a configuration; a second piece is 0 or, as tl.dot needs, a power of two ≥ 16."""
    pieces = tuple(cfg[k] for k in ("FWD_D0", "FWD_D1", "FWD_C0", "FWD_C1"))
    if any(v and (v < 16 or v & (v - 1)) for v in pieces) or not all(pieces[::2]):
        raise ValueError(f"soft_warp: forward pieces (FWD_D0, FWD_D1, FWD_C0, FWD_C1) must be powers of two >= 16 "
                         f"(a second piece may be 0), got {pieces}")
    return pieces  # type: ignore[return-value]


tiles = policy_for_this_process(gpu_tiles, interpreter_tiles)  # what the launchers use (kernels/_runtime.py)


PRECISIONS = ("ieee", "tf32", "bf16", "fp16")


def _compute_dtype(precision: str):
    """(tl dtype of the matmul operands, torch dtype of the stored dO, tl.dot input_precision) of `precision`."""
    if precision not in PRECISIONS:
        raise ValueError(f"soft_warp_loss: precision must be one of {PRECISIONS}, got {precision!r}")
    if precision in ("ieee", "tf32") or (precision == "bf16" and interpreting()):
        return tl.float32, torch.float32, "tf32" if precision == "tf32" else "ieee"
    return (tl.float16, torch.float16, "ieee") if precision == "fp16" else (tl.bfloat16, torch.bfloat16, "ieee")


def default_precision(dtype: torch.dtype) -> str:
    """The precision of inputs of `dtype` when the caller names none: their own dtype (fp32: exact)."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "ieee")


def _compact(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected rows first (ascending), then the rest; and how many are selected. On the device, no sync."""
    unsel = weights == 0
    count = (~unsel).sum(dim=1, dtype=torch.int32)
    order = torch.argsort(unsel.to(torch.int8), dim=1, stable=True).to(torch.int32)
    return order.contiguous(), count.contiguous()


def soft_warp_fwd(
    q_subj: torch.Tensor, q_comp: torch.Tensor, feat_subj: torch.Tensor, feat_comp: torch.Tensor,
    weights: torch.Tensor, scale: float, precision: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (rows [B, N] fp32, warped [B, N, C] fp32, lse2 [B, N] fp32, order [B, N] i32, count [B] i32)."""
    qs, qc, fs, fc = (t.contiguous() for t in (q_subj, q_comp, feat_subj, feat_comp))
    w = weights.to(torch.float32).contiguous()
    B, N, Dq = qs.shape
    M, C = fc.shape[1], fc.shape[2]
    dev = qs.device
    rows = _empty((B, N), device=dev, dtype=torch.float32)
    warped = _empty((B, N, C), device=dev, dtype=torch.float32)
    lse = _empty((B, N), device=dev, dtype=torch.float32)
    order, count = _compact(w)
    if B == 0 or N == 0:
        return rows, warped, lse, order, count
    # every launch (forward and backward) puts the batch on grid axis 2, which CUDA caps at 65535
    if B > 65535:
        raise ValueError(f"soft_warp_loss: batch size B={B} exceeds the kernels' grid limit of 65535")
    precision = precision or default_precision(qs.dtype)
    cfg = tiles(N, M, Dq, C, precision=precision, elem=qs.element_size())
    compute, _, prec = _compute_dtype(precision)
    d0, d1, c0, c1 = _fwd_pieces(cfg)
    grid = (triton.cdiv(N, cfg["FWD_BLOCK_N"]), max(triton.cdiv(C, c0 + c1), 1), B)  # C = 0: still write lse
    _fwd_kernel[grid](
        qs, qc, fc, order, count, warped, lse, N, M, Dq, C, float(scale) * LOG2E,
        BLOCK_N=cfg["FWD_BLOCK_N"], BLOCK_M=cfg["FWD_BLOCK_M"], D0=d0, D1=d1 if Dq <= d0 + d1 else 0, C0=c0, C1=c1,
        Q_RESIDENT=Dq <= d0 + d1, COMPUTE=compute, PREC=prec,
        num_warps=cfg["FWD_WARPS"], num_stages=cfg["FWD_STAGES"],
    )
    _cos_fwd_kernel[(triton.cdiv(N, cfg["BLOCK_R"]), B)](
        warped, fs, w, rows, N, C, COSINE_EPS, BLOCK_R=cfg["BLOCK_R"], BLOCK_CC=cfg["BLOCK_CC"],
    )
    return rows, warped, lse, order, count


def soft_warp_bwd(
    grad_rows: torch.Tensor, q_subj: torch.Tensor, q_comp: torch.Tensor, feat_subj: torch.Tensor,
    feat_comp: torch.Tensor, weights: torch.Tensor, warped: torch.Tensor, lse: torch.Tensor,
    order: torch.Tensor, count: torch.Tensor, scale: float,
    need_qs: bool = True, need_qc: bool = True, need_fs: bool = True, need_fc: bool = True,
    precision: str | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    qs, qc, fs, fc = (t.contiguous() for t in (q_subj, q_comp, feat_subj, feat_comp))
    w = weights.to(torch.float32).contiguous()
    g = grad_rows.to(torch.float32).contiguous()
    B, N, Dq = qs.shape
    M, C = fc.shape[1], fc.shape[2]
    dev = qs.device
    dqs = _empty_like(qs) if need_qs else None
    dqc = _empty_like(qc) if need_qc else None
    dfs = _empty_like(fs) if need_fs else None
    dfc = _empty_like(fc) if need_fc else None
    if B == 0 or N == 0 and not (need_qc or need_fc):
        return dqs, dqc, dfs, dfc
    precision = precision or default_precision(qs.dtype)
    cfg = tiles(N, M, Dq, C, precision=precision, elem=qs.element_size())
    compute, do_dtype, prec = _compute_dtype(precision)
    need_do = need_qs or need_qc or need_fc
    d_o = _empty((B, N, C), device=dev, dtype=do_dtype) if need_do else warped
    di = _empty((B, N), device=dev, dtype=torch.float32) if need_do else lse
    if N > 0 and (need_do or need_fs):
        _bwd_prep_kernel[(triton.cdiv(N, cfg["BWD_BLOCK_R"]), B)](
            g, warped, fs, w, d_o, di, dfs if need_fs else fs, N, C, COSINE_EPS,
            BLOCK_R=cfg["BWD_BLOCK_R"], BLOCK_CC=cfg["BWD_BLOCK_CC"], NEED_DO=need_do, NEED_DFS=need_fs,
        )
    (d0, d1), (c0, c1) = bwd_pieces(Dq, C, cfg["BWD_OUT"])
    common = dict(
        BLOCK_D=cfg["BWD_BLOCK_D"], BLOCK_C=cfg["BWD_BLOCK_C"], D0=d0, D1=d1,
        COMPUTE=compute, PREC=prec, num_warps=cfg["BWD_WARPS"],
    )
    args = (qs, qc, fc, d_o, lse, di, order, count)
    sizes = (N, M, Dq, C, float(scale) * LOG2E, float(scale))
    if need_qs and N > 0:
        grid = (triton.cdiv(N, cfg["BWD_DQ_BLOCK_N"]), triton.cdiv(Dq, d0 + d1), B)
        _bwd_dq_kernel[grid](*args, dqs, *sizes, BLOCK_N=cfg["BWD_DQ_BLOCK_N"], BLOCK_M=cfg["BWD_DQ_BLOCK_M"],
                             num_stages=cfg["BWD_STAGES_DQ"], **common)
    if (need_qc or need_fc) and M > 0:
        chunks = max(triton.cdiv(Dq, d0 + d1) if need_qc else 1, triton.cdiv(C, c0 + c1) if need_fc else 1)
        grid = (triton.cdiv(M, cfg["BWD_BLOCK_M"]), chunks, B)
        _bwd_col_kernel[grid](*args, dqc if need_qc else qc, dfc if need_fc else fc, *sizes,
                              BLOCK_N=cfg["BWD_BLOCK_N"], BLOCK_M=cfg["BWD_BLOCK_M"], C0=c0, C1=c1, NEED_DK=need_qc,
                              NEED_DV=need_fc, num_stages=cfg["BWD_STAGES_COL"], **common)
    return dqs, dqc, dfs, dfc


# ----------------------------------------------------------------------------------------------------------
# torch.library registration (custom_op + register_fake + register_autograd: torch.compile without breaks)
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("adaface::soft_warp_triton_fwd", mutates_args=())
def _fwd_op(
    q_subj: torch.Tensor, q_comp: torch.Tensor, feat_subj: torch.Tensor, feat_comp: torch.Tensor,
    weights: torch.Tensor, scale: float, precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return soft_warp_fwd(q_subj, q_comp, feat_subj, feat_comp, weights, scale, precision)


@_fwd_op.register_fake
def _(q_subj, q_comp, feat_subj, feat_comp, weights, scale, precision):
    return soft_warp_saved_state_like(q_subj, feat_comp)


@torch.library.custom_op("adaface::soft_warp_triton_bwd", mutates_args=())
def _bwd_op(
    grad_rows: torch.Tensor, q_subj: torch.Tensor, q_comp: torch.Tensor, feat_subj: torch.Tensor,
    feat_comp: torch.Tensor, weights: torch.Tensor, warped: torch.Tensor, lse: torch.Tensor,
    order: torch.Tensor, count: torch.Tensor, scale: float,
    need_qs: bool, need_qc: bool, need_fs: bool, need_fc: bool, precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = soft_warp_bwd(
        grad_rows, q_subj, q_comp, feat_subj, feat_comp, weights, warped, lse, order, count, scale,
        need_qs, need_qc, need_fs, need_fc, precision,
    )
    # custom ops cannot return None: a gradient that is not needed comes back as an empty tensor
    ins = (q_subj, q_comp, feat_subj, feat_comp)
    return tuple(gr if gr is not None else t.new_empty((0,)) for gr, t in zip(grads, ins))  # type: ignore[return-value]


@_bwd_op.register_fake
def _(grad_rows, q_subj, q_comp, feat_subj, feat_comp, weights, warped, lse, order, count, scale,
      need_qs, need_qc, need_fs, need_fc, precision):
    ins = (q_subj, q_comp, feat_subj, feat_comp)
    needs = (need_qs, need_qc, need_fs, need_fc)
    return tuple(torch.empty_like(t) if n else t.new_empty((0,)) for t, n in zip(ins, needs))


def _setup_context(ctx, inputs, output):
    q_subj, q_comp, feat_subj, feat_comp, weights, scale, precision = inputs
    _, warped, lse, order, count = output
    ctx.save_for_backward(q_subj, q_comp, feat_subj, feat_comp, weights, warped, lse, order, count)
    ctx.scale = scale
    ctx.precision = precision


def _backward(ctx, grad_rows, *_unused):
    saved = ctx.saved_tensors
    needs = ctx.needs_input_grad[:4]
    if not any(needs):
        return None, None, None, None, None, None, None
    grads = _bwd_op(grad_rows, *saved, ctx.scale, *needs, ctx.precision)
    return (*(gr if n else None for gr, n in zip(grads, needs)), None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def soft_warp_rows_triton(
    q_subj: torch.Tensor, q_comp: torch.Tensor, feat_subj: torch.Tensor, feat_comp: torch.Tensor,
    weights: torch.Tensor, scale: float, precision: str | None = None,
) -> torch.Tensor:
    """Per-row losses [B, N] fp32: 1 − cos(softmax(scale·q_subj q_compᵀ) feat_comp, feat_subj); 0 where weight is 0.

    Differentiable w.r.t. q_subj, q_comp, feat_subj, feat_comp (not weights). `precision`: one of PRECISIONS
    (default: `default_precision` of the inputs' dtype)."""
    precision = precision or default_precision(q_subj.dtype)
    _compute_dtype(precision)  # a bad name fails here, not inside the custom op
    rows, *_ = _fwd_op(q_subj, q_comp, feat_subj, feat_comp, weights, float(scale), precision)
    return rows

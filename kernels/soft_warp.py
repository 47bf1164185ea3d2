"""Soft-warp (elastic face-preserving) row losses: flash-attention forward/backward followed by a row cosine.

Per batch b, with q = q_subj [N, Dq], k = q_comp [M, Dq], v = feat_comp [M, C], f = feat_subj [N, C]:

Forward (streaming over M, the N×M matrix is never stored):
    S = scale · q kᵀ                              (blocked over Dq: S = Σ_chunks q[:, d] k[:, d]ᵀ)
    online softmax per row: m = max_j S, l = Σ_j exp(S − m), lse = m + log l   (kept in base 2 internally)
    O = warped = softmax(S) v = Σ_j exp(S − lse) v_j      (fp32; the C dimension is split across programs,
                                                          each program redoing the cheap-to-stream S)
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
def _fwd_kernel(
    qs_ptr, qc_ptr, fc_ptr, order_ptr, count_ptr, o_ptr, lse_ptr,
    N, M, Dq, C, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, OUT_C: tl.constexpr,
    COMPUTE: tl.constexpr, PREC: tl.constexpr,
):
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
        offs_c = pid_c * OUT_C + tl.arange(0, OUT_C)
        cm = offs_c < C
        m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc = tl.zeros([BLOCK_N, OUT_C], dtype=tl.float32)
        for start_m in range(0, M, BLOCK_M):
            offs_m = (start_m + tl.arange(0, BLOCK_M)).to(tl.int64)
            colm = offs_m < M
            s = _dot_rows(qs_b, rows, rmask, qc_b, offs_m, colm, Dq, BLOCK_N, BLOCK_M, BLOCK_D, COMPUTE, PREC)
            s = tl.where(colm[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(fc_b + offs_m[:, None] * C + offs_c[None, :], mask=colm[:, None] & cm[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(COMPUTE), v.to(COMPUTE), input_precision=PREC)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        tl.store(o_ptr + b * N * C + rows[:, None] * C + offs_c[None, :], o, mask=rmask[:, None] & cm[None, :])
        if pid_c == 0:
            tl.store(lse_ptr + b * N + rows, m_i + tl.log2(l_safe), mask=rmask)


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
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_r = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rv = offs_r < N
    wt = tl.load(w_ptr + b * N + offs_r, mask=rv, other=0.0)
    sel = rv & (wt != 0)
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
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_r = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rv = offs_r < N
    wt = tl.load(w_ptr + b * N + offs_r, mask=rv, other=0.0)
    sel = rv & (wt != 0)
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
def _tile(ptr, rows, rmask, W, col0, P: tl.constexpr):
    """The [rows, col0 : col0 + P] tile of a row-major matrix W wide; zeros past W and at masked rows."""
    offs = col0 + tl.arange(0, P)
    return tl.load(ptr + rows[:, None] * W + offs[None, :], mask=rmask[:, None] & (offs < W)[None, :], other=0.0)


@triton.jit
def _put(ptr, rows, rmask, W, col0, val, P: tl.constexpr):
    offs = col0 + tl.arange(0, P)
    tl.store(ptr + rows[:, None] * W + offs[None, :], val.to(ptr.dtype.element_ty),
             mask=rmask[:, None] & (offs < W)[None, :])


@triton.jit
def _bwd_dq_kernel(
    qs_ptr, qc_ptr, fc_ptr, do_ptr, lse_ptr, di_ptr, order_ptr, count_ptr, dqs_ptr,
    N, M, Dq, C, qk_scale, scale,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    D1: tl.constexpr, D2: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr,
):
    """dq_subj rows (programs over the compacted row order; positions past count write zero rows): S and dP once
    per (row block, key block) tile, dq_subj = scale · dS k. Program (pid_n, pid_o) owns the columns
    pid_o·(D1 + D2) + [0, D1 + D2) as the pieces D1, D2 (D2 = 0: none)."""
    pid_n = tl.program_id(0)
    pid_o = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    cnt = tl.load(count_ptr + b)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    rmask = offs_n < cnt
    rows = tl.load(order_ptr + b * N + offs_n, mask=in_n, other=0)
    qs_b = qs_ptr + b * N * Dq
    qc_b = qc_ptr + b * M * Dq
    fc_b = fc_ptr + b * M * C
    do_b = do_ptr + b * N * C
    lse = tl.load(lse_ptr + b * N + rows, mask=rmask, other=0.0)
    di = tl.load(di_ptr + b * N + rows, mask=rmask, other=0.0)
    d0 = pid_o * (D1 + D2)
    acc1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    if D2 > 0:
        acc2 = tl.zeros([BLOCK_N, D2], dtype=tl.float32)
    hi = tl.where(start_n < cnt, M, 0)
    for start_m in range(0, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        colm = offs_m < M
        s = _dot_rows(qs_b, rows, rmask, qc_b, offs_m, colm, Dq, BLOCK_N, BLOCK_M, BLOCK_D, COMPUTE, PREC)
        p = tl.where(rmask[:, None] & colm[None, :], tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        dp = _dot_rows(do_b, rows, rmask, fc_b, offs_m, colm, C, BLOCK_N, BLOCK_M, BLOCK_C, COMPUTE, PREC)
        ds = (p * (dp - di[:, None])).to(COMPUTE)
        acc1 += tl.dot(ds, _tile(qc_b, offs_m, colm, Dq, d0, D1).to(COMPUTE), input_precision=PREC)
        if D2 > 0:
            acc2 += tl.dot(ds, _tile(qc_b, offs_m, colm, Dq, d0 + D1, D2).to(COMPUTE), input_precision=PREC)
    dqs_b = dqs_ptr + b * N * Dq
    _put(dqs_b, rows, in_n, Dq, d0, acc1 * scale, D1)
    if D2 > 0:
        _put(dqs_b, rows, in_n, Dq, d0 + D1, acc2 * scale, D2)


@triton.jit
def _bwd_col_kernel(
    qs_ptr, qc_ptr, fc_ptr, do_ptr, lse_ptr, di_ptr, order_ptr, count_ptr, dqc_ptr, dfc_ptr,
    N, M, Dq, C, qk_scale, scale,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    D1: tl.constexpr, D2: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    NEED_DK: tl.constexpr, NEED_DV: tl.constexpr, COMPUTE: tl.constexpr, PREC: tl.constexpr,
):
    """One key block, looping over the selected rows: S (and, for dq_comp, dP) once per tile, accumulating
    dq_comp = scale · dSᵀ q_subj (NEED_DK) and dfeat_comp = Pᵀ dO (NEED_DV). Program (pid_m, pid_o) owns
    dq_comp's columns pid_o·(D1 + D2) + [0, D1 + D2) as the pieces D1, D2 and dfeat_comp's
    pid_o·(C1 + C2) + [0, C1 + C2) as C1, C2 (a second piece of 0: none)."""
    pid_m = tl.program_id(0)
    pid_o = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    cnt = tl.load(count_ptr + b)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    colm = offs_m < M
    qs_b = qs_ptr + b * N * Dq
    qc_b = qc_ptr + b * M * Dq
    fc_b = fc_ptr + b * M * C
    do_b = do_ptr + b * N * C
    d0 = pid_o * (D1 + D2)
    c0 = pid_o * (C1 + C2)
    if NEED_DK:
        dk1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
        if D2 > 0:
            dk2 = tl.zeros([BLOCK_M, D2], dtype=tl.float32)
    if NEED_DV:
        dv1 = tl.zeros([BLOCK_M, C1], dtype=tl.float32)
        if C2 > 0:
            dv2 = tl.zeros([BLOCK_M, C2], dtype=tl.float32)
    for start_n in range(0, cnt, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        rmask = offs_n < cnt
        rows = tl.load(order_ptr + b * N + offs_n, mask=rmask, other=0)
        st = _dot_rows(qc_b, offs_m, colm, qs_b, rows, rmask, Dq, BLOCK_M, BLOCK_N, BLOCK_D, COMPUTE, PREC)
        lse = tl.load(lse_ptr + b * N + rows, mask=rmask, other=0.0)
        pt = tl.where(colm[:, None] & rmask[None, :], tl.exp2(st * qk_scale - lse[None, :]), 0.0)
        if NEED_DK:
            dpt = _dot_rows(fc_b, offs_m, colm, do_b, rows, rmask, C, BLOCK_M, BLOCK_N, BLOCK_C, COMPUTE, PREC)
            di = tl.load(di_ptr + b * N + rows, mask=rmask, other=0.0)
            dst = (pt * (dpt - di[None, :])).to(COMPUTE)
            dk1 += tl.dot(dst, _tile(qs_b, rows, rmask, Dq, d0, D1).to(COMPUTE), input_precision=PREC)
            if D2 > 0:
                dk2 += tl.dot(dst, _tile(qs_b, rows, rmask, Dq, d0 + D1, D2).to(COMPUTE), input_precision=PREC)
        if NEED_DV:
            ptc = pt.to(COMPUTE)
            dv1 += tl.dot(ptc, _tile(do_b, rows, rmask, C, c0, C1).to(COMPUTE), input_precision=PREC)
            if C2 > 0:
                dv2 += tl.dot(ptc, _tile(do_b, rows, rmask, C, c0 + C1, C2).to(COMPUTE), input_precision=PREC)
    if NEED_DK:
        dqc_b = dqc_ptr + b * M * Dq
        _put(dqc_b, offs_m, colm, Dq, d0, dk1 * scale, D1)
        if D2 > 0:
            _put(dqc_b, offs_m, colm, Dq, d0 + D1, dk2 * scale, D2)
    if NEED_DV:
        dfc_b = dfc_ptr + b * M * C
        _put(dfc_b, offs_m, colm, C, c0, dv1, C1)
        if C2 > 0:
            _put(dfc_b, offs_m, colm, C, c0 + C1, dv2, C2)


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------

# every tile size the launchers read, with its minimum (tl.dot's 16); the BWD_ keys are the backward's
TILE_KEYS = {k: 16 for k in ("BLOCK_N", "BLOCK_M", "BLOCK_D", "BLOCK_C", "OUT_C", "BLOCK_R", "BLOCK_CC",
                             "BWD_BLOCK_N", "BWD_BLOCK_M", "BWD_DQ_BLOCK_N", "BWD_DQ_BLOCK_M", "BWD_BLOCK_D",
                             "BWD_BLOCK_C", "BWD_OUT", "BWD_BLOCK_R", "BWD_BLOCK_CC")}


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _out_chunk(dim: int, other: int, cap: int) -> int:
    """Width of the output feature chunk per program. Each extra chunk re-streams S (cost ∝ `other`), a wide
    chunk wastes its padding: minimise chunks·(other + chunk) over powers of two up to `cap`."""
    best, best_cost = 16, None
    w = 16
    while w <= cap:
        cost = triton.cdiv(max(dim, 1), w) * (other + w)
        if best_cost is None or cost < best_cost:
            best, best_cost = w, cost
        w *= 2
    return best


def _bwd_gpu_tiles(N: int, M: int, Dq: int, C: int, precision: str | None) -> dict[str, int]:
    """The backward's CUDA configuration. Register budget (255 per thread): the column kernel holds BWD_BLOCK_M ×
    (its dq_comp + dfeat_comp columns, ≤ 2 · 320 at cap 256) fp32 accumulators, 80 registers per thread at 32
    rows and 8 warps; the operand tiles, S / dP and their addresses take the rest, and ptxas fits the paper's
    320 + 320 without spilling only with 16-row steps, unpipelined (num_stages 1: the outer loop's loads are
    synchronous, the S / dP chunk loops software-pipeline under the dq kernel's 2 stages). "ieee" dots run on
    the CUDA cores from registers (every thread holds its rows' and columns' operands for the whole step), so
    they take 16-key column blocks."""
    return {
        "BWD_BLOCK_N": 16, "BWD_BLOCK_M": 16 if precision == "ieee" else 32, "BWD_DQ_BLOCK_N": 32,
        "BWD_DQ_BLOCK_M": 16, "BWD_BLOCK_D": 64, "BWD_BLOCK_C": 64, "BWD_OUT": 256, "BWD_BLOCK_R": 16,
        "BWD_BLOCK_CC": _pow2(C, 16, 128), "BWD_WARPS": 8, "BWD_STAGES_COL": 1, "BWD_STAGES_DQ": 2,
    }


def _pieces(width: int, cap: int) -> tuple[int, int] | None:
    """Two power-of-two pieces (P1 ≥ 16, P2 = 0 or 16 ≤ P2 ≤ P1 / 4, P1 ≤ cap) covering `width` columns, or None
    where none exist (e.g. 320 → (256, 64), 72 → (64, 16), 24 → (32, 0), 600 with cap 256 → None). The second
    piece is small so that it pads little and adds little to the registers."""
    p1 = max(16, min(cap, 1 << (max(width, 1).bit_length() - 1)))
    rest = width - p1
    if rest <= 0:
        return p1, 0
    p2 = max(16, triton.next_power_of_2(rest))
    if p2 <= p1 // 4:
        return p1, p2
    return (2 * p1, 0) if 2 * p1 <= cap else None


def bwd_pieces(Dq: int, C: int, cap: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The pieces (`_pieces` with `cap`) of the dq_subj / dq_comp columns and of the dfeat_comp columns that one
    backward program owns; chunk j owns the columns j·(P1 + P2) + [0, P1 + P2). Every chunk redoes S and dP (a
    cost ∝ Dq + C), so the fewest chunks that fit win: one (the paper's 320 = 256 + 64 at cap 256) unless a
    width exceeds cap + cap / 4, then n equal chunks (SD-1.5's 640: 2 × (256 + 64), 1280: 4 × (256 + 64))."""
    n = 1
    while True:
        pd, pc = _pieces(triton.cdiv(Dq, n), cap), _pieces(triton.cdiv(C, n), cap)
        if pd is not None and pc is not None:
            return pd, pc
        n += 1


def gpu_tiles(N: int, M: int, Dq: int, C: int, precision: str | None = None) -> dict[str, int]:
    """The CUDA launch configuration (every tile a power of two ≥ 16, as tl.dot needs); `precision` (one of
    PRECISIONS; None: a tensor-core one) picks the backward's tiles."""
    out_c = _out_chunk(C, Dq, 256)
    return {
        "BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_C": 64, "OUT_C": out_c,
        "BLOCK_R": 16, "BLOCK_CC": _pow2(C, 16, 256),
        "num_warps": 8 if out_c >= 256 else 4, "num_stages": 2,
        **_bwd_gpu_tiles(N, M, Dq, C, precision),
    }


def interpreter_tiles(N: int, M: int, Dq: int, C: int, precision: str | None = None) -> dict[str, int]:
    """Few, large programs (the interpreter's cost is per program and per op)."""
    return {
        "BLOCK_N": _pow2(N, 16, 64), "BLOCK_M": _pow2(M, 16, 64),
        "BLOCK_D": _pow2(Dq, 16, 128), "BLOCK_C": _pow2(C, 16, 128),
        "OUT_C": _pow2(C, 16, 128),
        "BLOCK_R": _pow2(N, 16, 64), "BLOCK_CC": _pow2(C, 16, 128),
        "num_warps": 4, "num_stages": 2,
        # the backward: one chunk of output columns up to 160 (128 + 32)
        "BWD_BLOCK_N": _pow2(N, 16, 64), "BWD_BLOCK_M": _pow2(M, 16, 64), "BWD_DQ_BLOCK_N": _pow2(N, 16, 64),
        "BWD_DQ_BLOCK_M": _pow2(M, 16, 64), "BWD_BLOCK_D": _pow2(Dq, 16, 128), "BWD_BLOCK_C": _pow2(C, 16, 128),
        "BWD_OUT": 128, "BWD_BLOCK_R": _pow2(N, 16, 64), "BWD_BLOCK_CC": _pow2(C, 16, 128), "BWD_WARPS": 4,
        "BWD_STAGES_COL": 1, "BWD_STAGES_DQ": 2,
    }


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
    cfg = tiles(N, M, Dq, C)
    compute, _, prec = _compute_dtype(precision or default_precision(qs.dtype))
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if C > 0:
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(C, cfg["OUT_C"]), B)
    else:  # still write lse (not needed by anything, but keep the buffer defined)
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), 1, B)
    _fwd_kernel[grid](
        qs, qc, fc, order, count, warped, lse, N, M, Dq, C, float(scale) * LOG2E,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], OUT_C=cfg["OUT_C"],
        COMPUTE=compute, PREC=prec, **opts,
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
    cfg = tiles(N, M, Dq, C, precision=precision)
    compute, do_dtype, prec = _compute_dtype(precision)
    need_do = need_qs or need_qc or need_fc
    d_o = _empty((B, N, C), device=dev, dtype=do_dtype) if need_do else warped
    di = _empty((B, N), device=dev, dtype=torch.float32) if need_do else lse
    if N > 0 and (need_do or need_fs):
        _bwd_prep_kernel[(triton.cdiv(N, cfg["BWD_BLOCK_R"]), B)](
            g, warped, fs, w, d_o, di, dfs if need_fs else fs, N, C, COSINE_EPS,
            BLOCK_R=cfg["BWD_BLOCK_R"], BLOCK_CC=cfg["BWD_BLOCK_CC"], NEED_DO=need_do, NEED_DFS=need_fs,
        )
    (d1, d2), (c1, c2) = bwd_pieces(Dq, C, cfg["BWD_OUT"])
    common = dict(
        BLOCK_D=cfg["BWD_BLOCK_D"], BLOCK_C=cfg["BWD_BLOCK_C"], D1=d1, D2=d2,
        COMPUTE=compute, PREC=prec, num_warps=cfg["BWD_WARPS"],
    )
    args = (qs, qc, fc, d_o, lse, di, order, count)
    sizes = (N, M, Dq, C, float(scale) * LOG2E, float(scale))
    if need_qs and N > 0:
        grid = (triton.cdiv(N, cfg["BWD_DQ_BLOCK_N"]), triton.cdiv(Dq, d1 + d2), B)
        _bwd_dq_kernel[grid](*args, dqs, *sizes, BLOCK_N=cfg["BWD_DQ_BLOCK_N"], BLOCK_M=cfg["BWD_DQ_BLOCK_M"],
                             num_stages=cfg["BWD_STAGES_DQ"], **common)
    if (need_qc or need_fc) and M > 0:
        chunks = max(triton.cdiv(Dq, d1 + d2) if need_qc else 1, triton.cdiv(C, c1 + c2) if need_fc else 1)
        grid = (triton.cdiv(M, cfg["BWD_BLOCK_M"]), chunks, B)
        _bwd_col_kernel[grid](*args, dqc if need_qc else qc, dfc if need_fc else fc, *sizes,
                              BLOCK_N=cfg["BWD_BLOCK_N"], BLOCK_M=cfg["BWD_BLOCK_M"], C1=c1, C2=c2, NEED_DK=need_qc,
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

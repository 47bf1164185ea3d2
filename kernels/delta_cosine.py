"""Compositional delta loss per row: 1 − cos(ortho(sc, ss), ortho(cc, cs)), forward and backward in Triton.

Notation, per row of the last dimension C: a = subj_single, b = subj_comp, c = cls_single, d = cls_comp,
x·y = Σ_i x_i y_i (fp32 accumulation whatever the input dtype), ε = the ortho eps, ε_c = 1e-8 (cosine eps).

Forward
    D_a = a·a + ε,  α = (a·b)/D_a,  Δs = b − α·a          (= ortho(b, a))
    D_c = c·c + ε,  β = (c·d)/D_c,  Δc = d − β·c          (= ortho(d, c))
    n1 = |Δs|, n2 = |Δc|, N1 = max(n1, ε_c), N2 = max(n2, ε_c), P = Δs·Δc
    cos = P / (N1·N2),  loss = 1 − cos
This is torch.nn.functional.cosine_similarity's formula (Σ (x/max(|x|, ε_c))·(y/max(|y|, ε_c))), including
its gradient, which differentiates the norm even where the clamp is active (checked on the installed torch).

Precision. Everything is closed-form in dot products, but the obvious closed form
|Δs|² = b·b − (a·b)²(2D_a − a·a)/D_a² cancels catastrophically when b is nearly parallel to a (the normal case:
composition features stay close to the single ones; with b = a(1+1e-3) + 1e-3·noise, fp32 loses ~1e-2 of the
loss). So no dot product is taken of the raw inputs where a delta is meant. Each program holds a chunk k of
a row in registers, projects it with a *chunk-local* coefficient α_k = (a·b)_k / ((a·a)_k + ε) and forms
e_k = b − α_k·a elementwise (likewise f_k = d − β_k·c); then over the whole row, with δ_k = α_k − α and
η_k = β_k − β (α, β from the summed partials), Δs restricted to chunk k is exactly e_k + δ_k·a, so
    |Δs|² = Σ_k e·e + δ_k(2 e·a + δ_k a·a)        |Δc|² = Σ_k f·f + η_k(2 f·c + η_k c·c)
    P     = Σ_k e·f + η_k e·c + δ_k (a·f + η_k a·c)
where e ⟂ a within the chunk (e·a ≈ 0), so each term is a small non-negative-ish piece: no cancellation, and
the result is as accurate as computing the deltas explicitly (the fp32 reference's level). A row that fits
one chunk (C ≤ 4096) is one program's work (δ = η = 0: e = Δs exactly), several rows per program for short
rows; longer rows are split into chunks whose 14 partial sums go to a small fp32 workspace
[rows, chunks, 16] and a second small kernel combines them (one program per row, walking the chunks
BLOCK_K at a time). Every input element is read once.

Backward, upstream g = dL/dloss per row, G = −g (= dL/dcos):
    p1 = −cos/(N1·n1) (0 when n1 = 0),  p2 = −cos/(N2·n2) (0 when n2 = 0),  q = 1/(N1·N2)
    gs = dL/dΔs = G(p1·Δs + q·Δc),     gc = dL/dΔc = G(p2·Δc + q·Δs)
    Δs·a = (a·b)·ε/D_a,  Δc·c = (c·d)·ε/D_c,  Δs·c and Δc·a from the forward's partials (no cancellation)
    r_s = gs·a/D_a = G(p1·Δs·a + q·Δc·a)/D_a,   r_c = gc·c/D_c = G(p2·Δc·c + q·Δs·c)/D_c
    d subj_comp   = gs − r_s·a               d subj_single = −α·(d subj_comp) − r_s·Δs
    d cls_comp    = gc − r_c·c               d cls_single  = −β·(d cls_comp)  − r_c·Δc
(the ortho backward of kernels/ortho_subtract.py, −α·g − r·b + 2α·r·a, regrouped around Δs).
So each gradient is a per-row linear combination of the four inputs; the forward stores 7 per-row scalars
(α, β, p1, p2, q, r_s/G, r_c/G) and the backward is one streaming pass: it reads the four inputs and writes
only the gradients asked for (constexpr flags).
With ε = 0 and an all-zero single row the reference divides 0/0; here the coefficients are guarded (α = 0),
so zero rows always give finite losses (1 − 0 = 1) and finite gradients.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._runtime import COSINE_EPS, policy_for_this_process

N_STATS = 8  # per-row scalars saved for the backward: α, β, p1, p2, q, r_s/G, r_c/G, (pad)
N_PART = 16  # per-(row, chunk) partial sums of the split path (14 used)

MAX_CHUNK = 4096  # the most elements of one input a program holds in registers
TILE = 4096  # rows × padded C per program for short rows
TILE_KEYS = {"ROWS": 1, "BLOCK_C": 16, "BLOCK_K": 16}


def _empty(shape, *, dtype, device) -> torch.Tensor:
    """Every buffer the launchers allocate (tests replace this with a NaN-filling version)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _row_chunk(n_rows, n_cols, n_chunks, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's rows and column chunk: (rows, row mask, element mask, element offsets)."""
    pid = tl.program_id(0).to(tl.int64)
    rblk = pid // n_chunks
    chunk = pid - rblk * n_chunks
    rows = rblk * ROWS + tl.arange(0, ROWS)
    cols = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < n_rows
    m = rmask[:, None] & (cols < n_cols)[None, :]
    offs = rows[:, None] * n_cols + cols[None, :]
    return chunk, rows, rmask, m, offs


@triton.jit
def _load_inputs(ss_ptr, sc_ptr, cs_ptr, cc_ptr, offs, m):
    """The chunk of a, b, c, d (subj_single, subj_comp, cls_single, cls_comp) in fp32."""
    a = tl.load(ss_ptr + offs, mask=m, other=0.0).to(tl.float32)
    b = tl.load(sc_ptr + offs, mask=m, other=0.0).to(tl.float32)
    c = tl.load(cs_ptr + offs, mask=m, other=0.0).to(tl.float32)
    d = tl.load(cc_ptr + offs, mask=m, other=0.0).to(tl.float32)
    return a, b, c, d


@triton.jit
def _projection(dot, sq, eps):
    """(D, coefficient) of ortho: D = sq + eps, dot / D guarded to 0 where D is not positive (ε = 0, zero row)."""
    den = sq + eps
    return den, tl.where(den > 0, dot / tl.where(den > 0, den, 1.0), 0.0)


@triton.jit
def _finalize(rows, rmask, loss_ptr, stats_ptr, n1sq, n2sq, prod, alpha, beta, ab, den_a, cd, den_c, s_dot_c,
              c_dot_a, eps, cos_eps, STATS: tl.constexpr):
    n1 = tl.sqrt(tl.maximum(n1sq, 0.0))
    n2 = tl.sqrt(tl.maximum(n2sq, 0.0))
    big1 = tl.maximum(n1, cos_eps)
    big2 = tl.maximum(n2, cos_eps)
    q = 1.0 / (big1 * big2)
    cos = prod * q
    tl.store(loss_ptr + rows, 1.0 - cos, mask=rmask)
    if STATS:
        p1 = tl.where(n1 > 0, -cos / (big1 * tl.where(n1 > 0, n1, 1.0)), 0.0)
        p2 = tl.where(n2 > 0, -cos / (big2 * tl.where(n2 > 0, n2, 1.0)), 0.0)
        da = tl.where(den_a > 0, den_a, 1.0)
        dc = tl.where(den_c > 0, den_c, 1.0)
        s_dot_a = ab * eps / da  # Δs·a in closed form (exact: a·b − α a·a)
        c_dot_c = cd * eps / dc  # Δc·c
        rs = (p1 * s_dot_a + q * c_dot_a) / da
        rc = (p2 * c_dot_c + q * s_dot_c) / dc
        st = stats_ptr + rows * 8
        tl.store(st + 0, alpha, mask=rmask)
        tl.store(st + 1, beta, mask=rmask)
        tl.store(st + 2, p1, mask=rmask)
        tl.store(st + 3, p2, mask=rmask)
        tl.store(st + 4, q, mask=rmask)
        tl.store(st + 5, rs, mask=rmask)
        tl.store(st + 6, rc, mask=rmask)


@triton.jit
def _dc_fwd_kernel(
    ss_ptr, sc_ptr, cs_ptr, cc_ptr, loss_ptr, stats_ptr, part_ptr,
    n_rows, n_cols, n_chunks, eps, cos_eps,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT: tl.constexpr, STATS: tl.constexpr,
):
    chunk, rows, rmask, m, offs = _row_chunk(n_rows, n_cols, n_chunks, ROWS, BLOCK_C)
    a, b, c, d = _load_inputs(ss_ptr, sc_ptr, cs_ptr, cc_ptr, offs, m)
    aa = tl.sum(a * a, 1)
    ab = tl.sum(a * b, 1)
    cc = tl.sum(c * c, 1)
    cd = tl.sum(c * d, 1)
    den_a, alpha = _projection(ab, aa, eps)
    den_c, beta = _projection(cd, cc, eps)
    e = b - alpha[:, None] * a  # this chunk's own rejection of b from a
    f = d - beta[:, None] * c
    ee = tl.sum(e * e, 1)
    ff = tl.sum(f * f, 1)
    ef = tl.sum(e * f, 1)
    ec = tl.sum(e * c, 1)
    fa = tl.sum(f * a, 1)
    if SPLIT:
        ea = tl.sum(e * a, 1)
        fc = tl.sum(f * c, 1)
        ac = tl.sum(a * c, 1)
        p = part_ptr + (rows * n_chunks + chunk) * 16
        tl.store(p + 0, aa, mask=rmask)
        tl.store(p + 1, ab, mask=rmask)
        tl.store(p + 2, cc, mask=rmask)
        tl.store(p + 3, cd, mask=rmask)
        tl.store(p + 4, alpha, mask=rmask)
        tl.store(p + 5, beta, mask=rmask)
        tl.store(p + 6, ee, mask=rmask)
        tl.store(p + 7, ff, mask=rmask)
        tl.store(p + 8, ef, mask=rmask)
        tl.store(p + 9, ea, mask=rmask)
        tl.store(p + 10, fc, mask=rmask)
        tl.store(p + 11, ec, mask=rmask)
        tl.store(p + 12, fa, mask=rmask)
        tl.store(p + 13, ac, mask=rmask)
    else:
        _finalize(rows, rmask, loss_ptr, stats_ptr, ee, ff, ef, alpha, beta, ab, den_a, cd, den_c, ec, fa,
                  eps, cos_eps, STATS)


@triton.jit
def _chunk_partials(base, k0, ks, n_chunks):
    """Chunks k0 + ks of a row in the split path's workspace: which exist, and where their 16 partials start."""
    return (k0 + ks) < n_chunks, base + (k0 + ks) * 16


@triton.jit
def _dc_combine_kernel(
    part_ptr, loss_ptr, stats_ptr, n_rows, n_chunks, eps, cos_eps,
    BLOCK_K: tl.constexpr, STATS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = part_ptr + row * n_chunks * 16
    ks = tl.arange(0, BLOCK_K)
    s_aa = tl.zeros([BLOCK_K], dtype=tl.float32)
    s_ab = tl.zeros([BLOCK_K], dtype=tl.float32)
    s_cc = tl.zeros([BLOCK_K], dtype=tl.float32)
    s_cd = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, n_chunks, BLOCK_K):
        km, p = _chunk_partials(base, k0, ks, n_chunks)
        s_aa += tl.load(p + 0, mask=km, other=0.0)
        s_ab += tl.load(p + 1, mask=km, other=0.0)
        s_cc += tl.load(p + 2, mask=km, other=0.0)
        s_cd += tl.load(p + 3, mask=km, other=0.0)
    ab = tl.sum(s_ab, 0)
    cd = tl.sum(s_cd, 0)
    den_a, alpha = _projection(ab, tl.sum(s_aa, 0), eps)
    den_c, beta = _projection(cd, tl.sum(s_cc, 0), eps)
    n1 = tl.zeros([BLOCK_K], dtype=tl.float32)
    n2 = tl.zeros([BLOCK_K], dtype=tl.float32)
    pr = tl.zeros([BLOCK_K], dtype=tl.float32)
    s_c = tl.zeros([BLOCK_K], dtype=tl.float32)
    c_a = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, n_chunks, BLOCK_K):
        km, p = _chunk_partials(base, k0, ks, n_chunks)
        aa_k = tl.load(p + 0, mask=km, other=0.0)
        cc_k = tl.load(p + 2, mask=km, other=0.0)
        dl = tl.where(km, tl.load(p + 4, mask=km, other=0.0) - alpha, 0.0)  # δ_k = α_k − α
        et = tl.where(km, tl.load(p + 5, mask=km, other=0.0) - beta, 0.0)  # η_k = β_k − β
        ee = tl.load(p + 6, mask=km, other=0.0)
        ff = tl.load(p + 7, mask=km, other=0.0)
        ef = tl.load(p + 8, mask=km, other=0.0)
        ea = tl.load(p + 9, mask=km, other=0.0)
        fc = tl.load(p + 10, mask=km, other=0.0)
        ec = tl.load(p + 11, mask=km, other=0.0)
        fa = tl.load(p + 12, mask=km, other=0.0)
        ac = tl.load(p + 13, mask=km, other=0.0)
        n1 += ee + dl * (2.0 * ea + dl * aa_k)
        n2 += ff + et * (2.0 * fc + et * cc_k)
        pr += ef + et * ec + dl * (fa + et * ac)
        s_c += ec + dl * ac  # Δs·c
        c_a += fa + et * ac  # Δc·a
    _finalize(row, row < n_rows, loss_ptr, stats_ptr, tl.sum(n1, 0), tl.sum(n2, 0), tl.sum(pr, 0), alpha, beta,
              ab, den_a, cd, den_c, tl.sum(s_c, 0), tl.sum(c_a, 0), eps, cos_eps, STATS)


@triton.jit
def _side_grads(neg_g, q, p_ptr, r_ptr, rmask, coef, single, delta, other_delta, d_single_ptr, d_comp_ptr, offs, m,
                NEED_SINGLE: tl.constexpr, NEED_COMP: tl.constexpr):
    """One side's gradients (subject: single a, delta Δs, coefficient α; class: c, Δc, β), see the docstring:
    d comp = G(p·delta + q·other_delta) − r·single,  d single = −coef·(d comp) − r·delta."""
    p = neg_g * tl.load(p_ptr, mask=rmask, other=0.0)
    r = neg_g * tl.load(r_ptr, mask=rmask, other=0.0)
    d_comp = p[:, None] * delta + q[:, None] * other_delta - r[:, None] * single
    if NEED_COMP:
        tl.store(d_comp_ptr + offs, d_comp.to(d_comp_ptr.dtype.element_ty), mask=m)
    if NEED_SINGLE:
        d_single = -coef[:, None] * d_comp - r[:, None] * delta
        tl.store(d_single_ptr + offs, d_single.to(d_single_ptr.dtype.element_ty), mask=m)


@triton.jit
def _dc_bwd_kernel(
    ss_ptr, sc_ptr, cs_ptr, cc_ptr, g_ptr, stats_ptr, dss_ptr, dsc_ptr, dcs_ptr, dcc_ptr,
    n_rows, n_cols, n_chunks,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
    NEED_SS: tl.constexpr, NEED_SC: tl.constexpr, NEED_CS: tl.constexpr, NEED_CC: tl.constexpr,
    SUBJ: tl.constexpr, CLS: tl.constexpr,
):
    _, rows, rmask, m, offs = _row_chunk(n_rows, n_cols, n_chunks, ROWS, BLOCK_C)
    st = stats_ptr + rows * 8
    neg_g = -tl.load(g_ptr + rows, mask=rmask, other=0.0)
    alpha = tl.load(st + 0, mask=rmask, other=0.0)
    beta = tl.load(st + 1, mask=rmask, other=0.0)
    q = neg_g * tl.load(st + 4, mask=rmask, other=0.0)
    a, b, c, d = _load_inputs(ss_ptr, sc_ptr, cs_ptr, cc_ptr, offs, m)
    ds = b - alpha[:, None] * a
    dc = d - beta[:, None] * c
    if SUBJ:  # NEED_SS or NEED_SC: p1 and r_s/G at slots 2 and 5
        _side_grads(neg_g, q, st + 2, st + 5, rmask, alpha, a, ds, dc, dss_ptr, dsc_ptr, offs, m, NEED_SS, NEED_SC)
    if CLS:  # NEED_CS or NEED_CC: p2 and r_c/G at slots 3 and 6
        _side_grads(neg_g, q, st + 3, st + 6, rmask, beta, c, dc, ds, dcs_ptr, dcc_ptr, offs, m, NEED_CS, NEED_CC)


def gpu_tiles(n_rows: int, n_cols: int) -> dict[str, int]:
    """Rows per program and BLOCK_C: a whole row per program up to MAX_CHUNK columns (several rows for short
    rows), else chunks of MAX_CHUNK (the split path). The chunks per row are cdiv(n_cols, BLOCK_C); the
    combine kernel reads up to BLOCK_K chunks' partials per step (its work is tiny: a few steps suffice)."""
    if n_cols <= MAX_CHUNK:
        block_c = max(16, triton.next_power_of_2(n_cols))
        rows_per = max(1, min(TILE // block_c, triton.next_power_of_2(max(n_rows, 1))))
    else:
        rows_per, block_c = 1, MAX_CHUNK
    warps = 8 if rows_per * block_c >= 2048 else 4
    return {"ROWS": rows_per, "BLOCK_C": block_c, "BLOCK_K": 16, "num_warps": warps}


interpreter_tiles = gpu_tiles  # one program per row chunk suits the interpreter too
tiles = policy_for_this_process(gpu_tiles, interpreter_tiles)  # what the launchers use (kernels/_runtime.py)


def _rows_view(t: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    return t.contiguous().reshape(n_rows, n_cols)


def delta_cosine_fwd(
    ss: torch.Tensor, sc: torch.Tensor, cs: torch.Tensor, cc: torch.Tensor, eps: float, stats: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses (shape `ss.shape[:-1]`, fp32) and the [rows, 8] fp32 scalars the backward needs."""
    n_cols = ss.shape[-1]
    n_rows = math.prod(ss.shape[:-1])
    dev = ss.device
    loss = _empty((n_rows,), dtype=torch.float32, device=dev)
    st = _empty((n_rows, N_STATS), dtype=torch.float32, device=dev)
    if n_rows == 0:
        return loss.view(ss.shape[:-1]), st
    a, b, c, d = (_rows_view(t, n_rows, n_cols) for t in (ss, sc, cs, cc))
    cfg = tiles(n_rows, n_cols)
    rows_per, block_c = cfg["ROWS"], cfg["BLOCK_C"]
    n_chunks = max(1, triton.cdiv(n_cols, block_c))  # a row of C = 0 is still one (empty) chunk
    split = n_chunks > 1
    part = _empty((n_rows, n_chunks, N_PART), dtype=torch.float32, device=dev) if split else loss
    grid = (triton.cdiv(n_rows, rows_per) * n_chunks,)
    _dc_fwd_kernel[grid](
        a, b, c, d, loss, st, part, n_rows, n_cols, n_chunks, eps, COSINE_EPS,
        ROWS=rows_per, BLOCK_C=block_c, SPLIT=split, STATS=stats, num_warps=cfg["num_warps"],
    )
    if split:
        _dc_combine_kernel[(n_rows,)](
            part, loss, st, n_rows, n_chunks, eps, COSINE_EPS,
            BLOCK_K=min(triton.next_power_of_2(n_chunks), cfg["BLOCK_K"]), STATS=stats,
        )
    return loss.view(ss.shape[:-1]), st


def delta_cosine_bwd(
    grad: torch.Tensor, ss: torch.Tensor, sc: torch.Tensor, cs: torch.Tensor, cc: torch.Tensor, st: torch.Tensor,
    need: tuple[bool, bool, bool, bool],
) -> list[torch.Tensor | None]:
    """Gradients w.r.t. (ss, sc, cs, cc) in the inputs' dtype; None where `need` is False."""
    n_cols = ss.shape[-1]
    n_rows = math.prod(ss.shape[:-1])
    outs = [_empty(ss.shape, dtype=ss.dtype, device=ss.device) if n else None for n in need]
    if n_rows == 0 or n_cols == 0 or not any(need):
        return outs
    a, b, c, d = (_rows_view(t, n_rows, n_cols) for t in (ss, sc, cs, cc))
    g = grad.float().contiguous().reshape(n_rows)
    cfg = tiles(n_rows, n_cols)
    rows_per, block_c = cfg["ROWS"], cfg["BLOCK_C"]
    n_chunks = max(1, triton.cdiv(n_cols, block_c))  # a row of C = 0 is still one (empty) chunk
    dummy = a
    ptrs = [o if o is not None else dummy for o in outs]
    _dc_bwd_kernel[(triton.cdiv(n_rows, rows_per) * n_chunks,)](
        a, b, c, d, g, st, *ptrs, n_rows, n_cols, n_chunks,
        ROWS=rows_per, BLOCK_C=block_c, NEED_SS=need[0], NEED_SC=need[1], NEED_CS=need[2], NEED_CC=need[3],
        SUBJ=need[0] or need[1], CLS=need[2] or need[3],
        num_warps=cfg["num_warps"],
    )
    return outs


# torch.library registration: opaque forward/backward custom ops with fake implementations, tied together
# by register_autograd, so torch.compile traces them without graph breaks. Which inputs need a gradient is
# an explicit argument (decided by the Python wrapper below), so the forward skips the backward's scalars
# when nothing needs them and the backward writes only the gradients asked for.
@torch.library.custom_op("adaface::delta_cosine_triton_fwd", mutates_args=())
def _fwd_op(
    ss: torch.Tensor, sc: torch.Tensor, cs: torch.Tensor, cc: torch.Tensor, eps: float,
    need_ss: bool, need_sc: bool, need_cs: bool, need_cc: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return delta_cosine_fwd(ss, sc, cs, cc, eps, stats=need_ss or need_sc or need_cs or need_cc)


@_fwd_op.register_fake
def _(ss, sc, cs, cc, eps, need_ss, need_sc, need_cs, need_cc):
    rows = math.prod(ss.shape[:-1])
    return ss.new_empty(ss.shape[:-1], dtype=torch.float32), ss.new_empty((rows, N_STATS), dtype=torch.float32)


@torch.library.custom_op("adaface::delta_cosine_triton_bwd", mutates_args=())
def _bwd_op(
    grad: torch.Tensor, ss: torch.Tensor, sc: torch.Tensor, cs: torch.Tensor, cc: torch.Tensor, st: torch.Tensor,
    need_ss: bool, need_sc: bool, need_cs: bool, need_cc: bool,
) -> list[torch.Tensor]:
    outs = delta_cosine_bwd(grad, ss, sc, cs, cc, st, (need_ss, need_sc, need_cs, need_cc))
    return [o if o is not None else ss.new_empty((0,)) for o in outs]


@_bwd_op.register_fake
def _(grad, ss, sc, cs, cc, st, need_ss, need_sc, need_cs, need_cc):
    return [ss.new_empty(ss.shape) if n else ss.new_empty((0,)) for n in (need_ss, need_sc, need_cs, need_cc)]


def _setup_context(ctx, inputs, output):
    ss, sc, cs, cc, eps, *need = inputs
    _, st = output
    ctx.save_for_backward(ss, sc, cs, cc, st)
    ctx.need = tuple(need)


def _backward(ctx, grad_loss, _grad_stats):
    ss, sc, cs, cc, st = ctx.saved_tensors
    outs = _bwd_op(grad_loss, ss, sc, cs, cc, st, *ctx.need)
    grads = [o if n else None for o, n in zip(outs, ctx.need)]
    return (*grads, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def delta_cosine_rows_triton(
    subj_single: torch.Tensor, subj_comp: torch.Tensor, cls_single: torch.Tensor, cls_comp: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Per-row `1 − cos(ortho(subj_comp, subj_single), ortho(cls_comp, cls_single))`, shape `[...]`, fp32.

    Differentiable w.r.t. every input that requires grad; the others get no gradient and no work.
    """
    grad_on = torch.is_grad_enabled()
    need = [grad_on and t.requires_grad for t in (subj_single, subj_comp, cls_single, cls_comp)]
    loss, _ = _fwd_op(subj_single, subj_comp, cls_single, cls_comp, float(eps), *need)
    return loss

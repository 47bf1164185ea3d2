"""Expanded attention (paper §2.2, Dynamic Model Expansion): one joint, flash-style softmax over E copies × S keys, forward and backward.

Notation, for one (b, h): q_e = q[:, e or 0], k_e = k[:, e or 0], v_e = v[:, e or 0] (a shared projection,
E = 1, is read at copy 0 through a copy stride of 0 and is never copied E times); bias β[l, j] (fp32, −inf =
masked, broadcast dimensions read with stride 0); causal: j > l masked.

Forward (one program per (b·h, L-block); loops: key blocks outside, copies e inside, so the bias tile and a
shared k/v tile are loaded once per key block; the loop is `_key_loop`, which the dQ kernel shares):
    s[l, e, j] = scale · q_e[l]·k_e[j] + β[l, j]                 (computed in base 2: × log2 e)
    m = max_{e,j} s,   ℓ = Σ_{e,j} exp(s − m),   O[l] = Σ_{e,j} exp(s − m) v_e[j] / ℓ
with the usual online rescaling (m and ℓ carried across (key block, copy) steps, fp32 accumulators).
Saved: O (q's dtype) and LSE[l] = m + log ℓ in fp32 (base 2). The [L, E·S] scores never reach global memory.
A row whose every slot is masked has m = −inf and ℓ = 0: it stores O = 0 and LSE = +inf, so that the
backward's P = exp(s − LSE) is exactly 0 there (zero gradients, no NaN).

Backward, with dO the output gradient and P[l, e, j] = exp(s[l, e, j] − LSE[l]) recomputed from the LSE:
    Δ[l]     = Σ_d dO[l, d] · O[l, d]                 (= Σ_{e,j} P·dP, the softmax row term, fp32)
    dP       = dO[l] · v_e[j]
    dS       = P ∘ (dP − Δ[l])
    dQ_e[l]  = scale · Σ_j dS[l, e, j] k_e[j]          (shared q: also Σ over e)
    dK_e[j]  = scale · Σ_l dS[l, e, j] q_e[l]          (shared k: also Σ over e)
    dV_e[j]  = Σ_l P[l, e, j] dO[l]                    (shared v: also Σ over e)
Two kernels, no atomics:
  * dQ (+Δ): one program per (b·h, L-block, e if q is expanded). It first computes Δ for its rows (stored by
    the e = 0 program, read by the next kernel), then loops over key blocks and copies (all E copies when q
    is shared, summing into one fp32 accumulator).
  * dK/dV: one program per (b·h, S-block, copy e), looping over query blocks. Each program writes its own
    [B, H, S, E, D] slot: copy e of an expanded projection's gradient, or copy e's fp32 partial of a shared one's,
    and the launcher sums the partials over the E copies (a fixed-order reduction, no atomics: the result is
    deterministic; the E copies fill the grid instead of running one after another in one program). With causal,
    query blocks that lie entirely before the key block are skipped (and the forward / dQ loop stops at the
    diagonal).

Head dimensions that are not a power of two (e.g. 40) are padded to the next power of two ≥ 16 with masked
loads; L and S of any size are masked per tile. fp16 / bf16 tiles feed tl.dot directly (fp32 accumulate);
P and dS are rounded to that dtype before their dots, as in FlashAttention;
fp32 inputs use IEEE fp32 dots unless torch allows TF32 matmuls. The bias is a constant (no gradient). Under TRITON_INTERPRET=1, bf16 tiles are
cast to fp32 before tl.dot (the interpreter's bf16 dot is wrong).

Tiles (`gpu_tiles`): on CUDA, for tensor-core dots (fp16, bf16, fp32 as TF32), BLOCK_L × BLOCK_S = 64 × 64
(forward), 64 × 32 (dQ), 32 × 64 (dK/dV), shrunk to the next power of two ≥ 16 of short sequences, 4 warps (8 for
D > 64), 3 pipeline stages (fp32: 2, or 1 and tiles ≤ 32 for D > 64, to stay under ~99 KB of shared memory on
sm_86). IEEE fp32 dots run on the FMA units with both operands' rows in registers: smaller tiles
(`_IEEE_TILES`, 32 × 32 forward and dQ, 16 × 32 dK/dV at D ≤ 64) keep them free of register spills. Under
the interpreter one tile up to 128 covers a short sequence (`interpreter_tiles`: its cost is per op, not per
element). b·h is grid axis 0 (no 65535 limit). The launchers take their tiles from `tiles` (kernels/_runtime.py
says how tests swap it), and allocate every buffer through `_empty` (tests fill them with NaN, so an element a
kernel forgets shows).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._runtime import interpreting, policy_for_this_process

_LOG2E = 1.4426950408889634
TILE_KEYS = {"BLOCK_L": 16, "BLOCK_S": 16}

# Allocation hook: tests replace it with a NaN-filling allocator so an element a kernel forgets to write shows.
_empty = torch.empty


@triton.jit
def _load_operand(ptrs, mask, DOT_F32: tl.constexpr):
    """A tile for tl.dot: zeros outside `mask`, cast to fp32 when the dtype's dot cannot be used (DOT_F32)."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if DOT_F32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _query_block(H, L, D, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """The forward's and dQ's program: its (b·h, b, h), query block index, row and head-dim offsets and masks."""
    bh = tl.program_id(0).to(tl.int64)  # b·h on axis 0: no 65535 limit
    pid_l = tl.program_id(1)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    return bh, bh // H, bh % H, pid_l, offs_l, offs_d, offs_l < L, offs_d < D


@triton.jit
def _key_loop(
    acc, m_i, l_i, do, lse, delta, e0, E_LOOP,
    q_ptrs, k_base, v_base, bias_base, pid_l, offs_l, lmask, offs_d, dmask, S,
    sqe, sks, ske, skd, svs, sve, svd, sbl, sbs, qk_scale,
    GRAD: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
    Q_EXP: tl.constexpr, K_EXP: tl.constexpr, V_EXP: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    """The forward's and dQ's loop: key blocks (outside) × copies e0 .. e0 + E_LOOP − 1 (inside) of one query block.

    A shared projection's tile (q: once; k, v: once per key block) is loaded outside the copy loop, an expanded
    one's per copy. GRAD false (forward): the online softmax, acc = Σ exp(s − m) v with (m_i, l_i); `do`, `lse`,
    `delta` are not read. GRAD true (dQ): acc += dS k with P = exp(s − lse); m_i and l_i come back untouched.
    """
    qmask = lmask[:, None] & dmask[None, :]
    if not Q_EXP:
        q_shared = _load_operand(q_ptrs, qmask, DOT_F32)
    hi = tl.minimum(S, (pid_l + 1) * BLOCK_L) if CAUSAL else S  # causal: stop at the block's diagonal
    for s0 in range(0, hi, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        smask = offs_s < S
        valid = lmask[:, None] & smask[None, :]
        if CAUSAL:
            valid = valid & (offs_s[None, :] <= offs_l[:, None])
        if HAS_BIAS:
            bias = tl.load(bias_base + offs_l[:, None] * sbl + offs_s[None, :] * sbs, mask=valid, other=0.0)
            bias = bias * 1.4426950408889634
        kvmask = smask[:, None] & dmask[None, :]
        k_ptrs = k_base + offs_s[:, None] * sks + offs_d[None, :] * skd
        v_ptrs = v_base + offs_s[:, None] * svs + offs_d[None, :] * svd
        if not K_EXP:
            k_shared = _load_operand(k_ptrs, kvmask, DOT_F32)
        if not V_EXP:
            v_shared = _load_operand(v_ptrs, kvmask, DOT_F32)
        for ee in range(E_LOOP):
            e = e0 + ee
            if Q_EXP:
                q = _load_operand(q_ptrs + e * sqe, qmask, DOT_F32)
            else:
                q = q_shared
            if K_EXP:
                k = _load_operand(k_ptrs + e * ske, kvmask, DOT_F32)
            else:
                k = k_shared
            if V_EXP:
                v = _load_operand(v_ptrs + e * sve, kvmask, DOT_F32)
            else:
                v = v_shared
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # base-2 logits
            if HAS_BIAS:
                s = s + bias
            s = tl.where(valid, s, float("-inf"))
            if GRAD:
                p = tl.math.exp2(s - lse[:, None])
                dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                ds = p * (dp - delta[:, None])
                acc += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.math.exp2(m_i - m_safe)
                p = tl.math.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
                m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, BIAS, OUT, LSE,
    sqb, sqh, sql, sqe, sqd,
    skb, skh, sks, ske, skd,
    svb, svh, svs, sve, svd,
    sbb, sbh, sbl, sbs,
    H, L, S, E, D, qk_scale,
    HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
    Q_EXP: tl.constexpr, K_EXP: tl.constexpr, V_EXP: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    bh, b, h, pid_l, offs_l, offs_d, lmask, dmask = _query_block(H, L, D, BLOCK_L, BLOCK_D)
    m_i = tl.full([BLOCK_L], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_L], dtype=tl.float32)
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = _key_loop(
        acc, m_i, l_i, acc, m_i, l_i, 0, E,
        Q + b * sqb + h * sqh + offs_l[:, None] * sql + offs_d[None, :] * sqd,
        K + b * skb + h * skh, V + b * svb + h * svh, BIAS + b * sbb + h * sbh,
        pid_l, offs_l, lmask, offs_d, dmask, S, sqe, sks, ske, skd, svs, sve, svd, sbl, sbs, qk_scale,
        False, HAS_BIAS, CAUSAL, Q_EXP, K_EXP, V_EXP, BLOCK_L, BLOCK_S, DOT_F32, PREC,
    )
    has_mass = l_i > 0.0
    out = acc / tl.where(has_mass, l_i, 1.0)[:, None]
    lse = tl.where(has_mass, m_i + tl.math.log2(tl.where(has_mass, l_i, 1.0)), float("inf"))
    o_ptrs = OUT + bh * L * D + offs_l[:, None] * D + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=lmask[:, None] & dmask[None, :])
    tl.store(LSE + bh * L + offs_l, lse, mask=lmask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, BIAS, OUT, DO, LSE, DELTA, DQ,
    sqb, sqh, sql, sqe, sqd,
    skb, skh, sks, ske, skd,
    svb, svh, svs, sve, svd,
    sbb, sbh, sbl, sbs,
    sdob, sdoh, sdol, sdod,
    H, L, S, E_LOOP, DQ_E, D, qk_scale, scale,
    HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
    Q_EXP: tl.constexpr, K_EXP: tl.constexpr, V_EXP: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    bh, b, h, pid_l, offs_l, offs_d, lmask, dmask = _query_block(H, L, D, BLOCK_L, BLOCK_D)
    pid_e = tl.program_id(2)
    rmask = lmask[:, None] & dmask[None, :]

    # Δ = rowsum(dO ∘ O) in fp32, for this program's rows; the e = 0 program stores it for the dK/dV kernel.
    do = tl.load(DO + b * sdob + h * sdoh + offs_l[:, None] * sdol + offs_d[None, :] * sdod, mask=rmask, other=0.0)
    o = tl.load(OUT + bh * L * D + offs_l[:, None] * D + offs_d[None, :], mask=rmask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if pid_e == 0:
        tl.store(DELTA + bh * L + offs_l, delta, mask=lmask)
    lse = tl.load(LSE + bh * L + offs_l, mask=lmask, other=float("inf"))
    if DOT_F32:
        do = do.to(tl.float32)

    dq = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    dq, lse, delta = _key_loop(
        dq, lse, delta, do, lse, delta, pid_e, E_LOOP,
        Q + b * sqb + h * sqh + offs_l[:, None] * sql + offs_d[None, :] * sqd,
        K + b * skb + h * skh, V + b * svb + h * svh, BIAS + b * sbb + h * sbh,
        pid_l, offs_l, lmask, offs_d, dmask, S, sqe, sks, ske, skd, svs, sve, svd, sbl, sbs, qk_scale,
        True, HAS_BIAS, CAUSAL, Q_EXP, K_EXP, V_EXP, BLOCK_L, BLOCK_S, DOT_F32, PREC,
    )
    dq_ptrs = DQ + bh * L * DQ_E * D + offs_l[:, None] * (DQ_E * D) + pid_e * D + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=rmask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, BIAS, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sql, sqe, sqd,
    skb, skh, sks, ske, skd,
    svb, svh, svs, sve, svd,
    sbb, sbh, sbl, sbs,
    sdob, sdoh, sdol, sdod,
    H, L, S, E, D, qk_scale, scale,
    HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    e = tl.program_id(2)  # this program's copy (a shared projection is read with copy stride 0)
    b = bh // H
    h = bh % H
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    smask = offs_s < S
    dmask = offs_d < D
    kvmask = smask[:, None] & dmask[None, :]
    q_base = Q + b * sqb + h * sqh + e * sqe
    do_base = DO + b * sdob + h * sdoh
    bias_base = BIAS + b * sbb + h * sbh
    k = _load_operand(K + b * skb + h * skh + e * ske + offs_s[:, None] * sks + offs_d[None, :] * skd, kvmask, DOT_F32)
    v = _load_operand(V + b * svb + h * svh + e * sve + offs_s[:, None] * svs + offs_d[None, :] * svd, kvmask, DOT_F32)

    lo = (pid_s * BLOCK_S // BLOCK_L) * BLOCK_L if CAUSAL else 0  # causal: query blocks before the keys see none
    dk = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    for l0 in range(lo, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        lmask = offs_l < L
        rmask = lmask[:, None] & dmask[None, :]
        q = _load_operand(q_base + offs_l[:, None] * sql + offs_d[None, :] * sqd, rmask, DOT_F32)
        do = _load_operand(do_base + offs_l[:, None] * sdol + offs_d[None, :] * sdod, rmask, DOT_F32)
        lse = tl.load(LSE + bh * L + offs_l, mask=lmask, other=float("inf"))
        delta = tl.load(DELTA + bh * L + offs_l, mask=lmask, other=0.0)
        valid = smask[:, None] & lmask[None, :]
        if CAUSAL:
            valid = valid & (offs_s[:, None] <= offs_l[None, :])
        st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # [BLOCK_S, BLOCK_L] = sᵀ
        if HAS_BIAS:
            bias = tl.load(bias_base + offs_s[:, None] * sbs + offs_l[None, :] * sbl, mask=valid, other=0.0)
            st = st + bias * 1.4426950408889634
        st = tl.where(valid, st, float("-inf"))
        pt = tl.math.exp2(st - lse[None, :])
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    # [B, H, S, E, D] outputs: copy e of an expanded projection's gradient, or its fp32 partial when shared
    out = bh * S * E * D + offs_s[:, None] * (E * D) + e * D + offs_d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kvmask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kvmask)


# ----------------------------------------------------------------------------------------------- launchers


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> int:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 5:
            raise ValueError(f"expanded_attention_triton: `{name}` must have 5 dimensions, got {tuple(t.shape)}")
    B, H, L, Eq, D = q.shape
    S, Ek, Ev = k.shape[2], k.shape[3], v.shape[3]
    if k.shape != (B, H, S, Ek, D) or v.shape != (B, H, S, Ev, D):
        raise ValueError(
            f"expanded_attention_triton: `k` {tuple(k.shape)} / `v` {tuple(v.shape)} do not match `q` {tuple(q.shape)}"
        )
    copies = {Eq, Ek, Ev} - {1}
    if len(copies) > 1:
        raise ValueError(f"expanded_attention_triton: copy dimensions Eq={Eq}, Ek={Ek}, Ev={Ev} must be 1 or one E")
    if bias is not None:
        if bias.dim() != 4 or bias.dtype != torch.float32:
            raise ValueError("expanded_attention_triton: `bias` must be a 4-D fp32 tensor broadcastable to [B,H,L,S]")
        if any(s not in (1, t) for s, t in zip(bias.shape, (B, H, L, S))):
            raise ValueError(f"expanded_attention_triton: `bias` {tuple(bias.shape)} is not broadcastable to {(B, H, L, S)}")
    return max(copies) if copies else 1


def _np2(n: int) -> int:
    return max(16, triton.next_power_of_2(max(n, 1)))


# IEEE fp32 dots run on the FMA units, each thread holding its rows of both operands in registers: per kernel
# and head width (BLOCK_D > 64), tiles (BLOCK_L, BLOCK_S, warps, stages) that ptxas compiles without spilling on
# sm_80 and sm_90 at the paper's shape (multi-Q/V, D = 64), and the backward in every copy mode; the forward of
# some other modes spills at most 32 bytes per thread (bench/kernel_resources.py). The forward at D ≤ 64 runs
# unpipelined: with two stages triton 3.9 spills it (~1.4 KB per thread), triton 3.8 does not.
_IEEE_TILES = {
    ("fwd", False): (32, 32, 4, 1), ("dq", False): (32, 32, 4, 2), ("dkdv", False): (16, 32, 4, 2),
    ("fwd", True): (16, 32, 8, 1), ("dq", True): (16, 16, 8, 1), ("dkdv", True): (16, 32, 8, 1),
}


def gpu_tiles(L: int, S: int, D: int, dtype: torch.dtype, prec: str, kind: str) -> dict[str, int]:
    """BLOCK_L, BLOCK_S, warps and pipeline stages of kernel `kind` ("fwd", "dq", "dkdv") on CUDA, for operands of
    `dtype` multiplied at `prec` (`_dot_flags`).

    Tensor-core dots (fp16, bf16; fp32 as TF32): fp32 tiles are twice as large as fp16/bf16 ones, so with D > 64
    they shrink (and pipeline less) to stay under ~99 KB of shared memory (sm_86). IEEE fp32: `_IEEE_TILES`.
    """
    block_d = _np2(D)
    if dtype == torch.float32 and prec == "ieee":
        bl, bs, warps, stages = _IEEE_TILES[kind, block_d > 64]
        return {"BLOCK_L": min(_np2(L), bl), "BLOCK_S": min(_np2(S), bs), "num_warps": warps, "num_stages": stages}
    wide = dtype == torch.float32 and block_d > 64
    big = 32 if wide else 64
    if kind == "dkdv":
        bl, bs = min(_np2(L), 32), min(_np2(S), big)
    elif kind == "dq":
        bl, bs = min(_np2(L), big), min(_np2(S), 32)
    else:
        bl, bs = min(_np2(L), big), min(_np2(S), big)
    if dtype == torch.float32:
        stages = 2 if block_d <= 64 else 1
    else:  # a 3-stage forward of 64x64 tiles at D = 128 needs 104 KB of shared memory as the JIT specialises it
        stages = 2 if kind == "fwd" and block_d > 64 and bl * bs >= 64 * 64 else 3
    return {"BLOCK_L": bl, "BLOCK_S": bs, "num_warps": 4 if block_d <= 64 else 8, "num_stages": stages}


def interpreter_tiles(L: int, S: int, D: int, dtype: torch.dtype, prec: str, kind: str) -> dict[str, int]:
    """One tile up to 128 covers a short sequence: few, large programs."""
    return {"BLOCK_L": min(_np2(L), 128), "BLOCK_S": min(_np2(S), 128), "num_warps": 4, "num_stages": 1}


tiles = policy_for_this_process(gpu_tiles, interpreter_tiles)  # what the launchers use (kernels/_runtime.py)


def _dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    dot_f32 = dtype == torch.bfloat16 and interpreting()
    # input_precision only matters for fp32 operands: IEEE unless torch itself allows TF32 matmuls.
    prec = "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
    return dot_f32, prec


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    """Strides of a [B, H, N, E, D] input, with the copy stride 0 when the copy dimension has size 1 (shared)."""
    st = list(t.stride())
    if t.shape[3] == 1:
        st[3] = 0
    return tuple(st)


def _bias_strides(bias: torch.Tensor | None, shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    if bias is None:
        return (0, 0, 0, 0)
    return tuple(bias.expand(shape).stride())  # broadcast dims: stride 0


def expanded_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [B, H, L, D] in q's dtype, lse [B, H, L] fp32, base 2; +inf for fully masked rows)."""
    E = _check_inputs(q, k, v, bias)
    B, H, L, Eq, D = q.shape
    S, Ek, Ev = k.shape[2], k.shape[3], v.shape[3]
    out = _empty((B, H, L, D), device=q.device, dtype=q.dtype)
    lse = _empty((B, H, L), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        lse.fill_(float("inf"))
        return out, lse
    block_d = _np2(D)
    dot_f32, prec = _dot_flags(q.dtype)
    cfg = tiles(L, S, D, q.dtype, prec, "fwd")
    grid = (B * H, triton.cdiv(L, cfg["BLOCK_L"]))
    _fwd_kernel[grid](
        q, k, v, bias if bias is not None else q, out, lse,
        *_strides(q), *_strides(k), *_strides(v), *_bias_strides(bias, (B, H, L, S)),
        H, L, S, E, D, scale * _LOG2E,
        HAS_BIAS=bias is not None, CAUSAL=causal, Q_EXP=Eq > 1, K_EXP=Ek > 1, V_EXP=Ev > 1,
        BLOCK_D=block_d, DOT_F32=dot_f32, PREC=prec, **cfg,
    )
    return out, lse


def expanded_attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
    out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv), contiguous, shaped like q, k, v (a shared projection gets the sum over copies)."""
    E = _check_inputs(q, k, v, bias)
    B, H, L, Eq, D = q.shape
    S, Ek, Ev = k.shape[2], k.shape[3], v.shape[3]
    dq = _empty(q.shape, device=q.device, dtype=q.dtype)
    if B * H == 0 or D == 0 or L == 0 or S == 0:
        return dq.zero_(), k.new_zeros(k.shape), v.new_zeros(v.shape)
    block_d = _np2(D)
    dot_f32, prec = _dot_flags(q.dtype)
    delta = _empty((B, H, L), device=q.device, dtype=torch.float32)
    bias_arg = bias if bias is not None else q
    strides = (*_strides(q), *_strides(k), *_strides(v), *_bias_strides(bias, (B, H, L, S)), *dout.stride())
    flags = dict(
        HAS_BIAS=bias is not None, CAUSAL=causal, Q_EXP=Eq > 1, K_EXP=Ek > 1, V_EXP=Ev > 1,
        BLOCK_D=block_d, DOT_F32=dot_f32, PREC=prec,
    )
    qk_scale = scale * _LOG2E

    cfg = tiles(L, S, D, q.dtype, prec, "dq")
    q_split = Eq > 1  # expanded q: one program per copy; shared q: each program sums over the E copies
    _bwd_dq_kernel[(B * H, triton.cdiv(L, cfg["BLOCK_L"]), Eq)](
        q, k, v, bias_arg, out, dout, lse, delta, dq, *strides,
        H, L, S, 1 if q_split else E, Eq, D, qk_scale, scale, **cfg, **flags,
    )

    # dK/dV: one program per (b·h, S-block, copy), each writing its own [B, H, S, E, D] slot; a shared k or v
    # gets fp32 per-copy partials, summed over the copies afterwards (no atomics: deterministic).
    cfg = tiles(L, S, D, q.dtype, prec, "dkdv")
    dk = _empty((B, H, S, E, D), device=k.device, dtype=k.dtype if Ek == E else torch.float32)
    dv = _empty((B, H, S, E, D), device=v.device, dtype=v.dtype if Ev == E else torch.float32)
    _bwd_dkdv_kernel[(B * H, triton.cdiv(S, cfg["BLOCK_S"]), E)](
        q, k, v, bias_arg, dout, lse, delta, dk, dv, *strides,
        H, L, S, E, D, qk_scale, scale, HAS_BIAS=bias is not None, CAUSAL=causal,
        BLOCK_D=block_d, DOT_F32=dot_f32, PREC=prec, **cfg,
    )
    if Ek != E:
        dk = dk.sum(3, keepdim=True).to(k.dtype)
    if Ev != E:
        dv = dv.sum(3, keepdim=True).to(v.dtype)
    return dq, dk, dv


# torch.library registration: opaque forward/backward custom ops with fake implementations, tied together by
# register_autograd, so torch.compile traces them without graph breaks.
@torch.library.custom_op("adaface::expanded_attention_triton_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return expanded_attention_fwd(q, k, v, bias, causal, scale)


@_fwd_op.register_fake
def _(q, k, v, bias, causal, scale):
    B, H, L, _, D = q.shape
    return q.new_empty((B, H, L, D)), q.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op("adaface::expanded_attention_triton_bwd", mutates_args=())
def _bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
    out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return expanded_attention_bwd(dout, q, k, v, bias, out, lse, causal, scale)


@_bwd_op.register_fake
def _(dout, q, k, v, bias, out, lse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, out, lse)
    ctx.causal = causal
    ctx.scale = scale


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, bias, out, lse = ctx.saved_tensors
    dq, dk, dv = _bwd_op(grad_out, q, k, v, bias, out, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def expanded_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, causal: bool, scale: float
) -> torch.Tensor:
    """q [B,H,L,Eq,D], k [B,H,S,Ek,D], v [B,H,S,Ev,D] (any strides), bias fp32 4-D or None → out [B,H,L,D].

    Differentiable w.r.t. q, k, v; the bias is treated as a constant (its gradient is not computed).
    """
    if bias is not None:
        bias = bias.detach()
    if not math.isfinite(scale):
        raise ValueError(f"expanded_attention_triton: `scale` must be finite, got {scale}")
    out, _ = _fwd_op(q, k, v, bias, bool(causal), float(scale))
    return out

"""Input builders for expanded attention, shared by tests/test_expanded_attention.py and the benchmark.

Modes name which projections are expanded (E copies); the others are shared (copy dimension of size 1):
"none" (E = 1 everywhere, plain attention), "q", "k", "v", "qk", "qv" (the paper's multi-Q/V), "kv" (the
reference code's CLIPAttentionMKV), "qkv".

Layouts, as a model produces them:
- "contig":   each tensor allocated as [B, H, N, E, D] (contiguous);
- "proj":     a [B, N, H, E, D] projection output permuted to [B, H, N, E, D] (non-contiguous view);
- "expand":   shared projections are [B, H, N, 1, D] expanded to E copies with stride 0 (an expanded copy
              dimension that is really one tensor; its gradient is the sum over copies);
- "dstride":  the head dimension has stride 2 (a slice of a wider buffer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("none", "q", "k", "v", "qk", "qv", "kv", "qkv")
LAYOUTS = ("contig", "proj", "expand", "dstride")


def copies(mode: str, E: int) -> tuple[int, int, int]:
    """(Eq, Ek, Ev) for `mode`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return tuple(E if (c in mode and mode != "none") else 1 for c in "qkv")


def make_leaves(
    B: int, H: int, L: int, S: int, D: int, E: int, mode: str = "qv", *,
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", layout: str = "contig",
    seed: int = 0, logit_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tensors that require grad, in the storage `layout` describes; `as_views` turns them into q, k, v.

    Values are drawn on the CPU from `seed` (fp32, then cast), so every device sees the same numbers.
    `logit_scale` multiplies q (large values give large logits).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    gen = torch.Generator().manual_seed(seed)
    leaves = []
    for n, c, s in zip((L, S, S), copies(mode, E), (logit_scale, 1.0, 1.0)):
        if layout == "proj":
            shape = (B, n, H, c, D)
        elif layout == "dstride":
            shape = (B, H, n, c, 2 * D)
        else:
            shape = (B, H, n, c, D)
        leaves.append((torch.randn(shape, generator=gen) * s).to(device=device, dtype=dtype).requires_grad_())
    return tuple(leaves)


def as_views(
    leaves: tuple[torch.Tensor, torch.Tensor, torch.Tensor], layout: str, E: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B,H,L,Eq,D], k [B,H,S,Ek,D], v [B,H,S,Ev,D] as (differentiable) views of `leaves`."""
    out = []
    for t in leaves:
        if layout == "proj":
            t = t.permute(0, 2, 1, 3, 4)
        elif layout == "dstride":
            t = t[..., ::2]
        elif layout == "expand" and t.shape[3] == 1 and E > 1:
            t = t.expand(-1, -1, -1, E, -1)
        out.append(t)
    return tuple(out)


def make_qkv(
    B: int, H: int, L: int, S: int, D: int, E: int, mode: str = "qv", *,
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", layout: str = "contig",
    seed: int = 0, logit_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (views of leaves that require grad) for the given mode and layout."""
    leaves = make_leaves(
        B, H, L, S, D, E, mode, dtype=dtype, device=device, layout=layout, seed=seed, logit_scale=logit_scale
    )
    return as_views(leaves, layout, E)


MASKS = ("none", "kpm", "bool_b11s", "bool_ls", "float_bhls", "float_1h1s", "bool_bhl1", "kpm+float_ls")


def make_masks(
    kind: str, B: int, H: int, L: int, S: int, *, device: torch.device | str = "cpu", seed: int = 1,
    p_masked: float = 0.3,
) -> dict[str, torch.Tensor]:
    """Keyword arguments (`key_padding_mask`, `attn_mask`) of the given kind; each keeps key 0 visible.

    bool masks: True = attend. float masks: additive, with some -inf entries.
    """
    gen = torch.Generator().manual_seed(seed)

    def keep(shape):
        m = torch.rand(shape, generator=gen) > p_masked
        m[..., 0] = True
        return m

    def additive(shape):
        f = torch.randn(shape, generator=gen)
        return f.masked_fill(~keep(shape), float("-inf"))

    out: dict[str, torch.Tensor] = {}
    if kind == "none":
        pass
    elif kind == "kpm":
        out["key_padding_mask"] = keep((B, S))
    elif kind == "bool_b11s":
        out["attn_mask"] = keep((B, 1, 1, S))
    elif kind == "bool_ls":
        out["attn_mask"] = keep((L, S))
    elif kind == "float_bhls":
        out["attn_mask"] = additive((B, H, L, S))
    elif kind == "float_1h1s":
        out["attn_mask"] = additive((1, H, 1, S))
    elif kind == "bool_bhl1":
        out["attn_mask"] = torch.ones(B, H, L, 1, dtype=torch.bool)
    elif kind == "kpm+float_ls":
        out["key_padding_mask"] = keep((B, S))
        out["attn_mask"] = additive((L, S))
    else:
        raise ValueError(f"mask kind must be one of {MASKS}, got {kind!r}")
    return {k: v.to(device) for k, v in out.items()}


def attention_flops(B: int, H: int, L: int, S: int, D: int, E: int, causal: bool, backward: bool = False) -> float:
    """Useful matmul flops: the forward's 2 GEMMs (QKᵀ, PV) of 2·B·H·L·E·S·D each (half when causal); the
    backward's 5 (QKᵀ recomputed, dV, dP, dQ, dK) make forward + backward 3.5 × the forward (flash accounting)."""
    fwd = 4.0 * B * H * L * E * S * D * (0.5 if causal else 1.0)
    return fwd * 3.5 if backward else fwd


def sdpa_composition(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    """Expanded attention built from one `scaled_dot_product_attention` call (a benchmark baseline).

    The joint softmax over E·S slots is one SDPA over E·S keys:
    - q shared (modes "none", "k", "v", "kv"): the E key / value copies are concatenated along the key axis
      (k, v → [B, H, E·S, D], a copy of shared ones E times), q as is; the causal mask is tril(L, S) tiled
      E times along the keys ([L, E·S] bool).
    - q expanded ("q", "qv", "qk", "qkv"): logit[e, j] = q_e·k_e[j] needs E different queries, which one
      SDPA call only gets through a block-diagonal key: q' = [q_0 | … | q_{E-1}] ([B, H, L, E·D]) and
      k'[(e, j)] = k_e[j] placed in feature block e (zeros elsewhere, [B, H, E·S, E·D]), so
      q'·k'[(e, j)] = q_e·k_e[j]; v' as above. It is exact but does E× the QKᵀ work on an E×-wider key.
    `scale` defaults to D ** -0.5 of the original head dimension (passed explicitly, as q' is wider).
    """
    B, H, L, Eq, D = q.shape
    S = k.shape[2]
    E = max(Eq, k.shape[3], v.shape[3])
    scale = D**-0.5 if scale is None else scale

    def slots(t):  # [B, H, S, E or 1, D] → [B, H, E·S, D], copy-major
        return t.expand(B, H, S, E, D).permute(0, 1, 3, 2, 4).reshape(B, H, E * S, D)

    mask = None
    if causal:
        mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril().repeat(1, E)
    vs = slots(v)
    if Eq == 1:
        return F.scaled_dot_product_attention(q[:, :, :, 0], slots(k), vs, attn_mask=mask, scale=scale)
    qs = q.reshape(B, H, L, E * D)
    eye = torch.eye(E, device=q.device, dtype=q.dtype)  # k'[b, h, (e, j), (f, d)] = δ_ef · k_e[j, d]
    kbd = torch.einsum("bhsed,ef->bhesfd", k.expand(B, H, S, E, D), eye).reshape(B, H, E * S, E * D)
    return F.scaled_dot_product_attention(qs, kbd, vs, attn_mask=mask, scale=scale)

"""Expanded attention (paper §2.2, Dynamic Model Expansion): E paired copies of q/k/v, one joint softmax.

For query token l, with each of q, k, v either shared (E = 1) or expanded (E copies):
    logit[e, j] = scale · q[l, e or 0] · k[j, e or 0]
    P = softmax over all (e, j) jointly
    out[l] = Σ_e Σ_j P[e, j] · v[j, e or 0]
With E = 1 everywhere this is ordinary attention (it matches scaled_dot_product_attention).
"""

from __future__ import annotations

import torch

from ._backend import resolve_backend
from ._checks import check_scale, check_tensor

_OP = "expanded_attention"
_LAYOUT_Q = "[B, H, L, Eq, D]"
_LAYOUT_KV = "[B, H, S, E, D]"


def _validate(q, k, v, causal, key_padding_mask, attn_mask, scale) -> int:
    check_tensor(_OP, "q", q, ndim=5, layout=_LAYOUT_Q)
    check_tensor(_OP, "k", k, ndim=5, layout=_LAYOUT_KV)
    check_tensor(_OP, "v", v, ndim=5, layout=_LAYOUT_KV)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{_OP}: `{name}` has dtype {t.dtype} but `q` has {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{_OP}: `{name}` is on {t.device} but `q` is on {q.device}")
    B, H, L, Eq, D = q.shape
    S = k.shape[2]
    if k.shape[:2] != (B, H) or k.shape[4] != D:
        raise ValueError(f"{_OP}: `k` must have shape [B={B}, H={H}, S, Ek, D={D}], got {tuple(k.shape)}")
    if v.shape[:3] != (B, H, S) or v.shape[4] != D:
        raise ValueError(f"{_OP}: `v` must have shape [B={B}, H={H}, S={S}, Ev, D={D}], got {tuple(v.shape)}")
    copies = {Eq, k.shape[3], v.shape[3]} - {1}
    if len(copies) > 1 or 0 in (Eq, k.shape[3], v.shape[3]):
        raise ValueError(
            f"{_OP}: the copy dimensions Eq={Eq}, Ek={k.shape[3]}, Ev={v.shape[3]} must each be 1 (shared) "
            "or one common E"
        )
    if D < 1:
        raise ValueError(f"{_OP}: the head dimension D of `q`, `k`, `v` must be at least 1, got {D}")
    if S < 1:
        raise ValueError(f"{_OP}: `k` and `v` must hold at least one key (S >= 1 in {_LAYOUT_KV}), got S={S}")
    if causal and L != S:
        raise ValueError(f"{_OP}: `causal=True` needs L == S, got L={L}, S={S}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise ValueError(f"{_OP}: `key_padding_mask` must be a bool tensor [B={B}, S={S}] (True = attend)")
        if tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(
                f"{_OP}: `key_padding_mask` must have shape [B={B}, S={S}], got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"{_OP}: `key_padding_mask` is on {key_padding_mask.device} but `q` is on {q.device}")
    if attn_mask is not None:
        is_tensor = isinstance(attn_mask, torch.Tensor)
        if not is_tensor or not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
            raise ValueError(f"{_OP}: `attn_mask` must be a bool or float tensor broadcastable to [B, H, L, S]")
        target = (B, H, L, S)
        shape = tuple(attn_mask.shape)
        ok = attn_mask.dim() <= 4 and all(
            s in (1, t) for s, t in zip(reversed(shape), reversed(target))
        )
        if not ok:
            raise ValueError(f"{_OP}: `attn_mask` of shape {shape} is not broadcastable to [B, H, L, S] = {target}")
        if attn_mask.device != q.device:
            raise ValueError(f"{_OP}: `attn_mask` is on {attn_mask.device} but `q` is on {q.device}")
    check_scale(_OP, scale, allow_none=True)
    return max(copies) if copies else 1


def attention_bias(
    q: torch.Tensor,
    k: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
) -> torch.Tensor | None:
    """Fold `key_padding_mask` and `attn_mask` into one additive fp32 bias, 4-D, broadcastable to [B, H, L, S].

    Masked-out slots hold -inf. Broadcast dimensions stay of size 1 so kernels can read them with stride 0.
    The causal mask is not folded in: kernels apply it from indices.
    """
    if key_padding_mask is None and attn_mask is None:
        return None
    B, _, L = q.shape[:3]
    S = k.shape[2]
    bias = None
    if attn_mask is not None:
        m = attn_mask
        while m.dim() < 4:
            m = m.unsqueeze(0)
        if m.dtype == torch.bool:
            bias = torch.zeros(m.shape, device=q.device, dtype=torch.float32).masked_fill(~m, float("-inf"))
        else:
            bias = m.to(torch.float32)
    if key_padding_mask is not None:
        kp = torch.zeros((B, 1, 1, S), device=q.device, dtype=torch.float32)
        kp = kp.masked_fill(~key_padding_mask.view(B, 1, 1, S), float("-inf"))
        bias = kp if bias is None else bias + kp
    return bias


def expanded_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Plain PyTorch: materialises the [B, H, L, E, S] logits. Rows with every slot masked give zeros.

    `upcast=True` computes in fp32; `upcast=False` in the inputs' dtype (PyTorch's own low-precision error).
    """
    B, H, L, _, D = q.shape
    S = k.shape[2]
    E = max(q.shape[3], k.shape[3], v.shape[3])
    scale = D**-0.5 if scale is None else float(scale)
    ct = torch.float32 if upcast else q.dtype
    qe = q.to(ct).expand(B, H, L, E, D)
    ke = k.to(ct).expand(B, H, S, E, D)
    ve = v.to(ct).expand(B, H, S, E, D)
    logits = torch.einsum("bhled,bhsed->bhles", qe, ke) * scale
    bias = attention_bias(q, k, key_padding_mask, attn_mask)
    if bias is not None:
        logits = logits + bias.to(ct).unsqueeze(3)
    if causal:
        future = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
        logits = logits.masked_fill(future.view(1, 1, L, 1, S), float("-inf"))
    flat = logits.reshape(B, H, L, E * S)
    row_max = flat.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(flat - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))  # fully masked rows: all-zero weights
    out = torch.einsum("bhles,bhsed->bhld", p.view(B, H, L, E, S), ve)
    return out.to(q.dtype)


def expanded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention over E paired copies with one joint softmax; q [B,H,L,Eq,D], k/v [B,H,S,E*,D] → [B,H,L,D].

    Each of Eq, Ek, Ev is 1 (that projection is shared by every copy, read with stride 0) or the common E.
    `key_padding_mask`: bool [B, S], True = attend. `attn_mask`: bool (True = attend) or additive float,
    broadcastable to [B, H, L, S], applied alike to every copy. `scale` defaults to D ** -0.5. A query row
    whose every slot is masked gives zeros.
    """
    _validate(q, k, v, causal, key_padding_mask, attn_mask, scale)
    which = resolve_backend(backend, q.device, _OP, supports=("torch", "triton"))
    if which == "triton":
        from adaface.kernels.expanded_attention import expanded_attention_triton

        scale_f = q.shape[-1] ** -0.5 if scale is None else float(scale)
        bias = attention_bias(q, k, key_padding_mask, attn_mask)
        return expanded_attention_triton(q, k, v, bias, causal, scale_f)
    return expanded_attention_reference(
        q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask, scale=scale
    )

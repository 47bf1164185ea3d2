"""adaface.testing.meta_memory: the meta-device estimate against real allocation on the CPU."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from adaface.testing.benchmarking import peak_memory_bytes
from adaface.testing.meta_memory import LiveBytes, fused_sdpa, module_bytes, prodigy_state_bytes, tensor_bytes
from adaface.testing.tiny_models import TinyConfig, tiny_unet


def _unet_step(model: torch.nn.Module, device: str) -> torch.Tensor:
    """Forward and backward to the context through a frozen UNet: the shape of the distillation steps."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=g).to(device)
    ctx = torch.randn(2, 77, 512, generator=g).to(device).requires_grad_(True)
    out = model(x, torch.tensor([10, 500], device=device), encoder_hidden_states=ctx).sample
    out.float().pow(2).mean().backward()
    return ctx.grad


def test_meta_estimate_matches_real_cpu_allocation_within_10_percent():
    unet = tiny_unet(replace(TinyConfig(), latent_size=32)).requires_grad_(False)
    meta = copy.deepcopy(unet).to("meta")
    real = peak_memory_bytes(lambda: _unet_step(unet, "cpu"), torch.device("cpu"))
    tracker = LiveBytes()
    with fused_sdpa(), tracker:
        _unet_step(meta, "meta")
    assert real > 0
    assert abs(tracker.peak - real) <= 0.10 * real, (tracker.peak, real)


def test_math_path_on_meta_would_overstate_attention():
    """Without the routing, meta SDPA materialises the N×N maps: the estimate must not take that path."""
    q = torch.empty(2, 4, 1024, 32, device="meta", dtype=torch.bfloat16)
    plain, fused = LiveBytes(), LiveBytes()
    with plain:
        F.scaled_dot_product_attention(q, q, q)
    with fused_sdpa(), fused:
        out = F.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape and out.dtype == q.dtype
    maps = 2 * 4 * 1024 * 1024 * 2  # one bf16 attention matrix per head
    assert plain.peak >= maps > fused.peak


@pytest.mark.parametrize("masked", [False, True])
def test_fused_sdpa_keeps_cpu_results_and_meta_shapes(masked):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 7, 16, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 7, 7, generator=g) > 0.3 if masked else None
    if mask is not None:
        mask[..., 0] = True
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with fused_sdpa():
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        meta = F.scaled_dot_product_attention(q.to("meta"), k.to("meta"), v.to("meta"),
                                              attn_mask=None if mask is None else mask.to("meta"))
    assert torch.equal(got, want)
    assert meta.shape == want.shape and meta.dtype == want.dtype
    assert F.scaled_dot_product_attention is not None and F.scaled_dot_product_attention.__name__ != "_fused_sdpa"


def test_live_bytes_counts_views_once_and_frees():
    tracker = LiveBytes()
    with tracker:
        a = torch.empty(1024, device="meta")
        view = a[::2]
        b = a * 2
        assert tracker.live == 2 * 4096
        del b
        assert tracker.live == 4096
        del view, a
    assert tracker.live == 0 and tracker.peak == 2 * 4096


@pytest.mark.parametrize("slice_p", [1, 11])
def test_prodigy_state_formula_matches_a_real_step(slice_p):
    from prodigyopt import Prodigy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(37, 53), torch.nn.Linear(53, 5, bias=False))
    opt = Prodigy(model.parameters(), lr=1.0, slice_p=slice_p)
    model(torch.randn(3, 37)).sum().backward()
    opt.step()
    real = tensor_bytes(t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)
                        and t.dim() > 0)
    assert prodigy_state_bytes(model.parameters(), slice_p=slice_p) == real
    assert module_bytes(model) == sum(p.numel() * 4 for p in model.parameters())


def test_views_of_tensors_made_before_the_mode_allocate_nothing():
    weight = torch.empty(256, 256, device="meta")
    tracker = LiveBytes()
    with tracker:
        wt = weight.t()
        weight.mul_(2)
        y = torch.empty(3, 256, device="meta") @ wt
    assert tracker.peak == y.untyped_storage().nbytes() + 3 * 256 * 4

"""UNet feature capture: output unchanged, captured features equal recomputations, selection, removal."""

from __future__ import annotations

import math

import pytest
import torch

from adaface.models.unet_feature_capture import (
    CaptureProcessor,
    UNetFeatureCapture,
    cross_attention_layers,
    select_layers,
)


def sd15_shaped_unet(seed: int = 0):
    """SD-1.5's block layout (3 cross-attention down blocks + 1 plain, mid, 1 plain up + 3 cross-attention up
    blocks, 2 layers per block) at tiny widths: 16 cross-attention layers, like the real model."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8,
    ).eval()


@pytest.fixture(scope="module")
def unet():
    return sd15_shaped_unet()


def inputs(batch: int = 2, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g).to(dtype)
    ctx = torch.randn(batch, 7, 24, generator=g).to(dtype)
    t = torch.tensor([500] * batch)
    return x, t, ctx


def test_sd15_layout_has_16_layers_in_execution_order(unet):
    names = cross_attention_layers(unet)
    assert len(names) == 16
    kinds = [n.split(".")[0] for n in names]
    assert kinds == ["down_blocks"] * 6 + ["mid_block"] + ["up_blocks"] * 9
    assert names[0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert names[-1] == "up_blocks.3.attentions.2.transformer_blocks.0.attn2"
    # positions per layer as the UNet runs them: 16², 8², 4² down, 2² mid, then 4², 8², 16² up
    x, t, ctx = inputs()
    with UNetFeatureCapture(unet, ["*"]) as cap, torch.no_grad(), cap.recording() as feats:
        unet(x, t, encoder_hidden_states=ctx)
    sides = [math.isqrt(feats[n].num_positions) for n in names]
    assert sides == [16, 16, 8, 8, 4, 4, 2, 4, 4, 4, 8, 8, 8, 16, 16, 16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_output_bitwise_unchanged(unet, dtype, checkpointing):
    u = sd15_shaped_unet().to(dtype)
    if checkpointing:
        u.enable_gradient_checkpointing()
    x, t, ctx = inputs(dtype=dtype)
    ctx_a = ctx.clone().requires_grad_(True)
    ref = u(x, t, encoder_hidden_states=ctx_a).sample
    ref.float().square().mean().backward()
    cap = UNetFeatureCapture(u, ["*"])
    ctx_b = ctx.clone().requires_grad_(True)
    with cap.recording() as feats:
        out = u(x, t, encoder_hidden_states=ctx_b).sample
    out.float().square().mean().backward()
    assert len(feats) == 16
    assert torch.equal(out, ref)
    assert torch.equal(ctx_b.grad, ctx_a.grad)
    # outside a recording nothing is kept, and the output is still the same
    with torch.no_grad():
        assert torch.equal(u(x, t, encoder_hidden_states=ctx).sample, ref.detach())
    assert cap._store is None


def test_captured_features_equal_recomputation_from_inputs(unet):
    from diffusers.models.attention_processor import AttnProcessor2_0

    x, t, ctx = inputs()
    modules = dict(unet.named_modules())
    with UNetFeatureCapture(unet, [0, "mid_block.*", -1]) as cap, torch.no_grad(), cap.recording() as feats:
        unet(x, t, encoder_hidden_states=ctx)
    assert list(feats) == cap.layers and len(cap.layers) == 3
    for name, f in feats.items():
        attn = modules[name]
        assert f.attn is attn and f.context is ctx
        hs = f.hidden_states
        q = hs @ attn.to_q.weight.T
        assert torch.allclose(f.query(), q, atol=1e-6, rtol=1e-5)
        k = ctx @ attn.to_k.weight.T
        b, n, c = q.shape
        h = attn.heads
        qh = q.view(b, n, h, c // h).transpose(1, 2)
        kh = k.view(b, -1, h, c // h).transpose(1, 2)
        maps = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(c // h), dim=-1)
        assert f.maps().shape == (b, h, n, ctx.shape[1])
        torch.testing.assert_close(f.maps(), maps, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(f.maps().sum(-1), torch.ones(b, h, n))
        # the output is the stock SDPA processor's on the same inputs (bitwise: the same call)
        assert torch.equal(f.output, AttnProcessor2_0()(attn, hs, ctx))


def test_gradients_through_captured_features_with_checkpointing():
    """A loss on captured Q, maps and outputs back-propagates to the context identically with checkpointing."""
    grads = []
    for checkpointing in (False, True):
        u = sd15_shaped_unet()
        u.train()
        if checkpointing:
            u.enable_gradient_checkpointing()
        x, t, ctx = inputs()
        ctx.requires_grad_(True)
        cap = UNetFeatureCapture(u, ["up_blocks.3.*"])
        with cap.recording() as feats:
            u(x, t, encoder_hidden_states=ctx)
        loss = sum(f.output.square().mean() + f.query().square().mean() + f.maps().square().mean()
                   for f in feats.values())
        loss.backward()
        grads.append(ctx.grad.clone())
        cap.remove()
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_remove_restores_processors(unet):
    before = dict(unet.attn_processors)
    cap = UNetFeatureCapture(unet, ["up_blocks.1.*"])
    wrapped = [k for k, p in unet.attn_processors.items() if isinstance(p, CaptureProcessor)]
    assert wrapped == [n + ".processor" for n in cap.layers] and len(wrapped) == 3
    with pytest.raises(ValueError, match="already has a feature capture"):
        UNetFeatureCapture(unet, ["up_blocks.1.*"])
    cap.remove()
    after = dict(unet.attn_processors)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    with pytest.raises(RuntimeError, match="removed"):
        with cap.recording():
            pass


def test_selection():
    names = [f"l{i}" for i in range(5)]
    assert select_layers(names, [0, -1]) == ["l0", "l4"]
    assert select_layers(names, ["l[12]", 1, "3"]) == ["l1", "l2", "l3"]
    assert select_layers(names, "*") == names
    with pytest.raises(ValueError, match="out of range"):
        select_layers(names, [5])
    with pytest.raises(ValueError, match="names no cross-attention layer"):
        select_layers(names, ["up_blocks.*"])
    with pytest.raises(ValueError, match="empty"):
        select_layers(names, [])

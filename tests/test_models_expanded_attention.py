"""ExpandedCLIPAttention / expand_clip_attention on a tiny transformers CLIPTextModel (paper §2.2)."""

from __future__ import annotations

import copy

import pytest
import torch

from adaface.models.expanded_clip_attention import (
    ExpandedCLIPAttention,
    clip_attention_multipliers,
    expand_clip_attention,
    expand_clip_attention_with_params,
    restore_clip_attention,
)
from adaface.testing.tiny_models import TinyConfig, tiny_text_encoder

# Narrower than the shared tiny encoder (these tests build many models); 4 layers as the stage-1 schedule needs.
SMALL = TinyConfig(hidden_size=64, num_heads=4, intermediate_size=128)
_BASE: dict[int, torch.nn.Module] = {}


def _model(impl: str = "sdpa", seed: int = 0):
    if seed not in _BASE:
        _BASE[seed] = tiny_text_encoder(SMALL, seed=seed)
    m = copy.deepcopy(_BASE[seed])
    m.set_attn_implementation(impl)
    return m


def _inputs(batch: int = 2, length: int = 20, padded: bool = True):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padded:
        mask[-1, length // 2:] = 0
    return ids, (mask if padded else None)


def _run(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("padded", [False, True])
def test_multiplier_one_matches_unpatched(impl, padded):
    model = _model(impl)
    ids, mask = _inputs(padded=padded)
    before = _run(model, ids, mask)
    assert expand_clip_attention(model, 1) is model
    assert all(isinstance(layer.self_attn, ExpandedCLIPAttention) for layer in model.encoder.layers)
    torch.testing.assert_close(_run(model, ids, mask), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["qv", "kv"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_zero_noise_expansion_keeps_the_function(mode, impl):
    model = _model(impl)
    ids, mask = _inputs()
    before = _run(model, ids, mask)
    expand_clip_attention(model, [8, 4, 2, 3], mode=mode, noise_ratio=0.0)
    assert clip_attention_multipliers(model) == [8, 4, 2, 3]
    torch.testing.assert_close(_run(model, ids, mask), before, atol=2e-5, rtol=1e-4)


def test_noisy_expansion_changes_the_function():
    model = _model()
    ids, mask = _inputs()
    before = _run(model, ids, mask)
    expand_clip_attention(model, 2, noise_ratio=0.1, generator=torch.Generator().manual_seed(0))
    assert (_run(model, ids, mask) - before).abs().max() > 1e-3


def test_noise_statistics_follow_the_method():
    model = _model()
    attn0 = model.encoder.layers[0].self_attn
    w0 = {p: getattr(attn0, f"{p}_proj").weight.detach().clone() for p in "qkv"}
    b0 = {p: getattr(attn0, f"{p}_proj").bias.detach().clone() for p in "qkv"}
    expand_clip_attention(model, 3, mode="qv", noise_ratio=0.1, generator=torch.Generator().manual_seed(1))
    attn = model.encoder.layers[0].self_attn
    for p in "qv":
        extra = getattr(attn, f"{p}_extra_weight")
        assert extra.shape == (2, *w0[p].shape)
        expected = 0.1 * w0[p].std(dim=1).mean()
        for c in range(2):
            noise = extra[c] - w0[p]
            assert abs(noise.mean().item()) < 0.08 * expected  # 5 sigma for 64x64 samples
            assert noise.std().item() == pytest.approx(expected.item(), rel=0.06)
        assert not torch.equal(extra[0], extra[1])  # independent noise per copy
        torch.testing.assert_close(getattr(attn, f"{p}_extra_bias"), b0[p].expand(2, -1), atol=0, rtol=0)
        assert torch.equal(getattr(attn, f"{p}_proj").weight, w0[p])  # copy 0 untouched
    assert "k_extra_weight" not in dict(attn.named_parameters())  # k is shared in mode qv


def test_seeded_generator_is_reproducible():
    def extras(seed):
        m = _model()
        expand_clip_attention(m, 4, generator=torch.Generator().manual_seed(seed))
        return m.encoder.layers[2].self_attn.v_extra_weight.detach()

    assert torch.equal(extras(5), extras(5))
    assert not torch.equal(extras(5), extras(6))


@pytest.mark.parametrize("mode", ["qv", "kv"])
def test_expansion_adds_exactly_the_copies(mode):
    model = _model()
    before = {n: p for n, p in model.named_parameters()}
    new = expand_clip_attention_with_params(model, [4, 1, 2, 8], mode=mode, noise_ratio=0.0)
    after = dict(model.named_parameters())
    for name, p in before.items():  # every original parameter is still there, the same object
        assert after[name] is p
    added = set(after) - set(before)
    assert added == {n for n, _ in new}
    d = model.config.hidden_size
    per_copy = d * d + d
    expected = sum((e - 1) * len(mode) * per_copy for e in (4, 1, 2, 8))
    assert sum(after[n].numel() for n in added) == expected
    assert all(f".self_attn.{mode[0]}_extra" in n or f".self_attn.{mode[1]}_extra" in n for n in added)
    assert not any(".1.self_attn" in n for n in added)  # the multiplier-1 layer gains nothing


def test_further_expansion_keeps_existing_copies():
    model = _model()
    g = torch.Generator().manual_seed(0)
    expand_clip_attention(model, 4, generator=g)
    old = [layer.self_attn.q_extra_weight.detach().clone() for layer in model.encoder.layers]
    untouched = model.encoder.layers[3].self_attn.q_extra_weight
    new = expand_clip_attention_with_params(model, [8, 8, 8, 4], generator=g)
    assert clip_attention_multipliers(model) == [8, 8, 8, 4]
    assert model.encoder.layers[3].self_attn.q_extra_weight is untouched  # unchanged layer: same Parameter
    assert {n.split(".self_attn")[0] for n, _ in new} == {"encoder.layers.0", "encoder.layers.1", "encoder.layers.2"}
    for i in range(3):
        attn = model.encoder.layers[i].self_attn
        assert torch.equal(attn.q_extra_weight[:3], old[i])
        copies = torch.cat([attn.q_proj.weight[None], old[i]])  # copies 0..3 before the second expansion
        for c in range(4, 8):  # copy c duplicates copy c mod 4, plus noise scaled to that copy's weights
            source = copies[c % 4]
            fresh = attn.q_extra_weight[c - 1] - source
            assert fresh.std().item() == pytest.approx(0.1 * source.std(dim=1).mean().item(), rel=0.1)
            assert (fresh - (copies[(c + 1) % 4] - source)).abs().max() > 1e-3  # not another copy's duplicate
            assert torch.equal(attn.q_extra_bias[c - 1], torch.cat([attn.q_proj.bias[None], attn.q_extra_bias])[c % 4])


@pytest.mark.parametrize("mode", ["qv", "kv"])
def test_re_expansion_of_distinct_copies_keeps_the_function(mode):
    """The paper's second plateau (x4 -> x8): with noise ratio 0 the layer's output must not move, even though its
    four copies already differ. Appending duplicates of copy 0 only would move the joint softmax's weight."""
    model = _model("eager")
    ids, mask = _inputs()
    expand_clip_attention(model, 4, mode=mode, noise_ratio=0.3, generator=torch.Generator().manual_seed(0))
    for layer in model.encoder.layers:  # the copies really differ
        extra = getattr(layer.self_attn, f"{mode[0]}_extra_weight")
        assert (extra[0] - getattr(layer.self_attn, f"{mode[0]}_proj").weight).abs().max() > 1e-3
    before = _run(model, ids, mask)
    expand_clip_attention(model, [8, 8, 8, 4], mode=mode, noise_ratio=0.0)
    assert clip_attention_multipliers(model) == [8, 8, 8, 4]
    after = _run(model, ids, mask)
    torch.testing.assert_close(after, before, atol=2e-5, rtol=1e-4)  # fp32 rounding of a longer softmax sum
    expand_clip_attention(model, 16, mode=mode, noise_ratio=0.0)  # x2 and x4 at once, from 8 and 4
    torch.testing.assert_close(_run(model, ids, mask), before, atol=2e-5, rtol=1e-4)


def test_re_expansion_must_be_a_multiple():
    model = _model()
    expand_clip_attention(model, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"multipliers\[0\] \(layer 0\): multiplier 6 is not a multiple of .* 4"):
        expand_clip_attention(model, [6, 4, 4, 4])
    assert clip_attention_multipliers(model) == [4, 4, 4, 4]  # nothing changed
    with pytest.raises(ValueError, match="multiplier 6 is not a multiple"):
        model.encoder.layers[0].self_attn.expand(6)


def test_output_attentions_is_refused_not_silently_empty():
    model = _model("eager")
    ids, _ = _inputs(padded=False)
    assert len(model(ids, output_attentions=True).attentions) == len(model.encoder.layers)  # unpatched: returned
    expand_clip_attention(model, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="does not return attention weights.*output_attentions=False"):
        model(ids, output_attentions=True)
    model.config.output_attentions = True  # asked through the config (eager attention allows it)
    with pytest.raises(ValueError, match="does not return attention weights"):
        model(ids)
    model.config.output_attentions = False
    assert model(ids).last_hidden_state.shape == (*ids.shape, model.config.hidden_size)


def test_restore_gives_back_the_original_model():
    model = _model("eager")
    keys = list(model.state_dict())
    ids, mask = _inputs()
    before = _run(model, ids, mask)
    expand_clip_attention(model, 4)
    assert restore_clip_attention(model) is model
    from transformers.models.clip.modeling_clip import CLIPAttention

    assert all(type(layer.self_attn) is CLIPAttention for layer in model.encoder.layers)
    assert list(model.state_dict()) == keys
    assert torch.equal(_run(model, ids, mask), before)


def test_invalid_requests_raise_clear_errors():
    model = _model()
    with pytest.raises(ValueError, match="one entry per layer"):
        expand_clip_attention(model, [2, 2])
    with pytest.raises(ValueError, match="int >= 1"):
        expand_clip_attention(model, 0)
    with pytest.raises(ValueError, match="mode"):
        expand_clip_attention(model, 2, mode="qq")
    with pytest.raises(ValueError, match="noise_ratio"):
        expand_clip_attention(model, 2, noise_ratio=-1.0)
    for bad in (float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="noise_ratio must be a finite number"):
            expand_clip_attention(model, 2, noise_ratio=bad)
    assert not isinstance(model.encoder.layers[0].self_attn, ExpandedCLIPAttention)  # refused before any change
    expand_clip_attention(model, 4)
    with pytest.raises(ValueError, match=r"multipliers\[0\] \(layer 0\): multiplier 2 is below the layer's current 4"):
        expand_clip_attention(model, [2, 4, 4, 4])
    with pytest.raises(ValueError, match="already expanded with mode 'qv'"):
        expand_clip_attention(model, 4, mode="kv")
    with pytest.raises(TypeError, match="CLIPTextModel"):
        expand_clip_attention(torch.nn.Linear(2, 2), 2)


def _attention_inputs():
    torch.manual_seed(0)
    model = _model()
    expand_clip_attention(model, 3, noise_ratio=0.2, generator=torch.Generator().manual_seed(0))
    return model.encoder.layers[0].self_attn, torch.randn(2, 6, model.config.hidden_size)


def test_every_mask_form_gives_the_same_result():
    attn, x = _attention_inputs()
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, 4:] = False
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    bool4d = (causal.view(1, 1, 6, 6) & keep.view(2, 1, 1, 6))
    neg = torch.finfo(torch.float32).min
    float4d = torch.zeros(2, 1, 6, 6).masked_fill(~bool4d, neg)
    with torch.no_grad():
        ref = attn(x, bool4d, is_causal=True)[0]
        outs = {
            "float 4-D (eager)": attn(x, float4d, is_causal=True)[0],
            "2-D padding (flash)": attn(x, keep.long(), is_causal=True)[0],
            "4.x padding + causal": attn(
                x, torch.zeros(2, 1, 6, 6).masked_fill(~keep.view(2, 1, 1, 6), neg),
                torch.zeros(1, 1, 6, 6).masked_fill(~causal, neg),
            )[0],
        }
        no_pad = attn(x, None, is_causal=True)[0]
        no_pad_mask = attn(x, causal.view(1, 1, 6, 6))[0]
        not_causal = attn(x, None)[0]
    for name, out in outs.items():
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(no_pad, no_pad_mask, atol=1e-5, rtol=1e-5)
    assert (not_causal - no_pad).abs().max() > 1e-3  # causality really is applied
    with pytest.raises(TypeError, match="BlockMask"):
        attn(x, object())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    ref_model = _model()
    ids, mask = _inputs()
    ref32 = _run(ref_model, ids, mask)
    ref_lowp = _run(ref_model.to(dtype), ids, mask).float()
    expand_clip_attention(ref_model, 2, noise_ratio=0.0)  # built in low precision: copies are exact
    assert ref_model.encoder.layers[0].self_attn.q_extra_weight.dtype == dtype
    out = _run(ref_model, ids, mask).float()
    assert torch.isfinite(out).all()
    torch_err = (ref_lowp - ref32).abs().max().item()
    assert (out - ref32).abs().max().item() <= 2 * torch_err + 1e-3


def test_gradient_checkpointing_gives_the_same_gradients():
    ids, mask = _inputs()
    grads = []
    for checkpointing in (False, True):
        model = _model()
        expand_clip_attention(model, 2, generator=torch.Generator().manual_seed(0))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(ids, attention_mask=mask).last_hidden_state.square().mean().backward()
        attn = model.encoder.layers[1].self_attn
        grads.append((attn.q_extra_weight.grad.clone(), attn.k_proj.weight.grad.clone()))
    for a, b in zip(*grads):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)

"""Optimizer-state transfer across a re-expansion (x4 -> x8): every new copy starts from its source copy's state.

The weights' source map (`expansion_sources`: copy c duplicates copy c mod E) and the optimizer's must agree, or a
new copy would pair one copy's weights with another copy's Adam moments and Prodigy anchor.
"""

from __future__ import annotations

import pytest
import torch

from adaface.models.expanded_clip_attention import expansion_sources
from adaface.training.engine.optim import build_optimizer, snapshot_state, transfer_state

LAYER = "text_encoder.encoder.layers.{i}.self_attn"
PER_COPY = ("exp_avg", "exp_avg_sq", "s", "p0")


@pytest.fixture(scope="module")
def make_inverter(tmp_path_factory):
    from adaface.models.prompt_inverter import PromptInverter
    from adaface.testing.tiny_models import TinyConfig, save_tiny_tokenizer, tiny_text_encoder

    cfg = TinyConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=64)
    tok = save_tiny_tokenizer(tmp_path_factory.mktemp("tok"))

    def make(mode: str):
        return PromptInverter(tiny_text_encoder(cfg, seed=0), tokenizer=str(tok), mode=mode)

    return make


def _trainable(inv) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in inv.named_parameters() if p.requires_grad}


def _optimizer(named):
    return build_optimizer(named.values(), lr=1.0, d_coef=1.0, d0=1e-3, weight_decay=0.01, safeguard_warmup=True,
                           bias_correction=True)


def _step(inv, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, inv.num_id_tokens, inv.hidden_size, generator=g)
    inv(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _copies(opt, named, layer: str, proj: str, kind: str, key: str) -> torch.Tensor:
    """One state tensor of every copy, `[E, ...]` in the weights' shape: copy 0 (the Linear) first."""
    def laid_out(param):
        value = opt.state[param][key]
        if value.dim() == 0:  # Prodigy's p0 of an all-zero parameter (CLIP's zero-initialised biases)
            return torch.zeros_like(param)
        return value.reshape(param.shape)

    base, extra = named[f"{layer}.{proj}_proj.{kind}"], named.get(f"{layer}.{proj}_extra_{kind}")
    rows = [laid_out(base)[None]]
    if extra is not None:
        rows.append(laid_out(extra))
    return torch.cat(rows)


def _expand_and_rebuild(inv, opt, named, multipliers, noise_ratio, seed=0):
    old_state, old_group = snapshot_state(opt, {p: n for n, p in named.items()})
    inv.expand(multipliers, noise_ratio=noise_ratio, generator=torch.Generator().manual_seed(seed))
    named = _trainable(inv)
    opt = _optimizer(named)
    return opt, named, transfer_state(opt, named, old_state, old_group)


@pytest.mark.parametrize("mode", ["qv", "kv"])
def test_each_new_copy_gets_its_source_copys_state(make_inverter, mode):
    inv = make_inverter(mode)
    named = _trainable(inv)
    opt = _optimizer(named)
    _step(inv, opt, 0)
    opt, named, _ = _expand_and_rebuild(inv, opt, named, 4, noise_ratio=0.3)
    for s in range(1, 4):  # the four copies' weights and states now differ
        _step(inv, opt, s)
    layer0 = LAYER.format(i=0)
    before = {(p, kind, key): _copies(opt, named, layer0, p, kind, key).clone()
              for p in mode for kind in ("weight", "bias") for key in PER_COPY}
    for key in ("exp_avg", "exp_avg_sq"):
        c = before[(mode[0], "weight", key)]
        assert (c[1] - c[0]).abs().max() > 0  # distinct states: a copy-0-only transfer would be caught
    x = torch.randn(2, inv.num_id_tokens, inv.hidden_size, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out_before = inv(x)

    opt, named, report = _expand_and_rebuild(inv, opt, named, [8, 4], noise_ratio=0.0)
    assert inv.multipliers == [8, 4]
    with torch.no_grad():  # function-preserving at noise 0
        torch.testing.assert_close(inv(x), out_before, atol=2e-5, rtol=1e-4)
    for p in mode:
        for kind in ("weight", "bias"):
            assert report[f"{layer0}.{p}_extra_{kind}"] == "grown"
            assert report[f"{LAYER.format(i=1)}.{p}_extra_{kind}"] == "kept"  # layer 1 stays at x4
    assert "fresh" not in report.values()
    sources = expansion_sources(4, 8)
    assert sources == [0, 1, 2, 3]
    for (p, kind, key), old in before.items():
        now = _copies(opt, named, layer0, p, kind, key)
        assert now.shape[0] == 8
        assert torch.equal(now[:4], old), (p, kind, key)  # existing copies keep their own state
        for c, src in enumerate(sources, start=4):
            assert torch.equal(now[c], old[src]), (p, kind, key, c)
    extra = named[f"{layer0}.{mode[0]}_extra_weight"]
    assert opt.state[extra]["s"].shape == (extra.numel(),)  # Prodigy's flattened layout is kept
    _step(inv, opt, 10)
    assert all(torch.isfinite(t).all() for t in inv.parameters())


def test_copies_without_state_stay_fresh(make_inverter):
    """Extra copies that never stepped (no state) cannot be given their rows' state: they start fresh."""
    inv = make_inverter("qv")
    inv.expand(2, noise_ratio=0.1, generator=torch.Generator().manual_seed(0))
    named = _trainable(inv)
    opt = _optimizer(named)
    layer0 = LAYER.format(i=0)
    for n, p in named.items():
        if "_extra_" not in n:  # only the originals have state, as if the extras were frozen so far
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    snapshot, _ = snapshot_state(opt, {p: n for n, p in named.items()})
    assert snapshot[f"{layer0}.q_extra_weight"] == (named[f"{layer0}.q_extra_weight"].shape, {})
    opt, named, report = _expand_and_rebuild(inv, opt, named, 4, noise_ratio=0.0)
    assert report[f"{layer0}.q_extra_weight"] == "fresh" and report[f"{layer0}.q_proj.weight"] == "kept"
    assert named[f"{layer0}.q_extra_weight"] not in opt.state

"""PromptInverter (paper §2.1): template, last-3-layer mix, expansion, safetensors round trip."""

from __future__ import annotations

import json

import pytest
import torch

from adaface.models.prompt_inverter import PromptInverter
from adaface.testing.tiny_models import TinyConfig, save_tiny_tokenizer, tiny_text_encoder

SMALL = TinyConfig(hidden_size=64, num_heads=4, intermediate_size=128)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _inverter(tokenizer_dir, seed=0):
    return PromptInverter(tiny_text_encoder(SMALL, seed=seed), tokenizer=tokenizer_dir)


def test_forward_matches_the_text_models_own_hidden_states(tokenizer_dir):
    inv = _inverter(tokenizer_dir)
    assert inv.slot_start == 4  # <bos> photo of a
    te = inv.text_encoder
    # ID tokens equal to the template's own slot embeddings: the inverter must then reproduce the model's forward.
    ids = inv.input_ids.unsqueeze(0)
    slots = te.embeddings.token_embedding(ids)[:, 4:20].detach()
    out = inv(slots)
    with torch.no_grad():
        hs = te(ids, output_hidden_states=True).hidden_states
    w = torch.tensor([1.0, 2.0, 4.0]) / 7
    expected = te.final_layer_norm(w[0] * hs[-3] + w[1] * hs[-2] + w[2] * hs[-1])[:, 4:20]
    assert out.shape == (1, 16, 64)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_output_depends_on_id_tokens_causally(tokenizer_dir):
    inv = _inverter(tokenizer_dir)
    x = torch.randn(2, 16, 64)
    y = x.clone()
    y[:, 10] += torch.randn(64)  # not a constant shift: the layer norms would remove that
    a, b = inv(x), inv(y)
    torch.testing.assert_close(a[:, :10], b[:, :10])  # earlier slots cannot see a later one
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3


def test_tables_are_frozen_and_the_rest_trains(tokenizer_dir):
    inv = _inverter(tokenizer_dir)
    inv.expand(2)
    inv(torch.randn(2, 16, 64)).square().mean().backward()
    emb = inv.text_encoder.embeddings
    assert not emb.token_embedding.weight.requires_grad and not emb.position_embedding.weight.requires_grad
    assert inv.layer_weights.grad is not None and inv.layer_weights.grad.abs().sum() > 0
    assert inv.text_encoder.encoder.layers[3].self_attn.v_extra_weight.grad.abs().sum() > 0


def test_expand_returns_new_named_parameters(tokenizer_dir):
    inv = _inverter(tokenizer_dir)
    assert inv.multipliers == [1, 1, 1, 1]
    new = inv.expand(4, noise_ratio=0.1, generator=torch.Generator().manual_seed(0))
    names = dict(inv.named_parameters())
    assert len(new) == 4 * 4  # 4 layers x (q, v) x (weight, bias)
    assert all(names[n] is p for n, p in new)
    assert new[0][0] == "text_encoder.encoder.layers.0.self_attn.q_extra_weight"
    new2 = inv.expand([8, 8, 8, 4])
    assert inv.multipliers == [8, 8, 8, 4] and len(new2) == 3 * 4


def test_save_and_load_round_trip(tokenizer_dir, tmp_path):
    inv = _inverter(tokenizer_dir)
    inv.expand([4, 2, 1, 3], mode="kv", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        inv.layer_weights.copy_(torch.tensor([0.3, 0.1, 0.6]))
    x = torch.randn(2, 16, 64)
    inv.save_pretrained(tmp_path / "inv")
    files = sorted(p.name for p in (tmp_path / "inv").iterdir())
    assert files == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "inv" / "config.json").read_text())
    assert cfg["multipliers"] == [4, 2, 1, 3] and cfg["mode"] == "kv" and cfg["num_id_tokens"] == 16
    loaded = PromptInverter.from_pretrained(tmp_path / "inv")
    assert loaded.multipliers == [4, 2, 1, 3] and loaded.mode == "kv"
    torch.testing.assert_close(loaded(x), inv(x), atol=0, rtol=0)


def test_load_never_unpickles(tokenizer_dir, tmp_path, monkeypatch):
    _inverter(tokenizer_dir).save_pretrained(tmp_path / "inv")

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_pickle)
    PromptInverter.from_pretrained(tmp_path / "inv")


def test_init_from_a_pipeline_folder_finds_the_tokenizer(tiny_sd15_dir):
    inv = PromptInverter(tiny_sd15_dir)
    assert inv.hidden_size == 512 and inv.slot_start == 4
    assert inv(torch.randn(1, 16, 512)).shape == (1, 16, 512)


def test_bad_inputs(tokenizer_dir, tmp_path):
    inv = _inverter(tokenizer_dir)
    with pytest.raises(ValueError, match=r"\[B, 16, 64\]"):
        inv(torch.randn(2, 15, 64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        inv([1, 2])
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        PromptInverter.from_pretrained(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no CLIP text encoder"):
        PromptInverter(tmp_path)

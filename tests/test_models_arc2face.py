"""Arc2Face teacher (paper §2.2, Figure 4) loaded from the released folder layout with tiny weights."""

from __future__ import annotations

import pytest
import torch

from adaface.models.arc2face import Arc2Face
from adaface.testing.tiny_models import save_tiny_arc2face, tiny_text_encoder


@pytest.fixture(scope="module")
def arc2face_dir(tmp_path_factory):
    return save_tiny_arc2face(tmp_path_factory.mktemp("arc2face"), seed=1)


@pytest.fixture(scope="module")
def arc2face(arc2face_dir, tiny_sd15_dir):
    return Arc2Face.from_pretrained(arc2face_dir, tokenizer=tiny_sd15_dir)


def test_release_layout_loads_with_the_safe_loader_only(arc2face_dir, tiny_sd15_dir, monkeypatch):
    assert (arc2face_dir / "encoder" / "pytorch_model.bin").is_file()
    real_load = torch.load
    calls = []

    def checked_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", checked_load)
    model = Arc2Face.from_pretrained(arc2face_dir, tokenizer=tiny_sd15_dir, load_unet=False)
    assert calls and all(c is True for c in calls)
    reference = tiny_text_encoder(seed=1)
    for (name, p), q in zip(model.text_encoder.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(p, q), name
    assert model.unet is None


def test_prompt_embeds_replace_the_id_token_embedding(arc2face):
    g = torch.Generator().manual_seed(0)
    face = torch.randn(2, 512, generator=g)
    out = arc2face.prompt_embeds(face)
    assert out.shape == (2, 77, 512)
    # Independent check: write the normalised vector into the token table and run the model's own forward.
    te = arc2face.text_encoder
    id_token = arc2face.input_ids[4].item()
    assert arc2face.id_position == 4
    for i in range(2):
        patched = tiny_text_encoder(seed=1)
        with torch.no_grad():
            patched.embeddings.token_embedding.weight[id_token] = face[i] / face[i].norm()
            ref = patched(arc2face.input_ids.unsqueeze(0)).last_hidden_state
        torch.testing.assert_close(out[i:i + 1], ref, atol=1e-5, rtol=1e-5)
    assert te.embeddings.token_embedding.weight.shape[0] == patched.embeddings.token_embedding.weight.shape[0]


def test_id_tokens_are_positions_4_to_19_and_input_is_normalised(arc2face):
    face = torch.randn(3, 512)
    tokens = arc2face.id_tokens(face)
    assert tokens.shape == (3, 16, 512)
    torch.testing.assert_close(tokens, arc2face.prompt_embeds(face)[:, 4:20])
    torch.testing.assert_close(arc2face.id_tokens(7.0 * face), tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(arc2face.id_tokens(face[0]), tokens[:1], atol=1e-5, rtol=1e-5)
    assert (tokens[0] - tokens[1]).abs().max() > 1e-3


def test_unet_takes_the_context(arc2face):
    unet = arc2face.unet
    ctx = arc2face.prompt_embeds(torch.randn(1, 512))
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=ctx).sample
    assert out.shape == (1, 4, 8, 8)
    assert not any(p.requires_grad for p in arc2face.parameters())


def test_clear_errors(arc2face, arc2face_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="released layout"):
        Arc2Face.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer="):
        Arc2Face.from_pretrained(arc2face_dir, load_unet=False)
    for width in (600, 128):  # wider than 512, or narrower (would be zero-padded silently)
        with pytest.raises(ValueError, match=r"\[B, 512\]"):
            arc2face.id_tokens(torch.randn(2, width))
    with pytest.raises(TypeError, match="torch.Tensor"):
        arc2face.id_tokens([0.0] * 512)

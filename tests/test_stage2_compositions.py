"""Composition pool, the four prompts, token alignment and per-token weights."""

from __future__ import annotations

import json

import pytest
import torch

from adaface.training.compositions import (
    DEFAULT_POOL,
    TOKEN_WEIGHTS,
    CompositionPool,
    build_prompts,
    class_slot_embeddings,
    resolve_class_words,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    from adaface.testing.tiny_models import save_tiny_tokenizer

    return CLIPTokenizer.from_pretrained(str(save_tiny_tokenizer(tmp_path_factory.mktemp("tok"))))


def test_pool_sampling_follows_the_seed():
    pool = CompositionPool.default()
    draw = [pool.sample(torch.Generator().manual_seed(7)) for _ in range(3)]
    assert len(set(draw)) == 1
    many = [pool.sample(g) for g in [torch.Generator().manual_seed(1)] for _ in range(200)]
    assert len(set(many)) > 100
    phrases = {p for items in DEFAULT_POOL.values() for p in items}
    assert all(all(part in phrases for part in c.split(", ")) for c in many)
    assert any(any(part in DEFAULT_POOL["backgrounds"] for part in c.split(", ")) for c in many)


def test_user_files_replace_the_pool(tmp_path):
    js = tmp_path / "pool.json"
    js.write_text(json.dumps({"backgrounds": ["on mars"], "clothing": ["wearing a cape"]}))
    pool = CompositionPool.from_file(js)
    g = torch.Generator().manual_seed(0)
    assert {pool.sample(g) for _ in range(50)} <= {"wearing a cape", "wearing a cape, on mars", "on mars"}
    txt = tmp_path / "pool.txt"
    txt.write_text("# my prompts\nin a red car\n\nsurfing a wave\n")
    pool = CompositionPool.from_file(txt)
    assert {pool.sample(g) for _ in range(50)} == {"in a red car", "surfing a wave"}


@pytest.mark.parametrize("content, match", [
    ("", "empty"), ("# only a comment\n", "empty"), ('{"backgrounds": []}', "empty"),
    ('{"colours": ["red"]}', "unknown list"), ("[1, 2]", "JSON object of lists"), ("{bad", "not valid JSON"),
])
def test_bad_pool_files(tmp_path, content, match):
    p = tmp_path / ("pool.json" if content.strip().startswith(("{", "[")) else "pool.txt")
    p.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        CompositionPool.from_file(p)
    assert "\n" not in str(e.value) and "--compositions" in str(e.value)
    with pytest.raises(ValueError, match="not found"):
        CompositionPool.from_file(tmp_path / "missing.txt")


def test_token_weights_and_alignment(tokenizer):
    prompts = build_prompts(tokenizer, ["in the forest", "wearing a red hat, on the beach, at night"], ["man", "woman"])
    assert prompts.single == ["a photo of z"] * 2
    assert prompts.composition[0] == "a photo of z, in the forest"
    start = prompts.slot_start
    assert start == 1 + len(tokenizer("a photo of", add_special_tokens=False).input_ids) == 4
    w = prompts.token_weights
    assert w.shape == (2, 77)
    comp_len = len(tokenizer(", in the forest", add_special_tokens=False).input_ids) + 1  # + its end token
    assert w[0, 0] == TOKEN_WEIGHTS["bos"]
    assert torch.all(w[0, 1:start + 16] == TOKEN_WEIGHTS["shared"])
    assert torch.all(w[0, start + 16:start + 16 + comp_len] == TOKEN_WEIGHTS["composition"])
    assert torch.all(w[0, start + 16 + comp_len:] == TOKEN_WEIGHTS["padding"])
    assert (w[1] == TOKEN_WEIGHTS["composition"]).sum() > comp_len  # the longer composition


def test_class_prompts_fill_the_subject_slots_with_the_class_word(tokenizer):
    """The class prompt with the class word's embedding in the 16 slots is the prompt that spells the word 16 times."""
    from adaface.models._clip_text import clip_text_parts, run_clip_text
    from adaface.models.subject_prompt import encode_prompt
    from adaface.testing.tiny_models import tiny_text_encoder

    te = tiny_text_encoder()
    assert len(tokenizer("man", add_special_tokens=False).input_ids) == 1
    slots = class_slot_embeddings(tokenizer, te, ["man"])
    assert slots.shape == (1, 16, te.config.hidden_size) and not slots.requires_grad
    with torch.no_grad():
        got = encode_prompt(tokenizer, te, "a photo of z, in the forest", slots)
        ids = tokenizer("a photo of " + "man " * 16 + ", in the forest", padding="max_length", max_length=77,
                        return_tensors="pt").input_ids
        want, _ = run_clip_text(te, clip_text_parts(te).embeddings.token_embedding(ids))
    torch.testing.assert_close(got, want)
    # a word of several tokens gets the mean of their embeddings in every slot
    ids = tokenizer("woman", add_special_tokens=False).input_ids
    table = clip_text_parts(te).embeddings.token_embedding
    torch.testing.assert_close(class_slot_embeddings(tokenizer, te, ["woman"])[0, 5], table(torch.tensor(ids)).mean(0))


def test_class_words_default():
    assert resolve_class_words(["man", None, "", "woman"], "person") == ["man", "person", "person", "woman"]

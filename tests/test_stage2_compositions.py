"""Composition pool, the four prompts, token alignment and per-token weights."""

from __future__ import annotations

import json

import pytest
import torch

from adaface.training.method.compositions import (
    DEFAULT_POOL,
    TOKEN_WEIGHTS,
    CompositionPool,
    align_class_embeddings,
    build_prompts,
    class_phrase,
    encode_class_prompts,
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


def _sentence(tokenizer, ids) -> str:
    """The text of token ids, with CLIP's space before punctuation taken out."""
    return tokenizer.decode(ids, skip_special_tokens=True).replace(" ,", ",").strip()


def test_class_prompts_are_natural_sentences(tokenizer):
    """The class teacher prompts are the paper's plain sentences, "a photo of a woman, in the forest"."""
    prompts = build_prompts(tokenizer, ["in the forest", "wearing a red hat, at sunset"], ["woman", "elderly man"])
    assert prompts.class_single == ["a photo of a woman", "a photo of an elderly man"]
    assert prompts.class_composition == ["a photo of a woman, in the forest",
                                         "a photo of an elderly man, wearing a red hat, at sunset"]
    ids = prompts.class_ids
    assert ids.shape == (4, 77)
    assert [_sentence(tokenizer, row) for row in ids] == prompts.class_single + prompts.class_composition
    # the class word's tokens, article excluded, at the same span in both class prompts of a subject
    for (start, end), word, single, comp in zip(prompts.class_spans, ["woman", "elderly man"], ids[:2], ids[2:]):
        assert _sentence(tokenizer, single[start:end]) == word
        assert torch.equal(single[:end], comp[:end])
    mask = prompts.class_token_mask()
    assert mask.shape == (2, 77) and mask[0].sum() == len(tokenizer("woman", add_special_tokens=False).input_ids)
    assert class_phrase("a person") == "a person" and class_phrase("infant") == "an infant"


def test_class_embeddings_aligned_with_the_subject_slots(tokenizer):
    """After encoding, the class prompts take the subject prompts' layout: template rows in place, the class word
    (mean of its encoded tokens, / √16) in the 16 slots, the rest shifted to follow the last slot."""
    from adaface.testing.tiny_models import tiny_text_encoder

    te = tiny_text_encoder()
    prompts = build_prompts(tokenizer, ["in the forest"], ["woman"])
    with torch.no_grad():
        enc = encode_class_prompts(te, prompts.class_ids)
    comp = enc[1:]
    (start, end), = prompts.class_spans
    got = align_class_embeddings(comp, prompts.class_spans, prompts.slot_start)
    s0 = prompts.slot_start
    assert got.shape == comp.shape and s0 == 4 and end - start == 2
    torch.testing.assert_close(got[0, :s0], comp[0, :s0])
    word = comp[0, start:end].mean(0) / 4.0
    torch.testing.assert_close(got[0, s0:s0 + 16], word.expand(16, -1))
    tail = 77 - s0 - 16
    torch.testing.assert_close(got[0, s0 + 16:], comp[0, end:end + tail])
    # the composition's first token (",") sits right after the slots, as in the subject prompt
    comma = tokenizer(",", add_special_tokens=False).input_ids[0]
    assert prompts.class_ids[1, end] == comma
    with pytest.raises(ValueError, match="one class-word span per prompt"):
        align_class_embeddings(enc, prompts.class_spans, s0)


def test_class_words_default():
    assert resolve_class_words(["man", None, "", "woman"], "person") == ["man", "person", "person", "woman"]

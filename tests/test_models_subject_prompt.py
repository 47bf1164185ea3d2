"""Subject prompts and the textual-inversion round trip through real (tiny) diffusers pipelines."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from adaface.models.subject_prompt import encode_prompt, save_textual_inversion
from adaface.testing.tiny_models import tiny_motion_adapter


@pytest.fixture(scope="module")
def sd_pipe(tiny_sd15_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(tiny_sd15_dir), safety_checker=None)


def _subject(n=16, seed=0):
    return torch.randn(n, 512, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_matches_the_text_encoder_on_real_words(sd_pipe):
    tok, te = sd_pipe.tokenizer, sd_pipe.text_encoder
    words = tok("red hat", add_special_tokens=False, return_tensors="pt").input_ids[0]
    subject = te.embeddings.token_embedding(words).detach()
    ours = encode_prompt(tok, te, "a photo of z in the forest", subject)
    ids = tok("a photo of red hat in the forest", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = te(ids).last_hidden_state
    assert ours.shape == (1, 77, 512)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_batches_and_gradients(sd_pipe):
    subject = _subject().requires_grad_(True)
    out = encode_prompt(sd_pipe.tokenizer, sd_pipe.text_encoder, ["a photo of z", "z, in the forest"], subject)
    assert out.shape == (2, 77, 512)
    out.square().mean().backward()
    assert subject.grad.abs().sum() > 0
    per_prompt = torch.stack([_subject(seed=1), _subject(seed=2)])
    both = encode_prompt(sd_pipe.tokenizer, sd_pipe.text_encoder, ["a photo of z"] * 2, per_prompt)
    assert (both[0] - both[1]).abs().max() > 1e-4


@pytest.mark.parametrize("prompt, found", [("a photo of a man", 0), ("z and z", 2), ("a pizza", 0)])
def test_placeholder_must_appear_once(sd_pipe, prompt, found):
    with pytest.raises(ValueError, match=f"exactly once as a word, found {found}"):
        encode_prompt(sd_pipe.tokenizer, sd_pipe.text_encoder, prompt, _subject())


def test_textual_inversion_file_format(tmp_path):
    path = save_textual_inversion(_subject(), tmp_path / "subject.safetensors", token="<z>")
    state = load_file(str(path))
    assert list(state) == ["<z>"] and state["<z>"].shape == (16, 512)
    with pytest.raises(ValueError, match=".safetensors"):
        save_textual_inversion(_subject(), tmp_path / "subject.bin")
    with pytest.raises(ValueError, match="whitespace"):
        save_textual_inversion(_subject(), tmp_path / "s.safetensors", token="a b")


def test_round_trip_through_stable_diffusion_pipeline(tiny_sd15_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd15_dir), safety_checker=None)
    subject = _subject(seed=3)
    ours = encode_prompt(pipe.tokenizer, pipe.text_encoder, "a photo of z in the forest", subject).detach()
    pipe.load_textual_inversion(str(save_textual_inversion(subject, tmp_path / "s.safetensors")))
    theirs, _ = pipe.encode_prompt("a photo of <z> in the forest", "cpu", 1, False)
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=1e-5)
    # The whole pipeline agrees too: one denoising step from the same seed, prompt vs. prompt_embeds.
    run = dict(num_inference_steps=1, guidance_scale=1.0, output_type="np", height=16, width=16)
    a = pipe(prompt="a photo of <z> in the forest", generator=torch.Generator().manual_seed(0), **run).images
    b = pipe(prompt_embeds=ours, generator=torch.Generator().manual_seed(0), **run).images
    assert abs(a - b).max() < 1e-5


def test_round_trip_through_animatediff_pipeline(tiny_sd15_dir, tmp_path):
    from diffusers import AnimateDiffPipeline, DDIMScheduler, StableDiffusionPipeline

    sd_pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd15_dir), safety_checker=None)  # TI mutates it

    pipe = AnimateDiffPipeline(
        vae=sd_pipe.vae, text_encoder=sd_pipe.text_encoder, tokenizer=sd_pipe.tokenizer, unet=sd_pipe.unet,
        motion_adapter=tiny_motion_adapter(), scheduler=DDIMScheduler.from_config(sd_pipe.scheduler.config),
    )
    subject = _subject(seed=4)
    ours = encode_prompt(pipe.tokenizer, pipe.text_encoder, "portrait of z at night", subject).detach()
    pipe.load_textual_inversion(str(save_textual_inversion(subject, tmp_path / "s.safetensors", token="<me>")))
    theirs, _ = pipe.encode_prompt("portrait of <me> at night", "cpu", 1, False)
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=1e-5)
    frames = pipe(prompt_embeds=ours, num_frames=2, num_inference_steps=1, guidance_scale=1.0, height=16, width=16,
                  output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape[:2] == (1, 2) and torch.isfinite(frames).all()


def _clip_with_rows(text_encoder, ids: list[int], rows: dict[int, torch.Tensor]) -> torch.Tensor:
    """transformers' own CLIPTextModel forward on `ids`, the token embeddings at each {start: [n, H]} replaced."""
    def swap(module, inputs, output):
        output = output.clone()
        for start, r in rows.items():
            output[:, start:start + r.shape[0]] = r
        return output

    inner = getattr(text_encoder, "text_model", text_encoder)
    handle = inner.embeddings.token_embedding.register_forward_hook(swap)
    try:
        with torch.no_grad():
            return text_encoder(input_ids=torch.tensor([ids])).last_hidden_state
    finally:
        handle.remove()


def test_two_subjects_sit_in_their_own_slots(sd_pipe):
    from adaface.models.subject_prompt import encode_subjects_prompt

    tok, te = sd_pipe.tokenizer, sd_pipe.text_encoder
    a, b = _subject(seed=3) * 50, _subject(seed=4) * 50
    words = [tok(t, add_special_tokens=False).input_ids for t in ("a photo of", "and", "in the forest")]
    ids = [tok.bos_token_id, *words[0], *[0] * 16, *words[1], *[0] * 16, *words[2], tok.eos_token_id]
    ids += [tok.pad_token_id] * (77 - len(ids))
    start_a = 1 + len(words[0])
    start_b = start_a + 16 + len(words[1])
    expected = _clip_with_rows(te, ids, {start_a: a, start_b: b})
    with torch.no_grad():
        ours, slots = encode_subjects_prompt(tok, te, "a photo of z and y in the forest", {"z": a, "y": b})
        swapped, swapped_slots = encode_subjects_prompt(tok, te, "a photo of y and z in the forest", {"z": a, "y": b})
    assert slots == {"z": start_a, "y": start_b} and swapped_slots == {"y": start_a, "z": start_b}
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert (ours - swapped).abs().max() > 1e-3  # which subject stands where matters
    # a prompt with one of the two subjects is that subject's single-subject encoding, bit for bit
    with torch.no_grad():
        only_y, y_slots = encode_subjects_prompt(tok, te, "y, in the forest", {"z": a, "y": b})
        only_z, _ = encode_subjects_prompt(tok, te, "a photo of z", {"z": a, "y": b})
        assert y_slots == {"y": 1}
        assert torch.equal(only_y, encode_prompt(tok, te, "y, in the forest", b, placeholder="y"))
        assert torch.equal(only_z, encode_prompt(tok, te, "a photo of z", a))


@pytest.mark.parametrize("prompt, message", [
    ("z and z with y", "'z' at most once as a word, found 2"),
    ("a photo of a man", r"at least one of the subject placeholders \['z', 'y'\]"),
    ("hat " * 50 + "z y", "the 16 tokens of subject 'y' would be truncated"),
])
def test_two_subject_prompt_errors(sd_pipe, prompt, message):
    from adaface.models.subject_prompt import encode_subjects_prompt

    with pytest.raises(ValueError, match=message):
        encode_subjects_prompt(sd_pipe.tokenizer, sd_pipe.text_encoder, prompt, {"z": _subject(), "y": _subject()})

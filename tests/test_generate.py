"""`python -m adaface.generate` and the subject encoder, end to end on tiny models saved in the real layouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adaface import generate
from adaface.subject import SubjectEncoder, load_arcface_embedding, random_arcface
from adaface.testing.tiny_models import save_tiny_antelopev2, save_tiny_arc2face, tiny_motion_adapter, tiny_text_encoder

PROMPT = "a photo of z in the forest"
RUN = ["--num-images", "2", "--steps", "2", "--height", "16", "--width", "16", "--seed", "7", "--guidance", "2.0"]


def face_photo(box=(50, 150, 60, 160)) -> np.ndarray:
    """A bright square on black: a face for the tiny SCRFD-shaped detector."""
    img = np.zeros((200, 200, 3), np.uint8)
    img[box[0]:box[1], box[2]:box[3]] = (230, 200, 180)
    return img


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_sd15_dir) -> dict:
    from adaface.models.prompt_inverter import PromptInverter

    root = tmp_path_factory.mktemp("models")
    inverter = PromptInverter(tiny_text_encoder(seed=2), tokenizer=tiny_sd15_dir / "tokenizer")
    with torch.no_grad():  # a visible non-default mix, so a loader that ignored it would be caught
        inverter.layer_weights.copy_(torch.tensor([0.5, 0.3, 0.2]))
    inverter.save_pretrained(root / "inverter")
    tiny_motion_adapter().save_pretrained(str(root / "motion"))
    save_tiny_antelopev2(root / "insightface")
    Image.fromarray(face_photo()).save(root / "face.png")
    return {
        "base": str(tiny_sd15_dir),
        "arc2face": str(save_tiny_arc2face(root / "arc2face")),
        "inverter": str(root / "inverter"),
        "motion": str(root / "motion"),
        "face_root": str(root / "insightface"),
        "photo": str(root / "face.png"),
    }


def model_args(m: dict) -> list[str]:
    return ["--base", m["base"], "--arc2face", m["arc2face"], "--inverter", m["inverter"]]


@pytest.fixture(scope="module")
def image_run(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("image_run")
    code = generate.main([
        *model_args(models), "--face-root", models["face_root"], "--images", models["photo"],
        "--prompt", PROMPT, "--negative-prompt", "red hat", *RUN, "--out", str(out / "run"),
        "--save-embeddings", str(out / "subject.safetensors"),
    ])
    assert code == 0
    return out


def test_image_run_writes_images_settings_and_identity(image_run, models):
    from adaface.models.face_encoder import FaceEncoder

    run = image_run / "run"
    settings = json.loads((run / "settings.json").read_text())
    assert settings["kind"] == "image" and settings["seed"] == 7 and settings["prompts"] == [PROMPT]
    assert [o["seed"] for o in settings["outputs"]] == [7, 8]
    assert settings["options"]["negative_prompt"] == "red hat" and settings["options"]["steps"] == 2
    assert settings["subject"]["images"] == [str(Path(models["photo"]).resolve())]
    for out in settings["outputs"]:
        with Image.open(run / out["file"]) as im:
            assert im.size == (16, 16) and im.mode == "RGB"
    a, b = (np.asarray(Image.open(run / o["file"]), np.int16) for o in settings["outputs"])
    assert np.abs(a - b).max() > 0  # different seeds, different images
    identity = torch.from_numpy(np.load(run / "subject_arcface.npy"))
    torch.testing.assert_close(identity, FaceEncoder(models["face_root"])(models["photo"]))


def test_saved_embeddings_reproduce_the_run_through_plain_diffusers(image_run, models):
    """The textual-inversion file, loaded by diffusers, gives the same prompt_embeds and the same image."""
    from diffusers import StableDiffusionPipeline

    from adaface.models.subject_prompt import encode_prompt

    encoder = SubjectEncoder.from_pretrained(models["arc2face"], models["inverter"], tokenizer=models["base"])
    identity = torch.from_numpy(np.load(image_run / "run" / "subject_arcface.npy"))
    subject = encoder(identity)
    assert subject.shape == (16, 512)
    expected = encoder.inverter(encoder.arc2face.id_tokens(identity[None]))[0]
    torch.testing.assert_close(subject, expected)
    rows = torch.randn(2, 512)
    unit = rows / rows.norm(dim=1, keepdim=True)
    torch.testing.assert_close(encoder.arcface(embedding=rows), unit.mean(0) / unit.mean(0).norm())
    with pytest.raises(ValueError, match="exactly one of images, embedding, random_id"):
        encoder.arcface(random_id=1, embedding=rows)

    pipe = StableDiffusionPipeline.from_pretrained(models["base"])
    ours = encode_prompt(pipe.tokenizer, pipe.text_encoder, PROMPT, subject)
    pipe.load_textual_inversion(str(image_run / "subject.safetensors"))
    theirs, _ = pipe.encode_prompt("a photo of <z> in the forest", "cpu", 1, False)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)

    settings = json.loads((image_run / "run" / "settings.json").read_text())
    second = settings["outputs"][1]
    image = pipe(prompt="a photo of <z> in the forest", negative_prompt="red hat", num_inference_steps=2,
                 guidance_scale=2.0, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(second["seed"])).images[0]
    written = np.asarray(Image.open(image_run / "run" / second["file"]), np.float64)
    assert np.abs(np.round(image * 255) - written).max() <= 1  # PNG quantisation only


def test_video_run_writes_frames_and_gif(models, tmp_path):
    emb = tmp_path / "arcface.npy"
    np.save(emb, random_arcface(3).numpy())
    out = tmp_path / "video"
    assert generate.main([
        *model_args(models), "--embedding", str(emb), "--video", "--motion-adapter", models["motion"],
        "--num-frames", "2", "--num-images", "1", "--steps", "1", "--height", "16", "--width", "16",
        "--prompt", "portrait of z at night", "--out", str(out),
    ]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["kind"] == "video" and settings["pipeline"] == "AnimateDiffPipeline"
    assert settings["scheduler"]["class"] == "DDIMScheduler"
    (entry,) = settings["outputs"]
    assert entry["file"] == "p00_000.gif" and entry["frames"] == ["p00_000/000.png", "p00_000/001.png"]
    for frame in entry["frames"]:
        assert Image.open(out / frame).size == (16, 16)
    with Image.open(out / entry["file"]) as gif:
        assert gif.n_frames == 2
    torch.testing.assert_close(torch.from_numpy(np.load(out / "subject_arcface.npy")), random_arcface(3))


@pytest.fixture
def no_models(monkeypatch):
    """Any model load fails the test: option errors must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(generate, "load_subject_encoder", refuse)
    monkeypatch.setattr(generate, "load_pipeline", refuse)


RANDOM = ["--random-id", "1"]


@pytest.mark.parametrize("extra, message", [
    (RANDOM + ["--inverter", "{tmp}/nowhere"], "--inverter .*nowhere: not a Prompt Inverter folder"),
    (RANDOM + ["--base", "{tmp}/nowhere"], "--base .*nowhere: folder not found"),
    (RANDOM + ["--arc2face", "{tmp}"], "--arc2face .*: not an Arc2Face folder; missing encoder/config.json"),
    (RANDOM + ["--prompt", "a photo of a man"], "--prompt: .*placeholder 'z' exactly once"),
    (RANDOM + ["--height", "30"], "--height must be a positive multiple of 8"),
    (RANDOM + ["--num-images", "0"], "--num-images must be at least 1"),
    (RANDOM + ["--video"], "--video needs --motion-adapter"),
    (RANDOM + ["--save-embeddings", "{tmp}/s.bin"], "--save-embeddings .*must end in .safetensors"),
    (RANDOM + ["--face-root", "{tmp}"], "--face-root .*no insightface model pack 'antelopev2'"),
    (["--embedding", "{tmp}/bad.npy"], r"--embedding .*bad.npy: expected an ArcFace embedding \[512\]"),
    (["--embedding", "{tmp}/missing.npy"], "--embedding .*missing.npy: file not found"),
    (["--images", "{tmp}/bad.npy"], "--face-root is needed with --images"),
])
def test_bad_options_fail_before_any_model_loads(models, tmp_path, capsys, no_models, extra, message):
    import re

    np.save(tmp_path / "bad.npy", np.ones(7, np.float32))
    argv = [*model_args(models), "--prompt", PROMPT, "--out", str(tmp_path / "out")]
    argv += [a.format(tmp=tmp_path) for a in extra]  # argparse keeps the last value of a repeated option
    with pytest.raises(SystemExit) as info:
        generate.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_subject_sources_need_exactly_one(models, capsys):
    with pytest.raises(SystemExit):
        generate.main([*model_args(models), "--random-id", "1", "--embedding", "x.npy", "--out", "o"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate.main([*model_args(models), "--out", "o"])
    assert "one of the arguments --images --embedding --random-id is required" in capsys.readouterr().err


def test_embedding_files(tmp_path):
    rows = torch.randn(3, 512)
    np.save(tmp_path / "rows.npy", rows.numpy())
    from safetensors.torch import save_file

    save_file({"anything": rows[0]}, str(tmp_path / "one.safetensors"))
    torch.testing.assert_close(load_arcface_embedding(tmp_path / "rows.npy"), rows / rows.norm(dim=1, keepdim=True))
    assert load_arcface_embedding(tmp_path / "one.safetensors").shape == (1, 512)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a plain numeric"):
        load_arcface_embedding(tmp_path / "objects.npy")
    save_file({"a": rows[0], "b": rows[1]}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match="expected one tensor"):
        load_arcface_embedding(tmp_path / "two.safetensors")
    (tmp_path / "x.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=".npy or .safetensors"):
        load_arcface_embedding(tmp_path / "x.pt")
    assert torch.equal(random_arcface(5), random_arcface(5)) and not torch.equal(random_arcface(5), random_arcface(6))
    assert random_arcface(5).norm().item() == pytest.approx(1.0, abs=1e-6)


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)


def test_tool_modules_import_light():
    """The heavy libraries load when a command runs, not when its module (or its --help) is imported."""
    res = _python("-c", "import sys, adaface.generate, adaface.evaluate, adaface.subject\n"
                  "print(','.join(m for m in ('diffusers', 'insightface', 'onnxruntime', 'transformers') "
                  "if m in sys.modules))")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""


def test_help_documents_every_option():
    res = _python("-m", "adaface.generate", "--help")
    assert res.returncode == 0, res.stderr
    for action in generate.build_parser()._actions:
        for flag in action.option_strings:
            assert flag in res.stdout
        if action.option_strings and action.help is None:
            pytest.fail(f"{action.option_strings} has no help text")

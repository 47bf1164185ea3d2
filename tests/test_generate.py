"""`python -m adaface.generate` and the subject encoder, end to end on tiny models saved in the real layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adaface import generate
from adaface.subject import SubjectEncoder, load_arcface_embedding, random_arcface
from adaface.testing.cli import assert_help_lists_every_option, assert_imports_light, fresh_python
from adaface.testing.direct_arcface import direct_arcface_faces
from adaface.testing.tiny_models import save_tiny_antelopev2, save_tiny_arc2face, tiny_motion_adapter, tiny_text_encoder

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

PROMPT = "a photo of z in the forest"
RUN = ["--num-images", "2", "--steps", "2", "--height", "16", "--width", "16", "--seed", "7", "--guidance", "2.0"]


def face_photo(box=(50, 150, 60, 160)) -> np.ndarray:
    """A bright square on black: a face for the tiny SCRFD-shaped detector."""
    img = np.zeros((200, 200, 3), np.uint8)
    img[box[0]:box[1], box[2]:box[3]] = (230, 200, 180)
    return img


def clip_run_with_rows(model, ids: list[int], start: int, rows: torch.Tensor):
    """transformers' own CLIPTextModel forward on `ids`, the token embeddings from `start` on replaced by `rows`."""
    def swap(module, inputs, output):
        output = output.clone()
        output[:, start:start + rows.shape[1]] = rows.to(output.dtype)
        return output

    inner = getattr(model, "text_model", model)  # transformers 4 wraps the transformer; 5 does not
    handle = inner.embeddings.token_embedding.register_forward_hook(swap)
    try:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids]).expand(rows.shape[0], -1), output_hidden_states=True)
    finally:
        handle.remove()


def expected_subject(models: dict, identity: torch.Tensor) -> torch.Tensor:
    """The 16 subject embeddings computed step by step from the saved files with plain transformers (paper §2.1):
    Arc2Face's encoder on `photo of a id person` with the unit ArcFace vector (zero-padded) as the `id` token
    gives positions id..id+15; the inverter's CLIP encoder on `<bos> photo of a [16 slots] <eos>` with those in
    the slots, its last 3 hidden states mixed by the saved layer weights, then its final layer norm."""
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(models["base"], subfolder="tokenizer")
    a2f = CLIPTextModel.from_pretrained(Path(models["arc2face"]) / "encoder").eval()
    length, hidden = a2f.config.max_position_embeddings, a2f.config.hidden_size
    ids = tok("photo of a id person", padding="max_length", max_length=length).input_ids
    p = ids.index(tok("id", add_special_tokens=False).input_ids[0])
    face = F.pad(identity / identity.norm(), (0, hidden - 512))[None, None]
    id_tokens = clip_run_with_rows(a2f, ids, p, face).last_hidden_state[:, p:p + 16]

    folder = Path(models["inverter"])
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(str(folder / "model.safetensors"))
    inv = CLIPTextModel(CLIPTextConfig.from_dict(config["text_config"])).eval()
    inv.load_state_dict({k.removeprefix("text_encoder."): v for k, v in weights.items() if k != "layer_weights"})
    mix = weights["layer_weights"]
    torch.testing.assert_close(mix, torch.tensor([0.5, 0.3, 0.2]))  # the fixture's non-default mix was saved
    words = tok("photo of a", add_special_tokens=False).input_ids
    template = [tok.bos_token_id, *words, *[tok.eos_token_id] * 17]
    template += [tok.pad_token_id] * (length - len(template))
    a = 1 + len(words)
    states = clip_run_with_rows(inv, template, a, id_tokens).hidden_states[-3:]
    mixed = sum(w * h for w, h in zip(mix, states))
    with torch.no_grad():
        return getattr(inv, "text_model", inv).final_layer_norm(mixed)[0, a:a + 16]


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
    assert settings["contact_sheet"] == "contact_sheet.png"
    sheet = np.asarray(Image.open(run / "contact_sheet.png").convert("RGB"), np.int16)
    assert sheet.shape == (16, 32, 3)  # one prompt: one row of the two images
    assert np.array_equal(sheet[:, :16], a) and np.array_equal(sheet[:, 16:], b)
    assert settings["subject"]["random_stand_ins"] == [] and settings["subject"]["all_random"] is False
    identity = np.load(run / "subject_arcface.npy")
    faces = direct_arcface_faces(Path(models["face_root"]) / "models" / "antelopev2",
                                 np.asarray(Image.open(models["photo"]).convert("RGB")))
    assert faces  # the bright square is a face to the tiny detector
    largest = max(faces, key=lambda f: f[0])[1]  # one photo: its largest face is the identity
    np.testing.assert_allclose(identity, largest, atol=1e-5, rtol=0)


def test_subject_embeddings_match_a_direct_computation(image_run, models):
    """What generate used (its textual-inversion file) and SubjectEncoder both equal the step-by-step result."""
    from safetensors.torch import load_file

    identity = torch.from_numpy(np.load(image_run / "run" / "subject_arcface.npy"))
    expected = expected_subject(models, identity)
    assert expected.shape == (16, 512)
    saved = load_file(str(image_run / "subject.safetensors"))
    assert list(saved) == ["<z>"]
    torch.testing.assert_close(saved["<z>"], expected, atol=1e-5, rtol=1e-5)
    encoder = SubjectEncoder.from_pretrained(models["arc2face"], models["inverter"], tokenizer=models["base"])
    torch.testing.assert_close(encoder(identity), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encoder(identity[None])[0], expected, atol=1e-5, rtol=1e-5)


def test_saved_embeddings_reproduce_the_run_through_plain_diffusers(image_run, models):
    """The textual-inversion file, loaded by diffusers, gives the same prompt_embeds and the same image."""
    from diffusers import StableDiffusionPipeline

    from adaface.models.subject_prompt import encode_prompt

    encoder = SubjectEncoder.from_pretrained(models["arc2face"], models["inverter"], tokenizer=models["base"])
    identity = torch.from_numpy(np.load(image_run / "run" / "subject_arcface.npy"))
    subject = encoder(identity)
    assert subject.shape == (16, 512)  # its values: test_subject_embeddings_match_a_direct_computation
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
    (RANDOM + ["--height", "30"], "--height must be a multiple of 8"),
    (RANDOM + ["--num-images", "0"], "--num-images must be at least 1"),
    (RANDOM + ["--video"], "--video needs --motion-adapter"),
    (RANDOM + ["--save-embeddings", "{tmp}/s.bin"], "--save-embeddings .*must end in .safetensors"),
    (RANDOM + ["--face-root", "{tmp}"], "--face-root .*no insightface model pack 'antelopev2'"),
    (["--embedding", "{tmp}/bad.npy"], r"--embedding .*bad.npy: expected an ArcFace embedding \[512\]"),
    (["--embedding", "{tmp}/missing.npy"], "--embedding .*missing.npy: file not found"),
    (["--images", "{tmp}/bad.npy"], "--face-root is needed with --images"),
    (RANDOM + ["--seed", str(2**63)],
     rf"--seed must be between {INT64_MIN} and {INT64_MAX - 3}, got {2**63}: the 4 outputs use"),
    (RANDOM + ["--seed", str(INT64_MAX - 2)], r"--seed must be between .*--seed \+ 0 \.\.\. --seed \+ 3"),
    (RANDOM + ["--seed", str(INT64_MIN - 1)], f"--seed must be between {INT64_MIN} and"),
    (["--random-id", str(2**64)], f"--random-id must be between {INT64_MIN} and {INT64_MAX}, got {2**64}"),
    (RANDOM + ["--guidance", "nan"], "--guidance must be a finite number >= 0, got nan"),
    (RANDOM + ["--guidance", "-1"], "--guidance must be a finite number >= 0, got -1.0"),
    (RANDOM + ["--guidance", "inf"], "--guidance must be a finite number >= 0, got inf"),
    (RANDOM + ["--fps", "nan"], r"--fps must be a number in \(0, 100\]"),
    (RANDOM + ["--fps", "0"], r"--fps must be a number in \(0, 100\]"),
    (RANDOM + ["--fps", "1000"], r"--fps must be a number in \(0, 100\].*got 1000.0"),
    (RANDOM + ["--context-length", "4"], "--context-length is only used with --video"),
    (RANDOM + ["--video", "--motion-adapter", "{motion}", "--context-length", "9"],
     "--context-length must be between 1 and the motion adapter's motion_max_seq_length 8, got 9"),
    (RANDOM + ["--video", "--motion-adapter", "{motion}", "--context-length", "4", "--context-stride", "5"],
     r"--context-stride must be between 1 and --context-length \(4\), got 5"),
    (RANDOM + ["--video", "--motion-adapter", "{motion}", "--context-stride", "0"],
     r"--context-stride must be between 1 and --context-length \(8\), got 0"),
])
def test_bad_options_fail_before_any_model_loads(models, tmp_path, capsys, no_models, extra, message):
    import re

    np.save(tmp_path / "bad.npy", np.ones(7, np.float32))
    argv = [*model_args(models), "--prompt", PROMPT, "--out", str(tmp_path / "out")]
    argv += [a.format(tmp=tmp_path, motion=models["motion"]) for a in extra]  # the last of a repeated option wins
    with pytest.raises(SystemExit) as info:
        generate.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seed, num_images, prompts", [
    (INT64_MAX - 3, 4, 1), (INT64_MAX - 5, 3, 2), (INT64_MIN, 4, 1), (INT64_MAX, 1, 1), (None, 4, 1),
])
def test_seed_range_edges_pass_the_checks(models, tmp_path, seed, num_images, prompts):
    """The last output's seed (seed + outputs - 1) may be exactly the int64 maximum; torch seeds it."""
    argv = [*model_args(models), "--random-id", str(INT64_MAX), "--num-images", str(num_images),
            "--out", str(tmp_path / "out"), *[x for k in range(prompts) for x in ("--prompt", f"z {k}")]]
    if seed is not None:
        argv += ["--seed", str(seed)]
    args = generate.build_parser().parse_args(argv)
    assert len(generate.check_args(args)) == prompts
    if seed is not None:
        torch.Generator().manual_seed(seed + prompts * num_images - 1)


def test_subject_sources_need_exactly_one(models, capsys):
    with pytest.raises(SystemExit):
        generate.main([*model_args(models), "--random-id", "1", "--embedding", "x.npy", "--out", "o"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate.main([*model_args(models), "--out", "o"])
    assert "a subject is needed: --images, --embedding or --random-id" in capsys.readouterr().err


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


def test_tool_modules_import_light():
    """The heavy libraries load when a command runs, not when its module (or its --help) is imported."""
    assert_imports_light(["adaface.generate", "adaface.evaluate", "adaface.subject"],
                         ["diffusers", "insightface", "onnxruntime", "transformers"])


def test_help_documents_every_option():
    assert_help_lists_every_option("adaface.generate", generate.build_parser())


TINY = ["--steps", "1", "--guidance", "1", "--height", "16", "--width", "16", "--seed", "3"]


def test_a_random_stand_in_for_a_photo_without_a_face_is_said_and_recorded(models, tmp_path, capsys):
    """--on-no-face random used to swap in a random identity silently while settings.json named the photo."""
    import torch.nn.functional as F

    from adaface.models.face_encoder import FaceEncoder

    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(tmp_path / "dark.png")  # no face for the detector
    dark, face = str(tmp_path / "dark.png"), models["photo"]
    out = tmp_path / "all"
    assert generate.main([*model_args(models), "--face-root", models["face_root"], "--images", dark,
                          "--on-no-face", "random", "--num-images", "1", *TINY, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"--on-no-face random: no face found in {dark}; a random identity stands in for it" in err
    assert "the whole identity is random" in err
    subject = json.loads((out / "settings.json").read_text())["subject"]
    assert subject["random_stand_ins"] == [dark] and subject["all_random"] is True
    expected = F.normalize(torch.randn(512, generator=torch.Generator().manual_seed(3)), dim=0)  # from --seed
    torch.testing.assert_close(torch.from_numpy(np.load(out / "subject_arcface.npy")), expected)

    out = tmp_path / "mixed"
    assert generate.main([*model_args(models), "--face-root", models["face_root"], "--images", face, dark,
                          "--on-no-face", "random", "--num-images", "1", *TINY, "--out", str(out)]) == 0
    assert "averaged in with the other photos" in capsys.readouterr().err
    subject = json.loads((out / "settings.json").read_text())["subject"]
    assert subject["random_stand_ins"] == [dark] and subject["all_random"] is False
    rows = torch.stack([FaceEncoder(models["face_root"])(face), expected])
    torch.testing.assert_close(torch.from_numpy(np.load(out / "subject_arcface.npy")),
                               F.normalize(rows.mean(0), dim=0), atol=1e-6, rtol=0)

    with pytest.raises(SystemExit):  # the default still refuses
        generate.main([*model_args(models), "--face-root", models["face_root"], "--images", dark, *TINY,
                       "--out", str(tmp_path / "refused")])
    assert "--images: no face found in" in capsys.readouterr().err


def test_out_must_be_new_or_an_earlier_run_replaced_with_overwrite(models, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*model_args(models), "--random-id", "2", *TINY, "--out", str(out)]
    assert generate.main([*argv, "--num-images", "2", "--save-embeddings", str(out / "alice.safetensors")]) == 0
    (out / "eval_report.json").write_text("{}")  # evaluate's report of the earlier run
    (out / "p00_002.png").write_bytes(b"")  # an output the earlier run wrote but had not listed yet
    (out / "notes.txt").write_text("mine")  # not the run's: never deleted
    first = json.loads((out / "settings.json").read_text())

    with pytest.raises(SystemExit):
        generate.main([*argv, "--num-images", "1"])
    assert "--out " in (err := capsys.readouterr().err) and "not empty (holds an earlier generate run); pass " \
        "--overwrite" in err
    assert json.loads((out / "settings.json").read_text()) == first  # refused before touching anything

    assert generate.main([*argv, "--num-images", "1", "--overwrite"]) == 0
    assert sorted(f.name for f in out.iterdir()) == ["contact_sheet.png", "notes.txt", "p00_000.png",
                                                    "settings.json", "subject_arcface.npy"]
    second = json.loads((out / "settings.json").read_text())
    assert [o["file"] for o in second["outputs"]] == ["p00_000.png"] and second["options"]["overwrite"] is True

    other = tmp_path / "other"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"")
    with pytest.raises(SystemExit):
        generate.main([*argv[:-1], str(other), "--overwrite"])
    assert "--overwrite: --out" in (err := capsys.readouterr().err) and "holds no generate run" in err
    assert (other / "holiday.jpg").exists()
    args = generate.build_parser().parse_args([*argv[:-1], str(tmp_path / "new"), "--overwrite"])
    generate.check_args(args)  # a new folder: --overwrite has nothing to replace, and is no error
    assert args.clear == []


def test_settings_are_strict_json(tmp_path):
    from adaface._cli import save_strict_json

    with pytest.raises(ValueError, match="settings.json: refusing to write a non-finite number"):
        save_strict_json({"guidance": float("nan")}, tmp_path / "settings.json")
    assert not (tmp_path / "settings.json").exists()
    save_strict_json({"guidance": 7.5}, tmp_path / "settings.json")
    assert json.loads((tmp_path / "settings.json").read_text()) == {"guidance": 7.5}


def test_cpu_defaults_are_announced_before_starting(models, capsys):
    base = [*model_args(models), "--random-id", "1", "--out", "o"]
    generate.warn_if_slow_on_cpu(generate.build_parser().parse_args(base), ["a photo of z"], torch.device("cpu"))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "4 image(s) at 512x512, 30 steps, on the CPU: expect hours" in err
    small = generate.build_parser().parse_args([*base, "--height", "64", "--width", "64"])
    generate.warn_if_slow_on_cpu(small, ["a photo of z"], torch.device("cpu"))
    generate.warn_if_slow_on_cpu(generate.build_parser().parse_args(base), ["z"], torch.device("cuda"))
    assert capsys.readouterr().err == ""


def test_a_32_frame_clip_through_free_noise(models, tmp_path):
    """The tiny motion adapter sees 8 frames (plain AnimateDiff fails on more); FreeNoise's windows give 32."""
    out = tmp_path / "long"
    assert generate.main([*model_args(models), "--random-id", "5", "--video", "--motion-adapter", models["motion"],
                          "--num-frames", "32", "--context-stride", "4", "--num-images", "1", *TINY,
                          "--prompt", "portrait of z at night", "--out", str(out)]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["video"] == {"num_frames": 32, "free_noise": True, "context_length": 8, "context_stride": 4}
    (entry,) = settings["outputs"]
    assert len(entry["frames"]) == 32
    with Image.open(out / entry["file"]) as gif:
        assert gif.n_frames == 32
    frames = [np.asarray(Image.open(out / f), np.int16) for f in entry["frames"]]
    assert all(f.shape == (16, 16, 3) for f in frames)
    assert max(np.abs(frames[0] - f).max() for f in frames[8:]) > 0  # later windows are not a copy of the first
    sheet = np.asarray(Image.open(out / "contact_sheet.png").convert("RGB"), np.int16)
    assert np.array_equal(sheet, frames[0])  # a video's first frame stands for it


def test_free_noise_prompt_gives_the_same_embeddings(models):
    """Under FreeNoise the subject enters as a textual inversion: the pipeline's own encoding of the rewritten
    prompt equals encode_prompt's."""
    from diffusers import StableDiffusionPipeline

    from adaface.models.subject_prompt import encode_prompt

    pipe = StableDiffusionPipeline.from_pretrained(models["base"])
    subject = torch.randn(16, 512, generator=torch.Generator().manual_seed(0))
    ours = encode_prompt(pipe.tokenizer, pipe.text_encoder, "z's portrait, at night", subject)
    pipe.load_textual_inversion({generate.FREE_NOISE_TOKEN: subject})
    text = generate.free_noise_prompt("z's portrait, at night", "z")
    assert text == f"{generate.FREE_NOISE_TOKEN}'s portrait, at night"
    theirs, _ = pipe.encode_prompt(text, "cpu", 1, False)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# several subjects
# ---------------------------------------------------------------------------------------------------------------

PAIR_PROMPT = "a photo of z and y in the forest"
PAIR = ["--subject", "z=random:11", "--subject", "y=random:12", "--prompt", PAIR_PROMPT, "--prompt", "y at night",
        "--num-images", "1", "--steps", "2", "--guidance", "2.0", "--height", "16", "--width", "32", "--seed", "5"]


@pytest.fixture(scope="module")
def pair_runs(models, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pair")
    assert generate.main([*model_args(models), *PAIR, "--out", str(root / "plain"),
                          "--save-embeddings", str(root / "plain" / "pair.safetensors")]) == 0
    assert generate.main([*model_args(models), *PAIR, "--region", "z=left", "--region", "y=right",
                          "--out", str(root / "regions")]) == 0
    return root


def test_two_subjects_record_each_subject_and_write_one_ti_file_each(pair_runs, models):
    from safetensors.torch import load_file

    settings = json.loads((pair_runs / "regions" / "settings.json").read_text())
    z, y = settings["subjects"]
    assert (z["placeholder"], z["random_id"], z["seed"], z["region"]) == ("z", 11, 11, [0.0, 0.0, 0.5, 1.0])
    assert (y["placeholder"], y["random_id"], y["seed"], y["region"]) == ("y", 12, 12, [0.5, 0.0, 1.0, 1.0])
    assert "subject" not in settings  # several subjects: no single one to name
    for entry, seed in ((z, 11), (y, 12)):
        torch.testing.assert_close(torch.from_numpy(np.load(pair_runs / "regions" / entry["arcface_file"])),
                                   random_arcface(seed))
    plain = json.loads((pair_runs / "plain" / "settings.json").read_text())
    assert [s["region"] for s in plain["subjects"]] == [None, None]
    encoder = SubjectEncoder.from_pretrained(models["arc2face"], models["inverter"], tokenizer=models["base"])
    for entry, seed, name, token in ((plain["subjects"][0], 11, "pair_z", "<z>"),
                                     (plain["subjects"][1], 12, "pair_y", "<y>")):
        assert entry["embeddings_file"] == str((pair_runs / "plain" / f"{name}.safetensors").resolve())
        assert entry["ti_token"] == token
        saved = load_file(entry["embeddings_file"])
        assert list(saved) == [token]
        torch.testing.assert_close(saved[token], encoder(random_arcface(seed)), atol=1e-5, rtol=1e-5)


def test_two_ti_files_in_one_pipeline_give_encode_subjects_prompt(pair_runs, models):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from adaface.models.subject_prompt import encode_subjects_prompt

    pipe = StableDiffusionPipeline.from_pretrained(models["base"])
    z = load_file(str(pair_runs / "plain" / "pair_z.safetensors"))["<z>"]
    y = load_file(str(pair_runs / "plain" / "pair_y.safetensors"))["<y>"]
    with torch.no_grad():
        ours, _ = encode_subjects_prompt(pipe.tokenizer, pipe.text_encoder, PAIR_PROMPT, {"z": z, "y": y})
    pipe.load_textual_inversion(str(pair_runs / "plain" / "pair_z.safetensors"))
    pipe.load_textual_inversion(str(pair_runs / "plain" / "pair_y.safetensors"))
    theirs, _ = pipe.encode_prompt("a photo of <z> and <y> in the forest", "cpu", 1, False)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_without_regions_two_subjects_are_the_plain_pipeline_with_those_prompt_embeds(pair_runs, models):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from adaface.models.subject_prompt import encode_subjects_prompt

    pipe = StableDiffusionPipeline.from_pretrained(models["base"])
    subjects = {"z": load_file(str(pair_runs / "plain" / "pair_z.safetensors"))["<z>"],
                "y": load_file(str(pair_runs / "plain" / "pair_y.safetensors"))["<y>"]}
    settings = json.loads((pair_runs / "plain" / "settings.json").read_text())
    assert [o["prompt"] for o in settings["outputs"]] == [PAIR_PROMPT, "y at night"]
    negative, _ = pipe.encode_prompt("", "cpu", 1, False)
    regional = np.asarray(Image.open(pair_runs / "regions" / "p00_000.png"), np.float64)
    for out in settings["outputs"]:
        with torch.no_grad():
            embeds, _ = encode_subjects_prompt(pipe.tokenizer, pipe.text_encoder, out["prompt"], subjects)
        image = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2, guidance_scale=2.0,
                     height=16, width=32, output_type="np", generator=torch.Generator().manual_seed(out["seed"]),
                     ).images[0]
        written = np.asarray(Image.open(pair_runs / "plain" / out["file"]), np.float64)
        assert np.abs(np.round(image * 255) - written).max() <= 1  # PNG quantisation only
        if out["prompt"] == PAIR_PROMPT:
            assert np.abs(regional - written).max() > 1  # the regions change the picture


def test_two_subjects_with_regions_in_a_free_noise_video(models, tmp_path):
    out = tmp_path / "video"
    assert generate.main([*model_args(models), "--subject", "z=random:1", "--subject", "y=random:2",
                          "--region", "z=left", "--region", "y=right", "--video", "--motion-adapter",
                          models["motion"], "--num-frames", "10", "--num-images", "1", *TINY,
                          "--prompt", "z and y on the beach", "--out", str(out)]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["video"]["free_noise"] is True and len(settings["outputs"][0]["frames"]) == 10
    assert [s["region"] for s in settings["subjects"]] == [[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]]
    assert generate.free_noise_prompt("z and y", generate.free_noise_tokens(["z", "y"])) == \
        "<adaface-subject-0> and <adaface-subject-1>"


M = "{m}"
SUBJECTS = ["--subject", "z=random:1", "--subject", "y=random:2"]


@pytest.mark.parametrize("extra, message", [
    (SUBJECTS + ["--prompt", "a photo of z"], "--subject y: the placeholder 'y' appears in no prompt"),
    (["--subject", "z=random:1", "--subject", "z=random:2", "--prompt", "z"],
     "--subject: 2 subjects use the placeholder 'z'; each subject needs its own"),
    (SUBJECTS + ["--prompt", "z and y", "--region", "z=0,0,1.5,1"],
     r"--region z=0,0,1.5,1: region 0,0,1.5,1: every coordinate must be a fraction in \[0, 1\]"),
    (SUBJECTS + ["--prompt", "z and y", "--region", "z=0.5,0,0.5,1"], "--region z=0.5,0,0.5,1: .* is empty"),
    (SUBJECTS + ["--prompt", "z and y", "--region", "x=left"],
     "--region x=left: no subject has the placeholder 'x' \\(subjects: z, y\\)"),
    (SUBJECTS + ["--prompt", "z and y", "--region", "z=left", "--region", "y=0.4,0,1,1"],
     r"--region: the regions of 'z' \(0,0,0.5,1\) and 'y' \(0.4,0,1,1\) overlap; pass --allow-overlap"),
    ([x for k in "abcde" for x in ("--subject", f"{k}=random:{ord(k)}")] + ["--prompt", "a b c d e"],
     r"--subject: the prompt 'a b c d e' uses 5 subjects, whose 5 x 16 slots exceed the 75 positions"),
    (SUBJECTS + ["--random-id", "3", "--prompt", "z and y"], "--subject: name every subject with --subject"),
    (SUBJECTS + ["--prompt", "z and z and y"], "--prompt: .*'z' at most once as a word, found 2"),
    (["--subject", "z=random:x", "--prompt", "z"], "--subject 'z=random:x': random:SEED needs an integer seed"),
    (["--subject", "z=embedding:{m}/none.npy", "--prompt", "z"],
     "--subject z=embedding:FILE .*none.npy: file not found"),
    (["--subject", "z={m}/a.jpg", "--prompt", "z"], "--face-root is needed with --subject z=PHOTOS"),
])
def test_bad_subject_options_are_one_line_errors_before_any_model(models, tmp_path, extra, message):
    import re

    out = tmp_path / "out"
    argv = [a.replace(M, str(tmp_path)) for a in extra]
    res = fresh_python("-m", "adaface.generate", *model_args(models), *argv, "--out", str(out))
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m adaface.generate: error: ") and re.search(message, last), res.stderr
    assert not out.exists()


def test_overlap_is_allowed_when_asked(models, tmp_path):
    args = generate.build_parser().parse_args([
        *model_args(models), *SUBJECTS, "--prompt", "z and y", "--region", "z=left", "--region", "y=0.4,0,1,1",
        "--allow-overlap", "--out", str(tmp_path / "o")])
    assert generate.check_args(args) == ["z and y"]
    assert set(args.regions) == {"z", "y"}
    single = generate.build_parser().parse_args([*model_args(models), "--random-id", "1", "--out", "o"])
    assert generate.check_args(single) == ["a photo of z"] and [s.placeholder for s in single.subjects] == ["z"]
    pair = generate.build_parser().parse_args([*model_args(models), *SUBJECTS, "--out", "o"])
    assert generate.check_args(pair) == ["a photo of z and y"]


def test_a_prompt_that_would_cut_a_subjects_slots_is_refused_before_any_model(models, tmp_path, capsys, no_models):
    long = "hat " * 45 + "z and y"  # z fits; y's 16 slots would run past the 77 tokens
    with pytest.raises(SystemExit):
        generate.main([*model_args(models), *SUBJECTS, "--prompt", long, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--prompt: prompt 'hat" in err and "the 16 tokens of subject 'y' would be truncated" in err
    assert not (tmp_path / "out").exists()

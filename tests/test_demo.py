"""`python -m adaface.demo` without a browser: its request runner on the tiny models, its errors and its CLI.

The page itself is driven in a real browser by tests/test_demo_browser.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adaface import demo
from adaface._cli import OptionError
from adaface.subject import random_arcface
from adaface.testing.cli import assert_help_lists_every_option, assert_imports_light, fresh_python

SMALL = dict(steps=2, guidance=2.0, height=16, width=16)


def face_photo(box=(50, 150, 60, 160)) -> np.ndarray:
    """A bright square on black: a face for the tiny SCRFD-shaped detector."""
    img = np.zeros((200, 200, 3), np.uint8)
    img[box[0]:box[1], box[2]:box[3]] = (230, 200, 180)
    return img


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    return demo.build_tiny_models(tmp_path_factory.mktemp("tiny_demo"))


def demo_args(argv: list[str]):
    return demo.check_args(demo.build_parser().parse_args(argv))


@pytest.fixture(scope="module")
def studio(tiny, tmp_path_factory) -> demo.Studio:
    out = tmp_path_factory.mktemp("demo_out")
    argv = ["--base", tiny["base"], "--arc2face", tiny["arc2face"], "--inverter", tiny["inverter"],
            "--face-root", tiny["face_root"], "--motion-adapter", tiny["motion_adapter"], "--out", str(out)]
    args = demo_args(argv)
    return demo.Studio(demo.generate_args(args), args.out)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("photos")
    files = {"face": face_photo(), "other": face_photo((20, 90, 100, 190)), "dark": np.zeros((64, 64, 3), np.uint8)}
    out = {}
    for name, rgb in files.items():
        Image.fromarray(rgb).save(root / f"{name}.png")
        out[name] = str(root / f"{name}.png")
    (root / "broken.jpg").write_bytes(b"this is not a JPEG")
    out["broken"] = str(root / "broken.jpg")
    return out


def test_tiny_models_are_built_once(tiny):
    root = Path(tiny["base"]).parent
    stamp = (root / "complete").stat().st_mtime_ns
    assert demo.build_tiny_models(root) == tiny
    assert (root / "complete").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert not list(root.glob(".build-*"))
    assert (Path(tiny["base"]) / "model_index.json").is_file()
    assert (Path(tiny["face_root"]) / "models" / "antelopev2" / "scrfd_10g_bnkps.onnx").is_file()


def test_image_request_writes_a_generate_run(studio, photos):
    """Images, the textual-inversion file and a settings.json that generate's own reader would accept."""
    from safetensors.torch import load_file

    req = demo.Request(prompts=["a photo of z in the forest", "z wearing a red hat"], photos=[photos["face"]],
                       negative_prompt="snow", seed=11, num_images=2, **SMALL)
    result = studio.run(req)
    assert [o.seed for o in result.outputs] == [11, 12, 13, 14]
    assert [o.prompt for o in result.outputs] == [req.prompts[0]] * 2 + [req.prompts[1]] * 2
    pixels = [np.asarray(Image.open(o.file), np.int16) for o in result.outputs]
    assert all(p.shape == (16, 16, 3) for p in pixels)
    assert np.abs(pixels[0] - pixels[1]).max() > 0
    settings = json.loads(result.settings_file.read_text())
    assert settings["tool"] == "adaface.demo" and settings["kind"] == "image" and settings["seed"] == 11
    assert settings["prompts"] == req.prompts and settings["options"]["negative_prompt"] == "snow"
    assert settings["subject"]["images"] == [str(Path(photos["face"]).resolve())]
    assert [e["file"] for e in settings["outputs"]] == [o.file.name for o in result.outputs]
    # noise has no face to the tiny detector: scored, and reported as no face
    assert all(o.scored and o.similarity is None for o in result.outputs)
    assert all(e["arcface_similarity"] is None for e in settings["outputs"])
    assert "no face detected" in result.outputs[0].caption()

    # the subject the images used: the identity of the photo, through the subject encoder
    identity = torch.from_numpy(np.load(result.folder / "subject_arcface.npy"))
    expected_identity = studio.subject_encoder.face_encoder([photos["face"]])
    torch.testing.assert_close(identity, expected_identity)
    (token,) = load_file(str(result.embeddings_file)).items()
    assert token[0] == "<z>"
    torch.testing.assert_close(token[1], studio.subject_encoder(identity).float())


def test_uploads_show_the_face_used(studio, photos, tmp_path):
    group = face_photo()
    group[20:60, 5:45] = (230, 200, 180)
    Image.fromarray(group).save(tmp_path / "group.png")
    paths = [photos["face"], str(tmp_path / "group.png"), photos["dark"], photos["broken"]]
    thumbs, note = studio.face_previews(paths)
    assert [caption for _, caption in thumbs] == ["face.png", "group.png"]
    for thumb, _ in thumbs:  # the bright square with a margin: mostly the square, some black around it
        px = np.asarray(thumb)
        assert max(thumb.size) <= 128 and 0.3 < (px.sum(-1) > 0).mean() < 1
    lines = note.splitlines()
    # the demo's tiny detector is random: it sees some faces in a square, so only the wording is checked here
    used = r"(one face|(\d+) faces; the largest is used \(face (\d+) of \2 from the left\)), shown above"
    assert re.fullmatch(f"- face.png: {used}", lines[0]) and re.fullmatch(f"- group.png: {used}", lines[1])
    assert lines[2] == "- dark.png: no face detected in this photo; it cannot be used"
    assert lines[3].startswith("- broken.jpg: cannot be read")


def test_same_request_same_images(studio):
    req = demo.Request(prompts=["portrait of z"], random_id=5, seed=3, **SMALL)
    a, b = studio.run(req), studio.run(req)
    assert a.folder != b.folder
    assert np.array_equal(np.asarray(Image.open(a.outputs[0].file)), np.asarray(Image.open(b.outputs[0].file)))
    torch.testing.assert_close(torch.from_numpy(np.load(a.folder / "subject_arcface.npy")), random_arcface(5))


def test_similarity_follows_the_evaluation(studio, photos, tmp_path):
    """An output that is the reference photo itself scores 1; another face scores what ArcFace says."""
    refs = studio.subject_encoder.face_encoder.embed_each([photos["face"]])
    for name in ("face", "other", "dark"):
        Image.open(photos[name]).save(tmp_path / f"{name}.png")
    same, _ = studio.similarity(tmp_path, {"prompt": "z", "file": "face.png"}, refs)
    assert same == pytest.approx(1.0, abs=1e-5)
    other, _ = studio.similarity(tmp_path, {"prompt": "z", "file": "other.png"}, refs)
    # the evaluation's rule: the best of the detected faces (the tiny detector finds several on a square)
    faces = studio.subject_encoder.face_encoder.app.get(np.asarray(Image.open(photos["other"]))[:, :, ::-1].copy())
    expected = max(float(np.dot(f.embedding / np.linalg.norm(f.embedding), refs[0].numpy())) for f in faces)
    assert other == pytest.approx(expected, abs=1e-5) and other < 0.999
    # a clip: the mean over the frames with a face, and the share of such frames
    entry = {"prompt": "z", "file": "clip.gif", "frames": ["face.png", "dark.png", "other.png", "face.png"]}
    mean, fraction = studio.similarity(tmp_path, entry, refs)
    assert fraction == pytest.approx(0.75) and mean == pytest.approx((2 + expected) / 3, abs=1e-5)
    assert studio.similarity(tmp_path, {"prompt": "z", "file": "face.png"}, None) == (None, None)


def test_video_request(studio):
    req = demo.Request(prompts=["z walking on the beach"], random_id=2, seed=0, video=True, num_frames=3, fps=4,
                       steps=1, guidance=1.0, height=16, width=16)
    result = studio.run(req)
    (out,) = result.outputs
    assert out.file.suffix == ".gif"
    with Image.open(out.file) as gif:
        assert gif.n_frames == 3 and gif.info["duration"] == 250
    settings = json.loads(result.settings_file.read_text())
    assert settings["kind"] == "video" and settings["pipeline"] == "AnimateDiffPipeline"
    assert settings["outputs"][0]["frames"] == [f"p00_000/{k:03d}.png" for k in range(3)]
    assert out.face_fraction == 0.0 and "face in 0% of frames" in out.caption()
    assert studio.max_frames == 8  # the tiny motion module's length


@pytest.mark.parametrize("fields, message", [
    (dict(prompts=["a photo of a man"], random_id=1), "prompt 1: prompt must contain the subject placeholder 'z'"),
    (dict(prompts=["a photo of z", "z and z"], random_id=1), "prompt 2: .*found 2"),
    (dict(prompts=["  "], random_id=1), "write at least one prompt"),
    (dict(prompts=["a photo of z"]), "upload at least one face photo, or choose a random ID"),
    (dict(prompts=["a photo of z"], photos=["{dark}"]), "^no face found in dark.png$"),
    (dict(prompts=["a photo of z"], photos=["{face}", "{broken}"]), "^--images broken.jpg: not a readable image"),
    (dict(prompts=["a photo of z"], photos=["{face}"], random_id=3), "either photos or a random ID"),
    (dict(prompts=["z"], random_id=1, video=True, num_frames=9), r"frames must be between 1 and 8 \(the motion"),
    (dict(prompts=["z"], random_id=1, height=20), "--height must be a multiple of 8"),
    (dict(prompts=["z"], random_id=1, seed=2**63), "--seed must be between"),
])
def test_bad_requests_are_one_line_errors(studio, photos, fields, message):
    import re

    if "photos" in fields:
        fields["photos"] = [p.format(**photos) for p in fields["photos"]]
    with pytest.raises(demo.DemoError) as info:
        studio.run(demo.Request(**{**SMALL, **fields}))
    assert re.search(message, str(info.value)), str(info.value)
    assert "\n" not in str(info.value)


def test_page_handler_shows_errors_and_results(studio, photos):
    page = dict(photos=None, use_random=False, random_id=0, prompts="a photo of z", negative_prompt="",
                seed=-1, num_images=1, **SMALL)
    gallery, status, files = demo.respond(studio, dict(page))
    assert gallery == [] and files is None
    assert status == "**Error:** upload at least one face photo, or choose a random ID"
    gallery, status, files = demo.respond(studio, {**page, "photos": [photos["dark"]]})
    assert status == "**Error:** no face found in dark.png"
    gallery, status, files = demo.respond(studio, {**page, "use_random": True, "random_id": 4})
    ((image, caption),) = gallery
    assert Path(image).is_file() and caption.startswith("a photo of z · seed ")
    assert [Path(f).name for f in files] == ["subject.safetensors", "settings.json"]
    seed = json.loads(Path(files[1]).read_text())["seed"]  # -1 asked for a random seed: it is recorded
    assert f"seed {seed}" in caption


def test_options_fail_before_any_model_loads(tiny, tmp_path):
    with pytest.raises(OptionError, match="--base is needed"):
        demo.generate_args(demo_args([]))
    with pytest.raises(OptionError, match="--inverter .*nowhere: not a Prompt Inverter folder"):
        demo.generate_args(demo_args(["--base", tiny["base"], "--arc2face", tiny["arc2face"],
                                      "--inverter", str(tmp_path / "nowhere")]))
    with pytest.raises(OptionError, match="--face-root .*no insightface model pack"):
        demo.generate_args(demo_args(["--base", tiny["base"], "--arc2face", tiny["arc2face"],
                                      "--inverter", tiny["inverter"], "--face-root", str(tmp_path)]))
    with pytest.raises(OptionError, match="--max-images must be at least 1"):
        demo_args(["--max-images", "0"])
    with pytest.raises(OptionError, match="--tiny-dir is only used with --tiny"):
        demo_args(["--tiny-dir", str(tmp_path)])
    (tmp_path / "file").write_text("")
    with pytest.raises(OptionError, match="--out .*exists and is not a folder"):
        demo_args(["--out", str(tmp_path / "file")])


def test_without_gradio_one_line_install_hint():
    # None in sys.modules makes `import gradio` raise ImportError, as when it is not installed
    res = fresh_python("-c", "import sys, runpy; sys.modules['gradio'] = None; sys.argv = ['demo', '--tiny']; "
                  "runpy.run_module('adaface.demo', run_name='__main__')")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        'python -m adaface.demo: error: gradio is not installed: pip install -e ".[demo]" (or pip install gradio)'
    ]


def test_module_imports_light():
    assert_imports_light(["adaface.demo", "adaface.plot"],
                         ["gradio", "diffusers", "insightface", "matplotlib", "transformers"])


def test_help_documents_every_option():
    assert_help_lists_every_option("adaface.demo", demo.build_parser())


def test_a_second_person_left_and_right(studio, photos):
    from safetensors.torch import load_file

    req = demo.Request(prompts=["z and y in the forest", "y at night"], photos=[photos["face"]], seed=4,
                       second_random_id=9, second_placeholder="y", left_right=True, **SMALL)
    result = studio.run(req)
    settings = json.loads(result.settings_file.read_text())
    z, y = settings["subjects"]
    assert (z["placeholder"], z["region"], y["placeholder"], y["region"], y["random_id"]) == \
        ("z", [0.0, 0.0, 0.5, 1.0], "y", [0.5, 0.0, 1.0, 1.0], 9)
    assert [p.name for p in result.embeddings_file] == ["subject_z.safetensors", "subject_y.safetensors"]
    assert list(load_file(str(result.embeddings_file[1]))) == ["<y>"]
    first, second = result.outputs
    assert set(first.subjects) == {"z", "y"} and set(second.subjects) == {"y"}  # scored where the prompt names them
    for out in result.outputs:
        for name, match in out.subjects.items():
            if match["arcface"] is None:
                assert f"{name}: face not found" in out.caption()
            else:
                assert f"{name}: ArcFace {match['arcface']:.3f} (face #{match['face']} at " in out.caption()
    # the pipeline's processors are the stock ones again after a regional request
    assert not any(type(p).__name__ == "RegionalProcessor" for p in studio.pipe.unet.attn_processors.values())

    page = dict(photos=None, use_random=True, random_id=1, prompts="a photo of z and y", negative_prompt="",
                seed=0, num_images=1, second=True, second_photos=None, second_use_random=True, second_random_id=2,
                second_placeholder="y", left_right=True, **SMALL)
    gallery, status, files = demo.respond(studio, dict(page))
    assert len(gallery) == 1 and "z: " in status and "y: " in status and len(files) == 3
    _, status, _ = demo.respond(studio, {**page, "second_placeholder": "z"})
    assert status == "**Error:** the second person needs a placeholder other than 'z'"
    _, status, _ = demo.respond(studio, {**page, "prompts": "a photo of z"})
    assert "--subject y: the placeholder 'y' appears in no prompt" in status
    _, status, _ = demo.respond(studio, {**page, "second_use_random": False})
    assert status == "**Error:** second person: upload at least one face photo, or choose a random ID"


def test_the_page_builds_with_the_second_person_fields(studio):
    pytest.importorskip("gradio")
    app = demo.build_app(studio, max_images=2, default_size=16)
    ids = {getattr(b, "elem_id", None) for b in app.blocks.values()}
    assert {"second", "second-photos", "second-use-random", "second-random-id", "second-placeholder",
            "left-right"} <= ids

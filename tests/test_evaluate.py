"""`python -m adaface.evaluate` on tiny models: a tiny CLIPModel / DINO ViT saved to disk, the tiny antelopev2 pack."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adaface import evaluate, generate
from adaface.testing.direct_arcface import direct_arcface_faces
from adaface.testing.tiny_models import (
    save_tiny_antelopev2,
    save_tiny_arc2face,
    save_tiny_clip,
    save_tiny_dino,
    tiny_text_encoder,
)

FACE_A = (50, 150, 60, 160)
FACE_B = (20, 120, 90, 190)


def photo(box: tuple | None) -> Image.Image:
    """A bright square on black is a face to the tiny detector; an all-black image has none."""
    img = np.zeros((200, 200, 3), np.uint8)
    if box is not None:
        img[box[0]:box[1], box[2]:box[3]] = (230, 200, 180)
    return Image.fromarray(img)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_sd15_dir) -> dict:
    root = tmp_path_factory.mktemp("eval_models")
    save_tiny_antelopev2(root / "insightface")
    return {
        "face_root": str(root / "insightface"),
        "clip": str(save_tiny_clip(root / "clip", tiny_sd15_dir / "tokenizer")),
        "dino": str(save_tiny_dino(root / "dino")),
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder as generate writes it: reference photo A; generated A (identical), B, and one with no face."""
    root = tmp_path_factory.mktemp("eval_run")
    photo(FACE_A).save(root / "reference.png")
    run = root / "run"
    run.mkdir()
    outputs = []
    for name, box, prompt in [("p00_000.png", FACE_A, "a photo of z in the forest"),
                              ("p00_001.png", FACE_B, "a photo of z in the forest"),
                              ("p01_000.png", None, "z wearing a red hat")]:
        photo(box).save(run / name)
        outputs.append({"file": name, "prompt": prompt, "seed": 0})
    settings = {"placeholder": "z", "subject": {"images": [str(root / "reference.png")],
                                                "arcface_file": "subject_arcface.npy"},
                "outputs": outputs}
    (run / "settings.json").write_text(json.dumps(settings))
    return run


def clip_cosine(clip_dir: str, image: Image.Image, text: str) -> float:
    """Independent CLIP-T: CLIPModel's own forward (which normalises both sides) and its logit scale."""
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    inputs = proc(text=[text], images=[image], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    return (out.logits_per_image / model.logit_scale.exp()).item()


def test_report_values_on_known_images(models, run_dir, capsys):
    from adaface.models.face_encoder import FaceEncoder

    assert evaluate.main([str(run_dir), "--face-root", models["face_root"], "--clip", models["clip"],
                          "--dino", models["dino"], "--class-word", "man"]) == 0
    line = capsys.readouterr().out.strip()
    report = json.loads((run_dir / "eval_report.json").read_text())
    s = report["summary"]
    assert set(s) == {"num_images", "arcface", "arcface_no_face_as_zero", "num_no_face", "no_face_rate", "clip_t",
                      "clip_i", "dino"}
    assert s["num_images"] == 3 and s["num_no_face"] == 1 and s["no_face_rate"] == pytest.approx(1 / 3)

    encoder = FaceEncoder(models["face_root"])
    ref = encoder(photo(FACE_A)).numpy()  # the reference: its largest face
    # The score is the best of the detected faces (the tiny detector finds many boxes on one bright square).
    faces_b = encoder.app.get(np.asarray(photo(FACE_B))[:, :, ::-1].copy())
    sim_b = max(float(f.normed_embedding @ ref) for f in faces_b)
    largest_b = float(encoder(photo(FACE_B)).numpy() @ ref)
    assert largest_b <= sim_b < 0.999
    per = {p["file"]: p for p in report["per_image"]}
    assert per["p00_000.png"]["arcface"] == pytest.approx(1.0, abs=1e-5)  # the reference itself
    assert per["p00_001.png"]["arcface"] == pytest.approx(sim_b, abs=1e-5)
    assert per["p00_001.png"]["num_faces"] == len(faces_b)
    assert per["p01_000.png"]["arcface"] is None and per["p01_000.png"]["num_faces"] == 0
    assert s["arcface"] == pytest.approx((1.0 + sim_b) / 2, abs=1e-5)
    assert s["arcface_no_face_as_zero"] == pytest.approx((1.0 + sim_b) / 3, abs=1e-5)

    assert per["p01_000.png"]["clip_prompt"] == "a man wearing a red hat"
    assert per["p00_000.png"]["clip_prompt"] == "a photo of a man in the forest"  # not "a photo of man"
    expected = clip_cosine(models["clip"], photo(None), "a man wearing a red hat")
    assert per["p01_000.png"]["clip_t"] == pytest.approx(expected, abs=1e-4)
    for p in report["per_image"]:
        assert -1.0 <= p["clip_t"] <= 1.0 and -1.0 <= p["clip_i"] <= 1.0 + 1e-6 and -1.0 <= p["dino"] <= 1.0 + 1e-6
    assert per["p00_000.png"]["clip_i"] == pytest.approx(1.0, abs=1e-5)  # identical to the reference photo
    assert per["p00_000.png"]["dino"] == pytest.approx(1.0, abs=1e-5)
    assert per["p01_000.png"]["dino"] < 0.9999
    assert report["details"]["clip_t"]["count"] == 3 and report["references"]["count"] == 1
    assert line == evaluate.summary_line(report) and "(2/3 with a face)" in line


def test_folder_without_settings_with_an_embedding(models, run_dir, tmp_path, capsys):
    from adaface.models.face_encoder import FaceEncoder

    folder = tmp_path / "imgs"
    folder.mkdir()
    photo(FACE_B).save(folder / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    ref = FaceEncoder(models["face_root"])(folder / "b.jpg")  # from the file: JPEG is lossy
    np.save(tmp_path / "ref.npy", np.stack([ref.numpy(), ref.numpy()]))  # two reference rows
    out = tmp_path / "report.json"
    assert evaluate.main([str(folder), "--face-root", models["face_root"], "--clip", models["clip"],
                          "--embedding", str(tmp_path / "ref.npy"), "--prompt", "portrait of z", "--out",
                          str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["summary"]["num_images"] == 1 and report["references"]["count"] == 2
    assert report["summary"]["arcface"] == pytest.approx(1.0, abs=1e-5)
    # no reference pixels: the image-to-image scores are absent, not invented
    assert report["summary"]["clip_i"] is None and report["summary"]["dino"] is None
    assert report["per_image"][0]["clip_prompt"] == "portrait of a person"
    assert "clip-i n/a" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--clip", "{tmp}/nowhere"], "--clip .*nowhere: folder not found"),
    (["--face-root", "{tmp}"], "--face-root .*no insightface model pack"),
    (["--references", "{tmp}/missing.png"], "--references .*missing.png: file not found"),
    (["--out", "{tmp}/report.txt"], "--out .*give a .json path"),
    (["--run", "{tmp}/none"], "RUN_DIR .*none: folder not found"),
    (["--run", "{tmp}"], "--prompt is needed"),
    (["--clip", "{dino}"], r"--clip .*: expected a CLIP model \(e.g. openai/clip-vit-base-patch32\), but its "
                           r"config.json says model_type 'vit'"),
    (["--dino", "{clip}"], "--dino .*: expected a DINO ViT .*model_type 'clip'"),
])
def test_bad_options(models, run_dir, tmp_path, capsys, monkeypatch, extra, message):
    def refuse(*args, **kwargs):
        raise AssertionError("models were loaded before the options were checked")

    monkeypatch.setattr(evaluate, "evaluate", refuse)
    opts = {"--run": str(run_dir), "--face-root": models["face_root"], "--clip": models["clip"]}
    extra = [a.format(tmp=tmp_path, clip=models["clip"], dino=models["dino"]) for a in extra]
    opts.update(zip(extra[::2], extra[1::2]))
    argv = [opts.pop("--run")] + [x for kv in opts.items() for x in kv]
    with pytest.raises(SystemExit) as info:
        evaluate.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        evaluate.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for action in evaluate.build_parser()._actions:
        assert all(flag in out for flag in action.option_strings) and action.help


def test_scores_a_generate_run_end_to_end(models, tiny_sd15_dir, tmp_path, capsys):
    """The contract between the two tools: evaluate reads what generate writes (random ID: the saved identity)."""
    from adaface.models.prompt_inverter import PromptInverter

    PromptInverter(tiny_text_encoder(seed=2), tokenizer=tiny_sd15_dir / "tokenizer").save_pretrained(tmp_path / "inv")
    arc2face = save_tiny_arc2face(tmp_path / "arc2face")
    run = tmp_path / "run"
    assert generate.main(["--base", str(tiny_sd15_dir), "--arc2face", str(arc2face), "--inverter",
                          str(tmp_path / "inv"), "--random-id", "4", "--prompt", "z on the beach",
                          "--prompt", "painting of z", "--num-images", "1", "--steps", "1", "--guidance", "1",
                          "--height", "16", "--width", "16", "--out", str(run)]) == 0
    assert evaluate.main([str(run), "--face-root", models["face_root"], "--clip", models["clip"]]) == 0
    report = json.loads((run / "eval_report.json").read_text())
    assert report["references"] == {"embedding": str(run / "subject_arcface.npy"), "count": 1}
    assert [p["clip_prompt"] for p in report["per_image"]] == ["a person on the beach", "painting of a person"]
    per = report["per_image"]
    assert [p["file"] for p in per] == ["p00_000.png", "p01_000.png"]

    # Every number recomputed here from the images and the stored identity, without evaluate's code.
    ref = np.load(run / "subject_arcface.npy").astype(np.float64)
    ref /= np.linalg.norm(ref)
    pack = Path(models["face_root"]) / "models" / "antelopev2"
    scores, clip_t = [], []
    for p in per:
        image = Image.open(run / p["file"]).convert("RGB")
        faces = [vector for _, vector in direct_arcface_faces(pack, np.asarray(image))]
        score = max(float(f @ ref) for f in faces) if faces else None
        scores.append(score)
        assert p["num_faces"] == len(faces)
        if score is None:
            assert p["arcface"] is None
        else:
            assert p["arcface"] == pytest.approx(score, abs=1e-5)
        clip_t.append(clip_cosine(models["clip"], image, p["clip_prompt"]))
        assert p["clip_t"] == pytest.approx(clip_t[-1], abs=1e-4)
        assert p["clip_i"] is None and p["dino"] is None  # an identity file has no pixels to compare
    with_face = [x for x in scores if x is not None]
    s = report["summary"]
    assert s["num_images"] == 2
    assert s["num_no_face"] == 2 - len(with_face) and s["no_face_rate"] == pytest.approx((2 - len(with_face)) / 2)
    if with_face:
        assert s["arcface"] == pytest.approx(sum(with_face) / len(with_face), abs=1e-5)
    else:
        assert s["arcface"] is None
    assert s["arcface_no_face_as_zero"] == pytest.approx(sum(with_face) / 2, abs=1e-5)
    assert s["clip_t"] == pytest.approx(sum(clip_t) / 2, abs=1e-4)
    assert s["clip_i"] is None and s["dino"] is None


def test_video_runs_are_scored_frame_by_frame(tmp_path):
    (tmp_path / "p00_000").mkdir()
    for k in range(2):
        photo(None).save(tmp_path / "p00_000" / f"{k:03d}.png")
    settings = {"placeholder": "z", "outputs": [
        {"file": "p00_000.gif", "prompt": "portrait of z at night", "frames": ["p00_000/000.png", "p00_000/001.png"]},
    ]}
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    args = evaluate.build_parser().parse_args([str(tmp_path), "--face-root", "r", "--clip", "c"])
    items, read = evaluate.read_run(args)
    assert read == settings
    assert [(i.file, i.prompt, i.source) for i in items] == [
        (tmp_path / "p00_000" / f"{k:03d}.png", "portrait of z at night", "p00_000.gif") for k in range(2)
    ]
    (tmp_path / "p00_000" / "001.png").unlink()
    with pytest.raises(evaluate.OptionError, match="1 listed image.*001.png"):
        evaluate.read_run(args)


@pytest.mark.parametrize("prompt, class_word, expected", [
    ("a photo of z", "person", "a photo of a person"),
    ("z wearing a red hat", "man", "a man wearing a red hat"),
    ("a photo of the z, smiling", "woman", "a photo of the woman, smiling"),
    ("my z at the beach", "dog", "my dog at the beach"),
    ("z's portrait", "old man", "an old man's portrait"),
    ("a photo of z", "a person", "a photo of a person"),
    ("a photo of z", "the man", "a photo of the man"),
    ("pizza and z", "girl", "pizza and a girl"),
])
def test_class_prompt_reads_as_english(prompt, class_word, expected):
    assert evaluate.class_prompt(prompt, "z", class_word) == expected


def test_photos_without_a_face_are_not_references(tmp_path):
    """A photo for which generate used a random stand-in holds no face to compare against."""
    for name in ("face.png", "dark.png"):
        photo(FACE_A if name == "face.png" else None).save(tmp_path / name)
    np.save(tmp_path / "subject_arcface.npy", np.ones(512, np.float32))
    face, dark = str(tmp_path / "face.png"), str(tmp_path / "dark.png")
    args = evaluate.build_parser().parse_args([str(tmp_path), "--face-root", "r", "--clip", "c"])
    subject = {"images": [face, dark], "random_stand_ins": [dark], "arcface_file": "subject_arcface.npy"}
    assert evaluate.reference_source(args, {"subject": subject}) == {"images": [face]}
    subject = {"images": [dark], "random_stand_ins": [dark], "arcface_file": "subject_arcface.npy"}
    assert evaluate.reference_source(args, {"subject": subject}) == {"embedding": str(tmp_path / "subject_arcface.npy")}


FACE_C = (100, 190, 10, 100)


def clip_image_embeds(clip_dir: str, images: list) -> np.ndarray:
    """Independent CLIP image embeddings: CLIPModel's own forward (normalised `image_embeds`)."""
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        out = model(**proc(text=["x"], images=images, return_tensors="pt", padding=True))
    return out.image_embeds.double().numpy()


def test_video_consistency_on_clips_of_known_consistency(models, tmp_path, capsys):
    """A clip of one frame repeated is perfectly consistent; a clip of different faces (one frame without) is not,
    by amounts recomputed here from the detector, the recogniser and CLIP directly."""
    from adaface.models.face_encoder import FaceEncoder

    photo(FACE_A).save(tmp_path / "reference.png")
    clips = {"p00_000": [FACE_B] * 4, "p00_001": [FACE_A, FACE_B, None, FACE_C]}
    outputs = []
    for name, boxes in clips.items():
        (tmp_path / name).mkdir()
        for k, box in enumerate(boxes):
            photo(box).save(tmp_path / name / f"{k:03d}.png")
        outputs.append({"file": f"{name}.gif", "prompt": "portrait of z",
                        "frames": [f"{name}/{k:03d}.png" for k in range(len(boxes))]})
    settings = {"placeholder": "z", "subject": {"images": [str(tmp_path / "reference.png")]}, "outputs": outputs}
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    assert evaluate.main([str(tmp_path), "--face-root", models["face_root"], "--clip", models["clip"]]) == 0
    line = capsys.readouterr().out.strip()
    report = json.loads((tmp_path / "eval_report.json").read_text())
    per = {v["output"]: v for v in report["per_video"]}

    encoder = FaceEncoder(models["face_root"])
    ref = encoder(photo(FACE_A)).numpy()

    def score(box):  # the best of the faces the detector finds, against the one reference
        if box is None:
            return None
        faces = encoder.app.get(np.asarray(photo(box))[:, :, ::-1].copy())
        return max(float(f.normed_embedding @ ref) for f in faces)

    same = per["p00_000.gif"]
    assert same["num_frames"] == 4 and same["face_rate"] == 1.0
    assert same["arcface_mean"] == pytest.approx(score(FACE_B), abs=1e-5)
    assert same["arcface_min"] == pytest.approx(same["arcface_mean"], abs=1e-9)
    assert same["arcface_std"] == pytest.approx(0.0, abs=1e-9)
    assert same["clip_i_consecutive"] == pytest.approx(1.0, abs=1e-6)
    assert same["clip_i_consecutive_min"] == pytest.approx(1.0, abs=1e-6)

    varied = per["p00_001.gif"]
    scores = np.array([score(b) for b in clips["p00_001"] if b is not None])
    assert varied["num_frames"] == 4 and varied["face_rate"] == 0.75
    assert varied["arcface_mean"] == pytest.approx(scores.mean(), abs=1e-5)
    assert varied["arcface_min"] == pytest.approx(scores.min(), abs=1e-5)
    assert varied["arcface_std"] == pytest.approx(scores.std(), abs=1e-5) and varied["arcface_std"] > 1e-3
    emb = clip_image_embeds(models["clip"], [photo(b) for b in clips["p00_001"]])
    consecutive = (emb[:-1] * emb[1:]).sum(1)
    assert varied["clip_i_consecutive"] == pytest.approx(consecutive.mean(), abs=1e-4)
    assert varied["clip_i_consecutive_min"] == pytest.approx(consecutive.min(), abs=1e-4)
    assert varied["clip_i_consecutive"] < same["clip_i_consecutive"] - 1e-4

    video = report["summary"]["video"]
    assert video["num_videos"] == 2 and video["face_rate"] == pytest.approx(0.875)
    for key in ("arcface_mean", "arcface_min", "arcface_std", "clip_i_consecutive"):
        assert video[key] == pytest.approx((same[key] + varied[key]) / 2, abs=1e-9)
    assert [p["frame"] for p in report["per_image"]] == [0, 1, 2, 3] * 2
    assert line == evaluate.summary_line(report)
    assert "2 video(s): frame arcface mean/min/std" in line and "faces in 88% of frames" in line


def test_match_subjects_is_one_to_one_best_pair_first():
    faces = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0]]), dim=-1)
    refs = {"z": torch.tensor([[1.0, 0.0, 0.0]]), "y": torch.tensor([[0.9, 0.43, 0.0]]),
            "x": torch.tensor([[0.0, 0.0, 1.0]])}
    boxes = [[0, 0, 10, 10], [20, 0, 30, 10]]
    m = evaluate.match_subjects(faces, boxes, refs)
    # z takes face 0 (cosine 1); y also prefers face 0 but gets face 1; x is left without a face
    assert m["z"] == {"arcface": pytest.approx(1.0), "face": 0, "box": [0, 0, 10, 10]}
    assert m["y"]["face"] == 1 and m["y"]["box"] == [20, 0, 30, 10]
    assert m["y"]["arcface"] == pytest.approx((faces[1] @ torch.nn.functional.normalize(refs["y"][0], dim=0)).item())
    assert m["x"] == {"arcface": None, "face": None, "box": None}
    assert evaluate.match_subjects(torch.zeros(0, 3), [], refs)["z"]["face"] is None


def test_two_subject_run_gets_a_line_per_subject(models, tmp_path, capsys):
    from adaface.models.face_encoder import FaceEncoder
    from adaface.subject import random_arcface

    run = tmp_path / "pair"
    run.mkdir()
    photo(FACE_A).save(tmp_path / "a.png")
    np.save(run / "subject0_arcface.npy", FaceEncoder(models["face_root"])(str(tmp_path / "a.png")).numpy())
    np.save(run / "subject1_arcface.npy", random_arcface(3).numpy())
    photo(FACE_A).save(run / "p00_000.png")
    photo(None).save(run / "p01_000.png")
    settings = {"placeholder": "z", "outputs": [
        {"file": "p00_000.png", "prompt": "a photo of z and y", "seed": 0},
        {"file": "p01_000.png", "prompt": "y at night", "seed": 1}],
        "subjects": [{"placeholder": "z", "random_id": 1, "arcface_file": "subject0_arcface.npy"},
                     {"placeholder": "y", "random_id": 3, "arcface_file": "subject1_arcface.npy"}]}
    (run / "settings.json").write_text(json.dumps(settings))
    assert evaluate.main([str(run), "--face-root", models["face_root"], "--clip", models["clip"]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads((run / "eval_report.json").read_text())
    first, second = report["per_image"]
    faces = [vector for _, vector in direct_arcface_faces(Path(models["face_root"]) / "models" / "antelopev2",
                                                          np.asarray(photo(FACE_A)))]
    z_identity = np.load(run / "subject0_arcface.npy")
    best = max(range(len(faces)), key=lambda k: float(faces[k] @ z_identity))
    assert first["subjects"]["z"]["face"] == best
    assert first["subjects"]["z"]["arcface"] == pytest.approx(float(faces[best] @ z_identity), abs=1e-4)
    assert len(first["subjects"]["z"]["box"]) == 4
    assert set(second["subjects"]) == {"y"}  # z is not in the second prompt
    assert second["subjects"]["y"] == {"arcface": None, "face": None, "box": None}
    s = report["summary"]["subjects"]
    assert s["z"]["num_images"] == 1 and s["z"]["num_found"] == 1 and s["z"]["not_found"] == []
    assert s["y"]["num_images"] == 2 and "p01_000.png" in s["y"]["not_found"]
    assert first["clip_prompt"] == "a photo of a person and a person"
    assert lines[1] == f"subject z: arcface {s['z']['arcface']:.3f} (its face found in 1/1 images)"
    assert lines[2].startswith("subject y: arcface ") and "face not found in" in lines[2] and "p01_000.png" in lines[2]
    with pytest.raises(SystemExit):
        evaluate.main([str(run), "--face-root", models["face_root"], "--clip", models["clip"], "--embedding",
                       str(run / "subject1_arcface.npy")])
    assert "--embedding: the run has 2 subjects" in capsys.readouterr().err

"""`python -m adaface.prepare_data` on tiny random ONNX antelopev2 packs (a detector that sees bright squares)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaface import prepare_data
from adaface.faces import prepared_folder
from adaface.faces.crop import face_crop_transform
from adaface.faces.masks import HAIR_CAP
from adaface.testing.tiny_face_models import save_tiny_antelopev2_full

REPO = Path(__file__).resolve().parents[1]
BASE = ["--min-face", "32", "--workers", "2"]


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    root = tmp_path_factory.mktemp("packs")
    save_tiny_antelopev2_full(root / "stock")  # glintr100.onnx, as insightface ships antelopev2
    save_tiny_antelopev2_full(root / "arc2face", recognizer="arcface.onnx")
    save_tiny_antelopev2_full(root / "plain", landmarks=False, genderage=False)
    return {name: root / name for name in ("stock", "arc2face", "plain")}


def face_photo(squares=((64, 64, 230),), size=256) -> Image.Image:
    """A dark photo with bright squares (side 64, on the tiny detector's grid): one face each."""
    img = np.full((size, size, 3), 20, np.uint8)
    for y, x, value in squares:
        img[y:y + 64, x:x + 64] = value
    return Image.fromarray(img)


def mixed_folder(folder: Path) -> Path:
    """A face, a faceless image, a truncated JPEG, a text file named .jpg and a 1x1 image."""
    (folder / "people").mkdir(parents=True)
    face_photo().save(folder / "people" / "face.jpg", quality=95)
    face_photo(squares=()).save(folder / "empty.png")
    face_photo().save(folder / "truncated.jpg", quality=95)
    data = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "notes.jpg").write_text("not an image at all")
    Image.new("RGB", (1, 1), (200, 200, 200)).save(folder / "one_pixel.png")
    (folder / "readme.txt").write_text("not an input: no image suffix")
    return folder


def run(images, out, root, *extra):
    return prepare_data.main([str(images), "--out", str(out), "--face-root", str(root), *BASE, *map(str, extra)])


def manifest(out: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len({e["key"] for e in lines}) == len(lines)  # compacted: one line per key
    return {e["key"]: e for e in lines}


def embeddings(out: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(out / "arcface.safetensors"))


def tree(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def box_in_crop(entry: dict, transform) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = entry["box"]
    corners = transform.to_crop(np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]]))
    return (*corners.min(0), *corners.max(0))


def test_mixed_folder_then_one_more_image(packs, tmp_path, capsys):
    images = mixed_folder(tmp_path / "photos")
    out = tmp_path / "out"
    assert run(images, out, packs["stock"]) == 0
    captured = capsys.readouterr()
    entries = manifest(out)
    assert {k: e["status"] for k, e in entries.items()} == {
        "people/face.jpg": "ok", "empty.png": "no_face", "truncated.jpg": "corrupt",
        "notes.jpg": "not_an_image", "one_pixel.png": "too_small",
    }
    for key, entry in entries.items():
        src = images / key
        assert entry["source_size"] == src.stat().st_size and entry["source_mtime_ns"] == src.stat().st_mtime_ns
        assert (entry["status"] == "ok") == ("error" not in entry)
    ok = entries["people/face.jpg"]
    assert ok["image"] == "images/people/face.jpg.png" and ok["mask"] == "masks/people/face.jpg.png"
    assert ok["mask_method"] == "landmarks" and ok["recognizer"] == "glintr100.onnx"
    assert ok["class_word"] in ("man", "woman") and ok["faces"] == 1
    x1, y1, x2, y2 = ok["box"]
    assert x1 < 64 + 32 < x2 and y1 < 64 + 32 < y2  # the box holds the bright square's centre
    # One embedding and one mask, for the face only.
    emb = embeddings(out)
    assert list(emb) == ["people/face.jpg"]
    assert emb["people/face.jpg"].shape == (512,) and emb["people/face.jpg"].dtype == np.float32
    assert np.linalg.norm(emb["people/face.jpg"]) == pytest.approx(1.0, abs=1e-5)
    assert sorted(p.relative_to(out).as_posix() for p in (out / "masks").rglob("*.png")) == [ok["mask"]]
    crop, mask = Image.open(out / ok["image"]), Image.open(out / ok["mask"])
    assert crop.mode == "RGB" and crop.size == (512, 512) and mask.mode == "L" and mask.size == (512, 512)
    m = np.asarray(mask)
    assert m.max() == 255 and m.min() == 0
    assert "corrupt 1, no_face 1, not_an_image 1, ok 1, too_small 1" in captured.out
    assert "WARNING" in captured.err and "glintr100.onnx" in captured.err
    assert not (out / ".pending").exists()

    # A rerun after adding one image processes exactly that one and keeps the others bit for bit.
    before = tree(out)
    # Another face: a dimmer square (the same square moved by whole detector cells is the same face to an
    # aligned-crop recognizer, bit for bit).
    face_photo(squares=((128, 128, 200),)).save(images / "people" / "second.png")
    assert run(images, out, packs["stock"]) == 0
    assert "6 inputs, 1 processed now" in capsys.readouterr().out
    after = tree(out)
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed == {"manifest.jsonl", "arcface.safetensors", "images/people/second.png.png",
                       "masks/people/second.png.png"}
    new_entries, new_emb = manifest(out), embeddings(out)
    assert {k: v for k, v in new_entries.items() if k != "people/second.png"} == entries
    assert new_entries["people/second.png"]["status"] == "ok"
    np.testing.assert_array_equal(new_emb["people/face.jpg"], emb["people/face.jpg"])
    assert not np.array_equal(new_emb["people/second.png"], emb["people/face.jpg"])

    # A changed file is redone; an ok image that turned faceless loses its crop and embedding.
    face_photo(squares=()).save(images / "people" / "second.png")
    os.utime(images / "people" / "second.png", ns=(1, 1))
    assert run(images, out, packs["stock"]) == 0
    assert manifest(out)["people/second.png"]["status"] == "no_face"
    assert "people/second.png" not in embeddings(out)
    assert not (out / "images" / "people" / "second.png.png").exists()


KILLER = textwrap.dedent("""
    import os, signal, sys
    from adaface import prepare_data
    from adaface.faces import prepared_folder
    publish, calls = prepared_folder._publish, [0]
    def killing_publish(tmp, path):
        calls[0] += 1
        if calls[0] == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)  # the temporary file is written, not yet moved into place
        publish(tmp, path)
    prepared_folder._publish = killing_publish
    prepare_data.main(sys.argv[1:])
""")


@pytest.fixture(scope="module")
def kill_inputs(tmp_path_factory, packs):
    """Five faces and two bad files, the uninterrupted result, and the number of atomic writes it made."""
    root = tmp_path_factory.mktemp("kill")
    images = root / "photos"
    images.mkdir()
    for i, (y, x) in enumerate([(0, 0), (64, 128), (128, 64), (192, 192), (64, 0)]):
        face_photo(squares=((y, x, 230),)).save(images / f"face{i}.png")
    face_photo(squares=()).save(images / "empty.png")
    (images / "bad.webp").write_bytes(b"RIFF0000WEBPjunk")
    reference = root / "reference"
    calls = [0]
    publish = prepared_folder._publish

    def counting(tmp, path):
        calls[0] += 1
        publish(tmp, path)

    prepared_folder._publish = counting
    try:
        assert run(images, reference, packs["arc2face"], "--commit-every", "2") == 0
    finally:
        prepared_folder._publish = publish
    return images, reference, calls[0]


@pytest.mark.parametrize("where", ["mid_images", "final_merge"])
def test_sigkill_then_rerun_gives_the_uninterrupted_folder(kill_inputs, packs, tmp_path, where):
    images, reference, publishes = kill_inputs
    # Atomic writes: the settings, then per face its crop and mask (the inputs run bad.webp, empty.png, face0, ...),
    # a shard every 2 inputs with a face; at the end the merged embeddings and the compacted manifest. Kill as the
    # 2nd face's mask is moved into place, or as the compacted manifest is (the last write).
    kill_at = {"mid_images": 5, "final_merge": publishes}[where]
    out = tmp_path / "out"
    argv = [str(images), "--out", str(out), "--face-root", str(packs["arc2face"]), *BASE, "--commit-every", "2"]
    env = {**os.environ, "KILL_AT": str(kill_at), "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-W", "ignore", "-c", KILLER, *argv], env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert tree(out) != tree(reference)  # the kill left the folder unfinished
    assert prepare_data.main(argv) == 0
    assert tree(out) == tree(reference)


def test_boxes_past_the_edge_are_clipped_and_faces_outside_dropped(packs, tmp_path):
    """A face in the photo's corner: the tiny detector's box starts at negative coordinates (the square's
    centre ± 61 px), the manifest's box is clipped to the photo."""
    images = tmp_path / "photos"
    images.mkdir()
    face_photo(squares=((0, 0, 230),)).save(images / "corner.png")
    assert run(images, tmp_path / "out", packs["stock"]) == 0
    entry = manifest(tmp_path / "out")["corner.png"]
    assert entry["status"] == "ok"
    x1, y1, x2, y2 = entry["box"]
    assert x1 == 0 and y1 == 0 and 32 < x2 <= 256 and 32 < y2 <= 256


def test_faces_inside_clips_boxes_and_drops_faces_whose_keypoints_are_outside():
    from insightface.app.common import Face

    from adaface.faces.boxes import faces_inside

    kps = np.array([[30, 40], [60, 40], [45, 55], [35, 70], [55, 70]], np.float32)
    cut = Face(bbox=np.array([-12.5, 10, 80, 130], np.float32), kps=kps)
    outside = Face(bbox=np.array([70, 10, 140, 90], np.float32), kps=kps + [80, 0])  # eyes past the right edge
    kept = faces_inside([cut, outside], width=100, height=120)
    assert kept == [cut]
    np.testing.assert_array_equal(cut.bbox, np.array([0, 10, 80, 120], np.float32))


def test_several_faces_largest_or_skip_and_min_face(packs, tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    # The brighter square gives the tiny detector's larger box.
    face_photo(squares=((0, 0, 200), (128, 128, 240))).save(images / "group.png")
    out = tmp_path / "out"
    assert run(images, out, packs["plain"]) == 0
    entry = manifest(out)["group.png"]
    assert entry["status"] == "ok" and entry["faces"] == 2
    x1, y1, x2, y2 = entry["box"]
    assert x1 < 160 < x2 and y1 < 160 < y2  # the larger face, around the bright square at (128..192)
    # Without 2d106det.onnx the mask comes from the box and keypoints: the face box and a hair cap above it.
    assert entry["mask_method"] == "box" and entry["class_word"] is None
    mask = np.asarray(Image.open(out / entry["mask"]))
    transform = face_crop_transform(_kps_of(entry), 512)
    bx1, by1, bx2, by2 = box_in_crop(entry, transform)
    ys, xs = np.nonzero(mask > 127)
    assert xs.min() >= bx1 - 2 and xs.max() <= bx2 + 2 and ys.max() <= by2 + 2
    # above the box only the hair cap (HAIR_CAP['box'] of the face's height)
    assert by1 - HAIR_CAP["box"] * (by2 - by1) - 2 <= ys.min() < by1 - 2
    assert mask[int((by1 + by2) / 2), int((bx1 + bx2) / 2)] == 255

    skip = tmp_path / "skip"
    assert run(images, skip, packs["plain"], "--several-faces", "skip") == 0
    entry = manifest(skip)["group.png"]
    assert entry["status"] == "several_faces" and "2 faces" in entry["error"]
    assert embeddings(skip) == {}

    big = tmp_path / "big"
    assert run(images, big, packs["plain"], "--min-face", "200") == 0
    assert manifest(big)["group.png"]["status"] == "too_small"


def _kps_of(entry: dict) -> np.ndarray:
    """The tiny blob detector's keypoints for a box (fixed fractions of the anchor cell, see its builder)."""
    x1, y1, x2, y2 = entry["box"]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    cell = 64.0  # a 32-pixel cell of the 128-pixel detector input, in a 256-pixel photo
    frac = np.array([[0.25, 0.3], [0.75, 0.3], [0.5, 0.55], [0.3, 0.8], [0.7, 0.8]])
    return np.array([cx - cell / 2, cy - cell / 2]) + frac * cell


def test_class_words_csv_and_recognizer_check(packs, tmp_path, capsys):
    images = tmp_path / "photos"
    for name in ("alice", "bob"):
        (images / name).mkdir(parents=True)
        face_photo().save(images / name / "01.png")
    face_photo().save(images / "bob" / "02.png")
    words = tmp_path / "words.csv"
    words.write_text("path,class_word\nalice,woman\nbob,man\nbob/02.png,boy\n")
    out = tmp_path / "out"
    assert run(images, out, packs["arc2face"], "--class-words", words, "--strict") == 0
    captured = capsys.readouterr()
    assert "WARNING" not in captured.err
    entries = manifest(out)
    assert [entries[k]["class_word"] for k in ("alice/01.png", "bob/01.png", "bob/02.png")] == ["woman", "man", "boy"]
    assert {e["recognizer"] for e in entries.values()} == {"arcface.onnx"}

    with pytest.raises(SystemExit) as info:
        run(images, tmp_path / "strict", packs["stock"], "--strict")
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--strict" in err and "glintr100.onnx" in err and "arcface.onnx" in err
    assert not (tmp_path / "strict" / "manifest.jsonl").exists()


def test_bad_arguments_are_one_line_errors(packs, tmp_path, capsys):
    images = tmp_path / "photos"
    images.mkdir()
    face_photo().save(images / "a.png")
    empty_root = tmp_path / "no_pack"
    empty_root.mkdir()
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("alice\n")
    out = tmp_path / "out"
    assert run(images, out, packs["plain"]) == 0
    capsys.readouterr()
    cases = [
        ([str(tmp_path / "missing"), "--out", str(out), "--face-root", str(packs["plain"])], "IMAGES .*not found"),
        ([str(images), "--out", str(out), "--face-root", str(empty_root)], "--face-root .*no insightface model"),
        ([str(images), "--out", str(images / "o"), "--face-root", str(packs["plain"])], "--out .*inside IMAGES"),
        ([str(images), "--out", str(out), "--face-root", str(packs["plain"]), "--size", "10"], "--size must be"),
        ([str(images), "--out", str(out), "--face-root", str(packs["plain"]), "--workers", "0"], "--workers must"),
        ([str(images), "--out", str(out), "--face-root", str(packs["plain"]), "--class-words", str(bad_csv)],
         "--class-words .*bad.csv line 1: expected 'path,class_word'"),
        ([str(images), "--out", str(out), "--face-root", str(packs["plain"]), "--masks", "landmarks"],
         "--masks landmarks: .*no 2d106det.onnx"),
        ([str(images), "--out", str(out), "--face-root", str(packs["plain"]), "--size", "256"],
         "--out .*prepared with other settings \\(size: 512 then, 256 now"),
    ]
    if not prepare_data_parser_available():
        cases.append(([str(images), "--out", str(out), "--face-root", str(packs["plain"]), "--masks", "parser"],
                      "--masks parser: facexlib is not installed"))
    import re

    for argv, pattern in cases:
        with pytest.raises(SystemExit) as info:
            prepare_data.main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "Traceback" not in "\n".join(err)
        assert re.search(pattern, err[-1]), (argv, err[-1])


def prepare_data_parser_available() -> bool:
    from adaface.faces.parsing import facexlib_available

    return facexlib_available()


def test_parser_masks_through_a_facexlib_bisenet(packs, tmp_path, monkeypatch):
    """`--masks auto` picks the parser when facexlib and BiSeNet weights are there (a stand-in facexlib module
    with a tiny BiSeNet-shaped net: labels 'skin' where the crop is bright); it loads the weights safely."""
    import torch

    from adaface.testing.stub_facexlib import install_stub_facexlib

    class TinyBiSeNet(torch.nn.Module):
        def __init__(self, num_class: int) -> None:
            super().__init__()
            self.head = torch.nn.Conv2d(3, num_class, 1)

        def forward(self, x):
            out = self.head(x)
            return out, out, out

    install_stub_facexlib(monkeypatch, TinyBiSeNet)
    net = TinyBiSeNet(19)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
        net.head.weight[1] = 5.0  # skin: bright pixels; background (0) wins on dark ones
        net.head.bias[1] = -2.0
    weights = tmp_path / "parsing_bisenet.pth"
    torch.save(net.state_dict(), weights)  # the released weights are a torch state dict too

    images = tmp_path / "photos"
    images.mkdir()
    face_photo().save(images / "a.png")
    out = tmp_path / "out"
    assert run(images, out, packs["plain"], "--parser-weights", weights) == 0
    entry = manifest(out)["a.png"]
    assert entry["mask_method"] == "parser"
    crop = np.asarray(Image.open(out / entry["image"]).convert("L")).astype(np.float32)
    mask = np.asarray(Image.open(out / entry["mask"]))
    bright = crop > 160
    assert (mask[bright] > 127).mean() > 0.95 and (mask[~bright] < 128).mean() > 0.95


def test_ctrl_c_keeps_the_work_done_and_a_rerun_completes_it(kill_inputs, packs, tmp_path, monkeypatch, capsys):
    images, reference, _ = kill_inputs
    out = tmp_path / "out"
    argv = [str(images), "--out", str(out), "--face-root", str(packs["arc2face"]), *BASE, "--commit-every", "2"]
    real_call, calls = prepare_data.Preparer.__call__, [0]

    def interrupted(self, item):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return real_call(self, item)

    monkeypatch.setattr(prepare_data.Preparer, "__call__", interrupted)
    assert prepare_data.main(argv + ["--commit-every", "64"]) == 130
    assert "rerun the same command" in capsys.readouterr().err
    saved = [json.loads(line)["key"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert saved == ["bad.webp", "empty.png", "face0.png"]  # committed by the interrupt, not by --commit-every
    monkeypatch.setattr(prepare_data.Preparer, "__call__", real_call)
    assert prepare_data.main(argv) == 0
    assert "4 processed now" in capsys.readouterr().out
    assert tree(out) == tree(reference)

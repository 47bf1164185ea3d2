"""Real-face data: both folder layouts (prepared: manifest, crops, masks, class words; plain: images +
embeddings), the start-up checks (bad embeddings, undecodable files, missing embeddings, empty shards), the
paired image + mask augmentation, per-rank sharding, the resumable sampler, real/random mixing, and short
in-process training runs that encode real images with the VAE."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from adaface.training.engine.config import EMBEDDINGS_FILE
from adaface.training.engine.data import DataError, FaceIdSource, RealFaces, random_affine
from adaface.training.engine.ddp import DistInfo
from adaface.training.engine.metrics_log import read_jsonl


@pytest.fixture()
def face_dir(tmp_path):
    d = tmp_path / "faces"
    d.mkdir()
    rng = np.random.default_rng(0)
    table = {}
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / f"f{i}.png")
        if i != 6:  # one image without an embedding is skipped
            table[f"f{i}.png"] = torch.randn(512)
    save_file(table, str(d / EMBEDDINGS_FILE))
    return d


def test_shards_are_disjoint_and_cover_an_epoch(face_dir):
    a = RealFaces(face_dir, 16, seed=1, info=DistInfo(0, 2))
    b = RealFaces(face_dir, 16, seed=1, info=DistInfo(1, 2))
    assert len(a) == 6
    ia, ib = a.next_indices(3), b.next_indices(3)
    assert not set(ia) & set(ib) and sorted(ia + ib) == list(range(6))
    assert a.epoch == 1 and a.cursor == 0  # the epoch ended; the next one is reshuffled


def test_loading_says_how_many_faces(face_dir, capsys):
    RealFaces(face_dir, 16, seed=0, info=DistInfo())
    out = capsys.readouterr().out
    assert f"--data-dir: 6 face(s) loaded from {face_dir} (images with embeddings)" in out
    assert "1 image(s) without an embedding" in out
    RealFaces(face_dir, 16, seed=0, info=DistInfo(1, 2))  # only the main rank reports
    assert capsys.readouterr().out == ""


def test_sampler_resumes_where_it_stopped(face_dir):
    a = RealFaces(face_dir, 16, seed=2, info=DistInfo())
    a.next_indices(4)
    state = a.state_dict()
    rest = a.next_indices(5)
    b = RealFaces(face_dir, 16, seed=2, info=DistInfo())
    b.load_state_dict(state)
    assert b.next_indices(5) == rest


def test_mixed_batches(face_dir):
    src = FaceIdSource(RealFaces(face_dir, 16, seed=0, info=DistInfo()), random_fraction=0.0)
    batch = src.sample(3, torch.Generator().manual_seed(0))
    assert bool(batch.is_real.all()) and batch.images.shape == (3, 3, 16, 16)
    assert float(batch.images.min()) >= -1 and float(batch.images.max()) <= 1
    torch.testing.assert_close(batch.arcface.norm(dim=-1), torch.ones(3))
    rnd = FaceIdSource(None, random_fraction=0.0)  # without data every ID is random
    batch = rnd.sample(4, torch.Generator().manual_seed(0))
    assert not bool(batch.is_real.any()) and batch.images is None


def test_training_with_real_faces(face_dir, tmp_path):
    from test_training_config import TINY

    from adaface.training.engine.config import parse_config
    from adaface.training.method import stage1

    sd, a2f = stage1.build_tiny_models(tmp_path / "tiny", seed=0)
    out = tmp_path / "run"
    cfg = parse_config(
        ["--no-tiny", "--sd-model", str(sd), "--arc2face", str(a2f), "--data-dir", str(face_dir),
         "--random-id-fraction", "0.5", "--resolution", "16", "--steps", "2", "--batch-size", "2",
         "--denoise-steps", "2", "--denoise-step-weights", "1", "--output-dir", str(out), "--no-progress",
         "--no-deterministic", "--device", "cpu"],
        default_config=TINY,
    )
    result = stage1.run(cfg)
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in steps)
    assert sum(r["real_samples"] for r in steps) > 0  # the VAE path ran
    state = (out / "checkpoints" / "step-00000002" / "state.json").read_text()
    assert '"epoch"' in state  # the real-data sampler position is checkpointed
    assert result.summary["steps"] == 2


# ---- prepared folders (python -m adaface.prepare_data) ------------------------------------------------------


def make_prepared(root, keys, size=32, bad_embedding=None):
    """A prepared folder: crops whose red channel equals the mask (so the pairing can be checked), masks with a
    face blob left of centre (so a flip shows), class words, and manifest lines of other statuses."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    table, lines = {}, []
    for n, key in enumerate(keys):
        mask = np.zeros((size, size), np.uint8)
        mask[size // 4: 3 * size // 4, 2: size // 2] = 255
        mask[size // 4: 3 * size // 4, size // 2: size // 2 + 2] = 128  # a soft edge
        img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        img[..., 0] = mask
        for sub, arr in (("images", img), ("masks", mask)):
            path = root / sub / f"{key}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
        table[key] = torch.nn.functional.normalize(torch.randn(512), dim=0)
        lines.append({"key": key, "status": "ok", "source_size": 1, "source_mtime_ns": 1,
                      "image": f"images/{key}.png", "mask": f"masks/{key}.png", "mask_method": "box",
                      "box": [0, 0, size, size], "recognizer": "arcface.onnx",
                      "class_word": "woman" if n % 2 else None})
    if bad_embedding is not None:
        table[keys[0]] = bad_embedding
    lines.insert(0, {"key": keys[-1], "status": "no_face", "source_size": 1, "source_mtime_ns": 0})  # older line
    lines.append({"key": "bob/x.jpg", "status": "corrupt", "error": "cannot identify image file"})
    save_file(table, str(root / EMBEDDINGS_FILE))
    (root / "manifest.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in lines))
    return root


KEYS = ["alice/01.jpg", "alice/02.jpg", "carol/a.png"]


def test_prepared_folder_gives_masks_and_class_words(tmp_path):
    real = RealFaces(make_prepared(tmp_path / "prep", KEYS), 16, seed=0, info=DistInfo())
    assert real.prepared and real.names == KEYS  # the newest line for carol/a.png (ok) wins over the older one
    batch = FaceIdSource(real, random_fraction=0.0).sample(3, torch.Generator().manual_seed(0))
    assert batch.images.shape == (3, 3, 16, 16) and batch.masks.shape == (3, 1, 16, 16)
    assert float(batch.masks.min()) >= 0 and float(batch.masks.max()) <= 1 and float(batch.masks.max()) > 0.5
    assert float(batch.images.min()) >= -1 - 1e-5 and float(batch.images.max()) <= 1 + 1e-5
    words = {k: ("woman" if i % 2 else None) for i, k in enumerate(KEYS)}
    idx = [real.names.index(k) for k in real.names]  # every face once in an epoch of 3
    assert sorted(batch.class_words, key=str) == sorted((words[real.names[i]] for i in idx), key=str)
    # the crop's red channel is the mask: the same flip and affine transform went to both (resampling aside)
    red = (batch.images[:, 0:1] + 1) / 2
    assert float((red - batch.masks).abs().mean()) < 0.05


def test_random_affine_is_paired_and_scales_the_face(tmp_path):
    mask = torch.zeros(4, 1, 32, 32)
    mask[:, :, 8:24, 8:24] = 1.0
    images = (mask * 2 - 1).expand(4, 3, 32, 32).clone()
    u = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.5, 0.5], [0.0, 0.0, 1.0], [0.5, 1.0, 0.0]])
    img, msk = random_affine(images, mask, u)
    torch.testing.assert_close((img + 1) / 2, msk.expand_as(img), atol=1e-6, rtol=0)
    area = msk.sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3))
    assert abs(float(area[0]) - 0.4 ** 2) < 0.03  # scale 0.4, centred
    torch.testing.assert_close(msk[1], mask[1], atol=1e-6, rtol=0)  # scale 1, no room to move: unchanged
    # at scale 0.4 the shift moves the face into a corner, and it stays inside the frame
    ys, xs = torch.nonzero(msk[2, 0] > 0.5, as_tuple=True)
    assert xs.float().mean() < 12 and ys.float().mean() > 20
    for i in (0, 2):  # not clipped by the frame: the area is scale² of the original (bilinear resampling aside)
        assert abs(float(msk[i].sum()) / (0.4 ** 2 * float(mask[i].sum())) - 1) < 0.25


def test_prepared_folder_missing_files_are_reported(tmp_path, capsys):
    d = make_prepared(tmp_path / "prep", KEYS)
    (d / "masks" / "alice" / "02.jpg.png").unlink()
    real = RealFaces(d, 16, seed=0, info=DistInfo())
    assert real.names == ["alice/01.jpg", "carol/a.png"]
    out = capsys.readouterr().out
    assert "alice/02.jpg: missing masks/alice/02.jpg.png" in out


def test_plain_folder_has_no_masks(face_dir):
    batch = FaceIdSource(RealFaces(face_dir, 16, seed=0, info=DistInfo()), 0.0).sample(2, torch.Generator())
    assert batch.masks is None and batch.class_words == [None, None]


@pytest.fixture()
def bad_dir(face_dir):
    """face_dir plus every kind of bad file: NaN, zero and wrongly shaped embeddings, a corrupt PNG, a text file
    named .jpg; f6.png (from face_dir) has no embedding."""
    from safetensors.torch import load_file

    table = load_file(str(face_dir / EMBEDDINGS_FILE))
    table["f0.png"] = torch.full((512,), float("nan"))
    table["f1.png"] = torch.zeros(512)
    table["f2.png"] = torch.randn(256)
    good = np.random.default_rng(3).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(good).save(face_dir / "broken.png")
    (face_dir / "broken.png").write_bytes((face_dir / "broken.png").read_bytes()[:60])
    (face_dir / "notes.jpg").write_text("not an image")
    table["broken.png"] = torch.randn(512)
    table["notes.jpg"] = torch.randn(512)
    save_file(table, str(face_dir / EMBEDDINGS_FILE))
    return face_dir


def test_bad_data_is_reported_by_file_and_skipped(bad_dir, capsys):
    real = RealFaces(bad_dir, 16, seed=0, info=DistInfo())
    assert real.names == ["f3.png", "f4.png", "f5.png"]
    assert bool(torch.isfinite(real.embeddings).all())
    out = capsys.readouterr().out
    assert "skipping 5 bad file(s)" in out
    for text in ("f0.png: embedding has non-finite values", "f1.png: embedding is all zeros",
                 "f2.png: embedding of shape [256], expected [512]", "broken.png: does not decode",
                 "notes.jpg: does not decode", "1 image(s) without an embedding", "f6.png"):
        assert text in out, text


def test_bad_data_is_refused_with_the_flag(bad_dir):
    with pytest.raises(DataError, match=r"5 bad file\(s\).*f0.png: embedding has non-finite values") as exc:
        RealFaces(bad_dir, 16, seed=0, info=DistInfo(), on_bad_data="refuse")
    assert "\n" not in str(exc.value)


def test_empty_shard_names_the_rank_and_counts(tmp_path):
    d = make_prepared(tmp_path / "one", KEYS[:1])
    with pytest.raises(DataError, match=r"rank 1 of 2 gets no faces: 1 usable face\(s\) of 1 for 2 ranks"):
        RealFaces(d, 16, seed=0, info=DistInfo(1, 2))


def _all_finite(folder) -> bool:
    from safetensors.torch import load_file

    files = list(folder.rglob("*.safetensors"))
    return bool(files) and all(bool(torch.isfinite(t.float()).all()) for f in files
                               for t in load_file(str(f)).values())


def test_tiny_preset_trains_on_a_prepared_folder_with_a_nan_embedding(tmp_path, capsys):
    """The tiny preset with --data-dir: the prepared crops are resized to the tiny resolution and the tiny VAE
    encodes them; the NaN embedding is reported by name and never reaches a written file."""
    from test_training_config import TINY

    from adaface.training.engine.config import parse_config
    from adaface.training.method import stage1

    data = make_prepared(tmp_path / "prep", KEYS, bad_embedding=torch.full((512,), float("nan")))
    out = tmp_path / "run"
    cfg = parse_config(["--data-dir", str(data), "--random-id-fraction", "0", "--steps", "2", "--batch-size", "2",
                        "--denoise-steps", "1", "--denoise-step-weights", "1", "--output-dir", str(out),
                        "--no-progress", "--checkpoint-every", "1"], default_config=TINY)
    stage1.run(cfg)
    printed = capsys.readouterr().out
    assert "alice/01.jpg: embedding has non-finite values" in printed
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "step"]
    assert [r["real_samples"] for r in steps] == [2, 2] and not any(r["skipped"] for r in steps)
    assert _all_finite(out / "checkpoints") and _all_finite(out / "inverter")

"""Real-face data for stage 1: the folder format, per-rank sharding, resumable sampler, real/random mixing,
and a short in-process training run that encodes real images with the VAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from adaface.training.config import EMBEDDINGS_FILE
from adaface.training.data import FaceIdSource, RealFaces
from adaface.training.ddp import DistInfo
from adaface.training.metrics_log import read_jsonl


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

    from adaface.training import stage1
    from adaface.training.config import parse_config

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

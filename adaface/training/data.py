"""Face IDs for stage 1: random Gaussian IDs, optionally mixed with real faces (image + ArcFace embedding).

Real-face folder layout: images (`.jpg/.png/...`) plus `arcface.safetensors`, one 512-d embedding per image
keyed by the image's file name (as the face encoder writes them). Real faces are read in a per-epoch
permutation shared by all ranks, each rank taking a strided shard; the sampler's position is two integers
(epoch, cursor), saved in checkpoints. Random IDs are `randn(512)`, L2-normalised (paper §2.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import EMBEDDINGS_FILE, list_face_images
from .ddp import DistInfo, mix_seed, shard

ARCFACE_DIM = 512


def random_ids(n: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, ARCFACE_DIM, generator=generator)
    return x / x.norm(dim=-1, keepdim=True)


@dataclass
class FaceBatch:
    arcface: torch.Tensor  # [B, 512], L2-normalised
    is_real: torch.Tensor  # [B] bool
    images: torch.Tensor | None  # [n_real, 3, R, R] in [-1, 1], rows of the real samples in order


class RealFaces:
    """Images with precomputed ArcFace embeddings; a sharded, resumable, per-epoch-shuffled sampler."""

    def __init__(self, folder: str | Path, resolution: int, seed: int, info: DistInfo) -> None:
        from safetensors.torch import load_file

        self.folder = Path(folder)
        self.resolution = resolution
        self.seed = seed
        self.info = info
        table = load_file(str(self.folder / EMBEDDINGS_FILE))
        self.names = [n for n in list_face_images(self.folder) if n in table]
        if not self.names:
            raise ValueError(f"--data-dir: no image in {self.folder} has an embedding in {EMBEDDINGS_FILE}")
        emb = torch.stack([table[n].float().reshape(-1) for n in self.names])
        if emb.shape[1] != ARCFACE_DIM:
            raise ValueError(f"--data-dir: embeddings must be {ARCFACE_DIM}-d, got {emb.shape[1]}")
        self.embeddings = emb / emb.norm(dim=-1, keepdim=True)
        self.epoch = 0
        self.cursor = 0
        self._order: list[int] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            g = torch.Generator().manual_seed(mix_seed(self.seed, "epoch", self.epoch))
            self._order = shard(torch.randperm(len(self.names), generator=g).tolist(), self.info)
        return self._order

    def next_indices(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            order = self._epoch_order()
            take = order[self.cursor : self.cursor + n - len(out)]
            out.extend(take)
            self.cursor += len(take)
            if self.cursor >= len(order):
                self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        return out

    def load_image(self, index: int, flip: bool) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        with Image.open(self.folder / self.names[index]) as im:
            im = im.convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((self.resolution,) * 2, Image.BICUBIC)
            x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
        return x.flip(-1) if flip else x

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self._order = int(state["epoch"]), int(state["cursor"]), None


class FaceIdSource:
    """Draws a batch of IDs: each sample is random with probability `random_fraction`, else the next real face."""

    def __init__(self, real: RealFaces | None, random_fraction: float) -> None:
        self.real = real
        self.random_fraction = 1.0 if real is None else random_fraction

    def sample(self, batch: int, generator: torch.Generator) -> FaceBatch:
        is_real = torch.rand(batch, generator=generator) >= self.random_fraction
        ids = random_ids(batch, generator)
        images = None
        if self.real is not None and bool(is_real.any()):
            n_real = int(is_real.sum())
            idx = self.real.next_indices(n_real)
            flips = (torch.rand(n_real, generator=generator) < 0.5).tolist()
            ids[is_real] = self.real.embeddings[idx]
            images = torch.stack([self.real.load_image(i, f) for i, f in zip(idx, flips)])
        return FaceBatch(arcface=ids, is_real=is_real, images=images)

    def state_dict(self) -> dict:
        return {} if self.real is None else self.real.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.real is not None and state:
            self.real.load_state_dict(state)

"""Face IDs for training: random Gaussian IDs, optionally mixed with real faces (image, mask, ArcFace embedding).

Two folder layouts are read (`--data-dir`):
- prepared (`python -m adaface.prepare_data`): `manifest.jsonl` (one JSON line per source file, the newest line
  for a key wins; only `status: ok` lines are used), `images/<key>.png` face crops, `masks/<key>.png` soft face
  masks (8-bit, 255 = face), `arcface.safetensors` with one 512-d embedding per key, and a `class_word` per key.
  Crop and mask get the same random augmentation: a horizontal flip and the paper's random affine transform,
  scale in [0.4, 1] with a translation that keeps the scaled face inside the frame (§3, training data);
- plain: images (`.jpg/.png/...`) at the top level plus `arcface.safetensors` keyed by file name; no masks or
  class words; a centre crop and a horizontal flip.

Everything is checked when the folder is opened, before any model loads: every image (and mask) must decode,
every embedding must be a finite, non-zero 512-d vector; the bad files are reported together, by name, and
skipped (`on_bad_data="skip"`) or refused (`"refuse"`). Files without an embedding are listed too.
Real faces are read in a per-epoch permutation shared by all ranks, each rank taking a strided shard; the
sampler's position is two integers (epoch, cursor), saved in checkpoints. Random IDs are `randn(512)`,
L2-normalised (paper §2.2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ...faces.prepared_folder import file_inside
from .ddp import DistInfo, mix_seed, shard
from .errors import ConfigError
from .face_files import EMBEDDINGS_FILE, list_face_images

ARCFACE_DIM = 512
MANIFEST = "manifest.jsonl"
MAX_MANIFEST_BYTES = 2**30  # about four million lines of prepare_data's manifest
AFFINE_SCALE = (0.4, 1.0)  # the paper's random affine scale range for prepared crops
_SHOWN = 20  # bad files named one per line in a report; the rest are counted


class DataError(ConfigError):
    """A problem with --data-dir, reported before any model is loaded; the message names the files."""


def random_ids(n: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, ARCFACE_DIM, generator=generator)
    return x / x.norm(dim=-1, keepdim=True)


@dataclass
class FaceBatch:
    arcface: torch.Tensor  # [B, 512], L2-normalised
    is_real: torch.Tensor  # [B] bool
    images: torch.Tensor | None  # [n_real, 3, R, R] in [-1, 1], rows of the real samples in order
    masks: torch.Tensor | None = None  # [n_real, 1, R, R] in [0, 1] (prepared folders), same order as images
    class_words: list[str | None] = field(default_factory=list)  # one per real sample, same order as images


@dataclass(frozen=True)
class FaceEntry:
    key: str  # manifest key (prepared) or file name (plain)
    image: Path
    mask: Path | None
    class_word: str | None


def is_prepared(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def read_manifest(folder: Path) -> tuple[list[FaceEntry], list[str]]:
    """The `ok` entries of a prepared folder (newest line per key) and the problems found (bad lines, missing
    files)."""
    latest: dict[str, dict] = {}
    problems: list[str] = []
    size = (folder / MANIFEST).stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise DataError(f"{folder / MANIFEST}: {size:,} bytes, over the limit of {MAX_MANIFEST_BYTES:,}")
    text = (folder / MANIFEST).read_bytes().decode("utf-8", errors="replace")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: nested too deep to be a manifest line
            problems.append(f"{MANIFEST} line {n}: not JSON")
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
            problems.append(f"{MANIFEST} line {n}: no 'key'")
            continue
        latest[rec["key"]] = rec
    entries = []
    for key in sorted(latest):
        rec = latest[key]
        if rec.get("status") != "ok":
            continue
        # Paths read from the manifest: regular files inside the folder only (no `..`, absolute paths, links out).
        (image, bad_image), (mask, bad_mask) = (file_inside(folder, rec.get(f, default)) for f, default in (
            ("image", f"images/{key}.png"), ("mask", f"masks/{key}.png")))
        if image is None or mask is None:
            problems.append(f"{key}: {'; '.join(w for w in (bad_image, bad_mask) if w)}")
            continue
        word = rec.get("class_word")
        entries.append(FaceEntry(key, image, mask, word if isinstance(word, str) and word else None))
    return entries, problems


def list_entries(folder: str | Path) -> tuple[list[FaceEntry], list[str]]:
    """The candidate faces of either layout, before the embedding and decoding checks."""
    folder = Path(folder)
    if is_prepared(folder):
        return read_manifest(folder)
    entries, problems = [], []
    for name in list_face_images(folder):
        path, why = file_inside(folder, name)
        if path is None:
            problems.append(f"{name}: {why}")
        else:
            entries.append(FaceEntry(name, folder / name, None, None))
    return entries, problems


def embedding_problem(value: torch.Tensor) -> str | None:
    """Why a stored embedding cannot be used (None: it can)."""
    if value.numel() != ARCFACE_DIM or value.dim() not in (1, 2):
        return f"embedding of shape {list(value.shape)}, expected [{ARCFACE_DIM}]"
    v = value.detach().double().reshape(-1)
    if not bool(torch.isfinite(v).all()):
        return "embedding has non-finite values"
    if float(v.norm()) == 0.0:
        return "embedding is all zeros"
    return None


def decode_problem(path: Path, mode: str) -> str | None:
    """Why an image file does not decode (None: it does)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.draft(mode, (64, 64))  # JPEG: decode at reduced size; enough to find a broken stream
            im.convert(mode).load()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        detail = str(e).splitlines()[0] if str(e) else ""
        return f"does not decode ({e.__class__.__name__}{': ' + detail if detail else ''})"
    return None


def _report(title: str, lines: list[str]) -> str:
    shown = lines[:_SHOWN]
    more = f"\n  ... and {len(lines) - _SHOWN} more" if len(lines) > _SHOWN else ""
    return f"{title}:\n" + "\n".join(f"  {x}" for x in shown) + more


def _one_line(lines: list[str]) -> str:
    shown = "; ".join(lines[:5])
    return shown + (f"; and {len(lines) - 5} more" if len(lines) > 5 else "")


class RealFaces:
    """Images with precomputed ArcFace embeddings (and masks, class words in a prepared folder); a sharded,
    resumable, per-epoch-shuffled sampler."""

    def __init__(self, folder: str | Path, resolution: int, seed: int, info: DistInfo, *,
                 on_bad_data: str = "skip", verbose: bool | None = None) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if on_bad_data not in ("skip", "refuse"):
            raise ValueError(f"on_bad_data: 'skip' or 'refuse', got {on_bad_data!r}")
        self.folder = Path(folder)
        self.resolution = resolution
        self.seed = seed
        self.info = info
        self.prepared = is_prepared(self.folder)
        verbose = info.is_main if verbose is None else verbose
        try:
            table = load_file(str(self.folder / EMBEDDINGS_FILE))
        except (OSError, SafetensorError) as e:
            raise DataError(f"--data-dir: {self.folder / EMBEDDINGS_FILE} does not load ({e})") from None

        # every candidate: an embedding that is a finite non-zero 512-vector, an image (and mask) that decodes
        entries, bad = list_entries(self.folder)
        unembedded = [e.key for e in entries if e.key not in table]
        good: list[FaceEntry] = []
        for e in entries:
            if e.key not in table:
                continue
            why = embedding_problem(table[e.key]) or decode_problem(e.image, "RGB")
            if why is None and e.mask is not None:
                why = decode_problem(e.mask, "L")
                why = None if why is None else f"mask {why}"
            if why is not None:
                bad.append(f"{e.key}: {why}")
                continue
            good.append(e)
        if bad and on_bad_data == "refuse":
            raise DataError(f"--data-dir: {len(bad)} bad file(s) in {self.folder} (--on-bad-data refuse): "
                            f"{_one_line(bad)}")
        if verbose and bad:
            print(_report(f"--data-dir: skipping {len(bad)} bad file(s) in {self.folder}", bad), flush=True)
        if verbose and unembedded:
            print(_report(f"--data-dir: {len(unembedded)} image(s) without an embedding in {EMBEDDINGS_FILE} "
                          "(not used)", unembedded), flush=True)
        if not good:
            raise DataError(f"--data-dir: no usable face in {self.folder} ({len(entries)} candidate(s), "
                            f"{len(unembedded)} without an embedding, {len(bad)} bad)")
        if len(good) < info.world_size:
            raise DataError(f"--data-dir: rank {info.rank} of {info.world_size} gets no faces: {len(good)} usable "
                            f"face(s) of {len(entries)} for {info.world_size} ranks")

        if verbose:
            kind = "a prepared folder with masks" if self.prepared else "images with embeddings"
            print(f"--data-dir: {len(good)} face(s) loaded from {self.folder} ({kind})", flush=True)
        self.entries = good
        self.names = [e.key for e in good]
        emb = torch.stack([table[e.key].float().reshape(-1) for e in good])
        self.embeddings = emb / emb.norm(dim=-1, keepdim=True)
        self.epoch = 0
        self.cursor = 0
        self._order: list[int] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            g = torch.Generator().manual_seed(mix_seed(self.seed, "epoch", self.epoch))
            self._order = shard(torch.randperm(len(self.entries), generator=g).tolist(), self.info)
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

    def _read(self, path: Path, mode: str, resample: int) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert(mode)
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((self.resolution,) * 2, resample)
            x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy())
        return x.permute(2, 0, 1) if x.dim() == 3 else x.unsqueeze(0)

    def load_image(self, index: int, flip: bool) -> torch.Tensor:
        """The image in [-1, 1], [3, R, R], centre-cropped and resized (and flipped)."""
        from PIL import Image

        x = self._read(self.entries[index].image, "RGB", Image.BICUBIC) / 127.5 - 1.0
        return x.flip(-1) if flip else x

    def load_mask(self, index: int, flip: bool) -> torch.Tensor | None:
        """The mask in [0, 1], [1, R, R] (None in a plain folder)."""
        from PIL import Image

        path = self.entries[index].mask
        if path is None:
            return None
        m = self._read(path, "L", Image.BILINEAR) / 255.0
        return m.flip(-1) if flip else m

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self._order = int(state["epoch"]), int(state["cursor"]), None


def random_affine(images: torch.Tensor, masks: torch.Tensor, u: torch.Tensor,
                  scale: tuple[float, float] = AFFINE_SCALE) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random zoom-out and shift for each image and its mask. `u` [n, 3] uniform in [0, 1): scale, then
    the x and y shift as a fraction of the room the scaled face leaves. Uncovered pixels are black (image -1)
    and background (mask 0)."""
    lo, hi = scale
    s = lo + (hi - lo) * u[:, 0]
    room = 1.0 - s  # in the [-1, 1] grid, a face of half-size s can move by up to 1 - s and stay inside
    tx, ty = room * (2 * u[:, 1] - 1), room * (2 * u[:, 2] - 1)
    theta = torch.zeros(len(s), 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = 1 / s, 1 / s  # output -> input coordinates: (out - t) / s
    theta[:, 0, 2], theta[:, 1, 2] = -tx / s, -ty / s
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    img = F.grid_sample(images + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
    msk = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return img, msk.clamp(0.0, 1.0)


class FaceIdSource:
    """Draws a batch of IDs: each sample is random with probability `random_fraction`, else the next real face."""

    def __init__(self, real: RealFaces | None, random_fraction: float) -> None:
        self.real = real
        self.random_fraction = 1.0 if real is None else random_fraction

    def sample(self, batch: int, generator: torch.Generator) -> FaceBatch:
        is_real = torch.rand(batch, generator=generator) >= self.random_fraction
        ids = random_ids(batch, generator)
        images = masks = None
        words: list[str | None] = []
        if self.real is not None and bool(is_real.any()):
            n_real = int(is_real.sum())
            idx = self.real.next_indices(n_real)
            flips = (torch.rand(n_real, generator=generator) < 0.5).tolist()
            ids[is_real] = self.real.embeddings[idx]
            images = torch.stack([self.real.load_image(i, f) for i, f in zip(idx, flips)])
            words = [self.real.entries[i].class_word for i in idx]
            if self.real.prepared:
                masks = torch.stack([self.real.load_mask(i, f) for i, f in zip(idx, flips)])
                images, masks = random_affine(images, masks, torch.rand(n_real, 3, generator=generator))
        return FaceBatch(arcface=ids, is_real=is_real, images=images, masks=masks, class_words=words)

    def state_dict(self) -> dict:
        return {} if self.real is None else self.real.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.real is not None and state:
            self.real.load_state_dict(state)

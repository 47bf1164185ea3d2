"""A subject's identity → its 16 AdaFace subject embeddings (paper §2.1, Figure 3), for generation and textual
inversion.

Three ways to name an identity, each giving one L2-normalised 512-d ArcFace vector:
- face photos (paths, PIL images, numpy RGB arrays) through `FaceEncoder` (insightface `antelopev2` pack);
  several photos give the mean, renormalised; with `on_no_face="random"` a photo without a face is replaced by
  a random vector, and `resolve_identity` says which photos were (callers must tell the user);
- a precomputed ArcFace embedding file (`load_arcface_embedding`: `.npy` or `.safetensors`, `[512]` or
  `[N, 512]`, never a pickle);
- a random ID (`random_arcface(seed)`), as stage 1 trains on.

Several subjects in one picture: `SubjectSpec.parse("z=alice1.jpg,alice2.jpg")` (or `y=random:7`,
`y=embedding:bob.npy`) names one subject by its placeholder and source, as `python -m adaface.generate --subject`
takes it.

`SubjectEncoder` then runs Arc2Face's ID encoder (`id_tokens`, 16 image-space tokens) and the Prompt Inverter
(16 text-space embeddings `[16, H]`), which `encode_prompt` writes into any prompt and `save_textual_inversion`
writes as an ordinary textual-inversion file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .models._io import first_line

PathLike = str | os.PathLike
ARCFACE_DIM = 512
EMBEDDING_SUFFIXES = (".npy", ".safetensors")


def random_arcface(seed: int) -> torch.Tensor:
    """A random identity: `randn(512)` from a CPU generator seeded with `seed`, L2-normalised (same on any device)."""
    g = torch.Generator().manual_seed(int(seed))
    return F.normalize(torch.randn(ARCFACE_DIM, generator=g), dim=0)


def load_arcface_embedding(path: PathLike) -> torch.Tensor:
    """An ArcFace embedding file → `[N, 512]` float32 rows, each L2-normalised.

    `.npy` is read with `allow_pickle=False`; `.safetensors` must hold exactly one tensor (any key). A file of
    several rows is several reference photos: callers average them (`F.normalize(rows.mean(0))`) for an identity.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ArcFace embedding file not found: {path}")
    if path.suffix == ".npy":
        import numpy as np

        try:  # memory-mapped: a header declaring more than the file holds is refused, not allocated
            array = np.load(path, allow_pickle=False, mmap_mode="r")
            rows = torch.from_numpy(np.array(array, dtype=np.float32))
        except (EOFError, OSError) as e:  # truncated or empty
            raise ValueError(f"{path}: damaged .npy file ({type(e).__name__}: {e or 'truncated'})") from e
        except Exception as e:  # numpy's header parser raises ValueError, SyntaxError, tokenize.TokenError, ...
            # (object arrays need unpickling, which is never done here)
            raise ValueError(f"{path}: not a plain numeric .npy array ({first_line(e)})") from e
    elif path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: damaged .safetensors file ({first_line(e)})") from e
        except Exception as e:  # anything else the header parser raises on a malformed file
            raise ValueError(f"{path}: not a valid safetensors file ({first_line(e)})") from e
        if len(tensors) != 1:
            raise ValueError(f"{path}: expected one tensor (the ArcFace embedding), found keys {sorted(tensors)}")
        rows = next(iter(tensors.values())).float()
    else:
        raise ValueError(f"{path}: ArcFace embeddings must be {' or '.join(EMBEDDING_SUFFIXES)} files")
    if rows.dim() == 1:
        rows = rows.unsqueeze(0)
    if rows.dim() != 2 or rows.shape[1] != ARCFACE_DIM or rows.shape[0] == 0:
        raise ValueError(f"{path}: expected an ArcFace embedding [512] or [N, 512], got shape {tuple(rows.shape)}")
    if not torch.isfinite(rows).all() or (rows.norm(dim=1) == 0).any():
        raise ValueError(f"{path}: the embedding holds non-finite values or all-zero rows")
    return F.normalize(rows, dim=1)


@dataclass
class Identity:
    """An identity `[512]` and the photos (their descriptions) for which a random vector stood in."""

    arcface: torch.Tensor
    random_stand_ins: list[str] = field(default_factory=list)
    num_photos: int = 0

    @property
    def all_random(self) -> bool:
        return self.num_photos > 0 and len(self.random_stand_ins) == self.num_photos


@dataclass
class SubjectSpec:
    """One subject of a multi-subject prompt: its placeholder word and exactly one identity source."""

    placeholder: str
    images: list[str] | None = None
    embedding: str | None = None
    random_id: int | None = None

    @classmethod
    def parse(cls, text: str) -> SubjectSpec:
        """`PLACEHOLDER=photo.jpg[,photo2.jpg...]`, `PLACEHOLDER=random:SEED` or `PLACEHOLDER=embedding:FILE`."""
        placeholder, sep, source = text.partition("=")
        placeholder, source = placeholder.strip(), source.strip()
        if not sep or not placeholder or not source:
            raise ValueError(f"{text!r}: expected PLACEHOLDER=SOURCE, e.g. z=alice.jpg, y=random:7 or "
                             "y=embedding:bob.npy")
        if any(c.isspace() or c in ",=" for c in placeholder):
            raise ValueError(f"{text!r}: the placeholder must be one word (no spaces, commas or '='), "
                             f"got {placeholder!r}")
        kind, colon, value = source.partition(":")
        if colon and kind == "random":
            try:
                return cls(placeholder, random_id=int(value))
            except ValueError:
                raise ValueError(f"{text!r}: random:SEED needs an integer seed, got {value!r}") from None
        if colon and kind == "embedding":
            if not value.strip():
                raise ValueError(f"{text!r}: embedding:FILE needs a file")
            return cls(placeholder, embedding=value.strip())
        images = [i.strip() for i in source.split(",")]
        if not all(images):
            raise ValueError(f"{text!r}: an empty photo path in the comma-separated list")
        return cls(placeholder, images=images)

    def source(self) -> dict:
        """What settings.json records: {'images': [absolute paths]}, {'embedding': path} or {'random_id': seed}."""
        if self.images is not None:
            return {"images": [str(Path(i).expanduser().resolve()) for i in self.images]}
        if self.embedding is not None:
            return {"embedding": str(Path(self.embedding).expanduser().resolve())}
        return {"random_id": self.random_id}


NO_FACE_MESSAGE = "no face found"  # how FaceEncoder starts its ValueError for a photo without a face


def _describe_photo(image: object, index: int) -> str:
    return str(image) if isinstance(image, (str, os.PathLike)) else f"image #{index} ({type(image).__name__})"


def identity(rows: torch.Tensor) -> torch.Tensor:
    """Several L2-normalised embeddings `[N, 512]` → one identity `[512]` (mean, renormalised), as FaceEncoder."""
    return F.normalize(rows.float().mean(0), dim=0)


class SubjectEncoder:
    """ArcFace identity → 16 subject embeddings `[16, H]` through Arc2Face's ID encoder and the Prompt Inverter.

    `face_encoder` (a FaceEncoder) is only needed for photos; with `face_root` it is loaded on first use, so
    runs from an embedding file or a random ID never touch insightface.
    """

    def __init__(
        self,
        arc2face: Any,
        inverter: Any,
        *,
        face_encoder: Any = None,
        face_root: PathLike | None = None,
    ) -> None:
        if arc2face.hidden_size != inverter.hidden_size:
            raise ValueError(
                f"Arc2Face's encoder width {arc2face.hidden_size} differs from the Prompt Inverter's "
                f"{inverter.hidden_size}: they must come from the same CLIP text architecture"
            )
        if arc2face.num_id_tokens != inverter.num_id_tokens:
            raise ValueError(
                f"Arc2Face gives {arc2face.num_id_tokens} ID tokens but the Prompt Inverter takes "
                f"{inverter.num_id_tokens}"
            )
        self.arc2face = arc2face
        self.inverter = inverter.eval()
        self._face_encoder = face_encoder
        self.face_root = face_root

    @classmethod
    def from_pretrained(
        cls,
        arc2face: PathLike,
        inverter: PathLike,
        *,
        tokenizer: object,
        face_root: PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> SubjectEncoder:
        """Load Arc2Face's encoder (no UNet; `tokenizer`: SD-1.5's, as Arc2Face ships none) and the inverter."""
        from .models.arc2face import Arc2Face
        from .models.prompt_inverter import PromptInverter

        a2f = Arc2Face.from_pretrained(arc2face, tokenizer=tokenizer, load_unet=False)
        inv = PromptInverter.from_pretrained(inverter)
        return cls(a2f.to(device=device, dtype=dtype), inv.to(device=device, dtype=dtype), face_root=face_root)

    @property
    def hidden_size(self) -> int:
        return self.inverter.hidden_size

    @property
    def face_encoder(self) -> Any:
        if self._face_encoder is None:
            if self.face_root is None:
                raise ValueError("face photos need an insightface model root: pass face_root= (the antelopev2 pack)")
            from .models.face_encoder import FaceEncoder

            self._face_encoder = FaceEncoder(self.face_root)
        return self._face_encoder

    def arcface(
        self,
        *,
        images: object = None,
        embedding: PathLike | torch.Tensor | None = None,
        random_id: int | None = None,
        on_no_face: str = "error",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Exactly one of `images` / `embedding` (file or tensor) / `random_id` → the identity `[512]` (CPU)."""
        return self.resolve_identity(images=images, embedding=embedding, random_id=random_id,
                                     on_no_face=on_no_face, generator=generator).arcface

    def resolve_identity(
        self,
        *,
        images: object = None,
        embedding: PathLike | torch.Tensor | None = None,
        random_id: int | None = None,
        on_no_face: str = "error",
        generator: torch.Generator | None = None,
    ) -> Identity:
        """As `arcface`, also naming the photos in which no face was found (`on_no_face="random"`)."""
        given = [name for name, v in (("images", images), ("embedding", embedding), ("random_id", random_id))
                 if v is not None]
        if len(given) != 1:
            raise ValueError(f"pass exactly one of images, embedding, random_id; got {given or 'none'}")
        if on_no_face not in ("error", "random"):
            raise ValueError(f"on_no_face must be 'error' or 'random', got {on_no_face!r}")
        if images is not None:
            return self._photos_identity(images, on_no_face, generator)
        if random_id is not None:
            return Identity(random_arcface(random_id))
        if isinstance(embedding, torch.Tensor):
            rows = embedding.detach().float().cpu()
            rows = rows.unsqueeze(0) if rows.dim() == 1 else rows
            if rows.dim() != 2 or rows.shape[1] != ARCFACE_DIM:
                raise ValueError(f"embedding must be [512] or [N, 512], got {tuple(embedding.shape)}")
            return Identity(identity(F.normalize(rows, dim=1)))
        return Identity(identity(load_arcface_embedding(embedding)))

    def _photos_identity(self, images: object, on_no_face: str, generator: torch.Generator | None) -> Identity:
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if on_no_face == "error":
            return Identity(self.face_encoder(items), num_photos=len(items))
        # Photo by photo, so the ones without a face are known; the random rows are drawn in photo order from
        # `generator`, as FaceEncoder's own fallback draws them.
        rows, stand_ins = [], []
        for i, item in enumerate(items):
            try:
                rows.append(self.face_encoder.embed_each([item])[0])
            except ValueError as e:
                if not str(e).startswith(NO_FACE_MESSAGE):
                    raise
                rows.append(F.normalize(torch.randn(ARCFACE_DIM, generator=generator), dim=0))
                stand_ins.append(_describe_photo(item, i))
        return Identity(identity(torch.stack(rows)), stand_ins, len(items))

    @torch.no_grad()
    def __call__(self, arcface: torch.Tensor) -> torch.Tensor:
        """An identity `[512]` (or a batch `[B, 512]`) → subject embeddings `[16, H]` (or `[B, 16, H]`)."""
        param = next(self.inverter.parameters())
        batch = arcface.dim() == 2
        face = arcface.reshape(-1, arcface.shape[-1]).to(device=param.device, dtype=param.dtype)
        tokens = self.arc2face.id_tokens(face)
        out = self.inverter(tokens)
        return out if batch else out[0]

    def encode(self, **source: Any) -> torch.Tensor:
        """`arcface(**source)` then the subject embeddings `[16, H]`."""
        return self(self.arcface(**source))


def encode_subject(
    arc2face: PathLike,
    inverter: PathLike,
    *,
    tokenizer: object,
    images: Sequence[object] | object = None,
    embedding: PathLike | torch.Tensor | None = None,
    random_id: int | None = None,
    face_root: PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One call from model folders and a subject to its 16 subject embeddings `[16, H]`."""
    enc = SubjectEncoder.from_pretrained(
        arc2face, inverter, tokenizer=tokenizer, face_root=face_root, device=device, dtype=dtype
    )
    return enc.encode(images=images, embedding=embedding, random_id=random_id)

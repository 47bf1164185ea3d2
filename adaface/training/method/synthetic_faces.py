"""Synthetic "faces" with masks in the prepared data layout, so the tiny stage-2 preset needs no data.

`write_synthetic_faces(folder, n, size, seed)` draws n images — a skin-toned ellipse with eyes and a mouth on a
random background, at a random position and size — with the ellipse as the face mask, a random unit ArcFace
vector each, and a class word (man / woman / none, so the default class word is exercised too). It writes the
folder exactly as `python -m adaface.prepare_data` would (manifest.jsonl, images/, masks/, arcface.safetensors),
so the tiny run reads it through the same loader as real data.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CLASS_WORDS = ("man", "woman", None)


def _draw(size: int, g: torch.Generator):
    from PIL import Image, ImageDraw

    def r(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    bg = tuple(int(r(0, 255)) for _ in range(3))
    skin = (int(r(150, 240)), int(r(100, 190)), int(r(80, 160)))
    img = Image.new("RGB", (size, size), bg)
    mask = Image.new("L", (size, size), 0)
    w, h = r(0.35, 0.55) * size, r(0.5, 0.7) * size
    cx, cy = r(0.4, 0.6) * size, r(0.42, 0.58) * size
    box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    ImageDraw.Draw(img).ellipse(box, fill=skin)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    d = ImageDraw.Draw(img)
    eye = max(1.0, 0.06 * w)
    for ex in (cx - 0.2 * w, cx + 0.2 * w):
        d.ellipse((ex - eye, cy - 0.12 * h - eye, ex + eye, cy - 0.12 * h + eye), fill=(30, 30, 30))
    d.line((cx - 0.15 * w, cy + 0.22 * h, cx + 0.15 * w, cy + 0.22 * h), fill=(140, 40, 40),
           width=max(1, int(0.03 * size)))
    return img, mask


def write_synthetic_faces(folder: str | Path, n: int = 12, size: int = 64, seed: int = 0) -> Path:
    """Write n synthetic faces in the prepared layout into `folder` (reused if already complete)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    manifest = folder / "manifest.jsonl"
    if manifest.is_file() and (folder / "arcface.safetensors").is_file():
        return folder
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    lines, table = [], {}
    for i in range(n):
        key = f"synthetic/{i:03d}.png"
        img, mask = _draw(size, g)
        (folder / "images" / "synthetic").mkdir(exist_ok=True)
        (folder / "masks" / "synthetic").mkdir(exist_ok=True)
        img.save(folder / "images" / key)
        mask.save(folder / "masks" / key)
        v = torch.randn(512, generator=g)
        table[key] = v / v.norm()
        lines.append(json.dumps({"key": key, "status": "ok", "image": f"images/{key}", "mask": f"masks/{key}",
                                 "mask_method": "box", "box": [0, 0, size, size], "recognizer": "synthetic",
                                 "class_word": CLASS_WORDS[i % len(CLASS_WORDS)], "source_size": 0,
                                 "source_mtime_ns": 0}))
    save_file(table, str(folder / "arcface.safetensors"))
    manifest.write_text("\n".join(lines) + "\n")  # written last: its presence marks a complete folder
    return folder

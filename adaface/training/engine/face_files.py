"""The plain face folder's files: images with these suffixes at the top level plus the embeddings table.

Both the start-up checks (config) and the data loader (data) read this layout, so it lives below both.
"""

from __future__ import annotations

from pathlib import Path

EMBEDDINGS_FILE = "arcface.safetensors"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def list_face_images(data_dir: Path) -> list[str]:
    return sorted(p.name for p in data_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)

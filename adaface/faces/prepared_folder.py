"""The prepared data folder's writer: crops, masks, `manifest.jsonl` and `arcface.safetensors`, crash-safe.

Layout (shared with the training data loader, `adaface.training.engine.data`):

    manifest.jsonl          one JSON line per input file; the newest line for a key wins
    images/<key>.png        RGB face-centred training crop
    masks/<key>.png         "L" face mask of the crop (255 face, 0 background)
    arcface.safetensors     one float32 [512] L2-normalised embedding per `ok` key, tensor name = key
    prepare_settings.json   the options that shape the outputs; a rerun must use the same ones

How a kill cannot lose or corrupt work: every file is written to a temporary name and moved into place
(`os.replace`), so a file either has its old content or its new one. Results are committed in batches: the
batch's embeddings go to a shard `.pending/NNNNNN.safetensors` first, then its manifest lines are appended, so a
manifest line never names an embedding that is not on disk. `finish` merges the shards into
`arcface.safetensors`, rewrites the manifest with one line per key in key order, and removes the shards and any
file no `ok` line names (leftovers of a killed run); a folder that a killed run left behind is therefore
completed by a rerun into exactly the folder an uninterrupted run writes. An input that later disappears from
the images folder keeps its entry and outputs.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import numpy as np

from .._files import create_temp_sibling

MANIFEST = "manifest.jsonl"
EMBEDDINGS = "arcface.safetensors"
SETTINGS = "prepare_settings.json"
PENDING = ".pending"
IMAGES_DIR = "images"
MASKS_DIR = "masks"


class SettingsMismatch(ValueError):
    """The folder was prepared with other options than this run's."""


def _publish(tmp: str, path: Path) -> None:
    os.replace(tmp, path)  # the temporary file already has the umask's mode (create_temp_sibling)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp_sibling(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def png_bytes(image: Any) -> bytes:
    """A PIL image as PNG bytes (no timestamps or other run-dependent chunks: same pixels, same bytes).

    zlib level 1: the default level 6 takes about twice as long (as long as everything else done per image)
    for files only a few percent smaller.
    """
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _json_line(entry: dict) -> str:
    return json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n"


def read_manifest(path: Path) -> tuple[dict[str, dict], bool]:
    """The newest entry per key, and whether the file is clean (False: a torn or unreadable line was skipped)."""
    entries: dict[str, dict] = {}
    if not path.is_file():
        return entries, True
    raw = path.read_bytes()
    clean = not raw or raw.endswith(b"\n")
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            clean = False
            continue
        if isinstance(entry, dict) and isinstance(entry.get("key"), str):
            entries[entry["key"]] = entry
        else:
            clean = False
    return entries, clean


def file_inside(folder: Path, relative: object) -> tuple[Path | None, str | None]:
    """`folder / relative` when it is a regular file inside `folder` (links resolved), else (None, why not).

    For paths read from a file in the folder (the manifest's): absolute paths, `..` and links leading out,
    FIFOs and devices are refused, so a shared folder cannot make a reader open anything else.
    """
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        return None, f"path {relative!r} is not a relative path"
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts:
        return None, f"path {relative!r} leads outside the folder"
    root = folder.resolve()
    target = (folder / rel).resolve()
    if not target.is_relative_to(root):
        return None, f"path {relative!r} leads outside the folder (to {target})"
    try:
        mode = target.stat().st_mode
    except OSError:
        return None, f"missing {relative}"
    if not stat.S_ISREG(mode):
        return None, f"{relative} is not a regular file (a FIFO, device or folder)"
    return target, None


def output_paths(key: str) -> tuple[str, str]:
    """The crop's and the mask's paths relative to the folder, for a key."""
    return f"{IMAGES_DIR}/{key}.png", f"{MASKS_DIR}/{key}.png"


class PreparedFolder:
    """Open (or create) a prepared folder; `record` results, `commit` in batches, `finish` at the end."""

    def __init__(self, out: str | os.PathLike, settings: dict, commit_every: int = 64) -> None:
        from safetensors.numpy import load_file

        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.commit_every = commit_every
        self._check_settings(settings)
        self.entries, clean = read_manifest(self.out / MANIFEST)
        self.embeddings: dict[str, np.ndarray] = {}
        if (self.out / EMBEDDINGS).is_file():
            self.embeddings.update(load_file(str(self.out / EMBEDDINGS)))
        shards = sorted((self.out / PENDING).glob("*.safetensors")) if (self.out / PENDING).is_dir() else []
        for shard in shards:
            self.embeddings.update(load_file(str(shard)))
        self._next_shard = int(shards[-1].stem) + 1 if shards else 0
        self._lines: list[dict] = []
        self._batch: dict[str, np.ndarray] = {}
        if not clean:  # a torn last line would swallow the next appended one: rewrite the manifest first
            self._write_manifest()

    def _check_settings(self, settings: dict) -> None:
        path = self.out / SETTINGS
        if path.is_file():
            old = json.loads(path.read_text())
            changed = [f"{k}: {old.get(k)!r} then, {v!r} now" for k, v in settings.items() if old.get(k) != v]
            if changed:
                raise SettingsMismatch(
                    f"{self.out} was prepared with other settings ({'; '.join(changed)}): rerun with the same "
                    "options, or prepare into a new --out"
                )
        else:
            atomic_write(path, (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode())

    def is_done(self, key: str, size: int, mtime_ns: int) -> bool:
        """Whether `key` was prepared from a file of this size and mtime (and, if `ok`, its outputs exist)."""
        entry = self.entries.get(key)
        if entry is None or entry.get("source_size") != size or entry.get("source_mtime_ns") != mtime_ns:
            return False
        if entry.get("status") != "ok":
            return True
        expected = output_paths(key)  # a manifest naming other paths was not written by this folder's runs
        return key in self.embeddings and all(entry.get(f) == rel and file_inside(self.out, rel)[0] is not None
                                              for f, rel in zip(("image", "mask"), expected))

    def write_outputs(self, key: str, crop: Any, mask: Any) -> tuple[str, str]:
        """Write a key's crop and mask (PNG); returns their paths relative to the folder."""
        image_rel, mask_rel = output_paths(key)
        atomic_write(self.out / image_rel, png_bytes(crop))
        atomic_write(self.out / mask_rel, png_bytes(mask))
        return image_rel, mask_rel

    def record(self, entry: dict, embedding: np.ndarray | None = None) -> None:
        """Queue one input's manifest entry (and its embedding, for `ok`); commits every `commit_every`."""
        if embedding is not None:
            self._batch[entry["key"]] = np.ascontiguousarray(embedding, np.float32).reshape(-1)
        self._lines.append(entry)
        if len(self._lines) >= self.commit_every:
            self.commit()

    def commit(self) -> None:
        """Make the queued results durable: embeddings shard first, then the manifest lines that need it."""
        from safetensors.numpy import save

        if not self._lines:
            return
        if self._batch:
            shard = self.out / PENDING / f"{self._next_shard:06d}.safetensors"
            atomic_write(shard, save(dict(sorted(self._batch.items()))))
            self._next_shard += 1
        with open(self.out / MANIFEST, "a", encoding="utf-8") as f:
            f.write("".join(_json_line(e) for e in self._lines))
            f.flush()
            os.fsync(f.fileno())
        self.embeddings.update(self._batch)
        self.entries.update({e["key"]: e for e in self._lines})
        self._lines, self._batch = [], {}

    def _write_manifest(self) -> None:
        lines = "".join(_json_line(self.entries[k]) for k in sorted(self.entries))
        atomic_write(self.out / MANIFEST, lines.encode("utf-8"))

    def finish(self, class_words: Any = None) -> None:
        """Commit, merge the embeddings into one file, compact the manifest, remove leftovers.

        `class_words(key)`, when given, overrides each `ok` line's class word where it has one.
        """
        from safetensors.numpy import save

        self.commit()
        ok = sorted(k for k, e in self.entries.items() if e.get("status") == "ok" and k in self.embeddings)
        if class_words is not None:
            for key in ok:
                word = class_words(key)
                if word is not None:
                    self.entries[key]["class_word"] = word
        atomic_write(self.out / EMBEDDINGS, save({k: self.embeddings[k] for k in ok}))
        self._write_manifest()
        if (self.out / PENDING).is_dir():
            shutil.rmtree(self.out / PENDING)
        for name in (MANIFEST, EMBEDDINGS, SETTINGS):  # temporary files of writes a kill interrupted
            for tmp in self.out.glob(f".{name}.*.tmp"):
                tmp.unlink()
        keep = {self.out / self.entries[k][f] for k in ok for f in ("image", "mask")}
        for top in (IMAGES_DIR, MASKS_DIR):
            root = self.out / top
            if not root.is_dir():
                continue
            for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
                for name in filenames:
                    path = Path(dirpath) / name
                    if path not in keep:
                        path.unlink()
                if Path(dirpath) != root and not os.listdir(dirpath):
                    os.rmdir(dirpath)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for entry in self.entries.values():
            out[entry.get("status", "?")] = out.get(entry.get("status", "?"), 0) + 1
        return dict(sorted(out.items()))

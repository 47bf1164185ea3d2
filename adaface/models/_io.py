"""Loading helpers shared by the models: local folder or hub id, tokenizer discovery, atomic safe writes.

Checkpoints written by this package are safetensors + JSON, each written to a temporary file in the target
folder and moved into place with `os.replace`, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

PathLike = str | os.PathLike


def is_local(source: object) -> bool:
    return isinstance(source, (str, os.PathLike)) and Path(source).expanduser().exists()


def default_file_mode() -> int:
    """The mode `open()` gives a new file under this process's umask (0o666 & ~umask)."""
    try:  # Linux reports the umask without changing it (changing it is not thread-safe)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def publish(tmp: PathLike, path: PathLike) -> None:
    """Move a finished temporary file into place with the usual umask-governed mode (mkstemp makes it
    owner-only, and prepared folders and inverters are shared between users)."""
    os.chmod(tmp, default_file_mode())
    os.replace(tmp, path)


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_json(obj: Any, path: PathLike) -> None:
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True)))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: PathLike, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write(Path(path), lambda tmp: save_file(flat, tmp, metadata=metadata))


def load_tokenizer(source: object, *, candidates: Iterable[PathLike] = (), what: str = "tokenizer") -> Any:
    """A CLIP tokenizer from an instance, a tokenizer folder, a pipeline folder with `tokenizer/`, or a hub id.

    With `source=None` the first of `candidates` that holds a tokenizer is used.
    """
    from transformers import CLIPTokenizer, PreTrainedTokenizerBase

    if isinstance(source, PreTrainedTokenizerBase):
        return source
    if source is not None and not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{what} must be a tokenizer, a folder or a hub id, got {type(source).__name__}")
    looked = []
    paths = [source] if source is not None else list(candidates)
    for p in paths:
        p = Path(p).expanduser()
        for folder in (p, p / "tokenizer"):
            looked.append(str(folder))
            if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
                return CLIPTokenizer.from_pretrained(str(folder))
    if source is not None and not is_local(source):
        try:  # a hub id: the CLIP repos hold the tokenizer at the root, SD pipelines under tokenizer/
            return CLIPTokenizer.from_pretrained(str(source))
        except OSError:
            return CLIPTokenizer.from_pretrained(str(source), subfolder="tokenizer")
    raise FileNotFoundError(
        f"no CLIP tokenizer found for {what}; looked in: {', '.join(looked) or '(nowhere)'}. "
        f"Pass {what}= a tokenizer folder (vocab.json + merges.txt), an SD-1.5 pipeline folder, or a CLIPTokenizer"
    )


def load_clip_text_model(source: PathLike, *, subfolder: str | None = None, what: str = "text_encoder") -> Any:
    """A CLIPTextModel from a folder (or its `text_encoder/` subfolder) or a hub id, with safe loading only."""
    from transformers import CLIPTextModel

    if is_local(source):
        folder = Path(source).expanduser() / (subfolder or "")
        if not (folder / "config.json").is_file() and (folder / "text_encoder" / "config.json").is_file():
            folder = folder / "text_encoder"  # an SD-1.5 pipeline folder
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{what}: no CLIP text encoder in {folder} (expected config.json + model.safetensors or "
                "pytorch_model.bin, or a pipeline folder with text_encoder/)"
            )
        return CLIPTextModel.from_pretrained(str(folder), weights_only=True).eval()
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{what} must be a folder, a hub id or a CLIPTextModel, got {type(source).__name__}")
    kwargs = {"subfolder": subfolder} if subfolder else {}
    return CLIPTextModel.from_pretrained(str(source), weights_only=True, **kwargs).eval()

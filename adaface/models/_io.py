"""Loading helpers shared by the models: local folder or hub id, tokenizer discovery, atomic safe writes.

Checkpoints written by this package are safetensors + JSON, each written to a temporary file in the target
folder and moved into place with `os.replace`, so a crash never leaves a half-written file under the final name.

Files read from elsewhere are checked before use (`read_json`, `read_model_config`, `safetensors_elements`):
regular files within size and nesting limits, and model configs that cannot load code (`auto_map`) or a
hub kernel (an `attn_implementation` other than eager / sdpa; transformers fetches a kernel from the hub for
kernel names and, where flash-attn is not installed, for `flash_attention_*`). A refusal is an
`UnsafeFileError` naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .._files import create_temp_sibling

PathLike = str | os.PathLike
MAX_JSON_BYTES = 16 * 2**20  # config.json / settings.json / state files: ours are a few KB
MAX_JSON_DEPTH = 64  # nesting of a JSON file (configs nest 3 deep)
MAX_SAFETENSORS_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on its JSON header
FILE_ATTENTION = (None, "eager", "sdpa")  # attn_implementation values a config file may name


class UnsafeFileError(OSError):
    """A file refused before use: malformed, over a size limit, or able to load code or reach the network.

    An OSError, so the commands' loaders report it as a one-line error naming the option and the file.
    """


def first_line(e: BaseException) -> str:
    """An exception's message cut to one line (its type name when it has none), for one-line errors."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def json_depth(obj: Any) -> int:
    depth, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            depth = max(depth, d)
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return depth


def read_json(path: PathLike, *, what: str = "JSON file", max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file from a regular file within MAX_JSON_BYTES and MAX_JSON_DEPTH, or a one-line UnsafeFileError."""
    path = Path(path)
    if not path.is_file():
        raise UnsafeFileError(f"{what} {path}: not a regular file" if path.exists() else f"{what} {path}: not found")
    size = path.stat().st_size
    if size > max_bytes:
        raise UnsafeFileError(f"{what} {path}: {size:,} bytes, over the limit of {max_bytes:,}")
    try:
        obj = json.loads(path.read_bytes())
    except RecursionError:
        raise UnsafeFileError(f"{what} {path}: nested deeper than MAX_JSON_DEPTH = {MAX_JSON_DEPTH}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UnsafeFileError(f"{what} {path}: not valid JSON ({first_line(e)})") from None
    if json_depth(obj) > MAX_JSON_DEPTH:
        raise UnsafeFileError(f"{what} {path}: nested deeper than MAX_JSON_DEPTH = {MAX_JSON_DEPTH}")
    return obj


def check_model_config(cfg: Any, path: PathLike) -> dict:
    """`cfg` (a config.json's content) unless it would have transformers load code or a kernel from the hub."""
    if not isinstance(cfg, dict):
        raise UnsafeFileError(f"model config {path}: expected a JSON object, got {type(cfg).__name__}")
    stack = [cfg]
    while stack:
        d = stack.pop()
        if "auto_map" in d:
            raise UnsafeFileError(f"model config {path}: names auto_map (code to download and run); refused")
        for key in ("attn_implementation", "_attn_implementation"):
            if d.get(key) not in FILE_ATTENTION:
                raise UnsafeFileError(
                    f"model config {path}: {key} {d.get(key)!r} could load a kernel from the hub; a config file may "
                    "name only 'eager' or 'sdpa'")
        stack.extend(v for v in d.values() if isinstance(v, dict))
    return cfg


def read_model_config(path: PathLike) -> dict:
    """A model's config.json, read within the JSON limits and checked by `check_model_config`."""
    return check_model_config(read_json(path, what="model config"), path)


def check_model_folder(source: object) -> None:
    """Check every transformers/diffusers `config.json` of a local model or pipeline folder (a hub id is left to
    the loader); raises UnsafeFileError naming the first file that would load code or a hub kernel."""
    if not is_local(source):
        return
    root = Path(source).expanduser()
    for path in sorted([root / "config.json", *root.glob("*/config.json")]):
        if path.is_file():
            read_model_config(path)


def safetensors_elements(path: PathLike) -> int:
    """The number of tensor elements a safetensors file's header declares (header and offsets checked)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UnsafeFileError(f"weights {path}: not a regular file" if path.exists() else f"weights {path}: not found")
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or int.from_bytes(head, "little") > MAX_SAFETENSORS_HEADER_BYTES:
        raise UnsafeFileError(f"weights {path}: not a safetensors file (header length missing or over "
                              f"{MAX_SAFETENSORS_HEADER_BYTES:,} bytes)")
    try:
        total = 0
        with safe_open(str(path), framework="pt") as f:  # validates the header against the file's size
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
        return total
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on a malformed header
        raise UnsafeFileError(f"weights {path}: not a valid safetensors file ({first_line(e)})") from None


def is_local(source: object) -> bool:
    return isinstance(source, (str, os.PathLike)) and Path(source).expanduser().exists()


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp_sibling(path)
    mode = os.fstat(fd).st_mode & 0o777  # the umask's; safetensors' writer makes its files owner-only
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
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
        read_model_config(folder / "config.json")
        return CLIPTextModel.from_pretrained(str(folder), weights_only=True).eval()
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{what} must be a folder, a hub id or a CLIPTextModel, got {type(source).__name__}")
    kwargs = {"subfolder": subfolder} if subfolder else {}
    # A hub repo: its config.json alone is fetched and checked before the model is built from it.
    check_model_config(CLIPTextModel.config_class.get_config_dict(str(source), **kwargs)[0], f"{source}/config.json")
    return CLIPTextModel.from_pretrained(str(source), weights_only=True, **kwargs).eval()

"""Checks of the files and folders a command is given, before any model loads and before anything is written.

Each check raises `OptionError` with one line naming the option, the path and what is wrong: missing, unreadable
(permission), a damaged safetensors file (empty, truncated, not safetensors), invalid JSON (with its line), a
binary file where text is expected, an image that does not decode, or an output place that cannot be written.
Only headers are read: checking a multi-gigabyte model costs a few reads, not a load.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ._cli import OptionError

# A safetensors header is a JSON object; real ones are kilobytes. A larger length field means a damaged file.
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def _where(option: str, value: object) -> str:
    return f"{option} {value}" if option else str(value)


def os_error_line(e: OSError) -> str:
    """One line for an OSError met while reading or writing: the path and the system's reason."""
    if e.filename is None:  # a message that names its file already (UnsafeFileError) or no file at all
        return str(e)
    return f"{e.filename}: {e.strerror or e}"


def check_readable(path: Path, option: str, value: object, kind: str = "file") -> None:
    """`path` exists and this user may read it (a folder: list it). Unreadable is not reported as missing."""
    if not path.exists():
        raise OptionError(f"{_where(option, value)}: {kind} not found")
    if kind == "file" and path.is_dir():
        raise OptionError(f"{_where(option, value)}: is a folder, expected a file")
    want = os.R_OK | (os.X_OK if path.is_dir() else 0)
    if not os.access(path, want):
        raise OptionError(f"{_where(option, value)}: permission denied (this user cannot read the {kind})")
    try:
        if path.is_dir():
            os.listdir(path)
        else:
            with open(path, "rb"):
                pass
    except PermissionError as e:
        raise OptionError(f"{_where(option, value)}: permission denied (this user cannot read the {kind})") from e
    except OSError as e:
        raise OptionError(f"{_where(option, value)}: cannot read it ({e.strerror or e})") from e


def check_readable_tree(root: Path, option: str, value: object) -> None:
    """Every folder under `root` can be listed (os.walk would silently skip the others)."""
    check_readable(root, option, value, "folder")

    def fail(e: OSError) -> None:
        raise OptionError(f"{_where(option, value)}: cannot read {e.filename} ({e.strerror or e})") from e

    for _ in os.walk(root, onerror=fail):
        pass


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file, from its header and size; None if it looks whole."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if size == 0:
                return "empty file (0 bytes), not a safetensors file"
            if len(head) < 8:
                return f"truncated ({size} bytes): not a safetensors file"
            (n,) = struct.unpack("<Q", head)
            if n > MAX_SAFETENSORS_HEADER or n > size - 8:
                return (f"not a safetensors file or truncated (its header claims {n} bytes; the file has {size})")
            raw = f.read(n)
    except PermissionError:
        return "permission denied (this user cannot read the file)"
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return "damaged: its safetensors header is not valid JSON"
    if not isinstance(header, dict):
        return "damaged: its safetensors header is not a JSON object"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"damaged: tensor {name!r} has no valid data_offsets"
        end = max(end, offsets[1])
    data = size - 8 - n
    if end > data:
        return f"truncated: its tensors need {end} bytes of data, the file holds {data}"
    if end < data:
        return f"damaged: {data - end} bytes after the last tensor"
    return None


def torch_file_problem(path: Path) -> str | None:
    """What is wrong with a torch.save file (`pytorch_model.bin`): empty, or a zip archive without its directory
    (truncated). Files of torch's older plain-pickle format are left to the (weights-only) loader."""
    import zipfile

    size = path.stat().st_size
    if size == 0:
        return "empty file (0 bytes), not a torch weights file"
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path):
                return None
        except (zipfile.BadZipFile, OSError) as e:
            return f"damaged or truncated torch weights archive ({e})"
    if head.startswith(b"\x80"):  # the legacy format is a pickle stream
        return None
    return "not a torch weights file (neither a torch zip archive nor a pickle stream)"


def check_safetensors(path: Path, option: str, value: object) -> None:
    check_readable(path, option, value)
    problem = safetensors_problem(path)
    if problem:
        raise OptionError(f"{_where(option, value)}: {problem}")


def read_json_file(path: Path, option: str, value: object) -> Any:
    """The parsed JSON of `path`; an error names the line and column of invalid JSON."""
    from .models._io import MAX_JSON_BYTES, MAX_JSON_DEPTH, json_depth

    check_readable(path, option, value)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise OptionError(f"{_where(option, value)}: {size:,} bytes, over the JSON limit of {MAX_JSON_BYTES:,}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise OptionError(f"{_where(option, value)}: not a JSON text file (undecodable byte at {e.start})") from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise OptionError(f"{_where(option, value)}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    except RecursionError:
        obj = None  # deeper than the parser goes: deeper than the limit too
        depth = MAX_JSON_DEPTH + 1
    else:
        depth = json_depth(obj)
    if depth > MAX_JSON_DEPTH:
        raise OptionError(f"{_where(option, value)}: JSON nested deeper than MAX_JSON_DEPTH = {MAX_JSON_DEPTH}")
    return obj


def read_text_file(path: Path, option: str, value: object) -> str:
    """A UTF-8 text file's content; binary files are refused by name."""
    check_readable(path, option, value)
    data = path.read_bytes()
    if b"\0" in data:
        raise OptionError(f"{_where(option, value)}: a binary file (NUL bytes), expected UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OptionError(f"{_where(option, value)}: not UTF-8 text (undecodable byte at offset {e.start})") from e


def check_model_files(folder: Path, option: str, value: object, skip: Iterable[str] = ()) -> None:
    """Every safetensors and JSON file in a local model folder and its component subfolders is whole."""
    skip = set(skip)
    check_readable(folder, option, value, "folder")
    candidates = []
    for entry in sorted(folder.iterdir()):
        if entry.name in skip or entry.name.startswith("."):
            continue
        if entry.is_dir():
            check_readable(entry, option, f"{value} ({entry.name}/)", "folder")
            candidates += [f for f in sorted(entry.iterdir()) if f.is_file() and not f.name.startswith(".")]
        elif entry.is_file():
            candidates.append(entry)
    for f in candidates:
        rel = f.relative_to(folder).as_posix()
        if f.suffix == ".safetensors":
            check_safetensors(f, option, f"{value}: {rel}")
        elif f.suffix == ".bin":
            check_readable(f, option, f"{value}: {rel}")
            problem = torch_file_problem(f)
            if problem:
                raise OptionError(f"{option} {value}: {rel}: {problem}")
        elif f.suffix == ".json":
            data = read_json_file(f, option, f"{value}: {rel}")
            if f.name.endswith("config.json") and not isinstance(data, dict):
                raise OptionError(f"{option} {value}: {rel} is not a JSON object")


def check_image(path: Path, option: str, value: object) -> None:
    """The file decodes as an image (PIL reads the whole file, so a truncated PNG is caught too)."""
    from PIL import Image

    check_readable(path, option, value)
    try:
        with Image.open(path) as im:
            im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise OptionError(f"{_where(option, value)}: not a readable image ({reason})") from e


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and not path.is_symlink():
        path = path.parent
    return path


def check_writable_dir(value: str, option: str) -> Path:
    """An output folder that exists or can be created, and that this user may write into."""
    if not value or not value.strip():
        raise OptionError(f"{option}: an empty path is not an output folder (name a folder)")
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise OptionError(f"{option} {value}: exists and is not a folder")
    anchor = _existing_ancestor(path)
    if not anchor.is_dir():
        raise OptionError(f"{option} {value}: cannot be created, {anchor} is a file, not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise OptionError(f"{option} {value}: permission denied (this user cannot write into {anchor})")
    return path


def check_writable_file(value: str, option: str) -> Path:
    """An output file whose folder exists or can be created and is writable; the file itself no folder."""
    if not value or not value.strip():
        raise OptionError(f"{option}: an empty path is not an output file (name a file)")
    path = Path(value).expanduser()
    if path.is_dir():
        raise OptionError(f"{option} {value}: is a folder, expected a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise OptionError(f"{option} {value}: permission denied (this user cannot overwrite the file)")
    anchor = _existing_ancestor(path.parent)
    if not anchor.is_dir():
        raise OptionError(f"{option} {value}: cannot be created, {anchor} is a file, not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise OptionError(f"{option} {value}: permission denied (this user cannot write into {anchor})")
    return path

"""Shared pieces of the command-line tools: option errors, model sources, device and dtype.

Every check here runs before any model is loaded, so a typo in a path costs a second, not a model load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

# owner/name as the Hugging Face hub spells repo ids; anything else that does not exist is a missing folder.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one worth reading (not None, False or an empty string)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, "") or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


class OptionError(ValueError):
    """A bad command-line option; the message starts with the option's name."""


def check_source(value: str, option: str, required: Iterable[str] = (), what: str = "a model folder") -> str:
    """A local folder holding `required` files, or something shaped like a hub id (checked when loaded)."""
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            raise OptionError(f"{option} {value}: expected {what}, got a file")
        missing = [r for r in required if not (path / r).exists()]
        if missing:
            raise OptionError(f"{option} {value}: not {what}; missing {', '.join(missing)}")
        return str(path)
    if _HUB_ID.match(value) and not value.startswith((".", "~")):
        return value
    raise OptionError(f"{option} {value}: folder not found (and it is not a hub id like owner/name)")


def check_file(value: str, option: str, suffixes: Iterable[str] = ()) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise OptionError(f"{option} {value}: file not found")
    suffixes = tuple(suffixes)
    if suffixes and path.suffix.lower() not in suffixes:
        raise OptionError(f"{option} {value}: expected a {' or '.join(suffixes)} file")
    return path


@contextlib.contextmanager
def loading(option: str, value: object) -> Iterator[None]:
    """Turn a loader's OSError (missing file, unreachable hub id) into an error naming the option."""
    try:
        yield
    except OSError as e:
        raise OptionError(f"{option} {value}: could not load it ({type(e).__name__}: {e})") from e


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise OptionError(f"--device {name}: not a torch device ({e})") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise OptionError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: float16 on CUDA (what SD-1.5 is run in), float32 elsewhere (half is slow or missing on CPUs)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def save_strict_json(obj: Any, path: Path) -> None:
    """Write `obj` atomically as strict JSON: a NaN or infinity is a bug upstream, never written as `NaN`."""
    from .models._io import atomic_save_json

    try:
        json.dumps(obj, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"{path.name}: refusing to write a non-finite number ({e})") from e
    atomic_save_json(obj, path)


def model_type(source: str, option: str) -> str | None:
    """`model_type` from a model's config.json: read from a local folder, or the hub repo's checked snapshot of
    configs."""
    from .models._io import check_model_source, read_model_config

    path = Path(source) / "config.json"
    if not path.is_file():
        with loading(option, source):
            path = check_model_source(source)[0] / "config.json"
    try:  # within the JSON limits, and refused if it would load code or a kernel from the hub
        return read_model_config(path).get("model_type")
    except OSError as e:
        raise OptionError(f"{option} {source}: config.json is not a usable model config ({e})") from e

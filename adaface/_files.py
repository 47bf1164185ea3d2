"""A temporary sibling file for atomic writes, created with the modes a plain `open(path, "w")` would give.

`tempfile.mkstemp` creates its file readable by the owner only (0o600), and `os.replace` keeps that mode under
the final name; here the file is created with 0o666 filtered by the process umask, like any other output.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def create_temp_sibling(path: Path) -> tuple[int, str]:
    """(fd open for writing, name) of a new file `.NAME.XXXXXXXX.tmp` next to `path`."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue

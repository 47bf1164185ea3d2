"""Load a script of the repository (bench/*.py, tests/triton_compile_check.py) as a module, by its path."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType


def load_script(path: str | os.PathLike, name: str | None = None) -> ModuleType:
    """The module of the script at `path` (executed once per process: later calls return the same module).
    It is registered in `sys.modules` under `name` (default: the file's stem), which dataclasses and pickling
    of its objects need."""
    path = Path(path)
    name = name or path.stem
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module

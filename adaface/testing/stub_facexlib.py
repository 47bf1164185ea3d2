"""A stand-in `facexlib` for tests of the parser path: facexlib is optional and its BiSeNet weights cannot be had, so
tests install empty `facexlib`, `facexlib.parsing` and `facexlib.parsing.bisenet` modules whose `BiSeNet` is a
small net of the test's choosing."""

from __future__ import annotations

import importlib.machinery
import sys
import types
from typing import Any

FACEXLIB_MODULES = ("facexlib", "facexlib.parsing", "facexlib.parsing.bisenet")


def install_stub_facexlib(monkeypatch: Any, bisenet: type) -> None:
    """Put the stand-in modules into sys.modules (undone by `monkeypatch`), with `bisenet` as their BiSeNet."""
    for name in FACEXLIB_MODULES:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["facexlib.parsing.bisenet"].BiSeNet = bisenet

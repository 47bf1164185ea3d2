"""What the tests of a command-line tool check in a fresh interpreter: that importing its module loads none of the
heavy libraries (they load when a command runs), and that its --help lists every option with a help text."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

# the folder that holds the adaface package: run from there, a fresh interpreter imports this very copy of it
PACKAGE_PARENT = Path(__file__).resolve().parents[2]


def fresh_python(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python *args` in a new process (no PYTHONPATH, run from PACKAGE_PARENT), its output captured as text."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=PACKAGE_PARENT,
                          timeout=timeout)


def assert_imports_light(modules: Iterable[str], heavy: Iterable[str]) -> None:
    """Importing `modules` in a fresh interpreter leaves every one of `heavy` unimported."""
    res = fresh_python("-c", f"import sys, {', '.join(modules)}\n"
                             f"print(','.join(m for m in {tuple(heavy)!r} if m in sys.modules))")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"imported on import: {res.stdout.strip()}"


def assert_help_lists_every_option(module: str, parser: argparse.ArgumentParser) -> None:
    """`python -m module --help` succeeds and names every flag of `parser`, each of whose arguments has help."""
    res = fresh_python("-m", module, "--help")
    assert res.returncode == 0, res.stderr
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in res.stdout, flag
        assert action.help, f"{action.option_strings or action.dest} has no help text"

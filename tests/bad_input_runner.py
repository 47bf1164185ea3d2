"""Runs many bad-input cases of the command-line tools in one process (`tests/test_bad_input.py` starts it).

    python tests/bad_input_runner.py CASES.json RESULTS.json

Each case is {"id", "command", "argv", "watch"}: the command's `main(argv)` is called as `python -m ...` or the
script would call it (from the repository root), with its stdout and stderr captured; `watch` is a folder whose
whole tree (names, kinds, bytes, modes) is recorded before and after the case. One process per command keeps a
suite of a hundred cases to one interpreter start and one torch import per command.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def entry_point(command: str) -> Callable[[list[str]], object]:
    """The function a user's command line runs, for each command of the suite."""
    if command in ("stage1", "stage2", "memory_estimate"):
        from adaface.testing.scripts import load_script

        script = {"stage1": "training/stage1.py", "stage2": "training/stage2.py",
                  "memory_estimate": "bench/memory_estimate.py"}[command]
        module = load_script(ROOT / script)
        if command == "memory_estimate":
            return module.main
        return lambda argv: module.main(argv, default_config=module.DEFAULT_CONFIG)
    import importlib

    return importlib.import_module(f"adaface.{command}").main


def snapshot(folder: str | None) -> dict[str, str]:
    """Relative path → kind, mode and content hash of everything under `folder` ({} if it does not exist)."""
    if folder is None or not os.path.lexists(folder):
        return {}
    tree = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, folder)
            st = os.lstat(path)
            if os.path.islink(path):
                tree[rel] = f"link {os.readlink(path)}"
            elif os.path.isdir(path):
                tree[rel] = f"dir {st.st_mode:o}"
            else:
                try:
                    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                except PermissionError:
                    digest = f"unreadable {st.st_size} {st.st_mtime_ns}"
                tree[rel] = f"file {st.st_mode:o} {digest}"
    return tree


def run_case(main: Callable[[list[str]], object], case: dict) -> dict:
    before = snapshot(case.get("watch"))
    out, err = io.StringIO(), io.StringIO()
    code: object = None
    escaped = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(case["argv"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) or e.code is None else 1
        except BaseException:  # what a user would see as a traceback
            escaped = traceback.format_exc()
    after = snapshot(case.get("watch"))
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return {"id": case["id"], "code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
            "traceback": escaped, "changed": changed}


def main() -> int:
    cases = json.loads(Path(sys.argv[1]).read_text())
    results = []
    mains: dict[str, Callable] = {}
    for case in cases:
        if case["command"] not in mains:
            mains[case["command"]] = entry_point(case["command"])
        results.append(run_case(mains[case["command"]], case))
    Path(sys.argv[2]).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

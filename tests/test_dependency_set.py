"""The tested dependency set: constraints.txt pins releases inside pyproject.toml's ranges, the README's install
command and CI use it, and the torch floor excludes releases whose weights_only loader is known to be unsafe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs.extend(Requirement(r) for r in extra)
    return reqs


def test_every_pin_lies_inside_the_declared_range():
    pins = _pins()
    for req in _requirements():
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        if name in pins:
            assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {req}"


def test_every_direct_dependency_is_pinned():
    pins = _pins()
    active = [r for r in _requirements() if r.marker is None or r.marker.evaluate()]
    missing = {r.name for r in active if canonicalize_name(r.name) not in pins}
    # xformers and facexlib are optional extras the tested set does not install.
    assert missing <= {"xformers", "facexlib"}, missing


def test_torch_floor_excludes_known_unsafe_weights_only_loaders():
    (torch_req,) = [r for r in _requirements() if r.name == "torch"]
    # CVE-2025-32434 (fixed in 2.6) and CVE-2026-24747 (fixed in 2.10) concern torch.load(weights_only=True).
    assert not any(torch_req.specifier.contains(v) for v in ("2.4.1", "2.5.1", "2.6.0", "2.9.1"))
    assert torch_req.specifier.contains("2.10.0")


def test_readme_install_and_ci_use_the_constraints():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme[readme.index("## Quick start"):readme.index("### The whole pipeline")]
    install_lines = [ln for ln in quick_start.splitlines() if "pip install" in ln]
    assert install_lines and all(ln.count("-c constraints.txt") == ln.count("pip install") for ln in install_lines)
    ci = (ROOT / ".ci" / "run").read_text()
    assert len(re.findall(r"^[^#\n]*pip install[^\n]*-c constraints\.txt", ci, re.M)) == 2

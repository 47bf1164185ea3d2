"""Files written atomically (settings.json, eval_report.json, textual-inversion files, a prepared folder) get
the modes the umask gives any other output, not a temporary file's owner-only 0o600."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from adaface.faces.prepared_folder import atomic_write
from adaface.models._io import atomic_save_json, atomic_save_safetensors


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_follow_the_umask(tmp_path, umask):
    atomic_save_json({"a": 1}, tmp_path / "settings.json")
    atomic_save_safetensors({"z": torch.zeros(2)}, tmp_path / "embeds.safetensors")
    atomic_write(tmp_path / "manifest.jsonl", b"{}\n")
    for name in ("settings.json", "embeds.safetensors", "manifest.jsonl"):
        assert _mode(tmp_path / name) == 0o644, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embeds.safetensors", "manifest.jsonl", "settings.json"]


def test_a_tighter_umask_is_respected(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_save_json({"a": 1}, tmp_path / "settings.json")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "settings.json") == 0o600

"""`prepare_data` when a write fails (a full disk): one line naming the file and the reason, exit status 2."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from PIL import Image

from adaface import prepare_data
from adaface.faces import prepared_folder
from adaface.testing.tiny_models import save_tiny_antelopev2


def test_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    root = tmp_path / "insightface"
    save_tiny_antelopev2(root)
    photos = tmp_path / "photos"
    photos.mkdir()
    img = np.zeros((200, 200, 3), np.uint8)
    img[50:150, 60:160] = (230, 200, 180)
    Image.fromarray(img).save(photos / "face.png")

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(prepared_folder, "atomic_write", full)
    with pytest.raises(SystemExit) as e:
        prepare_data.main([str(photos), "--out", str(tmp_path / "out"), "--face-root", str(root), "--workers", "1"])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "prepare_settings.json" in last and "No space left on device" in last

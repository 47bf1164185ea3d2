"""`generate` failing after its checks passed: nothing is written before the models have loaded, and a run that
fails before its first output is complete removes what it wrote, so a rerun is never blocked by a leftover."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch

from adaface import generate
from adaface.testing.tiny_models import save_tiny_arc2face, tiny_text_encoder

RUN = ["--random-id", "3", "--num-images", "1", "--steps", "1", "--height", "16", "--width", "16", "--seed", "0"]


@pytest.fixture(scope="module")
def model_argv(tmp_path_factory, tiny_sd15_dir) -> list[str]:
    from adaface.models.prompt_inverter import PromptInverter

    root = tmp_path_factory.mktemp("models")
    PromptInverter(tiny_text_encoder(seed=2), tokenizer=tiny_sd15_dir / "tokenizer").save_pretrained(
        root / "inverter")
    return ["--base", str(tiny_sd15_dir), "--arc2face", str(save_tiny_arc2face(root / "arc2face")),
            "--inverter", str(root / "inverter")]


def test_interrupt_while_loading_leaves_nothing(model_argv, tmp_path, monkeypatch):
    """Ctrl-C while the pipeline loads: --out is not created, and a rerun into it then succeeds."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(generate, "load_pipeline", interrupted)
        with pytest.raises(KeyboardInterrupt):
            generate.main([*model_argv, *RUN, "--out", str(out), "--save-embeddings", str(tmp_path / "s.safetensors")])
    assert not out.exists()
    assert not (tmp_path / "s.safetensors").exists()
    assert generate.main([*model_argv, *RUN, "--out", str(out)]) == 0
    assert (out / "p00_000.png").is_file()


def test_failure_before_the_first_output_removes_the_run(model_argv, tmp_path, monkeypatch):
    """The pipeline fails on its first image (e.g. out of memory): settings.json, subject_arcface.npy and the
    textual-inversion file this run wrote are removed again, and so is the folder it created."""
    def failing(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    out = tmp_path / "run"
    monkeypatch.setattr(generate, "run_pipeline", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        generate.main([*model_argv, *RUN, "--out", str(out), "--save-embeddings", str(tmp_path / "s.safetensors")])
    assert not out.exists()
    assert not (tmp_path / "s.safetensors").exists()


def test_full_disk_is_one_line_naming_the_file(model_argv, tmp_path, monkeypatch, capsys):
    """ENOSPC while writing: exit status 2, one line naming the file and the reason, nothing left behind."""
    out = tmp_path / "run"
    out.mkdir()

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(np, "save", full)
    with pytest.raises(SystemExit) as e:
        generate.main([*model_argv, *RUN, "--out", str(out)])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "subject_arcface.npy" in last and "No space left on device" in last
    assert list(out.iterdir()) == []  # the folder existed before (empty): it stays, empty


def test_written_files_follow_the_umask(model_argv, tmp_path):
    """Files a run writes get 0o666 & ~umask (atomic writes go through mkstemp, which makes them owner-only)."""
    old = os.umask(0o002)
    try:
        assert generate.main([*model_argv, *RUN, "--out", str(tmp_path / "run")]) == 0
    finally:
        os.umask(old)
    for name in ("settings.json", "subject_arcface.npy", "p00_000.png"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o664, name


def test_atomic_writes_follow_the_umask(tmp_path):
    from adaface.faces.prepared_folder import atomic_write
    from adaface.models._io import atomic_save_json, atomic_save_safetensors

    for mask in (0o022, 0o077, 0o002):
        old = os.umask(mask)
        try:
            atomic_save_json({"a": 1}, tmp_path / f"{mask:o}.json")
            atomic_save_safetensors({"x": torch.ones(2)}, tmp_path / f"{mask:o}.safetensors")
            atomic_write(tmp_path / f"{mask:o}.bin", b"data")
        finally:
            os.umask(old)
        for suffix in ("json", "safetensors", "bin"):
            assert (tmp_path / f"{mask:o}.{suffix}").stat().st_mode & 0o777 == 0o666 & ~mask, (suffix, oct(mask))

"""Stage-1 configuration: --help, precedence (defaults < config file < CLI), and start-up validation that
names the option and fails before any model is loaded."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from adaface.training.config import EMBEDDINGS_FILE, ConfigError, Stage1Config, build_parser, parse_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "training" / "configs" / "tiny.json")
PAPER = str(ROOT / "training" / "configs" / "paper.json")


def load_stage1():
    if "adaface_stage1_script" in sys.modules:
        return sys.modules["adaface_stage1_script"]
    spec = importlib.util.spec_from_file_location("adaface_stage1_script", ROOT / "training" / "stage1.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_help_documents_every_option():
    text = build_parser(TINY).format_help()
    for f in fields(Stage1Config):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "--config" in text and "--resume" in text


def test_precedence_defaults_file_cli(tmp_path):
    cfg = parse_config([], default_config=TINY)
    assert cfg.tiny and cfg.resolution == 16 and cfg.steps == json.loads(Path(TINY).read_text())["steps"]
    assert cfg.t_max == Stage1Config().t_max  # not in the file: the dataclass default
    cfg = parse_config(["--steps", "7", "--expand-at", "2", "--expand-at", "4", "--denoise-steps", "1,2",
                        "--denoise-step-weights", "0.5,0.5", "--no-deterministic", "--resume"], default_config=TINY)
    assert cfg.steps == 7 and cfg.expand_at == [2, 4] and cfg.denoise_steps == [1, 2] and not cfg.deterministic
    assert cfg.resume == "latest"
    paper = json.loads(Path(PAPER).read_text())
    assert paper["d_coef"] == 2.0 and paper["batch_size"] == 4 and paper["grad_accum"] == 2


def test_config_files_hold_known_options_only():
    known = {f.name for f in fields(Stage1Config)}
    for path in (TINY, PAPER):
        assert set(json.loads(Path(path).read_text())) <= known


def _fake_models(tmp_path):
    sd = tmp_path / "sd"
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        (sd / sub).mkdir(parents=True)
    a2f = tmp_path / "a2f"
    for sub in ("arc2face", "encoder"):
        (a2f / sub).mkdir(parents=True)
    return ["--no-tiny", "--sd-model", str(sd), "--arc2face", str(a2f)]


@pytest.mark.parametrize(
    "argv_fn, option",
    [
        (lambda t: ["--no-tiny", "--sd-model", str(t / "missing"), "--arc2face", "x/y"], "--sd-model"),
        (lambda t: _fake_models(t)[:3] + ["--arc2face", str(t / "nope")], "--arc2face"),
        (lambda t: ["--no-tiny", "--arc2face", "x/y"], "--sd-model"),
        (lambda t: ["--sd-model", "x/y"], "--sd-model"),  # tiny preset plus a real model: ambiguous
        (lambda t: _fake_models(t) + ["--data-dir", str(t / "nodata")], "--data-dir"),
        (lambda t: _fake_models(t) + ["--data-dir", str(t)], "--data-dir"),  # no arcface.safetensors
        (lambda t: ["--batch-size", "0"], "--batch-size"),
        (lambda t: ["--grad-accum", "0"], "--grad-accum"),
        (lambda t: ["--expansions", "4:everything"], "--expansions"),
        (lambda t: ["--expand-at", "100000"], "--expand-at"),
        (lambda t: ["--denoise-steps", "1,3", "--denoise-step-weights", "1"], "--denoise-step-weights"),
        (lambda t: ["--t-min", "900", "--t-max", "100"], "--t-min"),
        (lambda t: ["--resume", str(t / "nockpt")], "--resume"),
        (lambda t: ["--device", "tpu"], "--device"),
    ],
)
def test_bad_config_names_the_option(tmp_path, argv_fn, option):
    with pytest.raises(ConfigError, match=option):
        parse_config(argv_fn(tmp_path), default_config=TINY)


def test_batch_larger_than_real_data_is_rejected(tmp_path):
    import torch
    from safetensors.torch import save_file

    data = tmp_path / "faces"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.png").write_bytes(b"")
    save_file({f"{i}.png": torch.randn(512) for i in range(3)}, str(data / EMBEDDINGS_FILE))
    base = _fake_models(tmp_path) + ["--data-dir", str(data)]
    parse_config(base + ["--batch-size", "3", "--random-id-fraction", "0"], default_config=TINY)  # fits
    with pytest.raises(ConfigError, match="--batch-size"):
        parse_config(base + ["--batch-size", "4", "--random-id-fraction", "0"], default_config=TINY)
    with pytest.raises(ConfigError, match="--batch-size"):
        parse_config(base + ["--batch-size", "2", "--random-id-fraction", "0"], default_config=TINY, world_size=2)


def test_existing_checkpoints_need_resume_or_overwrite(tmp_path):
    (tmp_path / "checkpoints" / "step-00000004").mkdir(parents=True)
    argv = ["--output-dir", str(tmp_path), "--no-overwrite"]
    with pytest.raises(ConfigError, match="--output-dir"):
        parse_config(argv, default_config=TINY)
    assert parse_config(argv + ["--resume"], default_config=TINY).resume == "latest"
    assert parse_config(argv + ["--overwrite"], default_config=TINY).overwrite


def test_main_fails_fast_before_loading_models(tmp_path, monkeypatch, capsys):
    stage1 = load_stage1()

    def boom(*a, **k):
        raise AssertionError("a model was loaded despite a bad configuration")

    monkeypatch.setattr(stage1, "load_models", boom)
    monkeypatch.setattr(stage1, "build_tiny_models", boom)
    rc = stage1.main(["--no-tiny", "--sd-model", str(tmp_path / "missing"), "--arc2face", "a/b"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--sd-model" in err and "missing" in err


def test_help_exits_cleanly(capsys):
    stage1 = load_stage1()
    with pytest.raises(SystemExit) as exc:
        stage1.main(["--help"])
    assert exc.value.code == 0
    assert "--plateau-patience" in capsys.readouterr().out

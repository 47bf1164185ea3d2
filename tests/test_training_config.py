"""Stage-1 configuration: --help, precedence (defaults < config file < CLI), and start-up validation that
names the option and fails before any model is loaded."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from adaface.training.engine.config import EMBEDDINGS_FILE, ConfigError, Stage1Config, build_parser, parse_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "training" / "configs" / "tiny.json")
PAPER = str(ROOT / "training" / "configs" / "paper.json")


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
    from adaface.training.method import stage1

    def boom(*a, **k):
        raise AssertionError("a model was loaded despite a bad configuration")

    monkeypatch.setattr(stage1, "load_models", boom)
    monkeypatch.setattr(stage1, "build_tiny_models", boom)
    rc = stage1.main(["--no-tiny", "--sd-model", str(tmp_path / "missing"), "--arc2face", "a/b"], default_config=TINY)
    assert rc == 2
    err = capsys.readouterr().err
    assert "--sd-model" in err and "missing" in err


def test_help_exits_cleanly(capsys):
    from adaface.training.method import stage1

    with pytest.raises(SystemExit) as exc:
        stage1.main(["--help"], default_config=TINY)
    assert exc.value.code == 0
    assert "--plateau-patience" in capsys.readouterr().out


def _write_config(path: Path, **values) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(values))


def _models_with_configs(tmp_path, sd_hidden=32, a2f_hidden=32, sd_cross=32, a2f_cross=32):
    argv = _fake_models(tmp_path)
    sd, a2f = tmp_path / "sd", tmp_path / "a2f"
    _write_config(sd / "text_encoder", hidden_size=sd_hidden)
    _write_config(sd / "unet", cross_attention_dim=sd_cross)
    _write_config(a2f / "encoder", hidden_size=a2f_hidden)
    _write_config(a2f / "arc2face", cross_attention_dim=a2f_cross)
    return argv


def test_inverter_init_accepts_a_pipeline_folder_or_a_text_encoder_folder(tmp_path):
    argv = _models_with_configs(tmp_path)
    pipeline = tmp_path / "sd15_pipeline"
    _write_config(pipeline / "text_encoder", hidden_size=32)
    assert parse_config(argv + ["--inverter-init", str(pipeline)], default_config=TINY).inverter_init == str(pipeline)
    encoder = tmp_path / "clip_text"
    _write_config(encoder, hidden_size=32)
    parse_config(argv + ["--inverter-init", str(encoder)], default_config=TINY)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="--inverter-init.*lacks config.json"):
        parse_config(argv + ["--inverter-init", str(tmp_path / "empty")], default_config=TINY)


def test_inverter_init_pipeline_folder_loads(tiny_sd15_dir, tmp_path):
    """What the validation accepts, the loader loads: a real SD-1.5 pipeline folder as --inverter-init."""
    from adaface.models.prompt_inverter import PromptInverter

    a2f = tmp_path / "a2f"
    for src, dst in (("unet", "arc2face"), ("text_encoder", "encoder")):
        (a2f / dst).mkdir(parents=True)
        (a2f / dst / "config.json").write_text((Path(tiny_sd15_dir) / src / "config.json").read_text())
    cfg = parse_config(["--no-tiny", "--sd-model", str(tiny_sd15_dir), "--arc2face", str(a2f),
                        "--inverter-init", str(tiny_sd15_dir)], default_config=TINY)
    inv = PromptInverter(cfg.inverter_init)
    assert inv.multipliers == [1] * len(inv.multipliers)


@pytest.mark.parametrize(
    "kw, extra, option",
    [
        ({"a2f_hidden": 48}, None, "--arc2face"),
        ({}, 48, "--inverter-init"),
        ({"sd_cross": 48}, None, "--sd-model: the UNet's cross_attention_dim"),
        ({"a2f_cross": 48}, None, "--arc2face: the UNet's cross_attention_dim"),
    ],
)
def test_model_dimensions_must_agree(tmp_path, kw, extra, option):
    argv = _models_with_configs(tmp_path, **kw)
    if extra is not None:
        pipeline = tmp_path / "inv"
        _write_config(pipeline / "text_encoder", hidden_size=extra)
        argv += ["--inverter-init", str(pipeline)]
    with pytest.raises(ConfigError) as exc:
        parse_config(argv, default_config=TINY)
    msg = str(exc.value)
    assert option in msg
    if "cross_attention_dim" not in option:  # the hidden-size message names all three options and both sizes
        assert all(o in msg for o in ("--sd-model", "--arc2face", "--inverter-init")) and "48" in msg and "32" in msg


def test_model_dimensions_agree_including_clip_config_and_list_dims(tmp_path):
    argv = _models_with_configs(tmp_path)
    _write_config(tmp_path / "sd" / "unet", cross_attention_dim=[32, 32, 32])
    clip = tmp_path / "clip"  # a full CLIPConfig: the text hidden size is under text_config
    _write_config(clip, text_config={"hidden_size": 32}, vision_config={"hidden_size": 64})
    parse_config(argv + ["--inverter-init", str(clip)], default_config=TINY)
    _write_config(clip, text_config={"hidden_size": 40})
    with pytest.raises(ConfigError, match="--inverter-init"):
        parse_config(argv + ["--inverter-init", str(clip)], default_config=TINY)


@pytest.mark.parametrize("value, word", [(3.7, "an integer"), ("ten", "an integer"), (None, "an integer"),
                                         (True, "an integer")])
def test_config_file_values_are_type_checked(tmp_path, value, word):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"steps": value}))
    with pytest.raises(ConfigError, match=rf"--steps must be {word}, got .* \(in {path}\)"):
        parse_config(["--config", str(path)], default_config=TINY)


def test_config_lists_and_floats_are_type_checked(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"denoise_steps": [1, "3"]}))
    with pytest.raises(ConfigError, match="--denoise-steps must be a list of integers"):
        parse_config(["--config", str(path)], default_config=TINY)
    with pytest.raises(ConfigError, match="--d-coef must be a finite number, got NaN"):
        parse_config(["--d-coef", "nan"], default_config=TINY)


def test_output_dir_must_be_a_writable_folder(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="--output-dir: .*file exists and is not a folder"):
        parse_config(["--output-dir", str(tmp_path / "file")], default_config=TINY)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    import os

    # a read-only folder (for root, who may write anywhere, a folder of the read-only /proc file system)
    target = ro / "run" if not os.access(ro, os.W_OK) else Path("/proc/adaface-run")
    try:
        with pytest.raises(ConfigError, match="--output-dir: .* is not writable"):
            parse_config(["--output-dir", str(target)], default_config=TINY)
    finally:
        ro.chmod(0o700)


def test_a_config_error_leaves_no_output_folder(tmp_path):
    target = tmp_path / "new" / "run"
    with pytest.raises(ConfigError, match="--random-id-fraction"):  # checked after --output-dir
        parse_config(["--output-dir", str(target), "--random-id-fraction", "2"], default_config=TINY)
    assert not (tmp_path / "new").exists()


def test_cuda_without_a_gpu_is_a_config_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ConfigError, match="--device: cuda requested but no CUDA device"):
        parse_config(["--device", "cuda", "--output-dir", str(tmp_path)], default_config=TINY)


def test_hub_id_lookalike_fails_fast_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    argv = ["--no-tiny", "--sd-model", "mymodels/sd15", "--arc2face", "x/y", "--output-dir", str(tmp_path / "out")]
    with pytest.raises(ConfigError, match=r"--sd-model: model folder not found: mymodels/sd15 \(as a hub id: not "
                                          r"in the local cache, and HF_HUB_OFFLINE is set\)"):
        parse_config(argv, default_config=TINY)


def test_output_dir_empty_or_current_is_refused_and_validation_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value in ("", " ", ".", str(tmp_path)):
        with pytest.raises(ConfigError, match="--output-dir"):
            parse_config(["--output-dir", value], default_config=TINY)
    target = tmp_path / "a" / "b" / "run"
    cfg = parse_config(["--output-dir", str(target)], default_config=TINY)
    assert cfg.output_dir == str(target) and not (tmp_path / "a").exists()
    assert list(tmp_path.iterdir()) == []

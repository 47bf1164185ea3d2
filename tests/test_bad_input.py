"""Bad input, tried as a user would, on every command: a one-line error naming the option or file, and no trace.

Each case runs a command from the repository root (`tests/bad_input_runner.py` calls the command's `main(argv)`,
one process per command) and must: exit non-zero (2), print no traceback, end stderr with a line naming the
option or file (the case's pattern), and leave the watched folder byte-for-byte as it was (a snapshot of the whole
tree: names, kinds, modes, contents). Every case fails before any model loads. Permission cases run as the
unprivileged user `nobody` when the tests run as root (root reads and writes everything).

Models and data are tiny random stand-ins in the real layouts, written to a world-readable temporary folder so the
unprivileged runs can read them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tests" / "bad_input_runner.py"
COMMANDS = ("generate", "evaluate", "prepare_data", "convert_released", "stage1", "stage2", "plot",
            "memory_estimate")

# --------------------------------------------------------------------------------------------------------------
# the world: tiny models, damaged copies, inputs, and one work folder per command (the watched tree)
# --------------------------------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: (len(data) // 2 if keep is None else keep)])


def _random_bytes(path: Path, size: int = 4096) -> None:
    path.write_bytes(random.Random(str(path)).randbytes(size))


def _png(path: Path, size: int = 64, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _settings(outputs: list, **subject) -> dict:
    return {"tool": "adaface.generate", "placeholder": "z", "prompts": ["a photo of z"],
            "subject": {"arcface_file": "subject_arcface.npy", **subject}, "outputs": outputs}


def _run_folder(path: Path, outputs: list | None = None, settings: object = None, **subject) -> Path:
    """A generate run folder: PNGs, subject_arcface.npy and settings.json (or the given settings text)."""
    path.mkdir(parents=True)
    _png(path / "p00_000.png")
    np.save(path / "subject_arcface.npy", np.ones(512, np.float32))
    if outputs is None:
        outputs = [{"file": "p00_000.png", "prompt": "a photo of z", "prompt_index": 0, "seed": 0}]
    if settings is None:
        settings = json.dumps(_settings(outputs, **subject))
    (path / "settings.json").write_text(settings)
    return path


def build_models(m: Path, sd15: Path) -> None:
    from adaface.models.prompt_inverter import PromptInverter
    from adaface.testing.tiny_models import (
        save_tiny_antelopev2,
        save_tiny_arc2face,
        save_tiny_clip,
        tiny_motion_adapter,
        tiny_text_encoder,
    )

    _copy(sd15, m / "sd15")
    save_tiny_arc2face(m / "arc2face")
    PromptInverter(tiny_text_encoder(seed=2), tokenizer=m / "sd15" / "tokenizer").save_pretrained(m / "inverter")
    tiny_motion_adapter().save_pretrained(str(m / "motion"))
    save_tiny_antelopev2(m / "insightface")
    save_tiny_clip(m / "clip", m / "sd15" / "tokenizer")


def build_damaged(m: Path, f: Path) -> None:
    """Damaged copies of the models and damaged input files, one defect each."""
    unet = "unet/diffusion_pytorch_model.safetensors"
    _truncate(_copy(m / "sd15", f / "sd15_unet_truncated") / unet)
    (_copy(m / "sd15", f / "sd15_te_empty") / "text_encoder/model.safetensors").write_bytes(b"")
    _random_bytes(_copy(m / "sd15", f / "sd15_vae_random") / "vae/diffusion_pytorch_model.safetensors")
    (_copy(m / "sd15", f / "sd15_unet_config") / "unet/config.json").write_text('{"in_channels": 4,\n  oops}\n')
    (_copy(m / "sd15", f / "sd15_index") / "model_index.json").write_text("[1, 2")
    _truncate(_copy(m / "inverter", f / "inv_truncated") / "model.safetensors")
    (_copy(m / "inverter", f / "inv_empty") / "model.safetensors").write_bytes(b"")
    _random_bytes(_copy(m / "inverter", f / "inv_random") / "model.safetensors")
    _truncate(_copy(m / "inverter", f / "inv_header") / "model.safetensors", keep=5)
    (_copy(m / "inverter", f / "inv_config") / "config.json").write_text('{\n "num_id_tokens": 16,\n}\n')
    (_copy(m / "inverter", f / "inv_config_binary") / "config.json").write_bytes(b"\xff\xfe\x00binary")
    (_copy(m / "arc2face", f / "a2f_bin_empty") / "encoder/pytorch_model.bin").write_bytes(b"")
    _truncate(_copy(m / "arc2face", f / "a2f_bin_truncated") / "encoder/pytorch_model.bin")
    (_copy(m / "arc2face", f / "a2f_config") / "encoder/config.json").write_text("{'single': 'quotes'}")
    _truncate(_copy(m / "motion", f / "motion_truncated") / "diffusion_pytorch_model.safetensors")
    (_copy(m / "motion", f / "motion_config") / "config.json").write_text("not json")
    _truncate(_copy(m / "clip", f / "clip_truncated") / "model.safetensors")
    (_copy(m / "clip", f / "clip_config") / "config.json").write_text('{"model_type": "clip"')
    _copy(m / "sd15" / "text_encoder", f / "clip_wrong_type")  # a CLIP *text* model: model_type clip_text_model

    np.save(f / "emb_good.npy", np.ones(512, np.float32))
    (f / "emb_empty.npy").write_bytes(b"")
    (f / "emb_truncated.npy").write_bytes((f / "emb_good.npy").read_bytes()[:100])
    np.save(f / "emb_shape.npy", np.ones((3, 7), np.float32))
    _random_bytes(f / "emb_random.safetensors")
    (f / "emb.txt").write_text("0.1 0.2")
    (f / "prompts_binary.txt").write_bytes(b"a photo of z\x00\x01\x02\xff")
    (f / "prompts_latin1.txt").write_bytes("a photo of z in a caf\xe9".encode("latin-1"))
    (f / "prompts_empty.txt").write_text("\n  \n")
    (f / "not_image.png").write_text("this is text, not a PNG")
    _png(f / "photo.png")
    _truncate(_png(f / "photo_truncated.png", size=128, seed=3))
    (f / "words_binary.csv").write_bytes(b"a.png,man\x00\xff\xfe")
    (f / "words.txt").write_text("a.png,man\n")
    (f / "weights.txt").write_text("x")

    (f / "ckpt_empty.pt").write_bytes(b"")
    _random_bytes(f / "ckpt_random.pt")
    (f / "ckpt_text.pt").write_text("hello, I am not a checkpoint\n")
    torch.save({"a": torch.ones(3)}, f / "ckpt_full.pt")
    (f / "ckpt_truncated.pt").write_bytes((f / "ckpt_full.pt").read_bytes()[:300])
    (f / "ckpt.json").write_text("{}")

    (f / "config_invalid.json").write_text('{\n  "steps": 3,\n  "lr": ,\n}\n')
    (f / "config_list.json").write_text("[1, 2, 3]")
    (f / "config_binary.json").write_bytes(b"\x00\x01\x02\xff\xfe")
    (f / "compositions_binary.txt").write_bytes(b"\x00\xff\xfe\x00")
    (f / "compositions_bad.json").write_text('{"actions": [1, 2}')
    assert zipfile.is_zipfile(f / "ckpt_full.pt")


def build_work(w: Path, f: Path) -> None:
    """What each command's work folder holds before the cases: the tree every case must leave unchanged."""
    for cmd in COMMANDS:
        (w / cmd).mkdir(parents=True)
        (w / cmd / "a_file").write_text("a user's file\n")
        (w / cmd / "user_folder").mkdir()
        (w / cmd / "user_folder" / "notes.txt").write_text("not a run\n")
        (w / cmd / "train_out").mkdir()
    g = w / "generate"
    _run_folder(g / "earlier_run")  # an earlier generate run: --overwrite may replace it only after a good start
    _png(g / "earlier_run" / "contact_sheet.png")

    e = w / "evaluate" / "runs"
    _run_folder(e / "good")
    _run_folder(e / "bad_json", settings='{"tool": "adaface.generate",\n "outputs": [\n')
    _run_folder(e / "list", settings="[1, 2]")
    _run_folder(e / "no_outputs", settings='{"tool": "adaface.generate"}')
    _run_folder(e / "escape", outputs=[{"file": "../good/p00_000.png", "prompt": "a photo of z"}])
    _run_folder(e / "absolute", outputs=[{"file": str(e / "good" / "p00_000.png"), "prompt": "a photo of z"}])
    _run_folder(e / "escape_frames", outputs=[{"file": "p00_000.gif", "prompt": "a photo of z",
                                               "frames": ["../../a_file"]}])
    _run_folder(e / "escape_arcface", arcface_file="../good/subject_arcface.npy")
    bad_png = _run_folder(e / "damaged_png", outputs=[
        {"file": "p00_000.png", "prompt": "a photo of z"}, {"file": "p00_001.png", "prompt": "a photo of z"}])
    (bad_png / "p00_001.png").write_bytes((bad_png / "p00_000.png").read_bytes()[:200])
    text_png = _run_folder(e / "text_png", outputs=[{"file": "p00_001.png", "prompt": "a photo of z"}])
    (text_png / "p00_001.png").write_text("not an image")
    _run_folder(e / "missing_png", outputs=[{"file": "p00_009.png", "prompt": "a photo of z"}])
    bad_npy = _run_folder(e / "damaged_arcface")
    (bad_npy / "subject_arcface.npy").write_bytes(b"\x93NUMPY garbage")
    (e / "no_settings").mkdir()
    _png(e / "no_settings" / "x.png")
    (e / "empty").mkdir()

    p = w / "prepare_data"
    _png(p / "photos" / "a.png", size=96)
    _png(p / "photos" / "sub" / "b.png", size=96, seed=1)
    for name, damage in (("damaged_embeddings", "arcface"), ("damaged_settings", "settings"),
                         ("damaged_shard", "shard")):
        d = p / name
        (d / "images").mkdir(parents=True)
        (d / "manifest.jsonl").write_text("")
        (d / "prepare_settings.json").write_text('{"size": 512}\n' if damage != "settings" else '{"size": 512,\n')
        if damage == "arcface":
            (d / "arcface.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
        if damage == "shard":
            (d / ".pending").mkdir()
            (d / ".pending" / "000000.safetensors").write_bytes(b"")

    c = w / "convert_released"
    (c / "has_inverter").mkdir()
    (c / "has_inverter" / "model.safetensors").write_bytes(b"keep me")

    pl = w / "plot"
    (pl / "run").mkdir()
    (pl / "run" / "metrics.jsonl").write_text('{"event": "step", "step": 1, "loss": 0.5}\n'
                                              '{"event": "step", "step": 2, "loss": 0.4}\n')
    (pl / "binary").mkdir()
    (pl / "binary" / "metrics.jsonl").write_bytes(b"\x00\xff\xfe" * 50)
    (pl / "no_loss").mkdir()
    (pl / "no_loss" / "metrics.jsonl").write_text('{"event": "step", "step": 1, "other": 2}\n')
    (pl / "no_metrics").mkdir()


@pytest.fixture(scope="module")
def world(tiny_sd15_dir):
    root = Path(tempfile.mkdtemp(prefix="adaface-bad-input-"))
    os.chmod(root, 0o755)  # the unprivileged runs read the models and write their results here
    m, f, w = root / "m", root / "f", root / "w"
    build_models(m, tiny_sd15_dir)
    build_damaged(m, f)
    build_work(w, f)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    yield {"root": root, "m": m, "f": f, "w": w}
    for dirpath, dirnames, _ in os.walk(root):  # the permission cases may have left folders unlistable
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
    shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# the cases: (command, id, argv with {m} models, {f} damaged files, {w} this command's work folder, pattern that
# the last stderr line must contain)
# --------------------------------------------------------------------------------------------------------------

GEN = ["--base", "{m}/sd15", "--arc2face", "{m}/arc2face", "--inverter", "{m}/inverter"]
EVAL_MODELS = ["--face-root", "{m}/insightface", "--clip", "{m}/clip"]
RID = ["--random-id", "1"]
NEW = ["--out", "{w}/new"]
SMALL = ["--num-images", "1", "--steps", "1", "--height", "16", "--width", "16"]
LONG_TAIL = "z " + "a " * 80  # the subject first, then more text than CLIP's 77 tokens hold
LONG_HEAD = "a " * 80 + "z"  # the subject's 16 slots past the 77-token limit


def _gen(**over: list[str]) -> list[str]:
    parts = {"models": GEN, "subject": RID, "out": NEW, "run": SMALL}
    parts.update(over)
    return [a for v in parts.values() for a in v]


def _swap(argv: list[str], option: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(option) + 1] = value
    return argv


def _bad_values(command: str, argv_with: Callable[[list[str]], list[str]],
                options: dict[str, dict[str, str]]) -> list[tuple]:
    """A case `{option}-{label}` per option and (label, value) of its values: the command line
    `argv_with([option, value])`, whose error must name the option."""
    return [(command, f"{option[2:]}-{label}", argv_with([option, value]), option)
            for option, values in options.items() for label, value in values.items()]


G = _gen()
CASES = [
    # generate: models that are missing, not folders, or damaged (headers checked before anything loads)
    ("generate", "base-missing", _swap(G, "--base", "{w}/nowhere"), "--base"),
    ("generate", "base-file", _swap(G, "--base", "{w}/a_file"), "--base"),
    ("generate", "base-no-index", _swap(G, "--base", "{w}/user_folder"), "--base"),
    ("generate", "unet-truncated", _swap(G, "--base", "{f}/sd15_unet_truncated"),
     "unet/diffusion_pytorch_model.safetensors"),
    ("generate", "text-encoder-empty", _swap(G, "--base", "{f}/sd15_te_empty"), "text_encoder/model.safetensors"),
    ("generate", "vae-random", _swap(G, "--base", "{f}/sd15_vae_random"), "vae/diffusion_pytorch_model"),
    ("generate", "unet-config-json", _swap(G, "--base", "{f}/sd15_unet_config"), "invalid JSON at line 2"),
    ("generate", "model-index-json", _swap(G, "--base", "{f}/sd15_index"), "model_index.json"),
    ("generate", "inverter-truncated", _swap(G, "--inverter", "{f}/inv_truncated"), "--inverter"),
    ("generate", "inverter-empty", _swap(G, "--inverter", "{f}/inv_empty"), "empty file"),
    ("generate", "inverter-random", _swap(G, "--inverter", "{f}/inv_random"), "--inverter"),
    ("generate", "inverter-header-cut", _swap(G, "--inverter", "{f}/inv_header"), "model.safetensors"),
    ("generate", "inverter-config-json", _swap(G, "--inverter", "{f}/inv_config"), "invalid JSON at line 3"),
    ("generate", "inverter-config-binary", _swap(G, "--inverter", "{f}/inv_config_binary"), "config.json"),
    ("generate", "inverter-missing", _swap(G, "--inverter", "{w}/nowhere"), "--inverter"),
    ("generate", "inverter-not-inverter", _swap(G, "--inverter", "{w}/user_folder"), "--inverter"),
    ("generate", "arc2face-missing", _swap(G, "--arc2face", "{w}/nowhere"), "--arc2face"),
    ("generate", "arc2face-bin-empty", _swap(G, "--arc2face", "{f}/a2f_bin_empty"), "pytorch_model.bin"),
    ("generate", "arc2face-bin-truncated", _swap(G, "--arc2face", "{f}/a2f_bin_truncated"), "pytorch_model.bin"),
    ("generate", "arc2face-config", _swap(G, "--arc2face", "{f}/a2f_config"), "encoder"),
    ("generate", "motion-truncated", G + ["--video", "--motion-adapter", "{f}/motion_truncated"],
     "--motion-adapter"),
    ("generate", "motion-config", G + ["--video", "--motion-adapter", "{f}/motion_config"], "--motion-adapter"),
    ("generate", "motion-missing", G + ["--video", "--motion-adapter", "{w}/nowhere"], "--motion-adapter"),
    ("generate", "video-without-adapter", G + ["--video"], "--motion-adapter"),
    ("generate", "adapter-without-video", G + ["--motion-adapter", "{m}/motion"], "--motion-adapter"),
    # generate: the subject
    *_bad_values("generate", lambda a: _gen(subject=a), {"--embedding": {
        "empty": "{f}/emb_empty.npy", "truncated": "{f}/emb_truncated.npy", "shape": "{f}/emb_shape.npy",
        "random": "{f}/emb_random.safetensors", "suffix": "{f}/emb.txt", "missing": "{f}/nowhere.npy"}}),
    ("generate", "images-missing", _gen(subject=["--images", "{f}/nowhere.png", "--face-root", "{m}/insightface"]),
     "--images"),
    ("generate", "images-not-image", _gen(subject=["--images", "{f}/not_image.png", "--face-root",
                                                    "{m}/insightface"]), "not a readable image"),
    ("generate", "images-truncated", _gen(subject=["--images", "{f}/photo.png", "{f}/photo_truncated.png",
                                                   "--face-root", "{m}/insightface"]), "photo_truncated.png"),
    ("generate", "images-without-face-root", _gen(subject=["--images", "{f}/photo.png"]), "--face-root"),
    ("generate", "face-root-missing", _gen(subject=["--images", "{f}/photo.png", "--face-root", "{w}/nowhere"]),
     "--face-root"),
    ("generate", "two-subjects", _gen(subject=["--random-id", "1", "--embedding", "{f}/emb_good.npy"]),
     "--embedding"),
    ("generate", "no-subject", _gen(subject=[]), "--images"),
    ("generate", "random-id-huge", _gen(subject=["--random-id", str(2**70)]), "--random-id"),
    ("generate", "random-id-text", _gen(subject=["--random-id", "seven"]), "--random-id"),
    # generate: prompts
    ("generate", "prompts-file-binary", G + ["--prompts-file", "{f}/prompts_binary.txt"], "--prompts-file"),
    ("generate", "prompts-file-latin1", G + ["--prompts-file", "{f}/prompts_latin1.txt"], "--prompts-file"),
    ("generate", "prompts-file-empty", G + ["--prompts-file", "{f}/prompts_empty.txt"], "--prompts-file"),
    ("generate", "prompts-file-missing", G + ["--prompts-file", "{f}/nowhere.txt"], "--prompts-file"),
    ("generate", "prompts-file-folder", G + ["--prompts-file", "{w}/user_folder"], "--prompts-file"),
    ("generate", "prompt-no-placeholder", G + ["--prompt", "a photo of a person"], "--prompt"),
    ("generate", "prompt-two-placeholders", G + ["--prompt", "z and z"], "--prompt"),
    ("generate", "placeholder-past-77-tokens", G + ["--prompt", LONG_HEAD], "--prompt"),
    ("generate", "long-prompt-strict", G + ["--prompt", LONG_TAIL, "--strict"], "--prompt"),
    ("generate", "placeholder-two-words", G + ["--placeholder", "my z"], "--placeholder"),
    # generate: outputs
    ("generate", "save-embeddings-under-file", G + ["--save-embeddings", "{w}/a_file/alice.safetensors"],
     "--save-embeddings"),
    ("generate", "save-embeddings-suffix", G + ["--save-embeddings", "{w}/alice.pt"], "--save-embeddings"),
    ("generate", "save-embeddings-folder", G + ["--save-embeddings", "{w}/user_folder"], "--save-embeddings"),
    ("generate", "save-embeddings-empty", G + ["--save-embeddings", ""], "--save-embeddings"),
    ("generate", "ti-token-space", G + ["--ti-token", "my token"], "--ti-token"),
    ("generate", "out-empty", _gen(out=["--out", ""]), "--out"),
    ("generate", "out-file", _gen(out=["--out", "{w}/a_file"]), "--out"),
    ("generate", "out-under-file", _gen(out=["--out", "{w}/a_file/run"]), "--out"),
    ("generate", "out-user-folder", _gen(out=["--out", "{w}/user_folder"]), "--out"),
    ("generate", "overwrite-user-folder", _gen(out=["--out", "{w}/user_folder", "--overwrite"]), "--overwrite"),
    ("generate", "earlier-run-no-overwrite", _gen(out=["--out", "{w}/earlier_run"]), "--out"),
    ("generate", "overwrite-damaged-inverter",
     _swap(_gen(out=["--out", "{w}/earlier_run", "--overwrite"]), "--inverter", "{f}/inv_truncated"), "--inverter"),
    ("generate", "overwrite-placeholder-past-limit",
     _gen(out=["--out", "{w}/earlier_run", "--overwrite"]) + ["--prompt", LONG_HEAD], "--prompt"),
    ("generate", "overwrite-damaged-unet",
     _swap(_gen(out=["--out", "{w}/earlier_run", "--overwrite"]), "--base", "{f}/sd15_unet_truncated"),
     "unet/diffusion_pytorch_model.safetensors"),
    # generate: numbers
    *_bad_values("generate", lambda a: _gen(run=a), {
        "--num-images": {"0": "0", "huge": "100000", "text": "four"}, "--height": {"3": "3", "odd": "30"},
        "--width": {"huge": "8192"}, "--steps": {"0": "0"}, "--guidance": {"nan": "nan", "negative": "-1"},
        "--seed": {"huge": str(2**63)}, "--scheduler": {"unknown": "fast"}, "--dtype": {"unknown": "float8"}}),
    ("generate", "fps-0", G + ["--video", "--motion-adapter", "{m}/motion", "--fps", "0"], "--fps"),
    ("generate", "num-frames-0", G + ["--video", "--motion-adapter", "{m}/motion", "--num-frames", "0"],
     "--num-frames"),
    ("generate", "context-length-without-video", G + ["--context-length", "4"], "--context-length"),
    ("generate", "context-length-past-window", G + ["--video", "--motion-adapter", "{m}/motion",
                                                     "--context-length", "64"], "--context-length"),
    ("generate", "on-no-face-unknown", G + ["--on-no-face", "skip"], "--on-no-face"),

    # evaluate
    *[("evaluate", name, argv + EVAL_MODELS, pattern) for name, argv, pattern in [
          ("run-missing", ["{w}/runs/nowhere"], "RUN_DIR"),
          ("run-empty-path", [""], "RUN_DIR"),
          ("run-is-file", ["{w}/a_file"], "RUN_DIR"),
          ("settings-invalid-json", ["{w}/runs/bad_json"], "invalid JSON at line 3"),
          ("settings-list", ["{w}/runs/list"], "settings.json"),
          ("settings-no-outputs", ["{w}/runs/no_outputs"], "settings.json"),
          ("output-escapes-run", ["{w}/runs/escape"], "outside the run folder"),
          ("output-absolute", ["{w}/runs/absolute"], "outside the run folder"),
          ("frame-escapes-run", ["{w}/runs/escape_frames"], "outside the run folder"),
          ("arcface-escapes-run", ["{w}/runs/escape_arcface"], "outside the run folder"),
          ("damaged-png", ["{w}/runs/damaged_png"], "p00_001.png: not a readable image"),
          ("text-as-png", ["{w}/runs/text_png"], "p00_001.png: not a readable image"),
          ("listed-png-missing", ["{w}/runs/missing_png"], "p00_009.png"),
          ("damaged-identity", ["{w}/runs/damaged_arcface"], "subject_arcface.npy"),
          ("no-settings-no-prompt", ["{w}/runs/no_settings"], "--prompt"),
          ("empty-run", ["{w}/runs/empty", "--prompt", "a photo of z"], "RUN_DIR"),
          ("references-swallow-nothing", ["--references", "{f}/photo.png"], "RUN_DIR"),
      ]],
    *_bad_values("evaluate", lambda a: ["{w}/runs/good", *a, *EVAL_MODELS], {
        "--embedding": {"damaged": "{f}/emb_truncated.npy", "missing": "{f}/nowhere.npy"},
        "--references": {"not-image": "{f}/not_image.png", "truncated": "{f}/photo_truncated.png",
                         "missing": "{f}/nowhere.png"},
        "--batch-size": {"0": "0"}, "--class-word": {"empty": " "},
        "--out": {"not-json": "{w}/report.txt", "under-file": "{w}/a_file/report.json", "empty": "",
                  "folder": "{w}/user_folder"},
        "--dino": {"missing": "{w}/nowhere"}}),
    ("evaluate", "clip-missing", ["{w}/runs/good", "--face-root", "{m}/insightface", "--clip", "{w}/nowhere"],
     "--clip"),
    ("evaluate", "clip-truncated", ["{w}/runs/good", "--face-root", "{m}/insightface", "--clip",
                                    "{f}/clip_truncated"], "model.safetensors"),
    ("evaluate", "clip-config", ["{w}/runs/good", "--face-root", "{m}/insightface", "--clip", "{f}/clip_config"],
     "config.json"),
    ("evaluate", "clip-wrong-model", ["{w}/runs/good", "--face-root", "{m}/insightface", "--clip",
                                      "{f}/clip_wrong_type"], "--clip"),
    ("evaluate", "face-root-missing", ["{w}/runs/good", "--face-root", "{w}/nowhere", "--clip", "{m}/clip"],
     "--face-root"),

    # prepare_data
    *[("prepare_data", name, argv + ["--face-root", "{m}/insightface"], pattern) for name, argv, pattern in [
        ("images-missing", ["{w}/nowhere", "--out", "{w}/out"], "IMAGES"),
        ("images-empty-path", ["", "--out", "{w}/out"], "IMAGES"),
        ("images-file", ["{w}/a_file", "--out", "{w}/out"], "IMAGES"),
        ("out-empty", ["{w}/photos", "--out", ""], "--out"),
        ("out-file", ["{w}/photos", "--out", "{w}/a_file"], "--out"),
        ("out-under-file", ["{w}/photos", "--out", "{w}/a_file/out"], "--out"),
        ("out-inside-images", ["{w}/photos", "--out", "{w}/photos/prepared"], "--out"),
        ("damaged-embeddings", ["{w}/photos", "--out", "{w}/damaged_embeddings"], "arcface.safetensors"),
        ("damaged-settings", ["{w}/photos", "--out", "{w}/damaged_settings"], "prepare_settings.json"),
        ("damaged-shard", ["{w}/photos", "--out", "{w}/damaged_shard"], ".pending/000000.safetensors"),
    ]],
    *_bad_values("prepare_data", lambda a: ["{w}/photos", "--out", "{w}/out", *a, "--face-root", "{m}/insightface"], {
        "--size": {"small": "10", "text": "big"}, "--min-face": {"0": "0"}, "--workers": {"0": "0"},
        "--commit-every": {"0": "0"}, "--det-thresh": {"2": "2"}, "--masks": {"unknown": "magic"},
        "--class-words": {"missing": "{f}/nowhere.csv", "binary": "{f}/words_binary.csv", "suffix": "{f}/words.txt"},
        "--parser-weights": {"missing": "{f}/nowhere.pth", "suffix": "{f}/weights.txt"}}),
    ("prepare_data", "face-root-missing", ["{w}/photos", "--out", "{w}/out", "--face-root", "{w}/nowhere"],
     "--face-root"),

    # convert_released
    ("convert_released", "checkpoint-missing", ["{f}/nowhere.pt", "{w}/out"], "CHECKPOINT"),
    ("convert_released", "checkpoint-empty", ["{f}/ckpt_empty.pt", "{w}/out"], "ckpt_empty.pt"),
    ("convert_released", "checkpoint-random", ["{f}/ckpt_random.pt", "{w}/out"], "ckpt_random.pt"),
    ("convert_released", "checkpoint-text", ["{f}/ckpt_text.pt", "{w}/out"], "ckpt_text.pt"),
    ("convert_released", "checkpoint-truncated", ["{f}/ckpt_truncated.pt", "{w}/out"], "ckpt_truncated.pt"),
    ("convert_released", "checkpoint-not-adaface", ["{f}/ckpt_full.pt", "{w}/out"], "ckpt_full.pt"),
    ("convert_released", "checkpoint-json", ["{f}/ckpt.json", "{w}/out"], "ckpt.json"),
    ("convert_released", "checkpoint-folder", ["{w}/user_folder", "{w}/out"], "user_folder"),
    ("convert_released", "out-empty", ["{f}/ckpt_full.pt", ""], "OUT_DIR"),
    ("convert_released", "out-file", ["{f}/ckpt_full.pt", "{w}/a_file"], "OUT_DIR"),
    ("convert_released", "out-under-file", ["{f}/ckpt_full.pt", "{w}/a_file/out"], "OUT_DIR"),
    ("convert_released", "out-has-inverter", ["{f}/ckpt_full.pt", "{w}/has_inverter"], "has_inverter"),

    # training scripts (configuration errors: checked before any model is built or anything is written). The
    # output folder exists already: these cases are about the options, not about creating it.
    *[(stage, f"{name}", argv + ["--output-dir", "{w}/train_out"], pattern) for stage in ("stage1", "stage2")
      for name, argv, pattern in [
          ("steps-0", ["--steps", "0"], "--steps"),
          ("config-missing", ["--config", "{f}/nowhere.json"], "--config"),
          ("config-invalid-json", ["--config", "{f}/config_invalid.json"], "config_invalid.json"),
          ("config-list", ["--config", "{f}/config_list.json"], "config_list.json"),
          ("config-binary", ["--config", "{f}/config_binary.json"], "config_binary.json"),
          ("lr-nan", ["--lr", "nan"], "--lr"),
          ("batch-size-0", ["--batch-size", "0"], "--batch-size"),
          ("data-dir-missing", ["--data-dir", "{w}/nowhere"], "--data-dir"),
          ("device-unknown", ["--device", "tpu9"], "--device"),
          ("t-range-reversed", ["--t-min", "900", "--t-max", "100"], "--t-"),
          ("seed-text", ["--seed", "abc"], "--seed"),
          ("mixed-precision-unknown", ["--mixed-precision", "fp7"], "--mixed-precision"),
      ]],
    ("stage2", "w-face-preserve-negative", ["--w-face-preserve", "-1", "--output-dir", "{w}/train_out"],
     "--w-face-preserve"),
    ("stage2", "stage1-p-2", ["--stage1-p", "2", "--output-dir", "{w}/train_out"], "--stage1-p"),
    ("stage2", "ops-backend-unknown", ["--ops-backend", "fast", "--output-dir", "{w}/train_out"], "--ops-backend"),
    ("stage2", "compositions-missing", ["--compositions", "{f}/nowhere.json", "--output-dir", "{w}/train_out"],
     "--compositions"),
    ("stage2", "compositions-invalid", ["--compositions", "{f}/compositions_bad.json", "--output-dir",
                                        "{w}/train_out"], "--compositions"),
    ("stage2", "inverter-missing", ["--inverter", "{w}/nowhere", "--output-dir", "{w}/train_out"], "--inverter"),
    ("stage2", "inverter-config-json", ["--inverter", "{f}/inv_config", "--output-dir", "{w}/train_out"],
     "--inverter"),
    ("stage2", "layer-weights-bad", ["--layer-weights", "up=abc", "--output-dir", "{w}/train_out"],
     "--layer-weights"),
    ("stage2", "default-class-word-empty", ["--default-class-word", " ", "--output-dir", "{w}/train_out"],
     "--default-class-word"),

    # plot
    ("plot", "run-missing", ["{w}/nowhere"], "RUN_DIR"),
    ("plot", "run-empty-path", [""], "RUN_DIR"),
    ("plot", "no-metrics", ["{w}/no_metrics"], "metrics.jsonl"),
    ("plot", "binary-metrics", ["{w}/binary"], "RUN_DIR"),
    ("plot", "no-loss", ["{w}/no_loss"], "RUN_DIR"),
    ("plot", "smoothing-1", ["{w}/run", "--smoothing", "1"], "--smoothing"),
    ("plot", "smoothing-nan", ["{w}/run", "--smoothing", "nan"], "--smoothing"),
    ("plot", "out-not-png", ["{w}/run", "--out", "{w}/plot.jpg"], "--out"),
    ("plot", "out-under-file", ["{w}/run", "--out", "{w}/a_file/plot.png"], "--out"),
    ("plot", "out-empty", ["{w}/run", "--out", ""], "--out"),
    ("plot", "out-folder", ["{w}/run", "--out", "{w}/user_folder"], "--out"),
    ("plot", "extra-key-missing", ["{w}/run", "--extra-key", "nothing"], "--extra-key"),

    # bench/memory_estimate.py
    ("memory_estimate", "resolution-3", ["--resolution", "3"], "--resolution"),
    ("memory_estimate", "resolution-huge", ["--resolution", "65536"], "--resolution"),
    ("memory_estimate", "resolution-odd", ["--resolution", "500"], "--resolution"),
    ("memory_estimate", "batch-0", ["--batch", "0"], "--batch"),
    ("memory_estimate", "batch-huge", ["--batch", "1000000"], "--batch"),
    ("memory_estimate", "batch-text", ["--batch", "1,x"], "--batch"),
    ("memory_estimate", "slice-p-0", ["--slice-p", "0"], "--slice-p"),
    ("memory_estimate", "json-under-file", ["--json", "{w}/a_file/rows.json"], "--json"),
    ("memory_estimate", "json-empty", ["--json", ""], "--json"),
    ("memory_estimate", "json-folder", ["--json", "{w}/user_folder"], "--json"),
    ("memory_estimate", "stage-unknown", ["--stage", "stage3"], "--stage"),
    ("memory_estimate", "dtype-unknown", ["--dtype", "fp8"], "--dtype"),
]


def _expand(value: str, world: dict, command: str) -> str:
    return value.format(m=world["m"], f=world["f"], w=world["w"] / command)


def run_cases(world: dict, cases: list[tuple], tag: str, as_user: str | None = None) -> dict[str, dict]:
    """All `cases` through the runner, one process per command, from the repository root."""
    results: dict[str, dict] = {}
    folder = world["root"] / f"results-{tag}"
    folder.mkdir(exist_ok=True)
    os.chmod(folder, 0o777)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1"}
    prefix: list[str] = []
    if as_user is not None:
        home = world["root"] / "home"
        home.mkdir(exist_ok=True)
        os.chmod(home, 0o777)
        env.update(HOME=str(home), HF_HOME=str(home / "hf"), MPLCONFIGDIR=str(home / "mpl"),
                   TRITON_CACHE_DIR=str(home / "triton"), XDG_CACHE_HOME=str(home / "cache"))
        prefix = ["setpriv", f"--reuid={as_user}", "--regid=nogroup", "--clear-groups"]
    for command in COMMANDS:
        mine = [c for c in cases if c[0] == command]
        if not mine:
            continue
        table = [{"id": f"{command}:{name}", "command": command, "argv": [_expand(a, world, command) for a in argv],
                  "watch": str(world["w"] / command)} for command, name, argv, _ in mine]
        cases_file, results_file = folder / f"{command}-cases.json", folder / f"{command}-results.json"
        cases_file.write_text(json.dumps(table))
        os.chmod(cases_file, 0o644)
        proc = subprocess.run([*prefix, sys.executable, str(RUNNER), str(cases_file), str(results_file)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"runner for {command} failed:\n{proc.stderr[-3000:]}"
        results.update({r["id"]: r for r in json.loads(results_file.read_text())})
    return results


@pytest.fixture(scope="module")
def results(world) -> dict[str, dict]:
    return run_cases(world, CASES, "all")


def check_result(result: dict, pattern: str) -> None:
    assert result["traceback"] is None, f"an exception escaped:\n{result['traceback']}"
    assert "Traceback" not in result["stderr"], result["stderr"]
    assert result["code"] == 2, f"exit status {result['code']}; stderr:\n{result['stderr'][-2000:]}"
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert lines, "no error message"
    assert pattern in lines[-1], f"the last line does not name {pattern!r}: {lines[-1]!r}"
    assert not result["changed"], f"the watched folder changed: {result['changed'][:10]}"


def test_suite_covers_every_command_with_at_least_100_cases():
    counts = {cmd: sum(1 for c in CASES if c[0] == cmd) for cmd in COMMANDS}
    assert all(counts.values()), counts
    assert sum(counts.values()) >= 100, counts
    assert len({(c[0], c[1]) for c in CASES}) == len(CASES), "case ids must be unique"


@pytest.mark.parametrize("command, name, argv, pattern", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_bad_input(results, command, name, argv, pattern):
    check_result(results[f"{command}:{name}"], pattern)


# --------------------------------------------------------------------------------------------------------------
# permissions: unreadable is not missing, unwritable outputs are named (run as an unprivileged user under root)
# --------------------------------------------------------------------------------------------------------------

PERMISSION_CASES = [
    ("generate", "out-read-only", _gen(out=["--out", "{w}/ro/run"]), "permission denied"),
    ("generate", "save-embeddings-read-only",
     _gen(out=["--out", "{w}/open/run"]) + ["--save-embeddings", "{w}/ro/alice.safetensors"], "--save-embeddings"),
    ("generate", "prompts-file-unreadable", G + ["--prompts-file", "{w}/secret/prompts.txt"], "permission denied"),
    ("generate", "images-unreadable", _gen(subject=["--images", "{w}/secret/photo.png", "--face-root",
                                                    "{m}/insightface"]), "permission denied"),
    ("generate", "embedding-unreadable", _gen(subject=["--embedding", "{w}/secret/emb.npy"]), "permission denied"),
    ("generate", "inverter-weights-unreadable", _swap(G, "--inverter", "{w}/inverter_locked"), "permission denied"),
    ("generate", "base-folder-unreadable", _swap(G, "--base", "{w}/sd15_locked"), "permission denied"),
    ("evaluate", "run-unreadable", ["{w}/locked_run", "--face-root", "{m}/insightface", "--clip", "{m}/clip"],
     "permission denied"),
    ("evaluate", "report-read-only", ["{w}/ro_run", "--face-root", "{m}/insightface", "--clip", "{m}/clip"],
     "permission denied"),
    ("evaluate", "out-read-only", ["{w}/run", "--face-root", "{m}/insightface", "--clip", "{m}/clip", "--out",
                                   "{w}/ro/report.json"], "permission denied"),
    ("evaluate", "image-unreadable", ["{w}/run_locked_png", "--face-root", "{m}/insightface", "--clip", "{m}/clip"],
     "permission denied"),
    ("prepare_data", "images-unreadable", ["{w}/locked_photos", "--out", "{w}/out", "--face-root", "{m}/insightface"],
     "permission denied"),
    ("prepare_data", "subfolder-unreadable", ["{w}/photos_locked_sub", "--out", "{w}/out", "--face-root",
                                              "{m}/insightface"], "locked"),
    ("prepare_data", "photo-unreadable", ["{w}/photos_locked_file", "--out", "{w}/out", "--face-root",
                                          "{m}/insightface"], "permission denied"),
    ("prepare_data", "out-read-only", ["{w}/photos", "--out", "{w}/ro/out", "--face-root", "{m}/insightface"],
     "permission denied"),
    ("convert_released", "checkpoint-unreadable", ["{w}/secret/ckpt.pt", "{w}/out"], "permission denied"),
    ("convert_released", "out-read-only", ["{w}/ckpt.pt", "{w}/ro/out"], "permission denied"),
    ("plot", "metrics-unreadable", ["{w}/locked_metrics"], "permission denied"),
    ("plot", "out-read-only", ["{w}/run", "--out", "{w}/ro/plot.png"], "permission denied"),
    ("memory_estimate", "json-read-only", ["--json", "{w}/ro/rows.json"], "permission denied"),
    ("stage1", "output-dir-read-only", ["--output-dir", "{w}/ro/out"], "--output-dir"),
    ("stage2", "output-dir-read-only", ["--output-dir", "{w}/ro/out"], "--output-dir"),
]


def build_permission_world(world: dict) -> None:
    f = world["f"]
    for command in {c[0] for c in PERMISSION_CASES}:
        w = world["w"] / command
        (w / "ro").mkdir()
        os.chmod(w / "ro", 0o555)
        (w / "open").mkdir()
        os.chmod(w / "open", 0o777)
        (w / "secret").mkdir()
        shutil.copy(f / "prompts_empty.txt", w / "secret" / "prompts.txt")
        shutil.copy(f / "photo.png", w / "secret" / "photo.png")
        shutil.copy(f / "emb_good.npy", w / "secret" / "emb.npy")
        shutil.copy(f / "ckpt_full.pt", w / "secret" / "ckpt.pt")
        shutil.copy(f / "ckpt_full.pt", w / "ckpt.pt")
        for name in os.listdir(w / "secret"):
            os.chmod(w / "secret" / name, 0o000)
    g = world["w"] / "generate"
    _copy(world["m"] / "inverter", g / "inverter_locked")
    os.chmod(g / "inverter_locked" / "model.safetensors", 0o000)
    _copy(world["m"] / "sd15", g / "sd15_locked")
    os.chmod(g / "sd15_locked" / "unet", 0o000)
    e = world["w"] / "evaluate"
    _run_folder(e / "run")
    _run_folder(e / "locked_run")
    os.chmod(e / "locked_run", 0o000)
    _run_folder(e / "ro_run")
    os.chmod(e / "ro_run", 0o555)
    _run_folder(e / "run_locked_png")
    os.chmod(e / "run_locked_png" / "p00_000.png", 0o000)
    p = world["w"] / "prepare_data"
    for name in ("locked_photos", "photos_locked_sub", "photos_locked_file"):
        _png(p / name / "a.png", size=96)
        _png(p / name / "locked" / "b.png", size=96)
    os.chmod(p / "locked_photos", 0o000)
    os.chmod(p / "photos_locked_sub" / "locked", 0o000)
    os.chmod(p / "photos_locked_file" / "a.png", 0o000)
    pl = world["w"] / "plot"
    (pl / "locked_metrics").mkdir()
    (pl / "locked_metrics" / "metrics.jsonl").write_text('{"event": "step", "step": 1, "loss": 1}\n')
    os.chmod(pl / "locked_metrics" / "metrics.jsonl", 0o000)


@pytest.fixture(scope="module")
def permission_results(world, results) -> dict[str, dict]:  # after the main cases: they share the work folders
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: root reads and writes every file, so permissions cannot fail")
    build_permission_world(world)
    return run_cases(world, PERMISSION_CASES, "permissions", as_user="nobody" if os.geteuid() == 0 else None)


@pytest.mark.parametrize("command, name, argv, pattern", PERMISSION_CASES,
                         ids=[f"{c[0]}:{c[1]}" for c in PERMISSION_CASES])
def test_permission(permission_results, command, name, argv, pattern):
    check_result(permission_results[f"{command}:{name}"], pattern)


# --------------------------------------------------------------------------------------------------------------
# the real entry points: a few cases as plain `python -m` / script subprocesses (no runner in between)
# --------------------------------------------------------------------------------------------------------------

DIRECT = [
    (["-m", "adaface.generate", *_swap(G, "--inverter", "{f}/inv_truncated")], "generate", "--inverter"),
    (["-m", "adaface.evaluate", "{w}/runs/damaged_png", "--face-root", "{m}/insightface", "--clip", "{m}/clip"],
     "evaluate", "not a readable image"),
    (["training/stage1.py", "--config", "{f}/config_invalid.json", "--output-dir", "{w}/train_out"], "stage1",
     "config_invalid.json"),
]


@pytest.mark.parametrize("argv, command, pattern", DIRECT, ids=[d[1] for d in DIRECT])
def test_direct_subprocess(world, results, argv, command, pattern):
    from adaface.testing.scripts import load_script

    snapshot = load_script(RUNNER).snapshot
    watch = world["w"] / command
    before = snapshot(str(watch))
    proc = subprocess.run([sys.executable, *[_expand(a, world, command) for a in argv]], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert pattern in proc.stderr.strip().splitlines()[-1]
    assert snapshot(str(watch)) == before


def test_references_do_not_swallow_the_run_folder(tmp_path, monkeypatch):
    """`--references a.png b.png RUN_DIR`: nargs="+" would take the run folder as a photo; it is RUN_DIR."""
    from adaface import evaluate

    seen = {}

    def capture(args):
        seen.update(run_dir=args.run_dir, references=args.references)
        raise SystemExit(0)

    monkeypatch.setattr(evaluate, "check_args", capture)
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit):
        evaluate.main(["--references", "a.png", "b.png", str(tmp_path / "run"), "--face-root", "x", "--clip", "y"])
    assert seen == {"run_dir": str(tmp_path / "run"), "references": ["a.png", "b.png"]}

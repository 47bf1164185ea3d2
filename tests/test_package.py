"""Installation and packaging properties."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


def test_imports_from_any_directory(tmp_path):
    res = _run("import adaface, adaface.kernels, adaface.ops; print(adaface.kernels.__name__)", tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "adaface.kernels"


def test_top_level_kernels_module_is_not_shadowed(tmp_path):
    """The folder kernels/ is installed as adaface.kernels, never as an importable top-level `kernels`."""
    res = _run(
        "import importlib.util, adaface; spec = importlib.util.find_spec('kernels'); "
        "print('none' if spec is None else spec.origin)",
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert str(ROOT / "kernels") not in res.stdout


def test_kernels_folder_is_no_regular_package():
    """A `kernels/__init__.py` would make the folder outrank Hugging Face's `kernels` from the repository root."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "adaface" / "kernels").resolve() == (ROOT / "kernels").resolve()


def test_import_kernels_from_the_repository_root_is_hugging_faces():
    """From the root (where `python -m`, `python -c`, pytest and notebooks put the folder on sys.path),
    `import kernels` is the installed Hugging Face package whenever one is installed."""
    import importlib.util

    if importlib.util.find_spec("kernels") is None or _hf_kernels_origin() is None:
        pytest.skip("Hugging Face's kernels package is not installed")
    res = _run("import kernels, adaface.kernels.soft_warp; print(kernels.__file__)", ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == _hf_kernels_origin()


def _hf_kernels_origin() -> str | None:
    """Where `import kernels` goes from outside the repository (None: only our folder, or nothing)."""
    res = _run("import importlib.util; s = importlib.util.find_spec('kernels'); print(s and s.origin)", Path("/"))
    origin = res.stdout.strip()
    return None if origin in ("", "None") else origin


@pytest.mark.parametrize(
    "command",
    [
        ["-c", "import transformers.models.clip.modeling_clip"],
        ["-m", "adaface.generate", "--help"],
        ["-m", "adaface.demo", "--help"],
        ["-m", "adaface.evaluate", "--help"],
        ["-m", "adaface.prepare_data", "--help"],
    ],
    ids=lambda c: " ".join(c),
)
def test_commands_work_from_the_repository_root(command):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr


def test_convert_released_on_a_junk_file_is_one_line_from_the_repository_root(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not a checkpoint" * 10)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "-m", "adaface.convert_released", str(junk), str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "junk.bin" in lines[0], res.stderr


def test_import_is_light(tmp_path):
    """`import adaface, adaface.ops` must not pull in insightface, onnxruntime or diffusers."""
    code = (
        "import sys, adaface, adaface.ops\n"
        "heavy = [m for m in ('insightface', 'onnxruntime', 'diffusers') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    res = _run(code, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""


def test_unknown_attribute_is_an_attribute_error():
    import adaface

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        adaface.nope  # noqa: B018


def test_tiny_sd15_loads_through_diffusers(tiny_sd15_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd15_dir), safety_checker=None)
    ids = pipe.tokenizer("a photo of z in the forest").input_ids
    assert len(ids) == 9  # bos + 7 single-token words + eos: the tiny BPE merges whole words
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


def test_extension_when_built_reports_its_flavour():
    from adaface.ops import _backend

    if not _backend.extension_available():
        pytest.skip("adaface._C not built in this environment")
    assert _backend.load_extension().WITH_CUDA in (0, 1)


def test_kernels_do_not_import_the_ops(tmp_path):
    """Dependencies point down: adaface.ops imports adaface.kernels, never the other way round."""
    code = (
        "import sys\n"
        "import adaface.kernels.delta_cosine, adaface.kernels.expanded_attention\n"
        "import adaface.kernels.ortho_subtract, adaface.kernels.soft_warp\n"
        "print(sorted(m for m in sys.modules if m.startswith('adaface.ops')))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_triton_custom_ops_follow_one_naming_pattern():
    """`adaface::{op}_{backend}_{fwd|bwd}` for every Triton op."""
    import torch

    import adaface.kernels.delta_cosine  # noqa: F401
    import adaface.kernels.expanded_attention  # noqa: F401
    import adaface.kernels.ortho_subtract  # noqa: F401
    import adaface.kernels.soft_warp  # noqa: F401

    for op in ("expanded_attention", "delta_cosine", "soft_warp", "ortho_subtract"):
        for direction in ("fwd", "bwd"):
            assert hasattr(torch.ops.adaface, f"{op}_triton_{direction}"), f"{op}_triton_{direction}"
    for old in ("soft_warp_rows_fwd", "delta_cosine_rows", "ortho_subtract_triton"):
        assert not hasattr(torch.ops.adaface, old), old

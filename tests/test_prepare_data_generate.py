"""The recognizer check of `python -m adaface.generate` (shared with prepare_data): recorded in settings.json,
a loud warning for a recognizer other than Arc2Face's arcface.onnx, a one-line refusal with --strict."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from adaface import generate
from adaface.testing.tiny_face_models import save_tiny_antelopev2_full
from adaface.testing.tiny_models import save_tiny_arc2face, tiny_text_encoder

RUN = ["--num-images", "1", "--steps", "1", "--height", "16", "--width", "16", "--seed", "0", "--guidance", "1.0"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_sd15_dir) -> dict:
    from adaface.models.prompt_inverter import PromptInverter

    root = tmp_path_factory.mktemp("models")
    PromptInverter(tiny_text_encoder(seed=2), tokenizer=tiny_sd15_dir / "tokenizer").save_pretrained(root / "inv")
    save_tiny_antelopev2_full(root / "stock")
    save_tiny_antelopev2_full(root / "arc2face_pack", recognizer="arcface.onnx")
    img = np.full((256, 256, 3), 20, np.uint8)
    img[64:128, 64:128] = 230
    Image.fromarray(img).save(root / "face.png")
    return {"argv": ["--base", str(tiny_sd15_dir), "--arc2face", str(save_tiny_arc2face(root / "arc2face")),
                     "--inverter", str(root / "inv"), "--images", str(root / "face.png"), *RUN],
            "stock": str(root / "stock"), "arc2face": str(root / "arc2face_pack")}


def test_generate_records_and_checks_the_recognizer(models, tmp_path, capsys):
    assert generate.main([*models["argv"], "--face-root", models["stock"], "--out", str(tmp_path / "a")]) == 0
    assert "WARNING" in capsys.readouterr().err
    assert json.loads((tmp_path / "a" / "settings.json").read_text())["recognizer"] == "glintr100.onnx"

    argv = [*models["argv"], "--face-root", models["arc2face"], "--strict", "--out", str(tmp_path / "b")]
    assert generate.main(argv) == 0
    assert "WARNING" not in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "settings.json").read_text())["recognizer"] == "arcface.onnx"

    with pytest.raises(SystemExit) as info:
        generate.main([*models["argv"], "--face-root", models["stock"], "--strict", "--out", str(tmp_path / "c")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m adaface.generate: error: --strict: ") and "glintr100.onnx" in err
    assert not (tmp_path / "c" / "settings.json").exists()

"""`python -m adaface.convert_released`: the authors' released checkpoints, read without running their code.

Synthetic checkpoints of each generation are written by `adaface.testing.released_checkpoints` in a process
of its own (the only place where look-alike classes exist under the authors' module paths), then converted
in another process where none of those modules exist. The converted inverter is checked against the
authors' forward, written out below from the published facts about it, not from our modules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adaface import convert_released as cr

MULTIPLIERS = [8, 8, 8] + [4] * 9
SMALL = {"width": 32, "layers": 12, "heads": 4, "intermediate": 64, "multipliers": MULTIPLIERS}
GENERATIONS = ("2024-05", "1-key", "2024-10", "2025")
TOKENIZER_NEEDED = {"2024-05", "1-key", "no-weights"}  # files with no pickled tokenizer
# The authors' module paths, and einops: none may exist where the converter runs.
FOREIGN = ("ldm", "adaface.subj_basis_generator", "adaface.arc2face_models", "adaface.util", "einops")


def _python(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict:
    """Synthetic released files (one writer process), their conversions (one converter process)."""
    from adaface.testing.tiny_models import save_tiny_tokenizer

    root = tmp_path_factory.mktemp("released")
    jobs = {g: {"generation": g, **SMALL} for g in GENERATIONS}
    jobs["per-channel"] = {"generation": "2024-10", "per_channel": True, **SMALL}
    jobs["no-weights"] = {"generation": "1-key", "layer_weights": None, **SMALL}
    # As wide as the tiny Arc2Face (512), half precision as the authors' later files: for generation.
    jobs["wide"] = {"generation": "2025", "width": 512, "layers": 2, "heads": 8, "intermediate": 64,
                    "multipliers": [4, 2], "dtype": "float16"}
    spec = json.dumps({name: {**job, "out": str(root / name)} for name, job in jobs.items()})
    written = _python(f"""
        import json, torch
        from pathlib import Path
        from adaface.testing.released_checkpoints import write
        for job in json.loads({spec!r}).values():
            job = dict(job)
            out, gen = Path(job.pop("out")), job.pop("generation")
            if "dtype" in job:
                job["dtype"] = getattr(torch, job["dtype"])
            write(out, gen, **job)
    """)
    assert written.returncode == 0, written.stderr[-3000:]
    tok = save_tiny_tokenizer(root / "tokenizer")
    runs = {name: [str(root / name / "checkpoint.pt"), str(root / f"{name}-out")]
            + (["--tokenizer", str(tok)] if name in TOKENIZER_NEEDED else []) for name in jobs}
    converted = _python(f"""
        import contextlib, importlib.util, io, json
        from adaface.convert_released import main
        present = [m for m in {FOREIGN!r} if importlib.util.find_spec(m) is not None]
        results = {{}}
        for name, argv in json.loads({json.dumps(runs)!r}).items():
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = main(argv)
            results[name] = {{"rc": rc, "stderr": err.getvalue()}}
        print(json.dumps({{"present": present, "results": results}}))
    """)
    assert converted.returncode == 0, converted.stderr[-3000:]
    out = json.loads(converted.stdout.strip().splitlines()[-1])
    return {"root": root, "tokenizer": tok, "present": out["present"], "results": out["results"]}


def _out(released: dict, name: str) -> Path:
    return released["root"] / f"{name}-out"


def _report(released: dict, name: str) -> dict:
    return json.loads((_out(released, name) / cr.REPORT_NAME).read_text())


def _reference(released: dict, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    folder = released["root"] / name
    return load_file(str(folder / "reference.safetensors")), json.loads((folder / "reference.json").read_text())


def authors_forward(w: dict[str, torch.Tensor], meta: dict, id_tokens: torch.Tensor, *,
                    copy_rows: str = "blocks", joint_softmax: bool = True) -> torch.Tensor:
    """The authors' inverse CLIP forward, from the published facts (fp32):

    token embeddings of their template with the 16 ID tokens written over positions 4..19, position embeddings
    added; per layer, pre-LN attention whose k_proj / v_proj give m copies as consecutive `width`-row blocks,
    copy j of key token t at key slot t*m + j, the causal mask repeated over the copies and one softmax over
    all L*m slots (queries scaled by head_dim^-0.5), then the quick-GELU MLP; the last three hidden states mixed
    by `hidden_state_layer_weights` normalised to sum 1 (or the last state alone without them); final LN;
    positions 4..19. `copy_rows="strided"` / `joint_softmax=False` are wrong readings, for negative controls.
    """
    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], meta["layer_norm_eps"])

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    table = w["text_model.embeddings.token_embedding.weight"]
    width, heads = table.shape[1], meta["num_heads"]
    hd = width // heads
    ids = torch.tensor(meta["input_ids"])
    b, n = id_tokens.shape[0], len(ids)
    x = table[ids].unsqueeze(0).repeat(b, 1, 1)
    x[:, 4:20] = id_tokens
    x = x + w["text_model.embeddings.position_embedding.weight"][:n]
    states = [x]
    for i in range(meta["num_layers"]):
        p = f"text_model.encoder.layers.{i}"
        h = ln(x, f"{p}.layer_norm1")
        q = (lin(h, f"{p}.self_attn.q_proj") * hd**-0.5).view(b, n, heads, hd).transpose(1, 2)
        kv = []
        for proj in ("k_proj", "v_proj"):
            y = lin(h, f"{p}.self_attn.{proj}")
            m = y.shape[-1] // width
            if copy_rows == "strided":  # wrong: copy j as rows j, j+m, j+2m, ...
                y = y.view(b, n, width, m).transpose(2, 3)
            kv.append(y.reshape(b, n * m, heads, hd).transpose(1, 2))  # slot t*m + j
        k, v = kv
        logits = q @ k.transpose(-1, -2)  # [b, heads, n, n*m]
        key_token = torch.arange(n * m) // m
        logits = logits.masked_fill(key_token.view(1, -1) > torch.arange(n).view(-1, 1), float("-inf"))
        if joint_softmax:
            attn = logits.softmax(-1) @ v
        else:  # wrong: a softmax per copy, outputs averaged
            per_copy = logits.view(b, heads, n, n, m).softmax(3)
            attn = torch.einsum("bhqtj,bhtjd->bhqd", per_copy, v.view(b, heads, n, m, hd)) / m
        x = x + lin(attn.transpose(1, 2).reshape(b, n, width), f"{p}.self_attn.out_proj")
        f = lin(ln(x, f"{p}.layer_norm2"), f"{p}.mlp.fc1")
        x = x + lin(f * torch.sigmoid(1.702 * f), f"{p}.mlp.fc2")
        states.append(x)
    lw = w.get("hidden_state_layer_weights")
    if lw is None:
        mixed = states[-1]
    else:
        lw = lw / lw.sum(dim=0, keepdim=True)
        mixed = sum(lw[j] * states[-len(lw) + j] for j in range(len(lw)))
    return ln(mixed, "text_model.final_layer_norm")[:, 4:20]


def test_the_authors_modules_do_not_exist_where_the_converter_runs(released):
    assert released["present"] == []


@pytest.mark.parametrize("name", GENERATIONS)
def test_each_generation_is_detected_and_its_multipliers_come_from_the_shapes(released, name):
    result = released["results"][name]
    assert result["rc"] == 0, result["stderr"]
    report = _report(released, name)
    assert report["generation"] == name
    assert report["class_paths"] == ("ldm" if name in ("2024-05", "1-key") else "adaface")
    conv = report["converted"]
    # The pickled attributes say -1 (2024-05) or [4] * 12 (later): the shapes say (8, 8, 8, 4, ..., 4).
    assert conv["multipliers"] == MULTIPLIERS and conv["pickled_multiplier_attributes"] != MULTIPLIERS
    assert (conv["hidden_size"], conv["num_layers"], conv["num_heads"]) == (32, 12, 4)
    config = json.loads((_out(released, name) / "config.json").read_text())
    assert config["mode"] == "kv" and config["multipliers"] == MULTIPLIERS
    skipped = {s["what"]: s["path"] for s in report["skipped"]}
    ignored = {i["path"] for i in report["ignored"]}
    if name in ("2024-10", "2025"):
        assert conv["path"].startswith("string_to_subj_basis_generator_dict['z'][1]")
        assert skipped["ConsistentID-based generator"] == "string_to_subj_basis_generator_dict['z'][0]"
        assert report["tokenizer"].startswith("rebuilt from the tokenizer pickled")
    if name != "1-key":
        assert skipped["background generator"] == "string_to_subj_basis_generator_dict['y']"
    if name == "2025":
        assert "unet_lora_modules" in ignored
    assert any(path.endswith(".obj_proj_in.0.weight") for path in ignored)
    assert "regex._regex.compile" in report["globals"] or name in ("2024-05", "1-key")


@pytest.mark.parametrize("name", [*GENERATIONS, "no-weights"])
def test_converted_inverter_computes_the_authors_forward(released, name):
    from adaface.models.prompt_inverter import PromptInverter

    assert released["results"][name]["rc"] == 0, released["results"][name]["stderr"]
    w, meta = _reference(released, name)
    inverter = PromptInverter.from_pretrained(_out(released, name)).eval()
    ids = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = inverter(ids)
    want = authors_forward(w, meta, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    # The comparison tells the K/V copy layout and the joint softmax apart.
    for wrong in ({"copy_rows": "strided"}, {"joint_softmax": False}):
        assert (authors_forward(w, meta, ids, **wrong) - want).abs().max() > 1e-2


def test_layer_weights_are_stored_normalised(released):
    from adaface.models.prompt_inverter import PromptInverter

    w, _ = _reference(released, "2024-10")
    raw = w["hidden_state_layer_weights"].flatten()
    inverter = PromptInverter.from_pretrained(_out(released, "2024-10"))
    torch.testing.assert_close(inverter.layer_weights.detach(), raw / raw.sum())
    assert abs(float(inverter.layer_weights.detach().sum()) - 1) < 1e-6
    none = PromptInverter.from_pretrained(_out(released, "no-weights"))
    assert none.layer_weights.tolist() == [0.0, 0.0, 1.0]


def test_per_channel_layer_weights_are_refused_with_one_line(released):
    result = released["results"]["per-channel"]
    assert result["rc"] == 2
    assert result["stderr"].count("\n") == 1 and "per channel" in result["stderr"]
    assert "Traceback" not in result["stderr"]
    assert not (_out(released, "per-channel") / "model.safetensors").exists()


def test_half_precision_file_serves_generate_and_subject_encoder(released, tmp_path, tiny_sd15_dir):
    from adaface import generate
    from adaface.models.prompt_inverter import PromptInverter
    from adaface.subject import SubjectEncoder, random_arcface
    from adaface.testing.tiny_models import save_tiny_arc2face

    assert released["results"]["wide"]["rc"] == 0, released["results"]["wide"]["stderr"]
    report = _report(released, "wide")
    assert report["converted"]["source_dtypes"] == ["float16"] and report["converted"]["multipliers"] == [4, 2]
    out = _out(released, "wide")
    w, meta = _reference(released, "wide")
    inverter = PromptInverter.from_pretrained(out)
    ids = torch.randn(2, 16, 512, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(inverter(ids), authors_forward(w, meta, ids), rtol=1e-5, atol=2e-5)

    arc2face = save_tiny_arc2face(tmp_path / "arc2face")
    encoder = SubjectEncoder.from_pretrained(arc2face, out, tokenizer=tiny_sd15_dir / "tokenizer")
    identity = random_arcface(3)
    with torch.no_grad():
        want = authors_forward(w, meta, encoder.arc2face.id_tokens(identity[None]))[0]
    torch.testing.assert_close(encoder(identity), want, rtol=1e-5, atol=2e-5)

    code = generate.main(["--base", str(tiny_sd15_dir), "--arc2face", str(arc2face), "--inverter", str(out),
                          "--random-id", "3", "--prompt", "a photo of z", "--num-images", "1", "--steps", "1",
                          "--height", "16", "--width", "16", "--out", str(tmp_path / "run")])
    assert code == 0 and len(list((tmp_path / "run").glob("p[0-9][0-9]_*.png"))) == 1


class _Payload:
    def __init__(self, call: object, arg: str) -> None:
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


def _hostile(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    import builtins

    marker = tmp_path / f"{kind}-ran"
    call, arg = {"os.system": (os.system, f"touch {marker}"),
                 "builtins.exec": (builtins.exec, f"open({str(marker)!r}, 'w').close()")}[kind]
    path = tmp_path / f"{kind}.pt"
    torch.save({cr.GENERATORS_KEY: {"z": _Payload(call, arg)}, "w": torch.zeros(2)}, path)
    return path, marker


def test_hostile_pickle_is_refused_by_the_cli_and_never_runs(tmp_path):
    path, marker = _hostile(tmp_path, "os.system")
    proc = subprocess.run([sys.executable, "-m", "adaface.convert_released", str(path), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "refusing to load" in proc.stderr and "system" in proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["builtins.exec", "os.system"])
def test_hostile_pickle_is_refused_in_process_naming_the_global(tmp_path, capsys, kind):
    path, marker = _hostile(tmp_path, kind)
    assert cr.main([str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing was unpickled" in err
    assert (kind.split(".")[1] in err) and not marker.exists()


def _write_not_checkpoints(tmp_path: Path) -> dict[str, Path]:
    from safetensors.torch import save_file

    files = {"random": tmp_path / "random.pt", "safetensors": tmp_path / "inverter.safetensors",
             "zip": tmp_path / "nodata.pt", "pickle": tmp_path / "bare.pt"}
    files["random"].write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                              dtype=torch.uint8).numpy().tobytes())
    save_file({"w": torch.zeros(3)}, str(files["safetensors"]))
    with zipfile.ZipFile(files["zip"], "w") as zf:
        zf.writestr("archive/version", "3\n")
    files["pickle"].write_bytes(b"\x80\x02}q\x00.")
    files["plain"] = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, files["plain"])
    valid = files["plain"].read_bytes()
    files["trailing"] = tmp_path / "trailing.pt"
    files["trailing"].write_bytes(valid + b"more bytes")
    with zipfile.ZipFile(files["plain"]) as src:
        records = [(i.filename, src.read(i)) for i in src.infolist()]
    pkl = next(n for n, _ in records if n.endswith("/data.pkl"))
    for kind, name in (("duplicate", pkl), ("two-folders", "other/data.pkl")):
        files[kind] = tmp_path / f"{kind}.pt"
        with zipfile.ZipFile(files[kind], "w") as zf, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns of the duplicate name it writes
            for record, data in records:
                zf.writestr(record, data)
            zf.writestr(name, dict(records)[pkl])
    return files


@pytest.mark.parametrize("kind, message", [
    ("random", "not a PyTorch checkpoint"),
    ("safetensors", "a safetensors file, not a torch.save checkpoint"),
    ("zip", "holds no data.pkl"),
    ("pickle", "a bare pickle or a legacy"),
    ("missing", "file not found"),
    ("plain", "not a released AdaFace checkpoint"),
    ("trailing", "bytes follow the zip archive's end record"),
    ("duplicate", "appears twice"),
    ("two-folders", "more than one top-level folder"),
])
def test_files_that_are_not_checkpoints_get_one_line(tmp_path, capsys, kind, message):
    files = _write_not_checkpoints(tmp_path)
    path = files.get(kind, tmp_path / "missing.pt")
    assert cr.main([str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and str(path) in err


def test_a_folder_that_already_holds_an_inverter_is_kept(released, capsys):
    out = _out(released, "2025")
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert cr.main([str(released["root"] / "2025" / "checkpoint.pt"), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns == before


ALLOWED_CLASSES = [("torch.nn.modules.linear", "Linear"),
                   ("transformers.models.clip.configuration_clip", "CLIPTextConfig"),
                   ("ldm.modules.subj_basis_generator", "SubjBasisGenerator"),
                   ("adaface.arc2face_models", "CLIPAttentionMKV"), ("einops.layers.torch", "Rearrange")]
ALLOWED_FUNCTIONS = [("regex._regex", "compile"), ("ftfy", "fix_text")]
REFUSED = [
    ("ldm.util", "instantiate_from_config"),  # a function under an allowed module: not a class name
    ("adaface.util", "os.system"), ("torch.nn.modules.module", "register_module_forward_hook"),
    ("builtins", "getattr"), ("subprocess", "Popen"), ("torch.nnx.modules", "Linear"),
]


@pytest.mark.parametrize("module, name, kind", [(m, n, "class") for m, n in ALLOWED_CLASSES]
                         + [(m, n, "function") for m, n in ALLOWED_FUNCTIONS] + [(m, n, None) for m, n in REFUSED])
def test_allow_list(module, name, kind):
    assert cr.allowed_global(module, name) == kind

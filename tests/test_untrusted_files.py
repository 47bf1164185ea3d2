"""Files from the internet are safe to open: crafted files, each refused in one line, cheaply, with no side effect.

Every crafted file is built here from bytes (no binary fixtures). They are opened by one harness process
(`HARNESS`) that imports the package once, turns on a socket audit hook (any socket use is recorded and
refused; the hub is offline too), then forks one child per case under an address-space limit (`resource.
setrlimit(RLIMIT_AS)` at its start + 1 GiB) and a CPU limit (60 s: a case that hangs is killed and fails). Each
child reports the outcome (exit status and stderr of a command, or what a loader returned or raised), its CPU
time, its peak memory growth, the sockets it tried and the files that appeared or changed in its case folder.
The acceptance bound for a refusal is 1 GiB of memory and 10 s of CPU; each one here takes well under a second.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from adaface import convert_released as cr

ROOT = Path(__file__).resolve().parents[1]
MEMORY_BUDGET = 2**30  # bytes a refusal may add to the process
CPU_BUDGET_S = 10.0

HARNESS = r'''
import contextlib, dataclasses, importlib, io, json, os, pathlib, resource, sys, time, traceback

import torch, transformers  # noqa: F401 (imported once, before the children fork)
from PIL import Image, ImageOps  # noqa: F401
from safetensors.torch import load_file  # noqa: F401
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: F401
import diffusers  # noqa: F401
for name in ("adaface.convert_released", "adaface.models._io", "adaface.models.prompt_inverter",
             "adaface.models.arc2face", "adaface.training.engine.data", "adaface.prepare_data", "adaface.generate",
             "adaface.subject", "adaface.faces.class_words", "adaface.training.method.stage1"):
    importlib.import_module(name)

SOCKETS = []

def no_network(event, args):
    if event.startswith("socket.") and event != "socket.sethostname":
        SOCKETS.append(event)
        raise RuntimeError(f"socket use refused by the test: {event}")

sys.addaudithook(no_network)


def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmSize", "VmRSS", "VmHWM")}


def tree(folder):
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[os.path.relpath(p, folder)] = [st.st_size, st.st_mtime_ns]
    return out


def as_arg(a):
    """JSON arguments; {"path": p} stands for a Path."""
    if isinstance(a, dict) and set(a) == {"path"}:
        return pathlib.Path(a["path"])
    return [as_arg(x) for x in a] if isinstance(a, list) else a


def run(case):
    err, out = io.StringIO(), io.StringIO()
    result = {}
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            if "main" in case:
                result["rc"] = importlib.import_module(case["main"]).main(case["argv"])
            else:
                module, _, qual = case["call"].partition(":")
                fn = importlib.import_module(module)
                for part in qual.split("."):
                    fn = getattr(fn, part)
                value = fn(*map(as_arg, case.get("args", [])), **case.get("kwargs", {}))
                plain = lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)  # noqa: E731
                result["value"] = json.loads(json.dumps(value, default=plain))
        except SystemExit as e:
            result["rc"] = e.code
        except BaseException as e:
            result["raised"] = type(e).__name__
            result["message"] = str(e)
            result["traceback"] = traceback.format_exc()[-3000:]
    result["stderr"] = err.getvalue()
    return result


results = {}
for case in json.loads(open(sys.argv[1]).read()):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:  # reset the peak-memory counter the fork inherited
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        start = status()
        limit = start["VmSize"] + (1 << 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CPU, (60, 60))  # a case that hangs is killed (and fails), not waited for
        before = tree(case["folder"])
        cpu, wall = time.process_time(), time.monotonic()
        result = run(case)
        result["cpu_s"] = time.process_time() - cpu
        result["wall_s"] = time.monotonic() - wall
        result["memory_growth"] = status()["VmHWM"] - start["VmRSS"]
        result["sockets"] = SOCKETS
        after = tree(case["folder"])
        result["changed"] = sorted(k for k in after if before.get(k) != after[k])
        with os.fdopen(w, "w") as f:
            f.write(json.dumps(result))
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    _, code = os.waitpid(pid, 0)
    results[case["id"]] = json.loads(text) if text else {"died": code}
    print(case["id"], results[case["id"]].get("wall_s"), file=sys.stderr)
print(json.dumps(results))
'''


# ---- crafted checkpoints ---------------------------------------------------------------------------------------

def _saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _generators(value: object) -> dict:
    return {cr.GENERATORS_KEY: {"z": value}}


def _records(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def nul_name_archive(marker: Path) -> bytes:
    """A valid checkpoint plus a second data.pkl whose name ends in a NUL byte and one more character.

    Python's zipfile cuts the name at the NUL (two `archive/data.pkl`); torch's reader keeps it whole: the two
    readers would unpickle different records.
    """
    benign = _records(_saved(_generators(nn.Module())))
    hostile = _records(_saved(_generators(_Payload(marker))))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in benign:
            zf.writestr(name, data)
        zf.writestr("archive/data.pklX", dict(hostile)["archive/data.pkl"])
    raw = buf.getvalue()
    assert raw.count(b"archive/data.pklX") == 2  # local header and central directory
    return raw.replace(b"archive/data.pklX", b"archive/data.pkl\x00")


def concatenated_archives(marker: Path) -> bytes:
    """A benign checkpoint followed by a hostile one: readers differ on which central directory they use."""
    return _saved(_generators(nn.Module())) + _saved(_generators(_Payload(marker)))


def doubled_graph(depth: int = 40) -> dict:
    """Modules that each hold the next one twice: 2**depth paths, depth + 1 objects."""
    bottom = nn.Linear(2, 2)
    for _ in range(depth):
        top = nn.Module()
        top._modules["a"] = bottom
        top._modules["b"] = bottom
        bottom = top
    return {**_generators(bottom), "graph": bottom}


def self_reference() -> dict:
    loop = nn.Module()
    loop._modules["me"] = loop
    loop._modules["prompt2token_proj"] = loop
    return {**_generators(loop), "loop": loop}


def deflate_bomb(inflated: int = 80 * 2**20) -> bytes:
    """A checkpoint whose data.pkl is deflated: 80 MiB of zeros in about 80 KB."""
    records = _records(_saved(_generators(nn.Module())))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records:
            if name.endswith("/data.pkl"):
                info = zipfile.ZipInfo(name)
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, "w", force_zip64=True) as f:
                    chunk = bytes(2**20)
                    for _ in range(inflated // len(chunk)):
                        f.write(chunk)
            else:
                zf.writestr(name, data)
    return buf.getvalue()


def zero_stride() -> dict:
    """One stored float viewed as a 100000 x 100000 tensor (40 GB if materialised)."""
    return {**_generators(nn.Module()), "w": torch.zeros(1).expand(100_000, 100_000)}


def repeated_layer(layers: int = 2000, width: int = 256) -> dict:
    """A CLIP-shaped generator whose encoder lists one small layer 2000 times: a 3 GB inverter from 2 MB."""
    def module(**children: nn.Module) -> nn.Module:
        m = nn.Module()
        for k, v in children.items():
            m.add_module(k, v)
        return m

    attn = module(**{f"{p}_proj": nn.Linear(width, width) for p in ("q", "k", "v", "out")})
    attn.num_heads = 4
    layer = module(self_attn=attn, layer_norm1=nn.LayerNorm(width), layer_norm2=nn.LayerNorm(width),
                   mlp=module(fc1=nn.Linear(width, width), fc2=nn.Linear(width, width)))
    encoder = module(layers=nn.ModuleList([layer] * layers))
    embeddings = module(token_embedding=nn.Embedding(100, width), position_embedding=nn.Embedding(77, width))
    proj = module(embeddings=embeddings, encoder=encoder, final_layer_norm=nn.LayerNorm(width))
    return _generators(module(prompt2token_proj=proj))


# ---- the harness ---------------------------------------------------------------------------------------------

# Offline, single-threaded; no progress bars (model loading draws them on stderr, which holds the refusal).
_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}

def _case(cases: list, folder: Path, case_id: str, **spec: object) -> None:
    cases.append({"id": case_id, "folder": str(folder), **spec})


def _convert(cases: list, root: Path, case_id: str, content: bytes | dict) -> None:
    folder = root / case_id
    folder.mkdir()
    path = folder / "checkpoint.pt"
    path.write_bytes(content if isinstance(content, bytes) else _saved(content))
    _case(cases, folder, case_id, main="adaface.convert_released", argv=[str(path), str(folder / "out")])


def _stage1_args(sd: str | Path, a2f: str | Path) -> list[str]:
    """A one-step stage-1 run on tiny models, a checkpoint after it."""
    return ["--config", str(ROOT / "training" / "configs" / "tiny.json"), "--no-tiny", "--sd-model", str(sd),
            "--arc2face", str(a2f), "--steps", "1", "--batch-size", "1", "--grad-accum", "1", "--denoise-steps", "1",
            "--denoise-step-weights", "1", "--expansions", "2:all", "--checkpoint-every", "1", "--device", "cpu",
            "--no-progress"]


def _resume_cases(cases: list, root: Path, sd: Path, a2f: Path) -> None:
    """A one-step stage-1 run on tiny models, then copies of its output folder whose checkpoint's state.json
    declares multipliers 2**20 copies wide (a terabyte of attention copies over 27 MB of weights) or is nested
    100,000 deep; each resumed with `--resume PATH`."""
    args = _stage1_args(sd, a2f)
    run = root / "resume-run"
    main = "import sys; from adaface.training.method.stage1 import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", main, *args, "--output-dir", str(run)], capture_output=True,
                          text=True, env=_ENV, timeout=600, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-4000:]
    step = Path("checkpoints") / "step-00000001"
    state = json.loads((run / step / "state.json").read_text())
    assert state["multipliers"] == [1, 1, 1, 1]
    for case_id, text in (("resume-multipliers", json.dumps({**state, "multipliers": [2**20] * 4})),
                          ("resume-deep-state", "[" * 100_000 + "]" * 100_000)):
        folder = root / case_id
        shutil.copytree(run, folder)
        (folder / step / "state.json").write_text(text)
        _case(cases, folder, case_id, main="adaface.training.method.stage1",
              argv=[*args, "--output-dir", str(folder), "--resume", str(folder / step)])


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_repo(hub: Path, repo_id: str, source: Path) -> Path:
    """`source` as the cached snapshot of hub repo `repo_id`, laid out as huggingface_hub keeps it (refs/main
    names the commit, snapshots/<commit>/ holds the files); returns the snapshot folder."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / HUB_COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    return repo / "snapshots" / HUB_COMMIT


def _edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _hub_cases(cases: list, root: Path, sd: Path, a2f: Path) -> dict[str, Path]:
    """Hub ids given as --sd-model / --base, answered from a local hub cache (HF_HUB_OFFLINE): a pipeline whose
    text encoder names a hub kernel, one whose model_index.json names a custom pipeline module shipped beside
    it (importing it would leave a marker file), and a clean one that loads, pinned to the commit checked."""
    from adaface.models._io import load_clip_text_model
    from adaface.models.prompt_inverter import PromptInverter

    hub = root / "hub"
    _hub_repo(hub, "fake/sd15", sd)
    snapshot = _hub_repo(hub, "fake/sd15-kernel", sd)
    _edit_json(snapshot / "text_encoder" / "config.json", attn_implementation="kernels-community/flash-attn")
    snapshot = _hub_repo(hub, "fake/sd15-custom", sd)
    marker = root / "custom-pipeline-ran"
    _edit_json(snapshot / "model_index.json", _class_name=["pipeline_custom", "CustomPipeline"])
    (snapshot / "pipeline_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")

    _case(cases, hub, "hub-base-stage1", main="adaface.training.method.stage1",
          argv=[*_stage1_args("fake/sd15-kernel", a2f), "--output-dir", str(root / "hub-run-stage1")])
    inverter = root / "tiny-inverter"
    PromptInverter(load_clip_text_model(sd), tokenizer=sd / "tokenizer").save_pretrained(inverter)
    _case(cases, hub, "hub-base-generate", main="adaface.generate",
          argv=["--base", "fake/sd15-custom", "--arc2face", str(a2f), "--inverter", str(inverter), "--random-id",
                "3", "--num-images", "1", "--steps", "1", "--height", "16", "--width", "16", "--device", "cpu",
                "--out", str(root / "hub-run-generate")])
    _case(cases, hub, "hub-source", call="adaface.models._io:check_model_source", args=["fake/sd15"])
    _case(cases, hub, "hub-text-encoder", call="adaface.models._io:load_clip_text_model", args=["fake/sd15"])
    _case(cases, hub, "hub-tokenizer", call="adaface.models._io:load_tokenizer", args=["fake/sd15"])
    return {"marker": marker}


def _unet_config_cases(cases: list, root: Path, sd: Path, a2f: Path) -> None:
    """Arc2Face folders whose UNet config.json would have diffusers import a module, hand the weights to a
    quantizer (gguf, nunchaku: kernels from the hub), follow an auto_map, or that nests too deep; the first also
    given to stage 1 as --arc2face."""
    for case_id, change in {
        "unet-custom-class": {"_class_name": ["unet_custom", "CustomUNet"]},
        "unet-quantized": {"quantization_config": {"quant_method": "gguf", "compute_dtype": "float32"}},
        "unet-auto-map": {"auto_map": {"AutoModel": "unet_custom.CustomUNet"}},
        "unet-deep": None,
    }.items():
        folder = root / case_id
        shutil.copytree(a2f, folder / "arc2face-model")
        config = folder / "arc2face-model" / "arc2face" / "config.json"
        if change is None:
            config.write_text("[" * 100_000 + "]" * 100_000)
        else:
            _edit_json(config, **change)
        _case(cases, folder, case_id, call="adaface.models.arc2face:Arc2Face.from_pretrained",
              args=[str(folder / "arc2face-model")], kwargs={"tokenizer": str(sd / "tokenizer")})
        if case_id == "unet-quantized":
            _case(cases, folder, "unet-quantized-stage1", main="adaface.training.method.stage1",
                  argv=[*_stage1_args(sd, folder / "arc2face-model"), "--output-dir", str(folder / "out")])
    # A local pipeline folder with a custom component module where diffusers would import it.
    folder = root / "pipeline-component-code"
    shutil.copytree(sd, folder / "sd15")
    (folder / "sd15" / "text_encoder" / "transformers.py").write_text("raise SystemExit('imported')\n")
    _case(cases, folder, "pipeline-component-code", call="adaface.models._io:check_model_source",
          args=[str(folder / "sd15")])


def _size_cases(cases: list, root: Path, sd: Path, a2f: Path) -> None:
    """Model folders whose configs declare far more than their weights hold, each opened by the loader and by a
    command: the Arc2Face UNet 64 times wider (12 GiB from a 4 MB folder); text encoders with 20 million
    tokens (38 GiB), one pickled (the Arc2Face encoder's pytorch_model.bin) and one in an SD pipeline; a text
    encoder of a million layers, a UNet of 200 transformer layers per block (more modules than MAX_MODULES), an
    inverter of a million layers, a scheduler of a billion training timesteps (its tables would take 27 GiB),
    CLIP and DINO processors that would resize every image to 100,000 or a million pixels a side.
    The clean tiny models are the control."""
    def copy(case_id: str, source: Path, name: str) -> Path:
        shutil.copytree(source, root / case_id / name)
        return root / case_id / name

    tok = str(sd / "tokenizer")
    wide = copy("unet-wide", a2f, "arc2face-model")
    unet = json.loads((a2f / "arc2face" / "config.json").read_text())
    _edit_json(wide / "arc2face" / "config.json", block_out_channels=[64 * c for c in unet["block_out_channels"]])
    _case(cases, wide.parent, "unet-wide", call="adaface.models.arc2face:Arc2Face.from_pretrained",
          args=[str(wide)], kwargs={"tokenizer": tok})
    _case(cases, wide.parent, "unet-wide-stage1", main="adaface.training.method.stage1",
          argv=[*_stage1_args(sd, wide), "--output-dir", str(wide.parent / "out")])
    vocab = copy("encoder-vocab", a2f, "arc2face-model")
    _edit_json(vocab / "encoder" / "config.json", vocab_size=20_000_000)
    if (vocab / "encoder" / "model.safetensors").exists():  # pickled, as the released encoder is
        from safetensors.torch import load_file

        torch.save(load_file(vocab / "encoder" / "model.safetensors"), vocab / "encoder" / "pytorch_model.bin")
        (vocab / "encoder" / "model.safetensors").unlink()
    _case(cases, vocab.parent, "encoder-vocab", call="adaface.models._io:load_clip_text_model", args=[str(vocab)],
          kwargs={"subfolder": "encoder", "what": "Arc2Face encoder"})
    vocab = copy("pipeline-vocab", sd, "sd15")
    _edit_json(vocab / "text_encoder" / "config.json", vocab_size=20_000_000)
    _case(cases, vocab.parent, "pipeline-vocab-stage1", main="adaface.training.method.stage1",
          argv=[*_stage1_args(vocab, a2f), "--output-dir", str(vocab.parent / "out")])
    _case(cases, vocab.parent, "pipeline-vocab-generate", main="adaface.generate",
          argv=["--base", str(vocab), "--arc2face", str(a2f), "--inverter", str(root / "tiny-inverter"),
                "--random-id", "3", "--num-images", "1", "--steps", "1", "--height", "16", "--width", "16",
                "--device", "cpu", "--out", str(vocab.parent / "out")])
    deep = copy("pipeline-layers", sd, "sd15")
    _edit_json(deep / "text_encoder" / "config.json", num_hidden_layers=1_000_000)
    _case(cases, deep.parent, "pipeline-layers", main="adaface.training.method.stage1",
          argv=[*_stage1_args(deep, a2f), "--output-dir", str(deep.parent / "out")])
    steps = copy("scheduler-steps", sd, "sd15")
    _edit_json(steps / "scheduler" / "scheduler_config.json", num_train_timesteps=1_000_000_000)
    _case(cases, steps.parent, "scheduler-steps", main="adaface.training.method.stage1",
          argv=[*_stage1_args(steps, a2f), "--output-dir", str(steps.parent / "out")])
    many = copy("unet-modules", sd, "sd15")
    _edit_json(many / "unet" / "config.json", transformer_layers_per_block=200)
    _case(cases, many.parent, "unet-modules", call="adaface.models._io:check_model_source", args=[str(many)],
          kwargs={"models": "pipeline"})
    deep = copy("inverter-layers", root / "tiny-inverter", "inverter")
    config = json.loads((deep / "config.json").read_text())
    _edit_json(deep / "config.json", text_config={**config["text_config"], "num_hidden_layers": 1_000_000})
    _case(cases, deep.parent, "inverter-layers", call="adaface.models.prompt_inverter:PromptInverter.from_pretrained",
          args=[str(deep)])
    snapshot = _hub_repo(root / "hub", "fake/sd15-vocab", sd)  # the same for a hub id, on its snapshot
    _edit_json(snapshot / "text_encoder" / "config.json", vocab_size=20_000_000)
    _case(cases, root / "hub", "hub-vocab", call="adaface.models._io:load_clip_text_model", args=["fake/sd15-vocab"])
    from adaface.testing.tiny_models import save_tiny_clip, save_tiny_dino

    clip = save_tiny_clip(root / "processor-clip" / "clip", sd / "tokenizer")  # --clip: a crop of 100,000 pixels
    processor = json.loads((clip / "processor_config.json").read_text())
    processor["image_processor"]["crop_size"] = {"height": 100_000, "width": 100_000}
    (clip / "processor_config.json").write_text(json.dumps(processor))
    _case(cases, clip.parent, "processor-clip", call="adaface.models._io:check_model_source", args=[str(clip)])
    dino = save_tiny_dino(root / "processor-dino" / "dino")  # --dino: images resized to 1,000,000 pixels wide
    _edit_json(dino / "preprocessor_config.json", size={"height": 32, "width": 1_000_000})
    _case(cases, dino.parent, "processor-dino", call="adaface.models._io:check_model_source", args=[str(dino)])
    _case(cases, sd, "clean-pipeline", call="adaface.models._io:check_model_source", args=[str(sd)],
          kwargs={"models": "pipeline"})
    _case(cases, a2f, "clean-arc2face", call="adaface.models.arc2face:Arc2Face.from_pretrained", args=[str(a2f)],
          kwargs={"tokenizer": tok})


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict:
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("untrusted")
    cases: list[dict] = []
    markers = {k: root / f"{k}-ran" for k in ("nul", "concat")}
    _convert(cases, root, "nul-name", nul_name_archive(markers["nul"]))
    _convert(cases, root, "concatenated", concatenated_archives(markers["concat"]))
    _convert(cases, root, "doubled-graph", doubled_graph())
    _convert(cases, root, "self-reference", self_reference())
    _convert(cases, root, "deflate-bomb", deflate_bomb())
    _convert(cases, root, "zero-stride", zero_stride())
    _convert(cases, root, "repeated-layer", repeated_layer())

    # Model configs that would fetch code or a kernel from the hub.
    arc2face = root / "arc2face-src"
    tiny = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=16)
    CLIPTextModel(tiny).save_pretrained(arc2face / "encoder")
    config = json.loads((arc2face / "encoder" / "config.json").read_text())
    for case_id, extra in {"hub-kernel": {"attn_implementation": "kernels-community/flash-attn"},
                           "flash-fallback": {"_attn_implementation": "flash_attention_2"},
                           "auto-map": {"auto_map": {"AutoModel": "someone/repo--modeling.Model"}},
                           "sdpa-config": {"attn_implementation": "sdpa"}}.items():
        folder = root / case_id
        (folder / "encoder").mkdir(parents=True)
        for f in (arc2face / "encoder").iterdir():
            (folder / "encoder" / f.name).write_bytes(f.read_bytes())
        (folder / "encoder" / "config.json").write_text(json.dumps({**config, **extra}))
        _case(cases, folder, case_id, call="adaface.models._io:load_clip_text_model", args=[str(folder)],
              kwargs={"subfolder": "encoder", "what": "Arc2Face encoder"})
        if case_id == "hub-kernel":  # the same file inside a pipeline folder (generate --base)
            _case(cases, folder, "pipeline-hub-kernel", call="adaface.models._io:check_model_folder",
                  args=[str(folder)])
        if case_id == "sdpa-config":  # the control: a config naming a built-in attention loads
            cases[-1]["call"] = "adaface.models._io:read_model_config"
            cases[-1]["args"] = [str(folder / "encoder" / "config.json")]
            cases[-1].pop("kwargs")

    # An inverter folder whose config declares far more than its weights hold.
    folder = root / "declared-size"
    folder.mkdir()
    text_config = {"vocab_size": 10_000_000, "hidden_size": 1024, "max_position_embeddings": 77,
                   "intermediate_size": 4096, "num_hidden_layers": 12, "num_attention_heads": 16}
    (folder / "config.json").write_text(json.dumps({
        "format": "adaface-prompt-inverter", "format_version": 1, "num_id_tokens": 16, "template": "photo of a",
        "input_ids": [0] * 77, "slot_start": 4, "multipliers": [1] * 12, "mode": "kv", "text_config": text_config}))
    save_file({"layer_weights": torch.ones(3)}, str(folder / "model.safetensors"))
    _case(cases, folder, "declared-size", call="adaface.models.prompt_inverter:PromptInverter.from_pretrained",
          args=[str(folder)])

    # Malformed structured files: deep JSON, a safetensors header that lies about its length.
    folder = root / "deep-json"
    folder.mkdir()
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    _case(cases, folder, "deep-json", call="adaface.models._io:read_model_config", args=[str(folder / "config.json")])
    folder = root / "bad-safetensors"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    (folder / "short.safetensors").write_bytes((64).to_bytes(8, "little") + b'{"w": {"dtype": "F32"')
    for name in ("model", "short"):
        _case(cases, folder, f"bad-safetensors-{name}", call="adaface.models._io:safetensors_elements",
              args=[str(folder / f"{name}.safetensors")])

    # An ArcFace .npy whose header declares 20 GB over 2 KB of data, and one whose header is not a dict.
    import numpy as np

    folder = root / "npy"
    folder.mkdir()
    for name, header in (("huge", {"descr": "<f4", "fortran_order": False, "shape": (10**7, 512)}),
                         ("garbled", None)):
        buf = io.BytesIO()
        if header is None:
            buf.write(b"\x93NUMPY\x01\x00" + (118).to_bytes(2, "little") + b"[" * 117 + b"\n")
        else:
            np.lib.format.write_array_header_1_0(buf, header)
        buf.write(bytes(2048))
        (folder / f"{name}.npy").write_bytes(buf.getvalue())
        _case(cases, folder, f"npy-{name}", call="adaface.subject:load_arcface_embedding",
              args=[str(folder / f"{name}.npy")])

    # A prepared folder whose manifest points outside it, and at a FIFO inside it.
    outside = root / "outside.png"
    outside.write_bytes(b"not read")
    folder = root / "manifest"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    os.mkfifo(folder / "images" / "fifo.png")
    os.symlink(outside, folder / "images" / "link.png")
    (folder / "masks" / "m.png").write_bytes(b"x")
    lines = [{"key": "abs", "image": str(outside)}, {"key": "up", "image": "../outside.png"},
             {"key": "link", "image": "images/link.png"}, {"key": "fifo", "image": "images/fifo.png"},
             {"key": "proc", "image": "/proc/self/environ"}]
    (folder / "manifest.jsonl").write_text("".join(json.dumps({**e, "status": "ok", "mask": "masks/m.png"}) + "\n"
                                                   for e in lines) + "[" * 100_000 + "\n")
    _case(cases, folder, "manifest-paths", call="adaface.training.engine.data:list_entries", args=[str(folder)])
    # Class-word tables with a NUL byte and with bytes that are not UTF-8.
    folder = root / "csv"
    folder.mkdir()
    (folder / "nul.csv").write_bytes(b"path,class_word\nalice,wo\x00man\n")
    (folder / "codec.csv").write_bytes(b"path,class_word\nalice,\xff\xfeman\n")
    for name in ("nul", "codec"):
        _case(cases, folder, f"csv-{name}", call="adaface.faces.class_words:ClassWords.from_csv",
              args=[str(folder / f"{name}.csv")])
    # A FIFO among the photos prepare_data reads.
    folder = root / "photos"
    folder.mkdir()
    os.mkfifo(folder / "fifo.jpg")
    _case(cases, folder, "photo-fifo", call="adaface.prepare_data:decode",
          args=[["fifo.jpg", {"path": str(folder / "fifo.jpg")}]])

    # A planted settings.json listing files that are not a run's outputs; and the recorded control.
    folder = root / "planted"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's own notes")
    (folder / "ti.safetensors").write_bytes(b"the user's own file")
    (folder / "settings.json").write_text(json.dumps({
        "tool": "adaface.generate", "outputs": [{"file": "notes.txt"}, {"file": "p00_000.png"}],
        "subject": {"embeddings_file": str((folder / "ti.safetensors").resolve())},
        "written": {"ti.safetensors": {"size": 1, "sha256": "0" * 64}}}))
    (folder / "p00_000.png").write_bytes(b"an output")
    _case(cases, folder, "planted-settings", call="adaface.generate:earlier_run", args=[{"path": str(folder)}])
    folder = root / "recorded"
    folder.mkdir()
    (folder / "ti.safetensors").write_bytes(b"written by the run")
    from adaface.generate import fingerprint

    (folder / "settings.json").write_text(json.dumps({
        "tool": "adaface.generate", "outputs": [],
        "subject": {"embeddings_file": str((folder / "ti.safetensors").resolve())},
        "written": {"ti.safetensors": fingerprint(folder / "ti.safetensors")}}))
    _case(cases, folder, "recorded-settings", call="adaface.generate:earlier_run", args=[{"path": str(folder)}])

    from adaface.training.method.stage1 import build_tiny_models

    sd, a2f = build_tiny_models(root / "tiny-models", seed=0)
    _resume_cases(cases, root, sd, a2f)
    hub = _hub_cases(cases, root, sd, a2f)
    _unet_config_cases(cases, root, sd, a2f)
    _size_cases(cases, root, sd, a2f)

    spec = root / "cases.json"
    spec.write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, "-c", HARNESS, str(spec)], capture_output=True, text=True,
                          env={**_ENV, "HF_HUB_CACHE": str(root / "hub")}, timeout=900, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"results": results, "root": root, "markers": {**markers, "custom-pipeline": hub["marker"]}}


def _bounded(r: dict) -> None:
    assert "died" not in r, r
    assert r["cpu_s"] < CPU_BUDGET_S, r["cpu_s"]
    assert r["memory_growth"] < MEMORY_BUDGET, r["memory_growth"]
    assert r["sockets"] == [], r["sockets"]


def _refused_by_command(r: dict, *fragments: str) -> None:
    """Exit status 2, one line on stderr naming each fragment, no traceback, nothing written."""
    _bounded(r)
    assert r.get("rc") == 2, r
    assert r["stderr"].count("\n") == 1 and "Traceback" not in r["stderr"], r["stderr"]
    for fragment in fragments:
        assert fragment in r["stderr"], (fragment, r["stderr"])
    assert r["changed"] == [], r["changed"]


def _refused_by_loader(r: dict, exc: str, *fragments: str) -> None:
    _bounded(r)
    assert r.get("raised") == exc, r
    assert "\n" not in r["message"], r["message"]
    for fragment in fragments:
        assert fragment in r["message"], (fragment, r["message"])
    assert r["changed"] == [], r["changed"]


@pytest.mark.parametrize("case, fragments", [
    ("nul-name", ("holds the byte '\\x00'", "checkpoint.pt")),
    ("concatenated", ("does not start at the file's first byte", "checkpoint.pt")),
    ("deflate-bomb", ("MAX_PICKLE_BYTES", "checkpoint.pt")),
    ("zero-stride", ("zero or overlapping strides", "checkpoint.pt")),
    ("repeated-layer", ("BYTES_PER_PARAMETER", "checkpoint.pt")),
])
def test_crafted_checkpoints_are_refused_in_one_line(outcomes, case, fragments):
    _refused_by_command(outcomes["results"][case], *fragments)
    assert not any(m.exists() for m in outcomes["markers"].values())


@pytest.mark.parametrize("case, fragment", [("doubled-graph", "no Arc2Face-based subject generator"),
                                            ("self-reference", "is not a CLIP text model")])
def test_shared_and_cyclic_module_graphs_are_walked_once(outcomes, case, fragment):
    # Readable checkpoints that are not released ones: every walk over them finishes, and says so in one line.
    _refused_by_command(outcomes["results"][case], fragment)


def test_the_crafted_checkpoints_are_what_they_claim():
    # The differentials: Python's zipfile reads the NUL name as a second archive/data.pkl, and reads the
    # concatenated file's second archive; the bomb inflates past the limit.
    raw = nul_name_archive(Path("/nonexistent"))
    names = zipfile.ZipFile(io.BytesIO(raw)).namelist()
    assert names.count("archive/data.pkl") == 2
    with zipfile.ZipFile(io.BytesIO(concatenated_archives(Path("/nonexistent")))) as zf:
        assert b"posix" in zf.read("archive/data.pkl") or b"system" in zf.read("archive/data.pkl")
    bomb = deflate_bomb()
    info = zipfile.ZipFile(io.BytesIO(bomb)).getinfo("archive/data.pkl")
    assert len(bomb) < 2**20 and info.file_size > cr.su.MAX_PICKLE_BYTES
    assert zero_stride()["w"].stride() == (0, 0)


@pytest.mark.parametrize("case, fragment", [
    ("hub-kernel", "kernels-community/flash-attn"), ("flash-fallback", "flash_attention_2"), ("auto-map", "auto_map"),
    ("pipeline-hub-kernel", "kernels-community/flash-attn")])
def test_configs_that_would_load_from_the_hub_are_refused(outcomes, case, fragment):
    _refused_by_loader(outcomes["results"][case], "UnsafeFileError", fragment, "config.json")


def test_a_config_naming_builtin_attention_is_accepted(outcomes):
    r = outcomes["results"]["sdpa-config"]
    _bounded(r)
    assert r["value"]["attn_implementation"] == "sdpa"


def test_declared_size_larger_than_the_weights_is_refused_before_allocation(outcomes):
    _refused_by_loader(outcomes["results"]["declared-size"], "UnsafeFileError", "declares a model of",
                       "refused before allocating")


@pytest.mark.parametrize("case, fragment", [
    ("deep-json", "MAX_JSON_DEPTH"), ("bad-safetensors-model", "not a safetensors file"),
    ("bad-safetensors-short", "not a valid safetensors file")])
def test_malformed_structured_files_get_one_line(outcomes, case, fragment):
    _refused_by_loader(outcomes["results"][case], "UnsafeFileError", fragment)


@pytest.mark.parametrize("case", ["npy-huge", "npy-garbled"])
def test_npy_headers_are_checked_against_the_file(outcomes, case):
    _refused_by_loader(outcomes["results"][case], "ValueError", "not a plain numeric .npy array")


@pytest.mark.parametrize("case, fragment", [("csv-nul", "nul.csv line 2: holds a NUL byte"),
                                            ("csv-codec", "codec.csv: not UTF-8 text (invalid start byte at byte 22)")])
def test_malformed_csv_gets_one_line_naming_where(outcomes, case, fragment):
    _refused_by_loader(outcomes["results"][case], "ValueError", fragment)


def test_manifest_paths_stay_inside_the_folder(outcomes):
    r = outcomes["results"]["manifest-paths"]
    _bounded(r)
    entries, problems = r["value"]
    assert entries == []
    text = "\n".join(problems)
    for key, why in (("abs", "leads outside"), ("up", "leads outside"), ("link", "leads outside"),
                     ("fifo", "not a regular file"), ("proc", "leads outside")):
        assert any(p.startswith(f"{key}:") and why in p for p in problems), (key, text)
    assert "manifest.jsonl line 6: not JSON" in problems  # nested 100,000 deep


def test_a_fifo_among_the_photos_gets_a_status(outcomes):
    r = outcomes["results"]["photo-fifo"]
    _bounded(r)
    assert r["value"]["status"] == "not_a_file", r["value"]


def test_overwrite_never_deletes_files_a_planted_settings_json_names(outcomes):
    root = outcomes["root"]
    r = outcomes["results"]["planted-settings"]
    _bounded(r)
    names = sorted(Path(p).name for p in r["value"])
    assert names == ["p00_000.png", "settings.json"]  # not notes.txt, not the unrecorded ti.safetensors
    r = outcomes["results"]["recorded-settings"]
    assert sorted(Path(p).name for p in r["value"]) == ["settings.json", "ti.safetensors"]
    assert (root / "planted" / "notes.txt").exists()


@pytest.mark.parametrize("case, fragments", [
    ("resume-multipliers", ("state.json declares multipliers [1048576, 1048576, 1048576, 1048576]",
                            "inverter.safetensors holds", "refused before allocating", "step-00000001")),
    ("resume-deep-state", ("state.json is damaged", "MAX_JSON_DEPTH = 64"))])
def test_a_planted_resume_state_is_refused_before_allocating(outcomes, case, fragments):
    # The checkpoint's own weights bound what a resume allocates; nothing in the run's folder changes (the
    # metrics log is cut back to the resumed step only once the state fits).
    _refused_by_command(outcomes["results"][case], "--resume", *fragments)


def _refused_by_parser(r: dict, *fragments: str) -> None:
    """An argparse command's refusal: exit status 2, its usage, then one error line naming each fragment."""
    _bounded(r)
    assert r.get("rc") == 2, r
    errors = [line for line in r["stderr"].splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in r["stderr"], r["stderr"]
    assert r["stderr"].rstrip("\n").splitlines()[-1] == errors[0], r["stderr"]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert r["changed"] == [], r["changed"]


def test_a_hub_base_is_checked_on_its_snapshot_before_loading(outcomes):
    # The configs of a hub id come from its snapshot (here the offline cache) and are checked before any
    # from_pretrained acts on them: no kernel fetched, no custom pipeline module imported, nothing written.
    results = outcomes["results"]
    _refused_by_command(results["hub-base-stage1"], "--sd-model fake/sd15-kernel", "kernels-community/flash-attn",
                        f"snapshots/{HUB_COMMIT}/text_encoder/config.json")
    _refused_by_parser(results["hub-base-generate"], "--base fake/sd15-custom", "_class_name",
                       f"snapshots/{HUB_COMMIT}/model_index.json")
    assert not outcomes["markers"]["custom-pipeline"].exists()
    assert not (outcomes["root"] / "hub-run-stage1").exists() and not (outcomes["root"] / "hub-run-generate").exists()


def test_a_clean_hub_id_loads_offline_pinned_to_the_commit_checked(outcomes):
    results = outcomes["results"]
    for case in ("hub-source", "hub-text-encoder", "hub-tokenizer"):
        _bounded(results[case])
        assert "value" in results[case], results[case]
        assert results[case]["changed"] == [], results[case]["changed"]
    folder, pin = results["hub-source"]["value"]
    assert pin == {"revision": HUB_COMMIT} and folder.endswith(f"snapshots/{HUB_COMMIT}")
    assert results["hub-text-encoder"]["value"].startswith("CLIPTextModel(")
    # the SD pipeline's tokenizer/ (the repo root holds none: the empty tokenizer transformers would make there
    # splits every word into unknown tokens)
    assert "CLIPTokenizer" in results["hub-tokenizer"]["value"]
    assert "vocab_size=2," not in results["hub-tokenizer"]["value"].replace(" ", "")


@pytest.mark.parametrize("case, fragment", [
    ("unet-custom-class", "_class_name ['unet_custom', 'CustomUNet'] names a custom module"),
    ("unet-quantized", "quantization_config"), ("unet-auto-map", "auto_map"), ("unet-deep", "MAX_JSON_DEPTH"),
    ("pipeline-component-code", "text_encoder/transformers.py")])
def test_diffusers_configs_that_would_load_code_are_refused(outcomes, case, fragment):
    _refused_by_loader(outcomes["results"][case], "UnsafeFileError", fragment)


def test_the_arc2face_unet_config_is_checked_by_the_training_command(outcomes):
    _refused_by_command(outcomes["results"]["unet-quantized-stage1"], "--arc2face", "arc2face/config.json",
                        "quantization_config")


@pytest.mark.parametrize("case, fragments", [
    ("unet-wide", ("arc2face/config.json: declares a UNet2DConditionModel of 3,177,799,684 elements",
                   "diffusion_pytorch_model.safetensors holds 946,564", "refused before allocating it")),
    ("encoder-vocab", ("encoder/config.json: declares a CLIPTextModel of 10,246,352,461 elements",
                       "pytorch_model.bin holds at most")),
    ("unet-modules", ("unet/config.json: builds more than MAX_MODULES = 12,000 modules",)),
    ("processor-clip", ("clip/processor_config.json: crop_size 100,000 is over MAX_IMAGE_SIDE = 2,048 pixels",)),
    ("processor-dino", ("dino/preprocessor_config.json: size 1,000,000 is over MAX_IMAGE_SIDE",)),
    ("hub-vocab", (f"snapshots/{HUB_COMMIT}/text_encoder/config.json: declares a CLIPTextModel of 10,246,352,461",
                   "model.safetensors holds 6,659,072")),
    ("inverter-layers", ("num_hidden_layers declares 1,000,000 layers or blocks, over MAX_LAYERS = 256",))])
def test_a_model_declaring_more_than_its_weights_is_refused_before_allocation(outcomes, case, fragments):
    _refused_by_loader(outcomes["results"][case], "UnsafeFileError", *fragments)


@pytest.mark.parametrize("case, fragments", [
    ("unet-wide-stage1", ("--arc2face", "declares a UNet2DConditionModel of 3,177,799,684 elements")),
    ("pipeline-vocab-stage1", ("--sd-model", "text_encoder/config.json: declares a CLIPTextModel of 10,246,352,461",
                               "model.safetensors holds 6,659,072")),
    ("pipeline-layers", ("--sd-model", "num_hidden_layers declares 1,000,000 layers or blocks")),
    ("scheduler-steps", ("--sd-model", "scheduler_config.json: num_train_timesteps 1,000,000,000 is over "
                         "MAX_TRAIN_TIMESTEPS = 100,000"))])
def test_the_commands_refuse_a_declared_size_in_one_line(outcomes, case, fragments):
    _refused_by_command(outcomes["results"][case], *fragments)


def test_generate_refuses_a_declared_size_in_one_line(outcomes):
    _refused_by_parser(outcomes["results"]["pipeline-vocab-generate"], "--base",
                       "text_encoder/config.json: declares a CLIPTextModel of 10,246,352,461 elements")


def test_the_clean_tiny_models_pass_the_size_check(outcomes):
    results = outcomes["results"]
    for case in ("clean-pipeline", "clean-arc2face"):
        _bounded(results[case])
        assert "value" in results[case], results[case]
    assert results["clean-arc2face"]["value"].startswith("Arc2Face(")


def test_declared_sizes_match_the_weights_of_saved_models(tmp_path):
    # Built on the meta device, a saved model declares what its safetensors file holds, plus its non-persistent
    # buffers (CLIP's 77 position ids); tied weights count once (GPT-2's output layer is its token table).
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, GPT2Config, GPT2LMHeadModel

    from adaface.models._io import DECLARED_SLACK, check_model_size, declared_size, stored_elements
    from adaface.testing.tiny_models import save_tiny_sd15

    sd = save_tiny_sd15(tmp_path / "sd15")
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    assert gpt.lm_head.weight is gpt.transformer.wte.weight
    gpt.save_pretrained(tmp_path / "gpt2")
    for folder, cls, buffers in ((sd / "text_encoder", CLIPTextModel, 77), (sd / "unet", UNet2DConditionModel, 0),
                                 (sd / "vae", AutoencoderKL, 0), (tmp_path / "gpt2", GPT2LMHeadModel, 0)):
        elements, nbytes = declared_size(cls, folder)
        stored, _ = stored_elements(folder)
        assert elements - stored == buffers <= DECLARED_SLACK, (folder, elements, stored)
        assert nbytes == 4 * elements + 4 * buffers  # float32 parameters, int64 position ids
        check_model_size(folder, cls)


def test_declared_size_of_released_shapes_is_counted_without_allocating(tmp_path):
    # SD-1.5's UNet (859,520,964 parameters, 3.4 GB in float32) and CLIP ViT-L/14's text encoder (123,060,480,
    # plus 77 position ids), counted from their configs on the meta device.
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from adaface.models._io import declared_size

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({
        "_class_name": "UNet2DConditionModel", "sample_size": 64, "cross_attention_dim": 768,
        "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "attention_head_dim": 8,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}))
    CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768).save_pretrained(tmp_path / "text")
    assert declared_size(UNet2DConditionModel, tmp_path / "unet")[0] == 859_520_964
    assert declared_size(CLIPTextModel, tmp_path / "text")[0] == 123_060_480 + 77


def test_sharded_weights_are_counted_from_their_index(tmp_path):
    # A sharded checkpoint holds the sum of its shards' headers; a shard named outside the folder is refused.
    from transformers import CLIPTextConfig, CLIPTextModel

    from adaface.models._io import UnsafeFileError, check_model_size, stored_elements

    model = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1))
    model.save_pretrained(tmp_path / "text", max_shard_size="100KB")
    index = tmp_path / "text" / "model.safetensors.index.json"
    assert index.is_file() and len(list((tmp_path / "text").glob("model-*.safetensors"))) > 1
    stored, said = stored_elements(tmp_path / "text")
    assert stored == sum(p.numel() for p in model.parameters()) and said.startswith(f"{index} holds")
    check_model_size(tmp_path / "text", CLIPTextModel)
    _edit_json(tmp_path / "text" / "config.json", vocab_size=20_000_000)
    declared = r"declares a CLIPTextModel of 1,280,068,112 elements .*index\.json holds 132,096;"
    with pytest.raises(UnsafeFileError, match=declared):
        check_model_size(tmp_path / "text", CLIPTextModel)
    weight_map = json.loads(index.read_text())["weight_map"]
    index.write_text(json.dumps({"weight_map": {**weight_map, "x": "../model-00001-of-00002.safetensors"}}))
    with pytest.raises(UnsafeFileError, match="is not a file name beside the index"):
        stored_elements(tmp_path / "text")
    index.write_text(json.dumps([weight_map]))  # not an object at the top
    with pytest.raises(UnsafeFileError, match="expected a weight_map of tensor names to shard files"):
        stored_elements(tmp_path / "text")

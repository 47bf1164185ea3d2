"""Loading helpers shared by the models: local folder or hub id, tokenizer discovery, atomic safe writes.

Checkpoints written by this package are safetensors + JSON, each written to a temporary file in the target
folder and moved into place with `os.replace`, so a crash never leaves a half-written file under the final name.

Files read from elsewhere are checked before use (`read_json`, `read_model_config`, `safetensors_elements`):
regular files within size and nesting limits, and model configs that cannot load code (`auto_map`) or a
hub kernel (an `attn_implementation` other than eager / sdpa; transformers fetches a kernel from the hub for
kernel names and, where flash-attn is not installed, for `flash_attention_*`). Diffusers configs also may not
name a custom module or a quantizer, nor a pipeline folder hold Python files (`check_diffusers_config`). A hub
id is checked on its snapshot before any loader sees it (`check_model_source`). A model a loader builds from
its config is first built on the meta device (no memory) and its size compared with the weights file's header
(`check_model_size`). A refusal is an `UnsafeFileError` naming the file.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .._files import create_temp_sibling

PathLike = str | os.PathLike
MAX_JSON_BYTES = 16 * 2**20  # config.json / settings.json / state files: ours are a few KB
MAX_JSON_DEPTH = 64  # nesting of a JSON file (configs nest 3 deep)
MAX_SAFETENSORS_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on its JSON header
FILE_ATTENTION = (None, "eager", "sdpa")  # attn_implementation values a config file may name
# What building a model from its config costs before any weight is compared: the deepest released models have
# about 130 layers and an SD-1.5 UNet registers 708 modules (about 0.15 s on the meta device; a module takes
# about 0.25 ms, so the bound is about 3 s of work).
MAX_LAYERS = 256  # any layer or block count a config declares, and the length of its per-block lists
MAX_MODULES = 12_000  # modules a model built from a config may register
# What a model may declare beyond its weights file: non-persistent buffers (CLIP's position ids) are built but
# not saved, and a loader initialises afresh the layers a checkpoint lacks (a ViT-H's pooler, as AutoModel
# builds it, is 1.6 million elements). 2**22 elements is 16 MiB in float32.
DECLARED_SLACK = 2**22
# A scheduler allocates several tables of num_train_timesteps entries when built (50 million took 1.3 GiB);
# SD-1.5's has 1000.
MAX_TRAIN_TIMESTEPS = 100_000
LAYER_KEY = re.compile(r"(layers?|depths?|blocks|per_block|block_types)$")
# An image processor resizes every image to the sizes its config names before the model sees it: CLIP and DINO
# use 224 to 518 pixels; 2048 is 48 MiB per image as float32.
MAX_IMAGE_SIDE = 2048
IMAGE_SIZE_KEY = re.compile(r"(size|edge|height|width)$")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


class UnsafeFileError(OSError):
    """A file refused before use: malformed, over a size limit, or able to load code or reach the network.

    An OSError, so the commands' loaders report it as a one-line error naming the option and the file.
    """


def first_line(e: BaseException) -> str:
    """An exception's message cut to one line (its type name when it has none), for one-line errors."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def json_depth(obj: Any) -> int:
    depth, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            depth = max(depth, d)
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return depth


def read_json(path: PathLike, *, what: str = "JSON file", max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file from a regular file within MAX_JSON_BYTES and MAX_JSON_DEPTH, or a one-line UnsafeFileError."""
    path = Path(path)
    if not path.is_file():
        raise UnsafeFileError(f"{what} {path}: not a regular file" if path.exists() else f"{what} {path}: not found")
    size = path.stat().st_size
    if size > max_bytes:
        raise UnsafeFileError(f"{what} {path}: {size:,} bytes, over the limit of {max_bytes:,}")
    try:
        obj = json.loads(path.read_bytes())
    except RecursionError:
        raise UnsafeFileError(f"{what} {path}: nested deeper than MAX_JSON_DEPTH = {MAX_JSON_DEPTH}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UnsafeFileError(f"{what} {path}: not valid JSON ({first_line(e)})") from None
    if json_depth(obj) > MAX_JSON_DEPTH:
        raise UnsafeFileError(f"{what} {path}: nested deeper than MAX_JSON_DEPTH = {MAX_JSON_DEPTH}")
    return obj


def _dicts(cfg: dict) -> Iterator[dict]:
    stack = [cfg]
    while stack:
        d = stack.pop()
        yield d
        stack.extend(v for v in d.values() if isinstance(v, dict))


def check_model_config(cfg: Any, path: PathLike) -> dict:
    """`cfg` (a config.json's content) unless it would have transformers load code or a kernel from the hub."""
    if not isinstance(cfg, dict):
        raise UnsafeFileError(f"model config {path}: expected a JSON object, got {type(cfg).__name__}")
    for d in _dicts(cfg):
        if "auto_map" in d:
            raise UnsafeFileError(f"model config {path}: names auto_map (code to download and run); refused")
        for key in ("attn_implementation", "_attn_implementation"):
            if d.get(key) not in FILE_ATTENTION:
                raise UnsafeFileError(
                    f"model config {path}: {key} {d.get(key)!r} could load a kernel from the hub; a config file may "
                    "name only 'eager' or 'sdpa'")
    return cfg


def read_model_config(path: PathLike) -> dict:
    """A model's config.json, read within the JSON limits and checked by `check_model_config`."""
    return check_model_config(read_json(path, what="model config"), path)


def check_diffusers_config(cfg: dict, path: PathLike) -> dict:
    """`cfg` (a diffusers config: model, scheduler or `model_index.json`) unless diffusers would load code for it:
    a `_class_name` that is a list names a custom pipeline or model module to import, and a `quantization_config`
    hands the weights to a quantizer (the gguf and nunchaku ones fetch a kernel from the hub). A scheduler's
    `num_train_timesteps` is bounded by MAX_TRAIN_TIMESTEPS (it sizes the tables built from the config)."""
    name = cfg.get("_class_name")
    if name is not None and not isinstance(name, str):
        raise UnsafeFileError(f"diffusers config {path}: _class_name {name!r} names a custom module (code to "
                              "import); refused")
    if cfg.get("quantization_config") is not None:
        raise UnsafeFileError(f"diffusers config {path}: names a quantization_config (a quantizer that can fetch "
                              "a kernel from the hub); refused")
    steps = cfg.get("num_train_timesteps")
    if isinstance(steps, int) and steps > MAX_TRAIN_TIMESTEPS:
        raise UnsafeFileError(f"diffusers config {path}: num_train_timesteps {steps:,} is over MAX_TRAIN_TIMESTEPS "
                              f"= {MAX_TRAIN_TIMESTEPS:,}")
    return cfg


def check_config_file(path: PathLike) -> dict:
    """A transformers or diffusers config file, read within the JSON limits and refused if it could load code or
    a hub kernel (`check_model_config`, `check_diffusers_config`)."""
    return check_diffusers_config(read_model_config(path), path)


def _check_pipeline_index(root: Path) -> None:
    """A pipeline folder's `model_index.json` may name components only from diffusers, transformers or a
    diffusers pipeline module, and the folder may hold no Python file: diffusers imports `{component}/{library}.py`
    and a custom pipeline's `.py` as code."""
    from diffusers import pipelines

    path = root / "model_index.json"
    for key, entry in check_config_file(path).items():
        if key.startswith("_") or not isinstance(entry, list):
            continue
        library = entry[0] if entry else None
        if library is not None and not (library in ("diffusers", "transformers") or (
                isinstance(library, str) and library.isidentifier() and hasattr(pipelines, library))):
            raise UnsafeFileError(f"pipeline index {path}: component {key!r} comes from {library!r}, not from "
                                  "diffusers or transformers; refused")
    code = sorted([*root.glob("*.py"), *root.glob("*/*.py")])
    if code:
        raise UnsafeFileError(f"pipeline folder {root}: holds {code[0].relative_to(root)} (Python code diffusers "
                              "would import as a custom pipeline or component); refused")


def check_model_folder(source: object) -> None:
    """Check every transformers/diffusers config and image processor config of a local model or pipeline folder
    (a hub id: see `check_model_source`); raises UnsafeFileError naming the first file that would load code or
    a hub kernel, or resize images beyond MAX_IMAGE_SIDE."""
    if not is_local(source):
        return
    root = Path(source).expanduser()
    configs = [root / "config.json", *root.glob("*/config.json"), *root.glob("*/scheduler_config.json")]
    for path in sorted(configs):
        if path.is_file():
            check_config_file(path)
    for name in PROCESSOR_FILES:
        for path in sorted([root / name, *root.glob(f"*/{name}")]):
            if path.is_file():
                check_processor_config(path)
    if (root / "model_index.json").is_file():
        _check_pipeline_index(root)


HUB_CONFIG_FILES = ["*.json", "*.py"]  # what a hub repo's snapshot is checked from before anything loads


def check_model_source(source: PathLike, models: Mapping[str, type] | str | None = None
                       ) -> tuple[Path, dict[str, str]]:
    """Check the configs a `from_pretrained(source, ...)` would act on, before any loader reads them, and the
    size of each model `models` names (component subfolder → the class its loader builds; "pipeline": the
    classes `model_index.json` names) against its weights (`check_model_size`).

    Returns the folder holding them and the keyword arguments that pin every later `from_pretrained(source)` to
    the files checked. A local folder is checked in place (`{}`). For a hub id, the repo's JSON and Python files
    alone are fetched (with HF_HUB_OFFLINE, the cached snapshot is used: nothing is fetched) and checked, and the
    loads are pinned to that snapshot's commit (`{"revision": commit}`), so the hub cannot hand the loader
    other configs than those checked.
    """
    if is_local(source):
        check_model_folder(source)
        root, pin = Path(source).expanduser(), {}
    else:
        root, pin = _check_hub_source(source)
    for sub, model_class in (pipeline_models(root) if models == "pipeline" else models or {}).items():
        check_model_size(source, model_class, sub, snapshot=(root, pin))
    return root, pin


def _check_hub_source(source: PathLike) -> tuple[Path, dict[str, str]]:
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"a model source must be a folder or a hub id, got {type(source).__name__}")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(str(source), allow_patterns=HUB_CONFIG_FILES))
    except ValueError as e:  # huggingface_hub's HFValidationError: not shaped like a hub id
        raise FileNotFoundError(f"{source}: no such folder, and not a hub id ({first_line(e)})") from None
    check_model_folder(folder)
    return folder, {"revision": folder.name}


def safetensors_elements(path: PathLike) -> int:
    """The number of tensor elements a safetensors file's header declares (header and offsets checked)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UnsafeFileError(f"weights {path}: not a regular file" if path.exists() else f"weights {path}: not found")
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or int.from_bytes(head, "little") > MAX_SAFETENSORS_HEADER_BYTES:
        raise UnsafeFileError(f"weights {path}: not a safetensors file (header length missing or over "
                              f"{MAX_SAFETENSORS_HEADER_BYTES:,} bytes)")
    try:
        total = 0
        with safe_open(str(path), framework="pt") as f:  # validates the header against the file's size
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
        return total
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on a malformed header
        raise UnsafeFileError(f"weights {path}: not a valid safetensors file ({first_line(e)})") from None


def _numbers(value: Any, *, lengths: bool) -> list[int]:
    """The ints inside `value` (through nested lists and dicts), and with `lengths` also its lists' lengths."""
    found, stack = [], [value]
    while stack:
        v = stack.pop()
        if isinstance(v, (list, dict)):
            if lengths and isinstance(v, list):
                found.append(len(v))
            stack.extend(v.values() if isinstance(v, dict) else v)
        elif isinstance(v, int) and not isinstance(v, bool):
            found.append(v)
    return found


def check_structure(cfg: dict, path: PathLike) -> None:
    """Refuse a config that declares more than MAX_LAYERS layers or blocks (any key matching LAYER_KEY, at any
    depth: an int, or a per-block list's length and entries): building a model costs work and memory per layer
    before any weight can be compared with it."""
    for d in _dicts(cfg):
        for key, value in d.items():
            counts = _numbers(value, lengths=True) if LAYER_KEY.search(key) and not isinstance(value, dict) else []
            if counts and max(counts) > MAX_LAYERS:
                shown = f"a list of {len(value):,}" if isinstance(value, list) else f"{max(counts):,}"
                raise UnsafeFileError(f"model config {path}: {key} declares {shown} layers or blocks, over "
                                      f"MAX_LAYERS = {MAX_LAYERS}")


def check_processor_config(path: PathLike) -> dict:
    """An image processor's config, read within the JSON limits, whose image sizes (keys matching
    IMAGE_SIZE_KEY) are at most MAX_IMAGE_SIDE: every image is resized to them before anything else."""
    cfg = read_json(path, what="processor config")
    if not isinstance(cfg, dict):
        raise UnsafeFileError(f"processor config {path}: expected a JSON object, got {type(cfg).__name__}")
    for d in _dicts(cfg):
        for key, value in d.items():
            sides = _numbers(value, lengths=False) if IMAGE_SIZE_KEY.search(key) else []
            if sides and max(sides) > MAX_IMAGE_SIDE:
                raise UnsafeFileError(f"processor config {path}: {key} {max(sides):,} is over MAX_IMAGE_SIDE = "
                                      f"{MAX_IMAGE_SIDE:,} pixels")
    return cfg


@contextmanager
def _module_budget(path: PathLike) -> Iterator[None]:
    """Refuse, as soon as it happens, a model whose construction in this thread registers over MAX_MODULES
    modules (a structure the layer keys did not name)."""
    from torch.nn.modules.module import register_module_module_registration_hook

    owner, count = threading.get_ident(), 0

    def hook(module: torch.nn.Module, name: str, submodule: object) -> None:
        nonlocal count
        if threading.get_ident() == owner:
            count += 1
            if count > MAX_MODULES:
                raise UnsafeFileError(f"model config {path}: builds more than MAX_MODULES = {MAX_MODULES:,} modules")

    handle = register_module_module_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def declared_size(model_class: type, folder: Path) -> tuple[int, int]:
    """The elements and bytes of the parameters and buffers `model_class` (a diffusers model, a transformers
    model or Auto class) builds from `folder`'s config.json, built on the meta device: nothing is allocated."""
    config = folder / "config.json"
    try:
        with torch.device("meta"), _module_budget(config):
            if hasattr(model_class, "load_config"):  # diffusers
                model = model_class.from_config(model_class.load_config(str(folder)))
            elif hasattr(model_class, "_model_mapping"):  # a transformers Auto class
                from transformers import AutoConfig

                model = model_class.from_config(AutoConfig.from_pretrained(str(folder)))
            else:
                model = model_class._from_config(model_class.config_class.from_pretrained(str(folder)))
    except UnsafeFileError:
        raise
    except Exception as e:  # what the loader would have raised building it, said in one line
        raise UnsafeFileError(f"model config {config}: does not build a {model_class.__name__} "
                              f"({type(e).__name__}: {first_line(e)})") from None
    tensors = [*model.parameters(), *model.buffers()]  # each shared (tied) tensor once
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


# The weights files transformers and diffusers load, in the order they prefer them.
WEIGHTS_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "model.safetensors.index.json",
                 "diffusion_pytorch_model.safetensors.index.json", "pytorch_model.bin", "diffusion_pytorch_model.bin",
                 "pytorch_model.bin.index.json", "diffusion_pytorch_model.bin.index.json")


def _shards(index: Path) -> list[Path]:
    """The shard files a sharded checkpoint's index names: plain file names beside it."""
    data = read_json(index, what="weights index") if index.is_file() else None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UnsafeFileError(f"weights index {index}: expected a weight_map of tensor names to shard files")
    names = sorted(set(weight_map.values()))
    for name in names:
        if name in ("", ".", "..") or Path(name).name != name:
            raise UnsafeFileError(f"weights index {index}: shard {name!r} is not a file name beside the index")
    return [index.parent / n for n in names]


def stored_elements(folder: Path) -> tuple[int, str] | None:
    """The tensor elements a model folder's weights hold and a phrase saying so (for an error), or None without
    weights.

    Read from headers only: a safetensors file's declared shapes (checked against its size); a pickled `.bin`
    is counted as its size in bytes, as every stored element takes at least one byte."""
    for name in WEIGHTS_FILES:
        path = folder / name
        if not path.is_file():
            continue
        shards = _shards(path) if name.endswith(".index.json") else [path]
        if path.name.endswith((".safetensors", ".safetensors.index.json")):
            n = sum(safetensors_elements(p) for p in shards)
            return n, f"{path} holds {n:,}"
        for p in shards:
            if not p.is_file():
                raise UnsafeFileError(f"weights {p}: not a regular file" if p.exists() else f"weights {p}: not found")
        n = sum(p.stat().st_size for p in shards)
        return n, f"{path} holds at most {n:,} (one per byte of pickled weights)"
    return None


def _fetch_weights(repo: str, subfolder: str, revision: str, folder: Path) -> None:
    """Bring the weights file a loader would read from hub repo `repo` into its checked snapshot `folder` (the
    loader reads the same cached file afterwards); nothing when the repo has none (the loader says so)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    for name in WEIGHTS_FILES:
        if name.endswith(".index.json"):
            if not (folder / name).is_file():  # an index is a JSON file: the snapshot holds it if the repo does
                continue
            files = [p.name for p in _shards(folder / name)]
        else:
            files = [name]
        try:
            for f in files:
                hf_hub_download(repo, f, subfolder=subfolder or None, revision=revision)
            return
        except (EntryNotFoundError, LocalEntryNotFoundError):  # not in the repo (offline: not in the cache)
            continue


def check_model_size(source: PathLike, model_class: type, subfolder: str = "", *,
                     snapshot: tuple[Path, dict[str, str]] | None = None) -> None:
    """Refuse a model whose config declares more than its weights hold, before any loader allocates it.

    `source`'s `subfolder` (a hub id: its snapshot from `check_model_source`, or `snapshot` when that was just
    called) holds a config.json that `model_class.from_pretrained` builds a model from before it reads the
    weights. The config's layer counts are bounded (`check_structure`), the model is built on the meta device
    within MAX_MODULES, and its elements may exceed what the weights file's header holds by DECLARED_SLACK at
    most. A folder without config.json or without weights is left to the loader, which refuses it before
    building anything."""
    root, pin = snapshot if snapshot is not None else check_model_source(source)
    folder = root / subfolder
    config = folder / "config.json"
    if not config.is_file():
        return
    check_structure(read_model_config(config), config)
    elements, nbytes = declared_size(model_class, folder)
    if pin:
        _fetch_weights(str(source), subfolder, pin["revision"], folder)
    stored = stored_elements(folder)
    if stored is not None and elements > stored[0] + DECLARED_SLACK:
        raise UnsafeFileError(
            f"model config {config}: declares a {model_class.__name__} of {elements:,} elements "
            f"({nbytes / 2**30:.1f} GiB as built) but {stored[1]}; refused before allocating it")


def pipeline_models(root: Path) -> dict[str, type]:
    """The model classes a pipeline folder's `model_index.json` has diffusers build, by component folder."""
    import diffusers
    import transformers
    from diffusers import pipelines

    models = {}
    for key, entry in check_config_file(root / "model_index.json").items():
        if key.startswith("_") or not isinstance(entry, list) or len(entry) != 2:
            continue
        library, name = entry
        module = {"diffusers": diffusers, "transformers": transformers}.get(library) if isinstance(
            library, str) else None
        if module is None and isinstance(library, str) and library.isidentifier():
            module = getattr(pipelines, library, None)
        cls = getattr(module, name, None) if module is not None and isinstance(name, str) else None
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            models[key] = cls
    return models


def is_local(source: object) -> bool:
    return isinstance(source, (str, os.PathLike)) and Path(source).expanduser().exists()


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp_sibling(path)
    mode = os.fstat(fd).st_mode & 0o777  # the umask's; safetensors' writer makes its files owner-only
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_json(obj: Any, path: PathLike) -> None:
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True)))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: PathLike, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write(Path(path), lambda tmp: save_file(flat, tmp, metadata=metadata))


def load_tokenizer(source: object, *, candidates: Iterable[PathLike] = (), what: str = "tokenizer") -> Any:
    """A CLIP tokenizer from an instance, a tokenizer folder, a pipeline folder with `tokenizer/`, or a hub id.

    With `source=None` the first of `candidates` that holds a tokenizer is used.
    """
    from transformers import CLIPTokenizer, PreTrainedTokenizerBase

    if isinstance(source, PreTrainedTokenizerBase):
        return source
    if source is not None and not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{what} must be a tokenizer, a folder or a hub id, got {type(source).__name__}")
    looked = []
    paths = [source] if source is not None else list(candidates)
    for p in paths:
        p = Path(p).expanduser()
        for folder in (p, p / "tokenizer"):
            looked.append(str(folder))
            if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
                return CLIPTokenizer.from_pretrained(str(folder))
    if source is not None and not is_local(source):
        # A hub id: the CLIP repos hold the tokenizer at the root, SD pipelines under tokenizer/. Which one is read
        # from the checked snapshot (transformers returns an empty tokenizer for a folder without one).
        root, pin = check_model_source(source)
        for sub in ("", "tokenizer"):
            looked.append(f"{source}/{sub}" if sub else str(source))
            if (root / sub / "vocab.json").is_file() or (root / sub / "tokenizer.json").is_file():
                return CLIPTokenizer.from_pretrained(str(source), **pin, **({"subfolder": sub} if sub else {}))
    raise FileNotFoundError(
        f"no CLIP tokenizer found for {what}; looked in: {', '.join(looked) or '(nowhere)'}. "
        f"Pass {what}= a tokenizer folder (vocab.json + merges.txt), an SD-1.5 pipeline folder, or a CLIPTokenizer"
    )


def load_clip_text_model(source: PathLike, *, subfolder: str | None = None, what: str = "text_encoder") -> Any:
    """A CLIPTextModel from a folder (or its `text_encoder/` subfolder) or a hub id, with safe loading only."""
    from transformers import CLIPTextModel

    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{what} must be a folder, a hub id or a CLIPTextModel, got {type(source).__name__}")
    root, pin = check_model_source(source)
    sub = Path(subfolder or "")
    if not (root / sub / "config.json").is_file() and (root / sub / "text_encoder" / "config.json").is_file():
        sub = sub / "text_encoder"  # an SD-1.5 pipeline folder
    if not (root / sub / "config.json").is_file():
        raise FileNotFoundError(
            f"{what}: no CLIP text encoder in {root / sub} (expected config.json + model.safetensors or "
            "pytorch_model.bin, or a pipeline folder with text_encoder/)"
        )
    check_config_file(root / sub / "config.json")
    check_model_size(source, CLIPTextModel, "" if sub == Path() else sub.as_posix(), snapshot=(root, pin))
    if not pin:
        return CLIPTextModel.from_pretrained(str(root / sub), weights_only=True).eval()
    kwargs = {"subfolder": sub.as_posix()} if sub != Path() else {}
    return CLIPTextModel.from_pretrained(str(source), weights_only=True, **pin, **kwargs).eval()

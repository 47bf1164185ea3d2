"""Atomic, pickle-free training checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint is a folder `step-NNNNNNNN/` holding `<name>.safetensors` files and `state.json`. It is written
into a hidden temporary folder, every file and the folder are fsynced, and the folder is renamed into place
(atomic on POSIX), so a run killed at any moment -- or a power loss -- leaves either the previous complete
checkpoints or the new one, never a half-written one. Re-saving an existing step moves the old copy aside to
`.step-NNNNNNNN.old-PID` only once the new folder is complete; if a crash leaves such a copy without its final
name, `recover_checkpoints` (run by latest_checkpoint, load_checkpoint, save and prune) renames it back, and
pruning never deletes the only complete copy of a step. Optimizer state is
keyed by parameter *name*, not position, so it survives a rebuilt parameter list (model expansion).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "state.json"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used (missing, truncated or malformed file); the message names it."""


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file through a temporary sibling and os.replace, so readers never see a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_save_tensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                        metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # safetensors rejects views sharing storage and non-contiguous tensors; copies are cheap next to a step
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(plain, str(tmp), metadata=metadata)
    _fsync_file(tmp)  # the data must be on disk before the rename makes it visible under the final name
    os.replace(tmp, path)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- optimizer state -------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Plain JSON: tensors become numbers, and inf/nan (Prodigy's default growth_rate is inf) become tagged
    strings, because bare Infinity is not JSON."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"float"}:
        return float(value["float"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def optimizer_state_to_flat(optimizer: torch.optim.Optimizer,
                            names: Mapping[torch.nn.Parameter, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state into name-keyed tensors ('<param>::<key>') and JSON scalars."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for p, st in optimizer.state.items():
        name = names[p]
        for key, value in st.items():
            if isinstance(value, torch.Tensor) and key != "step":
                tensors[f"{name}::{key}"] = value
            else:
                scalars.setdefault(name, {})[key] = _jsonable(value)
    groups = []
    for g in optimizer.param_groups:
        groups.append({"params": [names[p] for p in g["params"]],
                       **{k: _jsonable(v) for k, v in g.items() if k != "params"}})
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_state_from_flat(optimizer: torch.optim.Optimizer, names: Mapping[torch.nn.Parameter, str],
                              tensors: Mapping[str, torch.Tensor], meta: dict) -> None:
    """Inverse of optimizer_state_to_flat for an optimizer built over the same named parameters."""
    index = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            index[names[p]] = len(index)
    saved_groups = meta["param_groups"]
    if [n for g in saved_groups for n in g["params"]] != list(index):
        raise ValueError("checkpoint optimizer parameters do not match the model's (different multipliers?)")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, sub = key.split("::", 1)
        state.setdefault(index[name], {})[sub] = value.clone()  # never alias the caller's tensors
    for name, sc in meta["scalars"].items():
        state.setdefault(index[name], {}).update({k: _from_json(v) for k, v in sc.items()})
    groups = []
    for g in saved_groups:
        groups.append({**{k: _from_json(v) for k, v in g.items()}, "params": [index[n] for n in g["params"]]})
    # Optimizer.load_state_dict moves the state to each parameter's device and dtype
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---- RNG state -------------------------------------------------------------------------------------------


def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, pstate, gauss_next = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "python": [version, list(pstate), gauss_next]}
    return tensors, meta


def restore_rng_state(tensors: Mapping[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, pstate, gauss_next = meta["python"]
    random.setstate((version, tuple(pstate), gauss_next))


# ---- checkpoint folders ----------------------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


OLD_DIR = re.compile(r"^\.(step-\d{8})\.old-(\d+)$")


def _is_complete(path: Path) -> bool:
    return path.is_dir() and (path / STATE_FILE).is_file()


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under root, oldest first (temporary folders are ignored; see recover_checkpoints)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and _is_complete(p)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def recover_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Rename a complete `.step-N.old-PID` copy back to `step-N` where a crash during a re-save left no complete
    `step-N` (the old copy is moved aside only after the new one is complete, so it is then the only copy).
    Returns the recovered folders. Safe to run concurrently (e.g. on every DDP rank): a lost race is ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    recovered = []
    for p in sorted(root.iterdir()):
        m = OLD_DIR.match(p.name)
        if not m or not _is_complete(p):
            continue
        final = root / m.group(1)
        if _is_complete(final):
            continue
        try:
            if final.exists():  # an incomplete folder under the final name (not written by this module)
                shutil.rmtree(final)
            os.replace(p, final)
        except OSError:
            continue  # another process recovered it first
        recovered.append(final)
    if recovered:
        _fsync_dir(root)
    return recovered


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    recover_checkpoints(root)
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(root: str | os.PathLike, step: int, tensor_files: Mapping[str, Mapping[str, torch.Tensor]],
                    state: dict, keep: int | None = None) -> Path:
    """Write `root/step-NNNNNNNN/` atomically: {name}.safetensors per entry of tensor_files, plus state.json."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, tensors in tensor_files.items():
        atomic_save_tensors(tensors, tmp / f"{name}.safetensors")  # each file fsynced
    state = {"step": step, "files": sorted(f"{n}.safetensors" for n in tensor_files), **state}
    atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=1, allow_nan=False))  # last: marks complete
    _fsync_dir(tmp)  # the folder's entries are durable before it gets its final name
    recover_checkpoints(root)
    if final.exists():
        # re-saving a step after a resume. The new copy is complete and durable; only now is the old one moved
        # aside. A crash between the two renames leaves the old copy (complete) as .old-PID without a final
        # name: recover_checkpoints renames it back, and prune never deletes it.
        old = root / f".{final.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    verify_checkpoint(final)  # older checkpoints are pruned only once the new one reads back intact
    if keep is not None:
        prune_checkpoints(root, keep)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prune_checkpoints(root: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and stale temporary folders of other processes.

    An `.old-PID` copy is deleted only when its step has a complete copy under the final name (after
    recover_checkpoints, which renames it back otherwise), or when the step itself is pruned."""
    root = Path(root)
    recover_checkpoints(root)
    complete = list_checkpoints(root)
    pruned = complete[:-keep] if keep > 0 else []
    for p in pruned:
        shutil.rmtree(p, ignore_errors=True)
    pruned_names = {p.name for p in pruned}
    for p in root.iterdir():
        if p.name.startswith(".step-") and (".tmp-" in p.name or ".old-" in p.name):
            pid = p.name.rsplit("-", 1)[-1]
            if pid == str(os.getpid()):
                continue
            m = OLD_DIR.match(p.name)
            if m and _is_complete(p) and not (m.group(1) in pruned_names or _is_complete(root / m.group(1))):
                continue  # the only complete copy of its step (recovery lost a race): keep it
            shutil.rmtree(p, ignore_errors=True)


def _read_state(path: Path) -> dict:
    state_file = path / STATE_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder (not found)")
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint folder (no {STATE_FILE})")
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{state_file} is damaged: {e}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{state_file} is damaged: no integer 'step'")
    missing = [f for f in state.get("files", []) if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path} is damaged: missing {', '.join(missing)}")
    return state


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check a checkpoint without loading its tensors (state.json and every safetensors header); returns the state."""
    from safetensors import safe_open

    path = Path(path)
    state = _read_state(path)
    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
        except Exception as e:  # safetensors raises its own error types for truncated or malformed files
            raise CheckpointError(f"{f} is damaged: {e}") from None
    return state


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """All tensor files (by name) and the JSON state of one checkpoint folder; CheckpointError names a bad file.

    If a crash during a re-save left the folder without its final name, its `.old-PID` copy is recovered first."""
    path = Path(path)
    if not _is_complete(path) and STEP_DIR.match(path.name):
        recover_checkpoints(path.parent)
    state = _read_state(path)
    tensors = {}
    for p in sorted(path.glob("*.safetensors")):
        try:
            tensors[p.stem] = load_file(str(p))
        except Exception as e:  # a truncated or malformed file: safetensors' own error types
            raise CheckpointError(f"{p} is damaged: {e}") from None
    return tensors, state


def load_latest_intact(root: str | os.PathLike) -> tuple[Path, dict[str, dict[str, torch.Tensor]], dict,
                                                         list[str]] | None:
    """The newest checkpoint under root that loads: (path, tensors, state, messages about newer damaged ones).
    None when there is no checkpoint; CheckpointError when there are some and none loads."""
    recover_checkpoints(root)
    found = list_checkpoints(root)
    damaged: list[str] = []
    for path in reversed(found):
        try:
            tensors, state = load_checkpoint(path)
        except CheckpointError as e:
            damaged.append(str(e))
            continue
        return path, tensors, state, damaged
    if damaged:
        raise CheckpointError(f"every checkpoint in {root} is damaged: {'; '.join(damaged)}")
    return None

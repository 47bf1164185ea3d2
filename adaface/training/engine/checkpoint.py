"""Atomic, pickle-free training checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint is a folder `step-NNNNNNNN/` holding `<name>.safetensors` files and `state.json`. It is written
into a hidden temporary folder, every file and the folder are fsynced, and the folder is renamed into place
(atomic on POSIX), so a run killed at any moment -- or a power loss -- leaves either the previous complete
checkpoints or the new one, never a half-written one. Re-saving an existing step moves the old copy aside to
`.step-NNNNNNNN.old-PID` only once the new folder is complete; if a crash leaves such a copy without its final
name, `recover_checkpoints` (run by latest_checkpoint, load_checkpoint, save and prune) renames it back, and
pruning never deletes the only complete copy of a step. Optimizer state is
keyed by parameter *name*, not position, so it survives a rebuilt parameter list (model expansion).

`state.json` records the SHA-256 of every tensor file; loading checks it, so a flipped byte inside a tensor is
damage like a truncated file. A damaged or unreadable checkpoint found on resume is set aside (renamed to
`step-NNNNNNNN.damaged`, which no listing, resume or rotation counts), and rotation counts only checkpoints up
to the one just written, so it never keeps a damaged or stale checkpoint in place of an intact one. A failed
write (a full disk) removes its temporary files and leaves the earlier checkpoints as they were.
"""

from __future__ import annotations

import contextlib
import hashlib
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

from ...models._io import first_line, read_json

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "state.json"
DAMAGED_SUFFIX = ".damaged"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used (missing, truncated or malformed file); the message names it."""


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file through a temporary sibling and os.replace, so readers never see a partial file. On a failed
    write (e.g. a full disk) the temporary file is removed and the OSError names the final path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def atomic_save_tensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                        metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # safetensors rejects views sharing storage and non-contiguous tensors; copies are cheap next to a step
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    try:
        save_file(plain, str(tmp), metadata=metadata)
        _fsync_file(tmp)  # the data must be on disk before the rename makes it visible under the final name
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    except Exception as e:
        _remove_quietly(tmp)
        os_error = as_os_error(e, path)
        if os_error is None:
            raise
        raise os_error from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def as_os_error(error: BaseException, path: str | os.PathLike) -> OSError | None:
    """An I/O failure (e.g. a full disk) as an OSError naming `path`: safetensors reports them as its own error
    type with "(os error N)" in the text. None when `error` is no I/O failure."""
    if isinstance(error, OSError):
        return OSError(error.errno, error.strerror or str(error), error.filename or str(path))
    m = re.search(r"os error (\d+)", str(error))
    if m is None:
        return None
    code = int(m.group(1))
    return OSError(code, os.strerror(code), str(path))


def _remove_quietly(path: Path) -> None:
    try:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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
    try:
        return path.is_dir() and (path / STATE_FILE).is_file()
    except OSError:  # a folder without search permission: not complete (an unreadable one, see list_checkpoints)
        return False


def _is_unreadable(path: Path) -> bool:
    try:
        return path.is_dir() and not os.access(path, os.R_OK | os.X_OK)
    except OSError:
        return True


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under root, oldest first (temporary folders are ignored; see recover_checkpoints).
    A folder that cannot be read is listed too: loading it fails by name, so it is skipped like a damaged one."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (_is_complete(p) or _is_unreadable(p))]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def set_aside(path: str | os.PathLike) -> Path:
    """Rename a damaged or unreadable checkpoint to `step-NNNNNNNN.damaged` (or `.damaged-K`), out of the way of
    listing, resume and rotation but kept for inspection. Returns the new path."""
    path = Path(path)
    target = path.with_name(path.name + DAMAGED_SUFFIX)
    k = 1
    while target.exists():
        k += 1
        target = path.with_name(f"{path.name}{DAMAGED_SUFFIX}-{k}")
    os.replace(path, target)
    _fsync_dir(path.parent)
    return target


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
    """Write `root/step-NNNNNNNN/` atomically: {name}.safetensors per entry of tensor_files, plus state.json with
    each file's SHA-256. On a failed write (OSError naming the file) the partial folder is removed and the earlier
    checkpoints are untouched."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        digests = {}
        for name, tensors in tensor_files.items():
            atomic_save_tensors(tensors, tmp / f"{name}.safetensors")  # each file fsynced
            digests[f"{name}.safetensors"] = file_sha256(tmp / f"{name}.safetensors")
        state = {"step": step, "files": sorted(digests), "sha256": digests, **state}
        atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=1, allow_nan=False))  # last: marks complete
        _fsync_dir(tmp)  # the folder's entries are durable before it gets its final name
    except BaseException:
        _remove_quietly(tmp)
        raise
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
        prune_checkpoints(root, keep, newest=final)
    return final


def clear_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Delete what this module wrote under root (for a fresh start with --overwrite): `step-NNNNNNNN` folders
    whose state.json it wrote, set-aside `.damaged` copies and temporary folders. Anything else stays, and so does
    root unless it is left empty. Returns the entries left in place."""
    root = Path(root)
    if not root.is_dir():
        return []
    kept = []
    for p in sorted(root.iterdir()):
        ours = False
        if p.is_dir() and not p.is_symlink():
            if STEP_DIR.match(p.name) or OLD_DIR.match(p.name) or _DAMAGED_DIR.match(p.name):
                ours = _written_here(p)
            elif re.match(r"^\.step-\d{8}\.tmp-\d+$", p.name):
                ours = True  # a write that never completed (files are only ever ours there)
        if ours:
            shutil.rmtree(p, ignore_errors=True)
        else:
            kept.append(p)
    if not kept:
        with contextlib.suppress(OSError):
            root.rmdir()
    return kept


_DAMAGED_DIR = re.compile(r"^step-\d{8}\.damaged(-\d+)?$")


def _written_here(path: Path) -> bool:
    """Whether a checkpoint-named folder holds only what save_checkpoint writes (state.json with its step and
    file list, the listed safetensors files): a folder with anything else in it is not deleted."""
    try:
        state = read_json(path / STATE_FILE, what="checkpoint state")
        names = {p.name for p in path.iterdir()}
    except OSError:
        return False
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("files"),
                                                                                                list):
        return False
    return names <= {STATE_FILE, *state["files"]}


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


def prune_checkpoints(root: str | os.PathLike, keep: int, newest: Path | None = None) -> None:
    """Delete all but the newest `keep` complete checkpoints, and stale temporary folders of other processes.

    With `newest` (the checkpoint just written and verified) only checkpoints up to its step count: `newest` and
    the `keep - 1` before it are kept; later ones (of a run resumed from an earlier `--resume PATH`) are left
    alone, never kept in its place. An `.old-PID` copy is deleted only when its step has a complete copy under
    the final name (after recover_checkpoints, which renames it back otherwise), or when the step itself is
    pruned."""
    root = Path(root)
    recover_checkpoints(root)
    complete = [p for p in list_checkpoints(root) if not _is_unreadable(p)]  # never counted, never deleted
    if newest is not None:
        complete = [p for p in complete if checkpoint_step(p) <= checkpoint_step(Path(newest))]
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
    if _is_unreadable(path):
        raise CheckpointError(f"{path} is unreadable (permission denied)")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder (not found)")
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint folder (no {STATE_FILE})")
    try:  # within the JSON size and depth limits: a state.json may come from elsewhere
        state = read_json(state_file, what="checkpoint state")
    except OSError as e:
        reason = first_line(e).split(f"{state_file}: ", 1)[-1]  # read_json's message names the file already
        raise CheckpointError(f"{state_file} is damaged: {reason}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{state_file} is damaged: no integer 'step'")
    missing = [f for f in state.get("files", []) if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path} is damaged: missing {', '.join(missing)}")
    unreadable = [f for f in state.get("files", []) if not os.access(path / f, os.R_OK)]
    if unreadable:
        raise CheckpointError(f"{path / unreadable[0]} is unreadable (permission denied)")
    return state


def _check_digests(path: Path, state: dict) -> None:
    """The SHA-256 of each tensor file against state.json's record (checkpoints written before it was recorded
    have none to check)."""
    digests = state.get("sha256")
    if digests is None:
        return
    if not isinstance(digests, dict):
        raise CheckpointError(f"{path / STATE_FILE} is damaged: 'sha256' is not a mapping")
    for name in state.get("files", []):
        try:
            actual = file_sha256(path / name)
        except OSError as e:
            raise CheckpointError(f"{path / name} is unreadable ({e.strerror or e})") from None
        if digests.get(name) != actual:
            raise CheckpointError(f"{path / name} is damaged: its SHA-256 does not match the one in {STATE_FILE}")


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check a checkpoint without loading its tensors (state.json and every safetensors header); returns the state."""
    from safetensors import safe_open

    path = Path(path)
    state = _read_state(path)
    _check_digests(path, state)
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
    _check_digests(path, state)
    tensors = {}
    for p in sorted(path.glob("*.safetensors")):
        try:
            tensors[p.stem] = load_file(str(p))
        except Exception as e:  # a truncated or malformed file: safetensors' own error types
            raise CheckpointError(f"{p} is damaged: {e}") from None
    return tensors, state


def load_latest_intact(root: str | os.PathLike) -> tuple[Path, dict[str, dict[str, torch.Tensor]], dict,
                                                         list[tuple[Path, str]]] | None:
    """The newest checkpoint under root that loads: (path, tensors, state, [(path, why) of newer damaged or
    unreadable ones]). None when there is no checkpoint; CheckpointError when there are some and none loads."""
    recover_checkpoints(root)
    found = list_checkpoints(root)
    damaged: list[tuple[Path, str]] = []
    for path in reversed(found):
        try:
            tensors, state = load_checkpoint(path)
        except CheckpointError as e:
            damaged.append((path, str(e)))
            continue
        return path, tensors, state, damaged
    if damaged:
        raise CheckpointError(f"every checkpoint in {root} is damaged: {'; '.join(m for _, m in damaged)}")
    return None

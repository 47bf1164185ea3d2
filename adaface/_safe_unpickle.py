"""Reading a `torch.save` file of pickled whole modules without running any code named in it.

A pickle can name any importable callable and have it called while loading. This module never lets that
happen: every global the file names is first listed by a static scan of its pickle stream (nothing is
executed), and the file is refused unless each one is either a tensor-rebuilding global that torch resolves
itself (on a short list here *and* on torch's own `weights_only` list) or matched by the caller's `allowed`
rule. An allowed global is then loaded as an *inert stand-in*: a class of our own that only records the
attributes pickle hands it, or a function that only records its arguments. The real class is never
imported, so its `__setstate__`, `__reduce__` or constructor never run. The load itself is torch's
restricted unpickler (`torch.load(weights_only=True)`), told about the stand-ins with the
`torch.serialization.safe_globals` context manager; it enforces the same list a second time.

Why not a `pickle.Unpickler` subclass with `find_class`: it would still run the standard pickle machine
(REDUCE calls whatever `find_class` returns) and would have to re-implement torch's storage and zip layout.
torch's `weights_only` unpickler already implements both and calls nothing but allow-listed objects.

`mmap=True` keeps the tensors in the file: a tensor costs memory only when it is read.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import struct
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A file that is not a checkpoint we can read, or one that names a global we do not allow."""


class StandIn:
    """An inert stand-in for a pickled class instance: holds the pickled attributes, runs nothing."""

    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        obj = object.__new__(cls)
        obj.__dict__["_stand_in_args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        # pickle's BUILD: a dict of attributes, or (dict, slot dict), or anything a custom __getstate__ returned.
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            for part in state:
                self.__dict__.update(part or {})
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_stand_in_state"] = state

    def __repr__(self) -> str:
        return f"<stand-in for {self.global_name}>"


class InertCall:
    """What a stand-in *function* returns: the call it would have made, not made."""

    def __init__(self, global_name: str, args: tuple) -> None:
        self.global_name, self.args = global_name, args

    def __repr__(self) -> str:
        return f"<not called: {self.global_name}>"


class StandInFunction:
    def __init__(self, global_name: str) -> None:
        self.global_name = global_name

    def __call__(self, *args: Any) -> InertCall:
        return InertCall(self.global_name, args)


def stand_in_class(global_name: str) -> type[StandIn]:
    short = global_name.rsplit(".", 1)[-1]
    return type(short, (StandIn,), {"global_name": global_name, "__module__": __name__})


def _data_pkl_name(zf: zipfile.ZipFile, path: Path) -> str:
    names = zf.namelist()
    pkls = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if not pkls:
        if any(n.endswith("constants.pkl") for n in names):
            raise CheckpointError(f"{path}: a TorchScript archive, not a torch.save checkpoint")
        raise CheckpointError(f"{path}: a zip archive but not a torch.save checkpoint (it holds no data.pkl)")
    if len(pkls) > 1:
        raise CheckpointError(f"{path}: a zip archive with {len(pkls)} data.pkl records; torch.save writes one")
    return pkls[0]


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= size - 8 and head[8:9] == b"{"


def check_checkpoint_file(path: os.PathLike | str) -> Path:
    """Raise a one-line CheckpointError unless `path` is a zip-format torch.save file; returns the path."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            _data_pkl_name(zf, path)
        return path
    if _looks_like_safetensors(head, size):
        raise CheckpointError(
            f"{path}: a safetensors file, not a torch.save checkpoint (.pt); safetensors files need no conversion"
        )
    if head[:1] == b"\x80":
        raise CheckpointError(
            f"{path}: a bare pickle or a legacy (pre-1.6) torch.save file; only the zip format torch.save has "
            "written since 1.6 is read"
        )
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (expected the zip archive torch.save writes)")


def _scan_globals(pickle_bytes: bytes, path: Path) -> list[tuple[str, str]]:
    """(module, name) of every GLOBAL in the stream, by disassembly only (pickletools executes nothing)."""
    found: list[tuple[str, str]] = []
    try:
        for op, arg, _ in pickletools.genops(pickle_bytes):
            if op.name == "GLOBAL":
                module, name = arg.split(" ", 1)
                found.append((module, name))
            elif op.name in ("STACK_GLOBAL", "INST", "OBJ"):
                # torch.save writes protocol 2 (GLOBAL only); torch's restricted loader rejects these too.
                raise CheckpointError(f"{path}: data.pkl uses the {op.name} opcode, which torch.save never writes")
    except CheckpointError:
        raise
    except Exception as e:  # pickletools raises ValueError / struct.error on a damaged stream
        raise CheckpointError(f"{path}: data.pkl is not a readable pickle ({type(e).__name__}: {e})") from None
    return found


def checkpoint_globals(path: os.PathLike | str) -> list[tuple[str, str]]:
    """Every (module, name) global the checkpoint's pickle names, in first-seen order, without loading it."""
    path = check_checkpoint_file(path)
    with zipfile.ZipFile(path) as zf:
        data = zf.read(_data_pkl_name(zf, path))
    seen: dict[tuple[str, str], None] = {}
    for g in _scan_globals(data, path):
        seen.setdefault(g, None)
    return list(seen)


def _torch_resolves(module: str, name: str) -> bool:
    """The globals torch.save writes for tensors, Parameters and containers, which torch itself resolves."""
    if module == "torch._utils":
        return name.startswith("_rebuild_")
    if module == "torch":
        return name.endswith("Storage") or name in ("Size", "device") or isinstance(getattr(torch, name, None),
                                                                                     torch.dtype)
    return (module, name) in {("collections", "OrderedDict"), ("_codecs", "encode"), ("__builtin__", "set"),
                              ("builtins", "set"), ("__builtin__", "frozenset"), ("builtins", "frozenset")}


def _torch_safe_names(path: Path, names: list[tuple[str, str]]) -> set[str]:
    """Globals left to torch: on our short list above AND not flagged by torch's own scan (both must agree)."""
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception as e:  # its own static scan: an opcode it does not know
        raise CheckpointError(f"{path}: torch cannot scan its data.pkl ({type(e).__name__}: {e})") from None
    return {f"{m}.{n}" for m, n in names if _torch_resolves(m, n) and f"{m}.{n}" not in unsafe}


def load_with_stand_ins(
    path: os.PathLike | str,
    allowed: Callable[[str, str], str | None],
) -> tuple[Any, dict[str, str]]:
    """Load a torch.save file with every non-torch global replaced by an inert stand-in.

    `allowed(module, name)` returns "class" or "function" for a global that may be stood in for, or None.
    Anything else that torch does not allow by default is refused (CheckpointError naming the global) before
    a single byte is unpickled. Returns the loaded object and {global name: "class"|"function"|"torch"}.
    """
    path = check_checkpoint_file(path)
    names = checkpoint_globals(path)
    torch_safe = _torch_safe_names(path, names)
    kinds: dict[str, str] = {}
    stand_ins: list[tuple[Any, str]] = []
    for module, name in names:
        full = f"{module}.{name}"
        if full in torch_safe:
            kinds[full] = "torch"
            continue
        kind = allowed(module, name)
        if kind not in ("class", "function"):
            raise CheckpointError(
                f"{path}: refusing to load: it names the global {full}, which is not on the allow list "
                "(nothing was unpickled)"
            )
        kinds[full] = kind
        stand_ins.append((stand_in_class(full) if kind == "class" else StandInFunction(full), full))
    try:
        with torch.serialization.safe_globals(stand_ins):
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError, KeyError, TypeError,
            AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: torch's restricted loader could not read it ({first})") from None
    return obj, kinds


def children(obj: Any) -> dict[str, Any]:
    """The sub-modules of a stood-in nn.Module (its pickled `_modules`), in order."""
    modules = getattr(obj, "__dict__", {}).get("_modules")
    return {k: v for k, v in modules.items() if v is not None} if isinstance(modules, dict) else {}


def own_tensors(obj: Any) -> dict[str, torch.Tensor]:
    """The parameters and buffers a stood-in nn.Module holds itself (not its children's)."""
    out: dict[str, torch.Tensor] = {}
    state = getattr(obj, "__dict__", {})
    for slot in ("_parameters", "_buffers"):
        table = state.get(slot)
        if isinstance(table, dict):
            out.update({k: v for k, v in table.items() if isinstance(v, torch.Tensor)})
    return out


def named_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer under a stood-in module, with state-dict style dotted names."""
    for k, v in own_tensors(obj).items():
        yield prefix + k, v
    for k, child in children(obj).items():
        yield from named_tensors(child, f"{prefix}{k}.")


def global_name(obj: Any) -> str | None:
    """The pickled class name of a stand-in (None for anything else)."""
    return type(obj).global_name if isinstance(obj, StandIn) else None


def attr(obj: Any, name: str, default: Any = None) -> Any:
    """A pickled plain attribute of a stand-in (not a sub-module, parameter or buffer)."""
    return getattr(obj, "__dict__", {}).get(name, default)

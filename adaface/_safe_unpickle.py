"""Reading a `torch.save` file of pickled whole modules without running any code named in it.

A pickle can name any importable callable and have it called while loading. This module never lets that
happen: every global the file names is first listed by a static scan of its pickle stream (nothing is
executed), and the file is refused unless each one is either a tensor-rebuilding global that torch resolves
itself (on a short list here *and* on torch's own `weights_only` list) or matched by the caller's `allowed`
rule. An allowed global is then loaded as an *inert stand-in*: a class of our own that only records the
attributes pickle hands it, or a function that only records its arguments. The real class is never
imported, so its `__setstate__`, `__reduce__` or constructor never run. The stream is then unpickled by
torch's restricted unpickler (the `weights_only` one), told about the stand-ins with the
`torch.serialization.safe_globals` context manager; it enforces the same list a second time.

One parser, one read: the archive is opened once with Python's `zipfile`; the `data.pkl` bytes that were
scanned are the bytes handed to the unpickler, and each tensor is built from the record the central
directory names, at the offset checked here. Archives two zip readers could read differently are refused:
duplicate names, names with control bytes (a NUL hides the rest of a name from some readers), bytes that
belong to no record (a second archive appended or prepended, trailing data, a comment), more than one
top-level folder. Work and memory are bounded before they are spent (the `MAX_*` limits below, each named
in its error): record count, inflated sizes, pickle opcodes, the object graph's size and depth. Tensors are
views of the file (memory-mapped, copy-on-write): a tensor that would read one stored element twice (a zero
or overlapping stride) is refused, so no tensor holds more elements than the file stores.

Why not a `pickle.Unpickler` subclass with `find_class`: it would still run the standard pickle machine
(REDUCE calls whatever `find_class` returns). torch's `weights_only` unpickler calls nothing but
allow-listed objects.
"""

from __future__ import annotations

import io
import mmap
import os
import pickletools
import struct
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

# Limits on what one file may make the reader do; each error names the limit it hit.
MAX_RECORDS = 100_000  # zip entries: a released checkpoint with UNet LoRAs holds a few thousand
MAX_PICKLE_BYTES = 64 * 2**20  # data.pkl: the released files' (modules + two pickled tokenizers) are a few MB
MAX_PICKLE_OPCODES = 5_000_000  # each opcode makes at most one object: bounds the graph's memory (~0.5 GiB)
MAX_INFLATED_BYTES = 256 * 2**20  # compressed (deflated) records, all together, once inflated
MAX_GRAPH_OBJECTS = 5_000_000  # containers, stand-ins and tensors reachable from the loaded object
MAX_GRAPH_DEPTH = 100  # nesting of the loaded object (a CLIP text model inside a generator is ~30 deep)
_TENSOR_REBUILDERS = {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                      "_rebuild_parameter_with_state"}  # dense tensors and Parameters only (no sparse/meta/...)
_EXPECTED_COMPRESSION = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}


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


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= size - 8 and head[8:9] == b"{"


def _limit(path: Path, what: str, value: int, name: str) -> None:
    limit = globals()[name]
    if value > limit:
        raise CheckpointError(f"{path}: {what} ({value:,}) is over the limit {name} = {limit:,}; refused")


class _Archive:
    """A torch.save zip archive, checked to have exactly one reading; records are read from it only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 - kept open for the records; closed by close()
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> None:
        path, fp = self.path, self._file
        self.size = os.fstat(fp.fileno()).st_size
        end = zipfile._EndRecData(fp)  # the end-of-central-directory record (zip64 aware); None if absent
        if end is None:
            raise CheckpointError(f"{path}: not a zip archive")
        _limit(path, "its entry count", end[zipfile._ECD_ENTRIES_TOTAL], "MAX_RECORDS")
        try:
            fp.seek(0)
            self._zip = zipfile.ZipFile(fp)
        except (zipfile.BadZipFile, ValueError, OSError, struct.error, EOFError) as e:
            raise CheckpointError(f"{path}: a damaged zip archive ({e})") from None
        infos = self._zip.infolist()
        _limit(path, "its entry count", len(infos), "MAX_RECORDS")
        self.infos: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            name = info.orig_filename
            bad = next((c for c in name if ord(c) < 32 or ord(c) == 127 or c == "\\"), None)
            if bad is not None:
                raise CheckpointError(f"{path}: the entry name {name!r} holds the byte {bad!r} (zip readers differ "
                                      "on such names); refused")
            if name in self.infos:
                raise CheckpointError(f"{path}: the entry {name!r} appears twice (zip readers differ on which one "
                                      "they read); refused")
            if info.flag_bits & 0x1 or info.compress_type not in _EXPECTED_COMPRESSION:
                raise CheckpointError(f"{path}: the entry {name!r} is encrypted or compressed with method "
                                      f"{info.compress_type}; torch.save writes plain records")
            self.infos[name] = info
        prefixes = {n.split("/", 1)[0] for n in self.infos}
        if len(prefixes) > 1 or any("/" not in n for n in self.infos):
            raise CheckpointError(f"{path}: the archive holds more than one top-level folder "
                                  f"({', '.join(sorted(prefixes)[:4])}); torch.save writes one")
        self.prefix = prefixes.pop() if prefixes else ""
        self._check_layout(end)
        inflated = sum(i.file_size for i in self.infos.values() if i.compress_type != zipfile.ZIP_STORED)
        _limit(path, "the inflated size of its compressed records", inflated, "MAX_INFLATED_BYTES")
        self._mm: mmap.mmap | None = None

    def _check_layout(self, end: list) -> None:
        """Every byte of the file belongs to one record, the central directory or its end record, in order."""
        path, fp = self.path, self._file
        zip64 = end[0] == zipfile.stringEndArchive64
        cd_start, cd_size, end_at = end[zipfile._ECD_OFFSET], end[zipfile._ECD_SIZE], end[zipfile._ECD_LOCATION]
        if end[zipfile._ECD_COMMENT_SIZE] or end_at + zipfile.sizeEndCentDir != self.size:
            raise CheckpointError(f"{path}: bytes follow the zip archive's end record (trailing data or a comment); "
                                  "refused")
        tail = zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator if zip64 else 0
        if cd_start + cd_size + tail != end_at:
            raise CheckpointError(f"{path}: the zip archive does not start at the file's first byte (data or a "
                                  "second archive before it); refused")
        self.data_at: dict[str, int] = {}
        ordered = sorted(self.infos.values(), key=lambda i: i.header_offset)
        pos = 0
        for k, info in enumerate(ordered):
            name = info.orig_filename
            if info.header_offset != pos:
                raise CheckpointError(f"{path}: bytes {pos}..{info.header_offset} belong to no entry (hidden data or "
                                      "a second archive); refused")
            fp.seek(pos)
            head = fp.read(zipfile.sizeFileHeader)
            if len(head) != zipfile.sizeFileHeader or head[:4] != zipfile.stringFileHeader:
                raise CheckpointError(f"{path}: the entry {name!r} has no local header at offset {pos}")
            fh = struct.unpack(zipfile.structFileHeader, head)
            raw = fp.read(fh[zipfile._FH_FILENAME_LENGTH])
            want = name.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
            if raw != want or fh[zipfile._FH_COMPRESSION_METHOD] != info.compress_type:
                raise CheckpointError(f"{path}: the entry {name!r} is named or compressed differently in its local "
                                      "header; refused")
            start = pos + zipfile.sizeFileHeader + len(raw) + fh[zipfile._FH_EXTRA_FIELD_LENGTH]
            stop = start + info.compress_size
            nxt = ordered[k + 1].header_offset if k + 1 < len(ordered) else cd_start
            if stop > nxt or (info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size):
                raise CheckpointError(f"{path}: the entry {name!r} overlaps the next one or misstates its size")
            gap = nxt - stop
            if info.flag_bits & 0x8:  # a data descriptor follows: [signature] crc, sizes (4 or 8 bytes each)
                fp.seek(stop)
                desc = fp.read(min(gap, 24))
                signed = desc[:4] == b"PK\x07\x08"
                fits = gap in ((16, 24) if signed else (12, 20))
                crc = struct.unpack("<L", desc[4:8] if signed else desc[:4])[0] if len(desc) >= 8 else None
                if not fits or crc != info.CRC:
                    raise CheckpointError(f"{path}: bytes after the entry {name!r} are not its data descriptor "
                                          "(hidden data); refused")
            elif gap:
                raise CheckpointError(f"{path}: bytes {stop}..{nxt} belong to no entry (hidden data or a second "
                                      "archive); refused")
            self.data_at[name] = start
            pos = nxt
        if pos != cd_start:
            raise CheckpointError(f"{path}: bytes {pos}..{cd_start} belong to no entry; refused")

    def record_name(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def has(self, name: str) -> bool:
        return self.record_name(name) in self.infos

    def read(self, name: str) -> bytes:
        """A record's bytes (inflated and CRC-checked by zipfile, within the limits checked at opening)."""
        info = self.infos[self.record_name(name)]
        try:
            with self._zip.open(info) as f:
                return f.read()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise CheckpointError(f"{self.path}: the record {info.orig_filename!r} cannot be read ({e})") from None

    def storage(self, name: str, nbytes: int) -> torch.UntypedStorage:
        """The record as a storage: a copy-on-write map of the checked byte range (stored) or its inflated bytes."""
        info = self.infos.get(self.record_name(name))
        if info is None:
            raise CheckpointError(f"{self.path}: the pickle names the tensor record {name!r}, which is not in the "
                                  "archive")
        if info.file_size != nbytes:
            raise CheckpointError(f"{self.path}: the tensor record {name!r} holds {info.file_size} bytes but the "
                                  f"pickle declares {nbytes}; refused")
        if nbytes == 0:
            return torch.UntypedStorage(0)
        if info.compress_type != zipfile.ZIP_STORED:
            return torch.frombuffer(bytearray(self.read(name)), dtype=torch.uint8).untyped_storage()
        if self._mm is None:
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        return torch.frombuffer(self._mm, dtype=torch.uint8, count=nbytes,
                                offset=self.data_at[info.orig_filename]).untyped_storage()

    def pickle_bytes(self) -> bytes:
        names = list(self.infos)
        if not self.has("data.pkl"):
            if any(n.endswith("/constants.pkl") for n in names):
                raise CheckpointError(f"{self.path}: a TorchScript archive, not a torch.save checkpoint")
            raise CheckpointError(f"{self.path}: a zip archive but not a torch.save checkpoint (it holds no data.pkl)")
        if self.has("constants.pkl"):
            raise CheckpointError(f"{self.path}: a TorchScript archive, not a torch.save checkpoint")
        if self.has("byteorder") and self.read("byteorder") not in (b"little",):
            raise CheckpointError(f"{self.path}: its tensors are stored big-endian; only little-endian files are read")
        _limit(self.path, "data.pkl's size", self.infos[self.record_name("data.pkl")].file_size, "MAX_PICKLE_BYTES")
        return self.read("data.pkl")


def _open_archive(path: os.PathLike | str) -> _Archive:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found" if not path.exists() else f"{path}: not a regular file")
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if head[:4] != zipfile.stringFileHeader and head[:4] != zipfile.stringEndArchive:
        if _looks_like_safetensors(head, size):
            raise CheckpointError(
                f"{path}: a safetensors file, not a torch.save checkpoint (.pt); safetensors files need no "
                "conversion"
            )
        if head[:1] == b"\x80":
            raise CheckpointError(
                f"{path}: a bare pickle or a legacy (pre-1.6) torch.save file; only the zip format torch.save has "
                "written since 1.6 is read"
            )
        if zipfile.is_zipfile(path):
            raise CheckpointError(f"{path}: the zip archive does not start at the file's first byte (data or a "
                                  "second archive before it); refused")
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (expected the zip archive torch.save writes)")
    return _Archive(path)


def check_checkpoint_file(path: os.PathLike | str) -> Path:
    """Raise a one-line CheckpointError unless `path` is a zip-format torch.save file; returns the path."""
    with _open_archive(path) as archive:
        archive.pickle_bytes()
    return Path(path)


def _scan_globals(pickle_bytes: bytes, path: Path) -> list[tuple[str, str]]:
    """(module, name) of every GLOBAL in the stream, by disassembly only (pickletools executes nothing)."""
    found: list[tuple[str, str]] = []
    try:
        for n, (op, arg, _) in enumerate(pickletools.genops(pickle_bytes)):
            if n >= MAX_PICKLE_OPCODES:
                _limit(path, "data.pkl's opcode count", n + 1, "MAX_PICKLE_OPCODES")
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


def _distinct(globals_: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return list(dict.fromkeys(globals_))


def checkpoint_globals(path: os.PathLike | str) -> list[tuple[str, str]]:
    """Every (module, name) global the checkpoint's pickle names, in first-seen order, without loading it."""
    with _open_archive(path) as archive:
        return _distinct(_scan_globals(archive.pickle_bytes(), archive.path))


def _torch_resolves(module: str, name: str) -> bool:
    """The globals torch.save writes for tensors, Parameters and containers, which torch itself resolves."""
    if module == "torch._utils":
        return name in _TENSOR_REBUILDERS
    if module == "torch":
        return name.endswith("Storage") or name in ("Size", "device") or isinstance(getattr(torch, name, None),
                                                                                     torch.dtype)
    return (module, name) in {("collections", "OrderedDict"), ("_codecs", "encode"), ("__builtin__", "set"),
                              ("builtins", "set"), ("__builtin__", "frozenset"), ("builtins", "frozenset")}


def _torch_safe_names(names: list[tuple[str, str]]) -> set[str]:
    """Globals left to torch: on our short list above AND on torch's own weights_only list (both must agree)."""
    from torch import _weights_only_unpickler as wou

    torch_allowed = set(wou._get_allowed_globals())
    py2 = {"__builtin__": "builtins"}  # protocol 2 spells builtins the Python 2 way; torch reads it as builtins
    return {f"{m}.{n}" for m, n in names if _torch_resolves(m, n) and f"{py2.get(m, m)}.{n}" in torch_allowed}


def _unpickle(archive: _Archive, data: bytes) -> Any:
    """torch's weights_only unpickler over exactly `data`; tensor storages come from the checked records."""
    from torch import _weights_only_unpickler as wou

    loaded: dict[str, torch.storage.TypedStorage] = {}

    class Unpickler(wou.Unpickler):
        def persistent_load(self, pid: Any) -> Any:
            if not (isinstance(pid, tuple) and len(pid) == 5):
                raise CheckpointError(f"{archive.path}: data.pkl names a persistent object {type(pid).__name__} "
                                      "that is not a tensor storage")
            _, storage_type, key, _location, numel = pid
            key = key.decode("ascii") if isinstance(key, bytes) else key
            if storage_type is torch.UntypedStorage:
                dtype = torch.uint8
            else:
                dtype = getattr(storage_type, "dtype", None)
            if not isinstance(dtype, torch.dtype) or not isinstance(key, str) or type(numel) is not int or numel < 0:
                raise CheckpointError(f"{archive.path}: data.pkl names a malformed tensor storage")
            if key not in loaded:
                nbytes = numel * torch._utils._element_size(dtype)
                loaded[key] = torch.storage.TypedStorage(
                    wrap_storage=archive.storage(f"data/{key}", nbytes), dtype=dtype, _internal=True)
            elif loaded[key].dtype != dtype:
                raise CheckpointError(f"{archive.path}: the tensor record {key!r} is read as two dtypes; refused")
            return loaded[key]

    return Unpickler(io.BytesIO(data), encoding="utf-8").load()


def _check_tensor(t: torch.Tensor, path: Path) -> None:
    """A dense tensor that reads each stored element at most once (so its size is bounded by the file's)."""
    if t.layout != torch.strided or t.device.type != "cpu":
        raise CheckpointError(f"{path}: a tensor of layout {t.layout} on {t.device}; only dense tensors are read")
    extent = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride < extent:
            raise CheckpointError(f"{path}: a tensor of shape {list(t.shape)} has strides {list(t.stride())} that "
                                  "read stored elements more than once (zero or overlapping strides); refused")
        extent += stride * (size - 1)


def _edges(obj: Any) -> Iterator[Any]:
    if isinstance(obj, dict):
        yield from obj.keys()
        yield from obj.values()
    elif isinstance(obj, (list, tuple, set, frozenset)):
        yield from obj
    elif isinstance(obj, StandIn):
        yield from obj.__dict__.values()
    elif isinstance(obj, InertCall):
        yield from obj.args


_LEAVES = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device, torch.Size)


def check_graph(root: Any, path: Path) -> None:
    """Walk everything reachable once (by identity, no recursion): size and depth limits, every tensor checked."""
    seen: set[int] = set()
    stack = [(root, 0)]
    while stack:
        obj, depth = stack.pop()
        if isinstance(obj, _LEAVES) or id(obj) in seen:
            continue
        seen.add(id(obj))
        _limit(path, "the loaded object graph's size", len(seen), "MAX_GRAPH_OBJECTS")
        _limit(path, "the loaded object graph's depth", depth, "MAX_GRAPH_DEPTH")
        if isinstance(obj, torch.Tensor):
            _check_tensor(obj, path)
            continue
        stack.extend((child, depth + 1) for child in _edges(obj))


def load_with_stand_ins(
    path: os.PathLike | str,
    allowed: Callable[[str, str], str | None],
) -> tuple[Any, dict[str, str]]:
    """Load a torch.save file with every non-torch global replaced by an inert stand-in.

    `allowed(module, name)` returns "class" or "function" for a global that may be stood in for, or None.
    Anything else that torch does not allow by default is refused (CheckpointError naming the global) before
    a single byte is unpickled. Returns the loaded object and {global name: "class"|"function"|"torch"}.
    """
    with _open_archive(path) as archive:
        path = archive.path
        data = archive.pickle_bytes()
        names = _distinct(_scan_globals(data, path))
        torch_safe = _torch_safe_names(names)
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
                obj = _unpickle(archive, data)
        except CheckpointError:
            raise
        except Exception as e:  # the restricted unpickler's refusals and a damaged stream's errors alike
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path}: torch's restricted loader could not read it ({first})") from None
    check_graph(obj, path)
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
    """Every parameter and buffer under a stood-in module, with state-dict style dotted names.

    Each module is visited once (a module held twice, or holding itself, is not walked again); depth first,
    without recursion.
    """
    seen: set[int] = set()
    stack = [(obj, prefix, 0)]
    while stack:
        module, pre, depth = stack.pop()
        if id(module) in seen or depth > MAX_GRAPH_DEPTH:
            continue
        seen.add(id(module))
        for k, v in own_tensors(module).items():
            yield pre + k, v
        stack.extend((child, f"{pre}{k}.", depth + 1) for k, child in reversed(children(module).items()))


def global_name(obj: Any) -> str | None:
    """The pickled class name of a stand-in (None for anything else)."""
    return type(obj).global_name if isinstance(obj, StandIn) else None


def attr(obj: Any, name: str, default: Any = None) -> Any:
    """A pickled plain attribute of a stand-in (not a sub-module, parameter or buffer)."""
    return getattr(obj, "__dict__", {}).get(name, default)

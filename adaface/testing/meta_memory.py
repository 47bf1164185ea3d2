"""Device memory of a training step without a device: run it on the `meta` device and count live bytes.

Tensors on `meta` carry shapes and dtypes but no storage, so a full-size step (SD-1.5 UNets, CLIP-L encoders,
512² latents) runs on a CPU in seconds. `LiveBytes` is a `TorchDispatchMode` that sees every storage an op
creates and follows it until it is freed (a weakref finalizer on the storage), so its running sum is what a
caching allocator would hold allocated at that moment, and its maximum the peak (`max_memory_allocated`).

Two things would make a meta run overstate a GPU run, and are corrected here:
- `scaled_dot_product_attention` on `meta` takes its math path and materialises every N×N attention matrix.
  `fused_sdpa()` routes it to the meta implementations of the kernels a GPU runs instead: flash attention
  (fp16/bf16, no mask), memory-efficient attention otherwise. Both keep only the output and a log-sum-exp.
- Optimizers whose step reads values on the host (Prodigy's `.item()`) cannot run on `meta`: their state is
  counted from its definition instead (`prodigy_state_bytes`), checked against a real step in the tests.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 2**30


@dataclass
class Mark:
    label: str
    live: int
    peak: int


class LiveBytes(TorchDispatchMode):
    """Live and peak bytes of the storages that ops create on `device_type` while the mode is active.

    An op's output counts when its storage is new: views and in-place results share an input's storage and
    allocate nothing, so storages made before the mode (the weights), and views of them, are never counted:
    add them with `tensor_bytes`. `mark(label)` records the live and peak bytes at a point.
    """

    def __init__(self, device_type: str = "meta") -> None:
        super().__init__()
        self.device_type = device_type
        self.live = 0
        self.peak = 0
        self.marks: list[Mark] = []
        self._sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        if t.device.type != self.device_type:
            return
        storage = t.untyped_storage()
        key = storage._cdata
        # a view or an in-place result of an input (a weight's `.t()`, `x.add_()`) allocates nothing
        if key in self._sizes or key in inputs:
            return
        n = storage.nbytes()
        self._sizes[key] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type == self.device_type}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        return out

    def reset_peak(self) -> None:
        self.peak = self.live

    def mark(self, label: str) -> Mark:
        m = Mark(label, self.live, self.peak)
        self.marks.append(m)
        return m


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct storages among `tensors` (parameters tied to one storage count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s._cdata] = s.nbytes()
    return sum(seen.values())


def module_bytes(*modules: torch.nn.Module) -> int:
    """Parameters and buffers of `modules`, shared storages counted once."""
    return tensor_bytes(t for m in modules for t in (*m.parameters(), *m.buffers()))


def prodigy_state_bytes(params: Iterable[torch.Tensor], *, slice_p: int = 1, beta1: float = 0.9) -> int:
    """Bytes of prodigyopt.Prodigy's per-parameter state: exp_avg (when beta1 > 0) and exp_avg_sq of the
    parameter's size and dtype, and `s` and `p0` over every `slice_p`-th element."""
    total = 0
    for p in params:
        n, es = p.numel(), p.element_size()
        sliced = math.ceil(n / slice_p)
        total += es * ((2 if beta1 > 0 else 1) * n + 2 * sliced)
    return total


_sdpa = F.scaled_dot_product_attention


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if query.device.type != "meta":
        return _sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa)
    if enable_gqa and key.shape[-3] != query.shape[-3]:  # the fused kernels want one K/V head per query head
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    if attn_mask is None and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256:
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                  False, scale=scale)[0]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attn_mask, float("-inf"))
    if attn_mask is not None:
        attn_mask = attn_mask.expand(*query.shape[:-1], key.shape[-2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, True, dropout_p,
                                                                  is_causal, scale=scale)[0]


@contextlib.contextmanager
def fused_sdpa() -> Iterator[None]:
    """Within the block, `F.scaled_dot_product_attention` on meta tensors uses the fused kernels' meta
    implementations (what a GPU runs) instead of the math path; other devices are untouched."""
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _sdpa

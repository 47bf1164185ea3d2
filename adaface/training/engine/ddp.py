"""Distributed data parallel plumbing for `torchrun`: process group, rank seeds, sharding, reductions.

Every rank runs the same script; rank 0 alone logs and writes checkpoints. Randomness that must agree across
ranks (model expansion noise) uses `shared_seed`; randomness that must differ (IDs, noise, timesteps) uses
`rank_seed`. Seeds are derived per step rather than carried as generator state, so a resumed run draws
exactly what an uninterrupted one would, on every rank.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistInfo:
    """Rank and world size from torchrun's environment (1 process when it is absent)."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun set up: NCCL on CUDA, gloo on the CPU."""
    info = dist_env()
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    return info


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of ints/strings; stable across processes and Python versions."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def rank_seed(seed: int, rank: int, step: int, micro: int = 0, stream: str = "data") -> int:
    return mix_seed(seed, "rank", rank, step, micro, stream)


def shared_seed(seed: int, *parts: int | str) -> int:
    return mix_seed(seed, "shared", *parts)


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """The mean over ranks of a list of floats (identity without a process group)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).tolist()


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision on every rank (plateau decisions must agree, or DDP would deadlock)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def agree_flags(rank0_flag: bool, any_flag: bool, device: torch.device) -> tuple[bool, bool]:
    """(rank 0's `rank0_flag`, whether any rank set `any_flag`) on every rank, in one collective."""
    if not dist.is_initialized():
        return rank0_flag, any_flag
    first = rank0_flag if dist.get_rank() == 0 else False
    t = torch.tensor([int(first), int(any_flag)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    a, b = t.tolist()
    return bool(a), bool(b)


def shard(indices: list[int], info: DistInfo) -> list[int]:
    """This rank's share of an index list (strided, so the shards differ by at most one element)."""
    return indices[info.rank :: info.world_size]


def max_param_difference(params: list[torch.Tensor], device: torch.device) -> float:
    """Largest elementwise difference of the flattened parameters between this rank and rank 0."""
    if not dist.is_initialized() or not params:
        return 0.0
    flat = torch.cat([p.detach().reshape(-1).float() for p in params]).to(device)
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)

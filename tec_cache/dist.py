"""Distributed helpers shared by both stages: torchrun environment, process group, device choice.

Data flow: torchrun's RANK/WORLD_SIZE/LOCAL_RANK --> DistInfo --> which shards (stage 1) or
which samples (stage 2) this process owns, and which device it runs on.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank facts from torchrun's environment (a plain run is rank 0 of 1)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def resolve_device(name: str, info: DistInfo) -> torch.device:
    """--device auto|cpu|cuda|cuda:N; under torchrun each process takes cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: {name!r} is not a device (expected auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available")
    return dev


def init_process_group(info: DistInfo, device: torch.device, timeout_s: float = 1800.0) -> bool:
    """Join torchrun's group (nccl on CUDA, gloo on CPU); False when running alone."""
    if info.world_size <= 1 or (tdist.is_available() and tdist.is_initialized()):
        return tdist.is_available() and tdist.is_initialized()
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    tdist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return True


def barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def destroy_process_group() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def all_reduce_sum(value: float, device: torch.device) -> float:
    """Sum a number over all ranks (itself when running alone)."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return float(t.item())

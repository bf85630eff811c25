"""Where a run executes: rank facts, device, mixed precision, per-rank seeding and the DDP group.

Data flow: --device / --amp and torchrun's environment --> ``Runtime`` (rank, device, resolved
amp) --> the loop builds its model, seeds its per-rank streams, ``join``s the process group
(nccl on CUDA, gloo on CPU), wraps the model in DDP and runs its steps under ``autocast`` -->
``leave`` tears the group down again if this run made it.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

from tec_cache.runtime.dist import DistInfo, destroy_process_group, dist_info, init_process_group, resolve_device

AMP_MODES = ("auto", "bf16", "fp16", "off")


def resolve_amp(amp: str, device: torch.device) -> str:
    """auto -> bf16 on CUDA, off elsewhere; mixed precision is refused off CUDA (CPUs here lack bf16 units)."""
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "off"
    if amp != "off" and device.type != "cuda":
        raise ValueError(f"--amp {amp}: mixed precision runs on CUDA only; use --amp off (or auto) on {device}")
    return amp


def seed_rank(seed: int, rank: int) -> None:
    """Seed torch, numpy and random with ``seed + rank``: each rank its own stream, as the reference."""
    torch.manual_seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    random.seed(seed + rank)


class Runtime:
    """The process's place in the run: ``info`` (rank, world size), ``device``, ``amp`` (resolved)."""

    def __init__(self, device: str, amp: str) -> None:
        self.info: DistInfo = dist_info()
        self.device = resolve_device(device, self.info)
        self.amp = resolve_amp(amp, self.device)
        self.distributed = False
        self.owns_group = False  # whether leave() destroys the group: not when a caller made it

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    @property
    def world_size(self) -> int:
        return self.info.world_size

    def join(self) -> bool:
        """Select the device and join torchrun's process group; True when running distributed.
        Joining twice is joining once (the writer lock joins before the loop's own setup)."""
        if self.distributed:
            return True
        if self.device.type == "cuda":
            # NCCL's object collectives (the RNG gather of a checkpoint) address the current device.
            torch.cuda.set_device(self.device)
        self.owns_group = self.info.world_size > 1 and not (tdist.is_available() and tdist.is_initialized())
        self.distributed = init_process_group(self.info, self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
        return self.distributed

    def wrap(self, model: torch.nn.Module) -> Any:
        """``model`` in DDP when distributed, else itself."""
        if not self.distributed:
            return model
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward's mixed-precision context (a no-op with amp off)."""
        if self.amp == "off":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (``[obj]`` when running alone)."""
        if not self.distributed:
            return [obj]
        every: list[Any] = [None] * self.info.world_size
        tdist.all_gather_object(every, obj)
        return every

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks, in float64 on the device."""
        return self.all_reduce_(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()  # [len(values)]

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks in place (unchanged when running alone); returns ``t``."""
        if self.distributed:
            tdist.all_reduce(t)
        return t

    def leave(self) -> None:
        """Destroy the process group if ``join`` created it."""
        if self.owns_group:
            destroy_process_group()

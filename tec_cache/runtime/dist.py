"""Distributed helpers shared by both stages: torchrun environment, process group, device choice.

Data flow: torchrun's RANK/WORLD_SIZE/LOCAL_RANK --> DistInfo --> which shards (stage 1) or
which samples (stage 2) this process owns, and which device it runs on.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from tec_cache.runtime.config import env_seconds


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
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ValueError(f"--device {name}: this machine has {n} CUDA device(s), expected cuda:0..cuda:{n - 1}")
    return dev


# Seconds a rank waits for the others (joining, and in any collective) before it gives up. Under
# torchrun a dead local rank makes the agent stop the job at once; this bounds the cases the agent
# cannot see: a rank that never joins, or a peer lost on another node.
TIMEOUT_ENV = "TEC_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


class LostRankError(RuntimeError):
    """A collective failed because another rank of the job is gone; the message says what to do."""


def dist_timeout_s() -> float:
    """``TEC_DIST_TIMEOUT`` (seconds) or the default; ValueError names the variable."""
    return env_seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


def init_process_group(info: DistInfo, device: torch.device, timeout_s: float | None = None) -> bool:
    """Join torchrun's group (nccl on CUDA, gloo on CPU); False when running alone."""
    if info.world_size <= 1 or (tdist.is_available() and tdist.is_initialized()):
        return tdist.is_available() and tdist.is_initialized()
    timeout_s = dist_timeout_s() if timeout_s is None else timeout_s
    backend = "nccl" if device.type == "cuda" else "gloo"
    with lost_rank_guard(f"joining the process group (waits up to {timeout_s:g} s, {TIMEOUT_ENV})",
                         "re-run the same command once every rank can start"):
        tdist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                 device_id=device if device.type == "cuda" else None)
    return True


def is_peer_loss(e: BaseException) -> bool:
    """Whether ``e`` is a collective or rendezvous failing because another rank is gone or silent
    (gloo: connection reset/closed or its timeout; NCCL: aborted communicator; store: timeout)."""
    if isinstance(e, LostRankError):
        return False  # already explained
    if isinstance(e, tdist.DistError):
        return True
    # Older backends raise plain RuntimeErrors; theirs name the backend or the dropped connection.
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in text for w in ("gloo", "nccl", "connection reset", "connection closed"))


def explain_peer_loss(e: BaseException, what: str, resume: str) -> LostRankError | None:
    """One LostRankError line for a peer loss (naming this rank, what it was doing and how to
    resume), or None when ``e`` is something else or this process runs alone."""
    info = dist_info()
    if info.world_size <= 1 or not is_peer_loss(e):
        return None
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return LostRankError(
        f"rank {info.rank} of {info.world_size}: lost another rank while {what} ({type(e).__name__}: {first}). "
        f"That rank failed, was killed or never started: see its own error. {resume[0].upper()}{resume[1:]}."
    )


@contextlib.contextmanager
def lost_rank_guard(what: str, resume: str) -> Iterator[None]:
    """Re-raise a peer loss inside the block as ``explain_peer_loss``'s LostRankError, instead of a
    backend traceback."""
    try:
        yield
    except (RuntimeError, OSError) as e:
        lost = explain_peer_loss(e, what, resume)
        if lost is None:
            raise
        raise lost from e


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

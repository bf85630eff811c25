"""Continuing a run: finding the checkpoint to resume, and the RNG states that make it bit-exact.

Data flow: run dir --latest complete checkpoint--> ``find_resume`` (options compared, world size
checked, a raised --epochs noted as an Extension) --> the loop restores its parts (``state``) and
every RNG stream from it --> ``agree_on_position`` makes sure all ranks continue from the same
checkpoint. Each checkpoint stores every rank's RNG states (``gather_rng``): torch, CUDA, numpy,
random and the run's own generator, so a resumed run draws exactly what an uninterrupted one draws.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from .checkpoint_state import RunCheckpoint
from .checkpoints import usable_checkpoint
from .errors import CheckpointError, ResumeError
from .run_dir import Extension, RunKind, check_options, read_checkpoint
from .runtime import Runtime

CK = TypeVar("CK", bound=RunCheckpoint)


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """This process's RNG states in a weights_only-loadable form (tensors and plain numbers).

    ``generator`` is the run's own stream (pretraining's mask noise, fine-tuning's loader seeds);
    it is stored under "mask", the key checkpoints have always used.
    """
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # legacy=True: the (name, keys, pos, has_gauss, cached) tuple
    _, np_keys, np_pos, np_has_gauss, np_cached = np_state
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np_keys.astype(np.int64)),  # MT19937 words, uint32 in int64
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": py_gauss},
        "mask": generator.get_state(),
    }


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    """Inverse of ``capture_rng``."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    generator.set_state(state["mask"])


def gather_rng(runtime: Runtime, generator: torch.Generator) -> list[dict[str, Any]]:
    """Every rank's RNG states, in rank order (a collective: every rank must call it)."""
    return runtime.all_gather(capture_rng(generator))


@dataclass
class Resume:
    """The checkpoint a run continues from, read on every rank."""

    path: Path
    checkpoint: RunCheckpoint | None  # dropped by release() once restored, so the mapped file can go
    extension: Extension | None  # set when this run raised --epochs
    extended: list[dict[str, int]]  # the run's earlier extensions, as its checkpoint recorded them

    def state(self, kind: type[CK]) -> CK:
        """The checkpoint as the loop's own kind of state (until ``release``)."""
        if not isinstance(self.checkpoint, kind):
            raise TypeError(f"{self.path}: expected a {kind.__name__}, have {type(self.checkpoint).__name__} "
                            "(released already?)")
        return self.checkpoint

    def release(self) -> None:
        self.checkpoint = None

    def history(self, step: int, epoch: int) -> list[dict[str, int]]:
        """The "extended" list of this run from here on: the stored one, plus this extension if any."""
        return self.extended + ([self.extension.entry(step, epoch)] if self.extension is not None else [])


def find_resume(run_dir: Path, kind: RunKind, options: dict[str, Any], world_size: int,
                say: Callable[[str], None] | None = None) -> Resume | None:
    """The run dir's newest intact checkpoint (``say`` gets a line for each damaged one skipped, or
    for one without a digest), checked against this run's options and process count (unless the run
    kind is elastic: its loop fits the position to the new count); None for a fresh run.
    ResumeError names the option (or the world size) that differs, or lists the checkpoints checked
    when none is intact."""
    try:
        path = usable_checkpoint(run_dir, kind.checkpoints, say)
    except CheckpointError as e:
        raise ResumeError(str(e)) from e
    if path is None:
        return None
    ck = read_checkpoint(path, kind)
    extension = check_options(ck.options, options, path, kind)
    if ck.world_size != world_size and not kind.elastic:
        raise ResumeError(f"world size: the run in {run_dir} was started with {ck.world_size} processes, "
                          f"now {world_size}; {kind.world_size_needs}")
    return Resume(path, ck, extension, list(ck.config.extended))


def agree_on_position(runtime: Runtime, position: int, unit: str) -> None:
    """Every rank found its own latest checkpoint; on a run dir that is not shared they differ."""
    every = runtime.all_gather(position)
    if len(set(every)) != 1:
        raise ResumeError(f"ranks resume from different {unit} {every}: --run-dir must be one folder every rank sees")

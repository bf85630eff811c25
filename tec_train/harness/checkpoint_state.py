"""A run's checkpoint as typed, frozen state: read once, every key checked, attributes instead of paths.

Data flow: checkpoint file --``checkpoints.load_checkpoint`` (weights_only)--> dict --``read_state``-->
``PretrainCheckpoint`` / ``FinetuneCheckpoint`` (a missing or mistyped key is a CheckpointError naming
the file and the key) --> resume (``resume.find_resume``), the loops' restore (``state.RunState``) and
their position; ``StoredConfig.read`` alone serves readers that need only the stored config (the
encoder reader). The bytes on disk do not change: ``state.RunState.save`` writes the same dict as
always. Keys that earlier versions did not write read as None (or empty), and the loop that uses one
gives it the value that reproduces those versions (e.g. the mask scheme of a run from before elastic
resume), so every run dir written before still resumes.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoints import FINETUNE, PRETRAIN
from .errors import CheckpointError


class _Reader:
    """Typed look-ups in one mapping of a checkpoint; errors name the file and the dotted key."""

    def __init__(self, data: Any, path: Path, where: str = "") -> None:
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{path}: {where.rstrip('.') or 'the checkpoint'} is not a mapping "
                                  f"(got {type(data).__name__})")
        self.data, self.path, self.where = data, path, where

    def _fail(self, key: str, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what} key {self.where}{key}; not a complete tec-train checkpoint")

    def get(self, key: str, kind: type | tuple[type, ...], *, required: bool = True, none: bool = False) -> Any:
        """The value at ``key``: of ``kind`` (or None when ``none``); absent: CheckpointError if
        ``required``, else None."""
        if key not in self.data:
            if required:
                raise self._fail(key, "missing")
            return None
        value = self.data[key]
        if value is None and none:
            return None
        # bool is an int to isinstance; a stored flag where a number belongs is a damaged file
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
            raise self._fail(key, f"{type(value).__name__} at")
        return value

    def sub(self, key: str, *, required: bool = True) -> _Reader | None:
        value = self.get(key, Mapping, required=required)
        return None if value is None else _Reader(value, self.path, f"{self.where}{key}.")


@dataclass(frozen=True)
class Resolved:
    """config.resolved: what a run resolved at its start (lr, batch, ...). ``raw`` keeps all of it."""

    raw: dict[str, Any]
    student: dict[str, Any] | None  # pretraining: the student's architecture (the encoder reader's)

    @classmethod
    def read(cls, r: _Reader) -> Resolved:
        return cls(dict(r.data), r.get("student", Mapping, required=False))


@dataclass(frozen=True)
class PretrainResolved(Resolved):
    """config.resolved of ``tec-train run``. None: a run from before the key existed."""

    optimizer_steps_per_epoch: int
    targets: dict[str, Any]  # the target feed's spec, compared on resume
    epoch_samples: int | None  # before elastic resume: an epoch counted in its own layout's micro-batches
    mask_noise: str | None  # before elastic resume: one checkpointed mask stream per rank
    layouts: tuple[dict[str, int], ...] | None  # before elastic resume: the one it was started with

    @classmethod
    def read(cls, r: _Reader) -> PretrainResolved:
        layouts = r.get("layouts", list, required=False)
        return cls(dict(r.data), r.get("student", Mapping, required=False), r.get("optimizer_steps_per_epoch", int),
                   dict(r.get("targets", Mapping)), r.get("epoch_samples", int, required=False),
                   r.get("mask_noise", str, required=False), None if layouts is None else tuple(layouts))


@dataclass(frozen=True)
class StoredConfig:
    """A checkpoint's "config": the options given, what they resolved to, and the run's extensions."""

    options: dict[str, Any]
    resolved: Resolved
    extended: tuple[dict[str, int], ...]  # empty until a raised --epochs extended the run

    @classmethod
    def read(cls, ck: Mapping[str, Any], path: Path, resolved: type[Resolved] = Resolved) -> StoredConfig:
        """The "config" of checkpoint ``ck`` (read from ``path``, named in errors)."""
        config = _Reader(ck, path).sub("config")
        assert config is not None  # required
        res = config.sub("resolved")
        assert res is not None  # required
        return cls(dict(config.get("options", Mapping)), resolved.read(res),
                   tuple(config.get("extended", list, required=False) or ()))


@dataclass(frozen=True)
class RunCheckpoint:
    """What every checkpoint of a run holds: the parts, every rank's RNG states, the stored config."""

    path: Path
    config: StoredConfig
    world_size: int  # processes of the run that wrote it
    epoch: int  # the next epoch to run (pretraining: with ``step_in_epoch``)
    # As loaded (not copied): a state dict's own mapping carries its metadata.
    model: Mapping[str, torch.Tensor]  # the bare model's state dict
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None  # None: the GradScaler was off (no fp16)
    rng: tuple[dict[str, Any], ...]  # per rank, in rank order (resume.capture_rng)

    @property
    def options(self) -> dict[str, Any]:
        return self.config.options

    @staticmethod
    def _common(ck: Mapping[str, Any], path: Path, resolved: type[Resolved]) -> dict[str, Any]:
        r = _Reader(ck, path)
        return {"path": path, "config": StoredConfig.read(ck, path, resolved), "world_size": r.get("world_size", int),
                "epoch": r.get("epoch", int), "model": r.get("model", Mapping),
                "optimizer": r.get("optimizer", dict), "scaler": r.get("scaler", dict, none=True),
                "rng": tuple(r.get("rng", list))}


@dataclass(frozen=True)
class LoaderPosition:
    """The loader facts a pretraining checkpoint keeps."""

    steps_per_epoch: int  # micro-batches per epoch of each rank, in the run's layout then
    view_epoch: int | None  # the cache's view-epoch of the checkpoint's epoch


@dataclass(frozen=True)
class PretrainCheckpoint(RunCheckpoint):
    """A ``checkpoint-<step>.pt`` of ``tec-train run``; its position is the next micro-batch to run."""

    global_step: int
    step_in_epoch: int
    loader: LoaderPosition
    log_accum: dict[str, float]  # the metrics interval in progress (loss-term sums and "n")

    @property
    def resolved(self) -> PretrainResolved:
        assert isinstance(self.config.resolved, PretrainResolved)  # read() builds it so
        return self.config.resolved

    @classmethod
    def read(cls, ck: Mapping[str, Any], path: Path) -> PretrainCheckpoint:
        r = _Reader(ck, path)
        loader = r.sub("loader")
        assert loader is not None  # required
        return cls(**cls._common(ck, path, PretrainResolved), global_step=r.get("global_step", int),
                   step_in_epoch=r.get("step_in_epoch", int),
                   loader=LoaderPosition(loader.get("steps_per_epoch", int), loader.get("view_epoch", int, required=False)),
                   log_accum=dict(r.get("log_accum", Mapping)))


@dataclass(frozen=True)
class FinetuneCheckpoint(RunCheckpoint):
    """A ``finetune-<epoch>.pt`` of ``tec-train finetune``: ``epoch`` epochs done."""

    best_top1: float
    best_epoch: int

    @classmethod
    def read(cls, ck: Mapping[str, Any], path: Path) -> FinetuneCheckpoint:
        r = _Reader(ck, path)
        return cls(**cls._common(ck, path, Resolved), best_top1=float(r.get("best_top1", (int, float))),
                   best_epoch=r.get("best_epoch", int))


_BY_FORMAT: dict[str, type[PretrainCheckpoint] | type[FinetuneCheckpoint]] = {
    PRETRAIN.format: PretrainCheckpoint, FINETUNE.format: FinetuneCheckpoint}


def read_state(ck: Mapping[str, Any], path: Path) -> PretrainCheckpoint | FinetuneCheckpoint:
    """The typed state of a checkpoint dict ``load_checkpoint`` read from ``path`` (its format says which)."""
    fmt = ck.get("format")
    if fmt not in _BY_FORMAT:
        raise CheckpointError(f"{path}: format {fmt!r} is not a run checkpoint's")
    return _BY_FORMAT[fmt].read(ck, path)

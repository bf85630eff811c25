"""Checkpoint files: atomic replacement, keep-last-N, weights_only loading, RNG round trip."""
from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tec_train.harness import checkpoints as ck
from tec_train.harness import resume
from tec_train.harness.errors import CheckpointError
from tests.conftest import latest_saved


def _state(step: int) -> dict:
    return {
        "model": {"w": torch.full((3, 2), float(step))},
        "optimizer": {"state": {0: {"step": torch.tensor(float(step))}}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": [0]}]},
        "global_step": step,
        "config": {"model": "vit_tiny_patch8", "clip_grad": None, "warmup_epochs": 1.5},
    }


def test_save_load_and_latest(tmp_path: Path) -> None:
    for step in (5, 10, 7):
        ck.save_checkpoint(tmp_path, _state(step), step, keep_last=5)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [5, 7, 10]
    latest = ck.latest_checkpoint(tmp_path)
    assert latest == ck.checkpoint_path(tmp_path, 10)
    obj = ck.load_checkpoint(latest)
    assert obj["global_step"] == 10 and obj["config"]["clip_grad"] is None
    assert torch.equal(obj["model"]["w"], torch.full((3, 2), 10.0))
    # Plain torch.load with weights_only=True reads it too: nothing pickled but tensors and containers.
    torch.load(latest, weights_only=True)


def test_keep_last_n(tmp_path: Path) -> None:
    for step in range(1, 7):
        ck.save_checkpoint(tmp_path, _state(step), step, keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [5, 6]


def test_failed_write_leaves_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ck.save_checkpoint(tmp_path, _state(1), 1, keep_last=1)

    def half_write(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", half_write)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(tmp_path, _state(2), 2, keep_last=1)
    monkeypatch.undo()
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1]
    assert ck.load_checkpoint(latest_saved(tmp_path))["global_step"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the failed temp is removed


def test_truncated_or_foreign_files_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "x.pt"
    p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable"):
        ck.load_checkpoint(p)
    torch.save({"model": {}}, p)
    with pytest.raises(CheckpointError, match="not a tec-train checkpoint"):
        ck.load_checkpoint(p)


def test_rng_round_trip(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(123)
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal()  # leave a cached gaussian in numpy's state
    random.gauss(0, 1)
    state = resume.capture_rng(gen)
    ck.save_checkpoint(tmp_path, {"rng": [state]}, 1, keep_last=1)

    def draw() -> tuple:
        return (torch.rand(4).tolist(), np.random.rand(3).tolist(), np.random.normal(), random.random(),
                random.gauss(0, 1), torch.rand(4, generator=gen).tolist())

    expected = draw()
    draw()  # move every generator on
    resume.restore_rng(ck.load_checkpoint(latest_saved(tmp_path))["rng"][0], gen)
    assert draw() == expected


def _pretrain_dict() -> dict:
    """A pretraining checkpoint as the first stage-2 release wrote it: no epoch_samples, mask_noise,
    layouts (elastic resume) nor extended (run extension)."""
    return {"format": ck.PRETRAIN.format, "version": ck.PRETRAIN.version, **_state(4), "scaler": None, "rng": [{}],
            "world_size": 1, "epoch": 1, "step_in_epoch": 0, "loader": {"steps_per_epoch": 4, "view_epoch": 1},
            "log_accum": {"loss": 0.0, "n": 0},
            "config": {"options": {"batch_size": 4}, "resolved": {"optimizer_steps_per_epoch": 4, "targets": {"k": 1}}}}


def test_typed_state_of_an_old_checkpoint_reads_absent_keys_as_absent(tmp_path: Path) -> None:
    from tec_train.harness.checkpoint_state import FinetuneCheckpoint, PretrainCheckpoint, read_state

    state = read_state(_pretrain_dict(), tmp_path / "checkpoint-00000004.pt")
    assert isinstance(state, PretrainCheckpoint)
    assert (state.epoch, state.step_in_epoch, state.global_step, state.world_size) == (1, 0, 4, 1)
    assert state.loader.steps_per_epoch == 4 and state.options == {"batch_size": 4} and state.config.extended == ()
    assert state.resolved.optimizer_steps_per_epoch == 4 and state.resolved.targets == {"k": 1}
    assert (state.resolved.epoch_samples, state.resolved.mask_noise, state.resolved.layouts) == (None, None, None)
    ft = {**_pretrain_dict(), "format": ck.FINETUNE.format, "best_top1": 0.5, "best_epoch": 0}
    assert isinstance(read_state(ft, tmp_path / "finetune-0001.pt"), FinetuneCheckpoint)


@pytest.mark.parametrize("path, key", [(("log_accum",), "log_accum"), (("loader", "steps_per_epoch"), "loader.steps_per_epoch"),
                                       (("config", "resolved", "targets"), "config.resolved.targets")])
def test_typed_state_names_the_file_and_the_missing_key(tmp_path: Path, path: tuple, key: str) -> None:
    from tec_train.harness.checkpoint_state import read_state

    d = _pretrain_dict()
    inner = d
    for k in path[:-1]:
        inner = inner[k]
    del inner[path[-1]]
    with pytest.raises(CheckpointError, match=rf"checkpoint-00000004\.pt: missing key {re.escape(key)}\b"):
        read_state(d, tmp_path / "checkpoint-00000004.pt")
    d = _pretrain_dict()
    d["epoch"] = "one"
    with pytest.raises(CheckpointError, match=r"str at key epoch"):
        read_state(d, tmp_path / "checkpoint-00000004.pt")

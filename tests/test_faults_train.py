"""Fault injection, stage 2: `tec-train run` SIGKILLed at seeded points (a step, and every stage of a
checkpoint write) resumes from the last complete checkpoint and ends bit-identical to an
uninterrupted run on CPU; an interrupted write never damages earlier checkpoints; a lost rank ends
the job at once with a message naming it, and the re-run resumes."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tec_train.harness.checkpoints import checkpoint_path, latest_checkpoint, list_checkpoints, load_checkpoint
from tests.faultkit import clean_env, count_arrivals, launch_ranks, run_module, seeded_nth

EXACT_FIELDS = ("step", "epoch", "epoch_f", "loss", "loss_fea", "loss_att", "lr")


@pytest.fixture(scope="module")
def tiny(tiny_cache: SimpleNamespace) -> SimpleNamespace:
    """20 images and a 2-view-epoch int8 cache of them (shards of 5) from the tiny base model."""
    return tiny_cache


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _exact(run_dir: Path) -> list[tuple]:
    return [tuple(r[k] for k in EXACT_FIELDS) for r in _records(run_dir)]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def _train(run_dir: Path, args: list[str], env: dict[str, str] | None = None, ranks: int = 0):
    return run_module("tec_train", ["run", "--run-dir", str(run_dir), *args], env=env, torchrun=ranks, timeout=240)


def _kill_args(cache: Path) -> list[str]:
    # 20 views / batch 2 = 10 micro-batches per epoch; accum 3 uses 9 of them: 3 steps per epoch, 9 in
    # all. Checkpoints every 2 steps and at each epoch end: steps 2, 3, 4, 6, 8, 9 (all kept).
    return ["--cache", str(cache), "--model", "vit_tiny_patch8", "--depth", "3", "--batch-size", "2", "--accum-iter", "3",
            "--epochs", "3", "--warmup-epochs", "1", "--blr", "1e-3", "--num-workers", "1", "--log-every", "1",
            "--ckpt-every", "2", "--keep-last", "10", "--device", "cpu"]


CKPT_STEPS = [2, 3, 4, 6, 8, 9]


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory) -> SimpleNamespace:
    """The uninterrupted run, with its fault-point arrivals."""
    root = tmp_path_factory.mktemp("straight")
    run, log = root / "run", root / "arrivals.log"
    r, _ = _train(run, _kill_args(tiny.cache), env=clean_env(TEC_FAULT_LOG=str(log)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(run)] == CKPT_STEPS and len(_exact(run)) == 9
    return SimpleNamespace(run=run, arrivals=count_arrivals(log))


def _resumes_from(point: str, nth: int) -> int | None:
    """The last complete checkpoint when ``point`` fails at its ``nth`` arrival."""
    if point == "train_step":  # after step nth's update, before its record and checkpoint
        done = [s for s in CKPT_STEPS if s < nth]
    elif point == "after_checkpoint_rename":  # checkpoint nth is in place, older ones not yet pruned
        done = CKPT_STEPS[:nth]
    else:  # checkpoint_torn, mid_checkpoint: checkpoint nth is being written
        done = CKPT_STEPS[: nth - 1]
    return done[-1] if done else None


TRAIN_KILLS = ["train_step", "checkpoint_torn", "mid_checkpoint", "after_checkpoint_rename"]


@pytest.mark.slow
@pytest.mark.parametrize("point", TRAIN_KILLS)
def test_killed_run_resumes_bit_identically(point: str, tiny, straight: SimpleNamespace, tmp_path: Path) -> None:
    nth = seeded_nth(point, straight.arrivals[point], salt=TRAIN_KILLS.index(point))
    fault, expect = f"{point}:{nth}", _resumes_from(point, nth)
    run = tmp_path / "run"
    r, _ = _train(run, _kill_args(tiny.cache), env=clean_env(TEC_FAULT=fault))
    assert r.returncode == -9, f"{fault}: {r.stderr[-3000:]}"
    found = list_checkpoints(run)
    assert (found[-1][0] if found else None) == expect, (fault, found)
    # The interrupted write damaged nothing: every complete checkpoint loads and holds exactly what
    # the uninterrupted run saved at that step; a half-written one lies under a name nothing reads.
    for step, path in found:
        mine, theirs = load_checkpoint(path), load_checkpoint(checkpoint_path(straight.run, step))
        _assert_same_weights(mine["model"], theirs["model"])
        assert (mine["epoch"], mine["step_in_epoch"]) == (theirs["epoch"], theirs["step_in_epoch"])
    temps = [p.name for p in run.iterdir() if p.name.startswith(".checkpoint-")]
    assert len(temps) == (point in ("checkpoint_torn", "mid_checkpoint")), temps
    # Re-running with only --run-dir resumes with the stored options (with none stored, the same command).
    r, _ = _train(run, [] if expect else _kill_args(tiny.cache))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (f"resuming checkpoint-{expect:08d}.pt" in r.stderr) if expect else ("resuming" not in r.stderr), r.stderr[-2000:]
    assert _exact(run) == _exact(straight.run) and len(_exact(run)) == 9
    _assert_same_weights(load_checkpoint(latest_checkpoint(run))["model"],
                         load_checkpoint(latest_checkpoint(straight.run))["model"])
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # the killed writer's temp file is gone


def _ddp_args(cache: Path) -> list[str]:
    # 2 ranks x batch 2: 5 micro-batches per rank and epoch, accum 2 -> 2 steps per epoch, 6 in all.
    return ["--cache", str(cache), "--model", "vit_tiny_patch8", "--depth", "3", "--batch-size", "2",
            "--accum-iter", "2", "--epochs", "3", "--warmup-epochs", "1", "--blr", "1e-3", "--num-workers", "1",
            "--log-every", "1", "--ckpt-every", "3", "--device", "cpu"]


@pytest.mark.slow
def test_lost_rank_under_torchrun_fails_fast_and_the_rerun_resumes(tiny, tmp_path: Path) -> None:
    """Rank 1 of 2 SIGKILLed after step 4: torchrun stops rank 0 and exits naming rank 1 well before
    any collective timeout; the two-rank re-run resumes from step 3 and ends bit-identical."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    with ThreadPoolExecutor(2) as pool:  # the two launches are independent: overlap their start-up
        runs = [pool.submit(_train, straight, _ddp_args(tiny.cache), ranks=2),
                pool.submit(_train, killed, _ddp_args(tiny.cache), env=clean_env(TEC_FAULT="train_step:4@1"), ranks=2)]
        (r, _), (k, seconds) = (f.result() for f in runs)
    assert r.returncode == 0, r.stderr[-3000:]
    assert k.returncode != 0 and seconds < 90, (k.returncode, seconds)
    assert "Root Cause" in k.stderr and "rank      : 1 (local_rank: 1)" in k.stderr and "SIGKILL" in k.stderr, k.stderr[-3000:]
    assert max(s for s, _ in list_checkpoints(killed)) == 3  # mid-epoch: epoch 1, micro-batch 2
    r, _ = _train(killed, _ddp_args(tiny.cache), ranks=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _exact(killed) == _exact(straight) and len(_exact(straight)) == 6
    _assert_same_weights(load_checkpoint(latest_checkpoint(killed))["model"],
                         load_checkpoint(latest_checkpoint(straight))["model"])
    ck = load_checkpoint(latest_checkpoint(killed))
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert not torch.equal(ck["rng"][0]["mask"], ck["rng"][1]["mask"])  # each rank draws its own masks


@pytest.mark.slow
def test_lost_rank_without_the_agent_stops_training_with_a_clear_message(tiny, tmp_path: Path) -> None:
    """Without torchrun's agent (a peer on another node), rank 0's next collective fails as soon as
    rank 1's connection drops: one line naming the rank and how to resume, not a hang."""
    run = tmp_path / "run"
    (code0, out0, s0), (code1, _, _) = launch_ranks("tec_train", ["run", "--run-dir", str(run), *_ddp_args(tiny.cache)],
                                                    [0, 1], 2, clean_env(TEC_FAULT="train_step:2@1"))
    assert code1 == -9
    assert code0 == 1 and s0 < 120, (code0, s0, out0[-2000:])
    assert "rank 0 of 2: lost another rank while training" in out0, out0[-2000:]
    assert "Re-run the same command to resume from the last checkpoint" in out0

"""Fault injection, stage 2: `tec-train run` SIGKILLed at seeded points (a step, and every stage of a
checkpoint write) resumes from the last complete checkpoint and ends bit-identical to an
uninterrupted run on CPU; an interrupted write never damages earlier checkpoints; a lost rank ends
the job at once with a message naming it, and the re-run resumes."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tec_cache.format.writer_lock import LOCK_NAME
from tec_train.harness.checkpoints import checkpoint_path, digest_path, list_checkpoints, load_checkpoint
from tests.conftest import latest_saved
from tests.faultkit import ROOT, clean_env, count_arrivals, flip_byte, launch_ranks, run_module, second_writer_refused, seeded_nth

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
    # The killed run's lock is left behind, naming its dead process.
    assert json.loads((run / LOCK_NAME).read_text())["command"] == "tec-train run"
    # Re-running with only --run-dir resumes with the stored options (with none stored, the same command),
    # taking the dead holder's lock over at once.
    r, _ = _train(run, [] if expect else _kill_args(tiny.cache))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "took over the lock of tec-train run" in r.stderr and "its process is gone" in r.stderr, r.stderr[-2000:]
    assert (f"resuming checkpoint-{expect:08d}.pt" in r.stderr) if expect else ("resuming" not in r.stderr), r.stderr[-2000:]
    assert _exact(run) == _exact(straight.run) and len(_exact(run)) == 9
    _assert_same_weights(load_checkpoint(latest_saved(run))["model"],
                         load_checkpoint(latest_saved(straight.run))["model"])
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
    # Rank 0 either died by torchrun's SIGTERM (its lock left: taken over once, by rank 0 for the
    # whole job) or saw its peer gone first and released the lock on its way out (nothing to take).
    assert r.stderr.count("took over the lock of tec-train run") in (0, 1), r.stderr[-3000:]
    assert not (killed / LOCK_NAME).exists()
    assert _exact(killed) == _exact(straight) and len(_exact(straight)) == 6
    _assert_same_weights(load_checkpoint(latest_saved(killed))["model"],
                         load_checkpoint(latest_saved(straight))["model"])
    ck = load_checkpoint(latest_saved(killed))
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


# ---- one writer per run dir, checkpoints checked against their digests ------------------------------

@pytest.mark.slow
def test_a_second_run_on_the_same_run_dir_is_refused(tiny, straight: SimpleNamespace, tmp_path: Path) -> None:
    """The same command typed twice: the second exits 2 at once naming the first (host, pid,
    heartbeat's age); the first trains on undisturbed and ends identical to a lone run."""
    from typer.testing import CliRunner

    from tec_train.cli import app

    run = tmp_path / "run"
    argv = ["run", "--run-dir", str(run), *_kill_args(tiny.cache)]
    rc, err = second_writer_refused("tec_train", argv, run, lambda: CliRunner().invoke(app, argv), option="--run-dir",
                                    command="tec-train run")
    assert rc == 0, err[-3000:]
    assert _exact(run) == _exact(straight.run)  # every record once, as a lone run writes them
    _assert_same_weights(load_checkpoint(latest_saved(run))["model"],
                         load_checkpoint(latest_saved(straight.run))["model"])
    assert not (run / LOCK_NAME).exists()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["latest", "latest-two", "no-digests"])
def test_a_damaged_latest_checkpoint_is_skipped_and_the_run_ends_identical(damage: str, straight: SimpleNamespace,
                                                                          tmp_path: Path) -> None:
    """A byte flipped in the latest checkpoint (or the latest two): the same command skips it with one
    line naming the digest mismatch, resumes from the newest intact one and ends identical to an
    uninterrupted run. A run dir from before digests resumes, saying it could not be verified."""
    run = Path(shutil.copytree(straight.run, tmp_path / "run"))
    if damage == "no-digests":
        for _, path in list_checkpoints(run):
            digest_path(path).unlink()
        checkpoint_path(run, 9).unlink()  # leave a step to redo
        resumed = 8
    else:
        for step in (9,) if damage == "latest" else (9, 8):
            flip_byte(checkpoint_path(run, step))
        resumed = 8 if damage == "latest" else 6
    r, _ = _train(run, [])
    assert r.returncode == 0, r.stderr[-3000:]
    text = " ".join(r.stderr.split())
    if damage == "no-digests":
        assert "using checkpoint-00000008.pt: has no checkpoint-00000008.pt.sha256 (written before checkpoints carried a " \
               "digest): it could not be verified" in text, text[-2000:]
    else:
        assert text.count("sha256 mismatch") == (1 if damage == "latest" else 2), text[-2000:]
        assert "skipping checkpoint-00000009.pt: sha256 mismatch: the file hashes to" in text
    assert f"resuming checkpoint-{resumed:08d}.pt" in text
    assert _exact(run) == _exact(straight.run)
    for step, path in list_checkpoints(straight.run):  # those rewritten are intact, with their digests
        _assert_same_weights(load_checkpoint(checkpoint_path(run, step))["model"], load_checkpoint(path)["model"])
        if step > resumed or damage != "no-digests":
            assert digest_path(checkpoint_path(run, step)).read_text().split()[1] == path.name


@pytest.mark.slow
def test_one_writer_and_intact_checkpoints_under_two_ranks(tiny, tmp_path: Path) -> None:
    """Under torchrun with 2 gloo ranks: a job started while another writer holds the run dir is
    refused on both ranks and changes nothing; with that holder SIGKILLed, the same command takes
    its lock over and trains to the end; a byte then flipped in the latest checkpoint is skipped
    and the re-run ends identical to an uninterrupted 2-rank run."""
    straight, run = tmp_path / "straight", tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tec_cache.format.writer_lock import acquire; "
         "acquire(sys.argv[1], 'tec-train run', '--run-dir'); print('held', flush=True); time.sleep(600)", str(run)],
        env=clean_env(), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in run.iterdir())
        with ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(_train, straight, _ddp_args(tiny.cache), ranks=2),
                    pool.submit(_train, run, _ddp_args(tiny.cache), ranks=2)]
            (s, _), (refused, _) = (f.result() for f in runs)
        assert s.returncode == 0, s.stderr[-3000:]
        assert refused.returncode != 0 and refused.stderr.count("another writer holds it") == 2, refused.stderr[-3000:]
        assert f"pid {holder.pid}" in refused.stderr
        assert sorted(p.name for p in run.iterdir()) == before == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
    r, _ = _train(run, _ddp_args(tiny.cache), ranks=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("took over the lock of tec-train run") == 1, r.stderr[-3000:]
    assert _exact(run) == _exact(straight)
    last = latest_saved(run)
    assert last.name == "checkpoint-00000006.pt"
    flip_byte(last)
    r, _ = _train(run, _ddp_args(tiny.cache), ranks=2)
    assert r.returncode == 0, r.stderr[-3000:]
    text = " ".join(r.stderr.split())
    assert text.count("skipping checkpoint-00000006.pt: sha256 mismatch") == 1, text[-3000:]
    assert "resuming checkpoint-00000004.pt" in text
    assert _exact(run) == _exact(straight)
    _assert_same_weights(load_checkpoint(latest_saved(run))["model"], load_checkpoint(latest_saved(straight))["model"])
    assert not (run / LOCK_NAME).exists()

"""Elastic resume: a pretraining run continued on another number of processes keeps its effective
batch, its epoch's sample position and its schedule (tec_train/elastic.py); 2 -> 1 and 1 -> 2
processes under torchrun with gloo see, epoch by epoch, exactly the samples of an uninterrupted run."""
from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tec_train.cache_loader import CacheLoader
from tec_train.elastic import Layout, fit_layout, micro_batch_after
from tec_train.harness.checkpoints import list_checkpoints, load_checkpoint
from tec_train.harness.errors import ResumeError
from tests.conftest import latest_saved
from tests.faultkit import clean_env, run_module


def test_fit_layout_keeps_the_effective_batch_or_says_what_does() -> None:
    saved = Layout(world_size=2, batch_size=2, accum_iter=2)  # 8 samples a step
    assert fit_layout(saved, Layout(1, 2, 2), "R") == Layout(1, 2, 4)  # only the count changed: accumulate more
    assert fit_layout(saved, Layout(4, 2, 2), "R") == Layout(4, 2, 1)
    assert fit_layout(saved, Layout(1, 4, 2), "R") == Layout(1, 4, 2)  # the user's own choice that keeps 8
    with pytest.raises(ResumeError, match=r"effective batch: the run in R was started with 2 process\(es\) x batch 2 x "
                                          r"accumulation 2 = 8.*resume with --batch-size 2 --accum-iter 4"):
        fit_layout(saved, Layout(1, 2, 3), "R")  # a given accumulation that does not keep it
    with pytest.raises(ResumeError, match=r"has 3 process\(es\) x batch 2 x accumulation 2 = 12, and no micro-batch and accumulation make 8 on 3 "
                                          r"process\(es\) \(8 is not a multiple of 3\); resume on a process count that divides 8"):
        fit_layout(saved, Layout(3, 2, 2), "R")
    with pytest.raises(ResumeError, match="--batch-size 1 --accum-iter 1"):
        fit_layout(saved, Layout(8, 2, 2), "R")  # 8 processes: only a micro-batch of 1 keeps 8


def test_the_position_is_the_same_global_sample_in_any_layout() -> None:
    saved, now = Layout(2, 2, 2), Layout(1, 2, 4)
    assert micro_batch_after(saved, 4, now) == 8  # 2 optimizer steps = 16 samples
    assert micro_batch_after(now, 8, saved) == 4
    with pytest.raises(ResumeError, match="not a whole number of optimizer steps"):
        micro_batch_after(saved, 3, now)


@pytest.mark.parametrize("step_saved", [0, 1, 2])
def test_cache_loader_gives_the_same_remaining_samples_on_any_process_count(tiny_cache: SimpleNamespace,
                                                                               step_saved: int) -> None:
    """After g optimizer steps of effective batch 4 in epoch 1, the rest of the epoch over 1, 2 and 4
    processes is the same set of samples, disjoint from the g * 4 already done."""
    def rest(world: int, batch: int, accum: int) -> tuple[list[int], list[int]]:
        loaders = [CacheLoader(tiny_cache.cache, batch_size=batch, rank=r, world_size=world, num_workers=0, seed=3)
                   for r in range(world)]
        micro = micro_batch_after(Layout(1, 4, 1), step_saved, Layout(world, batch, accum))
        run = loaders[0].steps_per_epoch // accum * accum  # whole accumulation windows, as the loop
        got = [int(i) for lo in loaders for b in list(lo.epoch(1, start_step=micro))[: run - micro] for i in b.image_index]
        done = [int(i) for lo in loaders for b in list(lo.epoch(1))[:micro] for i in b.image_index]
        return sorted(got), sorted(done)

    one = rest(1, 4, 1)
    assert rest(2, 2, 1) == one and rest(4, 1, 1) == one and rest(2, 1, 2) == one
    assert len(one[0]) + len(one[1]) == 20 // 4 * 4 and not set(one[0]) & set(one[1])
    assert len(set(one[0])) == len(one[0])


# ---- under torchrun --------------------------------------------------------------------------------

# 20 views a view-epoch; effective batch 8 -> 2 optimizer steps an epoch, 3 epochs, 6 steps. Checkpoints
# at step 3 (mid-epoch 1: 8 of its samples done) and at each epoch end.
def _args(cache: Path, batch: int, accum: int) -> list[str]:
    return ["--cache", str(cache), "--model", "vit_tiny_patch8", "--depth", "3", "--batch-size", str(batch),
            "--accum-iter", str(accum), "--epochs", "3", "--warmup-epochs", "1", "--blr", "1e-3", "--num-workers", "1",
            "--log-every", "1", "--ckpt-every", "3", "--device", "cpu", "--log-samples"]


def _train(run: Path, args: list[str], ranks: int, env: dict[str, str] | None = None):
    return run_module("tec_train", ["run", "--run-dir", str(run), *args], env=env, torchrun=ranks, timeout=300)[0]


def _samples_per_epoch(run: Path) -> dict[int, Counter]:
    """(view-epoch, image) multiset each epoch trained on, over every rank's samples log."""
    seen: dict[int, Counter] = {}
    for path in sorted(run.glob("samples-rank*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            seen.setdefault(rec["epoch"], Counter()).update((rec["view_epoch"], i) for i in rec["image_index"])
    return seen


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_resume_on_fewer_and_more_processes_sees_every_sample_once(tiny_cache: SimpleNamespace, tmp_path: Path) -> None:
    cache = tiny_cache.cache
    kill = clean_env(TEC_FAULT="train_step:4")  # after step 4's update: the last checkpoint is step 3
    runs = {name: tmp_path / name for name in ("straight1", "straight2", "two_to_one", "one_to_two")}
    with ThreadPoolExecutor(2) as pool:
        done = [pool.submit(_train, runs["straight1"], _args(cache, 2, 4), 0),
                pool.submit(_train, runs["straight2"], _args(cache, 2, 2), 2),
                pool.submit(_train, runs["two_to_one"], _args(cache, 2, 2), 2, kill),
                pool.submit(_train, runs["one_to_two"], _args(cache, 2, 4), 0, kill)]
        results = [f.result() for f in done]
    for r in results[:2]:
        assert r.returncode == 0, r.stderr[-3000:]
    for r in results[2:]:
        assert r.returncode != 0
    for name in ("two_to_one", "one_to_two"):
        assert max(s for s, _ in list_checkpoints(runs[name])) == 3
    # The requeue: the same command on the other process count, nothing else changed.
    with ThreadPoolExecutor(2) as pool:
        again = [pool.submit(_train, runs["two_to_one"], _args(cache, 2, 2), 0),
                 pool.submit(_train, runs["one_to_two"], _args(cache, 2, 4), 2)]
        r21, r12 = (f.result() for f in again)
    assert r21.returncode == 0, r21.stderr[-3000:]
    assert r12.returncode == 0, r12.stderr[-3000:]
    assert "2 process(es) x batch 2 x accumulation 2 = 8 -> 1 process(es) x batch 2 x accumulation 4 = 8" in r21.stderr
    assert "1 process(es) x batch 2 x accumulation 4 = 8 -> 2 process(es) x batch 2 x accumulation 2 = 8" in r12.stderr

    # Epoch by epoch, every run trained on the same samples, each once: the uninterrupted ones on 1
    # and on 2 processes, and both resumed ones.
    want = _samples_per_epoch(runs["straight1"])
    assert sorted(want) == [0, 1, 2] and all(sum(c.values()) == 16 for c in want.values())
    assert all(max(c.values()) == 1 for c in want.values())
    for name in ("straight2", "two_to_one", "one_to_two"):
        assert _samples_per_epoch(runs[name]) == want, name

    straight = _metrics(runs["straight1"])
    for name in ("two_to_one", "one_to_two"):
        recs = _metrics(runs[name])
        # The step count and the schedule continue: steps 1..6 once each, the same lr at every step.
        assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6], name
        assert [r["lr"] for r in recs] == [r["lr"] for r in straight], name
        assert [r["epoch_f"] for r in recs] == [r["epoch_f"] for r in straight], name
        # The losses continue from the checkpoint: the first step after it is nearer the uninterrupted
        # run's loss there than the loss of a fresh start, and every loss is finite.
        assert all(np.isfinite(r["loss"]) for r in recs)
        assert abs(recs[3]["loss"] - straight[3]["loss"]) < abs(recs[3]["loss"] - straight[0]["loss"]), (name, recs, straight)
        ck = load_checkpoint(latest_saved(runs[name]))
        layouts = ck["config"]["resolved"]["layouts"]
        assert [entry["from_step"] for entry in layouts] == [0, 3], layouts
        assert ck["global_step"] == 6 and ck["config"]["resolved"]["eff_batch"] == 8

"""Where runs are watched: TensorBoard event files (on by default) and W&B (--wandb, offline here),
each read back and compared scalar for scalar with metrics.jsonl, also across a kill and resume."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from tec_train.cli import app
from tec_train.harness.reporting import Reporter
from tec_train.harness.trackers import TENSORBOARD_DIR, WANDB_NAME, scalars
from tec_train.train import TrainConfig, train
from tests.faultkit import clean_env, run_module

# 20 views / batch 4 = 5 steps per epoch, 10 in all; a checkpoint every 3 steps and at each epoch end.
TINY_RUN = dict(model="vit_tiny_patch8", depth=2, batch_size=4, epochs=2, warmup_epochs=1, blr=1e-3, num_workers=0,
                log_every=1, ckpt_every=3, device="cpu")


@pytest.fixture(scope="module")
def tiny(tiny_cache: SimpleNamespace) -> SimpleNamespace:
    return tiny_cache


def _cfg(run_dir: Path, cache: Path, **kw) -> TrainConfig:
    return TrainConfig(**{"run_dir": str(run_dir), "cache": str(cache), **TINY_RUN, **kw})


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series as TensorBoard shows it: its EventAccumulator, which applies the purge a
    resumed writer records (points at and after its purge step in earlier files are dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}, purge_orphaned_data=True)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What metrics.jsonl says every series holds, in step order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for rec in records:
        for name, value in scalars(rec).items():
            out.setdefault(name, []).append((rec["step"], value))
    return out


def assert_same_series(log_dir: Path, records: list[dict]) -> None:
    got, want = tensorboard_scalars(log_dir), expected_series(records)
    assert set(got) == set(want), (sorted(got), sorted(want))
    for name in want:
        assert [s for s, _ in got[name]] == [s for s, _ in want[name]], name  # no step twice, none stale
        # TensorBoard stores float32.
        assert [v for _, v in got[name]] == pytest.approx([v for _, v in want[name]], rel=1e-6, abs=1e-30), name


class _DieAtRecord(Reporter):
    """Stops the run right after the record of ``step`` reached metrics.jsonl and TensorBoard."""

    def __init__(self, step: int) -> None:
        self.step = step

    def record(self, record: dict) -> None:
        if record["step"] == self.step:
            raise KeyboardInterrupt(f"stopped after the record of step {self.step}")


def test_tensorboard_holds_every_metric_and_a_resume_leaves_no_stale_point(tiny, tmp_path: Path) -> None:
    run = tmp_path / "run"
    opts = dict(ckpt_every=2)
    # The record of step 3 is written after checkpoint 2, then the run dies: its points are stale.
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(run, tiny.cache, **opts), reporter=_DieAtRecord(3))
    before = tensorboard_scalars(run / TENSORBOARD_DIR)
    assert [s for s, _ in before["loss"]] == [1, 2, 3]
    train(_cfg(run, tiny.cache, **opts, max_steps=4))  # resumed from checkpoint 2
    records = _records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert_same_series(run / TENSORBOARD_DIR, records)
    assert {"loss", "loss_fea", "loss_att", "lr", "images_per_s", "data_wait_fraction", "epoch", "epoch_f"} == set(
        tensorboard_scalars(run / TENSORBOARD_DIR))
    # Two writers, the second purging from the step after checkpoint 2.
    assert len(list((run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2


def test_no_tensorboard_writes_no_events(tiny, tmp_path: Path) -> None:
    train(_cfg(tmp_path / "run", tiny.cache, max_steps=2, tensorboard=False))
    assert not (tmp_path / "run" / TENSORBOARD_DIR).exists() and len(_records(tmp_path / "run")) == 2


def test_without_the_tensorboard_package_the_run_says_so_and_goes_on(tiny, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    notices: list[str] = []

    class Notes(Reporter):
        def message(self, text: str) -> None:
            notices.append(text)

    train(_cfg(tmp_path / "run", tiny.cache, max_steps=1), reporter=Notes())
    assert any("tensorboard package is not installed" in n for n in notices), notices
    assert not (tmp_path / "run" / TENSORBOARD_DIR).exists() and len(_records(tmp_path / "run")) == 1


def test_wandb_flag_without_the_package_is_a_usage_error_before_any_work(tiny, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    r = CliRunner().invoke(app, ["run", "--run-dir", str(tmp_path / "run"), "--cache", str(tiny.cache),
                                 "--model", "vit_tiny_patch8", "--depth", "2", "--device", "cpu", "--wandb", "proj"])
    assert r.exit_code == 2, r.output
    out = " ".join(r.output.split())
    assert "--wandb proj: the wandb package is not installed" in out and "tec-pretrain[wandb]" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_tensorboard_matches_metrics_across_a_sigkill_and_resume(tiny, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["run", "--run-dir", str(run), "--cache", str(tiny.cache), "--model", "vit_tiny_patch8", "--depth", "2",
            "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "1", "--num-workers", "0", "--log-every", "1",
            "--ckpt-every", "3", "--val-cache", str(tiny.cache), "--val-every", "4", "--device", "cpu"]
    # SIGKILLed after step 8's update: records 1..7 are out, checkpoint 6 is the last.
    r, _ = run_module("tec_train", args, env=clean_env(TEC_FAULT="train_step:8"))
    assert r.returncode == -9, r.stderr[-2000:]
    assert [rec["step"] for rec in _records(run)] == list(range(1, 8))
    r, _ = run_module("tec_train", args)
    assert r.returncode == 0, r.stderr[-2000:]
    records = _records(run)
    assert [rec["step"] for rec in records] == list(range(1, 11))
    assert_same_series(run / TENSORBOARD_DIR, records)
    assert {"val_loss", "val_loss_fea", "val_loss_att"} <= set(tensorboard_scalars(run / TENSORBOARD_DIR))


# ---- Weights & Biases, offline ---------------------------------------------------------------------
def _wandb_records(path: Path) -> list[bytes]:
    """The protobuf records of a .wandb transaction log. wandb 0.31 ships no Python reader (its core
    is a Go binary), so the file is read here: a 7-byte header (":W&B", magic 0xBEE1, version 0),
    then LevelDB's log format: 32 KiB blocks of chunks, each crc32 (4) + length (2, LE) + type (1:
    full, 2: first, 3: middle, 4: last), a block's tail under 7 bytes zero-padded."""
    data = path.read_bytes()
    assert data[:4] == b":W&B" and data[4:6] == b"\xe1\xbe" and data[6] == 0, data[:7]
    records, parts, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0 and length == 0:
            break  # zero padding at the end of a file still being written
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            parts = chunk
        elif kind == 3:
            parts += chunk
        elif kind == 4:
            records.append(parts + chunk)
    return records


def _offline_history(wandb_dir: Path, run_id: str) -> tuple[list[Path], list[dict], dict]:
    """The offline run folders of W&B run ``run_id``, the history rows they logged (in order) and
    the config, read from their .wandb transaction logs."""
    from wandb.proto import wandb_internal_pb2

    folders = sorted(wandb_dir.glob(f"wandb/offline-run-*-{run_id}"))
    rows: list[dict] = []
    config: dict = {}
    for folder in folders:
        for data in _wandb_records(folder / f"run-{run_id}.wandb"):
            rec = wandb_internal_pb2.Record()  # type: ignore[attr-defined]  # re-exported at runtime from wandb's module for the installed protobuf
            rec.ParseFromString(data)
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
            elif kind in ("config", "run"):
                update = rec.config.update if kind == "config" else rec.run.config.update
                for item in update:
                    config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return folders, rows, config


@pytest.mark.slow
def test_wandb_offline_logs_the_records_and_a_resume_continues_the_same_run(tiny, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(run, tiny.cache, wandb="tec-test", tensorboard=False), reporter=_DieAtRecord(4))
    run_id = json.loads((run / WANDB_NAME).read_text())["id"]
    # Resumed with --run-dir alone: the stored --wandb carries over, and so does the W&B run.
    r = CliRunner().invoke(app, ["run", "--run-dir", str(run), "--num-workers", "0"])
    assert r.exit_code == 0, r.output
    assert json.loads((run / WANDB_NAME).read_text())["id"] == run_id
    folders, rows, config = _offline_history(tmp_path / "wb", run_id)
    assert len(folders) == 2  # one offline run folder per launch, both of the same W&B run id
    assert not (run / "wandb").exists()  # WANDB_DIR is honoured
    by_step: dict[int, dict] = {}
    for row in rows:
        by_step.setdefault(row["_step"], row)  # W&B keeps a step's first values
    records = _records(run)
    assert sorted(by_step) == [rec["step"] for rec in records] == list(range(1, 11))
    for rec in records:
        row = by_step[rec["step"]]
        for name, value in scalars(rec).items():
            if name not in ("images_per_s", "data_wait_fraction"):  # timing differs in a re-run step
                assert row[name] == pytest.approx(value, rel=1e-12), (rec["step"], name)
    assert config["options"]["wandb"] == "tec-test" and config["resolved"]["eff_batch"] == 4

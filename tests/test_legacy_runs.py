"""Run dirs written by an earlier release (tests/data/legacy-b6a2970-runs) still resume, extend,
export and fine-tune with today's code: their stored options, their checkpoints' state and their
metrics are read as they were written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

from tec_train.cli import app

DATA = Path(__file__).parent / "data"
RUNS = DATA / "legacy-b6a2970-runs"
INPUTS = DATA / "legacy-1304b71-inputs"
CACHE = DATA / "legacy-1304b71" / "webdataset-int8"
# Images of the inputs folder that no loader can read: fine-tuning was given the folder without them.
UNREADABLE = {"truncated.jpg", "notimage.jpg", "zero.jpg"}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder the run dirs were made in (their stored paths are relative to it), rebuilt from
    the shipped files; the working directory for the test."""
    shutil.copytree(CACHE, tmp_path / "cache")
    shutil.copytree(INPUTS / "data", tmp_path / "data")
    for split in ("train", "val"):
        shutil.copytree(INPUTS / "data", tmp_path / "ftdata" / split, ignore=shutil.ignore_patterns(*UNREADABLE))
    for run in ("pretrain", "finetune"):
        shutil.copytree(RUNS / run, tmp_path / run)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _invoke(*args: str) -> str:
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, r.output[-3000:]
    return r.output


def test_an_old_pretraining_run_extends_from_its_checkpoint(workdir: Path) -> None:
    before = _records(workdir / "pretrain")
    assert [x["step"] for x in before] == list(range(1, 7))
    _invoke("run", "--run-dir", "pretrain", "--epochs", "3")
    after = _records(workdir / "pretrain")
    # The old records stay as written; the third epoch (3 steps of 4 views) follows from step 7.
    assert after[:6] == before
    assert [x["step"] for x in after[6:]] == [7, 8, 9] and {x["epoch"] for x in after[6:]} == {2}
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in after)
    stored = json.loads((workdir / "pretrain" / "config.json").read_text())
    assert stored["options"]["epochs"] == 3 and stored["options"]["cache"] == "cache"
    assert (workdir / "pretrain" / "checkpoint-00000009.pt").is_file()


def test_an_old_pretraining_run_exports_the_weights_it_saved(workdir: Path) -> None:
    _invoke("export", "pretrain", "--out", "export")
    exported = safetensors.torch.load_file(str(workdir / "export" / "model.safetensors"))
    saved = torch.load(RUNS / "pretrain" / "checkpoint-00000006.pt", map_location="cpu", weights_only=True)["model"]
    # The encoder's own tensors pass through the export unchanged (shipped bytes: exact).
    for key in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.bias", "pos_embed"):
        assert torch.equal(exported[key], saved[key]), key
    config = json.loads((workdir / "export" / "config.json").read_text())
    assert config["global_step"] == 6 and config["depth"] == 2


def test_an_old_finetuning_run_extends_by_an_epoch(workdir: Path) -> None:
    before = _records(workdir / "finetune")
    _invoke("finetune", "--run-dir", "finetune", "--epochs", "2")
    after = _records(workdir / "finetune")
    assert after[0] == before[0] and len(after) == 2 and after[1]["epoch"] == 1
    result = json.loads((workdir / "finetune" / "result.json").read_text())
    assert result["epoch"] == 2 and result["resumed_from"] is not None and result["resumed_from"].endswith("finetune-0001.pt")

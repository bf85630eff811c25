"""Caches written by earlier releases (tests/data/legacy-*) still verify, inspect and train, and the
same build today writes the same shard bytes: users hold caches that cost GPU-weeks, and an upgrade
never forces a rebuild."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tec_cache.cli import app as cache_app
from tec_train.cli import app as train_app

from tests.conftest import make_image_folder, tiny_state_dict
from tests.faultkit import run_module, tree

LEGACY = Path(__file__).parent / "data" / "legacy-1304b71"
CACHES = sorted(p.name for p in LEGACY.iterdir() if p.is_dir())


def _copy(name: str, tmp_path: Path) -> Path:
    """A writable copy: the checked-in files must stay exactly as the old release wrote them."""
    return Path(shutil.copytree(LEGACY / name, tmp_path / name))


def test_there_are_legacy_caches_of_both_formats() -> None:
    assert CACHES == ["webdataset-int8", "zarr-int8"]


@pytest.mark.parametrize("name", CACHES)
def test_legacy_cache_verifies_inspects_and_trains(name: str, tmp_path: Path) -> None:
    cache = _copy(name, tmp_path)
    runner = CliRunner()
    r = runner.invoke(cache_app, ["verify", str(cache)])
    assert r.exit_code == 0 and "ok: every shard" in r.output, r.output[-2000:]
    r = runner.invoke(cache_app, ["inspect", str(cache)])
    assert r.exit_code == 0, r.output[-2000:]
    run = tmp_path / "run"
    r = runner.invoke(train_app, ["run", "--cache", str(cache), "--run-dir", str(run), "--model", "vit_tiny_patch8",
                                  "--depth", "2", "--batch-size", "4", "--epochs", "3", "--warmup-epochs", "0",
                                  "--num-workers", "0", "--log-every", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output[-3000:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # 3 steps an epoch from 17 views at batch 4; epoch 2 reads view-epoch 0 again (K = 2).
    assert [x["step"] for x in records] == list(range(1, 10)) and records[-1]["epoch"] == 2
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in records)


@pytest.mark.slow
@pytest.mark.parametrize("name", CACHES)
def test_todays_build_writes_the_legacy_bytes(name: str, tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", n_per_class=5, classes=2, bad=True)
    ckpt = tmp_path / "mae_tiny.pth"
    torch.save({"model": tiny_state_dict()}, ckpt)
    fmt, codec = name.split("-")
    out = tmp_path / "out"
    r, _ = run_module("tec_cache", ["build", "--data", str(data), "--out", str(out), "--checkpoint", str(ckpt),
                                    "--arch", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8", "--topk", "3",
                                    "--views", "2", "--format", fmt, "--codec", codec, "--shard-size", "6",
                                    "--batch-size", "8", "--num-workers", "0", "--device", "cpu"])
    assert r.returncode == 0, r.stderr[-3000:]
    # Shards byte for byte; the sidecars up to the data folder's path, which their skip notes quote.
    old_tree, new_tree = tree(LEGACY / name), tree(out)
    assert old_tree.keys() == new_tree.keys()
    for rel in old_tree:
        if rel.endswith(".json"):
            old_text = (LEGACY / name / rel).read_text().replace("/tmp/legacy/data", "DATA")
            assert (out / rel).read_text().replace(str(data), "DATA") == old_text, rel
        else:
            assert new_tree[rel] == old_tree[rel], rel
    old, new = (json.loads((d / "manifest.json").read_text()) for d in (LEGACY / name, out))
    for key in ("targets", "views", "codec", "format", "view_epochs"):
        assert new[key] == old[key], key

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

from tec_cache.build.cli import app as cache_app
from tec_cache.format import get_format
from tec_train.cli import app as train_app
from tests.faultkit import run_module, tree

LEGACY = Path(__file__).parent / "data" / "legacy-1304b71"
CACHES = sorted(p.name for p in LEGACY.iterdir() if p.is_dir())
# The images and the base checkpoint those caches were built from, shipped rather than regenerated:
# random init rounds differently on CPUs with other vector units, so a checkpoint made from the same
# seed on another machine has another sha256 and the build (rightly) refuses to extend the caches.
INPUTS = Path(__file__).parent / "data" / "legacy-1304b71-inputs"


def _copy(name: str, tmp_path: Path) -> Path:
    """A writable copy: the checked-in files must stay exactly as the old release wrote them."""
    return Path(shutil.copytree(LEGACY / name, tmp_path / name))


def _inputs(tmp_path: Path) -> tuple[Path, Path]:
    """The shipped image folder (copied: the sidecars quote its path) and base checkpoint."""
    return Path(shutil.copytree(INPUTS / "data", tmp_path / "data")), INPUTS / "mae_tiny.pth"


def test_the_shipped_checkpoint_is_the_one_the_caches_name() -> None:
    import hashlib

    recorded = {json.loads((LEGACY / name / "manifest.json").read_text())["base_model"]["sha256"] for name in CACHES}
    assert recorded == {hashlib.sha256((INPUTS / "mae_tiny.pth").read_bytes()).hexdigest()}


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
    assert "pil-bicubic" in r.output and "stored raw" not in r.output  # what a manifest naming neither means
    run = tmp_path / "run"
    r = runner.invoke(train_app, ["run", "--cache", str(cache), "--run-dir", str(run), "--model", "vit_tiny_patch8",
                                  "--depth", "2", "--batch-size", "4", "--epochs", "3", "--warmup-epochs", "0",
                                  "--num-workers", "0", "--log-every", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output[-3000:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # 3 steps an epoch from 17 views at batch 4; epoch 2 reads view-epoch 0 again (K = 2).
    assert [x["step"] for x in records] == list(range(1, 10)) and records[-1]["epoch"] == 2
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in records)


def _same_records_up_to_float_rounding(old_root: Path, new_root: Path, shards: set[str]) -> None:
    """Each record of each shard listed: everything but the targets byte-identical, and the
    decoded targets equal but for a few values one quantisation step apart (each cache read with its
    own manifest's field specs)."""
    from tec_cache.core.codecs import get_codec
    from tec_cache.format.manifest import load_manifest

    man, new_man = load_manifest(old_root), load_manifest(new_root)
    fmt, codec = get_format(man.format.name), get_codec(man.codec.name)
    for rel in sorted(shards):
        old = list(fmt.open_reader(old_root / rel, man.fields, man.format.compressor))
        new = list(fmt.open_reader(new_root / rel, new_man.fields, man.format.compressor))
        assert [(r.key, r.label, r.image_key, r.image) for r in new] == [(r.key, r.label, r.image_key, r.image) for r in old], rel
        for a, b in zip(old, new):
            da = codec.decode({k: torch.from_numpy(v[None]) for k, v in a.fields.items()})
            db = codec.decode({k: torch.from_numpy(v[None]) for k, v in b.fields.items()})
            for x, y, what in zip(da, db, ("feat", "att", "idx")):
                moved = (x != y).float().mean().item()
                assert moved < 0.01, f"{rel} {a.key} {what}: {moved:.2%} of the values differ"
                if x.is_floating_point():
                    step = (x.amax() - x.amin()).item() / 100  # well above one int8 step of these targets
                    assert (x - y).abs().max().item() <= step, f"{rel} {a.key} {what}"


@pytest.mark.slow
@pytest.mark.parametrize("name", CACHES)
def test_todays_build_writes_the_legacy_bytes(name: str, tmp_path: Path) -> None:
    """Today's build rebuilding a shard of a legacy cache (deleted, then the same command re-run)
    writes that cache's bytes: its resizer and its field framing come from its manifest. A fresh
    build with the same options (and the resizer those caches used) holds the same records; only
    the fields today's codec leaves uncompressed are framed otherwise."""
    data, ckpt = _inputs(tmp_path)
    fmt, codec = name.split("-")
    args = ["build", "--data", str(data), "--checkpoint", str(ckpt), "--arch", "vit_tiny_patch16_224", "--img-size",
            "32", "--patch-size", "8", "--topk", "3", "--views", "2", "--format", fmt, "--codec", codec,
            "--shard-size", "6", "--batch-size", "8", "--num-workers", "0", "--device", "cpu"]
    fresh = tmp_path / "fresh"
    r, _ = run_module("tec_cache", [*args, "--out", str(fresh), "--resize", "pil-bicubic"])
    assert r.returncode == 0, r.stderr[-3000:]
    _same_records_up_to_float_rounding(LEGACY / name, fresh, {p for p in tree(LEGACY / name)
                                                              if p.count("/") == 1 and not p.endswith(".json")})
    fresh_man = json.loads((fresh / "manifest.json").read_text())
    assert {k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in fresh_man["codec"]["fields"].items()} == \
        json.loads((LEGACY / name / "manifest.json").read_text())["codec"]["fields"]

    out = _copy(name, tmp_path)
    for p in sorted((out / "ve001").iterdir()):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    r, _ = run_module("tec_cache", [*args, "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    # Shards byte for byte on the CPU that wrote them; on another CPU the base model's float
    # results can round differently in the last bit, which moves a few quantised target values by
    # one step (checked record by record below). The sidecars too, up to the data folder's path
    # (their skip notes quote it) and the running target statistics, float sums compared to 1e-5.
    old_tree, new_tree = tree(LEGACY / name), tree(out)
    assert old_tree.keys() == new_tree.keys()
    suffix = get_format(fmt).suffix
    changed: set[str] = set()  # shards (a tar, or a zarr store's folder) with any differing file
    for rel in sorted(old_tree, key=lambda r: r.endswith(".json")):
        if rel.endswith(".json"):
            old_side = json.loads((LEGACY / name / rel).read_text().replace("/tmp/legacy/data", "DATA"))
            new_side = json.loads((out / rel).read_text().replace(str(data), "DATA").replace("/tmp/legacy/data", "DATA"))
            if "stats" not in old_side:  # zarr's own metadata inside a store
                assert new_side == old_side, rel
                continue
            old_stats, new_stats = old_side.pop("stats"), new_side.pop("stats")
            if rel.removesuffix(".json") in changed:
                for key in ("sha256", "nbytes"):  # of a shard checked record by record
                    old_side.pop(key), new_side.pop(key)
            assert new_side == old_side, rel
            assert new_stats.keys() == old_stats.keys(), rel
            for field, values in old_stats.items():
                assert new_stats[field] == pytest.approx(values, rel=1e-5), (rel, field)
        elif new_tree[rel] != old_tree[rel]:
            changed.add(rel.split(suffix)[0] + suffix)
    _same_records_up_to_float_rounding(LEGACY / name, out, changed)
    old, new = (json.loads((d / "manifest.json").read_text()) for d in (LEGACY / name, out))
    for m in (old, new):
        for ve in m["view_epochs"]:
            for shard in ve["shards"]:
                if shard["path"] in changed:
                    del shard["sha256"], shard["nbytes"]
    assert new["views"]["recipe"].pop("resize") == "pil-bicubic"  # now recorded
    for key in ("targets", "views", "codec", "format", "view_epochs"):
        assert new[key] == old[key], key


@pytest.mark.slow
def test_extending_a_legacy_cache_keeps_cutting_its_views_with_pil(tmp_path: Path) -> None:
    """More --views on a cache that names no resizer: the new view-epoch is cut with PIL's bicubic
    and compressed at the cache's own zstd level, as its first ones were (the same records as a build
    that names pil-bicubic), and the manifest now says so; naming another resizer for it is refused
    before any work."""
    data, ckpt = _inputs(tmp_path)
    args = ["build", "--data", str(data), "--checkpoint", str(ckpt), "--arch", "vit_tiny_patch16_224", "--img-size",
            "32", "--patch-size", "8", "--topk", "3", "--views", "3", "--format", "webdataset", "--codec", "int8",
            "--shard-size", "6", "--batch-size", "8", "--num-workers", "0", "--device", "cpu"]
    extended = _copy("webdataset-int8", tmp_path)
    r, _ = run_module("tec_cache", [*args, "--out", str(extended), "--resize", "torch-bicubic-u8"])
    assert r.returncode != 0 and "views.recipe.resize = 'pil-bicubic', this build asks for 'torch-bicubic-u8'" in r.stderr
    r, _ = run_module("tec_cache", [*args, "--out", str(extended)])
    assert r.returncode == 0, r.stderr[-3000:]
    fresh = tmp_path / "fresh"
    r, _ = run_module("tec_cache", [*args, "--out", str(fresh), "--resize", "pil-bicubic"])
    assert r.returncode == 0, r.stderr[-3000:]
    new = {rel for rel in tree(extended) if rel.startswith("ve002/") and not rel.endswith(".json")}
    assert new
    _same_records_up_to_float_rounding(extended, fresh, new)  # the same machine: in fact equal
    extended_man = json.loads((extended / "manifest.json").read_text())
    assert extended_man["views"]["recipe"]["resize"] == "pil-bicubic" and extended_man["format"]["compressor"] == "zstd:3"

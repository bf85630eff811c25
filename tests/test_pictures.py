"""Pictures: `tec-cache show` (cached views and their targets) and `tec-train plot` (run curves).

The maps are checked against the targets themselves (the helper is a softmax(att/tau) distribution
peaking where the target peaks, and render_views feeds it the decoded rows of the records it
draws); the PNGs are checked for format, pixel size and content; the CLIs for their exit codes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tec_cache.build import show
from tec_cache.build.builder import BuildConfig, build_cache
from tec_cache.build.cli import app as cache_app
from tec_cache.core.basemodels import build_model
from tec_cache.core.codecs import get_codec, stack_fields
from tec_cache.format.manifest import load_manifest
from tec_train.cli import app as train_app
from tec_train.plot import panel_keys, plot_runs, read_metrics, smooth_values
from tests.conftest import make_image_folder, tiny_spec

# Each format and each codec once: the records of every combination are equal by the conformance suite.
COMBOS = [("webdataset", "fp16"), ("zarr", "int8")]
GRID = (4, 4)  # the tiny base model: 32 px views, 8 px patches


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("src") / "data", n_per_class=1, bad=False)


@pytest.fixture(scope="module")
def caches(data_dir, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """One tiny cache per (format, codec): 6 images x 2 view-epochs, shards of 4 (so picks cross shards).

    The base model is the tiny ViT cut to 2 blocks: pictures need targets, not a deep model, and
    the 12-block one makes these four builds most of this file's run time on a loaded CPU."""
    spec = tiny_spec(depth=2)
    torch.manual_seed(0)
    ckpt = tmp_path_factory.mktemp("ckpt2") / "tiny_depth2.pth"
    torch.save({"model": build_model(spec).state_dict()}, ckpt)
    out = {}
    for fmt, codec in COMBOS:
        root = tmp_path_factory.mktemp(f"{fmt}-{codec}") / "cache"
        build_cache(BuildConfig(data=data_dir, out=root, checkpoint=ckpt, spec=spec, views=2, codec=codec,
                                format=fmt, shard_size=4, batch_size=8, num_workers=0, device="cpu"))
        out[fmt, codec] = root
    return out


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))  # [H,W,3]


def _expected_view_size(rows: int, cols: int) -> tuple[int, int]:
    """(height, width) in pixels of a render_views PNG, from its fixed layout constants."""
    return round((rows * show.CELL_IN + show.TITLE_IN) * show.DPI), round(cols * show.CELL_IN * show.DPI)


# ---------------------------------------------------------------------------------------------
# maps


def test_attention_map_is_the_mean_target_distribution() -> None:
    tau = 1.8
    gen = torch.Generator().manual_seed(0)
    att = torch.randn(3, 2, 16, generator=gen)  # [R=3 rows, H=2 heads, L=16]
    att[:, 0, 6] += 12.0  # head 0 of every row peaks at patch 6 = grid cell (1, 2)
    att[:, 1, 13] += 12.0  # head 1 at patch 13 = (3, 1)
    m = show.attention_map(att, tau, GRID)
    assert m.shape == GRID and np.all(m >= 0)
    assert m.sum() == pytest.approx(1.0, abs=1e-9)
    expected = torch.softmax(att.double() / tau, dim=-1).mean(dim=(0, 1)).reshape(GRID).numpy()
    np.testing.assert_allclose(m, expected, rtol=1e-9)
    h0 = show.attention_map(att, tau, GRID, head=0)
    h1 = show.attention_map(att.numpy(), tau, GRID, head=1)  # numpy input too
    assert np.unravel_index(h0.argmax(), GRID) == (1, 2) and h0.sum() == pytest.approx(1.0)
    assert np.unravel_index(h1.argmax(), GRID) == (3, 1) and h1.sum() == pytest.approx(1.0)
    # A larger tau flattens the target: the peak loses mass.
    assert show.attention_map(att, 10.0, GRID, head=0).max() < h0.max()
    with pytest.raises(ValueError, match="16 keys"):
        show.attention_map(att, tau, (3, 3))


def test_feature_norm_map_and_head_option() -> None:
    feat = torch.zeros(16, 5)  # [L, D]
    feat[9] = torch.tensor([3.0, 4.0, 0, 0, 0])
    m = show.feature_norm_map(feat, GRID)
    assert m.shape == GRID and m[2, 1] == pytest.approx(5.0) and m.sum() == pytest.approx(5.0)
    assert show.parse_head("mean", 3) is None and show.parse_head(None, 3) is None
    assert show.parse_head("2", 3) == 2
    with pytest.raises(ValueError, match="--head: head 3 out of range.*3 heads"):
        show.parse_head("3", 3)
    with pytest.raises(ValueError, match="--head: expected 'mean'"):
        show.parse_head("max", 3)


def test_select_records_first_and_seeded(caches) -> None:
    man = load_manifest(caches["zarr", "int8"])
    first = show.select_records(man, 1, 5)
    assert [r.key for r in first] == [f"{i:09d}" for i in range(5)] and {r.view_epoch for r in first} == {1}
    a = [r.key for r in show.select_records(man, 0, 4, seed=7)]
    assert a == [r.key for r in show.select_records(man, 0, 4, seed=7)] and a == sorted(set(a))
    assert len(show.select_records(man, 0, 100)) == 6  # n beyond the view-epoch: all of it
    with pytest.raises(ValueError, match="--view-epoch: 2 out of range"):
        show.select_records(man, 2, 1)


# ---------------------------------------------------------------------------------------------
# render_views


@pytest.mark.slow
@pytest.mark.parametrize("fmt,codec", COMBOS)
def test_render_views_png_follows_the_decoded_targets(fmt, codec, caches, tmp_path, monkeypatch) -> None:
    cache = caches[fmt, codec]
    man = load_manifest(cache)
    tau = man.targets.tau
    calls: list[np.ndarray] = []
    real = show.attention_map

    def spy(att, tau_, grid, head=None):
        calls.append(np.asarray(att))
        assert tau_ == tau and tuple(grid) == GRID
        return real(att, tau_, grid, head)

    monkeypatch.setattr(show, "attention_map", spy)
    out = show.render_views(cache, tmp_path / "sub" / "views.png", n=3, view_epoch=1)
    px = _png(out)
    assert px.shape[:2] == _expected_view_size(3, 4)
    assert px.std() > 10 and len(np.unique(px.reshape(-1, 3), axis=0)) > 100  # a picture, not a blank canvas

    # The maps drawn are made from exactly the decoded targets of the views shown, cls row then top-k rows.
    recs = show.select_records(man, 1, 3)
    _, att, _ = get_codec(codec).decode(stack_fields([r.fields for r in recs]))  # [3,k+1,H,L]
    assert len(calls) == 6
    for r in range(3):
        np.testing.assert_array_equal(calls[2 * r], att[r, :1].numpy())
        np.testing.assert_array_equal(calls[2 * r + 1], att[r, 1:].numpy())


def test_render_views_options(caches, tmp_path) -> None:
    cache = caches["webdataset", "fp16"]
    a = show.render_views(cache, tmp_path / "a.png", n=2, head=1, seed=3, feat_norm=False)
    assert _png(a).shape[:2] == _expected_view_size(2, 3)
    b = show.render_views(cache, tmp_path / "b.png", n=2, head=1, seed=3, feat_norm=False)
    assert a.read_bytes() == b.read_bytes()  # same seed, same picture
    with pytest.raises(ValueError, match="--n: must be at least 1"):
        show.render_views(cache, tmp_path / "c.png", n=0)


# ---------------------------------------------------------------------------------------------
# plot


def _write_run(run: Path, steps: int, *, mae: bool = False, torn: bool = False) -> Path:
    run.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        loss = 2.0 * math.exp(-s / 10) + 0.05 * math.sin(s)
        rec: dict[str, float | None] = {"step": s, "epoch": s // 10, "epoch_f": s / 10, "loss": loss, "lr": min(s / 5, 1.0) * 1e-3,
               "images_per_s": 100.0 + s % 5, "data_wait_fraction": 0.1, "time": 1000.0 + s}
        # A plain MAE run has no feature/attention losses; it may log them as null.
        rec.update({"loss_fea": None, "loss_att": None} if mae else {"loss_fea": 0.6 * loss, "loss_att": 0.4 * loss})
        lines.append(json.dumps(rec) + "\n")
    text = "".join(lines) + (f'{{"step": {steps + 1}, "loss": 1.' if torn else "")
    (run / "metrics.jsonl").write_text(text)
    return run


def test_read_metrics_and_panels(tmp_path) -> None:
    tec = _write_run(tmp_path / "tec", 12, torn=True)
    with open(tec / "metrics.jsonl", "a") as f:  # a re-logged step (the later record wins) before the torn line
        f.write("\n" + json.dumps({"step": 3, "loss": 9.0}) + "\n")
    recs = read_metrics(tec)
    assert [r["step"] for r in recs] == list(range(1, 13)) and recs[2]["loss"] == 9.0
    mae = read_metrics(_write_run(tmp_path / "mae", 5, mae=True))
    assert panel_keys([mae]) == ["loss", "lr", "images_per_s"]
    assert panel_keys([mae, recs]) == ["loss", "loss_fea", "loss_att", "lr", "images_per_s"]
    # A held-out record of its own (--val-cache) adds its two panels after the training losses.
    held = recs + [{"step": 13, "epoch": 1, "epoch_f": 1.0, "val_loss": 1.2, "val_loss_fea": 0.5, "val_loss_att": 0.7}]
    assert panel_keys([held]) == ["loss", "loss_fea", "loss_att", "val_loss_fea", "val_loss_att", "lr", "images_per_s"]
    np.testing.assert_allclose(smooth_values(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        read_metrics(tmp_path)


@pytest.mark.slow
def test_plot_runs_png(tmp_path) -> None:
    tec = _write_run(tmp_path / "tec", 30, torn=True)
    mae = _write_run(tmp_path / "mae", 20, mae=True)
    both = _png(plot_runs([tec, mae], tmp_path / "both.png", smooth=4))
    only_mae = _png(plot_runs([mae], tmp_path / "mae.png"))
    assert both.std() > 10 and len(np.unique(both.reshape(-1, 3), axis=0)) > 50
    # 5 panels, two per row -> 3 rows; the MAE run alone has 3 panels -> 2 rows.
    assert both.shape[1] == only_mae.shape[1] == 1000
    assert both.shape[0] == 1010 and only_mae.shape[0] == 690


# ---------------------------------------------------------------------------------------------
# CLI


def test_show_cli(caches, tmp_path) -> None:
    runner = CliRunner()
    cache = caches["zarr", "int8"]
    out = tmp_path / "v.png"
    r = runner.invoke(cache_app, ["show", str(cache), "--n", "2", "--out", str(out), "--view-epoch", "1", "--head", "0",
                                  "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert _png(out).shape[:2] == _expected_view_size(2, 4)
    not_cache = tmp_path / "empty"
    not_cache.mkdir()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [
        ([str(tmp_path / "nope")], "CACHE"),
        ([str(not_cache)], "not a cache"),
        ([str(cache), "--n", "0"], "--n"),
        ([str(cache), "--out", str(blocker / "v.png")], "--out"),
        ([str(cache), "--out", str(tmp_path)], "--out"),
        ([str(cache), "--head", "7"], "--head"),
        ([str(cache), "--view-epoch", "2"], "--view-epoch"),
    ]
    for args, needle in cases:
        if "--out" not in args:
            args = [*args, "--out", str(tmp_path / "x.png")]
        r = runner.invoke(cache_app, ["show", *args])
        assert r.exit_code == 2, (args, r.output)
        assert needle in r.output, (args, r.output)
    assert not (tmp_path / "x.png").exists()


def test_plot_cli(tmp_path) -> None:
    runner = CliRunner()
    tec = _write_run(tmp_path / "tec", 10)
    mae = _write_run(tmp_path / "mae", 10, mae=True)
    out = tmp_path / "plots" / "curves.png"
    r = runner.invoke(train_app, ["plot", str(tec), str(mae), "--out", str(out), "--smooth", "3"])
    assert r.exit_code == 0, r.output
    assert _png(out).shape[1] == 1000
    empty = tmp_path / "no_metrics_run"
    empty.mkdir()
    r = runner.invoke(train_app, ["plot", str(tec), str(empty), "--out", str(out)])
    assert r.exit_code == 2 and "no_metrics_run" in r.output and "metrics.jsonl" in r.output, r.output
    r = runner.invoke(train_app, ["plot", str(tec), "--out", str(out), "--smooth", "0"])
    assert r.exit_code == 2 and "--smooth" in r.output, r.output

"""The presets in pipelines/ name only real options with valid values, and keep the paper's recipe."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tec_cache.basemodels import resolve_spec
from tec_cache.build import BuildConfig
from tec_train.student import parse_model_name
from tec_train.train import TrainConfig

PIPELINES = sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.toml"))
SPEC_KEYS = {"basemodel", "arch", "img_size", "patch_size", "topk", "tau", "last_layers", "depth"}


def _load(path: Path) -> dict:
    return tomllib.loads(path.read_text(encoding="utf-8"))


def test_every_row_of_the_paper_has_a_preset():
    names = {p.stem for p in PIPELINES}
    assert {"mae300ep-vitb-100ep", "mae-vitb-300ep", "mae-vitb-800ep", "ibot-vitb-300ep", "ibot-vitb-800ep",
            "mael-vitl-300ep", "tiny-cpu"} <= names


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.stem)
def test_preset_options_are_valid(path: Path, tmp_path: Path):
    p = _load(path)
    assert p["name"] == path.stem
    cache = dict(p["cache"])
    cache.pop("cache_name")
    cache.pop("checkpoint", None)
    spec = resolve_spec(cache.pop("basemodel", None), **{k: cache.pop(k) for k in list(cache) if k in SPEC_KEYS})
    BuildConfig(data=tmp_path, out=tmp_path / "c", checkpoint=tmp_path / "w.pth", spec=spec, **cache).validate()
    pre = dict(p["pretrain"])
    world = pre.pop("world_size")
    (tmp_path / "c").mkdir()
    TrainConfig(run_dir=str(tmp_path / "run"), cache=str(tmp_path / "c"), **pre).validate()
    _, patch = parse_model_name(pre["model"])
    assert spec.img_size % patch == 0 and spec.img_size // patch == spec.img_size // spec.patch_size
    if "expected_top1" in p:  # the paper's rows: spec 4.1 and 9.8
        assert pre["blr"] * pre["batch_size"] * pre["accum_iter"] * world / 256 == pytest.approx(2.4e-3)
        assert (pre["warmup_epochs"], pre["mask_ratio"], spec.last_layers) == (40, 0.75, 2)
        ft = p["finetune"]
        assert ft["batch_size"] * ft["accum_iter"] * ft["world_size"] == 1024


def test_presets_sharing_a_base_model_share_one_cache():
    by_cache: dict[str, list[dict]] = {}
    for path in PIPELINES:
        p = _load(path)
        by_cache.setdefault(p["cache"]["cache_name"], []).append(p["cache"])
    for name, tables in by_cache.items():
        assert all(t == tables[0] for t in tables), name
    assert len(by_cache["mae1kbase"]) == 2 and len(by_cache["ibot1kbase"]) == 2

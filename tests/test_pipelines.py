"""The presets in pipelines/ name only real options with valid values, and keep the paper's recipe."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tec_cache.build.builder import BuildConfig
from tec_cache.core.basemodels import RECIPE_KEYS, TargetRecipe
from tec_cache.runtime.config import check_fields, resolve
from tec_cache.runtime.pipelines import load_pipeline
from tec_train.eval_config import DataSubsets, EvalConfig
from tec_train.finetune import FinetuneConfig
from tec_train.pipeline_tables import check_pipeline, resolved_tables, table_keys
from tec_train.student import parse_model_name
from tec_train.train import TrainConfig

PIPELINES = sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.toml"))


def _load(path: Path) -> dict:
    """The preset as the commands see it: its ``extends`` chain resolved."""
    return load_pipeline(str(path)).raw


def test_every_row_of_the_paper_has_a_preset():
    names = {p.stem for p in PIPELINES}
    assert {"mae300ep-vitb-100ep", "mae-vitb-300ep", "mae-vitb-800ep", "ibot-vitb-300ep", "ibot-vitb-800ep",
            "mael-vitl-300ep", "tiny-cpu"} <= names


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.stem)
def test_preset_options_are_valid(path: Path, tmp_path: Path):
    pipe = load_pipeline(str(path))
    check_pipeline(pipe)  # every table, [data] and [eval] included, names only real options
    p = pipe.raw
    assert p["name"] == path.stem
    cache = dict(p["cache"])
    cache.pop("cache_name")
    cache.pop("checkpoint", None)
    spec = TargetRecipe(**{k: cache.pop(k) for k in list(cache) if k in RECIPE_KEYS}).resolve()
    (tmp_path / "w.pth").write_bytes(b"")  # validate() checks that the weights file exists, not its contents
    BuildConfig(data=tmp_path, out=tmp_path / "c", checkpoint=tmp_path / "w.pth", spec=spec, **cache).validate()
    pre = dict(p["pretrain"])
    world = pre.pop("world_size", 1)
    if "base" in p:  # the CPU presets make their base model with --objective mae
        TrainConfig(run_dir=str(tmp_path / "base"), objective="mae", data=str(tmp_path), **p["base"]).validate()
    (tmp_path / "c").mkdir()
    TrainConfig(run_dir=str(tmp_path / "run"), cache=str(tmp_path / "c"), **pre).validate()
    if "finetune" in p:
        ft = dict(p["finetune"])
        ft.pop("world_size", None)  # the paper rows state the reference's process count
        (tmp_path / "export").mkdir()
        FinetuneConfig(run_dir=str(tmp_path / "ft"), source=str(tmp_path / "export"), data=str(tmp_path), **ft).validate()
    if "eval" in p:
        check_fields(resolve(EvalConfig, table=pipe.table("eval", table_keys("eval"))))
    if "data" in p:
        check_fields(resolve(DataSubsets, table=pipe.table("data", table_keys("data"))))
    _, patch = parse_model_name(pre["model"])
    assert spec.img_size % patch == 0 and spec.img_size // patch == spec.img_size // spec.patch_size
    if "expected_top1" in p:  # the paper's rows: method.md 4.1 and 9.8, through the resolved preset
        assert pre["blr"] * pre["batch_size"] * pre["accum_iter"] * world / 256 == pytest.approx(2.4e-3)
        assert (pre["warmup_epochs"], pre["mask_ratio"], spec.last_layers) == (40, 0.75, 2)
        ft = p["finetune"]
        assert ft["batch_size"] * ft["accum_iter"] * ft["world_size"] == 1024


# The paper's rows (method.md 4.1 and 6, the reference's README): what each resolved preset must hold.
PAPER = {
    "mae300ep-vitb-100ep": dict(basemodel="mae1k300ep", topk=15, tau=1.8, model="vit_base_patch16", epochs=100, ft_epochs=100, warmup=5, layer_decay=0.65, top1=83.9),
    "mae-vitb-300ep": dict(basemodel="mae1kbase", topk=15, tau=1.8, model="vit_base_patch16", epochs=300, ft_epochs=100, warmup=20, layer_decay=0.65, top1=84.7),
    "mae-vitb-800ep": dict(basemodel="mae1kbase", topk=15, tau=1.8, model="vit_base_patch16", epochs=800, ft_epochs=100, warmup=20, layer_decay=0.55, top1=84.8),
    "ibot-vitb-300ep": dict(basemodel="ibot1kbase", topk=9, tau=1.0, model="vit_base_patch16", epochs=300, ft_epochs=100, warmup=5, layer_decay=0.5, top1=84.8),
    "ibot-vitb-800ep": dict(basemodel="ibot1kbase", topk=9, tau=1.0, model="vit_base_patch16", epochs=800, ft_epochs=100, warmup=20, layer_decay=0.55, top1=85.1),
    "mael-vitl-300ep": dict(basemodel="mae1klarge", topk=15, tau=1.4, model="vit_large_patch16", epochs=300, ft_epochs=50, warmup=5, layer_decay=0.65, top1=86.5),
}


@pytest.mark.parametrize("name", list(PAPER))
def test_resolved_presets_hold_the_paper_rows(name: str):
    row, tables = PAPER[name], resolved_tables(load_pipeline(name))
    assert load_pipeline(name).raw["expected_top1"] == row["top1"]
    cache, pre, ft = tables["cache"], tables["pretrain"], tables["finetune"]
    assert (cache["basemodel"], cache["topk"], cache["tau"], cache["last_layers"], cache["views"]) == \
        (row["basemodel"], row["topk"], row["tau"], 2, 4)
    assert (pre["model"], pre["epochs"], ft["model"], ft["epochs"]) == (row["model"], row["epochs"], row["model"], row["ft_epochs"])
    assert (ft["warmup_epochs"], ft["layer_decay"]) == (row["warmup"], row["layer_decay"])


def test_presets_sharing_a_base_model_share_one_cache():
    by_cache: dict[str, list[dict]] = {}
    for path in PIPELINES:
        p = _load(path)
        by_cache.setdefault(p["cache"]["cache_name"], []).append(p["cache"])
    for name, tables in by_cache.items():
        assert all(t == tables[0] for t in tables), name
    assert len(by_cache["mae1kbase"]) == 2 and len(by_cache["ibot1kbase"]) == 2


def test_a_preset_states_only_what_differs_and_a_base_is_not_listed(tmp_path: Path):
    from tec_cache.runtime.pipelines import list_pipelines

    names = {p.name for p in list_pipelines()}
    assert "vit-imagenet" not in names and "mae-vitb-800ep" in names
    text = (PIPELINES[0].parent / "mae-vitb-800ep.toml").read_text()
    assert len([line for line in text.splitlines() if "=" in line]) <= 6
    # A key a base sets wrongly is named with the base's file.
    (tmp_path / "base.toml").write_text("[pretrain]\nepochz = 3\n")
    (tmp_path / "row.toml").write_text('extends = "base.toml"\n[pretrain]\nepochs = 1\n')
    with pytest.raises(ValueError, match=r"base.toml \[pretrain\] sets \['epochz'\]"):
        check_pipeline(load_pipeline(str(tmp_path / "row.toml")))
    (tmp_path / "loop.toml").write_text('extends = "loop.toml"\n')
    with pytest.raises(ValueError, match="loops back"):
        load_pipeline(str(tmp_path / "loop.toml"))


# ---- --pipeline on the command lines ---------------------------------------------------------------

PRESET = """
name = "tiny-test"
[cache]
arch = "vit_tiny_patch16_224"
img_size = 32
patch_size = 8
topk = 3
tau = 1.4
cache_name = "tiny-test"
views = 2
codec = "fp16"
shard_size = 4
batch_size = 8
num_workers = 0
device = "cpu"
[pretrain]
model = "vit_tiny_patch8"
depth = 2
epochs = 3
warmup_epochs = 1
batch_size = 4
world_size = 8
blr = 1e-3
num_workers = 0
device = "cpu"
[base]
model = "vit_tiny_patch8"
depth = 2
epochs = 1
batch_size = 4
num_workers = 0
device = "cpu"
"""


FINETUNE = """
[finetune]
epochs = 3
batch_size = 4
layer_decay = 0.5
mixup = 0.0
cutmix = 0.0
aa = "none"
num_workers = 0
device = "cpu"
world_size = 8
"""


def _cli(app, args: list[str]):
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, args)
    return r.exit_code, " ".join(r.output.split())


def _stored(run_dir: Path) -> dict:
    """The options a run dir's latest checkpoint stores."""
    from tec_train.harness.checkpoints import latest_checkpoint, load_checkpoint

    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None, f"no checkpoint in {run_dir}"
    return load_checkpoint(ckpt)["config"]["options"]


def test_pipeline_presets_give_defaults_and_flags_override(tmp_path: Path, tiny_ckpt: Path, monkeypatch):
    from tec_cache.build.cli import app as cache_app
    from tec_cache.format.manifest import load_manifest
    from tec_train.cli import app as train_app
    from tests.conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", n_per_class=4, bad=False)
    for split in ("train", "val"):  # a labelled ImageNet-style folder for the fine-tuning step
        make_image_folder(tmp_path / "imagenet" / split, n_per_class=4, bad=False)
    preset = tmp_path / "tiny-test.toml"
    preset.write_text(PRESET)
    monkeypatch.chdir(tmp_path)
    # --out defaults to caches/<cache_name>; --views given on the command line beats the preset's 2.
    code, out = _cli(cache_app, ["build", "--pipeline", str(preset), "--data", str(data), "--checkpoint", str(tiny_ckpt),
                                 "--views", "1"])
    assert code == 0, out
    man = load_manifest(tmp_path / "caches" / "tiny-test")
    assert (man.num_view_epochs, man.codec.name, man.targets.topk, man.targets.tau) == (1, "fp16", 3, 1.4)
    # tec-train run finds the preset's cache by name; --epochs overrides; the reference world size is noted.
    code, out = _cli(train_app, ["run", "--pipeline", str(preset), "--run-dir", str(tmp_path / "run"), "--epochs", "1"])
    assert code == 0, out
    assert "was made for 8 processes, this run has 1" in out
    options = _stored(tmp_path / "run")
    assert (options["epochs"], options["depth"], options["blr"], options["cache"]) == (1, 2, 1e-3, str(Path("caches") / "tiny-test"))
    # --objective mae reads the [base] table.
    code, out = _cli(train_app, ["run", "--pipeline", str(preset), "--objective", "mae", "--data", str(data),
                                 "--run-dir", str(tmp_path / "base"), "--img-size", "32"])
    assert code == 0, out
    options = _stored(tmp_path / "base")
    assert (options["objective"], options["epochs"], options["cache"]) == ("mae", 1, None)
    # tec-train finetune reads [finetune]; the flag --epochs beats the preset's.
    preset.write_text(PRESET + FINETUNE)
    code, out = _cli(train_app, ["finetune", str(tmp_path / "base"), "--pipeline", str(preset), "--data", str(tmp_path / "imagenet"),
                                 "--run-dir", str(tmp_path / "ft"), "--epochs", "1"])
    assert code == 0, out
    stored = json.loads((tmp_path / "ft" / "config.json").read_text())["options"]
    assert (stored["epochs"], stored["layer_decay"], stored["mixup"], stored["batch_size"]) == (1, 0.5, 0.0, 4)


def test_pipeline_errors_name_the_preset_and_key(tmp_path: Path, monkeypatch):
    from tec_cache.build.cli import app as cache_app
    from tec_train.cli import app as train_app

    monkeypatch.chdir(tmp_path)
    code, out = _cli(train_app, ["run", "--pipeline", "no-such-row", "--run-dir", str(tmp_path / "r")])
    assert code == 2 and "--pipeline: unknown pipeline 'no-such-row'" in out and "mae-vitb-300ep" in out
    bad = tmp_path / "bad.toml"
    bad.write_text(PRESET.replace("views = 2", "viewz = 2"))
    code, out = _cli(cache_app, ["build", "--pipeline", str(bad), "--data", str(tmp_path), "--checkpoint", str(bad)])
    assert code == 2 and "sets ['viewz']" in out and "[cache]" in out
    code, out = _cli(train_app, ["run", "--pipeline", str(tmp_path / "missing.toml"), "--run-dir", str(tmp_path / "r")])
    assert code == 2 and "no such pipeline file" in out
    assert not (tmp_path / "r").exists() and not (tmp_path / "caches").exists()


def test_pipelines_command_lists_every_preset():
    from tec_train.cli import app as train_app

    code, out = _cli(train_app, ["pipelines"])
    assert code == 0, out
    for p in PIPELINES:
        assert p.stem in out


def test_pipelines_name_prints_the_row_resolved():
    from tec_train.cli import app as train_app

    code, out = _cli(train_app, ["pipelines", "mae-vitb-800ep"])
    assert code == 0, out
    # values from the row, from its family base, from the registry and from the config defaults
    for shown in ("epochs │ 800", "layer_decay │ 0.55", "blr │ 0.00015", "topk │ 15", "tau │ 1.8", "mask_ratio │ 0.75",
                  "keep_last │ 3", "mae-vitb-800ep.toml", "vit-imagenet.toml"):
        assert shown in out, shown


def test_one_resolution_defaults_table_stored_run_flags():
    from tec_cache.runtime.config import resolve

    # A stored option this version no longer has is dropped; a flag not given (None) shows the layers below.
    cfg = resolve(TrainConfig, table={"epochs": 5, "blr": 1e-3, "depth": 2, "warmup_epochs": 1},
                  stored={"epochs": 7, "depth": 3, "warmup_epochs": 2, "retired_option": 1},
                  flags={"run_dir": "r", "depth": 4, "blr": None})
    assert (cfg.optim.epochs, cfg.optim.blr, cfg.student.depth, cfg.optim.warmup_epochs, cfg.optim.batch_size) == \
        (7, 1e-3, 4, 2, 256)


def test_every_command_refuses_an_unknown_pipeline_key_the_same_way(tmp_path: Path, monkeypatch):
    from tec_cache.build.cli import app as cache_app
    from tec_train.cli import app as train_app

    monkeypatch.chdir(tmp_path)
    for table, app, args in (("cache", cache_app, ["build", "--data", str(tmp_path)]),
                             ("pretrain", train_app, ["run", "--run-dir", str(tmp_path / "r")]),
                             ("finetune", train_app, ["finetune", "--run-dir", str(tmp_path / "ft")]),
                             ("eval", train_app, ["knn", str(tmp_path)]), ("eval", train_app, ["linear", str(tmp_path)])):
        bad = tmp_path / f"bad-{table}.toml"
        bad.write_text(f"[{table}]\nbogus = 1\n")
        code, out = _cli(app, [*args, "--pipeline", str(bad)])
        assert code == 2 and f"--pipeline: {bad} [{table}] sets ['bogus'], which this command does not take (its options: [" \
            in out, (table, out)
    assert not (tmp_path / "r").exists() and not (tmp_path / "ft").exists()


def test_online_mode_takes_the_pipelines_recipe_under_its_online_names(tmp_path: Path):
    from tec_train.options import run_config

    preset = tmp_path / "tiny-test.toml"
    preset.write_text(PRESET)
    notes: list[str] = []
    cfg = run_config(str(tmp_path / "run"), {"topk": 5}, str(preset), online=True, world_size=1, say=notes.append)
    # The recipe's depth is --base-depth's; its view size is the student's; a flag beats the table.
    assert (cfg.targets.base.arch, cfg.targets.base.tau, cfg.targets.base.topk, cfg.student.img_size) == \
        ("vit_tiny_patch16_224", 1.4, 5, 32)
    assert cfg.targets.cache is None and cfg.to_json()["arch"] == "vit_tiny_patch16_224"
    assert notes and "was made for 8 processes" in notes[0]

"""Stage-2 training loop end to end on tiny CPU models: metrics, checkpoints, non-finite losses, student
sizes, online and in-memory sources, --init-from, export. Kills, lost ranks, damaged caches and bad
options: tests/test_faults_*.py."""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from timm.models import VisionTransformer
from typer.testing import CliRunner

import tec_train.student as student_mod
from tec_cache.build.builder import BuildConfig, build_cache
from tec_cache.core.images import open_source
from tec_cache.core.views import ViewRecipe
from tec_cache.format.manifest import load_manifest
from tec_train.cli import app
from tec_train.export import create_timm_model
from tec_train.harness.checkpoints import checkpoint_path as ck_path
from tec_train.harness.checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint
from tec_train.harness.errors import NonFiniteLossError, ResumeError
from tec_train.harness.reporting import truncate_metrics
from tec_train.online import OnlineLoader
from tec_train.student import TECStudent, build_student
from tec_train.target_feeds import CacheTargetFeed, InMemoryTargetFeed
from tec_train.train import TrainConfig, train
from tests.conftest import TINY_ARCH, TINY_IMG, TINY_PATCH, TINY_TOPK, latest_saved, make_image_folder, tiny_spec, tiny_state_dict

ROOT = Path(__file__).resolve().parents[1]
STUDENT = dict(model="vit_tiny_patch8", depth=3)
RECORD_FIELDS = {"step", "epoch", "epoch_f", "loss", "loss_fea", "loss_att", "lr", "images_per_s", "data_wait_fraction", "time"}
EXACT_FIELDS = ("step", "epoch", "epoch_f", "loss", "loss_fea", "loss_att", "lr")


@pytest.fixture(scope="module")
def tiny(tiny_cache: SimpleNamespace) -> SimpleNamespace:
    """20 images, the tiny base model (D=192, H=3, 4x4 grid) and a 2-view-epoch int8 cache of them."""
    return tiny_cache


def _cfg(run_dir: Path, cache: Path | None, **kw) -> TrainConfig:
    args = dict(run_dir=str(run_dir), cache=str(cache) if cache else None, **STUDENT, batch_size=4, epochs=2,
                warmup_epochs=1, blr=1e-3, num_workers=0, log_every=1, ckpt_every=100, device="cpu")
    args.update(kw)
    return TrainConfig(**args)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _exact(run_dir: Path) -> list[tuple]:
    return [tuple(r[k] for k in EXACT_FIELDS) for r in _records(run_dir)]


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_saved(run_dir))["model"]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_run_writes_metrics_config_and_checkpoints(tiny, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = train(_cfg(run, tiny.cache, max_steps=7, ckpt_every=3, keep_last=2))
    assert result.global_step == 7 and result.steps_run == 7 and result.epoch == 1
    records = _records(run)
    assert [r["step"] for r in records] == list(range(1, 8))
    for r in records:
        assert set(r) == RECORD_FIELDS
        assert r["loss"] == pytest.approx(r["loss_fea"] + r["loss_att"], rel=1e-6)
        assert 0.0 <= r["data_wait_fraction"] <= 1.0 and r["images_per_s"] > 0
    # 20 views / batch 4 = 5 steps per epoch; warm-up over epoch 0, lr set at each window's start.
    peak = 1e-3 * 4 / 256
    assert [r["lr"] for r in records[:5]] == pytest.approx([peak * k / 5 for k in range(5)], rel=1e-12)
    assert records[5]["lr"] == pytest.approx(peak) and records[5]["epoch"] == 1 and records[6]["lr"] < peak
    # Saves at steps 3, 5 (epoch end), 6 and 7 (the stop); the last two are kept.
    assert [s for s, _ in list_checkpoints(run)] == [6, 7]
    ck = torch.load(latest_saved(run), weights_only=True)
    assert {"model", "optimizer", "scaler", "epoch", "step_in_epoch", "global_step", "loader", "rng", "config",
            "world_size", "log_accum"} <= set(ck)
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (1, 2, 7)
    assert ck["config"]["resolved"]["student"]["pred_dim"] == 192 and ck["config"]["resolved"]["eff_batch"] == 4
    assert json.loads((run / "config.json").read_text())["options"]["model"] == "vit_tiny_patch8"


@pytest.mark.parametrize("term, target", [("loss_att", "attention_loss"), ("loss_fea", "feature_loss")])
def test_non_finite_loss_stops_naming_step_and_term(tiny, tmp_path: Path, monkeypatch, term: str, target: str) -> None:
    real = getattr(student_mod, target)
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(student_mod, target, poisoned)
    with pytest.raises(NonFiniteLossError, match=rf"at step 3 \(epoch 0, micro-batch 2\): {term} = nan"):
        train(_cfg(tmp_path / "run", tiny.cache, max_steps=5))
    assert [r["step"] for r in _records(tmp_path / "run")] == [1, 2]


def test_one_cache_trains_two_student_sizes(tiny, tmp_path: Path) -> None:
    sizes = {}
    for model in ("vit_tiny_patch8", "vit_small_patch8"):
        result = train(_cfg(tmp_path / model, tiny.cache, model=model, max_steps=2, clip_grad=1.0))
        s = result.config["resolved"]["student"]
        sizes[model] = (s["embed_dim"], s["pred_dim"], s["att_heads"])
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _records(tmp_path / model))
    # The student's width is free; the prediction heads are the base model's D=192 and H=3.
    assert sizes == {"vit_tiny_patch8": (192, 192, 3), "vit_small_patch8": (384, 192, 3)}


def test_online_mode_runs(tiny, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "run", None, arch=TINY_ARCH, checkpoint=str(tiny.ckpt), data=str(tiny.data),
               img_size=TINY_IMG, patch_size=TINY_PATCH, topk=TINY_TOPK, max_steps=3)
    result = train(cfg)
    assert result.global_step == 3 and len(_records(tmp_path / "run")) == 3
    targets = load_checkpoint(latest_saved(tmp_path / "run"))["config"]["resolved"]["targets"]
    man = load_manifest(tiny.cache)
    # Same base model as the cache: same target sizes and checkpoint hash.
    assert targets["origin"]["kind"] == "online"
    assert targets["origin"]["base_sha256"] == man.base_model.sha256
    assert (targets["dim"], targets["heads"], targets["topk"]) == (man.targets.dim, man.targets.heads, man.targets.topk)


def test_online_loader_partitions_equally_and_reproducibly(tiny) -> None:
    source = open_source(tiny.data)
    loaders = [OnlineLoader(source, batch_size=3, recipe=ViewRecipe(size=TINY_IMG), rank=r, world_size=2, num_workers=0)
               for r in range(2)]
    assert [ld.steps_per_epoch for ld in loaders] == [3, 3]  # 20 images: 10 per rank, 3 batches of 3
    orders = [[b.tolist() for b in ld.order(0)] for ld in loaders]
    flat = [i for o in orders for b in o for i in b]
    assert len(flat) == len(set(flat)) == 18
    assert orders[0] == [b.tolist() for b in loaders[0].order(0)] and orders[0] != [b.tolist() for b in loaders[0].order(1)]
    first, resumed = list(loaders[0].epoch(1)), list(loaders[0].epoch(1, start_step=1))
    assert len(resumed) == 2 and all(torch.equal(a.images, b.images) for a, b in zip(first[1:], resumed))
    assert first[0].images.shape == (3, 3, TINY_IMG, TINY_IMG) and first[0].images.dtype == torch.uint8
    assert not torch.equal(first[0].images, list(loaders[0].epoch(0))[0].images)


def test_in_memory_source(tiny, tmp_path: Path) -> None:
    man = load_manifest(tiny.cache)
    cache_source = CacheTargetFeed(man, batch_size=4, rank=0, world_size=1, num_workers=0, seed=0,
                                     view_order="cycle", pin_memory=False)
    memory = InMemoryTargetFeed.from_source(cache_source, 3, torch.device("cpu"))
    result = train(_cfg(tmp_path / "run", None, max_steps=4, lr=2e-3, warmup_epochs=0), source=memory)
    assert result.global_step == 4 and result.epoch == 1  # 3 batches per epoch
    assert _records(tmp_path / "run")[0]["lr"] == 2e-3  # --lr is absolute: no batch scaling
    assert load_checkpoint(latest_saved(tmp_path / "run"))["config"]["resolved"]["targets"]["origin"]["kind"] == "cache"
    with pytest.raises(ValueError, match="--cache and the online options must not be set"):
        train(_cfg(tmp_path / "run2", tiny.cache), source=memory)


def _tiny_student_state(seed: int, depth: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    s = build_student("vit_tiny_patch8", pred_dim=192, att_heads=3, img_size=TINY_IMG, depth=depth)
    with torch.no_grad():
        for p in s.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return s.state_dict()


def test_init_from_reference_checkpoint_loads_strictly(tiny, tmp_path: Path) -> None:
    sd = _tiny_student_state(7)
    ref = tmp_path / "checkpoint-299.pth"
    torch.save({"model": sd, "epoch": 299, "args": argparse.Namespace(model="mae_vit_tiny_patch8")}, ref)
    # Step 1 runs at lr 0 (start of warm-up), so AdamW leaves the loaded weights exactly as they were.
    train(_cfg(tmp_path / "run", tiny.cache, init_from=str(ref), max_steps=1))
    _assert_same_weights(_final_model(tmp_path / "run"), sd)

    bad = tmp_path / "deeper.pth"
    torch.save({"model": _tiny_student_state(7, depth=6)}, bad)
    with pytest.raises(ValueError, match=r"--init-from .*deeper.pth: does not fit .*unexpected keys: blocks\.3\.norm1\.weight"):
        train(_cfg(tmp_path / "run2", tiny.cache, init_from=str(bad), max_steps=1))

    # A reference checkpoint exports too, given its student size.
    runner = CliRunner()
    r = runner.invoke(app, ["export", str(ref), "--out", str(tmp_path / "ref_export")])
    assert r.exit_code == 2 and "--model" in r.output
    r = runner.invoke(app, ["export", str(ref), "--out", str(tmp_path / "ref_export"), "--model", "vit_tiny_patch8"])
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "ref_export" / "config.json").read_text())
    assert (config["img_size"], config["patch_size"], config["depth"], config["num_heads"]) == (TINY_IMG, 8, 3, 3)
    create_timm_model(config).load_state_dict(safetensors.torch.load_file(str(tmp_path / "ref_export" / "model.safetensors")), strict=True)


def test_export_from_run_dir_loads_into_timm(tiny, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_cfg(run, tiny.cache, max_steps=2))
    r = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "export")])
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_name"] == "vit_tiny_patch16_224" and config["global_step"] == 2
    vit = create_timm_model(config).eval()
    assert isinstance(vit, VisionTransformer)
    vit.load_state_dict(safetensors.torch.load_file(str(tmp_path / "export" / "model.safetensors")), strict=True)
    vit_pth = create_timm_model(config)
    vit_pth.load_state_dict(torch.load(tmp_path / "export" / "model.pth", weights_only=True), strict=True)
    student = build_student("vit_tiny_patch8", pred_dim=192, att_heads=3, img_size=TINY_IMG, depth=3).eval()
    student.load_state_dict(_final_model(run), strict=True)
    imgs = torch.randn(2, 3, TINY_IMG, TINY_IMG)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(imgs), student.forward_features(imgs), atol=1e-6, rtol=0)


def _run_cli(tmp_path: Path, *args: str) -> tuple[int, str, Path]:
    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", "--run-dir", str(run), *args])
    return r.exit_code, " ".join(r.output.split()), run


def test_resume_refuses_changed_settings_and_finished_run_is_a_no_op(tiny, tmp_path: Path) -> None:
    base = ["--cache", str(tiny.cache), "--model", "vit_tiny_patch8", "--depth", "3", "--batch-size", "4",
            "--epochs", "1", "--num-workers", "0", "--device", "cpu"]
    code, out, run = _run_cli(tmp_path, *base)
    assert code == 0, out
    before = latest_saved(run).stat().st_mtime_ns
    code, out, _ = _run_cli(tmp_path, *base[:-6], "--batch-size", "5")
    # The micro-batch may change only with an accumulation that keeps the effective batch; the error says which.
    assert code == 2 and "effective batch: the run in" in out and "batch 4 x accumulation 1 = 4" in out, out
    assert "--batch-size 2 --accum-iter 2" in out, out
    code, out, _ = _run_cli(tmp_path, "--log-every", "2")  # a mutable option, on a finished run
    assert code == 0 and re.search(r"steps this run\W+0\W", out) and "resuming checkpoint-00000005.pt" in out
    assert latest_saved(run).stat().st_mtime_ns == before


def test_view_epochs_trains_from_the_first_k_and_is_kept_on_resume(tiny, tmp_path: Path) -> None:
    base = ["--cache", str(tiny.cache), "--model", "vit_tiny_patch8", "--depth", "2", "--batch-size", "4",
            "--num-workers", "0", "--device", "cpu", "--ckpt-every", "1", "--keep-last", "10", "--epochs", "2",
            "--view-epochs", "1"]
    code, out, run = _run_cli(tmp_path, *base)
    assert code == 0, out
    config = json.loads((run / "config.json").read_text())
    assert config["options"]["view_epochs"] == 1
    assert config["resolved"]["targets"]["origin"]["view_epochs"] == 1
    assert config["resolved"]["targets"]["origin"]["cache_view_epochs"] == 2
    # Steps 6-9 are in the second epoch, which read view-epoch 0 again (without --view-epochs: 1).
    inside = [load_checkpoint(p)["loader"]["view_epoch"] for s, p in list_checkpoints(run) if 5 < s < 10]
    assert inside == [0, 0, 0, 0]
    code, out, _ = _run_cli(tmp_path, *base[:-2], "--view-epochs", "2", "--epochs", "3")
    assert code == 2 and "--view-epochs: the run in" in out and "was started with 1, now 2" in out


@pytest.fixture(scope="module")
def held_out(tiny) -> SimpleNamespace:
    """Validation caches: the same images at other views of the same base model (seed 7), and a
    cache of another base-model checkpoint."""
    root = tiny.root / "held-out"
    same, other = root / "same", root / "other-base"
    if not same.exists():
        build_cache(BuildConfig(data=tiny.data, out=same, checkpoint=tiny.ckpt, spec=tiny_spec(), views=1, seed=7,
                                shard_size=5, batch_size=8, num_workers=0, device="cpu"))
        ckpt = root / "other.pth"
        torch.save({"model": tiny_state_dict(seed=1)}, ckpt)
        build_cache(BuildConfig(data=tiny.data, out=other, checkpoint=ckpt, spec=tiny_spec(), views=1,
                                shard_size=5, batch_size=8, num_workers=0, device="cpu"))
    return SimpleNamespace(same=same, other=other)


def test_held_out_loss_is_logged_and_leaves_training_unchanged(tiny, held_out, tmp_path: Path) -> None:
    base = ["--cache", str(tiny.cache), "--model", "vit_tiny_patch8", "--depth", "2", "--batch-size", "4",
            "--log-every", "1", "--num-workers", "0", "--device", "cpu", "--epochs", "1"]
    code, out, run = _run_cli(tmp_path / "a", *base, "--val-cache", str(held_out.same), "--val-every", "2")
    assert code == 0, out
    records = _records(run)
    val = [(r["step"], r["val_loss_fea"], r["val_loss_att"]) for r in records if "val_loss_fea" in r]
    assert [s for s, _, _ in val] == [2, 4, 5]  # every 2 steps and at the end
    assert all(math.isfinite(f) and math.isfinite(a) and f > 0 and a > 0 for _, f, a in val)
    assert len({(f, a) for _, f, a in val}) == 3  # the student changes between evaluations
    assert "held-out loss at step 5: val_loss" in out
    # Training itself is the same as without --val-cache, step for step and weight for weight.
    code, out, plain = _run_cli(tmp_path / "b", *base)
    assert code == 0, out
    assert _exact(run) == _exact(plain)
    _assert_same_weights(_final_model(run), _final_model(plain))
    # Fixed masks and views: the same weights give the same held-out loss.
    from tec_train.harness.runtime import Runtime
    from tec_train.held_out import HeldOutLoss
    from tec_train.objectives import objective_for
    from tec_train.target_feeds import TargetSpec

    spec = TargetSpec.from_manifest(load_manifest(tiny.cache))
    tec = objective_for("tec")
    student = tec.build(TrainConfig(run_dir="-", cache=str(tiny.cache), model="vit_tiny_patch8", depth=2), spec)
    student.load_state_dict(_final_model(run))
    assert isinstance(student, TECStudent)
    loss = HeldOutLoss(str(held_out.same), spec, batch_size=4, rank=0, world_size=1, num_workers=0, seed=0)
    once = loss.evaluate(tec, student, tec.terms, Runtime("cpu", "off"), student.num_patches)
    assert once == loss.evaluate(tec, student, tec.terms, Runtime("cpu", "off"), student.num_patches)
    assert once["val_loss_fea"] == pytest.approx(val[-1][1], rel=1e-5)


def test_held_out_cache_of_another_base_model_is_refused(tiny, held_out, tmp_path: Path) -> None:
    code, out, run = _run_cli(tmp_path, "--cache", str(tiny.cache), "--model", "vit_tiny_patch8", "--depth", "2",
                              "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--epochs", "1",
                              "--val-cache", str(held_out.other))
    assert code == 2 and "--val-cache:" in out and "base-model checkpoint sha256" in out, out
    assert not run.exists()


@pytest.mark.slow
def test_raised_epochs_extend_the_run_from_its_checkpoint(tiny, tmp_path: Path) -> None:
    base = ["--cache", str(tiny.cache), "--model", "vit_tiny_patch8", "--depth", "3", "--batch-size", "4",
            "--warmup-epochs", "0", "--blr", "1e-3", "--log-every", "1", "--num-workers", "0", "--device", "cpu"]
    code, out, run = _run_cli(tmp_path, *base, "--epochs", "1")
    assert code == 0, out
    first = _exact(run)
    assert [r[0] for r in first] == [1, 2, 3, 4, 5]  # 20 views / batch 4: 5 steps per epoch

    # Raised --epochs on the finished run: continues from checkpoint 5 with its optimizer state.
    code, out, _ = _run_cli(tmp_path, *base, "--epochs", "2")
    assert code == 0, out
    assert "resuming checkpoint-00000005.pt: epoch 1, micro-batch 0, step 5" in out
    assert out.count("extending the run") == 1
    assert "extending the run from 1 to 2 epochs at step 5 (epoch 1); the schedule follows the new total from here" in out
    assert re.search(r"steps this run\W+5\W", out)
    records = _exact(run)
    assert records[:5] == first and [r[:2] for r in records[5:]] == [(s, 1) for s in range(6, 11)]
    # The lr follows the 2-epoch cosine from step 6 on (no warm-up: the peak at epoch 1.0 of 2 is its half-way value).
    peak = 1e-3 * 4 / 256
    assert records[5][-1] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-12)
    ck = load_checkpoint(latest_saved(run))
    assert ck["global_step"] == 10
    # AdamW counts its updates per parameter: 10, not 5, so the optimizer state went on from the checkpoint.
    assert {float(st["step"]) for st in ck["optimizer"]["state"].values()} == {10.0}
    entry = {"from": 1, "to": 2, "step": 5, "epoch": 1}
    config = json.loads((run / "config.json").read_text())
    assert config["options"]["epochs"] == 2 and config["extended"] == [entry]
    assert ck["config"]["extended"] == [entry] and ck["config"]["options"]["epochs"] == 2

    # Lowering --epochs is refused naming it (CLI exit 2, ResumeError from the library), and so is
    # any other changed setting, also together with a raised --epochs.
    code, out, _ = _run_cli(tmp_path, "--epochs", "1")
    assert code == 2 and "--epochs: the run in" in out and "has 2 epochs, now 1" in out and "not shortened" in out
    with pytest.raises(ResumeError, match="--epochs"):
        train(_cfg(run, tiny.cache, epochs=1))
    code, out, _ = _run_cli(tmp_path, "--epochs", "3", "--batch-size", "5")
    # The micro-batch may change only with an accumulation that keeps the effective batch; the error says which.
    assert code == 2 and "effective batch: the run in" in out and "batch 4 x accumulation 1 = 4" in out, out
    assert "--batch-size 2 --accum-iter 2" in out, out
    assert latest_checkpoint(run) == ck_path(run, 10)

    # --run-dir alone keeps the stored 2 epochs and the record; a second extension adds to it.
    code, out, _ = _run_cli(tmp_path, "--epochs", "3")
    assert code == 0 and "extending the run from 2 to 3 epochs at step 10 (epoch 2)" in out, out
    assert [r[0] for r in _exact(run)] == list(range(1, 16))
    assert json.loads((run / "config.json").read_text())["extended"] == [entry, {"from": 2, "to": 3, "step": 10, "epoch": 2}]
    code, out, _ = _run_cli(tmp_path)
    assert code == 0 and "extending" not in out and re.search(r"steps this run\W+0\W", out)
    assert len(json.loads((run / "config.json").read_text())["extended"]) == 2


def test_truncate_metrics_drops_later_and_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    truncate_metrics(path, "step", 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_online_loader_steps_over_unreadable_images(tmp_path: Path) -> None:
    """A broken file in the source must not end a run: its slot takes the next readable image."""
    source = open_source(make_image_folder(tmp_path / "data", n_per_class=3, bad=True))
    bad = {i for i, it in enumerate(source.items) if it.key in {"class0/zero.jpg", "class0/notimage.jpg", "class0/truncated.jpg"}}
    loader = OnlineLoader(source, batch_size=4, recipe=ViewRecipe(size=TINY_IMG), num_workers=0)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        batches = list(loader.epoch(0))
    used = [i for b in batches for i in b.image_index.tolist()]
    assert len(batches) == loader.steps_per_epoch and len(used) == 4 * loader.steps_per_epoch
    assert not bad & set(used)
    again = [i for b in loader.epoch(0) for i in b.image_index.tolist()]
    assert again == used


def test_run_dir_from_before_elastic_resume_and_extension_still_resumes(tiny, tmp_path: Path) -> None:
    """A checkpoint without the keys later releases added (epoch_samples, mask_noise, layouts,
    extended) resumes with the values that reproduce the old behaviour; one without a key every
    release wrote is refused naming the file and the key."""
    run = tmp_path / "run"
    train(_cfg(run, tiny.cache, epochs=2, ckpt_every=2, keep_last=10, max_steps=2))
    path = latest_checkpoint(run)
    assert path is not None
    old = torch.load(path, weights_only=True)
    for k in ("epoch_samples", "mask_noise", "layouts"):
        del old["config"]["resolved"][k]
    old["config"].pop("extended", None)
    torch.save(old, path)
    (path.parent / (path.name + ".sha256")).unlink()  # written before checkpoints carried a digest
    result = train(_cfg(run, tiny.cache, epochs=2, ckpt_every=2, keep_last=10, max_steps=4))
    assert result.global_step == 4 and result.resumed_from == path
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["mask_noise"] == "stream" and resolved["layouts"] == [{"from_step": 0, "world_size": 1, "batch_size": 4,
                                                                          "accum_iter": 1}]
    assert resolved["epoch_samples"] == old["loader"]["steps_per_epoch"] * 4
    newest = latest_checkpoint(run)
    assert newest is not None
    broken = torch.load(newest, weights_only=True)
    del broken["log_accum"]
    torch.save(broken, newest)
    (newest.parent / (newest.name + ".sha256")).unlink()
    with pytest.raises(ResumeError, match=rf"{re.escape(newest.name)}: missing key log_accum"):
        train(_cfg(run, tiny.cache, epochs=2, ckpt_every=2, keep_last=10, max_steps=6))

"""`tec-train run --objective mae`: a plain MAE trained by the same loop makes a base model from scratch.

Checks the loss against a hand computation, that training lowers it, exact resume, that the
export is a timm ViT, that stage 1 accepts the run's checkpoint as a base model, and the option
errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from timm.models import VisionTransformer
from typer.testing import CliRunner

from tec_cache.build.builder import BuildConfig, build_cache
from tec_cache.core.basemodels import build_model, resolve_spec
from tec_cache.core.basemodels import load_checkpoint as load_base
from tec_cache.format.manifest import load_manifest
from tec_train.cli import app
from tec_train.export import create_timm_model
from tec_train.harness.checkpoints import latest_checkpoint, load_checkpoint
from tec_train.mae import build_mae, patchify, pixel_loss
from tec_train.train import TrainConfig, train
from tests.conftest import latest_saved, make_image_folder

IMG, PATCH = 32, 8


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("mae") / "data", n_per_class=8, bad=False)


def _cfg(run_dir: Path, data: Path, **kw) -> TrainConfig:
    args = dict(run_dir=str(run_dir), objective="mae", data=str(data), model="vit_tiny_patch8", depth=2,
                img_size=IMG, batch_size=4, epochs=3, warmup_epochs=1, blr=1e-3, num_workers=0, log_every=1,
                ckpt_every=100, device="cpu")
    args.update(kw)
    return TrainConfig(**args)


def test_patchify_and_pixel_loss_match_hand_computation() -> None:
    imgs = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    p = patchify(imgs, 2)  # [2, 4, 12]
    # Patch 1 of image 0 is rows 0-1, cols 2-3; its first pixel (row 0, col 2) holds the 3 channels.
    assert p.shape == (2, 4, 12)
    assert p[0, 1, :3].tolist() == [imgs[0, c, 0, 2].item() for c in range(3)]
    pred = torch.zeros(2, 4, 12)
    mask = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1]])
    # Normalised targets have mean 0 and unbiased variance ~1 per patch: error vs 0 = (n-1)/n.
    torch.testing.assert_close(pixel_loss(imgs, pred, mask, 2), torch.tensor(11 / 12), atol=1e-5, rtol=0)
    raw = pixel_loss(imgs, pred, mask, 2, norm_pix=False)
    want = (patchify(imgs, 2)[0, 0] ** 2).mean() / 2 + (patchify(imgs, 2)[1, 3] ** 2).mean() / 2
    torch.testing.assert_close(raw, want)


def test_mae_state_dict_uses_mae_names() -> None:
    keys = set(build_mae("vit_tiny_patch4", img_size=16, depth=1).state_dict())
    assert {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "norm.weight", "decoder_pred.weight",
            "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "decoder_blocks.0.mlp.fc1.weight"} <= keys
    assert not any(k.startswith(("cls_token_mlp", "encoder_adaptor", "forward_")) for k in keys)


@pytest.mark.slow  # end to end: learning, not a contract the fast tier must hold
def test_mae_run_learns_resumes_exports_and_feeds_stage_one(data: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    train(_cfg(straight, data, epochs=6))
    recs = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert set(recs[0]) >= {"step", "loss", "lr", "images_per_s"} and "loss_fea" not in recs[0]
    first, last = sum(r["loss"] for r in recs[:3]) / 3, sum(r["loss"] for r in recs[-3:]) / 3
    assert last < first, (first, last)
    ck = load_checkpoint(latest_saved(straight))
    assert ck["config"]["resolved"]["objective"] == "mae" and ck["config"]["resolved"]["targets"]["origin"]["kind"] == "pixels"

    # Exact resume: 5 steps, then the rest in a second invocation, equals the straight run.
    split = tmp_path / "split"
    train(_cfg(split, data, epochs=6, max_steps=5))
    train(_cfg(split, data, epochs=6))
    a, b = load_checkpoint(latest_saved(split))["model"], ck["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(x)["loss"] for x in (split / "metrics.jsonl").read_text().splitlines()] == [r["loss"] for r in recs]

    # Export: a timm ViT with the MAE encoder's features.
    r = CliRunner().invoke(app, ["export", str(straight), "--out", str(tmp_path / "export")])
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    vit = create_timm_model(config).eval()
    assert isinstance(vit, VisionTransformer)
    vit.load_state_dict(safetensors.torch.load_file(str(tmp_path / "export" / "model.safetensors")), strict=True)
    mae = build_mae("vit_tiny_patch8", img_size=IMG, depth=2).eval()
    mae.load_state_dict(ck["model"], strict=True)
    imgs = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(imgs), mae.forward_features(imgs), atol=1e-6, rtol=0)

    # Stage 1 takes the run's own checkpoint (decoder included) as its base model, strictly.
    spec = resolve_spec(None, arch="vit_tiny_patch16_224", img_size=IMG, patch_size=PATCH, depth=2, topk=3)
    base = build_model(spec)
    facts = load_base(base, latest_saved(straight))
    assert "norm.weight" not in facts["ignored_missing"]
    with torch.no_grad():
        torch.testing.assert_close(base.forward_features(imgs), mae.forward_features(imgs), atol=1e-6, rtol=0)
    cache = tmp_path / "cache"
    build_cache(BuildConfig(data=data, out=cache, checkpoint=latest_checkpoint(straight), spec=spec, views=1,
                            shard_size=8, batch_size=8, num_workers=0, device="cpu"))
    assert load_manifest(cache).targets.dim == 192


@pytest.mark.parametrize("args, expected", [
    (["--cache", "{data}"], "--cache: --objective mae learns from pixels"),
    (["--online-basemodel", "mae1kbase"], "--online-basemodel: --objective mae learns from pixels"),
    ([], "--data: --objective mae needs an image folder"),
    (["--objective", "pixels"], "--objective: expected one of tec, mae"),
])
def test_mae_option_errors(data: Path, tmp_path: Path, args: list[str], expected: str) -> None:
    argv = ["run", "--run-dir", str(tmp_path / "run"), "--model", "vit_tiny_patch8", "--depth", "2"]
    if "--objective" not in args:
        argv += ["--objective", "mae"]
        if args:
            argv += ["--data", str(data)]
    argv += [a.format(data=data) for a in args]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 2, r.output
    assert expected in " ".join(r.output.split()), r.output
    assert not (tmp_path / "run").exists()


def test_every_objective_is_an_option_of_run() -> None:
    from tec_train.objectives import OBJECTIVES
    from tec_train.train_config import OBJECTIVE_NAMES

    assert tuple(OBJECTIVES) == OBJECTIVE_NAMES

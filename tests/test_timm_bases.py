"""Any timm ViT as a base model (timm:NAME, hf-hub:ORG/REPO): tiny random-weight models of each family
(DINOv2 with and without registers, CLIP, DeiT/augreg, distilled DeiT, one without a class token) give
targets whose shapes, normalisation and prefix handling are checked; the hub path through a hub cache
laid out by the test, offline; a tiny build and a few training steps from such a cache."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.layers import Attention
from timm.models import VisionTransformer

from tec_cache.core.basemodels import base_normalisation, check_timm_vit, load_base_model, resolve_spec
from tec_cache.core.targets import extract_targets

TINY: dict[str, Any] = dict(embed_dim=32, depth=2, num_heads=2)
# family: (timm architecture, image size giving a 4x4 grid, mean, std, prefix tokens)
FAMILIES = {
    "dinov2": ("vit_small_patch14_dinov2", 56, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, 1),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", 56, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, 5),
    "clip": ("vit_base_patch16_clip_224", 64, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 1),
    "augreg": ("vit_tiny_patch16_224", 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", 64, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, 2),
}


def _tiny(arch: str, img: int, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=img, **TINY).eval()
    assert isinstance(model, VisionTransformer)
    return model


def _reference_targets(model: VisionTransformer, x: torch.Tensor, topk: int,
                       npt: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The targets written out the long way: every token through timm's own forward, the full logit
    matrix of the last block, then the rows and columns of the patch relation picked out of it."""
    attn = model.blocks[-1].get_submodule("attn")
    assert isinstance(attn, Attention)
    captured: dict[str, torch.Tensor] = {}
    h = attn.qkv.register_forward_hook(lambda m, i, o: captured.__setitem__("qkv", o))
    tokens = model.forward_features(x)  # [B,P+L,D] after the final norm: compare before it below
    h.remove()
    x_in = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for blk in model.blocks:
        x_in = blk(x_in)
    assert torch.allclose(model.norm(x_in), tokens, atol=1e-5)
    feat = x_in[:, npt:]  # [B,L,D]
    B, N, _ = captured["qkv"].shape
    H, hd = attn.num_heads, attn.head_dim
    q, k, _v = captured["qkv"].view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-1, -2)) * attn.scale  # [B,H,N,N]
    keep_cols = [0] + list(range(npt, N))
    score = logits[:, :, 0, npt:].mean(1)  # [B,L]
    idx = score.topk(topk, dim=1).indices  # [B,k]
    rows = torch.cat([torch.zeros(B, 1, dtype=torch.long), idx + npt], 1)  # [B,k+1]
    att = torch.stack([logits[b][:, rows[b]][:, :, keep_cols] for b in range(B)])  # [B,H,k+1,1+L]
    return feat, att.permute(0, 2, 1, 3)[..., 1:], idx


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_targets_keep_prefix_tokens_out(family: str) -> None:
    arch, img, _mean, _std, npt = FAMILIES[family]
    model = _tiny(arch, img)
    check_timm_vit(model, f"timm:{arch}")
    assert model.num_prefix_tokens == npt
    x = torch.randn(2, 3, img, img)
    feat, att, idx = extract_targets(model, x, topk=3, last_layers=1)
    L = 16  # 4x4 grid: patch 14 at 56, patch 16 at 64
    assert feat.shape == (2, L, 32) and att.shape == (2, 4, 2, L) and idx.shape == (2, 3)
    ref_feat, ref_att, ref_idx = _reference_targets(model, x, 3, npt)
    torch.testing.assert_close(feat, ref_feat, atol=1e-5, rtol=1e-5)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(att, ref_att, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_normalisation_comes_from_its_pretrained_cfg(family: str) -> None:
    arch, img, mean, std, _ = FAMILIES[family]
    model = _tiny(arch, img)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": mean, "std": std}  # type: ignore[assignment, dict-item]  # timm sets this plain dict after building; nn.Module types attributes as Tensor | Module
    spec = resolve_spec(f"timm:{arch}", img_size=img, topk=3)
    assert base_normalisation(model, spec) == (tuple(mean), tuple(std))
    assert spec.patch_size == model.patch_embed.patch_size[0] and spec.img_size // spec.patch_size == 4
    # The recipe defaults for a timm base are the reference's MAE-base ones.
    assert (resolve_spec(f"timm:{arch}").tau, resolve_spec(f"timm:{arch}").last_layers) == (1.8, 2)


def test_a_vit_without_class_token_is_refused_naming_why() -> None:
    model = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, num_classes=0, img_size=32, **TINY)
    with pytest.raises(ValueError, match=r"timm:vit_base_patch16_siglip_224: this ViT has no class token"):
        check_timm_vit(model, "timm:vit_base_patch16_siglip_224")
    with pytest.raises(ValueError, match="no class token"):
        resolve_spec("timm:vit_base_patch16_siglip_224.webli")
    with pytest.raises(ValueError, match="not a timm model name"):
        resolve_spec("timm:no_such_vit.tag")
    with pytest.raises(ValueError, match="--patch-size 16: timm:vit_small_patch14_dinov2.lvd142m has patch size 14"):
        resolve_spec("timm:vit_small_patch14_dinov2.lvd142m", patch_size=16)


def make_hub_repo(cache: Path, repo: str, arch: str, img: int, mean, std, seed: int = 0) -> dict[str, torch.Tensor]:
    """A hub cache entry as huggingface_hub lays it out (refs/main -> snapshots/<commit>/), holding a
    tiny model's config.json and model.safetensors as timm's hub loader reads them."""
    model = _tiny(arch, img, seed)
    commit = f"{seed:040x}"
    folder = cache / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(sd, str(snap / "model.safetensors"))
    cfg = {"architecture": arch, "num_classes": 0, "model_args": {**TINY, "img_size": img},
           "pretrained_cfg": {"input_size": [3, img, img], "mean": list(mean), "std": list(std), "num_classes": 0,
                              "classifier": "head", "crop_pct": 1.0, "interpolation": "bicubic"}}
    (snap / "config.json").write_text(json.dumps(cfg))
    return sd


def test_hub_base_loads_through_timm_offline_with_its_own_normalisation(hub_cache: Path) -> None:
    sd = make_hub_repo(hub_cache, "tec-test/tiny-clip", "vit_base_patch16_clip_224", 64, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    spec = resolve_spec("hf-hub:tec-test/tiny-clip", img_size=64, topk=3)
    assert (spec.arch, spec.patch_size, spec.source) == ("vit_base_patch16_clip_224", 16, "hf-hub:tec-test/tiny-clip")
    model, facts = load_base_model(spec, None)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert facts["input_mean"] == list(OPENAI_CLIP_MEAN) and facts["input_std"] == list(OPENAI_CLIP_STD)
    assert facts["layout"] == "timm pretrained" and len(facts["sha256"]) == 64
    # --checkpoint hf-hub:ORG/REPO reads the same repo's weights file from the hub cache.
    from tec_cache.core.weights import WeightsError, resolve_checkpoint

    path, got = resolve_checkpoint("hf-hub:tec-test/tiny-clip")
    assert path.name == "model.safetensors" and got["url"] == "hf-hub:tec-test/tiny-clip"
    with pytest.raises(WeightsError, match="not in the hub cache"):
        resolve_checkpoint("hf-hub:tec-test/absent")
    absent = dataclasses.replace(spec, name="hf-hub:tec-test/absent", source="hf-hub:tec-test/absent")
    with pytest.raises(WeightsError, match="hf-hub:tec-test/absent.*hub cache"):
        load_base_model(absent, None)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dinov2", "dinov2_reg4", "clip", "augreg"])
def test_build_and_train_from_a_hub_base_cache(family: str, hub_cache: Path, tmp_path: Path) -> None:
    """A tiny build from an hf-hub: base (its normalisation and prefix tokens in the manifest), a few
    training steps of a student of the same grid from it, and a student of another grid refused."""
    from tec_cache.build.builder import build_cache
    from tec_cache.build.config import build_config
    from tec_cache.format.manifest import load_manifest
    from tec_train.train import TrainConfig, train
    from tests.conftest import make_image_folder

    arch, img, mean, std, npt = FAMILIES[family]
    make_hub_repo(hub_cache, f"tec-test/{family}", arch, img, mean, std)
    data = make_image_folder(tmp_path / "data", n_per_class=4, bad=False)
    cfg = build_config(dict(data=str(data), out=tmp_path / "cache", basemodel=f"hf-hub:tec-test/{family}",
                            img_size=img, topk=3, views=1, shard_size=8, batch_size=8, num_workers=0, device="cpu"))
    build_cache(cfg)
    man = load_manifest(tmp_path / "cache")
    assert man.base_model.extra["input_mean"] == list(mean) and man.base_model.extra["num_prefix_tokens"] == npt
    assert man.views.recipe.mean == tuple(IMAGENET_DEFAULT_MEAN)  # the student's normalisation
    assert man.targets.grid == (4, 4) and man.base_model.extra["source"] == f"hf-hub:tec-test/{family}"
    patch = img // 4  # 14 for DINOv2 at 56, 16 for CLIP at 64
    run = tmp_path / "run"
    result = train(TrainConfig(run_dir=str(run), cache=str(tmp_path / "cache"), model=f"vit_tiny_patch{patch}", depth=2,
                               batch_size=4, epochs=1, warmup_epochs=0, blr=1e-3, num_workers=0, max_steps=2,
                               log_every=1, ckpt_every=100, device="cpu"))
    assert result.global_step == 2
    with pytest.raises(ValueError, match=r"cannot train this student.*patch"):
        train(TrainConfig(run_dir=str(tmp_path / "run2"), cache=str(tmp_path / "cache"), model="vit_tiny_patch8",
                          depth=2, batch_size=4, epochs=1, num_workers=0, max_steps=1, device="cpu"))
    assert not (tmp_path / "run2" / "metrics.jsonl").exists()


def test_online_mode_feeds_the_base_its_own_normalisation_and_the_student_its_own(hub_cache: Path, tmp_path: Path) -> None:
    from tec_cache.core.images import open_source
    from tec_cache.core.targets import normalise_images
    from tec_train.online import OnlineTargetFeed
    from tests.conftest import make_image_folder

    make_hub_repo(hub_cache, "tec-test/clip", "vit_base_patch16_clip_224", 64, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    spec = resolve_spec("hf-hub:tec-test/clip", img_size=64, topk=3, last_layers=1)
    source = open_source(make_image_folder(tmp_path / "data", n_per_class=2, bad=False))
    feed = OnlineTargetFeed(spec, None, source, device=torch.device("cpu"), batch_size=2, rank=0, world_size=1,
                            num_workers=0, seed=0, autocast=False)
    item = next(iter(feed.epoch(0)))
    got = feed.prepare(item, torch.device("cpu"))
    torch.testing.assert_close(got.images, normalise_images(item.images, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    feat, att, idx = extract_targets(feed.model, normalise_images(item.images, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
                                     topk=3, last_layers=1, autocast=False)
    assert got.feat is not None and got.att is not None and got.idx is not None
    assert torch.equal(got.feat, feat) and torch.equal(got.att, att) and torch.equal(got.idx, idx)
    assert feed.spec.mean == tuple(IMAGENET_DEFAULT_MEAN)


def test_cli_dry_run_prints_the_recipe_of_a_hub_base(hub_cache: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tec_cache.build.cli import app
    from tests.conftest import make_image_folder

    make_hub_repo(hub_cache, "tec-test/dinov2", "vit_small_patch14_reg4_dinov2", 56, IMAGENET_DEFAULT_MEAN,
                  IMAGENET_DEFAULT_STD)
    data = make_image_folder(tmp_path / "data", n_per_class=2, bad=False)
    r = CliRunner().invoke(app, ["build", "--basemodel", "hf-hub:tec-test/dinov2", "--data", str(data), "--out",
                                 str(tmp_path / "c"), "--img-size", "56", "--topk", "3", "--num-workers", "0",
                                 "--device", "cpu", "--dry-run"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "base model hf-hub:tec-test/dinov2 (vit_small_patch14_reg4_dinov2): top-k 3, tau 1.8, last layers 2" in text
    assert "56px / patch 14 = 4x4 grid" in text
    # A ViT without a class token, from the hub: refused as a usage error, naming why.
    make_hub_repo(hub_cache, "tec-test/siglip", "vit_base_patch16_siglip_224", 32, (0.5,) * 3, (0.5,) * 3)
    r = CliRunner().invoke(app, ["build", "--basemodel", "hf-hub:tec-test/siglip", "--data", str(data), "--out",
                                 str(tmp_path / "c2"), "--img-size", "32", "--topk", "3"])
    assert r.exit_code == 2 and "has no class token" in " ".join(r.output.split())


def test_a_timm_name_offline_and_not_cached_names_the_hub_cache(hub_cache: Path) -> None:
    from tec_cache.core.weights import WeightsError

    spec = resolve_spec("timm:vit_small_patch14_dinov2.lvd142m", topk=3, depth=1)
    assert (spec.arch, spec.img_size, spec.patch_size, spec.source) == (
        "vit_small_patch14_dinov2", 224, 14, "timm:vit_small_patch14_dinov2.lvd142m")
    with pytest.raises(WeightsError, match=rf"timm:vit_small_patch14_dinov2.lvd142m: .*hub repo timm/vit_small_patch14_dinov2.lvd142m.*{hub_cache}"):
        load_base_model(spec, None)


def test_a_hub_base_takes_its_weights_from_checkpoint_strictly(hub_cache: Path, tmp_path: Path) -> None:
    make_hub_repo(hub_cache, "tec-test/dino", "vit_small_patch14_reg4_dinov2", 56, IMAGENET_DEFAULT_MEAN,
                  IMAGENET_DEFAULT_STD)
    spec = resolve_spec("hf-hub:tec-test/dino", img_size=56, topk=3)
    other = {k: v.contiguous() for k, v in _tiny("vit_small_patch14_reg4_dinov2", 56, seed=7).state_dict().items()}
    safetensors.torch.save_file(other, str(tmp_path / "mine.safetensors"))
    model, facts = load_base_model(spec, tmp_path / "mine.safetensors")
    assert torch.equal(model.state_dict()["reg_token"], other["reg_token"]) and facts["num_prefix_tokens"] == 5
    del other["reg_token"]
    safetensors.torch.save_file(other, str(tmp_path / "noreg.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['reg_token'\]"):
        load_base_model(spec, tmp_path / "noreg.safetensors")


@pytest.mark.slow
def test_online_mode_trains_from_a_hub_base(hub_cache: Path, tmp_path: Path) -> None:
    from tec_train.train import TrainConfig, train
    from tests.conftest import make_image_folder

    make_hub_repo(hub_cache, "tec-test/clip", "vit_base_patch16_clip_224", 64, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    data = make_image_folder(tmp_path / "data", n_per_class=4, bad=False)
    cfg = dict(run_dir=str(tmp_path / "run"), online_basemodel="hf-hub:tec-test/clip", data=str(data), topk=3,
               model="vit_tiny_patch16", img_size=64, depth=2, batch_size=4, epochs=1, warmup_epochs=0, blr=1e-3,
               num_workers=0, max_steps=2, log_every=1, ckpt_every=100, device="cpu")
    assert train(TrainConfig(**cfg)).global_step == 2
    with pytest.raises(ValueError, match=r"student patch grid 8x8 .* does not match the base model.s 4x4"):
        train(TrainConfig(**{**cfg, "run_dir": str(tmp_path / "run2"), "model": "vit_tiny_patch8"}))

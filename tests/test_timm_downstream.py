"""knn, linear and finetune from a timm/hub base (``--basemodel hf-hub:ORG/REPO`` / ``timm:NAME``):
tiny random-weight models in a hub cache laid out by the test, offline. The features are timm's own
forward_features pooled over the patch tokens (registers and class token left out), computed on
images normalised with the base's own mean/std; fine-tuning keeps the architecture, groups its
parameters by layer and re-samples pos_embed around its prefix tokens."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, OPENAI_CLIP_MEAN
from timm.layers import resample_abs_pos_embed
from timm.models import VisionTransformer

from tec_train.encoder_weights import load_encoder, read_encoder_weights
from tec_train.eval_config import EvalConfig
from tec_train.evaluate import eval_transform, frozen_features, run_knn, run_linear
from tec_train.finetune import build_finetune_model, finetune, layer_id_for_vit
from tec_train.finetune_config import FinetuneConfig
from tests.conftest import make_image_folder
from tests.test_timm_bases import FAMILIES, _tiny, make_hub_repo

# family: hub repo; the DINOv2-with-registers one has 5 prefix tokens and no pos_embed entries for them.
BASES = {"dinov2_reg4": "tec-test/dinov2-reg4", "clip": "tec-test/clip"}


def _splits(root: Path) -> Path:
    make_image_folder(root / "train", n_per_class=3, classes=2, bad=False, seed=0)
    make_image_folder(root / "val", n_per_class=2, classes=2, bad=False, seed=1)
    return root


def _hub_base(hub: Path, family: str) -> tuple[str, int, tuple, tuple, int]:
    arch, img, mean, std, npt = FAMILIES[family]
    make_hub_repo(hub, BASES[family], arch, img, mean, std)
    return f"hf-hub:{BASES[family]}", img, tuple(mean), tuple(std), npt


@pytest.mark.parametrize("family", sorted(BASES))
def test_knn_features_are_the_bases_own_patch_tokens_with_its_normalisation(family: str, hub_cache: Path,
                                                                          tmp_path: Path) -> None:
    base, img, mean, std, npt = _hub_base(hub_cache, family)
    data = _splits(tmp_path / "imgs")
    cfg = EvalConfig(basemodel=base, data=str(data), img_size=img, num_workers=0, device="cpu", batch_size=4)
    got = frozen_features(cfg)
    enc = got.meta["encoder"]
    assert enc["input_mean"] == list(mean) and enc["input_std"] == list(std) and enc["num_prefix_tokens"] == npt
    assert enc["basemodel"] == base and enc["layout"] == "timm pretrained"
    # The long way: timm's own pretrained model, its forward_features, the patch tokens averaged.
    ref = timm.create_model(base, pretrained=True, num_classes=0, img_size=img).eval()
    assert isinstance(ref, VisionTransformer)
    from tec_train.labelled import dataset_len, open_labelled

    splits = open_labelled(data=data)
    train = [splits.train[i] for i in range(dataset_len(splits.train))]  # (PIL image, label)
    x = torch.stack([eval_transform(img, 0.875, mean, std)(im) for im, _ in train])  # [N, 3, S, S]
    with torch.no_grad():
        tokens = ref.forward_features(x)  # [N, P+L, C]
    assert tokens.shape[1] == npt + (img // ref.patch_embed.patch_size[0]) ** 2
    torch.testing.assert_close(got.train[0], tokens[:, npt:].mean(1), atol=1e-5, rtol=1e-5)
    assert got.train[1].tolist() == [t for _, t in train]
    # ImageNet's normalisation would give other features for CLIP: the base's own is the one used.
    if mean != tuple(IMAGENET_DEFAULT_MEAN):
        x_in = torch.stack([eval_transform(img, 0.875)(im) for im, _ in train])
        with torch.no_grad():
            assert not torch.allclose(ref.forward_features(x_in)[:, npt:].mean(1), got.train[0], atol=1e-3)
    cls = frozen_features(dataclasses.replace(cfg, pool="cls"))
    torch.testing.assert_close(cls.train[0], tokens[:, 0], atol=1e-5, rtol=1e-5)
    res = run_knn(dataclasses.replace(cfg, k=2))
    assert res["knn"]["num_train"] == len(train) and res["knn"]["num_test"] == dataset_len(splits.val)
    assert 0 <= res["knn"]["top1"] <= 1


def test_linear_from_a_hub_base_and_from_a_checkpoint_file_for_it(hub_cache: Path, tmp_path: Path) -> None:
    """The base's own hub weights, and the same architecture with its weights from a SOURCE file,
    loaded strictly (as tec-cache build's --checkpoint)."""
    base, img, mean, std, _ = _hub_base(hub_cache, "clip")
    arch = FAMILIES["clip"][0]
    data = _splits(tmp_path / "imgs")
    kw: dict[str, Any] = dict(data=str(data), img_size=img, num_workers=0, device="cpu", batch_size=4, epochs=2)
    res = run_linear(EvalConfig(basemodel=base, **kw))
    assert len(res["linear"]["curve"]) == 2 and res["encoder"]["input_mean"] == list(OPENAI_CLIP_MEAN)
    other = {k: v.contiguous() for k, v in _tiny(arch, img, seed=3).state_dict().items()}
    safetensors.torch.save_file(other, str(tmp_path / "mine.safetensors"))
    res = run_linear(EvalConfig(source=str(tmp_path / "mine.safetensors"), basemodel=base, **kw))
    assert res["encoder"]["path"] == str(tmp_path / "mine.safetensors") and res["encoder"]["input_std"] == list(std)
    vit, facts = load_encoder(str(tmp_path / "mine.safetensors"), basemodel=base)
    assert facts["img_size"] == img and all(torch.equal(vit.state_dict()[k], v) for k, v in other.items())
    del other["norm_pre.weight"]
    safetensors.torch.save_file(other, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['norm_pre.weight'\]"):
        load_encoder(str(tmp_path / "bad.safetensors"), basemodel=base)


@pytest.mark.parametrize("family,pos_prefix", [("dinov2_reg4", 0), ("clip", 1)])
def test_img_size_resamples_pos_embed_around_the_prefix_tokens(family: str, pos_prefix: int, hub_cache: Path,
                                                             tmp_path: Path) -> None:
    base, img, mean, std, npt = _hub_base(hub_cache, family)
    arch = FAMILIES[family][0]
    sd = {k: v.contiguous() for k, v in _tiny(arch, img, seed=5).state_dict().items()}
    safetensors.torch.save_file(sd, str(tmp_path / "w.safetensors"))
    patch = img // 4
    w = read_encoder_weights(str(tmp_path / "w.safetensors"), basemodel=base, img_size=6 * patch)
    want = resample_abs_pos_embed(sd["pos_embed"], new_size=[6, 6], old_size=[4, 4], num_prefix_tokens=pos_prefix)
    assert w.state["pos_embed"].shape == (1, pos_prefix + 36, 32)
    torch.testing.assert_close(w.state["pos_embed"], want)
    # Without a file timm's loader re-samples as it loads: the same result from the hub weights.
    hub = read_encoder_weights(None, basemodel=base, img_size=6 * patch)
    assert hub.state["pos_embed"].shape == (1, pos_prefix + 36, 32) and hub.config["img_size"] == 6 * patch
    vit, _ = load_encoder(None, basemodel=base, img_size=6 * patch)
    assert vit.forward_features(torch.randn(1, 3, 6 * patch, 6 * patch)).shape == (1, npt + 36, 32)


def test_cli_knn_from_a_hub_base_and_pool_cls_refused_without_class_token(hub_cache: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tec_train.cli import app

    base, img, mean, _std, _ = _hub_base(hub_cache, "dinov2_reg4")
    data = _splits(tmp_path / "imgs")
    out = tmp_path / "knn.json"
    common = ["--data", str(data), "--img-size", str(img), "--k", "2", "--num-workers", "0", "--device", "cpu"]
    r = CliRunner().invoke(app, ["knn", "--basemodel", base, *common, "--out-json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["encoder"]["basemodel"] == base and res["encoder"]["num_prefix_tokens"] == 5
    make_hub_repo(hub_cache, "tec-test/siglip", "vit_base_patch16_siglip_224", 32, (0.5,) * 3, (0.5,) * 3)
    r = CliRunner().invoke(app, ["knn", "--basemodel", "hf-hub:tec-test/siglip", *common[:2], "--img-size", "32",
                                 "--pool", "cls", "--num-workers", "0", "--device", "cpu"])
    assert r.exit_code == 2 and "without a class token" in " ".join(r.output.split()), r.output


def test_a_vit_without_class_token_pools_its_patches_but_refuses_pool_cls(hub_cache: Path, tmp_path: Path) -> None:
    make_hub_repo(hub_cache, "tec-test/siglip", "vit_base_patch16_siglip_224", 32, (0.5,) * 3, (0.5,) * 3)
    data = _splits(tmp_path / "imgs")
    cfg: dict[str, Any] = dict(basemodel="hf-hub:tec-test/siglip", data=str(data), img_size=32, num_workers=0, device="cpu", batch_size=4)
    got = frozen_features(EvalConfig(**cfg))
    assert got.train[0].shape == (len(got.train[1]), 32) and got.meta["encoder"]["num_prefix_tokens"] == 0
    with pytest.raises(ValueError, match=r"--pool cls: hf-hub:tec-test/siglip is a ViT without a class token"):
        frozen_features(EvalConfig(**cfg, pool="cls"))


def test_finetune_groups_and_heads_of_timm_bases(hub_cache: Path) -> None:
    base, img, *_ = _hub_base(hub_cache, "dinov2_reg4")
    weights = read_encoder_weights(None, basemodel=base, img_size=img)
    model, _ = build_finetune_model(weights, 3, drop_path=0.0)
    reg_token = model.get_parameter("reg_token")
    assert reg_token.shape == (1, 4, 32) and model.get_parameter("head.weight").shape == (3, 32)
    assert torch.equal(reg_token, weights.state["reg_token"]) and not model.get_parameter("pos_embed").requires_grad
    assert layer_id_for_vit("reg_token", 3) == 0 and layer_id_for_vit("norm_pre.weight", 3) == 0
    assert layer_id_for_vit("dist_token", 3) == 0 and layer_id_for_vit("blocks.1.ls1.gamma", 3) == 2
    assert layer_id_for_vit("fc_norm.weight", 3) == 3 and layer_id_for_vit("cls_token", 3) == -1
    # A distilled DeiT's head reads cls + dist tokens: --global-pool is refused, --cls-token trains both heads.
    arch, dimg, mean, std, _ = FAMILIES["deit_distilled"]
    make_hub_repo(hub_cache, "tec-test/deit", arch, dimg, mean, std)
    deit = read_encoder_weights(None, basemodel="hf-hub:tec-test/deit", img_size=dimg)
    with pytest.raises(ValueError, match="--global-pool: hf-hub:tec-test/deit is a distilled DeiT"):
        build_finetune_model(deit, 3)
    model, _ = build_finetune_model(deit, 3, global_pool=False)
    head_dist = model.get_parameter("head_dist.weight")
    assert head_dist.shape == (3, 32) and head_dist.std() < 1e-4


def test_finetune_a_few_steps_from_a_hub_base(hub_cache: Path, tmp_path: Path) -> None:
    base, img, mean, std, _ = _hub_base(hub_cache, "clip")
    data = _splits(tmp_path / "imgs")
    cfg = FinetuneConfig(run_dir=str(tmp_path / "ft"), basemodel=base, data=str(data), img_size=img, epochs=1,
                         warmup_epochs=0, batch_size=2, blr=1e-3, num_workers=0, device="cpu", drop_path=0.0,
                         mixup=0.0, cutmix=0.0)
    result = finetune(cfg)
    assert result.epoch == 1 and 0 <= result.last_top1 <= 1
    stored = json.loads((tmp_path / "ft" / "config.json").read_text())
    enc = stored["resolved"]["encoder"]
    assert enc["input_mean"] == list(OPENAI_CLIP_MEAN) and enc["timm_source"] == base

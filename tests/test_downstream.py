"""Downstream: encoder loading from every source kind (strictly), datasets, kNN, linear probe, the
fine-tuning recipe (layer decay, model build, run, resume) and the knn / linear / finetune CLI."""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models import VisionTransformer
from typer.testing import CliRunner

from tec_cache.core import fashion_mnist
from tec_train.cli import app
from tec_train.encoder_weights import load_encoder, read_encoder_weights
from tec_train.evaluate import extract_features, knn_classify, linear_probe
from tec_train.export import export_state_dict, save_export, timm_model_name
from tec_train.finetune import (
    FinetuneConfig,
    Finetuner,
    FinetuneViT,
    build_finetune_model,
    finetune,
    layer_decay_scales,
    param_groups_layer_decay,
)
from tec_train.harness import FINETUNE, Reporter, list_checkpoints
from tec_train.harness.checkpoints import save_checkpoint
from tec_train.harness.trackers import TENSORBOARD_DIR
from tec_train.labelled import FashionMNIST, dataset_len, open_labelled, subset_indices
from tec_train.student import MaskedEncoderMixin, TECStudent, build_student
from tests.conftest import TINY_ARCH, TINY_PATCH, make_image_folder
from tests.test_trackers import assert_same_series, tensorboard_scalars

ROOT = Path(__file__).resolve().parents[1]
IMG, PATCH, EMBED, DEPTH, HEADS = 32, 4, 64, 2, 2
FMNIST = fashion_mnist.DEFAULT_DIR
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST idx files not in {FMNIST} (apt-get install dataset-fashion-mnist)",
)
runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on shared CPU cores: a second intra-op thread spins more than it computes (8x slower
    measured here), so this module runs single-threaded and restores the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


M = TypeVar("M", bound=torch.nn.Module)


def _perturbed(module: M, seed: int = 0) -> M:
    """Move every trainable weight off its init so loading the wrong tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return module.eval()


def _student(embed: int = EMBED, heads: int = HEADS, depth: int = DEPTH) -> TECStudent:
    torch.manual_seed(0)
    s = build_student("vit_tiny_patch4", pred_dim=32, att_heads=4, img_size=IMG, embed_dim=embed, depth=depth,
                      num_heads=heads, decoder_embed_dim=32, decoder_num_heads=4, decoder_depth=1)
    return _perturbed(s)


def _features(model: VisionTransformer | MaskedEncoderMixin, imgs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(imgs)  # [B, 1+L, C]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """A tiny TEC student, its export folder and a tec-train run dir holding it."""
    root = tmp_path_factory.mktemp("downstream")
    student = _student()
    export = root / "export"
    save_export(export_state_dict(student.state_dict()), export, timm_model_name("vit_tiny_patch4"),
                {**student.encoder_config(), "student_model": "vit_tiny_patch4"})
    run = root / "run"
    resolved = {"student": {"model": "vit_tiny_patch4", **student.encoder_config(), "pred_dim": 32, "att_heads": 4}}
    save_checkpoint(run, {"model": student.state_dict(), "global_step": 7, "epoch": 1,
                          "config": {"options": {"model": "vit_tiny_patch4"}, "resolved": resolved}}, 7, keep_last=1)
    return SimpleNamespace(root=root, student=student, export=export, run=run,
                           imgs=torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1)))


# ---- encoders ------------------------------------------------------------------------------------
def test_load_encoder_from_export(tiny) -> None:
    vit, facts = load_encoder(tiny.export)
    assert not vit.training and vit.num_classes == 0
    assert facts["kind"] == "export" and facts["embed_dim"] == EMBED and facts["depth"] == DEPTH
    torch.testing.assert_close(_features(vit, tiny.imgs), _features(tiny.student, tiny.imgs), atol=1e-6, rtol=0)
    json.dumps(facts)  # JSON-able
    same, _ = load_encoder(tiny.export / "model.safetensors")  # the weights file of an export works too
    torch.testing.assert_close(_features(same, tiny.imgs), _features(vit, tiny.imgs), atol=0, rtol=0)


def test_load_encoder_from_run_dir_and_checkpoint_file(tiny) -> None:
    for source in (tiny.run, next(tiny.run.glob("checkpoint-*.pt"))):
        vit, facts = load_encoder(source)
        assert facts["kind"] == "run" and facts["mlp_token_folded"] and facts["global_step"] == 7
        assert facts["objective"] == "tec"
        torch.testing.assert_close(_features(vit, tiny.imgs), _features(tiny.student, tiny.imgs), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="--model vit_small_patch16"):
        load_encoder(tiny.run, model="vit_small_patch16")
    with pytest.raises(ValueError, match="--depth 5"):
        load_encoder(tiny.run, depth=5)


def _mae_layout(vit: torch.nn.Module, dec: int = 32) -> dict[str, torch.Tensor]:
    """A plain-MAE training state (tec-train run --objective mae): encoder keys plus MAE's decoder."""
    g = torch.Generator().manual_seed(3)
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    n = state["pos_embed"].shape[1]
    state.update({
        "mask_token": torch.randn(1, 1, dec, generator=g), "decoder_embed.weight": torch.randn(dec, EMBED, generator=g),
        "decoder_embed.bias": torch.zeros(dec), "decoder_pos_embed": torch.randn(1, n, dec, generator=g),
        "decoder_blocks.0.norm1.weight": torch.ones(dec), "decoder_blocks.0.attn.qkv.weight": torch.randn(3 * dec, dec, generator=g),
        "decoder_norm.weight": torch.ones(dec), "decoder_norm.bias": torch.zeros(dec),
        "decoder_pred.weight": torch.randn(PATCH * PATCH * 3, dec, generator=g), "decoder_pred.bias": torch.zeros(PATCH * PATCH * 3),
    })
    return state


def _timm_vit(**kw: Any) -> VisionTransformer:
    args: dict[str, Any] = dict(img_size=IMG, patch_size=PATCH, embed_dim=EMBED, depth=DEPTH, num_heads=HEADS, num_classes=0)
    args.update(kw)
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)
    assert isinstance(vit, VisionTransformer)
    return vit


def test_load_encoder_from_mae_objective_run(tmp_path: Path, tiny) -> None:
    vit = _perturbed(_timm_vit(), seed=5)
    resolved = {"student": {"model": "vit_tiny_patch4", "img_size": IMG, "patch_size": PATCH, "embed_dim": EMBED,
                            "depth": DEPTH, "num_heads": HEADS}}
    state = _mae_layout(vit)
    save_checkpoint(tmp_path / "mae", {"model": state, "global_step": 3,
                                       "config": {"options": {"objective": "mae"}, "resolved": resolved}}, 3, keep_last=1)
    loaded, facts = load_encoder(tmp_path / "mae")
    assert facts["objective"] == "mae" and facts["mlp_token_folded"] is False
    torch.testing.assert_close(_features(loaded, tiny.imgs), _features(vit, tiny.imgs), atol=1e-6, rtol=0)
    # An unknown key (here a wrapped-model prefix) is not dropped silently.
    bad = {**state, "module.head.weight": torch.zeros(3)}
    save_checkpoint(tmp_path / "bad", {"model": bad, "global_step": 3,
                                       "config": {"options": {"objective": "mae"}, "resolved": resolved}}, 3, keep_last=1)
    with pytest.raises(ValueError, match=r"checkpoint-00000003\.pt: unexpected keys module\.head\.weight"):
        load_encoder(tmp_path / "bad")


def test_load_encoder_from_real_mae_model(tmp_path: Path, tiny) -> None:
    mae = pytest.importorskip("tec_train.mae")
    torch.manual_seed(0)
    model = _perturbed(mae.build_mae("vit_tiny_patch4", img_size=IMG, embed_dim=EMBED, depth=DEPTH, num_heads=HEADS,
                                     decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4))
    resolved = {"student": {"model": "vit_tiny_patch4", **model.encoder_config()}}
    save_checkpoint(tmp_path / "mae", {"model": model.state_dict(), "global_step": 1,
                                       "config": {"options": {"objective": "mae"}, "resolved": resolved}}, 1, keep_last=1)
    loaded, _ = load_encoder(tmp_path / "mae")
    torch.testing.assert_close(_features(loaded, tiny.imgs), _features(model, tiny.imgs), atol=1e-6, rtol=0)


def test_load_encoder_from_reference_checkpoint(tmp_path: Path) -> None:
    student = _student(embed=192, heads=3)  # --model vit_tiny_patch4 means width 192
    args = argparse.Namespace(model="mae_vit_tiny_patch4", mlp_token=True)
    path = tmp_path / "checkpoint-299.pth"
    torch.save({"model": student.state_dict(), "epoch": 299, "args": args}, path)
    imgs = torch.randn(2, 3, IMG, IMG)
    vit, facts = load_encoder(path, model="vit_tiny_patch4")
    assert facts["kind"] == "reference" and facts["num_heads"] == 3 and facts["img_size"] == IMG
    torch.testing.assert_close(_features(vit, imgs), _features(student, imgs), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="--model"):
        load_encoder(path)
    # weight_convert.py's output (method.md 5.3): bare, cls folded, no norm.*; the norm starts as identity.
    converted = {k: v for k, v in export_state_dict(student.state_dict()).items() if not k.startswith("norm.")}
    torch.save(converted, tmp_path / "converted.pth")
    vit2, facts2 = load_encoder(tmp_path / "converted.pth", model="vit_tiny_patch4")
    assert facts2["norm_initialised"] is True
    assert torch.equal(vit2.get_parameter("norm.weight"), torch.ones(192))
    # A missing block tensor is named, not left random.
    broken = dict(converted)
    del broken["blocks.1.mlp.fc2.weight"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"broken\.pth.*missing keys: blocks\.1\.mlp\.fc2\.weight"):
        load_encoder(tmp_path / "broken.pth", model="vit_tiny_patch4")


def test_load_encoder_from_base_model_layouts(tmp_path: Path) -> None:
    from tec_cache.core.basemodels import build_model, resolve_spec

    torch.manual_seed(0)
    ref = _perturbed(build_model(resolve_spec(None, arch=TINY_ARCH, img_size=IMG, patch_size=TINY_PATCH, depth=2, topk=1)))
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    imgs = torch.randn(2, 3, IMG, IMG)
    mae_path, ibot_path = tmp_path / "mae.pth", tmp_path / "ibot.pth"
    torch.save({"model": sd}, mae_path)
    torch.save({"state_dict": {**sd, "masked_embed": torch.zeros(192)}}, ibot_path)
    for path, layout in ((mae_path, "mae"), (ibot_path, "ibot teacher")):
        # The image size comes from the file's pos_embed (32 px), not the registry's 224.
        vit, facts = load_encoder(path, arch=TINY_ARCH, patch_size=TINY_PATCH, depth=2)
        assert facts["kind"] == "basemodel" and facts["layout"].startswith(layout) and facts["img_size"] == IMG
        torch.testing.assert_close(_features(vit, imgs), _features(ref, imgs), atol=1e-6, rtol=0)
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": {f"encoder.{k}": v for k, v in sd.items()}}, wrong)
    with pytest.raises(ValueError, match=r"wrong\.pth.*missing keys"):
        load_encoder(wrong, arch=TINY_ARCH, patch_size=TINY_PATCH, depth=2)


def test_load_encoder_resamples_pos_embed(tiny) -> None:
    vit, facts = load_encoder(tiny.export, img_size=48)
    assert vit.get_parameter("pos_embed").shape == (1, 1 + 12 * 12, EMBED) and facts["pos_embed_resampled_from"] == IMG
    assert _features(vit, torch.randn(1, 3, 48, 48)).shape == (1, 145, EMBED)
    with pytest.raises(ValueError, match="--img-size 30"):
        load_encoder(tiny.export, img_size=30)


def test_load_encoder_strict_on_exports(tiny, tmp_path: Path) -> None:
    import safetensors.torch

    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((tiny.export / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config))
    state = safetensors.torch.load_file(str(tiny.export / "model.safetensors"))
    state["extra.weight"] = torch.zeros(2)
    del state["blocks.0.attn.qkv.bias"]
    safetensors.torch.save_file(state, str(bad / "model.safetensors"))
    # The config records the sha256 of other weights: refused before any key is looked at.
    with pytest.raises(ValueError, match=r"bad/model\.safetensors: sha256 mismatch.*safetensors_sha256"):
        load_encoder(bad)
    del config["safetensors_sha256"]  # as exports made before the digest: the strict key check speaks
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"bad.*missing keys: blocks\.0\.attn\.qkv\.bias; unexpected keys: extra\.weight"):
        load_encoder(bad)
    with pytest.raises(FileNotFoundError, match="no such"):
        load_encoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither an export folder"):
        load_encoder(tmp_path / "empty")


# ---- datasets ------------------------------------------------------------------------------------
def test_subset_indices_balanced_and_seeded() -> None:
    labels = np.repeat(np.arange(4), 25)
    a = subset_indices(labels, 20, seed=1)
    assert len(a) == 20 and np.bincount(labels[a]).tolist() == [5, 5, 5, 5]
    assert np.array_equal(a, subset_indices(labels, 20, seed=1)) and not np.array_equal(a, subset_indices(labels, 20, seed=2))
    r = subset_indices(labels, 30, seed=0, mode="random")
    assert len(set(r.tolist())) == 30
    assert len(subset_indices(labels, None)) == 100
    with pytest.raises(ValueError, match="--subset-mode"):
        subset_indices(labels, 3, mode="first")


@needs_fmnist
def test_fashion_mnist_dataset_is_rgb_pil() -> None:
    ds = FashionMNIST("test")
    img, label = ds[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (28, 28) and 0 <= label < 10
    r, g, b = img.split()
    assert r.tobytes() == g.tobytes() == b.tobytes()
    splits = open_labelled(fashion_mnist_dir=FMNIST, train_subset=50, val_subset=20, subset_seed=3)
    assert (dataset_len(splits.train), dataset_len(splits.val), splits.num_classes, splits.default_crop_pct) == (50, 20, 10, 1.0)


def test_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        FashionMNIST("train", tmp_path / "nowhere")
    assert fashion_mnist.HOW_TO_GET in str(e.value)
    make_image_folder(tmp_path / "d" / "train", n_per_class=2, bad=False)
    with pytest.raises(FileNotFoundError, match=r"--data.*missing \['val'\]"):
        open_labelled(data=tmp_path / "d")
    with pytest.raises(ValueError, match="exactly one of --data"):
        open_labelled()


def _image_splits(root: Path) -> Path:
    """train/ 16 and val/ 10 images of 2 classes (class0 holds 4 odd-mode images: L, RGBA, P, CMYK)."""
    make_image_folder(root / "train", n_per_class=6, classes=2, bad=False, seed=0)
    make_image_folder(root / "val", n_per_class=3, classes=2, bad=False, seed=1)
    return root


def test_image_folder_features(tiny, tmp_path: Path) -> None:
    splits = open_labelled(data=_image_splits(tmp_path / "imgs"))
    assert splits.kind == "image_folder" and splits.classes == ["class0", "class1"] and splits.default_crop_pct == 0.875
    vit, _ = load_encoder(tiny.export)
    feats, labels = extract_features(vit, splits.val, batch_size=4, num_workers=0)
    assert feats.shape == (dataset_len(splits.val), EMBED) and feats.dtype == torch.float32
    assert labels.tolist() == [splits.val[i][1] for i in range(dataset_len(splits.val))]
    # avg pooling is the mean of the final-normed patch tokens of timm's forward_features.
    img0 = splits.val[0][0]
    from tec_train.evaluate import eval_transform

    tokens = _features(vit, eval_transform(IMG, 0.875)(img0)[None])
    torch.testing.assert_close(feats[0], tokens[0, 1:].mean(0), atol=1e-5, rtol=0)
    cls, _ = extract_features(vit, splits.val, batch_size=4, num_workers=0, pool="cls")
    torch.testing.assert_close(cls[0], tokens[0, 0], atol=1e-5, rtol=0)


# ---- kNN and linear probe -------------------------------------------------------------------------
def _blobs(n_per: int, classes: int, dim: int, seed: int, spread: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(classes, dim) * 3  # orthogonal class directions
    x = centres.repeat_interleave(n_per, 0) + spread * torch.randn(classes * n_per, dim, generator=g)
    return x, torch.arange(classes).repeat_interleave(n_per)


def test_knn_separable_is_perfect() -> None:
    xtr, ytr = _blobs(30, 6, 16, seed=0)
    xte, yte = _blobs(10, 6, 16, seed=1)
    res = knn_classify(xtr, ytr, xte, yte, k=20, temperature=0.07, num_classes=6)
    assert res["top1"] == 1.0 and res["top5"] == 1.0 and res["num_test"] == 60
    chunked = knn_classify(xtr, ytr, xte, yte, k=20, num_classes=6, chunk_size=7)
    assert chunked["top1"] == 1.0


def test_knn_matches_hand_computation() -> None:
    # Cosines of the query [1, 0.1] with the train points: 0.995 (class 0), 0.856 and 0.0995 (class 1).
    xtr = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    ytr = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.1]])
    cos = torch.nn.functional.normalize(xtr, dim=1) @ torch.nn.functional.normalize(q, dim=1)[0]
    v0, v1 = math.exp(cos[0] / 1.0), math.exp(cos[1] / 1.0) + math.exp(cos[2] / 1.0)
    assert v1 > v0  # T=1, k=3: the two weaker class-1 votes outweigh the closest neighbour
    assert knn_classify(xtr, ytr, q, torch.tensor([1]), k=3, temperature=1.0, num_classes=2)["top1"] == 1.0
    # k=2 drops the far class-1 point: exp(0.995) > exp(0.856).
    assert knn_classify(xtr, ytr, q, torch.tensor([0]), k=2, temperature=1.0, num_classes=2)["top1"] == 1.0
    # A sharp temperature lets the nearest neighbour win even with k=3: exp(14.2) > exp(12.2) + exp(1.4).
    assert knn_classify(xtr, ytr, q, torch.tensor([0]), k=3, temperature=0.07, num_classes=2)["top1"] == 1.0
    assert "top5" not in knn_classify(xtr, ytr, q, torch.tensor([0]), k=3, num_classes=2)
    with pytest.raises(ValueError, match="--k"):
        knn_classify(xtr, ytr, q, torch.tensor([0]), k=0)
    with pytest.raises(ValueError, match="--temperature"):
        knn_classify(xtr, ytr, q, torch.tensor([0]), temperature=0)


def test_linear_probe_learns_and_is_deterministic() -> None:
    xtr, ytr = _blobs(40, 5, 24, seed=0, spread=0.5)
    xte, yte = _blobs(20, 5, 24, seed=1, spread=0.5)
    a = linear_probe(xtr, ytr, xte, yte, epochs=15, lr=0.1, batch_size=32, weight_decay=0.0, seed=0, warmup_epochs=1)
    assert a["best_top1"] >= 0.95 and a["last_top1"] >= 0.95 and len(a["curve"]) == 15
    assert a["curve"][-1]["train_loss"] < a["curve"][0]["train_loss"]
    b = linear_probe(xtr, ytr, xte, yte, epochs=15, lr=0.1, batch_size=32, weight_decay=0.0, seed=0, warmup_epochs=1)
    assert a["curve"] == b["curve"]
    lars = linear_probe(xtr, ytr, xte, yte, epochs=30, lr=5.0, batch_size=32, seed=0, warmup_epochs=1, optimizer="lars")
    assert lars["best_top1"] >= 0.95
    with pytest.raises(ValueError, match="--optimizer"):
        linear_probe(xtr, ytr, xte, yte, epochs=1, optimizer="adam")


# ---- fine-tuning recipe --------------------------------------------------------------------------
def test_layer_decay_scales_match_the_spec() -> None:
    # ViT-B's parameter names (depth 12) on a narrow model; scales depend on names only.
    model = FinetuneViT(mlp_token=True, img_size=IMG, patch_size=PATCH, embed_dim=32, depth=12, num_heads=2,
                        num_classes=10, global_pool="avg")
    model.get_parameter("pos_embed").requires_grad_(False)
    scales = layer_decay_scales(model, 0.65)
    assert scales["patch_embed.proj.weight"] == pytest.approx(0.65**13) == pytest.approx(0.003697, abs=1e-6)
    assert scales["blocks.0.attn.qkv.weight"] == pytest.approx(0.65**12) == pytest.approx(0.005688, abs=1e-6)
    assert scales["blocks.11.mlp.fc2.bias"] == pytest.approx(0.65)
    for name in ("head.weight", "fc_norm.weight", "cls_token", "cls_token_mlp.fc1.weight"):
        assert scales[name] == 1.0, name  # cls_token: the quirk of method.md 6
    assert "pos_embed" not in scales  # frozen, as the reference
    groups = param_groups_layer_decay(model, 0.05, 0.65)
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert decay_of[id(named["cls_token"])] == 0.0 and decay_of[id(named["blocks.3.norm1.weight"])] == 0.0
    assert decay_of[id(named["blocks.3.attn.qkv.weight"])] == 0.05 and decay_of[id(named["head.weight"])] == 0.05
    assert id(named["pos_embed"]) not in decay_of
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_finetune_model_keeps_or_folds_the_cls_mlp(tiny) -> None:
    weights = read_encoder_weights(tiny.run)
    assert weights.cls_mlp is not None
    vit, _ = load_encoder(tiny.run)
    vit.norm = torch.nn.Identity()  # global-pool mode drops the pretrained norm (method.md 5.3/6)
    expected = _features(vit, tiny.imgs)
    for keep in (True, False):
        model, facts = build_finetune_model(weights, 7, global_pool=True, drop_path=0.0, mlp_token=keep)
        assert facts["cls_mlp_kept"] is keep and isinstance(model, FinetuneViT) is keep
        model.eval()
        torch.testing.assert_close(_features(model, tiny.imgs), expected, atol=1e-5, rtol=0)
        head_weight = model.get_parameter("head.weight")
        assert head_weight.shape == (7, EMBED) and head_weight.std() < 1e-4
        assert torch.equal(model.get_parameter("head.bias"), torch.zeros(7)) and not model.get_parameter("pos_embed").requires_grad
    cls_model, _ = build_finetune_model(weights, 3, global_pool=False, drop_path=0.0)
    assert torch.equal(cls_model.get_parameter("norm.weight"), weights.state["norm.weight"])


def _ft_cfg(tmp_path: Path, source: Path, **kw) -> FinetuneConfig:
    args = dict(run_dir=str(tmp_path / "ft"), source=str(source), fashion_mnist=str(FMNIST), train_subset=160,
                val_subset=100, epochs=2, warmup_epochs=1, batch_size=32, blr=2e-3, num_workers=0, device="cpu",
                drop_path=0.0)
    args.update(kw)
    return FinetuneConfig(**args)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class _KillAfterFirstEpoch(Reporter):
    def record(self, record: dict) -> None:
        raise KeyboardInterrupt("killed after the epoch's checkpoint")


@pytest.mark.slow
@needs_fmnist
def test_finetune_runs_resumes_exactly(tiny, tmp_path: Path) -> None:
    straight = finetune(_ft_cfg(tmp_path / "a", tiny.export))
    recs = _records(tmp_path / "a" / "ft")
    assert [r["epoch"] for r in recs] == [0, 1] and straight.epochs_run == 2 and straight.epoch == 2
    for r in recs:
        assert {"train_loss", "lr", "test_top1", "test_top5", "test_loss", "best_top1", "best_epoch"} <= set(r)
        assert math.isfinite(r["train_loss"]) and 0 <= r["test_top1"] <= 1
    assert straight.best_top1 == max(r["test_top1"] for r in recs) and straight.last_top1 == recs[-1]["test_top1"]
    result = json.loads((tmp_path / "a" / "ft" / "result.json").read_text())
    assert result["best_top1"] == straight.best_top1 and result["last_top1"] == straight.last_top1
    assert [e for e, _ in list_checkpoints(tmp_path / "a" / "ft", FINETUNE)] == [2]

    # Killed after epoch 0's checkpoint, then resumed: the same records as the uninterrupted run.
    cfg = _ft_cfg(tmp_path / "b", tiny.export)
    with pytest.raises(KeyboardInterrupt):
        Finetuner(cfg, _KillAfterFirstEpoch()).run()
    resumed = finetune(_ft_cfg(tmp_path / "b", tiny.export))
    assert resumed.resumed_from is not None and resumed.resumed_from.name == "finetune-0001.pt"
    assert resumed.epochs_run == 1
    drop = {"time", "train_seconds", "images_per_s", "data_wait_fraction"}
    clean = [{k: v for k, v in r.items() if k not in drop} for r in _records(tmp_path / "b" / "ft")]
    assert clean == [{k: v for k, v in r.items() if k not in drop} for r in recs]
    # 160 images / batch 32: 5 optimizer steps an epoch; the TensorBoard curves are metrics.jsonl's,
    # against the step, each point once across the two launches.
    assert [r["step"] for r in recs] == [5, 10]
    assert_same_series(tmp_path / "b" / "ft" / TENSORBOARD_DIR, _records(tmp_path / "b" / "ft"))
    assert {"train_loss", "lr", "test_top1", "test_top5", "test_loss", "best_top1", "data_wait_fraction"} <= set(
        tensorboard_scalars(tmp_path / "b" / "ft" / TENSORBOARD_DIR))


@pytest.mark.slow  # end to end: learning, not a contract the fast tier must hold
@needs_fmnist
def test_finetune_learns_above_chance(tiny, tmp_path: Path) -> None:
    """No mixing or augmentation and a few epochs: a tiny model beats 10 % on 10 classes."""
    cfg = _ft_cfg(tmp_path, tiny.export, epochs=4, warmup_epochs=0, mixup=0.0, cutmix=0.0, reprob=0.0, aa="none",
                  smoothing=0.0, blr=2e-2, layer_decay=1.0, weight_decay=0.0, train_subset=320, global_pool=False)
    res = finetune(cfg)
    assert res.best_top1 > 0.25


def test_finetune_config_errors_name_the_option(tiny, tmp_path: Path) -> None:
    def bad(match: str, **kw) -> None:
        with pytest.raises(ValueError, match=match):
            _ft_cfg(tmp_path, tiny.export, **kw).validate()

    bad("--layer-decay", layer_decay=1.5)
    bad("--batch-size: Mixup", batch_size=33)
    bad("--aa", aa="bogus")
    bad("--mixup-mode", mixup_mode="row")
    bad("--drop-path", drop_path=1.0)
    bad("--epochs", epochs=0)
    bad("--amp", amp="fp8")
    bad("--data DIR or --fashion-mnist", fashion_mnist=None)
    bad("--checkpoint: base-model weights need", checkpoint=str(tiny.export))
    with pytest.raises(ValueError, match="SOURCE: no such"):
        _ft_cfg(tmp_path, tmp_path / "missing").validate()
    bad("--basemodel", basemodel="mae9k")
    with pytest.raises(ValueError) as e:
        _ft_cfg(tmp_path, tiny.export, fashion_mnist=str(tmp_path / "nofm")).validate()
    assert fashion_mnist.HOW_TO_GET in str(e.value)


# ---- CLI ------------------------------------------------------------------------------------------
def test_cli_knn_and_linear_on_image_folder(tiny, tmp_path: Path) -> None:
    data = _image_splits(tmp_path / "imgs")
    out = tmp_path / "knn.json"
    r = runner.invoke(app, ["knn", str(tiny.export), "--data", str(data), "--k", "3", "--num-workers", "0",
                            "--device", "cpu", "--out-json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["knn"]["k"] == 3 and res["knn"]["num_test"] == 10 and 0 <= res["knn"]["top1"] <= 1
    assert res["encoder"]["kind"] == "export" and res["crop_pct"] == 0.875 and "top-1" in r.output
    out = tmp_path / "lin.json"
    r = runner.invoke(app, ["linear", str(tiny.run), "--data", str(data), "--epochs", "3", "--batch-size", "4",
                            "--num-workers", "0", "--device", "cpu", "--pool", "cls", "--out-json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert len(res["linear"]["curve"]) == 3 and res["pool"] == "cls" and res["encoder"]["kind"] == "run"


@needs_fmnist
def test_cli_knn_fashion_mnist(tiny, tmp_path: Path) -> None:
    out = tmp_path / "knn.json"
    r = runner.invoke(app, ["knn", str(tiny.export), "--fashion-mnist", "--train-subset", "200", "--val-subset", "50",
                            "--num-workers", "0", "--device", "cpu", "--out-json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["data"]["kind"] == "fashion_mnist" and res["knn"]["num_train"] == 200 and "top5" in res["knn"]


@pytest.mark.slow
@needs_fmnist
def test_cli_finetune_then_extend(tiny, tmp_path: Path) -> None:
    run_dir = tmp_path / "ft"
    base = ["finetune", str(tiny.export), "--run-dir", str(run_dir), "--fashion-mnist", "--train-subset", "96",
            "--val-subset", "40", "--batch-size", "32", "--warmup-epochs", "0", "--num-workers", "0", "--device", "cpu"]
    r = runner.invoke(app, [*base, "--epochs", "1"])
    assert r.exit_code == 0, r.output
    assert "best top-1" in r.output
    first = _records(run_dir)
    r = runner.invoke(app, [*base, "--epochs", "2"])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    # 96 images / batch 32: 3 steps per epoch, so epoch 1 starts at step 3.
    assert out.count("extending the run") == 1
    assert "extending the run from 1 to 2 epochs at step 3 (epoch 1); the schedule follows the new total from here" in out
    recs = _records(run_dir)
    assert [rec["epoch"] for rec in recs] == [0, 1] and recs[0] == first[0]  # continued from epoch 1, not from 0
    assert json.loads((run_dir / "result.json").read_text())["epochs_run"] == 1
    config = json.loads((run_dir / "config.json").read_text())
    assert config["options"]["epochs"] == 2 and config["extended"] == [{"from": 1, "to": 2, "step": 3, "epoch": 1}]
    ck = torch.load(run_dir / "finetune-0002.pt", weights_only=True)
    assert {float(st["step"]) for st in ck["optimizer"]["state"].values()} == {6.0}  # AdamW went on from step 3
    # Lowering --epochs is refused naming it.
    r = runner.invoke(app, [*base, "--epochs", "1"])
    assert r.exit_code == 2 and "--epochs" in r.output and "not shortened" in " ".join(r.output.split())
    # --run-dir alone resumes with the stored options; with no epochs left it reports the stored result.
    r = runner.invoke(app, ["finetune", "--run-dir", str(run_dir), "--num-workers", "0"])
    assert r.exit_code == 0, r.output
    result = json.loads((run_dir / "result.json").read_text())
    assert result["epochs_run"] == 0 and result["last_top1"] == _records(run_dir)[-1]["test_top1"]
    # A changed recipe option is refused for a run dir in progress, naming the option.
    r = runner.invoke(app, [*base, "--epochs", "3", "--blr", "1e-2"])
    assert r.exit_code == 2 and "--blr" in r.output


@pytest.mark.parametrize(("args", "option"), [
    (["finetune", "SRC", "--run-dir", "R", "--fashion-mnist", "--layer-decay", "0"], "--layer-decay"),
    (["finetune", "SRC", "--run-dir", "R", "--fashion-mnist", "--mixup", "-1"], "--mixup"),
    (["finetune", "SRC", "--run-dir", "R", "--fashion-mnist", "--smoothing", "1"], "--smoothing"),
    (["finetune", "SRC", "--run-dir", "R"], "--data DIR or --fashion-mnist"),
    (["knn", "SRC", "--fashion-mnist", "--k", "0"], "--k"),
    (["knn", "SRC", "--fashion-mnist", "--pool", "max"], "--pool"),
    (["linear", "SRC", "--fashion-mnist", "--optimizer", "adam"], "--optimizer"),
    (["linear", "SRC", "--fashion-mnist", "--epochs", "0"], "--epochs"),
    (["knn", "SRC", "--fashion-mnist-dir", "/nonexistent/fm"], "apt-get install dataset-fashion-mnist"),
])
def test_cli_bad_options_exit_2(tiny, tmp_path: Path, args: list[str], option: str) -> None:
    args = [str(tiny.export) if a == "SRC" else str(tmp_path / "run") if a == "R" else a for a in args]
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert option in r.output


@pytest.mark.slow
@needs_fmnist
def test_finetune_ddp_two_ranks_kill_and_resume(tiny, tmp_path: Path) -> None:
    """torchrun, 2 gloo ranks: killed mid-epoch 1 by a fault, resumed from epoch 1's checkpoint."""
    run_dir = tmp_path / "ft"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tec_train",
           "finetune", str(tiny.export), "--run-dir", str(run_dir), "--fashion-mnist", "--train-subset", "128",
           "--val-subset", "50", "--batch-size", "16", "--epochs", "2", "--warmup-epochs", "1", "--num-workers", "0",
           "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k != "TEC_FAULT"}
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    # 128 images / 2 ranks / batch 16 = 4 micro-batches per epoch: arrival 6 is in epoch 1.
    killed = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**env, "TEC_FAULT": "finetune_step:6@1"})
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    assert [e for e, _ in list_checkpoints(run_dir, FINETUNE)] == [1]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming finetune-0001.pt: next epoch 1" in done.stderr
    recs = _records(run_dir)
    assert [r["epoch"] for r in recs] == [0, 1]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["resolved"]["world_size"] == 2 and config["resolved"]["eff_batch"] == 32
    assert config["resolved"]["data"]["val_images"] == 50  # split over ranks without padding, summed exactly

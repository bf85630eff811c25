"""Export (method.md 5.3 / 9.9): cls MLP folding, strict load into timm, identical features, file
round-trips, and loading reference-style checkpoints."""
from __future__ import annotations

import argparse
import hashlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from timm.models import VisionTransformer

from tec_train.export import (
    create_timm_model,
    export_state_dict,
    load_tec_checkpoint,
    save_export,
    timm_model_name,
)
from tec_train.student import TECStudent, build_student

IMG, PATCH, EMBED, DEPTH, HEADS = 32, 4, 48, 6, 3


@pytest.fixture(scope="module")
def student() -> TECStudent:
    torch.manual_seed(0)
    s = build_student(
        "vit_tiny_patch4", pred_dim=64, att_heads=4, img_size=IMG,
        embed_dim=EMBED, depth=DEPTH, num_heads=HEADS, decoder_embed_dim=32, decoder_num_heads=4,
    )
    with torch.no_grad():  # move the norms and biases off their init values so the check has teeth
        for p in s.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return s.eval()


def _timm_vit() -> VisionTransformer:
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0,
        img_size=IMG, patch_size=PATCH, embed_dim=EMBED, depth=DEPTH, num_heads=HEADS,
    ).eval()
    assert isinstance(vit, VisionTransformer)
    return vit


def test_cls_mlp_is_folded_into_cls_token(student: TECStudent) -> None:
    exported = export_state_dict(student.state_dict())
    assert student.cls_token_mlp is not None
    with torch.no_grad():
        expected = student.cls_token_mlp.fc2(torch.nn.functional.gelu(student.cls_token_mlp.fc1(student.cls_token)))
    torch.testing.assert_close(exported["cls_token"], expected, atol=0, rtol=0)
    assert not torch.equal(exported["cls_token"], student.cls_token)


def test_export_keys_are_a_plain_timm_vit(student: TECStudent) -> None:
    exported = export_state_dict(student.state_dict())
    banned = ("encoder_adaptor", "forward_fea_decoder", "forward_att_decoder", "decoder_", "cls_token_mlp",
              "head", "fc_norm")
    assert not [k for k in exported if k.startswith(banned)]
    assert {"norm.weight", "norm.bias", "pos_embed", "cls_token"} <= set(exported)
    assert set(exported) == set(_timm_vit().state_dict())


def test_timm_model_gives_identical_features(student: TECStudent) -> None:
    vit = _timm_vit()
    vit.load_state_dict(export_state_dict(student.state_dict()), strict=True)
    imgs = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ours = student.forward_features(imgs)  # student modules, cls MLP applied, no masking
        theirs = vit.forward_features(imgs)
    assert ours.shape == (2, 1 + (IMG // PATCH) ** 2, EMBED)
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)


def test_forward_features_is_the_unmasked_encoder(student: TECStudent) -> None:
    """With nothing masked and the identity shuffle, the pretraining encoder's last layer is forward_features."""
    imgs = torch.randn(2, 3, IMG, IMG)
    n = (IMG // PATCH) ** 2
    student.mask_ratio = 0.0
    try:
        with torch.no_grad():
            layers, mask, _ = student.forward_encoder(imgs, torch.arange(n, dtype=torch.float32).expand(2, n))
            full = student.forward_features(imgs)
    finally:
        student.mask_ratio = 0.75
    assert mask.sum() == 0
    torch.testing.assert_close(layers[..., -EMBED:], full, atol=1e-6, rtol=0)


def test_save_export_round_trips(student: TECStudent, tmp_path: Path) -> None:
    exported = export_state_dict(student.state_dict())
    name = timm_model_name("vit_tiny_patch4")
    paths = save_export(exported, tmp_path / "out", name, {**student.encoder_config(), "base_model": "mae1kbase"})
    assert {p.name for p in paths.values()} == {"model.safetensors", "model.pth", "config.json"}

    from_st = safetensors.torch.load_file(str(paths["safetensors"]))
    from_pth = torch.load(paths["pth"], weights_only=True)
    for loaded in (from_st, from_pth):
        assert set(loaded) == set(exported)
        for key, value in exported.items():
            assert torch.equal(loaded[key], value), key

    config = json.loads(paths["config"].read_text())
    assert config == {"model_name": "vit_tiny_patch16_224", "img_size": IMG, "patch_size": PATCH,
                      "embed_dim": EMBED, "depth": DEPTH, "num_heads": HEADS, "base_model": "mae1kbase",
                      "safetensors_sha256": hashlib.sha256(paths["safetensors"].read_bytes()).hexdigest()}
    vit = create_timm_model(config)
    vit.load_state_dict(from_st, strict=True)

    with pytest.raises(ValueError, match="num_heads"):
        save_export(exported, tmp_path / "bad", name, {"img_size": IMG, "patch_size": PATCH, "embed_dim": EMBED,
                                                       "depth": DEPTH})


def test_mlp_token_flag_must_match_state_dict(student: TECStudent) -> None:
    with pytest.raises(ValueError, match="mlp_token=True"):
        export_state_dict(student.state_dict(), mlp_token=False)
    plain = {k: v for k, v in student.state_dict().items() if not k.startswith("cls_token_mlp")}
    with pytest.raises(ValueError, match="no cls_token_mlp"):
        export_state_dict(plain)
    assert torch.equal(export_state_dict(plain, mlp_token=False)["cls_token"], student.cls_token.detach())


@pytest.mark.parametrize(
    ("student_name", "timm_name"),
    [
        ("vit_base_patch16", "vit_base_patch16_224"),
        ("mae_vit_base_patch16", "vit_base_patch16_224"),
        ("mae_vit_large_patch16", "vit_large_patch16_224"),
        ("vit_huge_patch14", "vit_huge_patch14_224"),
        ("vit_small_patch8", "vit_small_patch8_224"),
        ("vit_tiny_patch4", "vit_tiny_patch16_224"),
    ],
)
def test_timm_model_name(student_name: str, timm_name: str) -> None:
    assert timm_model_name(student_name) == timm_name


def test_timm_model_name_unknown() -> None:
    with pytest.raises(ValueError, match="known sizes"):
        timm_model_name("deit_base_patch16")


def test_load_reference_checkpoint_with_namespace(student: TECStudent, tmp_path: Path) -> None:
    sd = student.state_dict()
    args = argparse.Namespace(model="mae_vit_base_patch16", blr=1.5e-4, mlp_token=True, pred_att=True, topkatt=15)
    path = tmp_path / "checkpoint-299.pth"
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 299, "args": args}, path)
    loaded = load_tec_checkpoint(path)
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    fresh = build_student("vit_tiny_patch4", pred_dim=64, att_heads=4, img_size=IMG, embed_dim=EMBED,
                          depth=DEPTH, num_heads=HEADS, decoder_embed_dim=32, decoder_num_heads=4)
    fresh.load_state_dict(loaded, strict=True)
    # The Namespace allowance is scoped to load_tec_checkpoint, not left on globally.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)

    bare = tmp_path / "bare.pth"
    torch.save(sd, bare)
    assert set(load_tec_checkpoint(bare)) == set(sd)


@dataclass
class _Unsafe:
    value: int


def test_load_rejects_unsafe_or_foreign_files(tmp_path: Path) -> None:
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": {}, "extra": _Unsafe(1)}, unsafe)
    with pytest.raises(ValueError, match="weights_only"):
        load_tec_checkpoint(unsafe)
    foreign = tmp_path / "foreign.pth"
    torch.save({"epoch": 3}, foreign)
    with pytest.raises(ValueError, match="bare state dict"):
        load_tec_checkpoint(foreign)

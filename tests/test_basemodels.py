"""Base-model registry and strict checkpoint loading in every layout users bring (method.md 5.1)."""
from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file

from tec_cache.core.basemodels import REGISTRY, build_model, load_base_model, resolve_spec
from tests.conftest import tiny_spec, tiny_state_dict


def test_registry_recipe_defaults():
    assert {n: (s.arch, s.topk, s.tau, s.last_layers) for n, s in REGISTRY.items()} == {
        "mae1kbase": ("vit_base_patch16_224", 15, 1.8, 2),
        "mae1k300ep": ("vit_base_patch16_224", 15, 1.8, 2),
        "ibot1kbase": ("vit_base_patch16_224", 9, 1.0, 2),
        "mae1klarge": ("vit_large_patch16_224", 15, 1.4, 2),
    }


def test_overrides_and_arch():
    s = resolve_spec("ibot1kbase", topk=5, last_layers=3)
    assert (s.topk, s.tau, s.last_layers, s.img_size, s.patch_size) == (5, 1.0, 3, 224, 16)
    s = resolve_spec(None, arch="vit_small_patch16_224", img_size=32, patch_size=4)
    assert (s.arch, s.img_size, s.patch_size, s.topk, s.tau) == ("vit_small_patch16_224", 32, 4, 15, 1.8)
    m = build_model(s)
    assert m.patch_embed.num_patches == 64 and m.embed_dim == 384


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"basemodel": "mae2kbase"}, "--basemodel"),
        ({"basemodel": None}, "--basemodel or --arch"),
        ({"basemodel": None, "arch": "not_a_model"}, "--arch"),
        ({"basemodel": "mae1kbase", "topk": 0}, "--topk"),
        ({"basemodel": "mae1kbase", "topk": 500}, "--topk"),
        ({"basemodel": "mae1kbase", "img_size": 100}, "--img-size"),
        ({"basemodel": "mae1kbase", "tau": -1.0}, "--tau"),
    ],
)
def test_bad_options_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolve_spec(**kwargs)


def _layouts(sd):
    ibot = dict(sd)
    ibot["masked_embed"] = torch.zeros(sd["cls_token"].shape[-1])
    ibot["head.mlp.0.weight"] = torch.zeros(4, 4)
    return {
        "mae": {"model": sd, "epoch": 3},
        "ibot_teacher": {"state_dict": ibot},
        "dino_teacher": {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, "head.last_layer.weight": torch.zeros(2, 2)}},
        "dino_student": {"student": {**{f"module.backbone.{k}": v for k, v in sd.items()}, "module.head.w": torch.zeros(2)}},
        "bare": dict(sd),
    }


@pytest.mark.parametrize("layout", ["mae", "ibot_teacher", "dino_teacher", "dino_student", "bare", "safetensors"])
def test_every_layout_loads_exactly(tmp_path, layout):
    sd = tiny_state_dict(seed=1)
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pth")
    if layout == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(_layouts(sd)[layout], path)
    model, facts = load_base_model(tiny_spec(), path)
    got = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
    assert len(facts["sha256"]) == 64
    assert not any(p.requires_grad for p in model.parameters())


def test_missing_norm_is_allowed_but_nothing_else(tmp_path):
    sd = tiny_state_dict()
    no_norm = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    torch.save({"model": no_norm}, tmp_path / "a.pth")
    load_base_model(tiny_spec(), tmp_path / "a.pth")
    no_block = {k: v for k, v in sd.items() if not k.startswith("blocks.0.attn")}
    torch.save({"model": no_block}, tmp_path / "b.pth")
    with pytest.raises(ValueError, match=r"missing keys \['blocks.0.attn.qkv.weight'"):
        load_base_model(tiny_spec(), tmp_path / "b.pth")


def test_wrong_prefix_is_never_a_random_teacher(tmp_path):
    sd = tiny_state_dict()
    torch.save({"model": {f"encoder.{k}": v for k, v in sd.items()}}, tmp_path / "p.pth")
    with pytest.raises(ValueError) as e:
        load_base_model(tiny_spec(), tmp_path / "p.pth")
    msg = str(e.value)
    assert "missing keys ['cls_token'" in msg and "unexpected keys ['encoder.cls_token'" in msg


def test_shape_mismatch_names_key(tmp_path):
    sd = tiny_state_dict()
    torch.save({"model": sd}, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="pos_embed"):
        load_base_model(tiny_spec(img_size=64), tmp_path / "w.pth")


def test_pickled_payload_is_refused(tmp_path):
    # A reference-style file with an argparse Namespace needs pickle to load: refused, not run.
    torch.save({"model": tiny_state_dict(), "args": argparse.Namespace(lr=1.0)}, tmp_path / "ns.pth")
    with pytest.raises(ValueError, match="weights-only"):
        load_base_model(tiny_spec(), tmp_path / "ns.pth")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        load_base_model(tiny_spec(), tmp_path / "nope.pth")

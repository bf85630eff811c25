"""Codecs keep what the losses see; manifests are validated field by field."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tec_cache.core.codecs import TargetShape, fidelity, get_codec
from tec_cache.format.manifest import Manifest, ManifestError


def _targets(B=4, L=49, D=32, H=4, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Channels with their own offsets and scales, and a few outlier channels, as ViT features have.
    scale = torch.rand(D, generator=g) * 3 + 0.1
    scale[:2] *= 40
    feat = torch.randn(B, L, D, generator=g) * scale + torch.randn(D, generator=g) * 5
    att = torch.randn(B, k + 1, H, L, generator=g) * 3
    idx = torch.stack([torch.randperm(L, generator=g)[:k] for _ in range(B)])
    return feat, att, idx


@pytest.mark.parametrize("name, least_cosine, most_kl", [("fp16", 0.9995, 1e-4), ("int8", 0.9995, 1e-4),
                                                      ("int8-coarse", 0.99, 1e-3)])
def test_round_trip_shapes_and_fidelity(name, least_cosine, most_kl):
    codec = get_codec(name)
    feat, att, idx = _targets()
    specs = codec.field_specs(TargetShape(49, 32, 4, 5))
    fields = codec.encode(feat, att, idx)
    for k, spec in specs.items():
        assert str(fields[k].dtype) == spec.dtype and fields[k].shape[1:] == spec.shape
    f = fidelity(codec, feat, att, idx, tau=1.8)
    assert f["feature_cosine"] >= least_cosine and f["att_kl"] < most_kl


def test_int8_is_half_the_bytes_and_keeps_constant_channels():
    shape = TargetShape(196, 768, 12, 15)
    fp16 = sum(s.nbytes() for s in get_codec("fp16").field_specs(shape).values())
    int8 = sum(s.nbytes() for s in get_codec("int8").field_specs(shape).values())
    assert int8 / fp16 < 0.52
    feat, att, idx = _targets()
    feat[:, :, 3] = 2.5  # a constant channel must decode exactly
    codec = get_codec("int8")
    dfeat, _, didx = codec.decode({k: torch.from_numpy(v) for k, v in codec.encode(feat, att, idx).items()})
    assert torch.allclose(dfeat[:, :, 3], torch.full_like(dfeat[:, :, 3], 2.5), atol=2e-3)
    assert torch.equal(didx, idx)


def test_unknown_codec():
    with pytest.raises(ValueError, match="unknown codec 'int4'"):
        get_codec("int4")


def _valid_manifest():
    return {
        "schema_version": 1,
        "base_model": {"name": "custom:vit_tiny_patch16_224", "sha256": "a" * 64, "arch": "vit_tiny_patch16_224",
                       "embed_dim": 8, "num_heads": 2, "depth": 2},
        "targets": {"num_patches": 16, "grid": [4, 4], "patch_size": 8, "dim": 8, "heads": 2, "topk": 3, "last_layers": 2,
                    "tau": 1.8},
        "views": {"count": 1, "seed": 0, "recipe": {"size": 32, "scale": [0.2, 1.0], "jpeg_quality": 95,
                                                    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}},
        "codec": {"name": "fp16", "fields": {"feat": {"dtype": "float16", "shape": [16, 8]}}},
        "format": {"name": "webdataset", "compressor": "zstd:3", "shard_size": 4},
        "source": {"path": "/data", "kind": "folder", "num_images": 4},
        "view_epochs": [{"index": 0, "num_samples": 4, "shards": [{"index": 0, "path": "ve000/shard-000000.tar", "num_samples": 4, "nbytes": 10, "sha256": "b" * 64}]}],
    }


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.pop("codec"), "missing field 'codec'"),
        (lambda m: m["targets"].__setitem__("dim", "8"), "'targets.dim' is str"),
        (lambda m: m.__setitem__("schema_version", 99), "schema_version 99"),
        (lambda m: m["view_epochs"][0]["shards"][0].__setitem__("path", "../../etc/passwd"), "plain relative path"),
        (lambda m: m["view_epochs"][0]["shards"][0].__setitem__("path", "/abs.tar"), "plain relative path"),
        (lambda m: m["view_epochs"][0]["shards"][0].__setitem__("sha256", "x"), r"shards\[0\].sha256' is str \"x\", expected 64 hex digits"),
        (lambda m: m["targets"].__setitem__("grid", [4, 0]), "'targets.grid' is list, expected"),
        (lambda m: m["targets"].__setitem__("tau", float("nan")), "'targets.tau' is float NaN, expected positive number"),
        (lambda m: m["format"].__setitem__("name", "parquet"), "'format.name' is 'parquet', expected one of"),
        (lambda m: m["codec"]["fields"]["feat"].__setitem__("dtype", "object"), "codec.fields"),
        (lambda m: m["view_epochs"][0].__setitem__("num_samples", 5), "view_epochs\\[0\\].num_samples is int 5, its shards hold 4"),
        (lambda m: m.__setitem__("manifest_sha256", 7), "'manifest_sha256' is int 7, expected 64 hex digits"),
        (lambda m: m["codec"]["fields"]["feat"].__setitem__("dtype", "object!"), "codec.fields.feat"),
        (lambda m: m["view_epochs"][0].__setitem__("index", 3), "has index 3"),
        (lambda m: m["codec"]["fields"]["feat"].__setitem__("compress", True), "with 'compress': false for a field stored"),
        (lambda m: m["codec"]["fields"]["feat"].__setitem__("compress", "no"), "codec.fields.feat"),
    ],
)
def test_manifest_errors_name_the_field(edit, match):
    m = _valid_manifest()
    Manifest.from_json(copy.deepcopy(m), Path("."), "m")
    edit(m)
    with pytest.raises(ManifestError, match=match):
        Manifest.from_json(m, Path("."), "m")


# Any edit of a real manifest (hypothesis): tests/test_faults_inputs.py.


def test_a_field_stored_uncompressed_round_trips_through_the_manifest():
    m = _valid_manifest()
    assert Manifest.from_json(copy.deepcopy(m), Path("."), "m").fields["feat"].compress  # no flag: compressed
    m["codec"]["fields"]["feat"]["compress"] = False
    man = Manifest.from_json(copy.deepcopy(m), Path("."), "m")
    assert not man.fields["feat"].compress
    assert man.to_json()["codec"]["fields"] == m["codec"]["fields"]


def test_cache_identity_of_an_old_manifest_takes_the_legacy_values():
    """Keys that caches built before them lack read as what those caches were built with."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from tec_cache.format.identity import LEGACY_INPUT_MEAN, LEGACY_INPUT_STD, CacheIdentity
    from tec_cache.format.manifest import LEGACY_RESIZE

    assert (LEGACY_INPUT_MEAN, LEGACY_INPUT_STD) == (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
    ident = CacheIdentity.of(Manifest.from_json(_valid_manifest(), Path("."), "m"))
    assert (ident.input_mean, ident.input_std, ident.num_prefix_tokens) == (LEGACY_INPUT_MEAN, LEGACY_INPUT_STD, 1)
    assert (ident.first_view, ident.resize, ident.source_fingerprint) == (0, LEGACY_RESIZE, None)
    assert ident.mismatch(ident) == []
    m = _valid_manifest()
    m["views"]["seed"], m["base_model"]["input_mean"] = 3, [0.5, 0.5, 0.5]
    other = CacheIdentity.of(Manifest.from_json(m, Path("."), "m"))
    assert other.mismatch(ident) == [("base_model.input_mean", [0.5, 0.5, 0.5], list(LEGACY_INPUT_MEAN)),
                                     ("views.seed", 3, 0)]


def test_a_field_shape_no_view_can_have_is_refused_before_anything_is_allocated() -> None:
    """An edited manifest naming a field of gigabytes a view (or a negative size) is refused by name,
    not handed to a reader that would allocate it."""
    from tec_cache.format.schema import FieldSpec, check_specs

    with pytest.raises(ValueError, match=r"field 'feat_q': shape \[160000, 160000\] is 25,600,000,000 bytes a view"):
        check_specs({"feat_q": FieldSpec("uint8", (160000, 160000))})
    with pytest.raises(ValueError, match=r"field 'idx': shape \[-3, -1\] has no elements"):
        check_specs({"idx": FieldSpec("int16", (-3, -1))})
    assert check_specs({"feat": FieldSpec("float16", (1369, 1536))})  # a ViT-g/14 at 518 px

"""Codecs keep what the losses see; manifests are validated field by field."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tec_cache.codecs import TargetShape, fidelity, get_codec
from tec_cache.manifest import ManifestError, validate_manifest


def _targets(B=4, L=49, D=32, H=4, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Channels with their own offsets and scales, and a few outlier channels, as ViT features have.
    scale = torch.rand(D, generator=g) * 3 + 0.1
    scale[:2] *= 40
    feat = torch.randn(B, L, D, generator=g) * scale + torch.randn(D, generator=g) * 5
    att = torch.randn(B, k + 1, H, L, generator=g) * 3
    idx = torch.stack([torch.randperm(L, generator=g)[:k] for _ in range(B)])
    return feat, att, idx


@pytest.mark.parametrize("name", ["fp16", "int8"])
def test_round_trip_shapes_and_fidelity(name):
    codec = get_codec(name)
    feat, att, idx = _targets()
    specs = codec.field_specs(TargetShape(49, 32, 4, 5))
    fields = codec.encode(feat, att, idx)
    for k, spec in specs.items():
        assert str(fields[k].dtype) == spec.dtype and fields[k].shape[1:] == spec.shape
    f = fidelity(codec, feat, att, idx, tau=1.8)
    assert f["feature_cosine"] >= 0.9995 and f["att_kl"] < 1e-4


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
        "base_model": {"sha256": "a" * 64, "arch": "vit_tiny_patch16_224"},
        "targets": {"num_patches": 16, "grid": [4, 4], "dim": 8, "heads": 2, "topk": 3, "last_layers": 2, "tau": 1.8},
        "views": {"count": 1, "seed": 0, "recipe": {"size": 32}},
        "codec": {"name": "fp16", "fields": {"feat": {"dtype": "float16", "shape": [16, 8]}}},
        "format": {"name": "webdataset", "compressor": "zstd:3", "shard_size": 4},
        "source": {"num_images": 4},
        "view_epochs": [{"index": 0, "shards": [{"index": 0, "path": "ve000/shard-000000.tar", "num_samples": 4, "nbytes": 10, "sha256": "b" * 64}]}],
    }


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.pop("codec"), "missing field 'codec'"),
        (lambda m: m["targets"].__setitem__("dim", "8"), "'targets.dim' is str"),
        (lambda m: m.__setitem__("schema_version", 99), "schema_version 99"),
        (lambda m: m["view_epochs"][0]["shards"][0].__setitem__("path", "../../etc/passwd"), "plain relative path"),
        (lambda m: m["view_epochs"][0]["shards"][0].__setitem__("path", "/abs.tar"), "plain relative path"),
        (lambda m: m["view_epochs"][0]["shards"][0].__setitem__("sha256", "x"), "malformed sha256"),
        (lambda m: m["codec"]["fields"]["feat"].__setitem__("dtype", "object!"), "codec.fields.feat"),
        (lambda m: m["view_epochs"][0].__setitem__("index", 3), "has index 3"),
    ],
)
def test_manifest_errors_name_the_field(edit, match):
    m = _valid_manifest()
    validate_manifest(copy.deepcopy(m), "m")
    edit(m)
    with pytest.raises(ManifestError, match=match):
        validate_manifest(m, "m")


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_malformed_manifests_fail_cleanly(data):
    """Any value anywhere replaced by arbitrary JSON: valid or ManifestError, never a crash."""
    m = _valid_manifest()
    paths = [p for p in _paths(m) if p]
    path = data.draw(st.sampled_from(paths))
    value = data.draw(_json)
    target = m
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    try:
        validate_manifest(json.loads(json.dumps(m)), "m")
    except ManifestError:
        pass

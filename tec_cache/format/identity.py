"""A cache's identity: what must match for a build to resume or extend the cache already at --out.

Data flow: the build (tec_cache/build/builder.py) states the identity it would write (from its
options, the base model's facts and the source), ``CacheIdentity.of`` reads the existing cache's
from its manifest, a key that older caches lack taking the value those caches were built with, and
``mismatch`` names every difference. Anything else of a manifest (view count, stats, the tool's
version) may change from one run to the next.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tec_cache.format.manifest import LEGACY_RESIZE, Manifest

__all__ = ["LEGACY_INPUT_MEAN", "LEGACY_INPUT_STD", "LEGACY_PREFIX_TOKENS", "CacheIdentity"]

# What caches built before timm/hub bases lack in base_model: their bases saw ImageNet's
# normalisation (timm's IMAGENET_DEFAULT_MEAN/STD, pinned by tests/test_codecs_manifest.py) and had
# one class token. (Those without views.first_view start at view 0; for views.recipe.resize see LEGACY_RESIZE.)
LEGACY_INPUT_MEAN = (0.485, 0.456, 0.406)
LEGACY_INPUT_STD = (0.229, 0.224, 0.225)
LEGACY_PREFIX_TOKENS = 1


def _at(key: str) -> Any:
    """A part of the identity, named in messages by its manifest key."""
    return field(metadata={"key": key})


def _given(extra: Mapping[str, Any], key: str, legacy: Any) -> Any:
    """``extra[key]`` (a JSON list as a tuple), or ``legacy`` when the manifest has none."""
    value = extra.get(key)
    if value is None:
        return legacy
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class CacheIdentity:
    """What must not change between a build and its resume or extension (in the order messages list it)."""

    base_model_sha256: str = _at("base_model.sha256")
    base_model_arch: str = _at("base_model.arch")
    input_mean: tuple[float, ...] = _at("base_model.input_mean")
    input_std: tuple[float, ...] = _at("base_model.input_std")
    num_prefix_tokens: int = _at("base_model.num_prefix_tokens")
    topk: int = _at("targets.topk")
    last_layers: int = _at("targets.last_layers")
    num_patches: int = _at("targets.num_patches")
    seed: int = _at("views.seed")
    first_view: int = _at("views.first_view")
    size: int = _at("views.recipe.size")
    jpeg_quality: int = _at("views.recipe.jpeg_quality")
    resize: str = _at("views.recipe.resize")
    codec: str = _at("codec.name")
    format: str = _at("format.name")
    compressor: str = _at("format.compressor")
    shard_size: int = _at("format.shard_size")
    source_fingerprint: str | None = _at("source.fingerprint")  # None: a manifest that records none

    @staticmethod
    def of(man: Manifest) -> CacheIdentity:
        """The identity of an existing cache, from its manifest."""
        bm, views, recipe = man.base_model, man.views, man.views.recipe
        return CacheIdentity(
            base_model_sha256=bm.sha256, base_model_arch=bm.arch,
            input_mean=_given(bm.extra, "input_mean", LEGACY_INPUT_MEAN),
            input_std=_given(bm.extra, "input_std", LEGACY_INPUT_STD),
            num_prefix_tokens=_given(bm.extra, "num_prefix_tokens", LEGACY_PREFIX_TOKENS),
            topk=man.targets.topk, last_layers=man.targets.last_layers, num_patches=man.targets.num_patches,
            seed=views.seed, first_view=_given(views.extra, "first_view", 0), size=recipe.size, jpeg_quality=recipe.jpeg_quality,
            resize=_given(recipe.extra, "resize", LEGACY_RESIZE), codec=man.codec.name, format=man.format.name, compressor=man.format.compressor,
            shard_size=man.format.shard_size, source_fingerprint=_given(man.source.extra, "fingerprint", None),
        )

    def mismatch(self, wanted: CacheIdentity) -> list[tuple[str, Any, Any]]:
        """(manifest key, this cache's value, the wanted value) of every part that differs."""
        out = []
        for f in dataclasses.fields(self):
            have, want = getattr(self, f.name), getattr(wanted, f.name)
            if have != want:
                out.append((f.metadata["key"], _shown(have), _shown(want)))
        return out


def _shown(value: Any) -> Any:
    """A value as the manifest writes it (a tuple as a JSON list), for messages."""
    return list(value) if isinstance(value, tuple) else value

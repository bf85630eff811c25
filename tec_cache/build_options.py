"""The options of ``tec-cache build`` resolved into one BuildConfig.

Data flow: flags (None: not given) + the --pipeline preset's [cache] table --> TargetRecipe (the
base model and its targets, shared with online mode) + BuildConfig --validate--> build.build_cache.
Flags win over the preset; the preset's ``cache_name`` gives the default --out.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from tec_cache.basemodels import RECIPE_KEYS, TargetRecipe
from tec_cache.build import BuildConfig

# BuildConfig fields a preset does not set: where this build writes, how it reports, and the
# recipe, which it sets through its own keys.
_NOT_IN_PRESET = {"out", "spec", "strict", "dry_run"}
CACHE_TABLE_KEYS = frozenset({f.name for f in fields(BuildConfig)} - _NOT_IN_PRESET | set(RECIPE_KEYS) | {"cache_name"})


def cache_table(pipeline: str) -> dict[str, Any]:
    """The preset's [cache] table, every key checked against the build's options."""
    from tec_cache.presets import load_pipeline

    return load_pipeline(pipeline).table("cache", set(CACHE_TABLE_KEYS))


def build_config(flags: dict[str, Any], pipeline: str | None = None) -> BuildConfig:
    """The checked BuildConfig of one ``tec-cache build``; ValueError names the option."""
    table = cache_table(pipeline) if pipeline is not None else {}
    cache_name = table.pop("cache_name", None)
    values = {**table, **{k: v for k, v in flags.items() if v is not None}}
    if values.get("out") is None:
        if not cache_name:
            raise ValueError("--out is required: the cache folder to create (or a --pipeline whose preset names a cache_name)")
        values["out"] = Path("caches") / cache_name
    if values.get("data") is None:
        raise ValueError("--data is required: an image folder or a folder of .tar shards")
    if values.get("checkpoint") is None:
        raise ValueError("--checkpoint is required: the base model's weights are never downloaded")
    recipe = TargetRecipe(**{k: values.pop(k) for k in RECIPE_KEYS if k in values})
    for key in ("data", "out", "checkpoint"):
        values[key] = Path(values[key])
    cfg = BuildConfig(spec=recipe.resolve(), **values)
    cfg.validate()
    return cfg

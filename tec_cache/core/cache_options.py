"""The [cache] table's schema: what a pipeline may set for ``tec-cache build``, declared once.

Data flow: pipelines/NAME.toml [cache] --> CacheTable (recipe keys -> TargetRecipe, the build's
options -> CacheOptions, ``cache_name``) --> ``tec-cache build`` (BuildConfig extends CacheOptions)
and ``tec-train`` (``pipelines NAME``, online mode's recipe). Both stages import it, so it sits in
the core and pulls in nothing of the stage-1 application; CacheOptions itself needs no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tec_cache.core.basemodels import TargetRecipe
from tec_cache.core.images import SOURCE_HELP
from tec_cache.runtime.config import (
    POSITIVE_INT,
    SEED,
    WORKERS,
    NestedConfig,
    field_names,
    group,
    in_range,
    nested_config,
    option,
)


@dataclass
class CacheOptions:
    """The options of ``tec-cache build`` that a pipeline's [cache] table may set (all but the recipe)."""

    data: Path | str | None = option(None, SOURCE_HELP)
    checkpoint: Path | None = option(None, "Base-model weights: a local file (MAE, iBOT, DINO, state dict, .safetensors) "
                                     "or a URL (http(s)://, s3://, gs://, ..., hf-hub:ORG/REPO, optionally @REVISION), fetched once "
                                     "into $TEC_HOME/weights. Not needed for a registry --basemodel (its official file "
                                     "is fetched) nor for timm:NAME / hf-hub:ORG/REPO (timm fetches its own).")
    checkpoint_sha256: str | None = option(None, "sha256 the weights file must have (a --checkpoint URL or path, or "
                                           "a registry base model's official file)")
    views: int = option(1, "View-epochs K to hold (a larger K later adds only the missing ones)", check=POSITIVE_INT)
    codec: str = option("int8", "fp16 (reference precision) | int8 (half the bytes) | int8-coarse (27% fewer "
                        "bytes per view than int8, feature cosine 0.993)")
    format: str = option("webdataset", "webdataset | zarr")
    compressor: str = option("auto", "zstd:LEVEL | none | auto (an existing cache's own, else zstd:1: as small as "
                             "zstd:3 for int8 and fp16, 13% smaller and 5x faster for int8-coarse)")
    shard_size: int = option(256, "Views per shard", check=POSITIVE_INT)
    seed: int = option(0, "Seed of the view augmentations", check=SEED)
    first_view: int = option(0, "View index of view-epoch 0 (view-epoch v holds view first_view + v of every image): a "
                             "validation cache of the training images at views a training cache of K < first_view "
                             "view-epochs does not hold", check=SEED)
    batch_size: int = option(64, "Views per base-model forward", check=POSITIVE_INT)
    num_workers: int = option(4, "Decode/crop worker processes", check=WORKERS)
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    jpeg_quality: int = option(95, "Quality of the stored view JPEGs", check=in_range(1, 100))
    view_device: str = option("auto", "Where views are cut and JPEG round-tripped: workers (CPU processes) | device "
                              "(the base model's device, batched; on a GPU with nvJPEG) | auto (device on CUDA, "
                              "else workers)")
    resize: str = option("auto", "How views are resized: torch-bicubic-u8 (CPU) | torch-bicubic-f32 (any device) | "
                         "pil-bicubic (caches built before the resizer was recorded) | auto (an existing cache's own; "
                         "else u8 in workers, f32 on the device)")


@nested_config
class CacheTable(NestedConfig):
    """A pipeline's [cache] table: the target recipe, the build's options and the cache's name."""

    cache_name: str | None = option(None, "The cache's folder under caches/: the default --out of tec-cache build and "
                                    "--cache of tec-train run")
    recipe: TargetRecipe = group(TargetRecipe)
    build: CacheOptions = group(CacheOptions)

    def resolved(self) -> dict[str, Any]:
        """Every key of the table: the recipe through the registry, the build's options, the name."""
        spec = self.recipe.resolve()
        recipe = {k: getattr(spec, "name" if k == "basemodel" else k) for k in field_names(TargetRecipe)}
        return {**recipe, **{k: getattr(self.build, k) for k in field_names(CacheOptions)}, "cache_name": self.cache_name}


CACHE_TABLE_KEYS = frozenset(field_names(CacheTable))

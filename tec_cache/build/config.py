"""The options of ``tec-cache build``: each declared once (default, bounds, help) on BuildConfig,
and resolved from flags and a preset's [cache] table.

Data flow: defaults < the --pipeline preset's [cache] table < flags (None: not given) --config.resolve-->
CacheTable (core/cache_options: the target recipe, shared with online mode, and the options a
table may set) --> BuildConfig --validate--> build.build_cache. The preset's ``cache_name`` gives the
default --out. Stage 2 reads the [cache] schema from core/cache_options, never from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tec_cache.core.basemodels import BaseModelSpec, build_model, resolve_weights
from tec_cache.core.cache_options import CACHE_TABLE_KEYS, CacheOptions, CacheTable
from tec_cache.core.codecs import get_codec
from tec_cache.core.views import RESIZERS
from tec_cache.format import FORMATS, parse_compressor
from tec_cache.format.remote import is_remote
from tec_cache.runtime.config import check_fields, flat_values, option, resolve
from tec_cache.runtime.dist import dist_info, resolve_device

VIEW_DEVICES = ("auto", "workers", "device")
# A new cache's compressor: at level 1 zstd stores int8 and fp16 targets within 0.2% of level 3's
# bytes, and int8-coarse's feature codes 13% smaller at a fifth of the time (benchmarks/bench_fields.py).
DEFAULT_COMPRESSOR = "zstd:1"


@dataclass(kw_only=True)
class BuildConfig(CacheOptions):
    """Every option of ``tec-cache build``: a [cache] table's (CacheOptions), where it writes, how it
    reports, and the resolved target recipe (``spec``, from a TargetRecipe)."""

    out: Path = option(help="Cache folder (created; re-running resumes or extends it).")
    spec: BaseModelSpec = option(help="The resolved target recipe.")
    fetched: dict[str, Any] | None = option(None, "Where fetched weights came from (URL, size), for the manifest.")
    strict: bool = option(False, "Fail on the first unreadable image instead of skipping it.")
    dry_run: bool = option(False, "Print the size estimate and write nothing.")

    def validate(self) -> None:
        """Option checks before any work; ValueError names the option and what it expects."""
        check_fields(self, ("views", "shard_size", "seed", "first_view", "batch_size"))
        if self.data is None:
            raise ValueError("--data is required: an image folder or a folder of .tar shards")
        if not is_remote(self.data) and not Path(self.data).exists():
            raise ValueError(f"--data: no such file or folder {self.data} (expected an image folder or .tar shards)")
        if self.checkpoint is None:
            if self.spec.source is None:
                raise ValueError(f"--checkpoint is required for {self.spec.name}: its weights file (a path or a URL)")
        elif not Path(self.checkpoint).is_file():
            raise ValueError(f"--checkpoint: no such file {self.checkpoint} (expected the base model's weights file)")
        resolve_device(self.device, dist_info())  # --device: a name this machine has
        check_fields(self, ("num_workers", "jpeg_quality"))
        if self.view_device not in VIEW_DEVICES:
            raise ValueError(f"--view-device: expected one of {list(VIEW_DEVICES)}, got {self.view_device!r}")
        if self.resize != "auto" and self.resize not in RESIZERS:
            raise ValueError(f"--resize: expected auto or one of {list(RESIZERS)}, got {self.resize!r}")
        if self.format not in FORMATS:
            raise ValueError(f"--format: unknown format {self.format!r}; expected one of {list(FORMATS)}")
        try:
            get_codec(self.codec)
        except ValueError as e:
            raise ValueError(f"--codec: {e}") from None
        try:
            if self.compressor != "auto":
                parse_compressor(self.compressor)
        except ValueError as e:
            raise ValueError(f"--compressor: {e}") from None
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out: {self.out} exists and is not a folder")
        # --arch/--depth/--last-layers against the architecture, on the meta device: no memory, no weights.
        with torch.device("meta"):
            build_model(self.spec)


def build_config(flags: dict[str, Any], pipeline: str | None = None) -> BuildConfig:
    """The checked BuildConfig of one ``tec-cache build``: the defaults < the pipeline's [cache]
    table < the flags given (None: not given); ValueError names the option."""
    from tec_cache.runtime.pipelines import load_pipeline

    table = load_pipeline(pipeline).table("cache", CACHE_TABLE_KEYS) if pipeline is not None else {}
    given = resolve(CacheTable, table=table, flags={k: v for k, v in flags.items() if k in CACHE_TABLE_KEYS})
    out = flags.get("out")
    if out is None:
        if not given.cache_name:
            raise ValueError("--out is required: the cache folder to create (or a --pipeline that names a cache_name)")
        out = Path("caches") / given.cache_name
    opts = given.build
    if opts.data is None:
        raise ValueError("--data is required: an image folder or a folder of .tar shards")
    spec = given.recipe.resolve()
    # A URL (or a registry name without --checkpoint) is fetched here, once, before any work.
    checkpoint, fetched = resolve_weights(spec, opts.checkpoint, opts.checkpoint_sha256)
    cfg = BuildConfig(**{**flat_values(opts), "data": opts.data if is_remote(opts.data) else Path(opts.data),
                         "checkpoint": checkpoint}, out=Path(out), spec=spec, fetched=fetched,
                      strict=bool(flags.get("strict")), dry_run=bool(flags.get("dry_run")))
    cfg.validate()
    return cfg

"""Every tec-train command's config, resolved one way: defaults < pipeline table < stored run < flags.

Data flow: the flags given (None: not given) + the --pipeline's table (its schema from
pipeline_tables) + the run dir's stored options (its latest usable checkpoint, when resuming or
extending) --tec_cache.runtime.config.resolve--> TrainConfig (run), FinetuneConfig (finetune) or
EvalConfig (knn, linear). A flag that contradicts the stored run is refused here, naming it, before
any model is built.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tec_cache.runtime.config import resolve
from tec_cache.runtime.pipelines import Pipeline, load_pipeline

from .eval_config import EvalConfig
from .finetune_config import FinetuneConfig
from .harness.checkpoints import usable_checkpoint
from .harness.errors import CheckpointError, ResumeError
from .harness.run_dir import RunKind, check_options, read_checkpoint
from .pipeline_tables import REFERENCE_KEYS, table_keys
from .train_config import ONLINE_RECIPE, TrainConfig

# The pipeline's [cache] table (as tec-cache build takes it) as online-mode options of tec-train run:
# the recipe under its online names, the view geometry as the student's, and the cache's resizer.
ONLINE_FROM_RECIPE = {**{k: name for k, (name, _) in ONLINE_RECIPE.items()},
                      "img_size": "img_size", "patch_size": "patch_size", "resize": "resize"}


def given(flags: dict[str, Any]) -> dict[str, Any]:
    """The flags a user gave (None: not given), paths as the strings the configs hold."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in flags.items() if v is not None}


def stored_options(run_dir: str, kind: RunKind, flags: dict[str, Any]) -> dict[str, Any]:
    """The options stored with the run dir's latest usable checkpoint ({} for a new run); ResumeError
    names the first flag that contradicts them (a larger --epochs extends the run)."""
    try:
        # Quietly: the loop's own resume names what it skips.
        ckpt = usable_checkpoint(Path(run_dir), kind.checkpoints)
    except CheckpointError as e:
        raise ResumeError(str(e)) from e
    if ckpt is None:
        return {}
    stored: dict[str, Any] = read_checkpoint(ckpt, kind).options
    check_options(stored, flags, ckpt, kind)
    return stored


def _reference_world(pipe: Pipeline, table: dict[str, Any], world_size: int, say: Callable[[str], None]) -> None:
    """A run table's ``world_size`` (the reference's process count) is compared, never an option."""
    for key in REFERENCE_KEYS:
        ref = table.pop(key, None)
        if ref is not None and ref != world_size:
            say(f"note: pipeline {pipe.name} was made for {ref} processes, this run has {world_size}; "
                "the lr follows the effective batch (--blr x batch x accum x processes / 256)")


def run_config(run_dir: str, flags: dict[str, Any], pipeline: str | None = None, *, online: bool = False,
               world_size: int = 1, say: Callable[[str], None] = print) -> TrainConfig:
    """``tec-train run``'s config. The pipeline gives its [pretrain] table ([base] with --objective mae)
    and --cache as caches/<its cache_name>; with ``online``, its [cache] table's target recipe runs
    inside the step instead of a cache."""
    from .train import PRETRAIN_RUN

    flags = given(flags)
    if online and pipeline is None:
        raise ValueError("--online: takes the target recipe of a --pipeline; without one, name the base model "
                         "with --online-basemodel NAME or --arch TIMM_NAME")
    table: dict[str, Any] = {}
    if pipeline is not None:
        pipe = load_pipeline(pipeline)
        name = "base" if flags.get("objective") == "mae" else "pretrain"
        table = pipe.table(name, table_keys(name))
        _reference_world(pipe, table, world_size, say)
        if online:
            recipe = pipe.table("cache", table_keys("cache"))
            table.update({option: recipe[key] for key, option in ONLINE_FROM_RECIPE.items() if key in recipe})
        elif name == "pretrain" and not any(k in {**table, **flags} for k in ("cache", "online_basemodel", "arch")):
            cache_name = pipe.raw.get("cache", {}).get("cache_name")
            if cache_name:
                table["cache"] = str(Path("caches") / cache_name)
    flags["run_dir"] = run_dir
    return resolve(TrainConfig, table=table, stored=stored_options(run_dir, PRETRAIN_RUN, flags), flags=flags)


def finetune_config(run_dir: str, flags: dict[str, Any], pipeline: str | None = None, *, world_size: int = 1,
                    say: Callable[[str], None] = print) -> FinetuneConfig:
    """``tec-train finetune``'s config, from the pipeline's [finetune] table."""
    from .finetune import FINETUNE_RUN

    flags = given(flags)
    table: dict[str, Any] = {}
    if pipeline is not None:
        pipe = load_pipeline(pipeline)
        table = pipe.table("finetune", table_keys("finetune"))
        _reference_world(pipe, table, world_size, say)
    flags["run_dir"] = run_dir
    return resolve(FinetuneConfig, table=table, stored=stored_options(run_dir, FINETUNE_RUN, flags), flags=flags)


def eval_config(flags: dict[str, Any], pipeline: str | None = None) -> EvalConfig:
    """``tec-train knn`` and ``linear``'s checked config, from the pipeline's [eval] table."""
    table = load_pipeline(pipeline).table("eval", table_keys("eval")) if pipeline is not None else {}
    cfg = resolve(EvalConfig, table=table, flags=given(flags))
    cfg.validate()
    return cfg

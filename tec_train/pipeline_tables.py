"""Every table of a pipeline checked against the config it feeds, and the pipeline fully resolved.

Data flow: runtime.pipelines.load_pipeline (``extends`` chain merged) --> per table: [cache] -> CacheTable (the
target recipe, the build's options), [pretrain] and [base] -> TrainConfig, [finetune] -> FinetuneConfig, [eval] ->
EvalConfig, [data] -> DataSubsets --> ``tec-train pipelines NAME`` (every value of the row, defaults
included) and the tests that hold the paper's numbers.
"""
from __future__ import annotations

from typing import Any

from tec_cache.core.cache_options import CacheTable
from tec_cache.runtime.config import field_names, flat_fields
from tec_cache.runtime.pipelines import Pipeline, PipelineError

from .eval_config import DataSubsets, EvalConfig
from .finetune_config import FinetuneConfig
from .train_config import TrainConfig

TOP_LEVEL = ("name", "expected_top1")
# The reference's process count: a preset key of the run tables that is compared, never an option.
REFERENCE_KEYS = ("world_size",)
# Every table of a pipeline -> the config that declares its keys: the one place a table's schema is named.
TABLE_CONFIGS: dict[str, type] = {"cache": CacheTable, "pretrain": TrainConfig, "base": TrainConfig, "finetune": FinetuneConfig,
                                  "eval": EvalConfig, "data": DataSubsets}
# Fields a preset never sets: where a run writes, and what a command gets as its argument.
_NOT_IN_PRESET = {"run_dir", "source"}


def table_keys(table: str) -> set[str]:
    """The keys a pipeline's ``table`` may set."""
    keys = set(field_names(TABLE_CONFIGS[table])) - _NOT_IN_PRESET
    return keys | set(REFERENCE_KEYS) if table in ("pretrain", "base", "finetune") else keys


def check_pipeline(pipe: Pipeline) -> None:
    """Every key of every table is an option of the config it feeds; PipelineError names the file,
    the table and the key. Values are checked by the command that uses them (and by the tests)."""
    for key, value in pipe.raw.items():
        if isinstance(value, dict):
            if key not in TABLE_CONFIGS:
                raise PipelineError(f"--pipeline: {pipe.path}: unknown table [{key}] (expected {sorted(TABLE_CONFIGS)})")
            pipe.table(key, table_keys(key))
        elif key not in TOP_LEVEL:
            raise PipelineError(f"--pipeline: {pipe.path}: unknown key {key!r} (expected {list(TOP_LEVEL)} and tables)")


def resolved_tables(pipe: Pipeline) -> dict[str, dict[str, Any]]:
    """Each table with every option it feeds: the preset's value, else the config's default (the
    base-model recipe resolved through the registry), so a reader sees the whole row."""
    check_pipeline(pipe)
    out: dict[str, dict[str, Any]] = {}
    for name, table in pipe.raw.items():
        if not isinstance(table, dict):
            continue
        if name == "cache":
            out[name] = CacheTable(**table).resolved()
            continue
        cls = TABLE_CONFIGS[name]
        defaults = {f.name: f.default for f in flat_fields(cls) if f.name not in _NOT_IN_PRESET}
        out[name] = {**defaults, **table}
    return out

"""Named pipelines: TOML presets that carry every option of one row of the paper (or a CPU run).

Data flow: ``pipelines/NAME.toml`` --load_pipeline--> Pipeline --section + merge_options--> the
options of ``tec-cache build`` ([cache]), ``tec-train run`` ([pretrain]; [base] with
``--objective mae``) and ``tec-train finetune`` ([finetune]), with every flag given on the
command line taking precedence over the preset's value.

A preset is found by name in, in order: the folder in ``$TEC_PIPELINES``, ``./pipelines`` and the
``pipelines/`` folder of this source tree; ``--pipeline`` also takes a path to a .toml file.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PIPELINES_ENV = "TEC_PIPELINES"
_TREE_DIR = Path(__file__).resolve().parents[1] / "pipelines"


class PipelineError(ValueError):
    """A preset that cannot be found or names an option the command does not have."""


@dataclass(frozen=True)
class Pipeline:
    name: str
    path: Path
    raw: dict[str, Any]

    def section(self, name: str) -> dict[str, Any]:
        """A table of the preset ([cache], [pretrain], ...); PipelineError when it has none."""
        table = self.raw.get(name)
        if not isinstance(table, dict):
            have = sorted(k for k, v in self.raw.items() if isinstance(v, dict))
            raise PipelineError(f"--pipeline {self.name}: {self.path} has no [{name}] table (it has {have})")
        return dict(table)

    def summary(self) -> dict[str, Any]:
        """One line of ``tec-train pipelines``."""
        cache, pre, base = self.raw.get("cache", {}), self.raw.get("pretrain", {}), self.raw.get("base", {})
        return {
            "name": self.name,
            "base model": cache.get("basemodel") or (f"MAE {base.get('model')} (made by --objective mae)" if base else cache.get("arch", "-")),
            "student": pre.get("model", "-") + (f" depth {pre['depth']}" if "depth" in pre else ""),
            "TEC epochs": str(pre.get("epochs", "-")),
            "cache": cache.get("cache_name", "-"),
            "paper top-1": str(self.raw.get("expected_top1", "-")),
        }


def search_dirs() -> list[Path]:
    dirs = []
    if os.environ.get(PIPELINES_ENV):
        dirs.append(Path(os.environ[PIPELINES_ENV]))
    dirs += [Path.cwd() / "pipelines", _TREE_DIR]
    seen, out = set(), []
    for d in dirs:
        key = d.resolve()
        if key not in seen and d.is_dir():
            seen.add(key)
            out.append(d)
    return out


def _read(path: Path) -> Pipeline:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise PipelineError(f"--pipeline: cannot read {path}: {e}") from None
    name = raw.get("name", path.stem)
    if not isinstance(name, str):
        raise PipelineError(f"--pipeline: {path}: 'name' must be a string")
    return Pipeline(name=name, path=path, raw=raw)


def list_pipelines() -> list[Pipeline]:
    """Every preset on the search path; a name found twice is taken from the first folder."""
    found: dict[str, Pipeline] = {}
    for d in search_dirs():
        for p in sorted(d.glob("*.toml")):
            if p.stem not in found:
                found[p.stem] = _read(p)
    return sorted(found.values(), key=lambda p: p.name)


def load_pipeline(name_or_path: str) -> Pipeline:
    """A preset by name (see the module docstring for where it is looked for) or by .toml path."""
    as_path = Path(name_or_path)
    if as_path.suffix == ".toml" or os.sep in name_or_path:
        if not as_path.is_file():
            raise PipelineError(f"--pipeline: no such preset file {as_path}")
        return _read(as_path)
    for d in search_dirs():
        p = d / f"{name_or_path}.toml"
        if p.is_file():
            return _read(p)
    known = ", ".join(p.name for p in list_pipelines()) or "none"
    raise PipelineError(f"--pipeline: unknown pipeline {name_or_path!r}; known: {known} (see `tec-train pipelines`)")


def merge_options(preset: dict[str, Any], given: dict[str, Any], allowed: set[str], where: str) -> dict[str, Any]:
    """The preset's values with the command line's on top; a preset key the command does not take
    is an error naming it, so a typo in a preset never silently falls back to a default."""
    unknown = sorted(set(preset) - allowed)
    if unknown:
        raise PipelineError(f"--pipeline: {where} sets {unknown}, which this command does not take "
                            f"(its options: {sorted(allowed)})")
    return {**preset, **{k: v for k, v in given.items() if v is not None}}

"""Named pipelines: TOML presets that carry every option of one row of the paper (or a CPU run).

Data flow: ``pipelines/NAME.toml`` --load_pipeline--> Pipeline --table (keys checked)--> config.resolve --> the
options of ``tec-cache build`` ([cache]), ``tec-train run`` ([pretrain]; [base] with
``--objective mae``) and ``tec-train finetune`` ([finetune]), with every flag given on the
command line taking precedence over the preset's value.

A preset is found by name in, in order: the folder in ``$TEC_PIPELINES``, ``./pipelines`` and the
``pipelines/`` folder of this source tree; ``--pipeline`` also takes a path to a .toml file.

A preset states only what differs from its family: ``extends = "base/vitb.toml"`` (a path relative
to the preset's own file) takes every table of that file, and the preset's keys replace the base's
key by key. Family bases live in ``pipelines/base/``, so ``tec-train pipelines`` lists only presets
a command can run.
"""
from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PIPELINES_ENV = "TEC_PIPELINES"
_TREE_DIR = Path(__file__).resolve().parents[2] / "pipelines"


class PipelineError(ValueError):
    """A preset that cannot be found or names an option the command does not have."""


@dataclass(frozen=True)
class Pipeline:
    name: str
    path: Path
    raw: dict[str, Any]  # resolved: the bases' tables with this file's keys on top
    # (table, key) -> the file that set it, so an error names the file a reader has to edit.
    origin: dict[tuple[str, str], Path] = field(default_factory=dict)

    def section(self, name: str) -> dict[str, Any]:
        """A table of the preset ([cache], [pretrain], ...); PipelineError when it has none."""
        table = self.raw.get(name)
        if not isinstance(table, dict):
            have = sorted(k for k, v in self.raw.items() if isinstance(v, dict))
            raise PipelineError(f"--pipeline {self.name}: {self.path} has no [{name}] table (it has {have})")
        return dict(table)

    def where(self, table: str, keys: list[str] | None = None) -> str:
        """'FILE [table]' for error messages: the file(s) that set ``keys`` (default: this preset's)."""
        files = sorted({str(self.origin.get((table, k), self.path)) for k in keys or []}) or [str(self.path)]
        return f"{', '.join(files)} [{table}]"

    def table(self, name: str, allowed: Iterable[str], *, required: bool = True) -> dict[str, Any]:
        """A table whose keys are all in ``allowed`` (``required=False``: empty when the preset has
        none); PipelineError naming the file, the table and the keys otherwise, so a typo never
        silently falls back to a default. The one place a pipeline key is refused."""
        if not required and not isinstance(self.raw.get(name), dict):
            return {}
        section = self.section(name)
        allowed = set(allowed)
        unknown = sorted(set(section) - allowed)
        if unknown:
            raise PipelineError(f"--pipeline: {self.where(name, unknown)} sets {unknown}, which this command does not take "
                                f"(its options: {sorted(allowed)})")
        return section

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


def _toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise PipelineError(f"--pipeline: cannot read {path}: {e}") from None


def _resolve(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[tuple[str, str], Path]]:
    """The file's tables on top of its ``extends`` chain, and which file set each (table, key)."""
    if path.resolve() in chain:
        raise PipelineError(f"--pipeline: {path}: 'extends' loops back to itself through {[str(p) for p in chain]}")
    raw = _toml(path)
    base_ref = raw.pop("extends", None)
    merged: dict[str, Any] = {}
    origin: dict[tuple[str, str], Path] = {}
    if base_ref is not None:
        if not isinstance(base_ref, str):
            raise PipelineError(f"--pipeline: {path}: 'extends' must be a path to a .toml file, got {base_ref!r}")
        base = path.parent / base_ref
        if not base.is_file():
            raise PipelineError(f"--pipeline: {path}: extends {base_ref!r}, but there is no file {base}")
        merged, origin = _resolve(base, (*chain, path.resolve()))
        # A family base names no row: its name and paper number never pass to the preset.
        for key in ("name", "expected_top1"):
            merged.pop(key, None)
    for key, value in raw.items():
        if isinstance(value, dict):
            merged[key] = {**merged.get(key, {}), **value}
            origin.update({(key, k): path for k in value})
        else:
            merged[key] = value
    return merged, origin


def _read(path: Path) -> Pipeline:
    raw, origin = _resolve(path)
    name = raw.get("name", path.stem)
    if not isinstance(name, str):
        raise PipelineError(f"--pipeline: {path}: 'name' must be a string")
    return Pipeline(name=name, path=path, raw=raw, origin=origin)


def list_pipelines() -> list[Pipeline]:
    """Every preset on the search path; a name found twice is taken from the first folder."""
    found: dict[str, Pipeline] = {}
    for d in search_dirs():
        for p in sorted(d.glob("*.toml")):  # not base/: a family base is no runnable preset
            if p.stem not in found and not p.stem.startswith("_"):
                found[p.stem] = _read(p)
    return sorted(found.values(), key=lambda p: p.name)


def load_pipeline(name_or_path: str) -> Pipeline:
    """A preset by name (see the module docstring for where it is looked for) or by .toml path."""
    as_path = Path(name_or_path)
    if as_path.suffix == ".toml" or os.sep in name_or_path:
        if not as_path.is_file():
            raise PipelineError(f"--pipeline: no such pipeline file {as_path}")
        return _read(as_path)
    for d in search_dirs():
        p = d / f"{name_or_path}.toml"
        if p.is_file():
            return _read(p)
    known = ", ".join(p.name for p in list_pipelines()) or "none"
    raise PipelineError(f"--pipeline: unknown pipeline {name_or_path!r}; known: {known} (see `tec-train pipelines`)")

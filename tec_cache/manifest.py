"""The cache manifest: the one file that makes a folder of shards a cache.

Data flow: build writes shards (+ a sidecar per shard), then, last, ``manifest.json``; every
reader (inspect, verify, stage 2) starts from ``load_manifest`` and reads only the shards it
lists, each with its size and sha256. A folder without a valid manifest is not a cache.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tec_cache.faults import fault_point
from tec_cache.records import FieldSpec

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """The manifest is missing, malformed or does not fit what is asked of it."""


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (the directory entry, not only the file's bytes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary sibling, fsync, then rename: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    data = json.dumps(obj, indent=1, sort_keys=True).encode("utf-8")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fault_point("mid_json_write")
    os.replace(tmp, path)
    fsync_dir(path.parent)


def is_temporary(name: str) -> bool:
    """Names of half-written files: JSON temporaries above and shard writers' ``.tmp`` siblings."""
    return (name.startswith(".") and ".tmp-" in name) or name.endswith(".tmp") or name.endswith(".old")


@dataclass(frozen=True)
class ShardEntry:
    view_epoch: int
    index: int
    path: str  # relative to the cache root
    num_samples: int
    nbytes: int
    sha256: str


@dataclass
class Manifest:
    """A parsed, validated manifest. ``raw`` is the JSON object as stored."""

    root: Path
    raw: dict[str, Any]

    @property
    def format(self) -> str:
        return self.raw["format"]["name"]

    @property
    def compressor(self) -> str:
        return self.raw["format"]["compressor"]

    @property
    def codec(self) -> str:
        return self.raw["codec"]["name"]

    @property
    def fields(self) -> dict[str, FieldSpec]:
        return {k: FieldSpec.from_json(v) for k, v in self.raw["codec"]["fields"].items()}

    @property
    def num_view_epochs(self) -> int:
        return len(self.raw["view_epochs"])

    @property
    def targets(self) -> dict[str, Any]:
        return self.raw["targets"]

    def shards(self, view_epoch: int | None = None) -> list[ShardEntry]:
        out = []
        for ve in self.raw["view_epochs"]:
            if view_epoch is not None and ve["index"] != view_epoch:
                continue
            for s in ve["shards"]:
                out.append(ShardEntry(ve["index"], s["index"], s["path"], s["num_samples"], s["nbytes"], s["sha256"]))
        return out

    def shard_path(self, entry: ShardEntry) -> Path:
        return self.root / entry.path


# (json path, expected python type) checked on load; a hand-edited manifest fails here by name.
_REQUIRED: list[tuple[str, type | tuple[type, ...]]] = [
    ("schema_version", int),
    ("base_model", dict),
    ("base_model.sha256", str),
    ("base_model.arch", str),
    ("targets", dict),
    ("targets.num_patches", int),
    ("targets.grid", list),
    ("targets.dim", int),
    ("targets.heads", int),
    ("targets.topk", int),
    ("targets.last_layers", int),
    ("targets.tau", (int, float)),
    ("views", dict),
    ("views.count", int),
    ("views.seed", int),
    ("views.recipe", dict),
    ("views.recipe.size", int),
    ("codec", dict),
    ("codec.name", str),
    ("codec.fields", dict),
    ("format", dict),
    ("format.name", str),
    ("format.compressor", str),
    ("format.shard_size", int),
    ("source", dict),
    ("source.num_images", int),
    ("view_epochs", list),
]


def _lookup(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(dotted)
        obj = obj[part]
    return obj


def validate_manifest(raw: Any, where: str) -> None:
    """Structural checks; ManifestError names the field and what was expected."""
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    for dotted, typ in _REQUIRED:
        try:
            value = _lookup(raw, dotted)
        except KeyError:
            raise ManifestError(f"{where}: missing field {dotted!r}") from None
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ManifestError(f"{where}: field {dotted!r} is {type(value).__name__}, expected {getattr(typ, '__name__', typ)}")
    if raw["schema_version"] != SCHEMA_VERSION:
        raise ManifestError(f"{where}: schema_version {raw['schema_version']} is not supported (this tool reads {SCHEMA_VERSION})")
    for name, spec in raw["codec"]["fields"].items():
        try:
            fs = FieldSpec.from_json(spec)
        except Exception as e:  # noqa: BLE001
            raise ManifestError(f"{where}: codec.fields.{name} is not a valid dtype/shape ({e})") from None
        if any(s <= 0 for s in fs.shape):
            raise ManifestError(f"{where}: codec.fields.{name} has a non-positive size {list(fs.shape)}")
    seen: set[str] = set()
    for i, ve in enumerate(raw["view_epochs"]):
        if not isinstance(ve, dict) or not isinstance(ve.get("index"), int) or not isinstance(ve.get("shards"), list):
            raise ManifestError(f"{where}: view_epochs[{i}] must be an object with int 'index' and list 'shards'")
        if ve["index"] != i:
            raise ManifestError(f"{where}: view_epochs[{i}] has index {ve['index']}, expected {i}")
        for j, s in enumerate(ve["shards"]):
            ok = isinstance(s, dict) and all(
                isinstance(s.get(k), t) and not isinstance(s.get(k), bool)
                for k, t in (("index", int), ("path", str), ("num_samples", int), ("nbytes", int), ("sha256", str))
            )
            if not ok:
                raise ManifestError(f"{where}: view_epochs[{i}].shards[{j}] lacks index/path/num_samples/nbytes/sha256 of the right types")
            p = s["path"]
            if p.startswith("/") or "\\" in p or any(part in ("", "..", ".") for part in p.split("/")):
                raise ManifestError(f"{where}: view_epochs[{i}].shards[{j}].path {p!r} must be a plain relative path inside the cache")
            if p in seen:
                raise ManifestError(f"{where}: shard path {p!r} is listed twice")
            seen.add(p)
            if s["num_samples"] < 0 or s["nbytes"] < 0 or len(s["sha256"]) != 64:
                raise ManifestError(f"{where}: view_epochs[{i}].shards[{j}] has a negative count/size or a malformed sha256")


def load_manifest(root: Path) -> Manifest:
    """Read and validate ``root/manifest.json``; ManifestError says what is wrong."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{root} is not a cache: no {MANIFEST_NAME} (an interrupted build writes it last; re-run the build)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    validate_manifest(raw, str(path))
    return Manifest(root, raw)

"""The cache manifest: the one file that makes a folder of shards a cache.

Data flow: build writes shards (+ a sidecar per shard), then, last, ``manifest.json``; every
reader (inspect, verify, stage 2) starts from ``load_manifest`` and reads only the shards it
lists, each with its size and sha256. A folder without a valid manifest is not a cache.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tec_cache.faults import fault_point
from tec_cache.records import FieldSpec

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
# The manifest's sha256 over its own canonical JSON (this field left out): a hand edit shows.
DIGEST_FIELD = "manifest_sha256"


class ManifestError(ValueError):
    """The manifest is missing, malformed or does not fit what is asked of it."""


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (the directory entry, not only the file's bytes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any, fault: str = "json") -> None:
    """Write JSON to a temporary sibling, fsync, then rename: readers see old or new, never half.

    A failed write (a full disk) removes its temporary. ``fault`` names this write's fault points
    (``{fault}_torn``, ``mid_{fault}_write``, ``after_{fault}_rename``; see faults.py).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    data = json.dumps(obj, indent=1, sort_keys=True).encode("utf-8")
    try:
        with open(tmp, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()  # so that a kill at the next point really leaves a torn temporary on disk
            fault_point(f"{fault}_torn")
            f.write(data[len(data) // 2 :])
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"mid_{fault}_write")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fault_point(f"after_{fault}_rename")
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


class _Check:
    """A value check with the words an error message uses for what was expected."""

    def __init__(self, expected: str, ok: Callable[[Any], bool]) -> None:
        self.expected, self.ok = expected, ok


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


_INT = _Check("int", _int)
_POS = _Check("positive int", lambda v: _int(v) and v > 0)
_NONNEG = _Check("int >= 0", lambda v: _int(v) and v >= 0)
_NUM = _Check("finite number", _num)
_POS_NUM = _Check("positive number", lambda v: _num(v) and v > 0)
_STR = _Check("str", lambda v: isinstance(v, str))
_SHA = _Check("64 hex digits", lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v))
_DICT = _Check("object", lambda v: isinstance(v, dict))
_LIST = _Check("list", lambda v: isinstance(v, list))
_GRID = _Check("[rows, cols] of positive ints", lambda v: isinstance(v, list) and len(v) == 2 and all(_POS.ok(g) for g in v))
_PAIR = _Check("a list of 2 numbers", lambda v: isinstance(v, list) and len(v) == 2 and all(_num(x) for x in v))
_TRIPLE = _Check("a list of 3 numbers", lambda v: isinstance(v, list) and len(v) == 3 and all(_num(x) for x in v))
_STAT = _Check("object of numbers count/mean/std/min/max", lambda v: isinstance(v, dict) and all(
    isinstance(v.get(k), (int, float)) and not isinstance(v.get(k), bool) for k in ("count", "mean", "std", "min", "max")))

# Every field a reader of the cache uses (stage 2, verify, inspect, a resumed build), with what it
# must hold; a hand-edited or damaged manifest fails on load naming the field, never later with a
# KeyError or TypeError deep inside a consumer.
_REQUIRED: list[tuple[str, _Check]] = [
    ("schema_version", _INT),
    ("base_model", _DICT),
    ("base_model.name", _STR),
    ("base_model.sha256", _SHA),
    ("base_model.arch", _STR),
    ("base_model.embed_dim", _POS),
    ("base_model.num_heads", _POS),
    ("base_model.depth", _POS),
    ("targets", _DICT),
    ("targets.num_patches", _POS),
    ("targets.grid", _GRID),
    ("targets.patch_size", _POS),
    ("targets.dim", _POS),
    ("targets.heads", _POS),
    ("targets.topk", _POS),
    ("targets.last_layers", _POS),
    ("targets.tau", _POS_NUM),
    ("views", _DICT),
    ("views.count", _NONNEG),
    ("views.seed", _INT),
    ("views.recipe", _DICT),
    ("views.recipe.size", _POS),
    ("views.recipe.scale", _PAIR),
    ("views.recipe.jpeg_quality", _INT),
    ("views.recipe.mean", _TRIPLE),
    ("views.recipe.std", _Check("a list of 3 positive numbers", lambda v: _TRIPLE.ok(v) and all(x > 0 for x in v))),
    ("codec", _DICT),
    ("codec.name", _STR),
    ("codec.fields", _DICT),
    ("format", _DICT),
    ("format.name", _STR),
    ("format.compressor", _STR),
    ("format.shard_size", _POS),
    ("source", _DICT),
    ("source.num_images", _NONNEG),
    ("source.path", _STR),
    ("source.kind", _STR),
    ("view_epochs", _LIST),
]
# Checked only when present (older or hand-made caches may lack them).
_OPTIONAL: list[tuple[str, _Check]] = [
    ("source.classes", _LIST),
    ("source.skipped", _LIST),
    ("stats", _DICT),
    ("stats.fields", _DICT),
    ("stats.build", _DICT),
    ("stats.total_bytes", _NONNEG),
    ("stats.total_views", _NONNEG),
    ("stats.bytes_per_view", _NUM),
    (DIGEST_FIELD, _SHA),
]
_SHARD_KEYS = (("index", _NONNEG), ("path", _STR), ("num_samples", _NONNEG), ("nbytes", _NONNEG), ("sha256", _SHA))
_MISSING = object()


def _lookup(obj: Any, dotted: str) -> Any:
    """The value at ``dotted``; _MISSING when a key is absent (a non-object on the way fails its own check first)."""
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return _MISSING
        obj = obj[part]
    return obj


def _fail_check(where: str, dotted: str, value: Any, check: _Check) -> ManifestError:
    return ManifestError(f"{where}: field {dotted!r} is {_describe(value)}, expected {check.expected}")


def _describe(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    return f"{type(value).__name__} {text[:40]}" if text is not None else type(value).__name__


def validate_manifest(raw: Any, where: str) -> None:
    """Structural checks; ManifestError names the field and what was expected."""
    from tec_cache.shards import FORMATS, _check_specs, parse_compressor  # shards imports this module

    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    for dotted, check in _REQUIRED:
        value = _lookup(raw, dotted)
        if value is _MISSING:
            raise ManifestError(f"{where}: missing field {dotted!r}")
        if not check.ok(value):
            raise _fail_check(where, dotted, value, check)
    for dotted, check in _OPTIONAL:
        value = _lookup(raw, dotted)
        if value is not _MISSING and not check.ok(value):
            raise _fail_check(where, dotted, value, check)
    if raw["schema_version"] != SCHEMA_VERSION:
        raise ManifestError(f"{where}: schema_version {raw['schema_version']} is not supported (this tool reads {SCHEMA_VERSION})")
    if raw["format"]["name"] not in FORMATS:
        raise ManifestError(f"{where}: field 'format.name' is {raw['format']['name']!r}, expected one of {list(FORMATS)}")
    try:
        parse_compressor(raw["format"]["compressor"])
    except ValueError as e:
        raise ManifestError(f"{where}: field 'format.compressor': {e}") from None
    for name, stat in raw.get("stats", {}).get("fields", {}).items():
        if not _STAT.ok(stat):
            raise _fail_check(where, f"stats.fields.{name}", stat, _STAT)
    specs = {}
    for name, spec in raw["codec"]["fields"].items():
        if not (isinstance(spec, dict) and isinstance(spec.get("dtype"), str) and isinstance(spec.get("shape"), list)
                and all(_int(s) for s in spec["shape"])):
            raise ManifestError(f"{where}: codec.fields.{name} is {_describe(spec)}, expected {{'dtype': str, 'shape': [ints]}}")
        try:
            specs[name] = fs = FieldSpec.from_json(spec)
        except Exception as e:  # noqa: BLE001 - numpy raises many types for a bad dtype
            raise ManifestError(f"{where}: codec.fields.{name} is not a valid dtype/shape ({e})") from None
        if any(s <= 0 for s in fs.shape):
            raise ManifestError(f"{where}: codec.fields.{name} has a non-positive size {list(fs.shape)}")
    try:
        _check_specs(specs)  # the shard readers' own rules: field names, numeric canonical dtypes
    except (ValueError, TypeError) as e:
        raise ManifestError(f"{where}: codec.fields: {e}") from None
    seen: set[str] = set()
    for i, ve in enumerate(raw["view_epochs"]):
        if not isinstance(ve, dict) or not _int(ve.get("index")) or not isinstance(ve.get("shards"), list):
            raise ManifestError(f"{where}: view_epochs[{i}] must be an object with int 'index' and list 'shards'")
        if ve["index"] != i:
            raise ManifestError(f"{where}: view_epochs[{i}] has index {ve['index']}, expected {i}")
        for j, s in enumerate(ve["shards"]):
            if not isinstance(s, dict):
                raise ManifestError(f"{where}: view_epochs[{i}].shards[{j}] is {type(s).__name__}, expected an object")
            for key, check in _SHARD_KEYS:
                if key not in s:
                    raise ManifestError(f"{where}: view_epochs[{i}].shards[{j}] lacks {key!r}")
                if not check.ok(s[key]):
                    raise _fail_check(where, f"view_epochs[{i}].shards[{j}].{key}", s[key], check)
            p = s["path"]
            try:  # a name the file system can take: UTF-8, no NUL, components of at most 255 bytes
                parts = p.encode("utf-8").split(b"/")
            except UnicodeEncodeError:
                parts = [b"\0"]
            if any(b"\0" in part or len(part) > 255 for part in parts):
                raise ManifestError(f"{where}: view_epochs[{i}].shards[{j}].path {p!r} is not a valid file name")
            if p.startswith("/") or "\\" in p or any(part in ("", "..", ".") for part in p.split("/")):
                raise ManifestError(f"{where}: view_epochs[{i}].shards[{j}].path {p!r} must be a plain relative path inside the cache")
            if p in seen:
                raise ManifestError(f"{where}: shard path {p!r} is listed twice")
            seen.add(p)
        total = sum(s["num_samples"] for s in ve["shards"])
        if not _NONNEG.ok(ve.get("num_samples", None)):
            raise _fail_check(where, f"view_epochs[{i}].num_samples", ve.get("num_samples", None), _NONNEG)
        if ve["num_samples"] != total:
            raise ManifestError(f"{where}: view_epochs[{i}].num_samples is {_describe(ve['num_samples'])}, "
                                f"its shards hold {total}")


def manifest_digest(raw: dict[str, Any]) -> str:
    """sha256 of the manifest without its own digest field, over a canonical JSON text."""
    body = {k: v for k, v in raw.items() if k != DIGEST_FIELD}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def seal_manifest(raw: dict[str, Any]) -> dict[str, Any]:
    """The manifest with its digest, as ``tec-cache build`` writes it."""
    return {**raw, DIGEST_FIELD: manifest_digest(raw)}


def digest_problem(man: Manifest) -> str | None:
    """Why the manifest does not match its own digest (edited after the build), or None when it does.

    Checked by ``tec-cache verify`` and stage 2's pre-flight, not by ``load_manifest``: inspecting a
    hand-edited manifest stays possible, training from or verifying one does not.
    """
    stored = man.raw.get(DIGEST_FIELD)
    if stored is None:
        return (f"no {DIGEST_FIELD}: written by an older tec-cache, or edited by hand; re-running the same "
                "`tec-cache build` rewrites the manifest (finished shards are kept)")
    actual = manifest_digest(man.raw)
    if actual != stored:
        return (f"the manifest was changed after the build (its content hashes to {actual[:16]}..., "
                f"{DIGEST_FIELD} says {stored[:16]}...); restore it, or re-run the same `tec-cache build` to rewrite it")
    return None


def load_manifest(root: Path) -> Manifest:
    """Read and validate ``root/manifest.json``; ManifestError says what is wrong."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{root} is not a cache: no {MANIFEST_NAME} (an interrupted build writes it last; re-run the build)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, an integer of more than 4300 digits
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ManifestError(f"{path}: not a manifest (JSON nested too deeply)") from None
    try:  # "\ud800" is valid JSON but no text: printing or hashing it as UTF-8 would fail later
        json.dumps(raw, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ManifestError(f"{path}: holds a string that is not valid Unicode ({e.reason})") from None
    validate_manifest(raw, str(path))
    return Manifest(root, raw)

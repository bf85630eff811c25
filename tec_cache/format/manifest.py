"""The cache manifest: the one file that makes a folder of shards a cache, as a typed, frozen tree.

Data flow: build writes shards (+ a sidecar per shard), then, last, ``manifest.json`` from a
``Manifest`` (``to_json``, sealed with its own sha256); every reader (inspect, verify, stage 2)
starts from ``load_manifest``, which parses and checks the JSON into ``Manifest`` (``from_json``),
and reads only the shards it lists, each with its ``ShardInfo``. A folder without a valid
manifest is not a cache.

Each section is a frozen dataclass whose fields declare, once, their JSON key (the field's name), the
kind of value it must hold, whether older caches may lack it, and how it is read and written
(``_key``, ``_optional``, ``_tuple``, ``_section``); ``_Record.parse`` and ``_Record.to_json`` follow
the declarations. Every section keeps the keys it does not interpret in ``extra``, so ``to_json``
gives back exactly the JSON that was read (the digest covers all of it, and a manifest an older or newer tool wrote
round-trips unchanged). Schema version 1 is the only one written and read so far.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tec_cache.format.base import ShardFormat, ShardReader
from tec_cache.format.handle import CacheHandle
from tec_cache.format.registry import FORMATS, get_format
from tec_cache.format.remote import RemoteCache, RemoteError, RemoteMissing, is_remote
from tec_cache.format.schema import FieldSpec, ShardInfo, check_specs, parse_compressor

__all__ = [
    "DIGEST_FIELD", "MANIFEST_NAME", "SCHEMA_VERSION", "BaseModel", "Codec", "FieldStats", "Format", "Geometry",
    "Manifest", "ManifestError", "Recipe", "ShardEntry", "Source", "Stats", "Targets", "ViewEpoch", "Views",
    "digest_problem", "load_manifest", "manifest_digest",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
# The manifest's sha256 over its own canonical JSON (this field left out): a hand edit shows.
DIGEST_FIELD = "manifest_sha256"

Json = dict[str, Any]


class ManifestError(ValueError):
    """The manifest is missing, malformed or does not fit what is asked of it."""


# ---- what a value must hold: the words an error message uses, and the test ---------------------


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _numbers(n: int, positive: bool = False) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and len(v) == n and all(_num(x) and (x > 0 or not positive) for x in v)


_Kind = tuple[str, Callable[[Any], bool]]
_INT: _Kind = ("int", _int)
_POS: _Kind = ("positive int", lambda v: _int(v) and v > 0)
_NONNEG: _Kind = ("int >= 0", lambda v: _int(v) and v >= 0)
_NUM: _Kind = ("finite number", _num)
_POS_NUM: _Kind = ("positive number", lambda v: _num(v) and v > 0)
_STR: _Kind = ("str", lambda v: isinstance(v, str))
_SHA: _Kind = ("64 hex digits", lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v))
_DICT: _Kind = ("object", lambda v: isinstance(v, dict))
_LIST: _Kind = ("list", lambda v: isinstance(v, list))
_GRID: _Kind = ("[rows, cols] of positive ints", lambda v: isinstance(v, list) and len(v) == 2 and all(_POS[1](g) for g in v))
_PAIR: _Kind = ("a list of 2 numbers", _numbers(2))
_TRIPLE: _Kind = ("a list of 3 numbers", _numbers(3))
_POS_TRIPLE: _Kind = ("a list of 3 positive numbers", _numbers(3, positive=True))
_NUMBER: _Kind = ("number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))  # NaN allowed: a statistic
_STAT: _Kind = ("object of numbers count/mean/std/min/max", lambda v: isinstance(v, dict) and all(
    _NUMBER[1](v.get(k)) for k in ("count", "mean", "std", "min", "max")))


def _describe(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    return f"{type(value).__name__} {text[:40]}" if text is not None else type(value).__name__


class _Section:
    """One JSON object of the manifest being parsed: getters that check each key, errors that name it
    (``field 'targets.grid' is str "4x4", expected [rows, cols] of positive ints``), and what is left."""

    def __init__(self, raw: Json, dotted: str, where: str) -> None:
        self.raw, self.dotted, self.where = raw, dotted, where
        self.taken: set[str] = set()

    def name(self, key: str) -> str:
        """``key`` as messages name it: its dotted path from the top of the manifest."""
        return f"{self.dotted}.{key}" if self.dotted else key

    def fail(self, key: str, value: Any, kind: _Kind) -> ManifestError:
        return ManifestError(f"{self.where}: field {self.name(key)!r} is {_describe(value)}, expected {kind[0]}")

    def get(self, key: str, kind: _Kind) -> Any:
        """The value at ``key``, which must be there and hold ``kind``."""
        if key not in self.raw:
            raise ManifestError(f"{self.where}: missing field {self.name(key)!r}")
        return self.optional(key, kind)

    def optional(self, key: str, kind: _Kind) -> Any:
        """The value at ``key`` (``kind``), or None when the key is absent (older caches lack some)."""
        self.taken.add(key)
        value = self.raw.get(key)
        if key in self.raw and not kind[1](value):
            raise self.fail(key, value, kind)
        return value

    def section(self, key: str) -> _Section:
        return _Section(self.get(key, _DICT), self.name(key), self.where)

    def optional_section(self, key: str) -> _Section | None:
        value = self.optional(key, _DICT)
        return None if value is None else _Section(value, self.name(key), self.where)

    def extra(self) -> Mapping[str, Any]:
        """The keys this format does not interpret, kept as stored."""
        return {k: v for k, v in self.raw.items() if k not in self.taken}


# ---- declaring a section: each field names its JSON key (the field's name), its kind, and how it
# is read and written, once; ``_Record.parse`` and ``_Record.to_json`` follow the declarations --------


@dataclass(frozen=True)
class _Key:
    """How one dataclass field is stored under the key of its own name.

    ``kind`` is checked on the raw value (the error names the key and says what was expected);
    ``optional``: an absent key reads as None and None is not written (keys older caches lack);
    ``load`` turns the checked raw value into the field's value (and may refuse it, naming the key),
    ``dump`` turns the value back into exactly that JSON; ``section``: the value is a nested section.
    """

    kind: _Kind
    optional: bool = False
    load: Callable[[Any, _Section, str], Any] | None = None
    dump: Callable[[Any], Any] | None = None
    section: type[_Record] | None = None

    def read(self, s: _Section, key: str) -> Any:
        if self.section is not None:
            sub = s.optional_section(key) if self.optional else s.section(key)
            return None if sub is None else self.section.parse(sub)
        raw = s.optional(key, self.kind) if self.optional else s.get(key, self.kind)
        if raw is None and self.optional:
            return None
        return raw if self.load is None else self.load(raw, s, key)

    def write(self, value: Any) -> Any:
        if self.section is not None:
            return value.to_json()
        return value if self.dump is None else self.dump(value)


_META = "manifest_key"


def _key(kind: _Kind, *, load: Callable[[Any, _Section, str], Any] | None = None,
         dump: Callable[[Any], Any] | None = None) -> Any:
    """A required key."""
    return field(metadata={_META: _Key(kind, load=load, dump=dump)})


def _optional(kind: _Kind, *, load: Callable[[Any, _Section, str], Any] | None = None,
              dump: Callable[[Any], Any] | None = None) -> Any:
    """A key older (or hand-made) manifests may lack: None when absent, and then not written."""
    return field(default=None, metadata={_META: _Key(kind, optional=True, load=load, dump=dump)})


def _tuple(kind: _Kind, *, optional: bool = False) -> Any:
    """A JSON list held as a tuple (the dataclasses are frozen)."""
    make = _optional if optional else _key
    return make(kind, load=lambda raw, s, key: tuple(raw), dump=list)


def _section(cls: type[_Record], *, optional: bool = False) -> Any:
    """A nested object, itself a ``_Record``."""
    key = _Key(_DICT, optional=optional, section=cls)
    return field(default=None, metadata={_META: key}) if optional else field(metadata={_META: key})


def _keys(cls: type) -> list[tuple[str, _Key]]:
    """The declared keys of a section, in declaration order (the order ``to_json`` writes them)."""
    return [(f.name, f.metadata[_META]) for f in dataclasses.fields(cls) if _META in f.metadata]


class _Record:
    """A section of the manifest: declared keys become attributes, every other key stays in ``extra``."""

    extra: Mapping[str, Any]

    @classmethod
    def read_keys(cls, s: _Section) -> dict[str, Any]:
        """The declared keys of ``s``, checked and loaded, in declaration order."""
        return {name: key.read(s, name) for name, key in _keys(cls)}

    @classmethod
    def parse(cls, s: _Section) -> Any:
        make: Callable[..., Any] = cls  # a dataclass subclass: its __init__ takes the keys and extra
        return make(**cls.read_keys(s), extra=s.extra())

    def to_json(self) -> Json:
        """The section as stored: the keys it does not interpret first, then the declared ones."""
        out: Json = dict(self.extra)
        for name, key in _keys(type(self)):
            value = getattr(self, name)
            if not (key.optional and value is None):
                out[name] = key.write(value)
        return out

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> Any:
        """A section built by a writer from a flat mapping: known keys become attributes, the rest ``extra``."""
        make: Any = cls  # a dataclass subclass: its __init__ takes the keys and extra
        names = {f.name for f in dataclasses.fields(make)} - {"extra"}
        return make(**{k: v for k, v in values.items() if k in names}, extra={k: v for k, v in values.items() if k not in names})


def _one_of_formats(name: str, s: _Section, key: str) -> str:
    if name not in FORMATS:
        raise ManifestError(f"{s.where}: field {s.name(key)!r} is {name!r}, expected one of {list(FORMATS)}")
    return name


def _compressor(compressor: str, s: _Section, key: str) -> str:
    try:
        parse_compressor(compressor)
    except ValueError as e:
        raise ManifestError(f"{s.where}: field {s.name(key)!r}: {e}") from None
    return compressor


def _schema_version(version: int, s: _Section, key: str) -> int:
    if version != SCHEMA_VERSION:
        raise ManifestError(f"{s.where}: schema_version {version} is not supported (this tool reads {SCHEMA_VERSION})")
    return version


# ---- the sections -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseModel(_Record):
    """The frozen ViT the targets came from (``extra``: its build options, checkpoint path, layout)."""

    name: str = _key(_STR)
    arch: str = _key(_STR)
    sha256: str = _key(_SHA)
    embed_dim: int = _key(_POS)
    num_heads: int = _key(_POS)
    depth: int = _key(_POS)
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Targets(_Record):
    """What each view's targets are: L patches on ``grid``, D channels, H heads, top-k, tau."""

    num_patches: int = _key(_POS)
    grid: tuple[int, int] = _tuple(_GRID)
    patch_size: int = _key(_POS)
    dim: int = _key(_POS)
    heads: int = _key(_POS)
    topk: int = _key(_POS)
    last_layers: int = _key(_POS)
    tau: float = _key(_POS_NUM)
    extra: Mapping[str, Any] = field(default_factory=dict)


# How the views of a manifest without views.recipe.resize were resized: every cache built before
# the resizer was recorded used PIL's bicubic (tec_cache.core.views names the others).
LEGACY_RESIZE = "pil-bicubic"


@dataclass(frozen=True)
class Recipe(_Record):
    """The view recipe as far as readers need it (``extra``: the rest of what decided the pixels)."""

    size: int = _key(_POS)
    scale: tuple[float, float] = _tuple(_PAIR)
    jpeg_quality: int = _key(_INT)
    mean: tuple[float, float, float] = _tuple(_TRIPLE)
    std: tuple[float, float, float] = _tuple(_POS_TRIPLE)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def resize(self) -> str:
        """The resizer the views were cut with (``LEGACY_RESIZE`` when the manifest names none)."""
        return str(self.extra.get("resize", LEGACY_RESIZE))


@dataclass(frozen=True)
class Views(_Record):
    """K view-epochs of views cut by ``recipe`` from ``seed``."""

    count: int = _key(_NONNEG)
    seed: int = _key(_INT)
    recipe: Recipe = _section(Recipe)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def first_view(self) -> int:
        """View index of view-epoch 0 (``tec-cache build --first-view``; 0 when the manifest has none)."""
        return int(self.extra.get("first_view", 0))


@dataclass(frozen=True)
class Codec(_Record):
    """The target codec's name and the encoded arrays it stores per view."""

    name: str = _key(_STR)
    fields: Mapping[str, FieldSpec] = _key(_DICT, load=lambda raw, s, key: _field_specs(raw, s.where),
                                           dump=lambda specs: {k: v.to_json() for k, v in specs.items()})
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Format(_Record):
    """How the shards are stored: format name, compressor, records per shard."""

    name: str = _key(_STR, load=_one_of_formats)
    compressor: str = _key(_STR, load=_compressor)
    shard_size: int = _key(_POS)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def shards(self) -> ShardFormat:
        """The ``ShardFormat`` that reads this cache's shards."""
        return get_format(self.name)


@dataclass(frozen=True)
class Source(_Record):
    """The images the cache was built from; ``skipped`` are those that could not be decoded."""

    num_images: int = _key(_NONNEG)
    path: str = _key(_STR)
    kind: str = _key(_STR)
    classes: tuple[Any, ...] | None = _tuple(_LIST, optional=True)
    skipped: tuple[Any, ...] | None = _tuple(_LIST, optional=True)  # {"key": ..., "error": ...} as the build writes them
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FieldStats(_Record):
    """Summary of one float target (before the codec) over the whole build."""

    count: float = _key(_NUMBER)
    mean: float = _key(_NUMBER)
    std: float = _key(_NUMBER)
    min: float = _key(_NUMBER)
    max: float = _key(_NUMBER)
    extra: Mapping[str, Any] = field(default_factory=dict)


def _field_stats(raw: Json, s: _Section, key: str) -> dict[str, FieldStats]:
    out = {}
    for name, stat in raw.items():
        if not _STAT[1](stat):
            raise ManifestError(f"{s.where}: field '{s.name(key)}.{name}' is {_describe(stat)}, expected {_STAT[0]}")
        out[name] = FieldStats.parse(_Section(stat, f"{s.name(key)}.{name}", s.where))
    return out


@dataclass(frozen=True)
class Stats(_Record):
    """Build statistics; every part is optional (older or hand-made caches may lack them)."""

    fields: Mapping[str, FieldStats] | None = _optional(_DICT, load=_field_stats,
                                                        dump=lambda stats: {k: v.to_json() for k, v in stats.items()})
    build: Mapping[str, Any] | None = _optional(_DICT, dump=dict)  # seconds, views_per_s, world_size, device, ... as recorded
    total_bytes: int | None = _optional(_NONNEG)
    total_views: int | None = _optional(_NONNEG)
    bytes_per_view: float | None = _optional(_NUM)
    extra: Mapping[str, Any] = field(default_factory=dict)

@dataclass(frozen=True)
class ShardEntry:
    """One listed shard: where it is (relative to the cache root) and its facts."""

    view_epoch: int
    index: int
    path: str
    info: ShardInfo
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return self.info.num_samples

    @property
    def nbytes(self) -> int:
        return self.info.nbytes

    @property
    def sha256(self) -> str:
        return self.info.sha256

    def to_json(self) -> Json:
        return {**self.extra, "index": self.index, "path": self.path, **self.info.to_json()}


@dataclass(frozen=True)
class ViewEpoch:
    """View-epoch ``index``: view ``index`` of every image, in ``shards``."""

    index: int
    num_samples: int
    shards: tuple[ShardEntry, ...]
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> Json:
        return {**self.extra, "index": self.index, "num_samples": self.num_samples,
                "shards": [s.to_json() for s in self.shards]}


@dataclass(frozen=True)
class Geometry:
    """The pixels and patch grid every target refers to: ``img_size`` = ``grid`` x ``patch_size``."""

    img_size: int
    patch_size: int
    grid: tuple[int, int]

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class Manifest(_Record):
    """A parsed, checked manifest of the cache at ``root``; each field below ``root`` is a top-level
    key of the JSON (of the same name), declared with how it is checked and written."""

    root: Path
    schema_version: int = _key(_INT, load=_schema_version)
    base_model: BaseModel = _section(BaseModel)
    targets: Targets = _section(Targets)
    views: Views = _section(Views)
    codec: Codec = _section(Codec)
    format: Format = _section(Format)
    source: Source = _section(Source)
    view_epochs: tuple[ViewEpoch, ...] = _key(_LIST, load=lambda raw, s, key: _view_epochs(raw, s.where),
                                              dump=lambda ves: [ve.to_json() for ve in ves])
    stats: Stats | None = _section(Stats, optional=True)
    manifest_sha256: str | None = _optional(_SHA)  # DIGEST_FIELD
    extra: Mapping[str, Any] = field(default_factory=dict)  # e.g. "tool": the tec-cache version that wrote it
    # Set for a cache read from a URL (remote.py): shards stream from there; ``root`` is then only the
    # read-through folder (or "."). Not part of the manifest's JSON.
    location: RemoteCache | None = field(default=None, compare=False, repr=False)

    # ---- reading --------------------------------------------------------------------------------
    @property
    def geometry(self) -> Geometry:
        """Image size, patch size and grid (checked consistent by ``from_json``)."""
        return Geometry(self.views.recipe.size, self.targets.patch_size, self.targets.grid)

    @property
    def fields(self) -> dict[str, FieldSpec]:
        return dict(self.codec.fields)

    @property
    def num_view_epochs(self) -> int:
        return len(self.view_epochs)

    def shards(self, view_epoch: int | None = None) -> list[ShardEntry]:
        """Shard entries of one view-epoch, or of all in order."""
        return [s for ve in self.view_epochs if view_epoch is None or ve.index == view_epoch for s in ve.shards]

    @functools.cached_property  # the manifest is frozen: made once, not on every shard opened
    def handle(self) -> CacheHandle:
        """Where this cache's shards are and how one is opened (handle.py): plain data for workers."""
        return CacheHandle(self.root, self.location, self.format.name, self.fields, self.format.compressor)

    @property
    def where(self) -> str:
        """The cache as messages name it: its folder, or its URL."""
        return self.handle.where

    @property
    def name(self) -> str:
        """The cache folder's name (the URL's last segment for a remote cache)."""
        return self.location.name if self.location is not None else self.root.name

    def shard_path(self, entry: ShardEntry) -> Path:
        return self.handle.path(entry.path)

    def shard_ref(self, entry: ShardEntry) -> str:
        """Where a listed shard is read from: its path, or its URL."""
        return self.handle.ref(entry.path)

    def open_shard(self, entry: ShardEntry, *, verify: bool = False) -> ShardReader:
        """A reader of a listed shard; with ``verify`` its size, sha256 and count are checked first
        (always for a remote shard, as it streams in)."""
        return self.handle.open(entry.path, entry.info, verify=verify)

    # ---- JSON -----------------------------------------------------------------------------------
    # to_json (from _Record): the manifest as stored, exactly the JSON ``from_json`` read (or the build writes).

    def digest(self) -> str:
        """sha256 of this manifest without its own digest field (see ``manifest_digest``)."""
        return manifest_digest(self.to_json())

    def sealed(self) -> Manifest:
        """This manifest with its digest, as ``tec-cache build`` writes it."""
        return dataclasses.replace(self, manifest_sha256=self.digest())

    @staticmethod
    def from_json(raw: Any, root: Path, where: str) -> Manifest:
        """Parse and check a manifest's JSON; ManifestError names the field and what was expected."""
        if not isinstance(raw, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        top = _Section(raw, "", where)
        man = Manifest(root=Path(root), **Manifest.read_keys(top), extra=top.extra())
        _check_geometry(man, where)
        return man


def _field_specs(raw: Json, where: str) -> dict[str, FieldSpec]:
    """``codec.fields`` as FieldSpecs: canonical numeric dtypes, positive shapes, names the shards accept."""
    specs = {}
    for name, spec in raw.items():
        if not (isinstance(spec, dict) and isinstance(spec.get("dtype"), str) and isinstance(spec.get("shape"), list)
                and all(_int(s) for s in spec["shape"])):
            raise ManifestError(f"{where}: codec.fields.{name} is {_describe(spec)}, expected {{'dtype': str, 'shape': [ints]}}")
        try:
            specs[name] = fs = FieldSpec.from_json(spec)
        except Exception as e:  # noqa: BLE001 - numpy raises many types for a bad dtype
            raise ManifestError(f"{where}: codec.fields.{name} is not a valid dtype/shape ({e})") from None
        if fs.dtype != spec["dtype"] or not {"dtype", "shape"} <= set(spec) <= {"dtype", "shape", "compress"} or \
                spec.get("compress", False) is not False:
            # An alias ("f2") or another key would not survive to_json unchanged, and the build never writes one.
            raise ManifestError(f"{where}: codec.fields.{name} is {_describe(spec)}, expected exactly "
                                f"{{'dtype': {fs.dtype!r}, 'shape': [ints]}}, with 'compress': false for a field "
                                "stored uncompressed")
        if any(s <= 0 for s in fs.shape):
            raise ManifestError(f"{where}: codec.fields.{name} has a non-positive size {list(fs.shape)}")
    try:
        check_specs(specs)  # the shard readers' own rules: field names, numeric canonical dtypes
    except (ValueError, TypeError) as e:
        raise ManifestError(f"{where}: codec.fields: {e}") from None
    return specs


_SHARD_KEYS = (("index", _NONNEG), ("path", _STR), ("num_samples", _NONNEG), ("nbytes", _NONNEG), ("sha256", _SHA))


def _view_epochs(raw: list[Any], where: str) -> tuple[ViewEpoch, ...]:
    out = []
    seen: set[str] = set()
    for i, ve in enumerate(raw):
        if not isinstance(ve, dict) or not _int(ve.get("index")) or not isinstance(ve.get("shards"), list):
            raise ManifestError(f"{where}: view_epochs[{i}] must be an object with int 'index' and list 'shards'")
        if ve["index"] != i:
            raise ManifestError(f"{where}: view_epochs[{i}] has index {ve['index']}, expected {i}")
        entries = []
        for j, s in enumerate(ve["shards"]):
            if not isinstance(s, dict):
                raise ManifestError(f"{where}: view_epochs[{i}].shards[{j}] is {type(s).__name__}, expected an object")
            for key, (expected, ok) in _SHARD_KEYS:
                if key not in s:
                    raise ManifestError(f"{where}: view_epochs[{i}].shards[{j}] lacks {key!r}")
                if not ok(s[key]):
                    raise ManifestError(f"{where}: field 'view_epochs[{i}].shards[{j}].{key}' is {_describe(s[key])}, "
                                        f"expected {expected}")
            p = s["path"]
            _check_shard_path(p, f"{where}: view_epochs[{i}].shards[{j}].path {p!r}")
            if p in seen:
                raise ManifestError(f"{where}: shard path {p!r} is listed twice")
            seen.add(p)
            entries.append(ShardEntry(view_epoch=i, index=s["index"], path=p,
                                      info=ShardInfo(s["num_samples"], s["nbytes"], s["sha256"]),
                                      extra={k: v for k, v in s.items() if k not in dict(_SHARD_KEYS)}))
        total = sum(e.num_samples for e in entries)
        count = ve.get("num_samples", None)
        if not _NONNEG[1](count):
            raise ManifestError(f"{where}: field 'view_epochs[{i}].num_samples' is {_describe(count)}, expected {_NONNEG[0]}")
        if count != total:
            raise ManifestError(f"{where}: view_epochs[{i}].num_samples is {_describe(count)}, its shards hold {total}")
        out.append(ViewEpoch(index=i, num_samples=count, shards=tuple(entries),
                             extra={k: v for k, v in ve.items() if k not in ("index", "num_samples", "shards")}))
    return tuple(out)


def _check_shard_path(p: str, what: str) -> None:
    try:  # a name the file system can take: UTF-8, no NUL, components of at most 255 bytes
        parts = p.encode("utf-8").split(b"/")
    except UnicodeEncodeError:
        parts = [b"\0"]
    if any(b"\0" in part or len(part) > 255 for part in parts):
        raise ManifestError(f"{what} is not a valid file name")
    if p.startswith("/") or "\\" in p or any(part in ("", "..", ".") for part in p.split("/")):
        raise ManifestError(f"{what} must be a plain relative path inside the cache")


def _check_geometry(man: Manifest, where: str) -> None:
    """The one place image size, patch size, grid and patch count are checked against each other."""
    g, t = man.geometry, man.targets
    if g.grid[0] * g.patch_size != g.img_size or g.grid[1] * g.patch_size != g.img_size:
        raise ManifestError(f"{where}: targets.grid {list(g.grid)} of targets.patch_size {g.patch_size} px does not "
                            f"cover views.recipe.size {g.img_size}")
    if t.num_patches != g.num_patches:
        raise ManifestError(f"{where}: targets.num_patches is {t.num_patches}, targets.grid {list(g.grid)} has {g.num_patches}")


def manifest_digest(raw: Json) -> str:
    """sha256 of the manifest without its own digest field, over a canonical JSON text."""
    body = {k: v for k, v in raw.items() if k != DIGEST_FIELD}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def digest_problem(man: Manifest) -> str | None:
    """Why the manifest does not match its own digest (edited after the build), or None when it does.

    Checked by ``tec-cache verify`` and stage 2's pre-flight, not by ``load_manifest``: inspecting a
    hand-edited manifest stays possible, training from or verifying one does not.
    """
    stored = man.manifest_sha256
    if stored is None:
        return (f"no {DIGEST_FIELD}: written by an older tec-cache, or edited by hand; re-running the same "
                "`tec-cache build` rewrites the manifest (finished shards are kept)")
    actual = man.digest()
    if actual != stored:
        return (f"the manifest was changed after the build (its content hashes to {actual[:16]}..., "
                f"{DIGEST_FIELD} says {stored[:16]}...); restore it, or re-run the same `tec-cache build` to rewrite it")
    return None


def load_manifest(root: Path | str, local_dir: Path | str | None = None) -> Manifest:
    """Read and check ``root/manifest.json``; ManifestError says what is wrong. ``root`` may be a URL
    or a ``pipe:`` command (remote.py); ``local_dir`` is then an optional read-through folder."""
    if is_remote(root):
        return _load_remote(str(root), local_dir)
    root = Path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{root} is not a cache: no {MANIFEST_NAME} (an interrupted build writes it last; re-run the build)")
    return _parse_manifest(path.read_bytes(), root, str(path))


def _load_remote(ref: str, local_dir: Path | str | None) -> Manifest:
    try:
        loc = RemoteCache.open(ref, local_dir)
        raw = loc.read(MANIFEST_NAME)
    except RemoteMissing as e:
        raise ManifestError(f"{ref} is not a cache: {e}") from None
    except (RemoteError, ValueError) as e:  # their messages name the URL or the command
        raise ManifestError(str(e)) from None
    man = _parse_manifest(raw, Path(local_dir or "."), loc.url(MANIFEST_NAME))
    if man.format.name not in ("webdataset",):
        raise ManifestError(f"{ref}: a {man.format.name} cache cannot be streamed (its shards are folder trees): "
                            "read it from a local or mounted folder, or build the cache with --format webdataset")
    return dataclasses.replace(man, location=loc)


def _parse_manifest(data: bytes, root: Path, where: str) -> Manifest:
    path = where
    try:
        raw = json.loads(data.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, an integer of more than 4300 digits
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ManifestError(f"{path}: not a manifest (JSON nested too deeply)") from None
    try:  # "\ud800" is valid JSON but no text: printing or hashing it as UTF-8 would fail later
        json.dumps(raw, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ManifestError(f"{path}: holds a string that is not valid Unicode ({e.reason})") from None
    return Manifest.from_json(raw, root, str(path))

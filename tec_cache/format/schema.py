"""The record schema: what one cached view is, how the manifest describes its arrays, and the
rules every shard format and the manifest apply to field specs, records and compressors.

Data flow: the build turns each (image, view-epoch) into a ``ViewRecord`` whose ``fields`` are the
codec's encoded target arrays; a shard writer (``tar``, ``zarr``) stores a sequence of records; a
shard reader gives the same records back. ``FieldSpec`` is how the manifest describes each encoded
array, so nothing in a shard needs to describe itself (no pickle, no object dtypes). ``ShardInfo``
is the one shape a finished shard's facts take from the writer to the manifest to the loader.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "FieldSpec",
    "RESERVED_NAMES",
    "ShardError",
    "ShardInfo",
    "ViewRecord",
    "check_fields",
    "check_record",
    "check_specs",
    "parse_compressor",
    "record_key",
]

KEY_RE = re.compile(r"[0-9]{9}")
FIELD_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# Names the zarr layout uses for its own arrays; a field with one of these names would collide.
RESERVED_NAMES = frozenset({"key", "image_index", "view_epoch", "label", "image_key", "image_bytes", "image_offsets"})
# Per-record metadata stored beside the arrays, with the integer width each must fit.
META_TYPES: dict[str, type] = {"image_index": int, "view_epoch": int, "label": int, "image_key": str}
INT_RANGES: dict[str, type[np.integer]] = {"image_index": np.int64, "view_epoch": np.int32, "label": np.int64}


class ShardError(ValueError):
    """A shard failed an integrity or schema check; the message names the path and the check."""


@dataclass(frozen=True)
class FieldSpec:
    """dtype and per-view shape of one encoded target array, as written in the manifest.

    ``compress``: whether the cache's compressor applies to this field (the codec decides per field,
    by measurement: benchmarks/bench_fields.py); manifests that name no flag compressed every field."""

    dtype: str
    shape: tuple[int, ...]
    compress: bool = True

    def nbytes(self) -> int:
        # math.prod, not np.prod: the loader asks this for every field of every record, and
        # np.prod's dispatch cost 7% of a loader worker's time.
        return np.dtype(self.dtype).itemsize * math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        # The flag is written only when off, so the manifests of fully compressed caches are unchanged.
        return {"dtype": self.dtype, "shape": list(self.shape), **({} if self.compress else {"compress": False})}

    @staticmethod
    def from_json(obj: dict[str, Any]) -> FieldSpec:
        return FieldSpec(dtype=str(np.dtype(obj["dtype"])), shape=tuple(int(s) for s in obj["shape"]),
                         compress=bool(obj.get("compress", True)))


@dataclass(frozen=True)
class ShardInfo:
    """A finished shard's facts: what the writer returns, the manifest lists and a reader verifies."""

    num_samples: int
    nbytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "nbytes": self.nbytes, "sha256": self.sha256}


@dataclass
class ViewRecord:
    """One cached view: the pixels the base model saw and its encoded targets.

    ``key`` is unique inside a view-epoch (``f"{image_index:09d}"``), so a record is addressed by
    (view_epoch, key). ``image`` holds the encoded view (JPEG bytes); decoding it gives exactly the
    tensor the base model was run on.
    """

    key: str
    image_index: int
    view_epoch: int
    label: int
    image_key: str
    image: bytes | memoryview  # a view of a verified shard's bytes while its reader holds them
    fields: dict[str, np.ndarray] = field(default_factory=dict)


def record_key(image_index: int) -> str:
    """Sample key of an image inside a view-epoch: fixed width so lexical order is index order."""
    return f"{image_index:09d}"


def parse_compressor(compressor: str) -> int | None:
    """zstd level for "zstd:LEVEL", None for "none"."""
    if compressor == "none":
        return None
    name, _, level = compressor.partition(":")
    if name == "zstd" and re.fullmatch(r"-?[0-9]+", level) and -131072 <= int(level) <= 22:
        return int(level)
    raise ValueError(f"compressor must be 'none' or 'zstd:LEVEL' (LEVEL in -131072..22), got {compressor!r}")


# Bytes of one view's field: a ViT-g/14 at 518 px has 1369 x 1536 fp16 features, 4.2 MB.
MAX_FIELD_BYTES = 64 * 2**20


def check_specs(fields: dict[str, FieldSpec]) -> dict[str, FieldSpec]:
    """The field specs every format can store: safe names, canonical numeric dtypes, non-empty shapes."""
    for name, spec in fields.items():
        if not FIELD_NAME_RE.fullmatch(name) or name in RESERVED_NAMES:
            raise ValueError(
                f"field name {name!r} must match {FIELD_NAME_RE.pattern} and not be one of {sorted(RESERVED_NAMES)}"
            )
        dtype = np.dtype(spec.dtype)
        # check_fields compares dtype strings, so an alias such as "i1" would never match an array.
        if str(dtype) != spec.dtype or dtype.kind not in "biuf":
            raise ValueError(f"field {name!r}: dtype {spec.dtype!r} must be a canonical numeric numpy name")
        if any(s < 1 for s in spec.shape):
            raise ValueError(f"field {name!r}: shape {list(spec.shape)} has no elements (every size must be >= 1)")
        if spec.nbytes() > MAX_FIELD_BYTES:
            # An edited or damaged manifest must not make a reader allocate gigabytes per view.
            raise ValueError(f"field {name!r}: shape {list(spec.shape)} is {spec.nbytes():,} bytes a view, over the "
                             f"{MAX_FIELD_BYTES:,} any base model's targets take")
    return dict(fields)


def check_fields(fields: dict[str, np.ndarray], specs: dict[str, FieldSpec], where: str) -> None:
    """Raise ValueError naming the field when an encoded array does not match its manifest spec."""
    missing = sorted(set(specs) - set(fields))
    extra = sorted(set(fields) - set(specs))
    if missing or extra:
        raise ValueError(f"{where}: target fields differ from the manifest: missing {missing}, unexpected {extra}")
    for name, spec in specs.items():
        arr = fields[name]
        if str(arr.dtype) != spec.dtype or tuple(arr.shape) != spec.shape:
            raise ValueError(
                f"{where}: field {name!r} is {arr.dtype}{list(arr.shape)}, manifest expects {spec.dtype}{list(spec.shape)}"
            )


def check_record(rec: ViewRecord, specs: dict[str, FieldSpec], keys: set[str], where: str) -> None:
    """A record a writer may store: 9-digit key new to the shard, in-range ints, bytes, spec'd fields."""
    if not isinstance(rec.key, str) or not KEY_RE.fullmatch(rec.key):
        raise ValueError(f"{where}: key must be 9 ASCII digits")
    if rec.key in keys:
        raise ValueError(f"{where}: key already written to this shard")
    for attr, int_type in INT_RANGES.items():
        value = getattr(rec, attr)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{where}: {attr} must be an int, got {type(value).__name__}")
        info = np.iinfo(int_type)
        if not info.min <= int(value) <= info.max:
            raise ValueError(f"{where}: {attr}={value} does not fit {info.dtype}")
    if not isinstance(rec.image_key, str):
        raise ValueError(f"{where}: image_key must be a str")
    rec.image_key.encode("utf-8")  # lone surrogates cannot be stored; raises UnicodeEncodeError (a ValueError)
    if not isinstance(rec.image, (bytes, bytearray, memoryview)):
        raise ValueError(f"{where}: image must be bytes")
    check_fields(rec.fields, specs, where)

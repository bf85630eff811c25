"""In-memory types shared by every stage-1 writer and the stage-2 reader.

Data flow: the build turns each (image, view-epoch) into a ``ViewRecord`` whose ``fields`` are the
codec's encoded target arrays; a shard writer stores a sequence of records; a shard reader gives the
same records back. ``FieldSpec`` is how the manifest describes each encoded array, so nothing in a
shard needs to describe itself (no pickle, no object dtypes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class FieldSpec:
    """dtype and per-view shape of one encoded target array, as written in the manifest."""

    dtype: str
    shape: tuple[int, ...]

    def nbytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * int(np.prod(self.shape, dtype=np.int64)))

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}

    @staticmethod
    def from_json(obj: dict[str, Any]) -> "FieldSpec":
        return FieldSpec(dtype=str(np.dtype(obj["dtype"])), shape=tuple(int(s) for s in obj["shape"]))


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
    image: bytes
    fields: dict[str, np.ndarray] = field(default_factory=dict)


def record_key(image_index: int) -> str:
    """Sample key of an image inside a view-epoch: fixed width so lexical order is index order."""
    return f"{image_index:09d}"


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

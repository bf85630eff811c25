"""Shard formats by name: the manifest's ``format.name`` -> the ``ShardFormat`` that reads it.

Data flow: build options / manifest -> ``get_format(name)`` -> its writer, reader, digest, size.
Adding a format is one module implementing ``ShardFormat`` and one line here.
"""
from __future__ import annotations

from pathlib import Path

from tec_cache.format.base import ShardFormat, ShardReader, ShardWriter
from tec_cache.format.schema import FieldSpec, ShardInfo
from tec_cache.format.tar import TarFormat
from tec_cache.format.zarr import ZarrFormat

__all__ = ["FORMATS", "get_format", "open_reader", "open_writer"]

_REGISTRY: dict[str, ShardFormat] = {f.name: f for f in (TarFormat(), ZarrFormat())}
FORMATS: tuple[str, ...] = tuple(_REGISTRY)


def get_format(name: str) -> ShardFormat:
    """The shard format called ``name``; ValueError naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown shard format {name!r}, expected one of {FORMATS}") from None


def open_writer(fmt: str, path: Path, fields: dict[str, FieldSpec], compressor: str = "zstd:3") -> ShardWriter:
    """``get_format(fmt).open_writer(...)``: start a shard, published at ``close()``."""
    return get_format(fmt).open_writer(path, fields, compressor)


def open_reader(fmt: str, path: Path, fields: dict[str, FieldSpec], compressor: str = "zstd:3",
                expect: ShardInfo | None = None, buffer: bytearray | None = None) -> ShardReader:
    """``get_format(fmt).open_reader(...)``: open a finished shard, verified against ``expect`` if given."""
    return get_format(fmt).open_reader(path, fields, compressor, expect, buffer)

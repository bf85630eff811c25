"""The one shard-format interface: a ``ShardFormat`` owns its file suffix, how its shards are
hashed and sized, and opens its writers and readers; ``tar`` and ``zarr`` implement it.

Data flow: build -> ``ShardFormat.open_writer`` -> ``ShardWriter.write``* -> ``close()`` ->
``ShardInfo`` (count, bytes, sha256) -> manifest -> ``ShardFormat.open_reader(..., expect=info)`` ->
``ShardReader`` -> stage-2 loader. A shard is published atomically: the writer fills a temporary
sibling (``<name>.tmp``) and only ``close()`` moves it to the final path, so a crashed build never
leaves a half-written shard that a reader could mistake for a finished one.

Every integrity or schema problem found while reading raises ``ShardError`` naming the shard path
and the failed check; invalid input to the writer raises ``ValueError``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tec_cache.format.fs import publish, remove
from tec_cache.format.schema import FieldSpec, ShardError, ShardInfo, ViewRecord, check_record, check_specs, parse_compressor
from tec_cache.runtime.faults import fault_point

__all__ = ["ShardFormat", "ShardReader", "ShardWriter", "verify_count", "verify_digest"]


class ShardWriter:
    """Writes an ordered sequence of records into one shard, published atomically by ``close()``.

    As a context manager: a clean exit closes, an exception aborts (temporary removed, ``path``
    untouched). Call ``close()`` inside the block to get the ``ShardInfo``; closing twice returns it
    again. Subclasses implement ``_add``, ``_finish`` and ``_discard``.
    """

    fmt: str = ""

    def __init__(self, path: Path, fields: dict[str, FieldSpec]) -> None:
        self.path = path
        self.fields = fields
        self._tmp = path.with_name(path.name + ".tmp")
        self._keys: set[str] = set()
        self._info: ShardInfo | None = None
        self._aborted = False
        remove(self._tmp)

    def write(self, rec: ViewRecord) -> None:
        """Append one record; raises ValueError (naming the field or attribute) if it is malformed."""
        if self._info is not None or self._aborted:
            raise ValueError(f"{self.path}: write() on a writer that is already closed or aborted")
        check_record(rec, self.fields, self._keys, where=f"{self.path} record {rec.key!r}")
        self._add(rec)
        self._keys.add(rec.key)

    def close(self) -> ShardInfo:
        """Finish the shard, fsync it and move it to ``path``; returns its ShardInfo."""
        if self._info is not None:
            return self._info
        if self._aborted:
            raise ValueError(f"{self.path}: close() on an aborted writer")
        try:
            nbytes, digest = self._finish()
            fault_point("after_shard_fsync")  # complete, durable, but still under its temporary name
            publish(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._info = ShardInfo(num_samples=len(self._keys), nbytes=nbytes, sha256=digest)
        return self._info

    def abort(self) -> None:
        """Drop everything written so far; ``path`` is left as it was. No-op after ``close()``."""
        if self._info is not None:
            return
        self._aborted = True
        self._discard()
        remove(self._tmp)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _add(self, rec: ViewRecord) -> None:
        raise NotImplementedError

    def _finish(self) -> tuple[int, str]:
        """Complete and fsync the temporary; return its (nbytes, sha256)."""
        raise NotImplementedError

    def _discard(self) -> None:
        raise NotImplementedError


class ShardReader:
    """Records of one shard in write order: iterate, index, or list the keys."""

    fmt: str = ""

    def __init__(self, path: Path | str, fields: dict[str, FieldSpec]) -> None:
        self.path = path  # a str for a shard streamed from a URL
        self.fields = fields
        self._keys: list[str] = []

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[str]:
        """Record keys in write order."""
        return list(self._keys)

    def read_many(self, indices: Sequence[int]) -> list[ViewRecord]:
        """The records at ``indices`` (any order, repeats allowed), as ``[self[i] for i in indices]``
        would give them, but read in one pass: the stage-2 loader reads a batch's records of a
        shard with one call, which is what makes the zarr format fast enough to train from."""
        return [self[i] for i in indices]

    def read_into(self, indices: Sequence[int], out: dict[str, np.ndarray], rows: Sequence[int]) -> list[ViewRecord]:
        """``read_many``, each record's fields written into ``out[name][row]`` (the loader's batch
        buffer) for ``row`` in ``rows``; the returned records' ``fields`` are those rows. Formats
        that can decode straight into the rows override it; this one copies."""
        records = self.read_many(indices)
        for rec, row in zip(records, rows):
            for name, arr in rec.fields.items():
                out[name][row] = arr
            rec.fields = {name: out[name][row] for name in rec.fields}
        return records

    def release(self) -> bytearray | None:
        """Give up what the reader holds in memory; returns a buffer the next reader may reuse (None
        for formats that hold none)."""
        return None

    def __getitem__(self, i: int) -> ViewRecord:
        raise NotImplementedError

    def __iter__(self) -> Iterator[ViewRecord]:
        raise NotImplementedError

    def _index(self, i: int) -> int:
        n = len(self._keys)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.path}: record index out of range for a shard of {n}")
        return i


class ShardFormat(ABC):
    """One on-disk shard format: its name (as in the manifest), suffix, digest, size, writer and reader."""

    name: str
    suffix: str

    @abstractmethod
    def digest(self, path: Path) -> str:
        """sha256 of the shard at ``path`` as the manifest records it."""

    @abstractmethod
    def nbytes(self, path: Path) -> int:
        """Size of the shard at ``path`` on disk, as the manifest records it."""

    def open_writer(self, path: Path, fields: dict[str, FieldSpec], compressor: str = "zstd:3") -> ShardWriter:
        """Start a shard at ``path``; nothing appears there until ``close()``.

        ``compressor`` is "zstd:LEVEL" or "none" and applies to the target fields (JPEGs are stored
        as is). One writer per path at a time: a stale ``<name>.tmp`` from a crashed run is replaced.
        """
        return self._writer(Path(path), check_specs(fields), parse_compressor(compressor))

    def open_reader(self, path: Path, fields: dict[str, FieldSpec], compressor: str = "zstd:3",
                    expect: ShardInfo | None = None, buffer: bytearray | None = None) -> ShardReader:
        """Open a finished shard; its structure is validated here, each record's payload when read.

        ``compressor`` must be the one it was written with (zarr arrays describe their own codecs,
        so there it is only validated). With ``expect``, size, sha256 and record count are
        verified before this returns. ``buffer``: memory a format that reads whole shards may read
        into (``ShardReader.release`` gives it back for the next reader); others ignore it.
        """
        return self._reader(Path(path), check_specs(fields), parse_compressor(compressor), expect, buffer)

    def open_bytes(self, name: str, data: bytes, fields: dict[str, FieldSpec], compressor: str = "zstd:3",
                   expect: ShardInfo | None = None) -> ShardReader:
        """A reader over a whole shard already in memory (streamed from a remote cache), whose size
        and sha256 were checked as it was read (``remote.RemoteCache.fetch_shard``); with ``expect``
        the record count is checked here. ``name`` names it in messages. Formats whose shard is one
        file implement it."""
        raise ShardError(f"{name}: a {self.name} shard is a folder tree and cannot be streamed: read {self.name} "
                         "caches from a local or mounted folder")

    @abstractmethod
    def _writer(self, path: Path, fields: dict[str, FieldSpec], level: int | None) -> ShardWriter: ...

    @abstractmethod
    def _reader(self, path: Path, fields: dict[str, FieldSpec], level: int | None,
                expect: ShardInfo | None, buffer: bytearray | None = None) -> ShardReader: ...


def verify_digest(path: Path | str, nbytes: int, digest: str, expect: ShardInfo) -> None:
    """ShardError unless size and sha256 are the ones the manifest lists."""
    if nbytes != expect.nbytes:
        raise ShardError(f"{path}: size: {nbytes} bytes, manifest says {expect.nbytes}")
    if digest != expect.sha256:
        raise ShardError(f"{path}: checksum: sha256 {digest}, manifest says {expect.sha256}")


def verify_count(path: Path | str, count: int, expect: ShardInfo) -> None:
    """ShardError unless the shard holds the record count the manifest lists."""
    if count != expect.num_samples:
        raise ShardError(f"{path}: sample count: {count} records, manifest says {expect.num_samples}")

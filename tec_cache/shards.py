"""Shard files: one writer/reader interface over two on-disk formats.

Data flow: build -> ``open_writer`` -> shard files -> ``open_reader`` -> stage-2 loader. The build
turns images into ``ViewRecord``s and writes them, in order, into shards of typically 64-1024
records; stage 2 reads them back (sequentially or by index) and never needs anything but the
manifest's ``FieldSpec``s to decode them, because nothing in a shard is pickled.

A shard is published atomically: the writer fills a temporary sibling (``<name>.tmp``) and only
``close()`` moves it to the final path, so a crashed build never leaves a half-written shard that a
reader could mistake for a finished one. ``close()`` returns a ``ShardInfo`` (count, size, sha256)
for the manifest; passing it back as ``open_reader(..., expect=info)`` verifies the shard before a
single record is returned.

Formats (``FORMATS``):

* ``"webdataset"`` -- one ``.tar`` per shard. Per record, members ``{key}.jpg`` (the view's JPEG,
  stored as is), ``{key}.json`` (utf-8 JSON with image_index, view_epoch, label, image_key) and
  ``{key}.targets.zst``: every target field's raw little-endian C-order bytes as its own zstd
  frame (separate frames compress 5% better than one: each field has its own statistics), the
  frames in sorted field-name order behind a header of their lengths (uint32 LE each). With
  compressor ``"none"`` the member is ``{key}.targets.bin``, the raw bytes concatenated in the same
  order. One member per view instead of one per field saves ~4 KB of tar headers and padding per
  view. Members carry mtime 0 and fixed owner, so equal records give a byte-identical tar.
* ``"zarr"`` -- one zarr v3 group (a directory) per shard. Each field is an array
  ``(n, *spec.shape)`` with one chunk per record, all chunks in one zarr shard file (so reading a
  record is a partial read); ``image_index``/``view_epoch``/``label`` are 1-D arrays; images are the
  ragged pair ``image_bytes`` (uint8, uncompressed) + ``image_offsets`` (int64, n+1); record keys
  and image keys are JSON lists in the group attribute ``tec_shard``.

Every integrity or schema problem found while reading raises ``ShardError`` naming the shard path
and the failed check; invalid input to the writer raises ``ValueError``.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numcodecs
import numpy as np
import webdataset
import zarr
import zarr.codecs
from zarr.storage import LocalStore

from tec_cache.faults import fault_point
from tec_cache.manifest import fsync_dir
from tec_cache.records import FieldSpec, ViewRecord, check_fields

__all__ = [
    "FORMATS",
    "ShardError",
    "ShardInfo",
    "ShardReader",
    "ShardWriter",
    "open_reader",
    "open_writer",
    "shard_nbytes",
    "shard_sha256",
    "shard_suffix",
]

FORMATS = ("webdataset", "zarr")
_SUFFIXES = {"webdataset": ".tar", "zarr": ".zarr"}

_KEY_RE = re.compile(r"[0-9]{9}")
_MEMBER_RE = re.compile(r"([0-9]{9})\.(.+)")
_FIELD_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# Names the zarr layout uses for its own arrays; a field with one of these names would collide.
_RESERVED_NAMES = frozenset({"key", "image_index", "view_epoch", "label", "image_key", "image_bytes", "image_offsets"})
_META_TYPES = {"image_index": int, "view_epoch": int, "label": int, "image_key": str}
_INT_RANGES = {"image_index": np.int64, "view_epoch": np.int32, "label": np.int64}
_TAR_USER = "tec"
_ZARR_ATTR = "tec_shard"
_ZARR_LAYOUT_VERSION = 1
_IMAGE_CHUNK = 64 * 1024
_ITER_BLOCK = 64  # zarr __iter__ reads this many records per array read
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_HASH_BLOCK = 1 << 20


class ShardError(ValueError):
    """A shard failed an integrity or schema check; the message names the path and the check."""


@dataclass(frozen=True)
class ShardInfo:
    """What the manifest records about a finished shard, and what ``expect=`` verifies."""

    num_samples: int
    nbytes: int
    sha256: str


def shard_suffix(fmt: str) -> str:
    """File-name suffix of a shard in format ``fmt`` (".tar" or ".zarr")."""
    _check_format(fmt)
    return _SUFFIXES[fmt]


def shard_sha256(fmt: str, path: Path) -> str:
    """sha256 of a shard: of the file for a tar; for a zarr directory, of every file in sorted
    relative-posix-path order, each hashed as ``path utf-8, NUL, 8-byte LE length, bytes``."""
    _check_format(fmt)
    path = Path(path)
    if fmt == "webdataset":
        digest = hashlib.sha256()
        with _open_shard_file(path) as f:
            while block := f.read(_HASH_BLOCK):
                digest.update(block)
        return digest.hexdigest()
    return _tree_digest(path)[1]


def shard_nbytes(fmt: str, path: Path) -> int:
    """Size of a shard on disk: the tar file's size, or the sum of the zarr directory's file sizes."""
    _check_format(fmt)
    path = Path(path)
    if fmt == "webdataset":
        with _open_shard_file(path) as f:
            return os.fstat(f.fileno()).st_size
    return sum(p.stat().st_size for _, p in _tree_files(path))


def open_writer(fmt: str, path: Path, fields: dict[str, FieldSpec], compressor: str = "zstd:3") -> ShardWriter:
    """Start a shard at ``path``; nothing appears there until ``close()``.

    ``compressor`` is "zstd:LEVEL" or "none" and applies to the target fields (JPEGs are stored as
    is). One writer per path at a time: a stale ``<name>.tmp`` from a crashed run is replaced.
    """
    _check_format(fmt)
    specs = _check_specs(fields)
    level = parse_compressor(compressor)
    if fmt == "webdataset":
        return _TarWriter(Path(path), specs, level)
    return _ZarrWriter(Path(path), specs, level)


def open_reader(
    fmt: str,
    path: Path,
    fields: dict[str, FieldSpec],
    compressor: str = "zstd:3",
    expect: ShardInfo | None = None,
) -> ShardReader:
    """Open a finished shard; its structure is validated here, each record's payload when read.

    ``compressor`` must be the one it was written with (zarr arrays describe their own codecs, so
    there it is only validated). With ``expect``, size, sha256 and record count are verified before
    this returns.
    """
    _check_format(fmt)
    specs = _check_specs(fields)
    level = parse_compressor(compressor)
    if fmt == "webdataset":
        return _TarReader(Path(path), specs, level, expect)
    return _ZarrReader(Path(path), specs, expect)


# ---------------------------------------------------------------------------------------------
# writer


class ShardWriter:
    """Writes an ordered sequence of records into one shard, published atomically by ``close()``.

    As a context manager: a clean exit closes, an exception aborts (temporary removed, ``path``
    untouched). Call ``close()`` inside the block to get the ``ShardInfo``; closing twice returns it
    again.
    """

    def __init__(self, fmt: str, path: Path, fields: dict[str, FieldSpec]) -> None:
        self.fmt = fmt
        self.path = path
        self.fields = fields
        self._tmp = _sibling(path, ".tmp")
        self._keys: set[str] = set()
        self._info: ShardInfo | None = None
        self._aborted = False
        _remove(self._tmp)

    def write(self, rec: ViewRecord) -> None:
        """Append one record; raises ValueError (naming the field or attribute) if it is malformed."""
        if self._info is not None or self._aborted:
            raise ValueError(f"{self.path}: write() on a writer that is already closed or aborted")
        _check_record(rec, self.fields, self._keys, where=f"{self.path} record {rec.key!r}")
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
            _publish(self._tmp, self.path)
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
        _remove(self._tmp)

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


class _HashingSink:
    """File wrapper that hashes and counts what tarfile writes, so close() need not re-read the tar."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.digest = hashlib.sha256()
        self.nbytes = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.nbytes += len(data)
        return self.f.write(data)


class _TarWriter(ShardWriter):
    def __init__(self, path: Path, fields: dict[str, FieldSpec], level: int | None) -> None:
        super().__init__("webdataset", path, fields)
        self._codec = None if level is None else numcodecs.Zstd(level=level)
        self._ext = ".bin" if level is None else ".zst"
        self._file = open(self._tmp, "wb")
        self._sink = _HashingSink(self._file)
        # Fixed mtime/owner/mode make the tar a pure function of the records.
        self._tar = webdataset.TarWriter(
            self._sink, user=_TAR_USER, group=_TAR_USER, mode=0o444, compress=False, encoder=False, mtime=0
        )

    def _add(self, rec: ViewRecord) -> None:
        raws = [_le_bytes(rec.fields[name]) for name in sorted(self.fields)]
        if self._codec is None:
            payload = b"".join(raws)
        else:
            frames = [self._codec.encode(raw) for raw in raws]
            payload = np.array([len(fr) for fr in frames], dtype="<u4").tobytes() + b"".join(frames)
        sample: dict[str, Any] = {"__key__": rec.key, "jpg": bytes(rec.image), "json": _encode_meta(rec),
                                  "targets" + self._ext: payload}
        self._tar.write(sample)

    def _finish(self) -> tuple[int, str]:
        self._tar.close()  # writes the end-of-archive blocks; leaves our file open
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._sink.nbytes, self._sink.digest.hexdigest()

    def _discard(self) -> None:
        # Close the tar stream now: left to the garbage collector it would flush into a closed file.
        # Its end blocks land in the temporary, which is deleted next; a failure here changes nothing.
        with contextlib.suppress(OSError, ValueError):
            self._tar.close()
        self._file.close()


class _ZarrWriter(ShardWriter):
    """Buffers records in memory (shards are small) and writes every array at close()."""

    def __init__(self, path: Path, fields: dict[str, FieldSpec], level: int | None) -> None:
        super().__init__("zarr", path, fields)
        self._compressors = None if level is None else [zarr.codecs.ZstdCodec(level=level)]
        self._meta: list[tuple[str, int, int, int, str]] = []
        self._images: list[bytes] = []
        self._columns: dict[str, list[np.ndarray]] = {name: [] for name in fields}

    def _add(self, rec: ViewRecord) -> None:
        self._meta.append((rec.key, int(rec.image_index), int(rec.view_epoch), int(rec.label), rec.image_key))
        self._images.append(bytes(rec.image))
        for name, column in self._columns.items():
            column.append(np.array(rec.fields[name], copy=True))  # the caller may reuse its buffers

    def _finish(self) -> tuple[int, str]:
        n = len(self._meta)
        keys, image_index, view_epoch, label, image_keys = (list(col) for col in zip(*self._meta)) if n else ([],) * 5
        grp = zarr.create_group(
            LocalStore(self._tmp),
            zarr_format=3,
            attributes={_ZARR_ATTR: {"version": _ZARR_LAYOUT_VERSION, "keys": keys, "image_keys": image_keys}},
        )
        rows = (max(n, 1),)  # zarr rejects zero-sized chunks; an empty shard still gets valid arrays
        self._write_array(grp, "image_index", np.array(image_index, np.int64), rows)
        fault_point("mid_zarr_write")  # a directory with some arrays, not all
        self._write_array(grp, "view_epoch", np.array(view_epoch, np.int32), rows)
        self._write_array(grp, "label", np.array(label, np.int64), rows)
        for name, spec in self.fields.items():
            column = self._columns.pop(name)  # free each column as soon as it is on disk
            data = np.stack(column) if n else np.empty((0, *spec.shape), spec.dtype)
            self._write_array(grp, name, data, (1, *spec.shape), shards=(max(n, 1), *spec.shape))
        offsets = np.zeros(n + 1, np.int64)
        offsets[1:] = np.cumsum([len(img) for img in self._images])
        self._write_array(grp, "image_offsets", offsets, (n + 1,))
        blob = np.frombuffer(b"".join(self._images), np.uint8)
        self._images = []
        chunk = min(_IMAGE_CHUNK, max(blob.size, 1))
        shard = -(-max(blob.size, 1) // chunk) * chunk  # one zarr shard file, a whole number of chunks
        # JPEGs are already compressed: store them as is, like the tar does.
        self._write_array(grp, "image_bytes", blob, (chunk,), shards=(shard,), compress=False)
        _fsync_tree(self._tmp)
        return _tree_digest(self._tmp)

    def _write_array(
        self,
        grp: zarr.Group,
        name: str,
        data: np.ndarray,
        chunks: tuple[int, ...],
        shards: tuple[int, ...] | None = None,
        compress: bool = True,
    ) -> None:
        arr = grp.create_array(
            name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=chunks,
            shards=shards,
            compressors=self._compressors if compress else None,
            # Store every chunk, even all-zero ones: then each non-empty array has exactly one data
            # file, and the reader can tell a deleted file from a legitimately zero record.
            config={"write_empty_chunks": True},
        )
        if data.size:
            arr[...] = data

    def _discard(self) -> None:
        self._meta, self._images, self._columns = [], [], {}


# ---------------------------------------------------------------------------------------------
# reader


class ShardReader:
    """Records of one shard in write order: iterate, index, or list the keys."""

    def __init__(self, fmt: str, path: Path, fields: dict[str, FieldSpec]) -> None:
        self.fmt = fmt
        self.path = path
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


class _TarReader(ShardReader):
    """Tar shard; an in-memory member index (offsets into the file) gives random access."""

    def __init__(self, path: Path, fields: dict[str, FieldSpec], level: int | None, expect: ShardInfo | None) -> None:
        super().__init__("webdataset", path, fields)
        self._codec = None if level is None else numcodecs.Zstd(level=level)
        self._ext = ".bin" if level is None else ".zst"
        self._targets_nbytes = sum(spec.nbytes() for spec in fields.values())
        # With expect the whole file is read once, verified, and every record is parsed from those
        # verified bytes (reading the file again could see different bytes).
        self._data: bytes | None = None
        if expect is not None:
            with _open_shard_file(path) as f:
                data = f.read()
            _verify_digest(path, len(data), hashlib.sha256(data).hexdigest(), expect)
            self._data = data
            self._members = self._build_index(io.BytesIO(data))
        else:
            with _open_shard_file(path) as f:
                self._members = self._build_index(f)
        self._keys = [key for key, _ in self._members]
        if expect is not None:
            _verify_count(path, len(self._keys), expect)

    def __getitem__(self, i: int) -> ViewRecord:
        i = self._index(i)
        if self._data is not None:
            return self._decode(i, None)
        with _open_shard_file(self.path) as f:
            return self._decode(i, f)

    def read_many(self, indices: Sequence[int]) -> list[ViewRecord]:
        positions = [self._index(i) for i in indices]
        if self._data is not None:
            return [self._decode(i, None) for i in positions]
        with _open_shard_file(self.path) as f:  # one open for the batch, not one per record
            return [self._decode(i, f) for i in positions]

    def __iter__(self) -> Iterator[ViewRecord]:
        if self._data is not None:
            for i in range(len(self)):
                yield self._decode(i, None)
            return
        with _open_shard_file(self.path) as f:
            for i in range(len(self)):
                yield self._decode(i, f)

    def _build_index(self, f: BinaryIO) -> list[tuple[str, dict[str, tuple[int, int]]]]:
        """Validate every member header; return [(key, {suffix: (data offset, size)})] in order."""
        known = {"jpg", "json", "targets" + self._ext}
        scanned = _scan_ustar(f)
        if scanned is not None:  # the common case: our writer's plain ustar headers, read directly
            members, end = scanned
            records = self._index_records(((name, True, offset, size) for name, offset, size in members), known)
        else:  # anything unusual: tarfile parses it, and its view decides what is refused
            f.seek(0)
            try:
                with tarfile.open(fileobj=f, mode="r:") as tar:
                    records = self._index_records(((i.name, i.isreg(), i.offset_data, i.size) for i in tar), known)
                    end = tar.offset
            except tarfile.TarError as e:
                raise ShardError(f"{self.path}: tar structure: {e}") from e
        # tarfile stops quietly at the first unreadable header, so a file cut at a member boundary
        # or garbled mid-way would just look shorter; our writer always ends with zero blocks.
        f.seek(end)
        tail = f.read()
        if len(tail) < 2 * tarfile.BLOCKSIZE or tail.count(0) != len(tail):
            raise ShardError(f"{self.path}: tar end: no end-of-archive marker after member data (truncated or corrupt)")
        return records

    def _index_records(
        self, members: Iterator[tuple[str, bool, int, int]], known: set[str]
    ) -> list[tuple[str, dict[str, tuple[int, int]]]]:
        """Group (name, is regular file, data offset, size) members into records, validating each."""
        records: list[tuple[str, dict[str, tuple[int, int]]]] = []
        seen: set[str] = set()
        for name, isreg, offset, size in members:
            key, suffix = self._split_member(name, known)
            if not isreg:
                raise ShardError(f"{self.path}: member type: {name!r} is not a regular file")
            if not records or records[-1][0] != key:
                if key in seen:
                    raise ShardError(f"{self.path}: member order: members of key {key} are not contiguous")
                if records:
                    self._check_complete(*records[-1], known)
                seen.add(key)
                records.append((key, {}))
            entry = records[-1][1]
            if suffix in entry:
                raise ShardError(f"{self.path}: duplicate member {name!r}")
            if suffix == "targets.bin" and size != self._targets_nbytes:  # uncompressed targets
                raise ShardError(f"{self.path}: targets size: {size} bytes, expected {self._targets_nbytes}")
            entry[suffix] = (offset, size)
        if records:
            self._check_complete(*records[-1], known)
        return records

    def _split_member(self, name: str, known: set[str]) -> tuple[str, str]:
        if name.startswith("/") or ".." in name or "\\" in name:
            raise ShardError(f"{self.path}: member name {name!r}: absolute, '..' or backslash")
        match = _MEMBER_RE.fullmatch(name)
        if match is None:
            raise ShardError(f"{self.path}: member name {name!r}: not '<9 digits>.<suffix>'")
        if match.group(2) not in known:
            raise ShardError(
                f"{self.path}: member name {name!r}: unknown suffix {match.group(2)!r}, expected one of {sorted(known)}"
            )
        return match.group(1), match.group(2)

    def _check_complete(self, key: str, members: dict[str, tuple[int, int]], known: set[str]) -> None:
        missing = sorted(known - set(members))
        if missing:
            raise ShardError(f"{self.path}: missing member: record {key} lacks {missing}")

    def _decode(self, i: int, f: BinaryIO | None) -> ViewRecord:
        key, members = self._members[i]
        where = f"{self.path} record {key}"
        blob = lambda suffix: self._read(f, *members[suffix], where)  # noqa: E731
        meta = _decode_meta(blob("json"), where)
        payloads = _split_targets(blob("targets" + self._ext), self.fields, self._codec is not None, where)
        fields = {name: _decode_field(payloads[name], name, self.fields[name], self._codec, where) for name in payloads}
        return ViewRecord(key=key, image=blob("jpg"), fields=fields, **meta)

    def _read(self, f: BinaryIO | None, offset: int, size: int, where: str) -> bytes:
        if f is None:
            assert self._data is not None
            data = self._data[offset : offset + size]
        else:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise ShardError(f"{where}: truncated member data ({len(data)} of {size} bytes)")
        return data


class _ZarrReader(ShardReader):
    """Zarr shard. The small per-record columns are loaded and checked at open; fields and images
    are read per record. zarr objects are opened lazily per process (and never pickled), so the
    reader can be handed to DataLoader workers started by fork or spawn."""

    def __init__(self, path: Path, fields: dict[str, FieldSpec], expect: ShardInfo | None) -> None:
        super().__init__("zarr", path, fields)
        if not path.is_dir():
            raise ShardError(f"{path}: missing shard: no such directory")
        if expect is not None:
            nbytes, digest = _tree_digest(path)
            _verify_digest(path, nbytes, digest, expect)
        self._pid: int | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._direct: dict[str, _ShardFile | None] | None = None
        grp = self._open_group()
        self._keys, self._image_keys = self._load_attrs(grp)
        n = len(self._keys)
        self._check_arrays(grp, n)
        self._image_index = self._read_column(grp, "image_index")
        self._view_epoch = self._read_column(grp, "view_epoch")
        self._label = self._read_column(grp, "label")
        self._offsets = self._read_column(grp, "image_offsets")
        total = grp["image_bytes"].shape[0]
        if self._offsets[0] != 0 or np.any(np.diff(self._offsets) < 0) or self._offsets[-1] != total:
            raise ShardError(f"{path}: image_offsets: not monotone from 0 to the {total} image bytes")
        if expect is not None:
            _verify_count(path, n, expect)

    def __getitem__(self, i: int) -> ViewRecord:
        i = self._index(i)
        arrays = self._handles()
        start, stop = int(self._offsets[i]), int(self._offsets[i + 1])
        image = self._read(arrays["image_bytes"], slice(start, stop)).tobytes()
        fields = {name: self._read(arrays[name], i) for name in self.fields}
        return self._record(i, image, fields)

    def read_many(self, indices: Sequence[int]) -> list[ViewRecord]:
        positions = [self._index(i) for i in indices]
        if not positions:
            return []
        files = self._shard_files()
        if files is None:  # a layout the direct path does not know: let zarr-python read it
            return [self[i] for i in positions]
        blocks = {name: files[name].read_rows(positions) for name in self.fields}
        spans = [(int(self._offsets[i]), int(self._offsets[i + 1])) for i in positions]
        images = files["image_bytes"].read_spans(spans)
        return [
            self._record(i, image, {name: block[j] for name, block in blocks.items()})
            for j, (i, image) in enumerate(zip(positions, images))
        ]

    def __iter__(self) -> Iterator[ViewRecord]:
        arrays = self._handles()
        for lo in range(0, len(self), _ITER_BLOCK):
            hi = min(lo + _ITER_BLOCK, len(self))
            base = int(self._offsets[lo])
            images = self._read(arrays["image_bytes"], slice(base, int(self._offsets[hi]))).tobytes()
            blocks = {name: self._read(arrays[name], slice(lo, hi)) for name in self.fields}
            for i in range(lo, hi):
                image = images[int(self._offsets[i]) - base : int(self._offsets[i + 1]) - base]
                yield self._record(i, image, {name: block[i - lo] for name, block in blocks.items()})

    def __getstate__(self) -> dict[str, Any]:
        # zarr arrays hold a store and event-loop state of this process: reopen in the worker.
        state = self.__dict__.copy()
        state["_pid"], state["_arrays"] = None, {}
        return state

    def _record(self, i: int, image: bytes, fields: dict[str, np.ndarray]) -> ViewRecord:
        return ViewRecord(
            key=self._keys[i],
            image_index=int(self._image_index[i]),
            view_epoch=int(self._view_epoch[i]),
            label=int(self._label[i]),
            image_key=self._image_keys[i],
            image=image,
            fields=fields,
        )

    def _handles(self) -> dict[str, zarr.Array]:
        if self._pid != os.getpid():  # first use in this process (e.g. a forked worker)
            self._open_group()
        return self._arrays

    def _shard_files(self) -> dict[str, _ShardFile] | None:
        """Direct readers of each field's and the images' shard file, built on first use; None
        when an array is not laid out as ``_ZarrWriter`` writes it."""
        if self._direct is None:
            files = {}
            for name, arr in self._handles().items():
                data_file = self.path / name / arr.metadata.encode_chunk_key((0,) * arr.ndim)
                files[name] = _ShardFile.from_array(arr, data_file, f"{self.path}: array {name!r}")
            self._direct = files
        return None if any(f is None for f in self._direct.values()) else self._direct  # type: ignore[return-value]

    def _open_group(self) -> zarr.Group:
        try:
            store = LocalStore(self.path, read_only=True)
            grp = zarr.open_group(store, mode="r", zarr_format=3, use_consolidated=False)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ShardError(f"{self.path}: missing array group: not a zarr v3 group ({e})") from e
        self._arrays = {}
        for name in (*self.fields, "image_bytes"):
            node = grp.get(name)
            if isinstance(node, zarr.Array):  # absence is reported by _check_arrays with the details
                self._arrays[name] = node
        self._pid = os.getpid()
        return grp

    def _load_attrs(self, grp: zarr.Group) -> tuple[list[str], list[str]]:
        attrs = grp.attrs.get(_ZARR_ATTR)
        if not isinstance(attrs, dict) or attrs.get("version") != _ZARR_LAYOUT_VERSION:
            raise ShardError(f"{self.path}: group attributes: no '{_ZARR_ATTR}' version {_ZARR_LAYOUT_VERSION} entry")
        keys, image_keys = attrs.get("keys"), attrs.get("image_keys")
        if not isinstance(keys, list) or not all(isinstance(k, str) and _KEY_RE.fullmatch(k) for k in keys):
            raise ShardError(f"{self.path}: group attributes: 'keys' is not a list of 9-digit strings")
        if len(set(keys)) != len(keys):
            raise ShardError(f"{self.path}: group attributes: duplicate keys")
        if not (isinstance(image_keys, list) and len(image_keys) == len(keys) and all(isinstance(k, str) for k in image_keys)):
            raise ShardError(f"{self.path}: group attributes: 'image_keys' is not {len(keys)} strings")
        return keys, image_keys

    def _check_arrays(self, grp: zarr.Group, n: int) -> None:
        expected: dict[str, tuple[np.dtype, tuple[int, ...] | None]] = {
            "image_index": (np.dtype(np.int64), (n,)),
            "view_epoch": (np.dtype(np.int32), (n,)),
            "label": (np.dtype(np.int64), (n,)),
            "image_offsets": (np.dtype(np.int64), (n + 1,)),
            "image_bytes": (np.dtype(np.uint8), None),  # 1-D, any length
        }
        expected.update({name: (np.dtype(spec.dtype), (n, *spec.shape)) for name, spec in self.fields.items()})
        present = set(grp.keys())
        unexpected = sorted(present - set(expected))
        if unexpected:
            raise ShardError(f"{self.path}: unexpected array(s) {unexpected} not in the field specs")
        for name, (dtype, shape) in expected.items():
            node = grp.get(name)
            if not isinstance(node, zarr.Array):
                raise ShardError(f"{self.path}: missing array {name!r}")
            if node.dtype != dtype:
                raise ShardError(f"{self.path}: array dtype: {name!r} is {node.dtype}, expected {dtype}")
            if (shape is None and node.ndim != 1) or (shape is not None and node.shape != shape):
                raise ShardError(f"{self.path}: array shape: {name!r} is {list(node.shape)}, expected {shape or '1-D'}")
            # A deleted data file would silently read back as fill values.
            data_file = self.path / name / node.metadata.encode_chunk_key((0,) * node.ndim)
            if node.size and not data_file.is_file():
                raise ShardError(f"{self.path}: missing array data: {name!r} has no {data_file.name} file")

    def _read_column(self, grp: zarr.Group, name: str) -> np.ndarray:
        return self._read(grp[name], slice(None))

    def _read(self, arr: zarr.Array, selection: int | slice) -> np.ndarray:
        try:
            return arr[selection]
        except (OSError, ValueError, RuntimeError) as e:  # bad checksum, zstd error, short file
            raise ShardError(f"{self.path}: array data: reading {arr.basename!r}[{selection}] failed: {e}") from e


class _ShardFile:
    """Reads chunks of one zarr v3 array straight from its shard file, for ``read_many``.

    zarr-python spends about a millisecond of Python per chunk, several per record, which no
    training loader can afford; the layout ``_ZarrWriter`` produces is simple enough to read
    directly: a single shard file holding every chunk (chunked along the first axis only), each
    chunk raw little-endian bytes, optionally zstd-compressed, and the zarr v3 shard index
    (``[nchunks, 2]`` little-endian uint64 offset/length, then a crc32c) at the end. Anything else
    makes ``from_array`` return None and the caller falls back to zarr-python.
    """

    _MISSING = 2**64 - 1  # zarr's offset/length of a chunk that was never written

    def __init__(self, path: Path, where: str, rows_per_chunk: int, row_shape: tuple[int, ...], dtype: np.dtype,
                 nchunks: int, zstd: bool) -> None:
        self.path, self.where = path, where
        self.rows_per_chunk, self.row_shape, self.dtype = rows_per_chunk, row_shape, dtype
        self.nchunks = nchunks
        self.chunk_nbytes = rows_per_chunk * int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        self.codec = numcodecs.Zstd() if zstd else None
        self._index: np.ndarray | None = None
        self._data_end = 0

    @staticmethod
    def from_array(arr: zarr.Array, data_file: Path, where: str) -> _ShardFile | None:
        try:  # the metadata as stored (zarr's in-memory form uses tuples and enums)
            meta = json.loads((data_file.parents[len(arr.shape)] / "zarr.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        codecs = meta.get("codecs")
        if not (isinstance(codecs, list) and len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed"):
            return None
        cfg = codecs[0].get("configuration", {})
        outer = tuple(meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape", ()))
        inner = tuple(cfg.get("chunk_shape", ()))
        shape = tuple(arr.shape)
        if not (len(outer) == len(inner) == len(shape) >= 1 and all(o >= s for o, s in zip(outer, shape))):
            return None  # more than one shard file
        if inner[1:] != outer[1:] or inner[0] < 1 or outer[0] % inner[0]:
            return None  # chunked along more than the first axis
        inner_codecs = [c.get("name") for c in cfg.get("codecs", [])]
        endian = (cfg.get("codecs") or [{}])[0].get("configuration", {}).get("endian", "little")
        index_codecs = cfg.get("index_codecs")
        if (
            inner_codecs not in (["bytes"], ["bytes", "zstd"])
            or endian != "little"
            or index_codecs != [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
            or cfg.get("index_location", "end") != "end"
        ):
            return None
        dtype = np.dtype(arr.dtype).newbyteorder("<")
        return _ShardFile(data_file, where, inner[0], inner[1:], dtype, outer[0] // inner[0], inner_codecs[-1] == "zstd")

    def read_rows(self, rows: Sequence[int]) -> np.ndarray:
        """Rows (one chunk each) stacked: ``[len(rows), *row_shape]``."""
        out = np.empty((len(rows), *self.row_shape), self.dtype)
        flat = out.view(np.uint8).reshape(len(rows), -1)
        with self._open() as f:
            for j, row in enumerate(rows):
                self._decode(f, row, flat[j])
        return out.astype(self.dtype.newbyteorder("="), copy=False)

    def read_spans(self, spans: Sequence[tuple[int, int]]) -> list[bytes]:
        """Byte ranges ``[start, stop)`` of a 1-D uint8 array (the ragged images)."""
        chunks: dict[int, bytes] = {}  # neighbouring images share chunks; decode each once
        out = []
        with self._open() as f:
            for start, stop in spans:
                first, last = start // self.chunk_nbytes, -(-stop // self.chunk_nbytes)
                for c in range(first, last):
                    if c not in chunks:
                        buf = np.empty(self.chunk_nbytes, np.uint8)
                        self._decode(f, c, buf)
                        chunks[c] = buf.tobytes()
                base = first * self.chunk_nbytes
                out.append(b"".join(chunks[c] for c in range(first, last))[start - base : stop - base])
        return out

    def _open(self) -> BinaryIO:
        f = _open_array_file(self.path, self.where)
        if self._index is None:
            try:
                self._index = self._read_index(f)
            except BaseException:
                f.close()
                raise
        return f

    def _read_index(self, f: BinaryIO) -> np.ndarray:
        size = os.fstat(f.fileno()).st_size
        index_nbytes = self.nchunks * 16 + 4
        if size < index_nbytes:
            raise ShardError(f"{self.where}: shard index: file of {size} bytes cannot hold a {self.nchunks}-chunk index")
        f.seek(size - index_nbytes)
        try:
            body = numcodecs.CRC32C(location="end").decode(f.read(index_nbytes))
        except RuntimeError as e:
            raise ShardError(f"{self.where}: shard index: {e}") from e
        self._data_end = size - index_nbytes
        return np.frombuffer(body, "<u8").reshape(self.nchunks, 2)

    def _decode(self, f: BinaryIO, chunk: int, out: np.ndarray) -> None:
        assert self._index is not None
        if not 0 <= chunk < self.nchunks:
            raise ShardError(f"{self.where}: chunk {chunk} is outside the shard's {self.nchunks} chunks")
        offset, length = (int(v) for v in self._index[chunk])
        if offset == self._MISSING:  # the writer stores every chunk, even all-zero ones
            raise ShardError(f"{self.where}: missing chunk {chunk} in the shard index")
        if offset + length > self._data_end:
            raise ShardError(f"{self.where}: shard index: chunk {chunk} at {offset}+{length} runs past the data")
        f.seek(offset)
        payload = f.read(length)
        if self.codec is None:
            if length != self.chunk_nbytes:
                raise ShardError(f"{self.where}: chunk {chunk} size: {length} bytes, expected {self.chunk_nbytes}")
            out[:] = np.frombuffer(payload, np.uint8)
            return
        declared = _zstd_content_size(payload)  # the size cap keeps a zstd bomb out, as in the tar
        if declared != self.chunk_nbytes:
            raise ShardError(f"{self.where}: chunk {chunk} size: zstd frame declares {declared} bytes, expected {self.chunk_nbytes}")
        try:
            self.codec.decode(payload, out=out)
        except (RuntimeError, ValueError) as e:
            raise ShardError(f"{self.where}: chunk {chunk} data: zstd decode failed: {e}") from e


# ---------------------------------------------------------------------------------------------
# helpers


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown shard format {fmt!r}, expected one of {FORMATS}")


def parse_compressor(compressor: str) -> int | None:
    """zstd level for "zstd:LEVEL", None for "none"."""
    if compressor == "none":
        return None
    name, _, level = compressor.partition(":")
    if name == "zstd" and re.fullmatch(r"-?[0-9]+", level) and -131072 <= int(level) <= 22:
        return int(level)
    raise ValueError(f"compressor must be 'none' or 'zstd:LEVEL' (LEVEL in -131072..22), got {compressor!r}")


def _check_specs(fields: dict[str, FieldSpec]) -> dict[str, FieldSpec]:
    for name, spec in fields.items():
        if not _FIELD_NAME_RE.fullmatch(name) or name in _RESERVED_NAMES:
            raise ValueError(
                f"field name {name!r} must match {_FIELD_NAME_RE.pattern} and not be one of {sorted(_RESERVED_NAMES)}"
            )
        dtype = np.dtype(spec.dtype)
        # check_fields compares dtype strings, so an alias such as "i1" would never match an array.
        if str(dtype) != spec.dtype or dtype.kind not in "biuf":
            raise ValueError(f"field {name!r}: dtype {spec.dtype!r} must be a canonical numeric numpy name")
        if spec.nbytes() == 0:
            raise ValueError(f"field {name!r}: shape {list(spec.shape)} has no elements")
    return dict(fields)


def _check_record(rec: ViewRecord, specs: dict[str, FieldSpec], keys: set[str], where: str) -> None:
    if not isinstance(rec.key, str) or not _KEY_RE.fullmatch(rec.key):
        raise ValueError(f"{where}: key must be 9 ASCII digits")
    if rec.key in keys:
        raise ValueError(f"{where}: key already written to this shard")
    for attr, int_type in _INT_RANGES.items():
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


def _encode_meta(rec: ViewRecord) -> bytes:
    meta = {
        "image_index": int(rec.image_index),
        "view_epoch": int(rec.view_epoch),
        "label": int(rec.label),
        "image_key": rec.image_key,
    }
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _decode_meta(raw: bytes, where: str) -> dict[str, Any]:
    try:
        meta = json.loads(raw.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError
        raise ShardError(f"{where}: json meta does not parse: {e}") from e
    if not isinstance(meta, dict) or set(meta) != set(_META_TYPES):
        raise ShardError(f"{where}: json meta must have exactly the keys {sorted(_META_TYPES)}")
    for name, kind in _META_TYPES.items():
        if type(meta[name]) is not kind:  # bool is a subclass of int; reject it too
            raise ShardError(f"{where}: json meta {name!r} must be {kind.__name__}, got {type(meta[name]).__name__}")
    return meta


def _le_bytes(arr: np.ndarray) -> bytes:
    """Raw little-endian C-order bytes, the on-disk form of a field in the tar format."""
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def _split_targets(payload: bytes, specs: dict[str, FieldSpec], compressed: bool, where: str) -> dict[str, bytes]:
    """One record's targets member cut into per-field payloads (sorted field-name order)."""
    names = sorted(specs)
    if compressed:
        head = 4 * len(names)
        if len(payload) < head:
            raise ShardError(f"{where}: targets size: {len(payload)} bytes, shorter than its {head}-byte header")
        lengths = np.frombuffer(payload[:head], dtype="<u4").tolist()
        if head + sum(lengths) != len(payload):
            raise ShardError(f"{where}: targets size: header lists {sum(lengths)} bytes of frames, member holds {len(payload) - head}")
    else:
        lengths = [specs[n].nbytes() for n in names]
        if sum(lengths) != len(payload):
            raise ShardError(f"{where}: targets size: {len(payload)} bytes, expected {sum(lengths)}")
        head = 0
    out, start = {}, head
    for name, n in zip(names, lengths):
        out[name] = payload[start:start + n]
        start += n
    return out


def _decode_field(payload: bytes, name: str, spec: FieldSpec, codec: Any, where: str) -> np.ndarray:
    expected = spec.nbytes()
    if codec is None:
        if len(payload) != expected:
            raise ShardError(f"{where}: field {name} size: {len(payload)} bytes, expected {expected}")
        buf = np.frombuffer(bytearray(payload), np.uint8)  # bytearray: the array must be writable
    else:
        # Decompress only into a buffer of exactly the spec's size, and only a frame that declares
        # that size: numcodecs fills `out` without reporting a shorter result, and the size cap is
        # what keeps a zstd bomb from allocating more than one field.
        declared = _zstd_content_size(payload)
        if declared != expected:
            raise ShardError(f"{where}: field {name} size: zstd frame declares {declared} bytes, expected {expected}")
        buf = np.empty(expected, np.uint8)
        try:
            codec.decode(payload, out=buf)
        except (RuntimeError, ValueError) as e:
            raise ShardError(f"{where}: field {name} data: zstd decode failed: {e}") from e
    return buf.view(np.dtype(spec.dtype).newbyteorder("<")).reshape(spec.shape).astype(spec.dtype, copy=False)


def _zstd_content_size(frame: bytes) -> int | None:
    """Frame_Content_Size from a zstd frame header (RFC 8878 3.1.1.1), None if absent or not zstd."""
    if len(frame) < 5 or frame[:4] != _ZSTD_MAGIC:
        return None
    descriptor = frame[4]
    single_segment = (descriptor >> 5) & 1
    fcs_size = (single_segment, 2, 4, 8)[descriptor >> 6]
    if fcs_size == 0:
        return None
    start = 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3]  # window descriptor, dictionary id
    raw = frame[start : start + fcs_size]
    if len(raw) != fcs_size:
        return None
    return int.from_bytes(raw, "little") + (256 if fcs_size == 2 else 0)


def _verify_digest(path: Path, nbytes: int, digest: str, expect: ShardInfo) -> None:
    if nbytes != expect.nbytes:
        raise ShardError(f"{path}: size: {nbytes} bytes, manifest says {expect.nbytes}")
    if digest != expect.sha256:
        raise ShardError(f"{path}: checksum: sha256 {digest}, manifest says {expect.sha256}")


def _verify_count(path: Path, count: int, expect: ShardInfo) -> None:
    if count != expect.num_samples:
        raise ShardError(f"{path}: sample count: {count} records, manifest says {expect.num_samples}")


def _open_shard_file(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError as e:
        raise ShardError(f"{path}: missing shard: no such file") from e
    except IsADirectoryError as e:
        raise ShardError(f"{path}: missing shard: is a directory, expected a tar file") from e


_USTAR_MAGIC = b"ustar\x0000"  # POSIX ustar, what tarfile writes for short ASCII names
_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)


def _scan_ustar(f: BinaryIO) -> tuple[list[tuple[str, int, int]], int] | None:
    """(name, data offset, size) of every member and the offset of the end-of-archive blocks,
    read straight from the 512-byte headers, about ten times faster than tarfile (whose per-header
    Python dominated opening a shard). Returns None at anything but a plain ustar regular-file
    header with a valid checksum (pax or GNU headers, prefixes, links, short reads...): tarfile
    then reads the archive and its view of it is what gets validated."""
    block = tarfile.BLOCKSIZE
    members: list[tuple[str, int, int]] = []
    headers: list[bytes] = []
    checksums: list[int] = []
    pos = 0
    while True:
        f.seek(pos)
        hdr = f.read(block)
        if len(hdr) < block:
            return None
        if hdr == _ZERO_BLOCK:
            break
        if hdr[257:265] != _USTAR_MAGIC or hdr[156] not in (0x30, 0) or hdr[345] != 0 or hdr[124] & 0x80:
            return None
        raw_name = hdr[:100].split(b"\0", 1)[0]
        try:
            name = raw_name.decode("ascii")
            size = int(hdr[124:136].strip(b"\0 ") or b"0", 8)
            checksums.append(int(hdr[148:156].strip(b"\0 "), 8))
        except ValueError:  # UnicodeDecodeError too
            return None
        if not name or name.endswith("/"):
            return None
        headers.append(hdr)
        members.append((name, pos + block, size))
        pos += block + -(-size // block) * block
    if pos == 0:
        return None  # empty archive: tarfile's error message is the one to give
    # The header checksum (unsigned byte sum, its own field read as spaces), for all at once.
    blocks = np.frombuffer(b"".join(headers), np.uint8).reshape(len(headers), block).astype(np.int64)
    sums = blocks.sum(axis=1) - blocks[:, 148:156].sum(axis=1) + 8 * ord(" ")
    if not np.array_equal(sums, np.asarray(checksums, np.int64)):
        return None
    return members, pos


def _open_array_file(path: Path, where: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as e:
        raise ShardError(f"{where}: missing array data: cannot open {path.name} ({e.strerror})") from e


def _tree_files(root: Path) -> list[tuple[str, Path]]:
    """Every file under a zarr shard directory as (relative posix path, path), sorted by the former."""
    if not root.is_dir():
        raise ShardError(f"{root}: missing shard: no such directory")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if os.path.islink(os.path.join(dirpath, name)):
                raise ShardError(f"{root}: symlink {os.path.join(dirpath, name)!r} inside a shard")
        for name in filenames:
            p = Path(dirpath, name)
            files.append((p.relative_to(root).as_posix(), p))
    return sorted(files)


def _tree_digest(root: Path) -> tuple[int, str]:
    """(total bytes, sha256) of a zarr shard directory, as defined in ``shard_sha256``."""
    digest = hashlib.sha256()
    total = 0
    for rel, p in _tree_files(root):
        data = p.read_bytes()
        digest.update(rel.encode("utf-8") + b"\0" + len(data).to_bytes(8, "little"))
        digest.update(data)
        total += len(data)
    return total, digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _publish(tmp: Path, path: Path) -> None:
    """Move a finished temporary to its final name. A file replaces atomically; a directory cannot
    replace a non-empty one, so the old shard is first renamed aside (readers then see either the
    old or no shard, never a half-deleted one) and removed after."""
    if tmp.is_dir() and (path.exists() or path.is_symlink()):
        old = _sibling(path, ".old")
        _remove(old)
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)
    fsync_dir(path.parent)

"""The zarr v3 shard format (``"zarr"``, one group directory per shard): writer, reader, and the
direct shard-file path that makes batched random reads fast.

Data flow: ``ViewRecord``s -> ``ZarrWriter`` -> ``shard.zarr/`` -> ``ZarrReader`` (``read_many``
through ``ShardFile``) -> ``ViewRecord``s. Each field is an array ``(n, *spec.shape)`` with one
chunk per record, all chunks in one zarr shard file (so reading a record is a partial read);
``image_index``/``view_epoch``/``label`` are 1-D arrays; images are the ragged pair
``image_bytes`` (uint8, uncompressed) + ``image_offsets`` (int64, n+1); record keys and image keys
are JSON lists in the group attribute ``tec_shard``. A shard's sha256 is over every file in sorted
relative-posix-path order, each hashed as ``path utf-8, NUL, 8-byte LE length, bytes``; its size is
the sum of the file sizes.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numcodecs
import numpy as np
import zarr
import zarr.codecs
from zarr.storage import LocalStore

from tec_cache.format.base import ShardFormat, ShardReader, ShardWriter, verify_count, verify_digest
from tec_cache.format.fs import fsync_tree
from tec_cache.format.payload import zstd_content_size
from tec_cache.format.schema import KEY_RE, FieldSpec, ShardError, ShardInfo, ViewRecord
from tec_cache.runtime.faults import fault_point

__all__ = ["ShardFile", "ZarrFormat", "ZarrReader", "ZarrWriter"]

_ZARR_ATTR = "tec_shard"
_ZARR_LAYOUT_VERSION = 1
_IMAGE_CHUNK = 64 * 1024
_ITER_BLOCK = 64  # ZarrReader.__iter__ reads this many records per array read


class ZarrFormat(ShardFormat):
    name = "zarr"
    suffix = ".zarr"

    def digest(self, path: Path) -> str:
        """sha256 of the shard directory, as the module docstring defines it."""
        return _tree_digest(Path(path))[1]

    def nbytes(self, path: Path) -> int:
        """Sum of the shard directory's file sizes."""
        return sum(p.stat().st_size for _, p in _tree_files(Path(path)))

    def _writer(self, path: Path, fields: dict[str, FieldSpec], level: int | None) -> ZarrWriter:
        return ZarrWriter(path, fields, level)

    def _reader(self, path: Path, fields: dict[str, FieldSpec], level: int | None,
                expect: ShardInfo | None, buffer: bytearray | None = None) -> ZarrReader:
        return ZarrReader(path, fields, expect)  # reads per chunk, never a whole shard: no buffer


class ZarrWriter(ShardWriter):
    """Buffers records in memory (shards are small) and writes every array at close()."""

    def __init__(self, path: Path, fields: dict[str, FieldSpec], level: int | None) -> None:
        super().__init__(path, fields)
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
            self._write_array(grp, name, data, (1, *spec.shape), shards=(max(n, 1), *spec.shape), compress=spec.compress)
        offsets = np.zeros(n + 1, np.int64)
        offsets[1:] = np.cumsum([len(img) for img in self._images])
        self._write_array(grp, "image_offsets", offsets, (n + 1,))
        blob = np.frombuffer(b"".join(self._images), np.uint8)
        self._images = []
        chunk = min(_IMAGE_CHUNK, max(blob.size, 1))
        shard = -(-max(blob.size, 1) // chunk) * chunk  # one zarr shard file, a whole number of chunks
        # JPEGs are already compressed: store them as is, like the tar does.
        self._write_array(grp, "image_bytes", blob, (chunk,), shards=(shard,), compress=False)
        fsync_tree(self._tmp)
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


class ZarrReader(ShardReader):
    """Zarr shard. The small per-record columns are loaded and checked at open; fields and images
    are read per record. zarr objects are opened lazily per process (and never pickled), so the
    reader can be handed to DataLoader workers started by fork or spawn."""

    def __init__(self, path: Path, fields: dict[str, FieldSpec], expect: ShardInfo | None) -> None:
        super().__init__(path, fields)
        if not path.is_dir():
            raise ShardError(f"{path}: missing shard: no such directory")
        if expect is not None:
            nbytes, digest = _tree_digest(path)
            verify_digest(path, nbytes, digest, expect)
        self._pid: int | None = None
        self._arrays: dict[str, zarr.Array] = {}
        # Direct shard-file readers, made on first use; None there: some array is laid out otherwise.
        self._direct: dict[str, ShardFile] | None = None
        self._direct_made = False
        grp = self._open_group()
        self._keys, self._image_keys = self._load_attrs(grp)
        n = len(self._keys)
        self._check_arrays(grp, n)
        self._image_index = self._read_column(grp, "image_index")
        self._view_epoch = self._read_column(grp, "view_epoch")
        self._label = self._read_column(grp, "label")
        self._offsets = self._read_column(grp, "image_offsets")
        total = self._array(grp, "image_bytes").shape[0]
        if self._offsets[0] != 0 or np.any(np.diff(self._offsets) < 0) or self._offsets[-1] != total:
            raise ShardError(f"{path}: image_offsets: not monotone from 0 to the {total} image bytes")
        if expect is not None:
            verify_count(path, n, expect)

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
        return self._direct_records(files, positions, blocks, range(len(positions)))

    def read_into(self, indices: Sequence[int], out: dict[str, np.ndarray], rows: Sequence[int]) -> list[ViewRecord]:
        positions = [self._index(i) for i in indices]
        files = self._shard_files() if positions else None
        if files is None or sys.byteorder != "little":  # zarr-python, or stored bytes that need swapping
            return super().read_into(indices, out, rows)
        for name in self.fields:
            files[name].read_rows_into(positions, out[name], rows)
        return self._direct_records(files, positions, out, rows)

    def _direct_records(self, files: dict[str, ShardFile], positions: list[int], arrays: dict[str, np.ndarray],
                        rows: Sequence[int]) -> list[ViewRecord]:
        """The records at ``positions``, fields ``arrays[name][rows[j]]``, images read in one pass."""
        images = files["image_bytes"].read_spans([(int(self._offsets[i]), int(self._offsets[i + 1])) for i in positions])
        return [self._record(i, image, {name: arrays[name][row] for name in self.fields})
                for i, image, row in zip(positions, images, rows)]

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

    def _shard_files(self) -> dict[str, ShardFile] | None:
        """Direct readers of each field's and the images' shard file, built on first use; None
        when an array is not laid out as ``ZarrWriter`` writes it."""
        if not self._direct_made:
            files = {}
            for name, arr in self._handles().items():
                data_file = Path(self.path) / name / arr.metadata.encode_chunk_key((0,) * arr.ndim)
                files[name] = ShardFile.from_array(arr, data_file, f"{self.path}: array {name!r}")
            direct = {name: f for name, f in files.items() if f is not None}
            self._direct = direct if len(direct) == len(files) else None
            self._direct_made = True
        return self._direct

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
        if not isinstance(keys, list) or not all(isinstance(k, str) and KEY_RE.fullmatch(k) for k in keys):
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
            data_file = Path(self.path) / name / node.metadata.encode_chunk_key((0,) * node.ndim)
            if node.size and not data_file.is_file():
                raise ShardError(f"{self.path}: missing array data: {name!r} has no {data_file.name} file")

    def _array(self, grp: zarr.Group, name: str) -> zarr.Array:
        node = grp[name]
        if not isinstance(node, zarr.Array):
            raise ShardError(f"{self.path}: array {name!r}: a group, expected an array")
        return node

    def _read_column(self, grp: zarr.Group, name: str) -> np.ndarray:
        return self._read(self._array(grp, name), slice(None))

    def _read(self, arr: zarr.Array, selection: int | slice) -> np.ndarray:
        try:
            return np.asarray(arr[selection])
        except (OSError, ValueError, RuntimeError) as e:  # bad checksum, zstd error, short file
            raise ShardError(f"{self.path}: array data: reading {arr.basename!r}[{selection}] failed: {e}") from e


class ShardFile:
    """Reads chunks of one zarr v3 array straight from its shard file, for ``read_many``.

    zarr-python spends about a millisecond of Python per chunk, several per record, which no
    training loader can afford; the layout ``ZarrWriter`` produces is simple enough to read
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
    def from_array(arr: zarr.Array, data_file: Path, where: str) -> ShardFile | None:
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
        return ShardFile(data_file, where, inner[0], inner[1:], dtype, outer[0] // inner[0], inner_codecs[-1] == "zstd")

    def read_rows(self, rows: Sequence[int]) -> np.ndarray:
        """Rows (one chunk each) stacked: ``[len(rows), *row_shape]``."""
        out = np.empty((len(rows), *self.row_shape), self.dtype)
        self.read_rows_into(rows, out, range(len(rows)))
        return out.astype(self.dtype.newbyteorder("="), copy=False)

    def read_rows_into(self, rows: Sequence[int], out: np.ndarray, at: Sequence[int]) -> None:
        """Rows (one chunk each) decoded into ``out[at[j]]`` (C-contiguous rows of this array's size;
        the chunks' little-endian bytes as they are)."""
        with self._open() as f:
            for row, j in zip(rows, at):
                dest = out[j].reshape(-1).view(np.uint8)
                if dest.size != self.chunk_nbytes:
                    raise ValueError(f"{self.where}: output row of {dest.size} bytes for chunks of {self.chunk_nbytes}")
                self._decode(f, row, dest)

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
        declared = zstd_content_size(payload)  # the size cap keeps a zstd bomb out, as in the tar
        if declared != self.chunk_nbytes:
            raise ShardError(f"{self.where}: chunk {chunk} size: zstd frame declares {declared} bytes, expected {self.chunk_nbytes}")
        try:
            self.codec.decode(payload, out=out)
        except (RuntimeError, ValueError) as e:
            raise ShardError(f"{self.where}: chunk {chunk} data: zstd decode failed: {e}") from e



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
    """(total bytes, sha256) of a zarr shard directory, as the module docstring defines it."""
    digest = hashlib.sha256()
    total = 0
    for rel, p in _tree_files(root):
        data = p.read_bytes()
        digest.update(rel.encode("utf-8") + b"\0" + len(data).to_bytes(8, "little"))
        digest.update(data)
        total += len(data)
    return total, digest.hexdigest()



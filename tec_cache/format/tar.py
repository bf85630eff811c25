"""The WebDataset tar shard format (``"webdataset"``, one ``.tar`` per shard): writer, reader and
the fast header scan that opens a shard.

Data flow: ``ViewRecord``s -> ``TarWriter`` -> ``shard.tar`` -> ``TarReader`` -> ``ViewRecord``s.
Per record, members ``{key}.jpg`` (the view's JPEG, stored as is), ``{key}.json`` (utf-8 JSON with
image_index, view_epoch, label, image_key) and ``{key}.targets.zst`` (or ``.targets.bin`` with
compressor "none"): every target field framed as ``payload.py`` says. One member per view instead
of one per field saves ~4 KB of tar headers and padding per view. Members carry mtime 0 and a fixed
owner, so equal records give a byte-identical tar. A shard's sha256 and size are the file's.

The writer emits each member as tarfile's own header (``TarInfo.tobuf``), the data and its padding,
and ends the archive as tarfile's stream mode does (two zero blocks, padded to a 10 KB record): the
same bytes as ``webdataset.TarWriter`` wrote for the caches built before, at 0.25 ms less per view
(its per-member Python and 10 KB stream chunks; benchmarks/bench_host.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np

from tec_cache.format.base import ShardFormat, ShardReader, ShardWriter, verify_count, verify_digest
from tec_cache.format.payload import decode_field_into, encode_targets, make_codec, split_targets
from tec_cache.format.schema import META_TYPES, FieldSpec, ShardError, ShardInfo, ViewRecord, check_specs, parse_compressor

__all__ = ["TarFormat", "TarReader", "TarWriter", "read_shard_into", "scan_ustar"]

_MEMBER_RE = re.compile(r"([0-9]{9})\.(.+)")
_TAR_USER = "tec"
_MODE = 0o444
_ENCODING = "utf-8"  # tarfile's defaults for names: the file-system encoding, surrogateescape
# The end of an archive in tarfile's stream mode: two zero blocks, then zeros up to a whole record.
_END_BLOCKS = 2
_HASH_BLOCK = 1 << 20


class TarFormat(ShardFormat):
    name = "webdataset"
    suffix = ".tar"

    def digest(self, path: Path) -> str:
        """sha256 of the tar file."""
        digest = hashlib.sha256()
        with _open_shard_file(Path(path)) as f:
            while block := f.read(_HASH_BLOCK):
                digest.update(block)
        return digest.hexdigest()

    def nbytes(self, path: Path) -> int:
        """The tar file's size."""
        with _open_shard_file(Path(path)) as f:
            return os.fstat(f.fileno()).st_size

    def _writer(self, path: Path, fields: dict[str, FieldSpec], level: int | None) -> TarWriter:
        return TarWriter(path, fields, level)

    def _reader(self, path: Path, fields: dict[str, FieldSpec], level: int | None,
                expect: ShardInfo | None, buffer: bytearray | None = None) -> TarReader:
        return TarReader(path, fields, level, expect, buffer=buffer)

    def open_bytes(self, name: str, data: bytes, fields: dict[str, FieldSpec], compressor: str = "zstd:3",
                   expect: ShardInfo | None = None) -> TarReader:
        return TarReader(name, check_specs(fields), parse_compressor(compressor), expect, data=data)


class _HashingSink:
    """File wrapper that hashes and counts what is written, so close() need not re-read the tar."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.digest = hashlib.sha256()
        self.nbytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.digest.update(data)
        self.nbytes += len(data)
        return self.f.write(data)

    def member(self, name: str, data: bytes) -> None:
        """One regular-file member: tarfile's header for it, the data, zeros to a whole block."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, _MODE
        info.uname = info.gname = _TAR_USER
        self.write(info.tobuf(tarfile.DEFAULT_FORMAT, _ENCODING, "surrogateescape"))
        self.write(data)
        pad = -len(data) % tarfile.BLOCKSIZE
        if pad:
            self.write(bytes(pad))

    def end(self) -> None:
        end = _END_BLOCKS * tarfile.BLOCKSIZE
        self.write(bytes(end + -(self.nbytes + end) % tarfile.RECORDSIZE))


class TarWriter(ShardWriter):
    def __init__(self, path: Path, fields: dict[str, FieldSpec], level: int | None) -> None:
        super().__init__(path, fields)
        self._codec = make_codec(level)
        self._ext = ".bin" if level is None else ".zst"
        self._file = open(self._tmp, "wb")
        self._sink = _HashingSink(self._file)

    def _add(self, rec: ViewRecord) -> None:
        # Members in sorted suffix order, with fixed mtime/owner/mode: the tar is a pure function of the records.
        self._sink.member(f"{rec.key}.jpg", bytes(rec.image))
        self._sink.member(f"{rec.key}.json", _encode_meta(rec))
        self._sink.member(f"{rec.key}.targets{self._ext}", encode_targets(rec.fields, self.fields, self._codec))

    def _finish(self) -> tuple[int, str]:
        self._sink.end()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._sink.nbytes, self._sink.digest.hexdigest()

    def _discard(self) -> None:
        # Closing flushes what is still buffered, which fails again on a full disk; the file is closed
        # all the same and the temporary is deleted next, so that failure changes nothing.
        with contextlib.suppress(OSError):
            self._file.close()



class TarReader(ShardReader):
    """Tar shard; an in-memory member index (offsets into the file) gives random access."""

    def __init__(self, path: Path | str, fields: dict[str, FieldSpec], level: int | None, expect: ShardInfo | None,
                 data: bytes | None = None, buffer: bytearray | None = None) -> None:
        """``data``: the shard's bytes, already in memory, their size and sha256 checked where they
        were read (a streamed remote shard; ``path`` then only names it in messages); with
        ``expect`` only the record count is checked here. ``buffer``: with ``expect``, read the shard
        into this bytearray (a larger one is made when it is too small), which the reader then
        owns until ``release()``; a loader worker passes the buffer of the reader it just released,
        because filling fresh memory costs six times what reading into warm memory does."""
        super().__init__(path, fields)
        self._codec = make_codec(level)
        self._ext = ".bin" if level is None else ".zst"
        self._targets_nbytes = sum(spec.nbytes() for spec in fields.values())
        self.buffer: bytearray | None = None
        self._released = False
        # With expect the whole file is read once, verified, and every record is parsed from those
        # verified bytes (reading the file again could see different bytes).
        self._data: bytes | memoryview | None = None
        held: bytes | memoryview | None = data
        if held is None and expect is not None:
            held = self._read_whole(path, buffer)
            verify_digest(path, len(held), hashlib.sha256(held).hexdigest(), expect)
        if held is not None:
            self._data = held
            # _ViewFile gives the index scan a file's seek, tell and read over the bytes in memory.
            self._members = self._build_index(cast(BinaryIO, _ViewFile(memoryview(held))))
        else:
            with _open_shard_file(path) as f:
                self._members = self._build_index(f)
        self._keys = [key for key, _ in self._members]
        if expect is not None:
            verify_count(path, len(self._keys), expect)

    def _read_whole(self, path: Path | str, buffer: bytearray | None) -> bytes | memoryview:
        if buffer is None:
            with _open_shard_file(path) as f:
                return f.read()
        data, self.buffer = read_shard_into(path, buffer)
        return data

    def release(self) -> bytearray | None:
        """Give up the shard's bytes: returns the buffer passed in (or grown), for the next reader;
        this reader reads nothing afterwards."""
        buffer, self.buffer, self._data, self._released = self.buffer, None, None, True
        return buffer

    def _check_open(self) -> None:
        if self._released:
            raise ShardError(f"{self.path}: the reader was released (its shard's bytes went to another reader)")

    def read_into(self, indices: Sequence[int], out: dict[str, np.ndarray], rows: Sequence[int]) -> list[ViewRecord]:
        """``read_many`` that decodes each record's fields straight into ``out[name][row]`` (one
        write per field, no intermediate arrays). The returned records' ``fields`` are those rows;
        their ``image`` is a view of the shard's bytes while a verified shard is held in memory
        (valid until ``release()``: decode it before then), else the member's bytes."""
        self._check_open()
        positions = [self._index(i) for i in indices]
        if self._data is not None:
            return [self._decode_into(i, None, out, row) for i, row in zip(positions, rows)]
        with _open_shard_file(self.path) as f:
            return [self._decode_into(i, f, out, row) for i, row in zip(positions, rows)]

    def __getitem__(self, i: int) -> ViewRecord:
        self._check_open()
        i = self._index(i)
        if self._data is not None:
            return self._decode(i, None)
        with _open_shard_file(self.path) as f:
            return self._decode(i, f)

    def read_many(self, indices: Sequence[int]) -> list[ViewRecord]:
        self._check_open()
        positions = [self._index(i) for i in indices]
        if self._data is not None:
            return [self._decode(i, None) for i in positions]
        with _open_shard_file(self.path) as f:  # one open for the batch, not one per record
            return [self._decode(i, f) for i in positions]

    def __iter__(self) -> Iterator[ViewRecord]:
        self._check_open()
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
        scanned = scan_ustar(f)
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
        out = {name: np.empty((1, *spec.shape), spec.dtype) for name, spec in self.fields.items()}
        rec = self._decode_into(i, f, out, 0)
        rec.image = bytes(rec.image)  # a copy: a record must not pin the shard's bytes
        return rec

    def _decode_into(self, i: int, f: BinaryIO | None, out: dict[str, np.ndarray], row: int) -> ViewRecord:
        key, members = self._members[i]
        where = f"{self.path} record {key}"

        def blob(suffix: str) -> bytes | memoryview:
            return self._read(f, *members[suffix], where)

        meta = _decode_meta(bytes(blob("json")), where)
        payloads = split_targets(memoryview(blob("targets" + self._ext)), self.fields, self._codec is not None, where)
        fields = {}
        for name, payload in payloads.items():
            decode_field_into(payload, name, self.fields[name], self._codec, where, out[name][row])
            fields[name] = out[name][row]
        return ViewRecord(key=key, image=blob("jpg"), fields=fields, **meta)

    def _read(self, f: BinaryIO | None, offset: int, size: int, where: str) -> bytes | memoryview:
        """A member's bytes: a view of the shard's bytes when they are held in memory (callers that
        return a record copy it, so no record pins the shard), else read from the file."""
        data: bytes | memoryview
        if f is None:
            self._check_open()
            assert self._data is not None
            data = memoryview(self._data)[offset : offset + size]
        else:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise ShardError(f"{where}: truncated member data ({len(data)} of {size} bytes)")
        return data


def read_shard_into(path: Path | str, buffer: bytearray) -> tuple[memoryview, bytearray]:
    """The shard file at ``path`` read into ``buffer`` (or into a new bytearray when it is too
    small): a view of its bytes and the bytearray holding them."""
    with _open_shard_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        if len(buffer) < size:
            buffer = bytearray(size)
        view = memoryview(buffer)[:size]
        got = 0
        while got < size and (n := f.readinto(view[got:])):
            got += n
        return view[:got], buffer


class _ViewFile:
    """The file calls the header scan and tarfile make (seek, tell, read) over bytes in memory,
    without copying them all into a BytesIO first (a 46 MB copy per shard)."""

    def __init__(self, view: memoryview) -> None:
        self.view, self.pos = view, 0

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else len(self.view) + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = len(self.view) if n is None or n < 0 else min(self.pos + n, len(self.view))
        data = bytes(self.view[self.pos:end])
        self.pos = max(self.pos, end)
        return data


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
    if not isinstance(meta, dict) or set(meta) != set(META_TYPES):
        raise ShardError(f"{where}: json meta must have exactly the keys {sorted(META_TYPES)}")
    for name, kind in META_TYPES.items():
        if type(meta[name]) is not kind:  # bool is a subclass of int; reject it too
            raise ShardError(f"{where}: json meta {name!r} must be {kind.__name__}, got {type(meta[name]).__name__}")
    return meta



def _open_shard_file(path: Path | str) -> io.BufferedReader:
    try:
        return open(path, "rb")
    except FileNotFoundError as e:
        raise ShardError(f"{path}: missing shard: no such file") from e
    except IsADirectoryError as e:
        raise ShardError(f"{path}: missing shard: is a directory, expected a tar file") from e


_USTAR_MAGIC = b"ustar\x0000"  # POSIX ustar, what tarfile writes for short ASCII names
_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)


def scan_ustar(f: BinaryIO) -> tuple[list[tuple[str, int, int]], int] | None:
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



"""Conformance suite for the shard formats of tec_cache.format: every behaviour is checked for both on-disk formats;
format-specific hostile-input checks follow at the end."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import torch
import zarr
from zarr.storage import LocalStore

from tec_cache.format import FORMATS, FieldSpec, ShardError, ShardInfo, ViewRecord, get_format, open_reader, open_writer

L, D, H, K = 16, 8, 2, 3
SPECS = {
    "feat_q": FieldSpec("int8", (L, D)),
    "feat_lo": FieldSpec("float16", (D,)),
    "feat_scale": FieldSpec("float16", (D,)),
    "att_q": FieldSpec("int8", (2, H, L)),
    "idx": FieldSpec("int16", (K,)),
}


def make_records(n: int, seed: int = 0) -> list[ViewRecord]:
    """Random records in a shuffled (not key-sorted) order, with awkward image keys and sizes."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(10 * n)[:n]
    recs = []
    for j, image_index in enumerate(order):
        fields: dict[str, np.ndarray] = {
            "feat_q": rng.integers(-128, 128, (L, D), dtype=np.int8),
            "feat_lo": rng.standard_normal(D).astype(np.float16),
            "feat_scale": rng.random(D).astype(np.float16),
            "att_q": rng.integers(-128, 128, (2, H, L), dtype=np.int8),
            "idx": rng.integers(0, L, K).astype(np.int16),
        }
        if j == 1:
            fields["feat_q"][:] = 0  # an all-fill-value record must still round-trip
        recs.append(
            ViewRecord(
                key=f"{int(image_index):09d}",
                image_index=int(image_index),
                view_epoch=3,
                label=int(rng.integers(-1, 1000)),
                image_key=f"train/n{j:04d}/\u00fcml\u00e4ut \u65e5\u672c \"q\"\n{j}.JPEG",
                image=b"" if j == 2 else rng.bytes(int(rng.integers(1, 3000))),
                fields=fields,
            )
        )
    return recs


def shard_path(tmp_path: Path, fmt: str, name: str = "shard") -> Path:
    return tmp_path / (name + get_format(fmt).suffix)


def write_shard(fmt: str, path: Path, recs: list[ViewRecord], compressor: str = "zstd:3") -> ShardInfo:
    with open_writer(fmt, path, SPECS, compressor) as w:
        for rec in recs:
            w.write(rec)
        return w.close()


def assert_same(got: ViewRecord, want: ViewRecord) -> None:
    for attr in ("key", "image_index", "view_epoch", "label", "image_key", "image"):
        assert getattr(got, attr) == getattr(want, attr), attr
    assert type(got.image) is bytes
    assert set(got.fields) == set(want.fields)
    for name, arr in want.fields.items():
        assert got.fields[name].dtype == arr.dtype and got.fields[name].shape == arr.shape, name
        np.testing.assert_array_equal(got.fields[name], arr, err_msg=name)
        assert got.fields[name].flags.writeable, name


def tree_bytes(fmt: str, path: Path) -> dict[str, bytes]:
    if fmt == "webdataset":
        return {"": path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def largest_file(fmt: str, path: Path) -> Path:
    if fmt == "webdataset":
        return path
    return max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.fixture(params=FORMATS)
def fmt(request: pytest.FixtureRequest) -> str:
    return request.param


# --- round trip ---------------------------------------------------------------------------------


@pytest.mark.parametrize("compressor", ["zstd:3", "none"])
def test_round_trip(fmt: str, compressor: str, tmp_path: Path) -> None:
    recs = make_records(40)
    path = shard_path(tmp_path, fmt)
    info = write_shard(fmt, path, recs, compressor)
    assert info == ShardInfo(len(recs), get_format(fmt).nbytes(path), get_format(fmt).digest(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporaries left
    for expect in (None, info):
        reader = open_reader(fmt, path, SPECS, compressor, expect=expect)
        assert len(reader) == len(recs)
        assert reader.keys() == [r.key for r in recs]
        got = list(reader)
        assert len(got) == len(recs)
        for g, w in zip(got, recs):
            assert_same(g, w)
        for i in (0, 17, len(recs) - 1, -1, -len(recs)):
            assert_same(reader[i], recs[i])
        for i in (len(recs), -len(recs) - 1):
            with pytest.raises(IndexError):
                reader[i]


def test_empty_shard(fmt: str, tmp_path: Path) -> None:
    path = shard_path(tmp_path, fmt)
    info = write_shard(fmt, path, [])
    reader = open_reader(fmt, path, SPECS, expect=info)
    assert info.num_samples == 0 and len(reader) == 0 and list(reader) == [] and reader.keys() == []


def test_rewrite_is_byte_identical(fmt: str, tmp_path: Path) -> None:
    recs = make_records(20, seed=1)
    first, second = shard_path(tmp_path / "a", fmt), shard_path(tmp_path / "b", fmt)
    first.parent.mkdir()
    second.parent.mkdir()
    info = write_shard(fmt, first, recs)
    assert write_shard(fmt, second, recs) == info
    assert tree_bytes(fmt, first) == tree_bytes(fmt, second)
    # Overwriting an existing shard in place gives the same bytes and leaves no .tmp/.old behind.
    assert write_shard(fmt, first, recs) == info
    assert tree_bytes(fmt, first) == tree_bytes(fmt, second)
    assert [p.name for p in first.parent.iterdir()] == [first.name]


# --- atomic publication -------------------------------------------------------------------------


def test_exception_in_context_leaves_nothing(fmt: str, tmp_path: Path) -> None:
    path = shard_path(tmp_path, fmt)
    with pytest.raises(RuntimeError, match="boom"):
        with open_writer(fmt, path, SPECS) as w:
            w.write(make_records(1)[0])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_aborted_rewrite_keeps_old_shard(fmt: str, tmp_path: Path) -> None:
    path = shard_path(tmp_path, fmt)
    recs = make_records(5)
    info = write_shard(fmt, path, recs)
    bad = dataclasses.replace(recs[0], key="000000999", fields={**recs[0].fields, "idx": np.zeros(K, np.int32)})
    with pytest.raises(ValueError, match="idx"):
        with open_writer(fmt, path, SPECS) as w:
            w.write(make_records(1, seed=5)[0])
            w.write(bad)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert [r.key for r in open_reader(fmt, path, SPECS, expect=info)] == [r.key for r in recs]


def test_writer_state(fmt: str, tmp_path: Path) -> None:
    path = shard_path(tmp_path, fmt)
    w = open_writer(fmt, path, SPECS)
    w.write(make_records(1)[0])
    info = w.close()
    assert w.close() == info
    with pytest.raises(ValueError, match="closed"):
        w.write(make_records(1, seed=2)[0])
    w.abort()  # no-op after close
    assert path.exists()


# --- expect= ------------------------------------------------------------------------------------


def test_expect_detects_flipped_byte(fmt: str, tmp_path: Path) -> None:
    path = shard_path(tmp_path, fmt)
    info = write_shard(fmt, path, make_records(20))
    victim = largest_file(fmt, path)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="checksum") as err:
        open_reader(fmt, path, SPECS, expect=info)
    assert str(path) in str(err.value)


def test_expect_detects_truncation(fmt: str, tmp_path: Path) -> None:
    path = shard_path(tmp_path, fmt)
    info = write_shard(fmt, path, make_records(20))
    victim = largest_file(fmt, path)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(ShardError, match="size"):
        open_reader(fmt, path, SPECS, expect=info)
    with pytest.raises(ShardError):  # also caught without a manifest entry, at open or on read
        list(open_reader(fmt, path, SPECS))


def test_expect_detects_wrong_count(fmt: str, tmp_path: Path) -> None:
    path = shard_path(tmp_path, fmt)
    info = write_shard(fmt, path, make_records(7))
    with pytest.raises(ShardError, match="sample count"):
        open_reader(fmt, path, SPECS, expect=dataclasses.replace(info, num_samples=8))


def test_missing_shard(fmt: str, tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="missing shard"):
        open_reader(fmt, shard_path(tmp_path, fmt), SPECS)


# --- schema -------------------------------------------------------------------------------------

BAD_RECORDS: dict[str, tuple[Callable[[ViewRecord], ViewRecord], str]] = {
    "dtype": (lambda r: dataclasses.replace(r, fields={**r.fields, "feat_q": r.fields["feat_q"].view(np.uint8)}), "feat_q"),
    "shape": (lambda r: dataclasses.replace(r, fields={**r.fields, "idx": np.zeros(K + 1, np.int16)}), "idx"),
    "missing": (lambda r: dataclasses.replace(r, fields={k: v for k, v in r.fields.items() if k != "att_q"}), "att_q"),
    "extra": (lambda r: dataclasses.replace(r, fields={**r.fields, "bogus": np.zeros(1, np.int8)}), "bogus"),
    "key": (lambda r: dataclasses.replace(r, key="12"), "key"),
    "label": (lambda r: dataclasses.replace(r, label="7"), "label"),  # type: ignore[arg-type]  # a wrong type on purpose
    "view_epoch": (lambda r: dataclasses.replace(r, view_epoch=2**40), "view_epoch"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_write_rejects_bad_record(fmt: str, case: str, tmp_path: Path) -> None:
    mutate, needle = BAD_RECORDS[case]
    path = shard_path(tmp_path, fmt)
    with pytest.raises(ValueError, match=needle):
        with open_writer(fmt, path, SPECS) as w:
            w.write(mutate(make_records(1)[0]))
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_duplicate_key(fmt: str, tmp_path: Path) -> None:
    rec = make_records(1)[0]
    w = open_writer(fmt, shard_path(tmp_path, fmt), SPECS)
    w.write(rec)
    with pytest.raises(ValueError, match="already written"):
        w.write(rec)
    w.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "reader_specs",
    [
        {**SPECS, "feat_q": FieldSpec("int8", (L, D // 2))},
        {**SPECS, "feat_lo": FieldSpec("float32", (D,))},
        {k: v for k, v in SPECS.items() if k != "idx"},
        {**SPECS, "extra": FieldSpec("int8", (4,))},
    ],
    ids=["shape", "dtype", "field-missing-in-reader", "field-missing-on-disk"],
)
def test_read_with_other_specs(fmt: str, reader_specs: dict[str, FieldSpec], tmp_path: Path) -> None:
    path = shard_path(tmp_path, fmt)
    write_shard(fmt, path, make_records(4))
    with pytest.raises(ShardError) as err:
        list(open_reader(fmt, path, reader_specs))
    assert str(path) in str(err.value)


def test_bad_specs_and_compressor(tmp_path: Path) -> None:
    for bad in ({"label": FieldSpec("int8", (1,))}, {"x": FieldSpec("i1", (1,))}, {"x": FieldSpec("int8", (0,))}):
        with pytest.raises(ValueError):
            open_writer("zarr", tmp_path / "s.zarr", bad)
    for compressor in ("gzip:3", "zstd", "zstd:x", "zstd:99"):
        with pytest.raises(ValueError, match="compressor"):
            open_writer("webdataset", tmp_path / "s.tar", SPECS, compressor)
    with pytest.raises(ValueError, match="format"):
        get_format("parquet")
    assert list(tmp_path.iterdir()) == []


# --- DataLoader workers ------------------------------------------------------------------------


class KeyedFeatures(torch.utils.data.Dataset):
    """Top-level so spawned workers can unpickle it."""

    def __init__(self, reader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor, str]:
        rec = self.reader[i]
        return rec.key, torch.from_numpy(rec.fields["feat_q"]), hashlib.sha256(rec.image).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_dataloader_workers(fmt: str, start_method: str, tmp_path: Path) -> None:
    recs = make_records(12)
    path = shard_path(tmp_path, fmt)
    info = write_shard(fmt, path, recs)
    reader = open_reader(fmt, path, SPECS, expect=info)
    reader[0]  # touch zarr in the parent before the workers start
    loader = torch.utils.data.DataLoader(
        KeyedFeatures(reader), batch_size=3, num_workers=2, multiprocessing_context=start_method
    )
    got = {}
    for keys, feats, digests in loader:
        for key, feat, digest in zip(keys, feats, digests):
            got[key] = (feat.numpy(), digest)
    assert sorted(got) == sorted(r.key for r in recs)
    for rec in recs:
        np.testing.assert_array_equal(got[rec.key][0], rec.fields["feat_q"])
        assert got[rec.key][1] == hashlib.sha256(rec.image).hexdigest()


# --- webdataset: hostile and malformed archives ------------------------------------------------


def read_member(tar: tarfile.TarFile, member: str | tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    assert f is not None, f"{member}: not a regular file"
    return f.read()


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, read_member(tar, m)) for m in tar.getmembers()]


def pack(path: Path, members: list[tuple[str, bytes] | tarfile.TarInfo]) -> None:
    with tarfile.open(path, "w") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))


def special_member(name: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    return info


# Unpickling this payload would create MARKER: the reader must refuse the member by its name,
# never look inside it.
MARKER = Path(tempfile.gettempdir()) / f"tec-hostile-member-{os.getpid()}"


class _RunsCode:
    def __reduce__(self):
        return (open, (str(MARKER), "w"))


HOSTILE: dict[str, tuple[str, bytes] | tarfile.TarInfo] = {
    "absolute": ("/tmp/000000000.jpg", b"x"),
    "dotdot": ("../000000000.jpg", b"x"),
    "dotdot-deep": ("../../evil.jpg", b"x"),
    "backslash": ("..\\000000000.jpg", b"x"),
    "pickle": ("000000000.pickle", b"cos\nsystem\n."),
    "pyd": ("000000000.pyd", b"MZ"),
    "pth-reduce": ("000000000.pth", pickle.dumps(_RunsCode())),
    "targets-pickle": ("000000000.targets.pickle", pickle.dumps(_RunsCode())),
    "bare-pyd": (".pyd", b"MZ"),
    "npy": ("000000000.feat_q.npy", b"\x93NUMPY"),
    "short-key": ("12.jpg", b"x"),
    "symlink": special_member("000000777.jpg", tarfile.SYMTYPE),
    "hardlink": special_member("000000777.jpg", tarfile.LNKTYPE),
    "directory": special_member("000000777.jpg", tarfile.DIRTYPE),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_tar_hostile_member(case: str, tmp_path: Path) -> None:
    src = tmp_path / "src.tar"
    write_shard("webdataset", src, make_records(2))
    shard = tmp_path / "a" / "b" / "shard.tar"
    shard.parent.mkdir(parents=True)
    members: list[tuple[str, bytes] | tarfile.TarInfo] = list(tar_members(src))
    pack(shard, members[: len(members) // 2] + [HOSTILE[case]] + members[len(members) // 2 :])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    needle = "member type" if isinstance(HOSTILE[case], tarfile.TarInfo) else "member name"
    with pytest.raises(ShardError, match=needle) as err:
        list(open_reader("webdataset", shard, SPECS))
    assert str(shard) in str(err.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing extracted
    assert not MARKER.exists()  # nothing unpickled


def zstd_without_content_size(frame: bytes) -> bytes:
    """Rewrite a numcodecs zstd frame header so it no longer declares the decompressed size."""
    descriptor = frame[4]
    single = (descriptor >> 5) & 1
    fcs = (single, 2, 4, 8)[descriptor >> 6]
    body = frame[5 + (1 - single) + fcs :]
    return frame[:4] + bytes([0x00, (27 - 10) << 3]) + body  # no FCS, 128 MiB window


def replace_member(suffix: str, payload: bytes) -> Callable[[list[tuple[str, bytes]]], list]:
    return lambda ms: [(n, payload if n.endswith(suffix) else b) for n, b in ms]


ZSTD = numcodecs.Zstd(level=3)
BOMB = ZSTD.encode(np.zeros(32 << 20, np.uint8))  # ~1 KiB that inflates to 32 MiB
FRAMES = {name: ZSTD.encode(np.zeros(SPECS[name].nbytes(), np.uint8)) for name in sorted(SPECS)}


def targets_member(**override: bytes) -> bytes:
    """A well-formed targets member (zeros), with some fields' frames replaced."""
    frames = [override.get(name, FRAMES[name]) for name in sorted(SPECS)]
    return np.array([len(f) for f in frames], dtype="<u4").tobytes() + b"".join(frames)



MALFORMED: dict[str, tuple[Callable[[list[tuple[str, bytes]]], list], str]] = {
    "zstd-bomb": (replace_member(".targets.zst", targets_member(feat_q=BOMB)), "field feat_q size"),
    "zstd-no-size": (replace_member(".targets.zst", targets_member(idx=zstd_without_content_size(FRAMES["idx"]))), "field idx size"),
    "zstd-truncated": (replace_member(".targets.zst", targets_member(idx=FRAMES["idx"][:-2])), "field idx data"),
    "zstd-two-frames": (replace_member(".targets.zst", targets_member(idx=FRAMES["idx"] * 2)), "field idx"),
    "targets-header-lies": (replace_member(".targets.zst", targets_member()[:-3]), "targets size"),
    "targets-short": (replace_member(".targets.zst", b"\x01\x00"), "targets size"),
    "json-missing-key": (replace_member(".json", b'{"image_index":1,"view_epoch":0,"label":0}'), "json meta"),
    "json-wrong-type": (
        replace_member(".json", b'{"image_index":1,"view_epoch":0,"label":"0","image_key":"a"}'),
        "json meta",
    ),
    "json-not-utf8": (replace_member(".json", b"\xff\xfe"), "json meta"),
    "missing-member": (lambda ms: [m for m in ms if not m[0].endswith(".targets.zst")], "missing member"),
    "duplicate-member": (lambda ms: ms[:1] + ms, "duplicate member"),
    "split-record": (lambda ms: ms + ms[:1], "member order"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_tar_malformed(case: str, tmp_path: Path) -> None:
    mutate, needle = MALFORMED[case]
    src = tmp_path / "src.tar"
    write_shard("webdataset", src, make_records(3))
    pack(tmp_path / "bad.tar", mutate(tar_members(src)))
    with pytest.raises(ShardError, match=needle):
        list(open_reader("webdataset", tmp_path / "bad.tar", SPECS))


def test_tar_uncompressed_wrong_size_and_compressor_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    write_shard("webdataset", path, make_records(3), compressor="none")
    with pytest.raises(ShardError, match="unknown suffix"):
        open_reader("webdataset", path, SPECS, compressor="zstd:3")
    pack(tmp_path / "bad.tar", replace_member(".targets.bin", b"\0" * 7)(tar_members(path)))
    with pytest.raises(ShardError, match="targets size"):
        open_reader("webdataset", tmp_path / "bad.tar", SPECS, compressor="none")


def test_tar_cut_at_member_boundary(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    write_shard("webdataset", path, make_records(3))
    with tarfile.open(path) as tar:
        last_record_start = [m for m in tar.getmembers() if m.name.startswith(tar.getmembers()[-1].name[:9])][0].offset
    path.write_bytes(path.read_bytes()[:last_record_start])
    with pytest.raises(ShardError, match="end-of-archive"):
        open_reader("webdataset", path, SPECS)


def test_tar_layout(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    recs = make_records(2)
    write_shard("webdataset", path, recs)
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        assert {m.name for m in members} == {
            f"{r.key}.{suffix}" for r in recs for suffix in ["jpg", "json", "targets.zst"]
        }
        for m in members:
            assert (m.mtime, m.uid, m.gid, m.mode, m.isreg()) == (0, 0, 0, 0o444, True)
        meta = json.loads(read_member(tar, f"{recs[0].key}.json").decode("utf-8"))
        assert read_member(tar, f"{recs[0].key}.jpg") == recs[0].image
    want = recs[0]
    assert meta == {"image_index": want.image_index, "view_epoch": 3, "label": want.label, "image_key": want.image_key}


# --- zarr: damaged groups -----------------------------------------------------------------------


def _drop(path: Path, rel: str) -> None:
    target = path / rel
    shutil.rmtree(target) if target.is_dir() else target.unlink()


def _set_offsets(path: Path, offsets: np.ndarray) -> None:
    array = zarr.open_group(LocalStore(path), mode="r+")["image_offsets"]
    assert isinstance(array, zarr.Array)
    array[...] = offsets


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda p: _drop(p, "feat_q"), "missing array"),
        (lambda p: _drop(p, "att_q/c/0/0/0/0"), "missing array data"),
        (lambda p: _drop(p, "zarr.json"), "not a zarr v3 group"),
        (lambda p: zarr.open_group(LocalStore(p), mode="r+").create_array("junk", shape=(1,), dtype="u1"), "unexpected array"),
        (lambda p: _set_offsets(p, np.arange(5, dtype=np.int64)[::-1].copy()), "image_offsets"),
        (lambda p: _set_offsets(p, np.array([0, 1, 2, 3, 10**9], np.int64)), "image_offsets"),
    ],
    ids=["array", "data-file", "group", "extra-array", "offsets-order", "offsets-bounds"],
)
def test_zarr_damaged(damage: Callable[[Path], object], needle: str, tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    write_shard("zarr", path, make_records(4))
    damage(path)
    with pytest.raises(ShardError, match=needle):
        list(open_reader("zarr", path, SPECS))


def test_zarr_corrupt_chunk_without_expect(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    write_shard("zarr", path, make_records(4))
    victim = path / "feat_q" / "c" / "0" / "0" / "0"
    data = bytearray(victim.read_bytes())
    data[-6] ^= 0xFF  # inside the crc32c-protected shard index
    victim.write_bytes(bytes(data))
    reader = open_reader("zarr", path, SPECS)
    with pytest.raises(ShardError, match="array data"):
        reader[2]


# --- per-field compression ------------------------------------------------------------------------


def test_fields_marked_uncompressed_are_stored_raw_and_read_back(fmt: str, tmp_path: Path) -> None:
    """A codec's ``compress: false`` fields are stored as their raw bytes under a zstd compressor
    (a tar record's frame is the field itself; a zarr array has no zstd codec) and read back equal;
    a tar reader given the all-compressed specs of older caches refuses them naming the field."""
    specs = {**SPECS, "att_q": dataclasses.replace(SPECS["att_q"], compress=False),
             "idx": dataclasses.replace(SPECS["idx"], compress=False)}
    recs = make_records(12)
    path = shard_path(tmp_path, fmt)
    with open_writer(fmt, path, specs, "zstd:3") as w:
        for r in recs:
            w.write(r)
        info = w.close()
    reader = open_reader(fmt, path, specs, "zstd:3", expect=info)
    for got, want in zip(reader, recs):
        assert_same(got, want)
    if fmt == "webdataset":
        with tarfile.open(path) as tar:
            payload = read_member(tar, f"{recs[0].key}.targets.zst")
        names = sorted(specs)
        lengths = np.frombuffer(payload[:4 * len(names)], "<u4").tolist()
        frames, start = {}, 4 * len(names)
        for name, n in zip(names, lengths):
            frames[name], start = payload[start:start + n], start + n
        assert frames["att_q"] == recs[0].fields["att_q"].tobytes() and frames["idx"] == recs[0].fields["idx"].tobytes()
        assert frames["feat_q"][:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
    else:
        meta = json.loads((path / "att_q" / "zarr.json").read_text())
        inner = [c["name"] for c in meta["codecs"][0]["configuration"]["codecs"]]
        assert inner == ["bytes"]
    if fmt == "webdataset":
        with pytest.raises(ShardError, match="field (att_q|idx)"):
            list(open_reader(fmt, path, SPECS, "zstd:3"))
    else:  # each zarr array names its own codecs
        assert_same(open_reader(fmt, path, SPECS, "zstd:3")[0], recs[0])

"""Stage-2 loader (tec_train.cache_loader): partition across ranks, seeded order, resume, content against the
shard reader, worker processes, compatibility pre-flight and corrupted shards, for both formats."""
from __future__ import annotations

import io
import json
import multiprocessing
import shutil
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tec_cache import format as cache_format
from tec_cache.build.builder import BuildConfig, build_cache
from tec_cache.core.codecs import get_codec
from tec_cache.core.views import decode_view
from tec_cache.format.manifest import load_manifest
from tec_cache.format.schema import ViewRecord
from tec_cache.format.tar import scan_ustar
from tec_train import cache_loader as data_mod
from tec_train.cache_loader import Batch, CacheLoader, CompatibilityError, check_compatibility, decode_targets, epoch_order
from tests.conftest import TINY_IMG, TINY_PATCH, TINY_TOPK, make_image_folder, tiny_spec

FORMATS = ["webdataset", "zarr"]
VIEWS = 3
SHARD_SIZE = 3  # 14 images -> shards of 3, 3, 3, 3, 2: five shards, unequal sizes


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_ckpt) -> dict[str, Path]:
    src = make_image_folder(tmp_path_factory.mktemp("src") / "data", n_per_class=5, bad=False)
    out = {}
    # The tiny base model gains nothing from a second thread, and on a busy 2-core runner two
    # threads contend: one keeps these builds at a few seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for fmt in FORMATS:
            root = tmp_path_factory.mktemp(fmt) / "cache"
            build_cache(BuildConfig(data=src, out=root, checkpoint=tiny_ckpt, spec=tiny_spec(), views=VIEWS,
                                    shard_size=SHARD_SIZE, batch_size=8, num_workers=0, device="cpu", format=fmt))
            out[fmt] = root
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def references(caches) -> dict[str, dict[tuple[int, int], ViewRecord]]:
    """(view_epoch, image_index) -> record, read with the plain shard reader."""
    out = {}
    for fmt, root in caches.items():
        man = load_manifest(root)
        out[fmt] = {(e.view_epoch, r.image_index): r for e in man.shards()
                    for r in man.open_shard(e)}
    return out


def _indices(batches: Iterator[Batch]) -> list[list[int]]:
    return [b.image_index.tolist() for b in batches]


def _same_batches(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.images, y.images) and torch.equal(x.image_index, y.image_index) and x.view_epoch == y.view_epoch
        and x.fields.keys() == y.fields.keys() and all(torch.equal(x.fields[k], y.fields[k]) for k in x.fields)
        for x, y in zip(a, b)
    )


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_partition_each_view_once(fmt, world, caches, references):
    man = load_manifest(caches[fmt])
    sizes = [e.num_samples for e in man.shards(0)]
    assert len(sizes) % world and len(set(sizes)) > 1  # the awkward case: uneven shards, uneven split
    batch_size = 2
    for epoch in range(VIEWS + 1):
        per_rank = []
        for rank in range(world):
            loader = CacheLoader(man, batch_size=batch_size, rank=rank, world_size=world, num_workers=0, seed=7)
            batches = list(loader.epoch(epoch))
            assert loader.steps_per_epoch == sum(sizes) // (world * batch_size)
            assert len(batches) == loader.steps_per_epoch
            assert all(b.images.shape[0] == batch_size and b.view_epoch == epoch % VIEWS for b in batches)
            per_rank.append({i for b in batches for i in b.image_index.tolist()})
        seen = set().union(*per_rank)
        assert sum(len(s) for s in per_rank) == len(seen) == loader.steps_per_epoch * world * batch_size  # disjoint
        all_images = {i for v, i in references[fmt] if v == epoch % VIEWS}
        assert seen <= all_images and len(all_images - seen) < world * batch_size  # only the drop_last tail


def test_order_is_seeded_and_changes_per_epoch(caches):
    man = load_manifest(caches["webdataset"])

    def mk(seed: int) -> CacheLoader:
        return CacheLoader(man, batch_size=2, num_workers=0, seed=seed)

    a, b = mk(3), mk(3)
    assert _indices(a.epoch(1)) == _indices(b.epoch(1))
    # Epochs 0 and 3 read the same view-epoch, in another order; another seed, another order.
    assert a.view_epoch_for(0) == a.view_epoch_for(VIEWS)
    assert _indices(a.epoch(0)) != _indices(a.epoch(VIEWS))
    assert _indices(a.epoch(0)) != _indices(mk(4).epoch(0))


def test_epoch_order_keeps_windows_of_shards_together():
    sizes = [5, 3, 7, 2, 4]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for epoch in range(4):
        order = epoch_order(sizes, seed=1, epoch=epoch, shuffle_window=2)
        assert sorted(order.tolist()) == list(range(sum(sizes)))
        assert np.array_equal(order, epoch_order(sizes, seed=1, epoch=epoch, shuffle_window=2))
        shard = np.searchsorted(offsets, order, side="right") - 1
        # The shards appear in runs of two: each run's samples are contiguous in the order.
        runs = [shard[0]]
        for s in shard[1:]:
            if s != runs[-1]:
                runs.append(s)
        assert len(set(runs)) == len(sizes)  # no shard is split across windows
        firsts = list(dict.fromkeys(shard.tolist()))
        windows = [set(firsts[i : i + 2]) for i in range(0, len(firsts), 2)]
        pos = 0
        for w in windows:
            n = sum(sizes[s] for s in w)
            assert set(shard[pos : pos + n].tolist()) == w
            pos += n
    assert not np.array_equal(epoch_order(sizes, seed=1, epoch=0, shuffle_window=2),
                              epoch_order(sizes, seed=1, epoch=1, shuffle_window=2))


def test_start_step_resumes_without_reading_skipped_batches(caches, monkeypatch):
    man = load_manifest(caches["zarr"])
    loader = CacheLoader(man, batch_size=2, world_size=2, rank=1, num_workers=0, seed=5)
    full = list(loader.epoch(2))
    reads = []
    original = data_mod._ViewEpochShards.__getitem__
    monkeypatch.setattr(data_mod._ViewEpochShards, "__getitem__", lambda self, ids: reads.append(1) or original(self, ids))
    for start in range(loader.steps_per_epoch + 1):
        reads.clear()
        rest = list(loader.epoch(2, start_step=start))
        assert _same_batches(rest, full[start:])
        assert len(reads) == loader.steps_per_epoch - start
    with pytest.raises(ValueError, match="start_step must be in 0..3"):
        loader.epoch(2, start_step=loader.steps_per_epoch + 1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_batches_hold_what_the_shard_reader_holds(fmt, caches, references):
    man = load_manifest(caches[fmt])
    loader = CacheLoader(man, batch_size=3, num_workers=0, shuffle_window=2)
    count = 0
    for epoch in range(VIEWS):
        for b in loader.epoch(epoch):
            assert b.images.dtype == torch.uint8 and b.images.shape == (3, 3, TINY_IMG, TINY_IMG)
            assert b.image_index.dtype == torch.int64 and b.view_epoch == epoch
            for j, i in enumerate(b.image_index.tolist()):
                ref = references[fmt][(epoch, i)]
                assert torch.equal(b.images[j], decode_view(ref.image))
                for name, spec in man.fields.items():
                    assert b.fields[name].dtype == getattr(torch, spec.dtype)
                    assert np.array_equal(b.fields[name][j].numpy(), ref.fields[name])
                count += 1
    assert count == VIEWS * loader.steps_per_epoch * 3


def test_decode_targets_shapes(caches, references):
    man = load_manifest(caches["webdataset"])
    b = next(iter(CacheLoader(man, batch_size=4, num_workers=0).epoch(0)))
    feat, att, idx = decode_targets(b.to("cpu"), man.codec.name)
    L, D, H, k = man.targets.num_patches, man.targets.dim, man.targets.heads, TINY_TOPK
    assert feat.shape == (4, L, D) and feat.dtype == torch.float32
    assert att.shape == (4, k + 1, H, L) and att.dtype == torch.float32
    assert idx.shape == (4, k) and idx.dtype == torch.int64
    refs = [references["webdataset"][(0, i)] for i in b.image_index.tolist()]
    want = get_codec(man.codec.name).decode({n: torch.from_numpy(np.stack([r.fields[n] for r in refs])) for n in man.fields})
    for got, exp in zip((feat, att, idx), want):
        assert torch.equal(got, exp)


def test_view_epoch_for(caches):
    man = load_manifest(caches["webdataset"])
    cycle = CacheLoader(man, batch_size=2, num_workers=0)
    assert [cycle.view_epoch_for(e) for e in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    perm = [CacheLoader(man, batch_size=2, num_workers=0, seed=s, view_order="permute") for s in (0, 0, 1)]
    seqs = [[p.view_epoch_for(e) for e in range(VIEWS * 12)] for p in perm]
    assert seqs[0] == seqs[1] and seqs[0] != seqs[2]
    blocks = [tuple(seqs[0][i : i + VIEWS]) for i in range(0, len(seqs[0]), VIEWS)]
    assert all(sorted(bl) == list(range(VIEWS)) for bl in blocks)  # each cycle visits every view-epoch once
    assert len(set(blocks)) > 1  # and the cycles differ
    b = next(iter(perm[0].epoch(4)))
    assert b.view_epoch == perm[0].view_epoch_for(4)


def test_view_epochs_takes_the_first_k_of_the_cache(caches):
    """--view-epochs K: every epoch reads one of view-epochs 0..K-1 of a cache holding more, in
    both orders, and the epoch length is that of those K."""
    man = load_manifest(caches["webdataset"])
    one = CacheLoader(man, batch_size=2, num_workers=0, view_epochs=1)
    assert [one.view_epoch_for(e) for e in range(5)] == [0] * 5
    assert {b.view_epoch for e in (0, 1) for b in one.epoch(e)} == {0}
    two = CacheLoader(man, batch_size=2, num_workers=0, seed=3, view_order="permute", view_epochs=2)
    seq = [two.view_epoch_for(e) for e in range(12)]
    assert set(seq) == {0, 1} and all(sorted(seq[i:i + 2]) == [0, 1] for i in range(0, 12, 2))
    assert CacheLoader(man, batch_size=2, num_workers=0, view_epochs=VIEWS).view_epoch_for(VIEWS - 1) == VIEWS - 1
    with pytest.raises(ValueError, match=f"--view-epochs: the cache .* holds {VIEWS} view-epochs, fewer than the {VIEWS + 1}"):
        CacheLoader(man, batch_size=2, num_workers=0, view_epochs=VIEWS + 1)


def test_compatibility_errors_name_both_values(caches, tmp_path):
    man = load_manifest(caches["zarr"])
    check_compatibility(man, img_size=TINY_IMG, patch_size=TINY_PATCH)
    with pytest.raises(CompatibilityError, match=r"image size 64 does not match the cache's 32 \(views.recipe.size\)"):
        check_compatibility(man, img_size=64, patch_size=TINY_PATCH)
    with pytest.raises(CompatibilityError) as err:
        check_compatibility(man, img_size=TINY_IMG, patch_size=4)
    assert "patch size 4 does not match the cache's 8" in str(err.value)
    assert "student patch grid 8x8 (img 32, patch 4) does not match the cache's 4x4 (targets.grid)" in str(err.value)

    root = tmp_path / "cache"
    shutil.copytree(caches["zarr"], root)
    raw = json.loads((root / "manifest.json").read_text())
    raw["codec"]["name"] = "int4"
    (root / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(CompatibilityError, match="unknown codec 'int4'"):
        check_compatibility(load_manifest(root), img_size=TINY_IMG, patch_size=TINY_PATCH)

    root = tmp_path / "cache2"
    shutil.copytree(caches["zarr"], root)
    gone = man.shards(1)[2].path
    shutil.rmtree(root / gone)
    with pytest.raises(CompatibilityError, match=f"1 shard\\(s\\) missing or of the wrong size: {gone}: missing"):
        check_compatibility(load_manifest(root), img_size=TINY_IMG, patch_size=TINY_PATCH)


def _corrupt_copy(src: Path, dst: Path, fmt: str) -> str:
    """Copy the cache and flip one byte inside one shard's target data (its structure stays
    readable, so only the checksum can tell); returns that shard's manifest path."""
    shutil.copytree(src, dst)
    man = load_manifest(dst)
    entry = man.shards(0)[1]
    path = man.shard_path(entry)
    if fmt == "webdataset":
        with tarfile.open(path) as tar:
            member = next(m for m in tar if m.name.endswith(".targets.zst"))
        target, offset = path, member.offset_data + member.size // 2
    else:
        target = next(p for p in sorted((path / "feat_q").rglob("*")) if p.is_file())
        offset = 100
    blob = bytearray(target.read_bytes())
    blob[offset] ^= 0xFF
    target.write_bytes(bytes(blob))
    return entry.path


def test_each_shard_is_verified_once_per_rank(caches, monkeypatch):
    man = load_manifest(caches["webdataset"])
    opened = []
    # The loader opens shards through the cache handle, which calls the format's open_reader(self, path, ...).
    tar_format = type(cache_format.get_format("webdataset"))
    original = tar_format.open_reader
    monkeypatch.setattr(tar_format, "open_reader",
                        lambda *a, expect=None, **kw: opened.append((a[1], expect)) or original(*a, expect=expect, **kw))
    loader = CacheLoader(man, batch_size=2, world_size=2, rank=0, num_workers=0, shuffle_window=1)
    list(loader.epoch(0))
    checked = [path for path, expect in opened if expect is not None]
    assert sorted(checked) == sorted({path for path, _ in opened})  # every shard read was checked, once
    assert all(expect == e.info
               for e in man.shards(0) for path, expect in opened if path == man.shard_path(e) and expect is not None)
    read_before = {path for path, _ in opened}
    opened.clear()
    list(loader.epoch(VIEWS))  # the same view-epoch again: only shards this rank has not read yet
    checked = [path for path, expect in opened if expect is not None]
    assert sorted(checked) == sorted({path for path, _ in opened} - read_before)
    opened.clear()
    list(CacheLoader(man, batch_size=2, num_workers=0, verify=False).epoch(0))
    assert opened and all(expect is None for _, expect in opened)


@pytest.mark.parametrize("fmt,workers", [("webdataset", 0), ("zarr", 0), ("webdataset", 2)])
def test_corrupted_shard_is_refused(fmt, workers, caches, references, tmp_path):
    bad = _corrupt_copy(caches[fmt], tmp_path / "cache", fmt)
    man = load_manifest(tmp_path / "cache")
    original = load_manifest(caches[fmt])
    bad_images = {r.image_index for r in original.open_shard(original.shards(0)[1])}
    loader = CacheLoader(man, batch_size=2, num_workers=workers, shuffle_window=1)
    yielded = []
    with pytest.raises(cache_format.ShardError, match=f"{bad}: checksum: sha256"):
        for b in loader.epoch(0):
            yielded.extend(b.image_index.tolist())
    assert not bad_images & set(yielded)
    loader.close()


# zarr workers are spawned (a forked one would inherit zarr's event loop dead), and a spawned
# worker imports torch and torchvision afresh: seconds on a CI core.
@pytest.mark.parametrize("fmt", ["webdataset", pytest.param("zarr", marks=pytest.mark.slow)])
def test_workers_give_the_same_batches(fmt, caches):
    man = load_manifest(caches[fmt])
    kw = dict(batch_size=2, world_size=2, rank=1, seed=11, shuffle_window=2)
    inline = list(CacheLoader(man, num_workers=0, **kw).epoch(1))
    with CacheLoader(man, num_workers=2, **kw) as loader:
        assert loader.mp_context == ("spawn" if fmt == "zarr" else "fork")
        assert _same_batches(list(loader.epoch(1)), inline)


def test_a_worker_reuses_its_batch_buffers_and_held_batches_stay_intact(caches):
    # 14 one-view batches through one worker: more batches than its 3 reusable segments, all held
    # until the end. Each must still be the batch it was when yielded (it was copied out of the
    # segment the worker then refilled) and equal the in-process loader's.
    man = load_manifest(caches["webdataset"])
    inline = list(CacheLoader(man, batch_size=1, num_workers=0, seed=3).epoch(0))
    with CacheLoader(man, batch_size=1, num_workers=1, seed=3) as loader:
        held = list(loader.epoch(0))
    assert len(held) == 14 and _same_batches(held, inline)
    assert all(b.slot is None for b in held)


def test_batch_slots_hand_out_free_segments_and_take_them_back(monkeypatch):
    slots = data_mod._BatchSlots(num_workers=2, per_worker=2)
    monkeypatch.setattr(data_mod, "get_worker_info", lambda: type("Info", (), {"id": 1})())
    a, slot_a = slots.take(1000)
    b, slot_b = slots.take(1000)
    c, slot_c = slots.take(1000)
    assert (slot_a, slot_b, slot_c) == ((1, 0), (1, 1), None)  # both out: a fresh segment, nothing to give back
    assert a.is_shared() and b.is_shared() and c.is_shared()
    assert slots.free.tolist() == [[1, 1], [0, 0]]
    slots.give_back(slot_b)
    again, slot = slots.take(1000)
    assert slot == (1, 1) and again.data_ptr() == b.data_ptr()  # the same memory, not a new segment
    slots.give_back(slot_a)
    bigger, slot = slots.take(2000)
    assert slot == (1, 0) and bigger.nbytes() == 2000  # a batch of another size gets a segment of its size
    monkeypatch.setattr(data_mod, "get_worker_info", lambda: None)
    assert slots.take(1000) == (None, None)  # in the main process nothing crosses: tensors of its own


def test_tar_reader_reads_into_a_reused_buffer_and_refuses_reads_once_released(caches):
    man = load_manifest(caches["webdataset"])
    first, second = man.shards(0)[:2]
    fmt = cache_format.get_format("webdataset")
    reader = fmt.open_reader(man.shard_path(first), man.fields, man.format.compressor, expect=first.info,
                             buffer=bytearray())
    assert _same_records(reader, man.open_shard(first))
    buffer = reader.release()
    assert isinstance(buffer, bytearray) and len(buffer) >= first.info.nbytes
    with pytest.raises(cache_format.ShardError, match="released"):
        reader[0]
    again = fmt.open_reader(man.shard_path(second), man.fields, man.format.compressor, expect=second.info,
                            buffer=buffer)
    assert again.buffer is buffer  # large enough: read in place
    assert _same_records(again, man.open_shard(second))


def _same_records(first: Iterable[ViewRecord], second: Iterable[ViewRecord]) -> bool:
    a, b = list(first), list(second)
    return len(a) == len(b) and all(
        (x.key, x.image_index, x.image) == (y.key, y.image_index, y.image)
        and x.fields.keys() == y.fields.keys() and all(np.array_equal(x.fields[k], y.fields[k]) for k in x.fields)
        for x, y in zip(a, b))


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_into_writes_the_fields_into_the_given_rows(fmt, caches):
    man = load_manifest(caches[fmt])
    e = man.shards(1)[0]
    reader = man.open_shard(e)
    out = {name: np.zeros((4, *spec.shape), spec.dtype) for name, spec in man.fields.items()}
    got = reader.read_into([2, 0], out, [3, 1])
    for rec, i, row in zip(got, [2, 0], [3, 1]):
        want = reader[i]
        assert (rec.key, rec.image_index, bytes(rec.image)) == (want.key, want.image_index, want.image)
        assert all(np.array_equal(out[k][row], want.fields[k]) and np.shares_memory(rec.fields[k], out[k])
                   for k in man.fields)
    assert all(not out[k][[0, 2]].any() for k in man.fields)  # rows not asked for are untouched


def test_close_stops_an_unfinished_epoch(caches):
    man = load_manifest(caches["webdataset"])
    loader = CacheLoader(man, batch_size=2, num_workers=2)
    inline = list(CacheLoader(man, batch_size=2, num_workers=0).epoch(0))
    it = loader.epoch(0, start_step=1)
    assert _same_batches([next(it)], inline[1:2])
    assert multiprocessing.active_children()
    loader.close()
    assert next(it, None) is None
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_many_matches_indexing(fmt, caches):
    man = load_manifest(caches[fmt])
    e = man.shards(2)[0]
    reader = man.open_shard(e)
    picks = [2, 0, 2, -1, 1]
    if fmt == "zarr":
        assert reader.read_many([0]) and reader._shard_files() is not None  # the direct path, not zarr-python
    for got, want in zip(reader.read_many(picks), [reader[i] for i in picks]):
        assert (got.key, got.image_index, got.view_epoch, got.label, got.image_key, got.image) == (
            want.key, want.image_index, want.view_epoch, want.label, want.image_key, want.image)
        assert all(got.fields[k].dtype == want.fields[k].dtype and np.array_equal(got.fields[k], want.fields[k])
                   for k in man.fields)
    with pytest.raises(IndexError):
        reader.read_many([0, e.num_samples])


def test_bad_arguments_are_named(caches):
    man = load_manifest(caches["webdataset"])
    with pytest.raises(ValueError, match="fewer than one step of world_size \\* batch_size = 2 \\* 8 = 16"):
        CacheLoader(man, batch_size=8, world_size=2)
    with pytest.raises(ValueError, match="rank must be in 0..1"):
        CacheLoader(man, batch_size=2, world_size=2, rank=2)
    with pytest.raises(ValueError, match="view_order must be one of"):
        CacheLoader(man, batch_size=2, view_order="random")
    with pytest.raises(ValueError, match="epoch must be an integer >= 0"):
        CacheLoader(man, batch_size=2).epoch(-1)


def test_batch_to_and_pin_memory(caches):
    man = load_manifest(caches["webdataset"])
    b = next(iter(CacheLoader(man, batch_size=2, num_workers=0).epoch(0)))
    moved = b.to("cpu")
    assert _same_batches([moved], [b])
    if torch.cuda.is_available():
        pinned = b.pin_memory()
        assert pinned.images.is_pinned() and all(t.is_pinned() for t in pinned.fields.values())
        on_gpu = pinned.to("cuda")
        assert on_gpu.images.is_cuda and decode_targets(on_gpu, man.codec.name)[0].is_cuda


def test_tar_index_fast_path_matches_tarfile(caches, tmp_path):
    man = load_manifest(caches["webdataset"])
    path = man.shard_path(man.shards(0)[0])
    with open(path, "rb") as f:
        scanned = scan_ustar(f)
    with tarfile.open(path) as tar:
        want = [(m.name, m.offset_data, m.size) for m in tar]
        end = tar.offset
    assert scanned == (want, end)
    # A header it does not know (a pax extended header for a non-ASCII name) leaves it to tarfile.
    odd = tmp_path / "pax.tar"
    with tarfile.open(odd, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("000000001.j\u00e9g")
        tar.addfile(info, io.BytesIO(b""))
    with open(odd, "rb") as f:
        assert scan_ustar(f) is None


def test_iterating_leaves_the_global_rng_alone(caches):
    """Checkpoints record the global torch RNG; reading batches must not move it, or a resumed
    run would record a different state than a straight one."""
    before = torch.get_rng_state()
    with CacheLoader(load_manifest(caches["webdataset"]), batch_size=2, num_workers=0) as loader:
        list(loader.epoch(0))
    assert torch.equal(before, torch.get_rng_state())


def test_rank_batches_partition_the_epoch_and_resume_where_they_stopped():
    """The pure sampling functions: ranks share an epoch's order without overlap (drop_last), a
    resumed rank gets exactly the batches it had not read, and each shard is checked by its first reader."""
    from tec_train import sampling

    sizes = [5, 3, 4, 6]
    order = sampling.epoch_order(sizes, seed=3, epoch=2, shuffle_window=2)
    steps = sampling.steps_per_epoch([sum(sizes)], world_size=3, batch_size=2)
    assert steps == 3
    per_rank = [sampling.rank_batches(order, rank=r, world_size=3, batch_size=2, steps=steps) for r in range(3)]
    read = np.concatenate([b for batches in per_rank for b in batches])
    assert sorted(read.tolist()) == sorted(order[: steps * 6].tolist())
    resumed = sampling.rank_batches(order, rank=1, world_size=3, batch_size=2, steps=steps, start_step=2)
    assert [b.tolist() for b in resumed] == [b.tolist() for b in per_rank[1][2:]]
    assert sampling.first_reads([{0, 1}, {1, 2}, {2}], {0}) == [frozenset({1}), frozenset({2}), frozenset()]
    assert [sampling.view_epoch_for(e, num_view_epochs=3, view_order="cycle", seed=0) for e in range(4)] == [0, 1, 2, 0]


def _hand_back_until(free: torch.Tensor, stop: multiprocessing.synchronize.Event) -> None:
    """The main process's side of the slot protocol, as fast as it goes: every slot handed back."""
    row = free[0].numpy()
    while not stop.is_set():
        row[:] = 1


def test_taking_a_slot_while_the_main_process_hands_slots_back(monkeypatch):
    """A worker looks for a free slot while the main process writes the same shared row: the look
    must act on one reading of the row (numpy's nonzero on memory that changes under it raises, which
    stopped a run's loader mid-epoch)."""
    slots = data_mod._BatchSlots(num_workers=1, per_worker=1 << 16)  # a long row: a wide window for the race
    monkeypatch.setattr(data_mod, "get_worker_info", lambda: type("Info", (), {"id": 0})())
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    writer = ctx.Process(target=_hand_back_until, args=(slots.free, stop), daemon=True)
    writer.start()
    try:
        for _ in range(3000):
            slots.free[0].zero_()  # every slot out, for the writer to hand back while take() looks
            slots.take(64)
    finally:
        stop.set()
        writer.join(10)

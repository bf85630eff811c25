"""Stage-2 loader: cached shards --> batches of (images the base model saw, quantised targets).

Data flow (docs/method.md 10 and the README, stage 2):

    manifest --check_compatibility--> CacheLoader.epoch(e) --DataLoader workers--> Batch (CPU)
    Batch.to(device) --decode_targets (on the device)--> float targets --> student + losses

Epoch e reads view-epoch ``view_epoch_for(e)``; which samples a rank reads, in which order, is
sampling.py's (pure functions of seed, epoch, manifest, rank and step): the view-epoch's shards
permuted and shuffled within windows of ``shuffle_window`` shards (a worker keeps those few readers
open), cut to a multiple of ``world_size * batch_size`` (drop_last: at most ``world_size *
batch_size - 1`` views of an epoch are skipped, a different tail each epoch), global batch b to
rank ``b % world_size``. Every rank therefore runs exactly ``steps_per_epoch`` steps whatever the
shard count, so DDP never waits on a short rank. Inside a rank, torch's DataLoader hands whole
batches round-robin to its workers, in order.

A worker reads a batch with one ``read_into`` per shard (one dataset call per batch, not per
sample): each record's fields are decoded straight into the batch's buffer and its JPEG decoded and
copied beside them. Readers are opened lazily in the worker and kept in a small LRU keyed by path;
a verified tar reader reads its shard into the memory of the reader it replaces. The batch buffer
is shared memory that the worker reuses once the main process has copied the batch out of it
(``_BatchSlots``): filling fresh shared memory cost a worker more than all its decoding but the JPEGs.

Verification (``verify``): each rank checks each shard's size and sha256 once per run, in the worker
that reads the first batch (in this rank's order) touching that shard, before that worker reads
any of its records. Batches are yielded in order, so a batch of a later step that also reads the
shard (read concurrently by another worker) can only be yielded after that first batch, that is
after the check passed: a corrupted shard stops the run with a ``ShardError`` naming the shard and
the failed check, and none of its samples reaches the student. Checking once per rank rather than
once per worker that opens the shard matters: with window-local batches handed round-robin to
workers, every worker opens nearly every shard, and hashing whole shards would grow with the
worker count.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Generator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from tec_cache.core.codecs import DecodedTargets, get_codec
from tec_cache.core.views import decode_view
from tec_cache.format import check_shard_files
from tec_cache.format.base import ShardReader
from tec_cache.format.manifest import MANIFEST_NAME, Manifest, digest_problem, load_manifest
from tec_cache.format.schema import FieldSpec, ShardError, ShardInfo
from tec_cache.runtime.faults import fault_point
from tec_cache.runtime.run_log import naming_sample
from tec_cache.runtime.workers import die_with_parent
from tec_train import sampling
from tec_train.sampling import VIEW_ORDERS, epoch_order

__all__ = ["Batch", "CacheLoader", "CompatibilityError", "check_compatibility", "decode_targets", "epoch_order"]

MP_CONTEXTS = ("fork", "spawn", "forkserver")
_MAX_LISTED_PROBLEMS = 5


class CompatibilityError(ValueError):
    """The cache cannot train this student (or is incomplete); the message names both values."""


def check_compatibility(manifest: Manifest, *, img_size: int, patch_size: int) -> None:
    """Pre-flight before step 1: the student must see the cache's pixels on the cache's patch grid.

    Checks that the manifest is as the build wrote it (its own checksum), the codec is known, the
    student's image size is the cache's view size, its patch size is the base model's, its patch
    grid is ``targets.grid``, and that every listed shard is on disk with its listed size (no
    reads). Raises ``CompatibilityError`` listing every mismatch.
    """
    problems = []
    edited = digest_problem(manifest)
    if edited is not None:
        problems.append(f"{MANIFEST_NAME}: checksum: {edited}")
    try:
        get_codec(manifest.codec.name)
    except ValueError as e:
        problems.append(f"codec.name: {e}")
    cache_problems = len(problems)  # the rest concern the student's options
    if patch_size < 1 or img_size % patch_size:
        problems.append(f"student image size {img_size} is not a multiple of its patch size {patch_size}")
    geometry = manifest.geometry
    view_size = geometry.img_size
    if img_size != view_size:
        problems.append(f"student image size {img_size} does not match the cache's {view_size} (views.recipe.size)")
    cache_patch = geometry.patch_size
    if patch_size != cache_patch:
        problems.append(f"student patch size {patch_size} does not match the cache's {cache_patch} (targets.patch_size)")
    grid = list(geometry.grid)
    side = img_size // patch_size if patch_size >= 1 else 0
    if grid != [side, side]:
        cache_grid = "x".join(str(g) for g in grid)
        problems.append(
            f"student patch grid {side}x{side} (img {img_size}, patch {patch_size}) does not match the cache's "
            f"{cache_grid} (targets.grid)"
        )
    if problems:
        options = " (--model, --img-size, --patch-size)" if len(problems) > cache_problems else ""
        raise CompatibilityError(f"cache {manifest.where} cannot train this student{options}: " + "; ".join(problems))
    bad = check_shard_files(manifest)
    if bad:
        listed = "; ".join(str(p) for p in bad[:_MAX_LISTED_PROBLEMS])
        more = f" (and {len(bad) - _MAX_LISTED_PROBLEMS} more)" if len(bad) > _MAX_LISTED_PROBLEMS else ""
        raise CompatibilityError(
            f"cache {manifest.where}: {len(bad)} shard(s) missing or of the wrong size: {listed}{more}; "
            "run `tec-cache verify` and rebuild the cache"
        )


@dataclass
class Batch:
    """One step's data for one rank.

    ``images`` are the decoded views exactly as the base model saw them (uint8 [B,3,S,S], not yet
    normalised); ``fields`` are the codec's encoded target arrays, still quantised, so that moving
    a batch to the GPU moves the small form and ``decode_targets`` expands it there.
    """

    images: torch.Tensor
    fields: dict[str, torch.Tensor]
    image_index: torch.Tensor
    view_epoch: int
    # (worker, slot) of the shared buffer holding the tensors, while the loader still has to hand
    # it back to that worker (the loader's own bookkeeping; batches it yields carry None).
    slot: tuple[int, int] | None = None

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        """The batch on ``device`` (non-blocking copies are only asynchronous from pinned memory)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return replace(
            self,
            images=move(self.images),
            fields={name: move(t) for name, t in self.fields.items()},
            image_index=move(self.image_index),
        )

    def private(self) -> Batch:
        """The batch copied into memory of this process's own."""
        return replace(self, images=self.images.clone(), fields={name: t.clone() for name, t in self.fields.items()},
                       image_index=self.image_index.clone())

    def pin_memory(self) -> Batch:
        """Page-locked copy; torch's DataLoader calls this from its pinning thread."""
        return replace(
            self,
            images=self.images.pin_memory(),
            fields={name: t.pin_memory() for name, t in self.fields.items()},
            image_index=self.image_index.pin_memory(),
        )


def decode_targets(batch: Batch, codec_name: str) -> DecodedTargets:
    """(feat [B,L,D] float32, att [B,k+1,H,L] float32, idx [B,k] int64) on the batch's device."""
    return get_codec(codec_name).decode(batch.fields)


# ---------------------------------------------------------------------------------------------
# worker side


_ALIGN = 64  # bytes: every tensor of a batch buffer starts on a cache line


class _BatchSlots:
    """Shared-memory batch buffers that the loader's workers reuse.

    A batch crosses from a worker to the main process in shared memory, and a fresh segment costs
    far more than filling it (tmpfs pages allocated and zeroed on first touch: 30 ms for a 64-view
    ViT-B batch of 21 MB here, against 3 ms for private memory; benchmarks/bench_loader.py). So each
    worker keeps up to ``per_worker`` segments and fills one that the main process has handed back.
    The main process copies a batch out of its segment (or has it pinned) before handing the
    segment back, so a segment is never written while anything reads it; with all its segments
    out, a worker takes a fresh one, as torch's own collate does. ``free[w, s]`` is 1 while
    segment s of worker w is free, in shared memory both sides see.
    """

    def __init__(self, num_workers: int, per_worker: int) -> None:
        self.free = torch.ones(max(num_workers, 1), per_worker, dtype=torch.uint8).share_memory_()
        self._mine: dict[int, torch.UntypedStorage] = {}  # this worker's segments

    def take(self, nbytes: int) -> tuple[torch.UntypedStorage | None, tuple[int, int] | None]:
        """Shared memory for one batch and the slot to hand back (None: nothing to hand back); no
        storage in the main process, where nothing crosses and each tensor is allocated on its own
        (one block per batch would exceed the size up to which malloc recycles freed memory, 32 MB
        for 64 fp16 ViT-B views, and then every batch would fault in fresh pages)."""
        info = get_worker_info()
        if info is None:
            return None, None
        row = self.free[info.id].numpy()
        # One reading of the row: the main process hands slots back (0 -> 1) while this looks, and
        # numpy's nonzero raises on memory that changes under it. A slot seen free stays free (only
        # this worker takes its own); one handed back meanwhile waits for the next batch.
        for s in np.flatnonzero(row.copy()).tolist():
            storage = self._mine.get(s)
            if storage is None or storage.nbytes() != nbytes:
                storage = self._mine[s] = torch.UntypedStorage._new_shared(nbytes)
            row[s] = 0
            return storage, (info.id, s)
        return torch.UntypedStorage._new_shared(nbytes), None

    def give_back(self, slot: tuple[int, int]) -> None:
        self.free[slot] = 1

    def __getstate__(self) -> dict[str, Any]:
        return {"free": self.free, "_mine": {}}


class _ViewEpochShards(Dataset):
    """Map-style dataset over one view-epoch; an index is a whole batch (an array of sample ids).

    Holds only picklable plain data, so it can go to spawned workers; the shard readers are opened
    in each worker on first use and kept in a per-worker LRU keyed by path.
    """

    def __init__(self, man: Manifest, view_epoch: int, *, cache_size: int, slots: _BatchSlots) -> None:
        entries = man.shards(view_epoch)
        self.view_epoch = view_epoch
        self.cache = man.handle  # where the shards are (a folder or a URL) and how one is opened
        self.fields: dict[str, FieldSpec] = man.fields
        self.image_size = man.geometry.img_size
        self.paths = [self.cache.ref(e.path) for e in entries]  # where each shard is read from, as messages name it
        self.rels = [e.path for e in entries]
        self.infos: list[ShardInfo] = [e.info for e in entries]
        self.offsets = np.concatenate([[0], np.cumsum([e.num_samples for e in entries], dtype=np.int64)])
        self.cache_size = cache_size
        self.slots = slots
        self._readers: OrderedDict[str, ShardReader] = OrderedDict()
        self._verified: set[str] = set()
        self._spare: bytearray | None = None  # the shard buffer of the last reader released

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, item: tuple[np.ndarray, frozenset[int]]) -> Batch:
        """Read one batch: its sample ids, and the shards this batch must verify before reading."""
        ids, verify = item
        with naming_sample(f"view-epoch {self.view_epoch}, samples {_id_range(ids)}", keep=(ShardError,)):
            fault_point("read_batch")
            return self._read(ids, verify)

    def _layout(self, n: int) -> tuple[list[tuple[str, int, tuple[int, ...], np.dtype]], int]:
        """Where each tensor of an ``n``-view batch lies in its buffer: (name, byte offset, shape,
        dtype), and the buffer's size."""
        S = self.image_size
        # "~" keeps the two apart from any field name (schema.FIELD_NAME_RE has none)
        parts: list[tuple[str, tuple[int, ...], np.dtype[Any]]] = [
            ("~images", (n, 3, S, S), np.dtype(np.uint8)), ("~image_index", (n,), np.dtype(np.int64))]
        parts += [(name, (n, *spec.shape), np.dtype(spec.dtype)) for name, spec in self.fields.items()]
        layout, offset = [], 0
        for name, shape, dtype in parts:
            offset = -(-offset // _ALIGN) * _ALIGN
            layout.append((name, offset, shape, dtype))
            offset += dtype.itemsize * int(np.prod(shape))
        return layout, offset

    def _read(self, ids: np.ndarray, verify: frozenset[int]) -> Batch:
        layout, nbytes = self._layout(len(ids))
        storage, slot = self.slots.take(nbytes)
        try:
            if storage is None:
                parts = {name: torch.from_numpy(np.empty(shape, dtype)) for name, _, shape, dtype in layout}
            else:
                buf = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,), (1,))  # [nbytes] uint8
                parts = {name: buf[off : off + dtype.itemsize * int(np.prod(shape))]
                         .view(torch.from_numpy(np.empty(0, dtype)).dtype).view(shape)
                         for name, off, shape, dtype in layout}
            images, image_index = parts.pop("~images"), parts.pop("~image_index")  # [B,3,S,S] uint8, [B] int64
            self._fill(ids, verify, images, image_index.numpy(), {name: t.numpy() for name, t in parts.items()})
        except BaseException:
            if slot is not None:
                self.slots.give_back(slot)
            raise
        return Batch(images=images, fields=parts, image_index=image_index, view_epoch=self.view_epoch, slot=slot)

    def _fill(self, ids: np.ndarray, verify: frozenset[int], images: torch.Tensor, image_index: np.ndarray,
              fields: dict[str, np.ndarray]) -> None:
        shard_of = np.searchsorted(self.offsets, ids, side="right") - 1
        expected = (3, self.image_size, self.image_size)
        # One read per shard, in order of first appearance, so the LRU sees window order.
        for s in dict.fromkeys(shard_of.tolist()):
            rows = np.flatnonzero(shard_of == s).tolist()
            reader = self._reader(s, verify=s in verify)
            records = reader.read_into((ids[rows] - self.offsets[s]).tolist(), fields, rows)
            for j, rec in zip(rows, records):
                if rec.view_epoch != self.view_epoch:
                    raise ShardError(
                        f"{self.paths[s]}: view epoch: record {rec.key} belongs to view-epoch {rec.view_epoch}, "
                        f"the manifest lists the shard under {self.view_epoch}"
                    )
                img = decode_view(rec.image)  # while the reader holds the bytes rec.image may view
                if tuple(img.shape) != expected:
                    raise ShardError(
                        f"view-epoch {self.view_epoch} record {rec.key} ({rec.image_key}): view image is "
                        f"{'x'.join(map(str, img.shape))}, the manifest's view size is {'x'.join(map(str, expected))}"
                    )
                images[j].copy_(img)
                image_index[j] = rec.image_index

    def _reader(self, s: int, *, verify: bool) -> ShardReader:
        path = self.paths[s]
        reader = self._readers.get(path)
        if reader is not None and (path in self._verified or not verify):
            self._readers.move_to_end(path)
            return reader
        if reader is not None:  # opened unverified before; this batch verifies it
            self._drop(path)
        while len(self._readers) >= self.cache_size:
            self._drop(next(iter(self._readers)))
        # A remote shard is checked as it streams in, whether or not this batch verifies it.
        verify = verify or self.cache.is_remote
        buffer = None
        if verify and not self.cache.is_remote:  # read whole, into the memory of the reader released last
            buffer, self._spare = self._spare or bytearray(), None
        reader = self.cache.open(self.rels[s], self.infos[s], verify=verify, buffer=buffer)
        if verify:
            self._verified.add(path)
        elif len(reader) != self.infos[s].num_samples:
            raise ShardError(f"{path}: sample count: {len(reader)} records, manifest says {self.infos[s].num_samples}")
        self._readers[path] = reader
        return reader

    def _drop(self, path: str) -> None:
        """Close the reader of ``path``; its shard buffer serves the next reader."""
        self._spare = self._readers.pop(path).release() or self._spare

    def __getstate__(self) -> dict[str, Any]:
        # Readers belong to the process that opened them (file handles, zarr state, verified bytes).
        state = self.__dict__.copy()
        state["_readers"], state["_verified"], state["_spare"] = OrderedDict(), set(), None
        return state


def _as_is(batch: Any) -> Any:
    """The DataLoader's collate step: the dataset already returns whole batches."""
    return batch


class _RankBatches(Sampler):
    """This rank's batches of one epoch from ``start_step``: (sample ids, shards to verify first)."""

    def __init__(self, batches: list[np.ndarray], verify: list[frozenset[int]]) -> None:
        self.batches, self.verify = batches, verify

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[np.ndarray, frozenset[int]]]:
        return iter(zip(self.batches, self.verify))


# ---------------------------------------------------------------------------------------------
# the loader


class CacheLoader:
    """Batches of one rank, epoch by epoch, from a finished cache.

    ``steps_per_epoch`` is the same on every rank and in every epoch: the smallest view-epoch,
    divided by ``world_size * batch_size``, rounded down. ``epoch(e, start_step)`` yields exactly
    the batches an uninterrupted epoch would yield from step ``start_step`` on, without reading the
    skipped ones, so (epoch, step) is the whole loader state a checkpoint needs.

    ``verify`` checks each shard's size and sha256 once per rank and run, before its first sample
    is used (module docstring). ``mp_context`` defaults to "spawn" for zarr caches and "fork" for
    tar caches. ``pin_memory`` pins each batch in torch's pinning thread, so ``Batch.to(cuda)`` can
    copy asynchronously. A worker keeps its last ``shuffle_window`` shard readers open; a verified
    tar reader holds its shard's bytes in memory, so that is up to ``shuffle_window`` shards of RAM
    per worker.
    """

    def __init__(
        self,
        cache: Path | str | Manifest,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        seed: int = 0,
        view_order: str = "cycle",
        view_epochs: int | None = None,
        pin_memory: bool = False,
        verify: bool = True,
        shuffle_window: int = 4,
        mp_context: str | None = None,
    ) -> None:
        self.manifest = cache if isinstance(cache, Manifest) else load_manifest(cache)
        for name, value, least in (("batch_size", batch_size, 1), ("world_size", world_size, 1),
                                   ("num_workers", num_workers, 0), ("seed", seed, 0),
                                   ("shuffle_window", shuffle_window, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1} (world_size {world_size}), got {rank!r}")
        if view_order not in VIEW_ORDERS:
            raise ValueError(f"view_order must be one of {VIEW_ORDERS}, got {view_order!r}")
        if mp_context is not None and mp_context not in MP_CONTEXTS:
            raise ValueError(f"mp_context must be None or one of {MP_CONTEXTS}, got {mp_context!r}")
        get_codec(self.manifest.codec.name)  # an unknown codec fails here, not in a worker
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.seed, self.view_order = num_workers, seed, view_order
        self.pin_memory, self.verify, self.shuffle_window = pin_memory, verify, shuffle_window
        # zarr keeps event-loop threads that a forked child inherits dead, so zarr workers spawn;
        # tar reading is plain file I/O and forks safely (and starts faster).
        self.mp_context = mp_context or ("spawn" if self.manifest.format.name == "zarr" else "fork")

        held = self.manifest.num_view_epochs
        if held == 0:
            raise ValueError(f"cache {self.manifest.where} lists no view-epochs")
        if view_epochs is not None:
            if isinstance(view_epochs, bool) or not isinstance(view_epochs, int) or view_epochs < 1:
                raise ValueError(f"view_epochs must be a positive integer, got {view_epochs!r}")
            if view_epochs > held:
                raise ValueError(f"--view-epochs: the cache {self.manifest.where} holds {held} view-epochs, fewer than "
                                 f"the {view_epochs} asked for (tec-cache build --views {view_epochs} with the same "
                                 "options adds the missing ones)")
        # K: the first view-epochs of the cache this loader cycles through.
        self.num_view_epochs = view_epochs or held
        sizes = [sum(e.num_samples for e in self.manifest.shards(v)) for v in range(self.num_view_epochs)]
        per_step = world_size * batch_size
        self.steps_per_epoch = sampling.steps_per_epoch(sizes, world_size=world_size, batch_size=batch_size)
        if self.steps_per_epoch == 0:
            v = int(np.argmin(sizes))
            raise ValueError(
                f"cache {self.manifest.where}: view-epoch {v} holds {sizes[v]} views, fewer than one step of "
                f"world_size * batch_size = {world_size} * {batch_size} = {per_step} (lower --batch-size)"
            )
        self._live: weakref.WeakSet[Generator[Batch, None, None]] = weakref.WeakSet()
        self._verified: dict[int, set[int]] = {}  # view-epoch -> shards this rank has verified

    def view_epoch_for(self, epoch: int) -> int:
        """Which view-epoch training epoch ``epoch`` reads: ``epoch % K`` ("cycle"), or position
        ``epoch % K`` of a seeded permutation of range(K) drawn anew for every K epochs ("permute")."""
        _check_nonneg("epoch", epoch)
        return sampling.view_epoch_for(epoch, num_view_epochs=self.num_view_epochs, view_order=self.view_order,
                                       seed=self.seed)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """This rank's batches of ``epoch``, from step ``start_step`` (``steps_per_epoch - start_step``
        batches). A fresh DataLoader (and workers) per call."""
        _check_nonneg("epoch", epoch)
        if isinstance(start_step, bool) or not isinstance(start_step, int) or not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step must be in 0..{self.steps_per_epoch} (steps_per_epoch), got {start_step!r}")
        view_epoch = self.view_epoch_for(epoch)
        # Up to prefetch_factor (2) batches of a worker wait for the main process, and one is being
        # copied out: three segments each keep a worker on reused memory.
        slots = _BatchSlots(self.num_workers, per_worker=3)
        dataset = _ViewEpochShards(self.manifest, view_epoch, cache_size=self.shuffle_window, slots=slots)
        sizes = [e.num_samples for e in self.manifest.shards(view_epoch)]
        order = epoch_order(sizes, seed=self.seed, epoch=epoch, shuffle_window=self.shuffle_window)
        batches = sampling.rank_batches(order, rank=self.rank, world_size=self.world_size, batch_size=self.batch_size,
                                        steps=self.steps_per_epoch, start_step=start_step)
        # Each shard is verified by the first batch of this rank that reads it, once per run.
        verified = self._verified.setdefault(view_epoch, set())
        if self.verify:
            shards = [set((np.searchsorted(dataset.offsets, b, side="right") - 1).tolist()) for b in batches]
            verify = sampling.first_reads(shards, verified)
        else:
            verify = [frozenset()] * len(batches)
        workers = self.num_workers if batches else 0  # nothing to read: start no processes
        loader = DataLoader(
            dataset,
            sampler=_RankBatches(batches, verify),
            batch_size=None,  # the sampler yields whole batches: one dataset call per batch
            collate_fn=_as_is,
            num_workers=workers,
            worker_init_fn=die_with_parent(),
            pin_memory=self.pin_memory,
            multiprocessing_context=self.mp_context if workers else None,
            in_order=True,  # the verification scheme relies on batches arriving in step order
            # Worker seeds from a private generator: iterating must not advance the global torch RNG,
            # whose state checkpoints record (a resumed run would otherwise record another state).
            generator=torch.Generator(),
        )
        gen = _iterate(loader, verify, verified, slots)
        self._live.add(gen)
        return gen

    def close(self) -> None:
        """Stop any epoch still being iterated (its workers exit)."""
        for gen in list(self._live):
            gen.close()
        self._live.clear()

    def __enter__(self) -> CacheLoader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _iterate(loader: DataLoader, verify: list[frozenset[int]], verified: set[int],
             slots: _BatchSlots) -> Generator[Batch, None, None]:
    """Yield the loader's batches; once a batch is out, the shards it verified count as verified.

    A batch that arrives in a worker's reusable segment is copied out of it first (a pinned batch
    already was, by the pinning thread, which torch skips where no accelerator is found) and the
    segment handed back to its worker."""
    # Holding the DataLoader iterator here ties its workers' lifetime to this generator: closing
    # it (CacheLoader.close, or breaking out and dropping it) shuts them down.
    it = iter(loader)
    try:
        for batch, checked in zip(it, verify):
            if batch.slot is not None:
                slot = batch.slot
                batch = replace(batch if batch.images.is_pinned() else batch.private(), slot=None)
                slots.give_back(slot)
            verified |= checked
            yield batch
    except BaseException:
        # An error's traceback holds the DataLoader iterator (torch's frames), so dropping our
        # reference would leave its workers running until a garbage collection: stop them now.
        # (GeneratorExit, from close(), comes here too.)
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        raise
    finally:
        del it


def _id_range(ids: np.ndarray) -> str:
    """A batch's sample ids for an error line: all of them when few, else the first and the count."""
    listed = ids.tolist()
    return str(listed) if len(listed) <= 4 else f"{listed[:4]} ... ({len(listed)} in all)"


def _check_nonneg(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")

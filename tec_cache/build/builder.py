"""Stage 1 orchestration: source images --> views --> base model --> codec --> shards --> manifest.

The unit of work and of atomicity is a shard: view-epoch v of the images in chunk c (images
[c*shard_size, (c+1)*shard_size) of the sorted source). Chunk c belongs to rank c % world_size,
and each image of a chunk is decoded once for all the view-epochs that chunk still lacks. A shard
is complete when its file and its sidecar JSON are both in place; a re-run skips complete shards,
so a killed, extended (more --views) or re-ranked build ends with the same shards as one
uninterrupted run. Rank 0 writes the manifest last, from the sidecars. The folder's layout (shard
paths, sidecars, leftovers, the manifest) is format/writer.py's CacheWriter; the resume identity is
format/identity.py's CacheIdentity.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as tdist
from rich import filesize
from torch.utils.data import DataLoader, Dataset

from tec_cache.build.config import DEFAULT_COMPRESSOR, BuildConfig
from tec_cache.core.basemodels import load_base_model
from tec_cache.core.codecs import TargetShape, get_codec, split_fields
from tec_cache.core.images import BadImage, ImageSource, open_source
from tec_cache.core.targets import extract_targets, normalise_images
from tec_cache.core.views import (
    DEVICE_RESIZE,
    TORCH_F32,
    WORKER_RESIZE,
    DeviceViews,
    ViewRecipe,
    load_source,
    make_views,
    source_for_device,
)
from tec_cache.format import get_format, open_writer
from tec_cache.format import manifest as mf
from tec_cache.format.identity import CacheIdentity
from tec_cache.format.manifest import MANIFEST_NAME, SCHEMA_VERSION, Manifest, ManifestError, load_manifest
from tec_cache.format.schema import ShardInfo, ViewRecord, record_key
from tec_cache.format.writer import CacheWriter
from tec_cache.format.writer_lock import WriterLock, WriterLockError, acquire
from tec_cache.runtime.dist import (
    DistInfo,
    all_reduce_sum,
    barrier,
    destroy_process_group,
    dist_info,
    init_process_group,
    lost_rank_guard,
    resolve_device,
)
from tec_cache.runtime.faults import fault_point
from tec_cache.runtime.run_log import naming_sample
from tec_cache.runtime.version import installed_version
from tec_cache.runtime.workers import die_with_parent

TOOL_VERSION = f"tec-cache {installed_version()}"  # recorded in every manifest
# Disk estimate safety factor: shard sizes vary with image content.
DISK_MARGIN = 1.10
_RESUME = "complete shards are kept: re-run the same command to resume"


class BuildOptionError(ValueError):
    """An option does not fit the inputs (checkpoint, data, an existing cache), found before any work."""


class DiskFullError(OSError):
    """A write hit ENOSPC; the message names the file, the space still needed and how to resume."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class BuildResult:
    manifest_path: Path | None
    views_built: int
    shards_built: int
    shards_skipped: int
    skipped_images: list[dict[str, str]]
    seconds: float
    bytes_per_view: float
    estimate: dict[str, Any] = field(default_factory=dict)


def source_fingerprint(source: ImageSource) -> str:
    h = hashlib.sha256()
    for it in source.items:
        h.update(it.key.encode("utf-8") + b"\0")
    return h.hexdigest()


def _single_item(batch: list[Any]) -> Any:
    return batch[0]


# A worker's pixels cross to the main process as numpy arrays, which the result pipe carries by
# value. As tensors, each would cross as a shared-memory file descriptor sent over a socket of its
# own, and receiving those took 15-29% of the main thread's time in an H200 build (a view is 150 KB
# at 224 px, a copy far cheaper than a socket per tensor there). No copy without workers.
def _sendable(t: torch.Tensor) -> np.ndarray:
    return t.numpy()


def _received(job: dict[str, Any]) -> dict[str, Any]:
    """A job as the main process uses it: its arrays back as tensors (no copy)."""
    if "source" in job:
        is_jpeg, arr = job["source"]
        return {**job, "source": (is_jpeg, torch.from_numpy(arr))}
    if "views" in job:
        return {**job, "views": [(v, data, torch.from_numpy(pix)) for v, data, pix in job["views"]]}
    return job


class _ViewJobs(Dataset):
    """Job j: decode image ``jobs[j][0]`` once and cut the view-epochs ``jobs[j][1]``; with
    ``on_device`` only read it (and decode what is not a JPEG): the main process cuts on the device."""

    def __init__(self, source: ImageSource, jobs: list[tuple[int, list[int]]], seed: int, recipe: ViewRecipe,
                 first_view: int = 0, on_device: bool = False):
        self.source, self.jobs, self.seed, self.recipe = source, jobs, seed, recipe
        self.first_view = first_view  # view-epoch v holds view index first_view + v
        self.on_device = on_device

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, j: int) -> dict[str, Any]:
        index, views = self.jobs[j]
        item = self.source.items[index]
        where = item.path if item.offset < 0 else f"{item.path}:{item.key}"
        try:
            data = self.source.read_bytes(index)
            if self.on_device:
                is_jpeg, src = source_for_device(data, where, self.recipe)
                return {"index": index, "where": where, "source": (is_jpeg, _sendable(src)), "views": views}
            img = load_source(data, where, self.recipe)
        except (BadImage, OSError) as e:
            return {"index": index, "error": str(e)}
        with naming_sample(f"image {item.key} of {self.source.root}, view-epochs {views}"):
            fault_point("cut_views")
            cut = make_views(img, item.key, [self.first_view + v for v in views], self.seed, self.recipe)
            return {"index": index, "views": [(v - self.first_view, data, _sendable(pix)) for v, data, pix in cut]}


class _Stats:
    """Running count/sum/sum-of-squares/min/max of the float targets, per field."""

    def __init__(self) -> None:
        self.acc: dict[str, list[float]] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        x = x.float()
        # One host transfer for the four reductions: on a GPU each .item() is a sync in the hot loop.
        vals = [x.numel(), *torch.stack([x.sum(), x.square().sum(), x.min(), x.max()]).tolist()]
        a = self.acc.get(name)
        self.acc[name] = vals if a is None else [a[0] + vals[0], a[1] + vals[1], a[2] + vals[2], min(a[3], vals[3]), max(a[4], vals[4])]

    def to_json(self) -> dict[str, list[float]]:
        return self.acc


def merge_stats(items: list[dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    merged: dict[str, list[float]] = {}
    for st in items:
        for name, a in st.items():
            m = merged.get(name)
            merged[name] = list(a) if m is None else [m[0] + a[0], m[1] + a[1], m[2] + a[2], min(m[3], a[3]), max(m[4], a[4])]
    out = {}
    for name, (n, s, ss, lo, hi) in merged.items():
        mean = s / max(n, 1)
        out[name] = {"count": n, "mean": mean, "std": math.sqrt(max(ss / max(n, 1) - mean * mean, 0.0)), "min": lo, "max": hi}
    return out


def _cache_identity(cfg: BuildConfig, source: ImageSource, facts: dict[str, Any], shape: TargetShape,
                    recipe: ViewRecipe, compressor: str) -> CacheIdentity:
    """The identity this build writes: what must not change between it and its resume/extension."""
    return CacheIdentity(
        base_model_sha256=facts["sha256"], base_model_arch=cfg.spec.arch, input_mean=tuple(facts["input_mean"]),
        input_std=tuple(facts["input_std"]), num_prefix_tokens=facts["num_prefix_tokens"], topk=cfg.spec.topk,
        last_layers=cfg.spec.last_layers, num_patches=shape.num_patches, seed=cfg.seed, first_view=cfg.first_view,
        size=cfg.spec.img_size, jpeg_quality=cfg.jpeg_quality, resize=recipe.resize, codec=cfg.codec, format=cfg.format,
        compressor=compressor, shard_size=cfg.shard_size, source_fingerprint=source_fingerprint(source),
    )


# Facts of the base model's weights and input recorded in the manifest's base_model section.
_WEIGHTS_FACTS = ("url", "size", "fetched_from", "sha256_of", "pretrained_tag", "hf_hub_id", "input_mean", "input_std",
                  "num_prefix_tokens")


def _view_placement(cfg: BuildConfig, device: torch.device, built: Manifest | None) -> tuple[str, bool]:
    """(resizer, views cut on the device?) of a build: an existing cache keeps its own resizer."""
    existing = built.views.recipe.resize if built is not None else None
    want_device = cfg.view_device == "device" or (cfg.view_device == "auto" and device.type == "cuda")
    resize = cfg.resize if cfg.resize != "auto" else existing or (DEVICE_RESIZE if want_device else WORKER_RESIZE)
    on_device = cfg.view_device == "device" or (want_device and resize == TORCH_F32)
    if on_device and resize != TORCH_F32:
        why = f"the cache at --out {cfg.out} was resized with it" if cfg.resize == "auto" else "--resize asks for it"
        raise ValueError(f"--view-device device: views cut on the device are resized with {TORCH_F32}, but {why}: "
                         f"{resize}; use --view-device workers")
    return resize, on_device


def _check_resume(root: Path, man: Manifest | None, expected: CacheIdentity) -> int:
    """Existing manifest must match this build; returns its view-epoch count (0 when none)."""
    if man is None:
        return 0
    differ = CacheIdentity.of(man).mismatch(expected)
    if differ:
        said = ", and ".join(f"{key} = {have!r}, this build asks for {want!r}" for key, have, want in differ)
        raise ManifestError(f"--out {root}: the existing cache was built with {said}; use another --out or the same settings")
    return man.num_view_epochs


class _ChunkBuild:
    """The bookkeeping of one chunk while its missing shards are built: per view-epoch a queue of
    decoded views, a shard writer and running target statistics; the images skipped; the writes in
    flight on the builder's writer thread."""

    def __init__(self, builder: Builder, chunk: int, missing: list[int]) -> None:
        self.builder, self.chunk, self.missing = builder, chunk, missing
        self.writers: dict[int, Any] = {}
        self.stats = {v: _Stats() for v in missing}
        self.skipped: list[dict[str, str]] = []
        # One queue per view-epoch: a shard's batches never depend on which other shards of the
        # chunk are being built, so a resumed or extended build computes them identically.
        self.pending: dict[int, list[tuple[int, int, bytes, torch.Tensor]]] = {v: [] for v in missing}
        self.futures: list[Future] = []
        self.sealing: Future[list[ShardInfo]] | None = None  # seal(), queued behind the writes

    def add(self, index: int, views: list[tuple[int, bytes, torch.Tensor]]) -> Iterator[int]:
        """Queue one image's views; yields each view-epoch whose queue now holds a full batch."""
        for v, data, pix in views:
            self.pending[v].append((index, v, data, pix))
            if len(self.pending[v]) >= self.builder.cfg.batch_size:
                yield v

    def take(self, v: int, n: int) -> list[tuple[int, int, bytes, torch.Tensor]]:
        batch, self.pending[v] = self.pending[v][:n], self.pending[v][n:]
        return batch

    def remainders(self) -> Iterator[tuple[int, int]]:
        """(view-epoch, count) of the partial batches left once every image is queued."""
        for v in self.missing:
            if self.pending[v]:
                yield v, len(self.pending[v])

    def submit(self, recs: list[ViewRecord]) -> None:
        for f in self.futures:  # a failed write (disk full) stops the build now, not at the chunk's end
            if f.done():
                f.result()
        self.futures.append(self.builder.writer_pool.submit(self.builder._write, self.chunk, self.writers, recs))

    def seal_later(self) -> None:
        """Queue seal() on the writer thread, after this chunk's writes: the main thread goes on to
        the next chunk's forward passes instead of waiting for the last write (with the default
        shard of one batch, that wait was every batch's whole write). ``sealed()`` collects it."""
        self.sealing = self.builder.writer_pool.submit(lambda: list(self.seal()))

    def sealed(self) -> list[ShardInfo]:
        """The finished shards of ``seal_later()``; raises what the writes or the seal raised."""
        assert self.sealing is not None
        return self.sealing.result()

    def seal(self) -> Iterator[ShardInfo]:
        """Wait for the writes, then close each shard and publish its sidecar (the shard's mark of
        completeness); yields each finished shard's facts."""
        for f in self.futures:
            f.result()
        b = self.builder
        for v in self.missing:
            with b._disk_full(b.writer.shard_path(v, self.chunk)):
                w = self.writers.get(v) or b._open(v, self.chunk, self.writers)
                fault_point("before_shard_close")
                info = w.close()
            fault_point("after_shard_rename")
            with b._disk_full(b.writer.sidecar_path(v, self.chunk)):
                b.writer.finish_shard(v, self.chunk, info, {"skipped": self.skipped, "stats": self.stats[v].to_json()})
            yield info

    def abort(self) -> None:
        futures = [*self.futures, *([self.sealing] if self.sealing is not None else [])]
        for f in futures:
            f.cancel()
        # A write or seal still running would race the aborts below (and could open a new
        # temporary). Shards the seal already closed stay: abort() leaves a closed writer alone.
        wait(futures)
        for w in self.writers.values():
            w.abort()


class Builder:
    """One rank's share of a build."""

    def __init__(self, cfg: BuildConfig, info: DistInfo, log: Callable[[str], None]):
        cfg.validate()
        self.cfg, self.info, self.log = cfg, info, log
        self.device = resolve_device(cfg.device, info)
        assert cfg.data is not None  # validate() refused a build without --data
        self.source = open_source(cfg.data)
        built = load_manifest(cfg.out) if (cfg.out / MANIFEST_NAME).exists() else None  # a cache to resume or extend
        resize, self.on_device = _view_placement(cfg, self.device, built)
        self.recipe = ViewRecipe(size=cfg.spec.img_size, jpeg_quality=cfg.jpeg_quality, resize=resize)
        self.device_views = DeviceViews(self.device, self.recipe, cfg.num_workers) if self.on_device else None
        self.codec = get_codec(cfg.codec)
        model, self.facts = load_base_model(cfg.spec, cfg.checkpoint, self.device, cfg.fetched)
        # A timm ViT (embed_dim, blocks[i].attn.num_heads), which nn.Module's typing cannot see.
        self.model: Any = cast(Any, model)
        # The base sees its own normalisation (a CLIP base's is not ImageNet's); the view recipe's,
        # recorded in the manifest for stage 2, stays the student's.
        self.base_mean, self.base_std = tuple(self.facts["input_mean"]), tuple(self.facts["input_std"])
        grid = cfg.spec.img_size // cfg.spec.patch_size
        self.shape = TargetShape(grid * grid, self.model.embed_dim, self.model.blocks[-1].attn.num_heads, cfg.spec.topk)
        # An existing cache keeps its fields as they are stored (caches built before the per-field
        # compress flags compress every field).
        self.field_specs = built.fields if built is not None else self.codec.field_specs(self.shape)
        self.compressor = cfg.compressor if cfg.compressor != "auto" else (
            built.format.compressor if built is not None else DEFAULT_COMPRESSOR)
        self.identity = _cache_identity(cfg, self.source, self.facts, self.shape, self.recipe, self.compressor)
        old_views = _check_resume(cfg.out, built, self.identity)
        self.num_views = max(cfg.views, old_views)
        if old_views > cfg.views:
            log(f"the cache already holds {old_views} view-epochs; keeping all of them")
        self.num_chunks = math.ceil(len(self.source) / cfg.shard_size)
        # The cache folder's layout; rank 0's writer lock is handed to it by build_cache.
        self.writer = CacheWriter(cfg.out, cfg.format, self.field_specs, self.compressor)
        self.writer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tec-write")
        # For the disk-full message: views missing (all ranks) when this run started, and those this
        # rank has put in finished shards since; their difference is an upper bound on what is left.
        self._views_missing = self._views_done = 0
        self._bpv: float | None = None
        self._estimate: dict[str, Any] = {}  # the disk estimate, measured on the run's first batch
        self._built = 0  # views this rank computed in this run
        self._progress: Callable[[int], None] = lambda n: None

    # ---- planning -------------------------------------------------------------------------
    def chunk_images(self, c: int) -> range:
        return range(c * self.cfg.shard_size, min((c + 1) * self.cfg.shard_size, len(self.source)))

    def plan(self) -> tuple[list[tuple[int, list[int]]], int, int]:
        """This rank's (chunk, missing view-epochs) list, and views still missing on all ranks."""
        mine, total_missing, total_done = [], 0, 0
        for c in range(self.num_chunks):
            missing = [v for v in range(self.num_views) if not self.writer.is_complete(v, c)]
            total_missing += len(missing) * len(self.chunk_images(c))
            total_done += self.num_views - len(missing)
            if missing and c % self.info.world_size == self.info.rank:
                mine.append((c, missing))
        return mine, total_missing, total_done

    # ---- estimate -------------------------------------------------------------------------
    def bytes_per_view(self, records: list[ViewRecord]) -> float:
        """Measured, not modelled: the first batch written as a real shard in a scratch folder."""
        with tempfile.TemporaryDirectory(prefix="tec-estimate-") as tmp:
            path = Path(tmp) / f"estimate{get_format(self.cfg.format).suffix}"
            with open_writer(self.cfg.format, path, self.field_specs, self.compressor) as w:
                for r in records:
                    w.write(r)
                info = w.close()
        return info.nbytes / max(len(records), 1)

    def _probe(self) -> Path:
        """The output folder, or its nearest existing parent (before the build creates it)."""
        probe = self.cfg.out
        while not probe.exists():
            probe = probe.parent
        return probe

    @contextlib.contextmanager
    def _disk_full(self, path: Path) -> Iterator[None]:
        """Turn ENOSPC (which names no file) into a DiskFullError naming ``path``, the space still
        needed and how to resume; the caller's cleanup still runs, the error still propagates."""
        try:
            yield
        except OSError as e:
            if e.errno != errno.ENOSPC or isinstance(e, DiskFullError):
                raise
            probe = self._probe()
            free = shutil.disk_usage(probe).free
            left = max(self._views_missing - self._views_done, 0)
            if left == 0:
                need = "every shard is complete, only this file remains to be written"
            elif self._bpv is not None:
                need = (f"about {filesize.decimal(int(self._bpv * left * DISK_MARGIN))} more is needed for the {left} views still to build "
                        f"({filesize.decimal(int(self._bpv))}/view, +{int((DISK_MARGIN - 1) * 100)}% margin)")
            else:
                need = f"{left} views are still to build"
            raise DiskFullError(
                f"disk full (ENOSPC) while writing {path}: {need}; {filesize.decimal(int(free))} is free on {probe}. "
                "Complete shards are kept and the half-written file was removed: free space and re-run the same "
                "command to resume."
            ) from e

    def check_disk(self, bpv: float, missing_views: int) -> dict[str, Any]:
        need = int(bpv * missing_views * DISK_MARGIN)
        probe = self._probe()
        free = shutil.disk_usage(probe).free
        est = {"bytes_per_view": round(bpv, 1), "views": missing_views, "bytes_needed": need, "bytes_free": free}
        if not self.cfg.dry_run and need > free:
            raise OSError(
                f"--out {self.cfg.out}: not enough disk: the {missing_views} views still to build need about "
                f"{filesize.decimal(int(need))} ({filesize.decimal(int(bpv))}/view, +{int((DISK_MARGIN - 1) * 100)}% margin), {filesize.decimal(int(free))} is free. "
                "Free space, use fewer --views, --codec int8, or another --out."
            )
        return est

    # ---- run ------------------------------------------------------------------------------
    def run(self, progress: Callable[[int], None] | None = None, set_total: Callable[[int], None] | None = None) -> BuildResult:
        t0 = time.time()
        mine, total_missing, already_done = self.plan()
        jobs = [(i, missing) for c, missing in mine for i in self.chunk_images(c)]
        self._views_missing = total_missing
        if set_total is not None:
            set_total(sum(len(m) * len(self.chunk_images(c)) for c, m in mine))
        self._progress = progress or (lambda n: None)
        loader = DataLoader(
            _ViewJobs(self.source, jobs, self.cfg.seed, self.recipe, self.cfg.first_view, self.on_device),
            batch_size=1, collate_fn=_single_item, num_workers=self.cfg.num_workers,
            prefetch_factor=4 if self.cfg.num_workers > 0 else None, worker_init_fn=die_with_parent(),
        )
        it = iter(loader)
        shards_built = 0
        skipped_all: list[dict[str, str]] = []
        bpv_seen: list[float] = []
        # One chunk seals on the writer thread while the next one's views go through the model.
        sealing: _ChunkBuild | None = None

        def collect(done: _ChunkBuild) -> None:
            nonlocal shards_built
            for info in done.sealed():
                self._views_done += info.num_samples
                bpv_seen.append(info.nbytes / max(info.num_samples, 1))
                shards_built += 1
                fault_point("after_shard")
            skipped_all.extend(done.skipped)

        chunk: _ChunkBuild | None = None
        try:
            for c, missing in mine:
                chunk = _ChunkBuild(self, c, missing)
                if self._fill(chunk, it):
                    return self._dry(self._estimate, t0)
                if self.cfg.dry_run:
                    continue
                chunk.seal_later()
                if sealing is not None:
                    collect(sealing)
                sealing = chunk
            if sealing is not None:
                collect(sealing)
        except BaseException:
            for unfinished in (chunk, sealing):  # abort() is a no-op on what it already finished
                if unfinished is not None:
                    unfinished.abort()
            raise
        if self.cfg.dry_run:
            # Nothing to compute on this rank: estimate from what is planned, without a forward.
            return self._dry(self._estimate or {"views": total_missing, "bytes_per_view": None}, t0)
        seconds = time.time() - t0
        fault_point("before_barrier")
        with lost_rank_guard("waiting for the other ranks to finish their shards", _RESUME):
            built_all = int(all_reduce_sum(self._built, self.device))  # also the barrier before the manifest
        fault_point("after_barrier")
        manifest_path = None
        if self.info.is_main:
            manifest_path = self.write_manifest(seconds, built_all)
            skipped_all = list(load_manifest(self.cfg.out).source.skipped or ())
        fault_point("after_manifest")
        with lost_rank_guard("waiting for rank 0 to write the manifest", _RESUME):
            barrier()
        return BuildResult(manifest_path, self._built, shards_built, already_done, skipped_all, seconds,
                           float(np.mean(bpv_seen)) if bpv_seen else 0.0, self._estimate)

    def _fill(self, chunk: _ChunkBuild, jobs: Iterator[dict[str, Any]]) -> bool:
        """Decode the chunk's images (from the loader), compute every full batch of each view-epoch
        and queue its writes, then the remainders; True when a dry run has its estimate."""
        for _ in self.chunk_images(chunk.chunk):
            job = _received(next(jobs))
            if "source" in job:
                job = self._cut_on_device(job)
            if "error" in job:
                if self.cfg.strict:
                    raise BadImage(f"--strict: {job['error']}")
                chunk.skipped.append({"key": self.source.items[job["index"]].key, "error": job["error"]})
                self._progress(len(chunk.missing))
                continue
            for v in chunk.add(job["index"], job["views"]):
                if self._compute(chunk, v, self.cfg.batch_size):
                    return True
        return any(self._compute(chunk, v, n) for v, n in chunk.remainders())

    def _cut_on_device(self, job: dict[str, Any]) -> dict[str, Any]:
        """A worker's source, cut into its views on the device (``on_device`` builds)."""
        assert self.device_views is not None
        item = self.source.items[job["index"]]
        try:
            img = self.device_views.source(job["source"], job["where"])
        except BadImage as e:
            return {"index": job["index"], "error": str(e)}
        first = self.cfg.first_view
        with naming_sample(f"image {item.key} of {self.source.root}, view-epochs {job['views']}"):
            fault_point("cut_views")
            cut = self.device_views.make(img, item.key, [first + v for v in job["views"]], self.cfg.seed)
        return {"index": job["index"], "views": [(v - first, data, pix) for v, data, pix in cut]}

    def _compute(self, chunk: _ChunkBuild, v: int, n: int) -> bool:
        """Targets of the first n pending views of view-epoch v, queued for writing; the first batch
        of the run also measures the disk estimate. True to stop (dry run)."""
        recs = self._targets(chunk.take(v, n), chunk.stats[v])
        fault_point("after_forward")
        if not self._estimate:
            with self._disk_full(Path(tempfile.gettempdir())):  # the scratch shard
                self._bpv = self.bytes_per_view(recs)
            self._estimate = self.check_disk(self._bpv, self._views_missing)
            if self.cfg.dry_run:
                return True
        chunk.submit(recs)
        self._built += len(recs)
        self._progress(len(recs))
        return False

    def _dry(self, estimate: dict[str, Any], t0: float) -> BuildResult:
        return BuildResult(None, 0, 0, 0, [], time.time() - t0, float(estimate.get("bytes_per_view") or 0.0), estimate)

    def _targets(self, batch: list[tuple[int, int, bytes, torch.Tensor]], stats: _Stats) -> list[ViewRecord]:
        pixels = torch.stack([b[3] for b in batch])  # [B,3,S,S] uint8
        if self.device.type == "cuda" and not pixels.is_cuda:
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        images = normalise_images(pixels.to(self.device), self.base_mean, self.base_std)
        feat, att, idx = extract_targets(self.model, images, topk=self.cfg.spec.topk, last_layers=self.cfg.spec.last_layers)
        stats.add("feat", feat)
        stats.add("att", att)
        per_view = split_fields(self.codec.encode(feat, att, idx))
        out = []
        for (index, v, data, _), fields in zip(batch, per_view):
            item = self.source.items[index]
            out.append(ViewRecord(record_key(index), index, v, item.label, item.key, data, fields))
        return out

    def _open(self, v: int, c: int, writers: dict[int, Any]) -> Any:
        writers[v] = self.writer.open_shard(v, c)
        fault_point("shard_opened")
        return writers[v]

    def _write(self, c: int, writers: dict[int, Any], recs: list[ViewRecord]) -> None:
        # Runs in the writer thread, overlapping the next batch's forward pass.
        for r in recs:
            with self._disk_full(self.writer.shard_path(r.view_epoch, c)):
                w = writers.get(r.view_epoch) or self._open(r.view_epoch, c, writers)
                w.write(r)
                fault_point("mid_shard_write")

    # ---- manifest -------------------------------------------------------------------------
    def write_manifest(self, seconds: float, views_this_run: int) -> Path:
        view_epochs, shards = self.writer.collect(self.num_views, self.num_chunks)
        skipped = {s["key"]: s["error"] for shard in shards for s in shard.notes["skipped"]}
        stats = [shard.notes["stats"] for shard in shards]
        total_bytes = sum(shard.entry.nbytes for shard in shards)
        total_samples = sum(shard.entry.num_samples for shard in shards)
        spec = self.cfg.spec
        grid = spec.img_size // spec.patch_size
        # The spec's options (top-k, tau, ...) and where the weights came from ride along verbatim.
        options = {k: x for k, x in spec.to_json().items() if k not in ("name", "arch", "depth")}
        source = self.source.describe()
        manifest = Manifest(
            root=self.cfg.out,
            schema_version=SCHEMA_VERSION,
            base_model=mf.BaseModel(name=spec.name, arch=spec.arch, sha256=self.facts["sha256"], embed_dim=self.shape.dim,
                                    num_heads=self.shape.heads, depth=len(self.model.blocks),
                                    extra={**options, "checkpoint": self.facts["path"], "layout": self.facts["layout"],
                                           **{k: self.facts[k] for k in _WEIGHTS_FACTS if self.facts.get(k) is not None}}),
            targets=mf.Targets(num_patches=self.shape.num_patches, grid=(grid, grid), patch_size=spec.patch_size,
                               dim=self.shape.dim, heads=self.shape.heads, topk=spec.topk, last_layers=spec.last_layers,
                               tau=spec.tau),
            views=mf.Views(count=self.num_views, seed=self.cfg.seed, recipe=mf.Recipe.of(self.recipe.to_json()),
                           extra={"image_format": "jpeg", **({"first_view": self.cfg.first_view} if self.cfg.first_view else {})}),
            codec=mf.Codec(name=self.codec.name, fields=dict(self.field_specs)),
            format=mf.Format(name=self.cfg.format, compressor=self.compressor, shard_size=self.cfg.shard_size),
            source=mf.Source.of({**source, "fingerprint": self.identity.source_fingerprint,
                                 "skipped": [{"key": k, "error": e} for k, e in sorted(skipped.items())]}),
            view_epochs=view_epochs,
            stats=mf.Stats(fields={k: mf.FieldStats.of(x) for k, x in merge_stats(stats).items()},
                           total_bytes=total_bytes, total_views=total_samples,
                           bytes_per_view=total_bytes / max(total_samples, 1),
                           build={"seconds": round(seconds, 3), "views_this_run": views_this_run,
                                  "views_per_s": round(views_this_run / max(seconds, 1e-9), 2),
                                  "world_size": self.info.world_size, "device": str(self.device),
                                  "views_cut_on": "device" if self.on_device else "workers",
                                  **({"views_decoded_on": self.device_views.decoded_on,
                                      "device_decoder_checked_views": self.device_views.checked}
                                     if self.device_views is not None else {})}),
            extra={"tool": TOOL_VERSION},
        )
        with self._disk_full(self.writer.manifest_path):
            return self.writer.publish(manifest)

    def close(self) -> None:
        self.writer_pool.shutdown(wait=True)
        if self.device_views is not None:
            self.device_views.close()



def _take_out(out: Path, info: DistInfo, joined: bool, log: Callable[[str], None]) -> WriterLock | None:
    """Rank 0 takes --out's writer lock, every rank learns the outcome: the job is one writer.
    BuildOptionError (on every rank) when another writer holds it."""
    lock, error = None, None
    if info.is_main:
        try:
            lock = acquire(out, "tec-cache build", "--out", say=log)
        except WriterLockError as e:
            error = str(e)
    if joined:
        try:
            every: list[Any] = [None] * info.world_size
            with lost_rank_guard("learning whether rank 0 holds --out's writer lock", _RESUME):
                tdist.all_gather_object(every, error)
            error = every[0]
        except BaseException:
            if lock is not None:
                lock.release()
            raise
    if error is not None:
        raise BuildOptionError(error)
    return lock


def build_cache(cfg: BuildConfig, log: Callable[[str], None] = lambda s: None,
                progress: Callable[[int], None] | None = None, set_total: Callable[[int], None] | None = None) -> BuildResult:
    """Run (this rank's part of) a build; under torchrun every rank calls it. The job holds --out's
    writer lock from before it reads the existing cache until it ends (a dry run writes nothing and
    takes none)."""
    info = dist_info()
    joined = False
    lock: WriterLock | None = None
    try:
        device = resolve_device(cfg.device, info)
        joined = init_process_group(info, device)
        if not cfg.dry_run:
            lock = _take_out(cfg.out, info, joined, log)
        try:
            builder = Builder(cfg, info, log)
        except (ValueError, FileNotFoundError) as e:
            # Nothing is computed or written before here: a bad --checkpoint, --data or an --out
            # holding another build is a usage error, not a failed build.
            raise BuildOptionError(str(e)) from e
        builder.writer.lock = lock
        try:
            return builder.run(progress, set_total)
        finally:
            if lock is not None:
                lock.mark_exiting()
            builder.close()
    finally:
        if lock is not None:
            lock.release()
        if joined:
            destroy_process_group()

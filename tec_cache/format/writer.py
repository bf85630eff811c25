"""The cache writer: the layout of a cache folder while it is being built, and its manifest, last.

Data flow: the build (tec_cache/build/builder.py) asks ``CacheWriter`` for a shard writer of
(view-epoch v, chunk c), streams ``ViewRecord``s into it, closes it (the shard format publishes the
file atomically) and hands the resulting ``ShardInfo`` back with ``finish_shard``, which publishes
the shard's sidecar JSON: a shard is complete when its file and its sidecar are both in place, so a
killed build resumes from what is complete. Once every shard is complete, ``collect`` reads the
sidecars back into the manifest's view-epochs, and ``publish`` removes what killed writers left
behind and writes ``manifest.json`` last, sealed with its digest: a folder is a cache only from then
on. MosaicML streaming's ``MDSWriter`` (shards, then ``index.json`` on finish) is the model; here a
shard is addressed by (v, c) so that ranks, resumes and extensions write the same files.

Layout (a format's suffix is ``.tar`` or ``.zarr``)::

    manifest.json
    ve000/shard-000000.tar        view-epoch 0, chunk 0 (images [0, shard_size))
    ve000/shard-000000.tar.json   its sidecar: ShardInfo + what the build notes (skipped images, stats)
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tec_cache.format.base import ShardWriter
from tec_cache.format.fs import is_temporary, remove, write_json_atomic
from tec_cache.format.manifest import MANIFEST_NAME, Manifest, ShardEntry, ViewEpoch
from tec_cache.format.registry import get_format, open_writer
from tec_cache.format.schema import FieldSpec, ShardInfo
from tec_cache.format.writer_lock import WriterLock, is_lock_file
from tec_cache.runtime.faults import fault_point

__all__ = ["CacheWriter", "FinishedShard", "shard_relpath"]


def shard_relpath(fmt: str, view_epoch: int, chunk: int) -> str:
    """Where shard (view-epoch, chunk) of a cache in format ``fmt`` lies, relative to the cache root."""
    return f"ve{view_epoch:03d}/shard-{chunk:06d}{get_format(fmt).suffix}"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


@dataclass(frozen=True)
class FinishedShard:
    """A complete shard as its sidecar describes it: the manifest's entry and the build's notes."""

    entry: ShardEntry
    notes: Mapping[str, Any]  # what finish_shard was given beside the ShardInfo (skipped, stats)


class CacheWriter:
    """The files of one cache folder being written: shards, their sidecars, temporaries, the manifest.

    ``fields`` and ``compressor`` are those every shard is written with (an existing cache's own,
    when one is resumed or extended). ``lock`` (rank 0's writer lock of the folder, when held) is
    checked before the manifest is written: a writer whose lock was taken over stops there.
    """

    def __init__(self, root: Path, fmt: str, fields: Mapping[str, FieldSpec], compressor: str,
                 lock: WriterLock | None = None) -> None:
        get_format(fmt)  # an unknown format fails here, before any shard
        self.root, self.format, self.fields, self.compressor = Path(root), fmt, dict(fields), compressor
        self.lock = lock

    # ---- shards ---------------------------------------------------------------------------------
    def shard_path(self, v: int, c: int) -> Path:
        return self.root / shard_relpath(self.format, v, c)

    def sidecar_path(self, v: int, c: int) -> Path:
        return _sidecar(self.shard_path(v, c))

    def is_complete(self, v: int, c: int) -> bool:
        """Both the shard and its sidecar are in place (the sidecar is published after the shard)."""
        return self.shard_path(v, c).exists() and self.sidecar_path(v, c).exists()

    def open_shard(self, v: int, c: int) -> ShardWriter:
        """A writer of shard (v, c); it publishes the shard atomically on ``close``."""
        path = self.shard_path(v, c)
        path.parent.mkdir(parents=True, exist_ok=True)
        return open_writer(self.format, path, self.fields, self.compressor)

    def finish_shard(self, v: int, c: int, info: ShardInfo, notes: Mapping[str, Any]) -> None:
        """Publish shard (v, c)'s sidecar (its mark of completeness): ``info`` and the build's ``notes``."""
        write_json_atomic(self.sidecar_path(v, c), {**info.to_json(), **notes})

    def finished(self, v: int, c: int) -> FinishedShard:
        """What the sidecar of a complete shard (v, c) says."""
        side = json.loads(self.sidecar_path(v, c).read_text())
        info = ShardInfo(side["num_samples"], side["nbytes"], side["sha256"])
        notes = {k: x for k, x in side.items() if k not in info.to_json()}
        return FinishedShard(ShardEntry(v, c, shard_relpath(self.format, v, c), info), notes)

    def collect(self, num_views: int, num_chunks: int) -> tuple[tuple[ViewEpoch, ...], list[FinishedShard]]:
        """The manifest's view-epochs from every shard's sidecar, and the shards in (v, c) order;
        RuntimeError names a shard that is not complete."""
        view_epochs, shards = [], []
        for v in range(num_views):
            entries = []
            for c in range(num_chunks):
                if not self.is_complete(v, c):
                    raise RuntimeError(f"shard {self.shard_path(v, c)} is missing after all ranks finished; "
                                       "re-run the build to complete it")
                shard = self.finished(v, c)
                shards.append(shard)
                entries.append(shard.entry)
            view_epochs.append(ViewEpoch(v, sum(e.num_samples for e in entries), tuple(entries)))
        return tuple(view_epochs), shards

    # ---- the end of a build -----------------------------------------------------------------------
    def remove_leftovers(self) -> None:
        """Delete temporaries that killed runs left behind (every writer has finished by now)."""
        for d in [self.root, *sorted(self.root.glob("ve[0-9][0-9][0-9]"))]:
            for p in d.iterdir():
                if is_temporary(p.name) and not is_lock_file(p.name):  # the lock's heartbeat is live
                    remove(p)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    def publish(self, manifest: Manifest) -> Path:
        """Write ``manifest`` (sealed with its digest) last, atomically, once the leftovers are gone."""
        self.remove_leftovers()
        if self.lock is not None:
            self.lock.ensure()  # a writer whose lock was taken over (it was stale) stops here
        fault_point("before_manifest")
        write_json_atomic(self.manifest_path, manifest.sealed().to_json(), fault="manifest")
        return self.manifest_path

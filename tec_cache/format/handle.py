"""A cache handle: where a cache's shards are and how one is opened, a local folder or a URL alike.

Data flow: ``load_manifest`` --> ``Manifest.handle`` --> ``CacheHandle.open(rel, info)`` --> a
``ShardReader``. A local shard is opened from the folder (verified against the manifest's entry
when asked); a remote one (remote.py) is streamed and checked as it arrives, then read from memory.
The handle is small, plain data, so stage 2's loader hands it to its (possibly spawned) workers
instead of the whole manifest, and the choice between folder and URL is made here only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tec_cache.format.base import ShardReader
from tec_cache.format.registry import get_format
from tec_cache.format.remote import RemoteCache
from tec_cache.format.schema import FieldSpec, ShardInfo

__all__ = ["CacheHandle"]


@dataclass(frozen=True)
class CacheHandle:
    """How the shards of one cache are read: its root (or read-through folder), its URL when it is
    remote, and the format, fields and compressor every shard was written with."""

    root: Path
    location: RemoteCache | None
    format: str
    fields: dict[str, FieldSpec]
    compressor: str

    @property
    def is_remote(self) -> bool:
        """Whether shards stream from a URL (and are then checked on every open)."""
        return self.location is not None

    @property
    def where(self) -> str:
        """The cache as messages name it: its folder, or its URL."""
        return self.location.ref if self.location is not None else str(self.root)

    def path(self, rel: str) -> Path:
        """The local path of a shard (of a remote cache: in its read-through folder)."""
        return self.root / rel

    def ref(self, rel: str) -> str:
        """Where a shard is read from, as messages name it: its path, or its URL."""
        return self.location.url(rel) if self.location is not None else str(self.path(rel))

    def open(self, rel: str, info: ShardInfo, *, verify: bool = False, buffer: bytearray | None = None) -> ShardReader:
        """A reader of the shard at ``rel`` listed with ``info``; with ``verify`` its size, sha256 and
        count are checked first (always for a remote shard, as it streams in). ``buffer``: memory a
        local format that reads whole shards may read into."""
        if self.location is not None:
            data = self.location.fetch_shard(rel, info)
            return get_format(self.format).open_bytes(self.ref(rel), data, self.fields, self.compressor, expect=info)
        return get_format(self.format).open_reader(self.path(rel), self.fields, self.compressor,
                                                   expect=info if verify else None, buffer=buffer)

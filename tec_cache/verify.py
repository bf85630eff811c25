"""Cache verification: the manifest against its own checksum, then every listed shard against its
size, checksum, sample count and schema.

Data flow: manifest --> each shard entry --> reader with the expected ShardInfo --> a list of
problems (empty when the cache is sound). ``tec-cache verify`` and stage 2's pre-flight use it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tec_cache import shards as shard_io
from tec_cache.manifest import MANIFEST_NAME, Manifest, ShardEntry, digest_problem, load_manifest


@dataclass(frozen=True)
class Problem:
    shard: str
    check: str
    detail: str

    def __str__(self) -> str:
        return f"{self.shard}: {self.check}: {self.detail}"


def check_shard_files(man: Manifest) -> list[Problem]:
    """Cheap pre-flight: every listed shard exists with the listed size (no reads)."""
    problems = []
    for e in man.shards():
        path = man.shard_path(e)
        if not path.exists():
            problems.append(Problem(e.path, "missing", "listed in the manifest but not on disk"))
            continue
        size = shard_io.shard_nbytes(man.format, path)
        if size != e.nbytes:
            problems.append(Problem(e.path, "size", f"{size} bytes on disk, manifest lists {e.nbytes}"))
    return problems


def verify_shard(man: Manifest, e: ShardEntry) -> Problem | None:
    """Full check of one shard: checksum, then every record decoded against the schema."""
    path = man.shard_path(e)
    if not path.exists():
        return Problem(e.path, "missing", "listed in the manifest but not on disk")
    expect = shard_io.ShardInfo(e.num_samples, e.nbytes, e.sha256)
    try:
        reader = shard_io.open_reader(man.format, path, man.fields, man.compressor, expect=expect)
        n = 0
        for rec in reader:
            if rec.view_epoch != e.view_epoch:
                return Problem(e.path, "view epoch", f"record {rec.key} belongs to view-epoch {rec.view_epoch}, not {e.view_epoch}")
            n += 1
        if n != e.num_samples:
            return Problem(e.path, "sample count", f"{n} records, manifest lists {e.num_samples}")
    except shard_io.ShardError as err:
        return Problem(e.path, "shard", str(err))
    except (OSError, ValueError) as err:
        return Problem(e.path, "read", f"{type(err).__name__}: {err}")
    return None


def verify_cache(root: Path, on_shard: Callable[[ShardEntry, Problem | None], None] | None = None) -> list[Problem]:
    """All problems of the cache at ``root``; raises ManifestError when there is no valid manifest."""
    man = load_manifest(root)
    problems = []
    edited = digest_problem(man)
    if edited is not None:
        problems.append(Problem(MANIFEST_NAME, "checksum", edited))
    for e in man.shards():
        p = verify_shard(man, e)
        if on_shard is not None:
            on_shard(e, p)
        if p is not None:
            problems.append(p)
    return problems

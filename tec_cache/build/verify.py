"""Cache verification: the manifest against its own checksum, then every listed shard against its
size, checksum, sample count and schema.

Data flow: manifest --> each shard entry --> reader with the expected ShardInfo --> a list of
problems (empty when the cache is sound). ``tec-cache verify`` uses it; stage 2's cheaper pre-flight
(``check_shard_files``) lives in the format core.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tec_cache.format import Problem, ShardError
from tec_cache.format.manifest import MANIFEST_NAME, Manifest, ShardEntry, digest_problem, load_manifest
from tec_cache.format.remote import RemoteMissing


def verify_shard(man: Manifest, e: ShardEntry) -> Problem | None:
    """Full check of one shard: checksum, then every record decoded against the schema."""
    if man.location is None and not man.shard_path(e).exists():
        return Problem(e.path, "missing", "listed in the manifest but not on disk")
    try:
        reader = man.open_shard(e, verify=True)
        n = 0
        for rec in reader:
            if rec.view_epoch != e.view_epoch:
                return Problem(e.path, "view epoch", f"record {rec.key} belongs to view-epoch {rec.view_epoch}, not {e.view_epoch}")
            n += 1
        if n != e.num_samples:
            return Problem(e.path, "sample count", f"{n} records, manifest lists {e.num_samples}")
    except RemoteMissing as err:
        return Problem(e.path, "missing", str(err))
    except ShardError as err:
        return Problem(e.path, "shard", str(err))
    except (OSError, ValueError) as err:
        return Problem(e.path, "read", f"{type(err).__name__}: {err}")
    return None


def verify_cache(root: Path | str, on_shard: Callable[[ShardEntry, Problem | None], None] | None = None) -> list[Problem]:
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

"""Cheap integrity checks of a cache's shard files against its manifest, shared by both stages.

Data flow: manifest -> each listed shard -> exists? size as listed? -> a list of ``Problem``s.
Stage 2's pre-flight runs it before step 1; ``tec-cache verify`` reports the same ``Problem``s
after reading every shard in full.
"""
from __future__ import annotations

from dataclasses import dataclass

from tec_cache.format.manifest import Manifest

__all__ = ["Problem", "check_shard_files"]


@dataclass(frozen=True)
class Problem:
    """One failed check: which shard (or the manifest), which check, what was found."""

    shard: str
    check: str
    detail: str

    def __str__(self) -> str:
        return f"{self.shard}: {self.check}: {self.detail}"


def check_shard_files(man: Manifest) -> list[Problem]:
    """Every listed shard exists with the listed size (no reads of shard content). A remote cache's
    shards are not looked at here: their size and sha256 are checked as each one streams in."""
    problems: list[Problem] = []
    if man.location is not None:
        return problems
    shard_format = man.format.shards
    for e in man.shards():
        path = man.shard_path(e)
        if not path.exists():
            problems.append(Problem(e.path, "missing", "listed in the manifest but not on disk"))
            continue
        size = shard_format.nbytes(path)
        if size != e.nbytes:
            problems.append(Problem(e.path, "size", f"{size} bytes on disk, manifest lists {e.nbytes}"))
    return problems

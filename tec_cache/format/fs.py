"""File-system safety for everything the two stages write: fsync, atomic publish, atomic JSON.

Data flow: a writer fills a temporary sibling, fsyncs it, and ``publish`` renames it over the final
name and fsyncs the folder, so a reader (or a resumed run) sees the old file or the new one, never
half of one. Shards, the manifest and its sidecars, checkpoints, metrics and figures all go through
``write_atomic`` or ``publish``; ``is_temporary`` recognises what a killed writer left behind.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from tec_cache.runtime.faults import fault_point

__all__ = ["fsync_dir", "fsync_tree", "is_temporary", "publish", "remove", "temporary_name", "write_atomic",
           "write_json_atomic", "write_text_atomic", "prepare_output_file"]


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (the directory entry, not only the file's bytes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (a zarr shard is a directory of files)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def temporary_name(path: Path) -> Path:
    """The hidden, per-process temporary sibling an atomic write of ``path`` goes through."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def is_temporary(name: str) -> bool:
    """Names of half-written files: ``temporary_name``s and shard writers' ``.tmp``/``.old`` siblings."""
    return (name.startswith(".") and ".tmp-" in name) or name.endswith(".tmp") or name.endswith(".old")


def remove(path: Path) -> None:
    """Delete a file or a whole directory; nothing there is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def publish(tmp: Path, path: Path, fault: str | None = None) -> None:
    """Move a finished, fsynced temporary to its final name and make the rename durable.

    A file replaces atomically; a directory cannot replace a non-empty one, so the old one is first
    renamed aside (readers then see either the old or no shard, never a half-deleted one) and
    removed after. ``fault`` names a fault point reached after the rename, before the folder's fsync.
    """
    if tmp.is_dir() and (path.exists() or path.is_symlink()):
        old = path.with_name(path.name + ".old")
        remove(old)
        os.replace(path, old)
        os.replace(tmp, path)
        remove(old)
    else:
        os.replace(tmp, path)
    if fault is not None:
        fault_point(fault)
    fsync_dir(path.parent)


def write_atomic(
    path: Path,
    write: Callable[[BinaryIO], object],
    *,
    tmp: Path | None = None,
    before_rename: str | None = None,
    after_rename: str | None = None,
    sealed: Callable[[], None] | None = None,
) -> None:
    """Write a file through ``write(f)`` into a temporary, fsync, rename it over ``path``, fsync the folder.

    A failed or interrupted write removes its temporary and leaves ``path`` as it was.
    ``before_rename``/``after_rename`` name fault points (see faults.py): the first is reached with
    the temporary complete and durable, the second with the new file in place. ``sealed`` runs
    with the temporary complete and durable, before the rename (a checkpoint's digest is written there).
    """
    path = Path(path)
    tmp = temporary_name(path) if tmp is None else tmp
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if sealed is not None:
            sealed()
        if before_rename is not None:
            fault_point(before_rename)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if after_rename is not None:
        fault_point(after_rename)
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """``write_atomic`` of a UTF-8 text (metrics rewritten on resume, small state files)."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: Path, obj: Any, fault: str = "json") -> None:
    """Write JSON (indent 1, sorted keys) atomically: readers see old or new, never half.

    ``fault`` names this write's fault points: ``{fault}_torn`` (half the bytes in the temporary),
    ``mid_{fault}_write`` (temporary complete) and ``after_{fault}_rename`` (see faults.py).
    """
    data = json.dumps(obj, indent=1, sort_keys=True).encode("utf-8")

    def write(f: BinaryIO) -> None:
        f.write(data[: len(data) // 2])
        f.flush()  # so that a kill at the next point really leaves a torn temporary on disk
        fault_point(f"{fault}_torn")
        f.write(data[len(data) // 2 :])

    write_atomic(path, write, before_rename=f"mid_{fault}_write", after_rename=f"after_{fault}_rename")


def prepare_output_file(out: Path, option: str = "--out") -> Path:
    """Check, before any work, that ``out`` can be written as a file (creating its folder), so a
    long command never fails at its last step; ValueError names ``option``."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{option}: {out} is a folder; give a file name inside it")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{option}: cannot create the folder {parent} ({e.strerror or e})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option}: the folder {parent} is not writable")
    return out

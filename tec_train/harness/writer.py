"""The run dir's one writer: ``tec-train run`` and ``finetune`` hold its lock from start to end.

Data flow: a loop's first act --``take_run_dir``--> rank 0 takes the run dir's writer lock
(tec_cache.format.writer_lock: a lock file with a heartbeat), every other rank learns the outcome through
the process group, so all ranks of one torchrun job are one writer --> the loop reads its
checkpoint, trains, checkpoints (``RunLock.ensure`` before each write) --> ``RunLock.release`` at
the end, also on an error. A refused run raises WriterLockError on every rank before any work.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tec_cache.format.writer_lock import WriterLock, WriterLockError, acquire

from .runtime import Runtime


class RunLock:
    """The lock of one run as a rank sees it: rank 0 holds the file, the others hold nothing."""

    def __init__(self, lock: WriterLock | None) -> None:
        self.lock = lock

    def ensure(self) -> None:
        """WriterLockError when another writer took the run dir over (this one was stale)."""
        if self.lock is not None:
            self.lock.ensure()

    def ending(self) -> None:
        """Say in the lock file that this run is ending: a requeue of it waits instead of failing."""
        if self.lock is not None:
            self.lock.mark_exiting()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def take_run_dir(runtime: Runtime, run_dir: Path, command: str, say: Callable[[str], None]) -> RunLock:
    """Rank 0 takes ``run_dir``'s writer lock; a collective: every rank joins the process group here
    and raises the same WriterLockError when rank 0 was refused."""
    error: str | None = None
    lock: WriterLock | None = None
    if runtime.is_main:
        try:
            lock = acquire(run_dir, command, "--run-dir", say=say)
        except WriterLockError as e:
            error = str(e)
    if runtime.world_size > 1:
        try:
            runtime.join()
            error = runtime.all_gather(error)[0]
        except BaseException:
            if lock is not None:
                lock.release()
            raise
    if error is not None:
        runtime.leave()
        raise WriterLockError(error)
    return RunLock(lock)


def take_run_dir_for(runtime: Runtime, run_dir: Path, command: str, say: Callable[[str], None],
                     prepare: Callable[[], None]) -> RunLock:
    """A loop's start: take ``run_dir``'s writer lock (``take_run_dir``), then ``prepare`` (read the
    run dir, open data, build); if that fails the lock is released and the process group left, so a
    refused or broken start leaves nothing held."""
    lock = take_run_dir(runtime, run_dir, command, say)
    try:
        prepare()
    except BaseException:
        lock.release()
        runtime.leave()
        raise
    return lock

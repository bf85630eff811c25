"""One writer at a time for a cache folder or a run dir: a lock file with a heartbeat.

Data flow: a writing command (``tec-cache build``, ``tec-train run``, ``tec-train finetune``) calls
``acquire`` on its folder before any work --> **.tec-writer.lock** appears there (JSON: host, boot
id, pid and its start time, job id, command, start time, heartbeat, a random token) --> a daemon
thread rewrites it with a fresh heartbeat every few seconds --> ``release`` removes it at the end.
Readers (verify, inspect, show, training from a cache, plot, export, knn, linear) never look at it.

It has to hold where users run: a local disk, and a shared file system seen by several nodes, where
advisory locks may not cross nodes. So the file itself is the lock: it appears atomically complete
(``link`` of a finished temporary, which fails when the name exists), and who holds it, and whether
that holder is alive, is read from its content. An ``flock`` on the folder adds a guarantee between
processes of one host where the file system supports it. A second writer is refused at once
(``WriterLockError``: the CLIs exit 2 naming the holder and its heartbeat's age) unless the lock is
stale:

* on the holder's own host (same host name and boot id), when its process is gone;
* from another host, when its heartbeat is older than ``TEC_LOCK_STALE_S`` seconds (default 120).

A newcomer of the same job (a requeue: the same scheduler job id) or a holder that says it is
exiting is waited for, up to that bound, instead of refused. The lock file lives beside the shards
and checkpoints, never inside one, and no manifest digest covers it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tec_cache.format.fs import fsync_dir
from tec_cache.runtime.config import env_seconds

LOCK_NAME = ".tec-writer.lock"
LOCK_FORMAT = "tec-writer-lock"
STALE_ENV = "TEC_LOCK_STALE_S"
# Two minutes: twelve missed heartbeats, longer than NFS attribute caching (at most 60 s by default)
# and than clock differences between the nodes of a cluster, short enough that a requeued job on
# another node waits at most that long for a dead instance's lock.
DEFAULT_STALE_S = 120.0
# Environment variables that name the job a process belongs to, first found wins: a user's own,
# the schedulers', then torchrun's (one id per launch, kept across its elastic restarts).
JOB_ENVS = ("TEC_JOB_ID", "SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID", "TORCHELASTIC_RUN_ID")
_TAKEOVER_STALE_S = 10.0  # a takeover holds its guard for milliseconds; older means its taker died


class WriterLockError(ValueError):
    """Another writer holds the folder (or took it over from this one); the message names it."""


def stale_after_s() -> float:
    """``TEC_LOCK_STALE_S`` (seconds) or the default; ValueError names the variable."""
    return env_seconds(STALE_ENV, DEFAULT_STALE_S)


def job_id() -> str | None:
    """This process's job, as ``VARIABLE=value`` of the first of ``JOB_ENVS`` set (None outside any)."""
    for name in JOB_ENVS:
        value = os.environ.get(name)
        if value:
            return f"{name}={value}"
    return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name before ")" may hold spaces
    except (IndexError, ValueError):
        return None


def _process_alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    if start is not None:
        now = _process_start(pid)
        if now is not None and now != start:
            return False  # the pid was reused by a newer process
        if now is not None and _zombie(pid):
            return False
    return True


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


@dataclass(frozen=True)
class Holder:
    """What a lock file says about its writer."""

    host: str
    boot_id: str | None
    pid: int
    pid_start: int | None
    job: str | None
    command: str
    started: float
    heartbeat: float
    token: str
    exiting: bool = False

    @classmethod
    def this_process(cls, command: str) -> Holder:
        now = time.time()
        return cls(socket.gethostname(), _boot_id(), os.getpid(), _process_start(os.getpid()), job_id(), command,
                   now, now, uuid.uuid4().hex)

    def to_json(self) -> dict[str, Any]:
        return {"format": LOCK_FORMAT, "version": 1, "host": self.host, "boot_id": self.boot_id, "pid": self.pid,
                "pid_start": self.pid_start, "job": self.job, "command": self.command, "started": self.started,
                "heartbeat": self.heartbeat, "token": self.token, "exiting": self.exiting}

    @classmethod
    def from_json(cls, obj: Any) -> Holder | None:
        if not isinstance(obj, dict) or obj.get("format") != LOCK_FORMAT:
            return None
        try:
            return cls(str(obj["host"]), obj.get("boot_id"), int(obj["pid"]), obj.get("pid_start"), obj.get("job"),
                       str(obj.get("command", "?")), float(obj["started"]), float(obj["heartbeat"]), str(obj["token"]),
                       bool(obj.get("exiting", False)))
        except (KeyError, TypeError, ValueError):
            return None

    def same_host(self, other: Holder) -> bool:
        return self.host == other.host and (self.boot_id is None or other.boot_id is None or self.boot_id == other.boot_id)

    def describe(self, age: float) -> str:
        job = f", job {self.job}" if self.job else ""
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        state = ", exiting" if self.exiting else ""
        return (f"{self.command} on host {self.host}, pid {self.pid}{job} (started {started}, "
                f"heartbeat {age:.0f} s ago{state})")


def _read(path: Path) -> tuple[bytes | None, float | None]:
    """(raw bytes, mtime) of the lock file, (None, None) when there is none."""
    try:
        with open(path, "rb") as f:
            return f.read(), os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None, None


def _parse(raw: bytes) -> Holder | None:
    try:
        return Holder.from_json(json.loads(raw.decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def _write_temp(folder: Path, holder: Holder) -> Path:
    tmp = folder / f"{LOCK_NAME}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(tmp, "wb") as f:
            f.write(json.dumps(holder.to_json(), indent=1, sort_keys=True).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk: no half heartbeat left behind
        raise
    return tmp


def _create(folder: Path, holder: Holder) -> bool:
    """Make the lock file, complete, unless one exists; True when this call made it."""
    path = folder / LOCK_NAME
    tmp = _write_temp(folder, holder)
    try:
        os.link(tmp, path)  # atomic, and fails when the name exists: also on NFS
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        # A file system without hard links: exclusive create, then the content (a reader that
        # meets it empty for that instant takes its mtime as the heartbeat).
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(tmp.read_bytes())
            f.flush()
            os.fsync(f.fileno())
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _flock(folder: Path) -> tuple[int | None, bool]:
    """(fd, busy): an exclusive flock on the folder where the system has one; busy when another
    process of this host holds it. Where flock fails otherwise (NFS without lock support) the fd is None."""
    try:
        import fcntl
    except ImportError:  # not on POSIX
        return None, False
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd, False
    except OSError as e:
        os.close(fd)
        return None, e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)


def _unflock(fd: int | None) -> None:
    if fd is None:
        return
    import fcntl

    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


class WriterLock:
    """A held lock: heartbeats in a daemon thread until ``release``."""

    def __init__(self, folder: Path, holder: Holder, flock_fd: int | None, created: list[Path], stale_s: float) -> None:
        self.folder, self.path, self.holder = folder, folder / LOCK_NAME, holder
        self.stale_s = stale_s
        self.interval = max(0.2, min(10.0, stale_s / 12))
        self._flock_fd, self._created = flock_fd, created
        self._stop = threading.Event()
        self._mutex = threading.Lock()  # heartbeat and mark_exiting/release rewrite the file in turn
        self.lost: str | None = None  # set when another writer took the lock over (this one was stale)
        self._thread = threading.Thread(target=self._beat, name="tec-writer-lock", daemon=True)
        self._thread.start()

    def _rewrite(self, **changes: Any) -> None:
        with self._mutex:
            if self._stop.is_set() or self.lost is not None:
                return
            raw, _ = _read(self.path)
            now = _parse(raw) if raw is not None else None
            if now is None or now.token != self.holder.token:
                self.lost = (f"{self.path}: this writer's lock was taken over by "
                             f"{now.describe(time.time() - now.heartbeat) if now else 'another writer'}")
                return
            self.holder = dataclasses.replace(self.holder, heartbeat=time.time(), **changes)
            tmp = _write_temp(self.folder, self.holder)
            try:
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._rewrite()
            except OSError:
                pass  # a shared file system's hiccup: the next beat tries again, staleness is minutes away
            if self.lost is not None:
                return

    def ensure(self) -> None:
        """Raise WriterLockError when another writer took this lock over (call before writing)."""
        if self.lost is not None:
            raise WriterLockError(f"{self.lost}; stopping before writing anything more")

    def mark_exiting(self) -> None:
        """Tell newcomers that this writer is ending: a requeued job waits for it instead of failing."""
        with contextlib.suppress(OSError):
            self._rewrite(exiting=True)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock (only if it is still this writer's)."""
        if self._stop.is_set():
            return
        with self._mutex:
            self._stop.set()
        self._thread.join(timeout=5)
        raw, _ = _read(self.path)
        now = _parse(raw) if raw is not None else None
        if now is not None and now.token == self.holder.token:
            self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                fsync_dir(self.folder)
        _unflock(self._flock_fd)
        self._flock_fd = None
        _remove_empty(self._created)  # the folders this writer made, when it left nothing in them

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    p = folder.absolute()
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove folders (deepest first) as long as they are empty: a writer that wrote nothing leaves no trace."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            return


@dataclass(frozen=True)
class _Verdict:
    action: str  # "take" | "wait" | "refuse"
    why: str


def _judge(holder: Holder | None, mtime: float, me: Holder, local_busy: bool, stale_s: float) -> tuple[_Verdict, float]:
    """What to do about an existing lock, and its heartbeat's age."""
    now = time.time()
    if holder is None:
        # Unreadable: a writer between its exclusive create and its content (no hard links), or
        # damage. Only its age can tell; the flock says whether a local process still holds it.
        age = now - mtime
        if local_busy:
            return _Verdict("wait", "an unreadable lock file, held on this host"), age
        return (_Verdict("take", "unreadable and stale") if age > stale_s else _Verdict("wait", "unreadable")), age
    # The newer of the holder's own clock and the file's mtime: clocks of two nodes may differ.
    age = max(0.0, now - max(holder.heartbeat, mtime))
    if holder.same_host(me):
        if not _process_alive(holder.pid, holder.pid_start):
            # Its process is gone; a flock still held means its children (data-loader workers) are exiting.
            return (_Verdict("wait", "its process is gone, its children are exiting") if local_busy
                    else _Verdict("take", "its process is gone")), age
    elif age > stale_s:
        return _Verdict("take", f"its heartbeat is older than {stale_s:g} s ({STALE_ENV})"), age
    if holder.exiting or (holder.job is not None and holder.job == me.job):
        return _Verdict("wait", "it is exiting" if holder.exiting else "it is an earlier instance of this job"), age
    return _Verdict("refuse", "it is alive"), age


def _take_over(folder: Path, judged: bytes | None) -> bool:
    """Remove a stale lock whose bytes are still ``judged`` (a concurrent taker may have replaced it),
    under a short guard so that two takers cannot remove each other's new lock."""
    guard = folder / f"{LOCK_NAME}.takeover"
    try:
        fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        with contextlib.suppress(OSError):
            if time.time() - guard.stat().st_mtime > _TAKEOVER_STALE_S:
                guard.unlink()
        return False
    os.close(fd)
    try:
        raw, _ = _read(folder / LOCK_NAME)
        if raw != judged:
            return False  # its holder beat, released or another taker made a new one: judge again
        (folder / LOCK_NAME).unlink(missing_ok=True)
        return True
    finally:
        guard.unlink(missing_ok=True)


def acquire(folder: Path | str, command: str, option: str, *, say: Callable[[str], None] = lambda s: None,
            stale_s: float | None = None, poll_s: float = 0.5) -> WriterLock:
    """Take ``folder``'s writer lock for ``command`` (creating the folder), waiting only for an
    earlier instance of this job or a holder that is exiting (at most the stale bound).

    WriterLockError names ``option`` (e.g. ``--run-dir``), the holder and its heartbeat's age; a
    refused writer has changed nothing. ``say`` gets one line when a stale lock is taken over or
    when waiting starts.
    """
    folder = Path(folder)
    stale_s = stale_after_s() if stale_s is None else stale_s
    created = _missing_folders(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriterLockError(f"{option} {folder}: cannot create the folder ({e.strerror or e})") from None
    me = Holder.this_process(command)
    path = folder / LOCK_NAME
    waited_since: float | None = None
    fd: int | None = None
    try:
        while True:
            if fd is None:
                fd, local_busy = _flock(folder)
            else:
                local_busy = False
            try:
                if _create(folder, me):
                    break
            except OSError as e:
                raise WriterLockError(f"{option} {folder}: cannot write its lock file {path.name} "
                                      f"({e.strerror or e}); a writer needs a writable folder") from None
            raw, mtime = _read(path)
            if raw is None:
                continue  # released just now: try again
            holder = _parse(raw)
            verdict, age = _judge(holder, mtime or time.time(), me, local_busy, stale_s)
            if verdict.action == "take" and local_busy:
                # Another process of this host holds the folder's flock: it is taking the lock itself.
                verdict = _Verdict("wait", "another process of this host is taking it over")
            if verdict.action == "take":
                if _take_over(folder, raw):
                    say(f"{option} {folder}: took over the lock of "
                        f"{holder.describe(age) if holder else 'an unreadable lock file'}: {verdict.why}")
                else:
                    time.sleep(poll_s / 5)
                continue
            who = holder.describe(age) if holder else f"an unreadable lock file (written {age:.0f} s ago)"
            if verdict.action == "wait":
                if waited_since is None:
                    waited_since = time.monotonic()
                    say(f"{option} {folder}: waiting for {who} to end ({verdict.why}); at most {stale_s:g} s ({STALE_ENV})")
                if time.monotonic() - waited_since <= stale_s:
                    time.sleep(poll_s)
                    continue
                why = f"it is still alive after {stale_s:g} s of waiting"
            else:
                why = verdict.why
            raise WriterLockError(
                f"{option} {folder}: another writer holds it: {who}; {why}. Nothing was changed. Two writers "
                f"would mix their files: wait for it to end, or use another {option}. A lock whose holder died "
                f"({path}) is taken over at once on its own host, from another host once its heartbeat is older "
                f"than {stale_s:g} s ({STALE_ENV})"
            )
    except BaseException:
        _unflock(fd)
        _remove_empty(created)
        raise
    # What killed holders left: heartbeat temporaries and takeover guards (a live writer's last
    # milliseconds; older ones are nobody's).
    for p in folder.glob(f"{LOCK_NAME}.*"):
        with contextlib.suppress(OSError):
            if time.time() - p.stat().st_mtime > _TAKEOVER_STALE_S:
                p.unlink()
    return WriterLock(folder, me, fd, created, stale_s)


def is_lock_file(name: str) -> bool:
    """The lock file and its temporaries: what a folder's leftover cleanup must not touch."""
    return name == LOCK_NAME or name.startswith(f"{LOCK_NAME}.")


@contextlib.contextmanager
def holding(folder: Path | str, command: str, option: str, say: Callable[[str], None] = lambda s: None) -> Iterator[WriterLock]:
    """``acquire`` ... ``release`` as a with-block."""
    lock = acquire(folder, command, option, say=say)
    try:
        yield lock
    finally:
        lock.release()

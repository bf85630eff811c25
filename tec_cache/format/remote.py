"""Caches that are not a local folder: read over http(s), any fsspec protocol (s3://, gs://, ...),
or a WebDataset-style ``pipe:`` command, each shard streamed and checked as it arrives.

Data flow: a cache reference (``--cache``, ``tec-cache verify/inspect/show CACHE``) --``is_remote``-->
``RemoteCache`` --``read(rel)``--> bytes of manifest.json, and of each shard when a reader first needs
it (``fetch_shard``: size and sha256 computed while streaming, against the manifest's entry, before
any record is parsed) --> the shard format's reader over those bytes (``TarReader.from_bytes``).
Nothing is downloaded ahead: the loader fetches a shard when a batch first touches it. With a
read-through folder (``local_dir``), fetched shards are kept there, checked, and read from there the
next time (a shard whose copy no longer matches is fetched again).

Failures: a dropped connection, a timeout or a 5xx is retried ``retries`` times with a growing pause,
then ``RemoteError`` names the URL, the attempts and the last error; a missing file (404, no such
key) is not retried; bytes that do not match the manifest are refused with ``ShardError`` naming the
shard and the check (never retried: a cache that serves other bytes is not one to train from).

Only WebDataset (tar) shards stream: a zarr shard is a directory tree, which plain http cannot list;
zarr caches are read from a local or mounted folder (s3fs, gcsfuse, a shared file system).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar, cast

from tec_cache.format.fs import publish, remove
from tec_cache.format.schema import ShardError, ShardInfo

__all__ = ["RemoteCache", "RemoteError", "RemoteMissing", "download", "fetch_retries", "is_remote"]

T = TypeVar("T")

_BLOCK = 1 << 20
_TIMEOUT_S = 60.0
PIPE_PREFIX = "pipe:"
PIPE_SLOT = "{path}"  # where a pipe: command takes the file's path relative to the cache root
RETRIES_ENV = "TEC_FETCH_RETRIES"
DEFAULT_RETRIES = 3


class RemoteError(OSError):
    """A remote read that failed after its retries (or could not start); the message names the URL."""


class RemoteMissing(RemoteError):
    """The remote file does not exist (404, no such key) or cannot be asked for (a malformed URL, a
    4xx refusal): retrying would not help."""


def is_remote(ref: str | os.PathLike[str]) -> bool:
    """Whether a cache reference is a URL or a ``pipe:`` command rather than a local path."""
    text = str(ref)
    return text.startswith(PIPE_PREFIX) or ("://" in text and not text.startswith("file://"))


def fetch_retries(default: int = DEFAULT_RETRIES) -> int:
    """``TEC_FETCH_RETRIES`` or ``default``: how often a dropped fetch is tried again."""
    raw = os.environ.get(RETRIES_ENV)
    if raw is None:
        return default
    if not raw.isdigit():
        raise ValueError(f"{RETRIES_ENV}={raw!r}: expected a whole number of retries")
    return int(raw)


@dataclass(frozen=True)
class RemoteCache:
    """Where a remote cache is and how it is read. Plain data, so it travels to loader workers."""

    ref: str  # the URL of the cache root, or "pipe:COMMAND" with {path} in it
    local_dir: str | None = None  # read-through folder; None streams into memory only
    retries: int = DEFAULT_RETRIES

    @staticmethod
    def open(ref: str, local_dir: str | os.PathLike[str] | None = None) -> RemoteCache:
        ref = str(ref)
        if ref.startswith(PIPE_PREFIX) and PIPE_SLOT not in ref:
            raise ValueError(f"{ref}: a pipe: cache needs {PIPE_SLOT} where the command takes each file's path "
                             f"(e.g. 'pipe:aws s3 cp s3://bucket/cache/{PIPE_SLOT} -')")
        return RemoteCache(ref.rstrip("/") if not ref.startswith(PIPE_PREFIX) else ref,
                           None if local_dir is None else str(local_dir), fetch_retries())

    @property
    def name(self) -> str:
        """The cache's last path segment (a folder name for titles)."""
        base = self.ref.split(PIPE_SLOT)[0] if self.ref.startswith(PIPE_PREFIX) else self.ref
        return base.rstrip("/ -").rsplit("/", 1)[-1] or self.ref

    def url(self, rel: str) -> str:
        """Where the file ``rel`` (relative to the cache root) is read from, as messages name it."""
        if self.ref.startswith(PIPE_PREFIX):
            return self.ref.replace(PIPE_SLOT, rel)
        return f"{self.ref}/{rel}"

    # ---- reading ---------------------------------------------------------------------------------
    def read(self, rel: str) -> bytes:
        """The whole file ``rel`` (no check: the manifest, which carries its own checksum)."""
        return self._fetch(rel, None)

    def fetch_shard(self, rel: str, expect: ShardInfo) -> bytes:
        """Shard ``rel``'s bytes, their size and sha256 checked against ``expect`` as they streamed
        in; from the read-through folder when it holds a copy that still matches."""
        local = None if self.local_dir is None else Path(self.local_dir) / rel
        if local is not None and local.is_file():
            data = local.read_bytes()
            if len(data) == expect.nbytes and hashlib.sha256(data).hexdigest() == expect.sha256:
                return data
            remove(local)  # a stale or damaged copy: fetch again
        data = self._fetch(rel, expect)
        if local is not None:
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f"{local.name}.tmp{os.getpid()}")
            tmp.write_bytes(data)
            publish(tmp, local)
        return data

    def _fetch(self, rel: str, expect: ShardInfo | None) -> bytes:
        url = self.url(rel)
        return _with_retries(url, self.retries, lambda f: _read_checked(f, url, expect))


def _with_retries(url: str, retries: int, consume: Callable[[BinaryIO], T]) -> T:
    """``consume`` the stream of ``url``, again after a dropped connection, a timeout or a 5xx, at most
    ``retries`` more times; a missing file and bytes that fail their check are not retried."""
    last: BaseException | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(0.2 * 2 ** (attempt - 1), 5.0))
        try:
            with _open_url(url) as f:
                return consume(f)
        except (RemoteMissing, ShardError):
            raise
        except (OSError, EOFError, http.client.HTTPException) as e:  # a dropped connection, a timeout, a 5xx,
            last = e  # a body cut short
    raise RemoteError(f"{url}: could not read after {retries + 1} attempts "
                      f"({RETRIES_ENV} sets the retries): {type(last).__name__}: {last}")


def _open_url(url: str) -> BinaryIO:
    if url.startswith(PIPE_PREFIX):
        # A read-only stream: what the readers call of a file (read, close) and nothing else.
        return cast(BinaryIO, _PipeStream(url[len(PIPE_PREFIX):], url))
    if url.startswith(("http://", "https://")):
        try:
            return urllib.request.urlopen(url, timeout=_TIMEOUT_S)  # noqa: S310 (the user's own URL)
        except http.client.InvalidURL as e:
            raise RemoteMissing(f"{url}: not a valid URL ({e}; percent-encode spaces and the like)") from None
        except urllib.error.HTTPError as e:
            if e.code in (404, 410):
                raise RemoteMissing(f"{url}: not found (HTTP {e.code})") from None
            if e.code < 500 and e.code != 429:
                raise RemoteMissing(f"{url}: refused (HTTP {e.code} {e.reason})") from None
            raise
    import fsspec  # other protocols: s3fs, gcsfs, ... installed by the user

    try:
        return fsspec.open(url, "rb").open()
    except FileNotFoundError:
        raise RemoteMissing(f"{url}: no such file") from None
    except (ImportError, ValueError) as e:
        raise RemoteMissing(f"{url}: cannot open this protocol: {e}") from None


def download(url: str, dest: Path, retries: int | None = None) -> Path:
    """Copy ``url`` to ``dest`` (published atomically, so a file at ``dest`` is always whole);
    kept as it is when ``dest`` exists already."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")

    def copy(f: BinaryIO) -> None:
        with open(tmp, "wb") as out:
            while block := f.read(_BLOCK):
                out.write(block)
        _check_whole(f)

    try:
        _with_retries(url, fetch_retries() if retries is None else retries, copy)
        publish(tmp, dest)
    finally:
        remove(tmp)
    return dest


def _check_whole(f: BinaryIO) -> None:
    """An http body cut short reads as a short, clean end: its announced length says so."""
    length = getattr(f, "length", None)
    if isinstance(length, int) and length > 0:
        raise EOFError(f"connection closed with {length} bytes of the body unread")


def _read_checked(f: BinaryIO, url: str, expect: ShardInfo | None) -> bytes:
    """Read ``f`` to the end, hashing as it comes; ShardError when it is not the listed shard."""
    digest, parts, n = hashlib.sha256(), [], 0
    while block := f.read(_BLOCK):
        digest.update(block)
        parts.append(block)
        n += len(block)
        if expect is not None and n > expect.nbytes:
            raise ShardError(f"{url}: size: more than the {expect.nbytes} bytes the manifest lists")
    _check_whole(f)
    if expect is not None:
        if n != expect.nbytes:
            raise ShardError(f"{url}: size: {n} bytes, manifest says {expect.nbytes}")
        if digest.hexdigest() != expect.sha256:
            raise ShardError(f"{url}: checksum: sha256 {digest.hexdigest()}, manifest says {expect.sha256} "
                             "(the bytes changed on the way or at the source)")
    return b"".join(parts)


class _PipeStream:
    """stdout of a shell command, as WebDataset's ``pipe:`` reads shards; a non-zero exit is an error."""

    def __init__(self, command: str, url: str) -> None:
        self.url = url
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        self._out = self.proc.stdout

    def read(self, n: int = -1) -> bytes:
        return self._out.read(n)

    def __enter__(self) -> _PipeStream:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._out.close()
        code = self.proc.wait()
        err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
        if self.proc.stderr:
            self.proc.stderr.close()
        if code != 0 and exc_type is None:
            raise OSError(f"{shlex.quote(self.url)}: command exited {code}: {err[-300:]}")

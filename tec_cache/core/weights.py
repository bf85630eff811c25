"""Base-model weights that live at a URL: fetched once into one local cache, verified, reused offline.

Data flow: ``--basemodel NAME`` (the registry's official URL and hash) or ``--checkpoint URL``
(http(s), any fsspec protocol such as s3:// or gs://, ``hf-hub:ORG/REPO[@REV]``) with an optional
``--checkpoint-sha256`` --> ``fetch_weights`` --> a verified local file under
``$TEC_HOME/weights/`` (``TEC_HOME`` defaults to ``~/.cache/tec``) --> basemodels.load_checkpoint.

The cache is keyed by the URL, not the file name (every iBOT size ships a ``checkpoint_teacher.pth``):
``https://host/a/b/file.pth`` lives at ``$TEC_HOME/weights/host/a/b/file.pth``. A download is
written to ``<file>.part``, resumed from there with an HTTP Range request after a dropped
connection or a killed run, and renamed into place only once its size and hash check out. Beside
each file a ``<file>.json`` sidecar records the URL, size and sha256 that were verified; a reuse
checks the file's size and sha256 against it again. A file staged by hand (no sidecar) is
verified against the expected hash on first use and then gets its sidecar.

``TEC_OFFLINE=1`` (or the hub's own ``HF_HUB_OFFLINE=1``) reads the cache only: a missing file
fails naming the URL and the exact path to put it at. ``TEC_WEIGHTS_MIRROR=BASE`` fetches the
registry's official files from ``BASE/<mirror name>`` (the release's file name) instead of their
hosts; they are cached and verified exactly as the official URL's.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tec_cache.format.remote import RETRIES_ENV, fetch_retries

__all__ = [
    "Expected", "FetchedWeights", "WeightsError", "cache_path", "fetch_weights", "hub_offline", "is_offline",
    "is_url", "mirror_url", "resolve_checkpoint", "tec_home",
]

HOME_ENV = "TEC_HOME"
OFFLINE_ENV = "TEC_OFFLINE"
HUB_OFFLINE_ENV = "HF_HUB_OFFLINE"
MIRROR_ENV = "TEC_WEIGHTS_MIRROR"
DEFAULT_RETRIES = 5
HUB_PREFIX = "hf-hub:"
_BLOCK = 1 << 20
_TIMEOUT_S = 60.0
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class WeightsError(ValueError):
    """Weights that cannot be had or do not verify; the message names the URL/path and the check."""


@dataclass(frozen=True)
class Expected:
    """What a weights file must be. ``md5_prefix``: the few hex digits a release README publishes."""

    sha256: str | None = None
    md5_prefix: str | None = None
    size: int | None = None

    def describe(self) -> str:
        parts = [f"sha256 {self.sha256}" if self.sha256 else "", f"md5 prefix {self.md5_prefix}" if self.md5_prefix else "",
                 f"{self.size} bytes" if self.size else ""]
        return ", ".join(p for p in parts if p) or "no published hash"


@dataclass(frozen=True)
class FetchedWeights:
    """A verified local weights file and where it came from (for the manifest)."""

    path: Path
    url: str
    sha256: str
    size: int
    fetched_from: str | None = None  # the mirror URL, when not the official one

    def facts(self) -> dict[str, Any]:
        out: dict[str, Any] = {"url": self.url, "size": self.size}
        if self.fetched_from and self.fetched_from != self.url:
            out["fetched_from"] = self.fetched_from
        return out


def tec_home() -> Path:
    """``$TEC_HOME``, else ``~/.cache/tec``."""
    raw = os.environ.get(HOME_ENV)
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "tec"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def is_offline() -> bool:
    """TEC_OFFLINE=1 or HF_HUB_OFFLINE=1: read the caches only."""
    return _truthy(OFFLINE_ENV) or _truthy(HUB_OFFLINE_ENV)


def is_url(ref: str | os.PathLike[str]) -> bool:
    """Whether ``--checkpoint`` names a URL (or the hub) rather than a local file."""
    text = str(ref)
    return text.startswith(HUB_PREFIX) or ("://" in text and not text.startswith("file://"))


def check_sha256(value: str | None, option: str = "--checkpoint-sha256") -> str | None:
    if value is None:
        return None
    v = value.strip().lower()
    if not _HEX64.match(v):
        raise WeightsError(f"{option}: expected 64 hex digits (a sha256), got {value!r}")
    return v


_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


def cache_path(url: str) -> Path:
    """Where ``url``'s file lives in the weights cache: host and path kept readable, so a person
    staging a file by hand can follow it; a query string gets a short digest of its own."""
    u = urllib.parse.urlsplit(url)
    host = _SAFE.sub("_", u.netloc or u.scheme or "local")
    parts = [_SAFE.sub("_", p) for p in u.path.split("/") if p not in ("", ".", "..")]
    if not parts:
        parts = ["index"]
    if u.query:
        parts[-1] += "_q" + hashlib.sha256(u.query.encode()).hexdigest()[:12]
    scheme = [] if u.scheme in ("http", "https") else [_SAFE.sub("_", u.scheme)]
    return tec_home().joinpath("weights", *scheme, host, *parts)


def mirror_url(mirror_name: str) -> str | None:
    """``$TEC_WEIGHTS_MIRROR/<mirror_name>`` when a mirror is set, else None."""
    base = os.environ.get(MIRROR_ENV, "").strip()
    if not base:
        return None
    return base.rstrip("/") + "/" + mirror_name.lstrip("/")


def _digests(path: Path) -> tuple[str, str, int]:
    """(sha256, md5, size) of a file, read once."""
    sha, md5, n = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            sha.update(block)
            md5.update(block)
            n += len(block)
    return sha.hexdigest(), md5.hexdigest(), n


def _verify(path: Path, url: str, expected: Expected, what: str) -> tuple[str, int]:
    """Hash ``path`` and check it against ``expected``; returns (sha256, size)."""
    sha, md5, size = _digests(path)
    wrong = []
    if expected.size is not None and size != expected.size:
        wrong.append(f"size: expected {expected.size} bytes, got {size}")
    if expected.sha256 is not None and sha != expected.sha256:
        wrong.append(f"sha256: expected {expected.sha256}, got {sha}")
    if expected.md5_prefix is not None and not md5.startswith(expected.md5_prefix.lower()):
        wrong.append(f"md5: expected a digest starting {expected.md5_prefix}, got {md5}")
    if wrong:
        raise WeightsError(f"{what} {path} (from {url}) does not verify: {'; '.join(wrong)}")
    return sha, size


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One fetch of a file at a time (ranks of one job share the cache)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _reuse(path: Path, url: str, expected: Expected) -> FetchedWeights:
    """A cached file, checked again: against its sidecar (size, sha256) and the expected hash."""
    side = _sidecar(path)
    if side.is_file():
        try:
            rec = json.loads(side.read_text())
            want_sha, want_size = str(rec["sha256"]), int(rec["size"])
        except (ValueError, KeyError, TypeError) as e:
            raise WeightsError(f"{side}: unreadable weights sidecar ({e}); delete it and {path} to fetch again") from None
        if path.stat().st_size != want_size:
            raise WeightsError(f"cached weights {path} have {path.stat().st_size} bytes, {want_size} were verified when "
                               f"fetched from {url}; delete the file to fetch it again")
        sha, size = _verify(path, url, Expected(sha256=want_sha, size=want_size), "cached weights")
        _verify_expected_sha(sha, path, url, expected)
        return FetchedWeights(path, url, sha, size, rec.get("fetched_from"))
    # Staged by hand: verify what it must be, then remember it.
    sha, size = _verify(path, url, expected, "staged weights")
    _write_json(side, {"url": url, "sha256": sha, "size": size, "staged": True})
    return FetchedWeights(path, url, sha, size)


def _verify_expected_sha(sha: str, path: Path, url: str, expected: Expected) -> None:
    if expected.sha256 is not None and sha != expected.sha256:
        raise WeightsError(f"cached weights {path} (from {url}) do not verify: sha256: expected {expected.sha256}, "
                           f"got {sha}; delete the file to fetch it again")


def fetch_weights(url: str, expected: Expected = Expected(), *, source: str | None = None,
                  retries: int | None = None, progress: bool | None = None) -> FetchedWeights:
    """The verified local copy of ``url`` (fetched from ``source``, a mirror, when given).

    Raises WeightsError naming the URL and the check (wrong hash, offline miss, a download that
    keeps failing after its retries).
    """
    path = cache_path(url)
    with _locked(path):
        if path.is_file():
            return _reuse(path, url, expected)
        if is_offline():
            raise WeightsError(
                f"offline ({OFFLINE_ENV}/{HUB_OFFLINE_ENV} set) and {url} is not in the weights cache: put the file "
                f"at {path} (expected: {expected.describe()}) or unset {OFFLINE_ENV}")
        src = source or url
        part = path.with_name(path.name + ".part")
        _download(src, part, fetch_retries(DEFAULT_RETRIES) if retries is None else retries,
                  sys.stderr.isatty() if progress is None else progress, path.name)
        try:
            sha, size = _verify(part, src, expected, "downloaded weights")
        except WeightsError:
            part.unlink(missing_ok=True)  # wrong bytes are never resumed from
            raise
        os.replace(part, path)
        rec = {"url": url, "sha256": sha, "size": size, "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if src != url:
            rec["fetched_from"] = src
        _write_json(_sidecar(path), rec)
        return FetchedWeights(path, url, sha, size, src if src != url else None)


class _Missing(WeightsError):
    """404 and other refusals that a retry would not change."""


class _RestartDownload(EOFError):
    """The partial file cannot be resumed from (the server's range does not follow it): start over."""


def _open_http(url: str, offset: int) -> tuple[BinaryIO, int, int | None]:
    """(stream, offset the stream starts at, total size if known)."""
    req = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        resp = urllib.request.urlopen(req, timeout=_TIMEOUT_S)  # noqa: S310 (the user's own URL)
    except http.client.InvalidURL as e:
        raise _Missing(f"{url}: not a valid URL ({e})") from None
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the .part is already whole (or longer than the file): start over
            raise _RestartDownload("range not satisfiable; restarting the download") from None
        if e.code < 500 and e.code != 429:
            raise _Missing(f"{url}: HTTP {e.code} {e.reason}") from None
        raise
    start = 0
    total: int | None = None
    if resp.status == 206:
        m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
        if m:
            start = int(m.group(1))
            total = int(m.group(2)) if m.group(2) != "*" else None
    else:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
    return resp, start, total


def _open_fsspec(url: str, offset: int) -> tuple[BinaryIO, int, int | None]:
    import fsspec  # s3fs, gcsfs, ... installed by the user

    try:
        f = fsspec.open(url, "rb").open()
    except FileNotFoundError:
        raise _Missing(f"{url}: no such file") from None
    except (ImportError, ValueError) as e:
        raise _Missing(f"{url}: cannot open this protocol: {e}") from None
    total = getattr(f, "size", None)
    if offset:
        f.seek(offset)
    return f, offset, total if isinstance(total, int) else None


def _download(url: str, part: Path, retries: int, show: bool, label: str) -> None:
    """Fill ``part`` with ``url``'s bytes, resuming from what it holds; bounded retries."""
    opener = _open_http if url.startswith(("http://", "https://")) else _open_fsspec
    last: BaseException | None = None
    with _progress(show, label) as bar:
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(min(0.2 * 2 ** (attempt - 1), 5.0))
            have = part.stat().st_size if part.exists() else 0
            try:
                stream, start, total = opener(url, have)
                with stream:
                    if start not in (0, have):
                        raise _RestartDownload(f"the server resumed at byte {start}, the partial file has {have}")
                    # A server that ignores Range sends the whole file again: start the .part over.
                    mode = "ab" if start == have and have else "wb"
                    done = start if mode == "ab" else 0
                    bar(total, done)
                    with open(part, mode) as out:
                        while block := stream.read(_BLOCK):
                            out.write(block)
                            done += len(block)
                            bar(total, done)
                        out.flush()
                        os.fsync(out.fileno())
                    if total is not None and done < total:
                        raise EOFError(f"connection closed after {done} of {total} bytes")
                    return
            except _Missing:
                raise
            except _RestartDownload as e:
                part.unlink(missing_ok=True)
                last = e
            except (OSError, EOFError, http.client.HTTPException) as e:  # dropped, timed out, 5xx, cut short
                last = e
    raise WeightsError(f"{url}: download failed after {retries + 1} attempts ({RETRIES_ENV} sets the retries; "
                       f"re-running resumes from {part}): {type(last).__name__}: {last}")


@contextlib.contextmanager
def _progress(show: bool, label: str) -> Iterator[Any]:
    """A rich bar with size and rate on stderr when that is a terminal; nothing otherwise (logs stay clean)."""
    if not show:
        yield lambda total, done: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=False) as p:
        task = p.add_task(f"fetching {label}", total=None)
        yield lambda total, done: p.update(task, total=total, completed=done)


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Make huggingface_hub read its cache only while TEC_OFFLINE is set (it reads HF_HUB_OFFLINE at import)."""
    if not is_offline():
        yield
        return
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def _hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def fetch_hub(ref: str, sha256: str | None = None) -> FetchedWeights:
    """``hf-hub:ORG/REPO[@REV]``: the repo's model.safetensors (else pytorch_model.bin) via the hub's own cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo, _, rev = ref[len(HUB_PREFIX):].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise WeightsError(f"--checkpoint {ref}: expected hf-hub:ORG/REPO or hf-hub:ORG/REPO@REVISION")
    last: Exception | None = None
    with hub_offline():
        for name in ("model.safetensors", "pytorch_model.bin"):
            try:
                path = Path(hf_hub_download(repo, name, revision=rev or None))
                break
            except LocalEntryNotFoundError as e:  # a subclass of EntryNotFoundError: first
                last = e
                if name == "pytorch_model.bin":
                    raise WeightsError(
                        f"--checkpoint {ref}: not in the hub cache {_hub_cache_dir()} and offline or unreachable "
                        f"(put the repo's model.safetensors there with `huggingface-cli download {repo}` on a "
                        f"machine with network, or set HF_HUB_CACHE): {e}") from None
            except EntryNotFoundError as e:
                last = e
        else:
            raise WeightsError(f"--checkpoint {ref}: the repo has neither model.safetensors nor pytorch_model.bin ({last})")
    sha, size = _verify(path, ref, Expected(sha256=sha256), "hub weights")
    return FetchedWeights(path, ref, sha, size)


def resolve_checkpoint(ref: str | os.PathLike[str], sha256: str | None = None) -> tuple[Path, dict[str, Any]]:
    """``--checkpoint`` as a local file: a path as it is, a URL fetched (and pinned by ``sha256``).

    Returns (path, facts for the manifest: url/size where fetched, {} for a plain path).
    """
    sha = check_sha256(sha256)
    text = str(ref)
    if text.startswith(HUB_PREFIX):
        got = fetch_hub(text, sha)
        return got.path, got.facts()
    if is_url(text):
        try:
            got = fetch_weights(text, Expected(sha256=sha))
        except WeightsError as e:
            raise WeightsError(f"--checkpoint: {e}") from None
        return got.path, got.facts()
    path = Path(text[len("file://"):] if text.startswith("file://") else text)
    if not path.is_file():
        raise WeightsError(f"--checkpoint: no such file {path} (expected the base model's weights file); a URL "
                           "(https://..., hf-hub:ORG/REPO) is fetched")
    if sha is not None:
        _verify(path, str(path), Expected(sha256=sha), "--checkpoint")
    return path, {}

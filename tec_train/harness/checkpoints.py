"""Checkpoint files of a run dir: atomic writes, keep-last-N, discovery of the latest complete one.

Data flow: a loop's state (model, optimizer, scaler, position, RNG states, resolved config; see
``state``) --> **checkpoint-<global step>.pt** (pretraining) or **finetune-<epoch>.pt** in the run
dir --> resume (same run dir), export or the downstream encoder reader.

A checkpoint is written to a hidden temporary sibling, flushed and fsynced, then renamed over its
final name, and the folder is fsynced; only files with the final name pattern are ever read. So
a process killed at any point leaves either the previous checkpoints untouched or the new one
complete. Everything stored is a tensor, a number, a string, or a list/dict of them, so
``torch.load(weights_only=True)`` reads it: no pickled objects.

Each checkpoint's sha256, hashed as its bytes are written, goes into **<checkpoint>.sha256**
(``sha256sum`` format, written atomically once the temporary is durable and before the rename), so a
checkpoint under its final name always has its digest. Every use checks it first
(``check_checkpoint``; ``usable_checkpoint`` picks the newest intact one and names what it
skipped). A checkpoint without a digest was written before digests existed: it is used, with one
line saying it could not be verified.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import torch

from tec_cache.core.basemodels import file_sha256 as hash_file
from tec_cache.format.fs import write_atomic, write_text_atomic
from tec_cache.runtime.faults import fault_point

from .errors import CheckpointError

CHECKPOINT_FORMAT = "tec-train-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class CheckpointKind:
    """A family of checkpoints in a run dir: ``{prefix}-{n:0{digits}d}.pt`` with a format tag and version."""

    prefix: str
    digits: int
    format: str
    version: int
    label: str  # for messages: "a tec-train checkpoint"

    @property
    def name_re(self) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(self.prefix)}-(\d{{{self.digits},}})\.pt$")

    @property
    def temp_prefix(self) -> str:
        return f".{self.prefix}-"

    def path(self, run_dir: Path, n: int) -> Path:
        return Path(run_dir) / f"{self.prefix}-{n:0{self.digits}d}.pt"


PRETRAIN = CheckpointKind("checkpoint", 8, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "tec-train")  # numbered by global step
FINETUNE = CheckpointKind("finetune", 4, "tec-train-finetune", 1, "fine-tuning")  # numbered by epochs done


def checkpoint_path(run_dir: Path, global_step: int) -> Path:
    return PRETRAIN.path(run_dir, global_step)


def list_checkpoints(run_dir: Path, kind: CheckpointKind = PRETRAIN) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run dir as (number, path), oldest first; temp files are ignored."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    name_re = kind.name_re
    found = []
    for p in run_dir.iterdir():
        m = name_re.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path, kind: CheckpointKind = PRETRAIN) -> Path | None:
    ckpts = list_checkpoints(run_dir, kind)
    return ckpts[-1][1] if ckpts else None


def remove_stale_temp_files(run_dir: Path, kind: CheckpointKind = PRETRAIN) -> list[Path]:
    """Delete temporaries left by writers that were killed, and digests whose checkpoint never got
    its name (killed between the two renames); call only while holding the run dir's lock."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    stale = [p for p in run_dir.glob(f"{kind.temp_prefix}*") if p.is_file()]
    stale += [p for p in run_dir.glob(f"{kind.prefix}-*.pt{DIGEST_SUFFIX}")
              if kind.name_re.match(p.name[: -len(DIGEST_SUFFIX)]) and not p.with_name(p.name[: -len(DIGEST_SUFFIX)]).exists()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# ---- digests -------------------------------------------------------------------------------------
DIGEST_SUFFIX = ".sha256"
_DIGEST_LINE = re.compile(r"^([0-9a-f]{64})  (\S+)\n?$")
INTACT, UNVERIFIED, DAMAGED = "intact", "unverified", "damaged"
# sha256 of files already hashed by this process, by (path, inode, size, mtime): resume reads the
# checkpoint's options first and then the whole checkpoint, and hashes it once.
_hashed: dict[tuple[str, int, int, int], str] = {}


def digest_path(ckpt: Path) -> Path:
    """The sidecar holding ``ckpt``'s sha256."""
    return Path(ckpt).with_name(Path(ckpt).name + DIGEST_SUFFIX)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, remembered for the file as it is (path, inode, size, mtime)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _hashed:  # a checkpoint checked on resume is not read again by export or evaluation
        _hashed[key] = hash_file(path)
    return _hashed[key]


@dataclass(frozen=True)
class CheckpointCheck:
    """A checkpoint against its digest: intact, unverified (no digest: written before digests), or
    damaged (``detail`` says how)."""

    path: Path
    status: str
    detail: str = ""

    def line(self) -> str:
        return f"{self.path.name}: {self.detail}"


def check_checkpoint(path: Path) -> CheckpointCheck:
    """Compare a checkpoint file with its ``.sha256`` sidecar."""
    path = Path(path)
    side = digest_path(path)
    try:
        text = side.read_text(encoding="utf-8")
    except FileNotFoundError:
        return CheckpointCheck(path, UNVERIFIED, f"has no {side.name} (written before checkpoints carried a "
                                                 "digest): it could not be verified")
    except (OSError, UnicodeDecodeError) as e:
        return CheckpointCheck(path, DAMAGED, f"its digest {side.name} is unreadable ({e})")
    m = _DIGEST_LINE.match(text)
    if m is None:
        return CheckpointCheck(path, DAMAGED, f"its digest {side.name} is torn or malformed "
                                              f"(expected '<64 hex digits>  {path.name}', got {text[:80]!r})")
    if m.group(2) != path.name:
        return CheckpointCheck(path, DAMAGED, f"its digest {side.name} names {m.group(2)}, not {path.name}")
    try:
        actual = file_sha256(path)
    except OSError as e:
        return CheckpointCheck(path, DAMAGED, f"unreadable ({e})")
    if actual != m.group(1):
        return CheckpointCheck(path, DAMAGED, f"sha256 mismatch: the file hashes to {actual}, its digest "
                                              f"{side.name} says {m.group(1)}; the file is damaged")
    return CheckpointCheck(path, INTACT)


def usable_checkpoint(run_dir: Path, kind: CheckpointKind = PRETRAIN,
                      say: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint that is intact (or has no digest at all); None when the run dir has none.

    ``say`` gets one line for each damaged checkpoint skipped and for an unverified one used.
    CheckpointError lists every checkpoint checked when none is usable.
    """
    checked = []
    for _, path in reversed(list_checkpoints(run_dir, kind)):
        c = check_checkpoint(path)
        if c.status == DAMAGED:
            checked.append(c)
            if say is not None:
                say(f"skipping {c.line()}")
            continue
        if c.status == UNVERIFIED and say is not None:
            say(f"using {c.line()}")
        return path
    if checked:
        raise CheckpointError(f"{run_dir}: no intact {kind.label} checkpoint; checked "
                              + "; ".join(c.line() for c in checked))
    return None


def verify_checkpoint_file(path: Path, say: Callable[[str], None] | None = None) -> None:
    """One named checkpoint file: CheckpointError when its digest says it is damaged."""
    c = check_checkpoint(path)
    if c.status == DAMAGED:
        raise CheckpointError(f"{path}: {c.detail}")
    if c.status == UNVERIFIED and say is not None:
        say(f"using {c.line()}")


def save_checkpoint(run_dir: Path, state: dict[str, Any], n: int, keep_last: int, kind: CheckpointKind = PRETRAIN) -> Path:
    """Write ``state`` atomically as ``kind``'s checkpoint number ``n``, then keep only the newest ``keep_last``."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = kind.path(run_dir, n)
    tmp = run_dir / f"{kind.temp_prefix}{n:0{kind.digits}d}.pt.tmp-{os.getpid()}"
    payload = {"format": kind.format, "version": kind.version, **state}
    # Under fault injection only, the writes pass through a wrapper that can stop the process with
    # half a zip on disk; otherwise torch.save writes straight to the file. A kill at mid_checkpoint
    # leaves a complete but unnamed temp file: the previous checkpoint stays latest; at
    # after_checkpoint_rename the new checkpoint is complete and older ones not yet pruned.
    torn = bool(os.environ.get("TEC_FAULT") or os.environ.get("TEC_FAULT_LOG"))
    h = hashlib.sha256()
    # The digest is of the bytes handed to the file as they go (torch.save only writes forwards, and
    # takes any object with write and flush: the cast says so to the type checker),
    # and is on disk before the checkpoint has its name.
    write_atomic(final, lambda f: torch.save(payload, cast(IO[bytes], _HashingWriter(_TornWriter(f) if torn else f, h))), tmp=tmp,
                 sealed=lambda: write_text_atomic(digest_path(final), f"{h.hexdigest()}  {final.name}\n"),
                 before_rename="mid_checkpoint", after_rename="after_checkpoint_rename")
    # The one just written is the newest intact checkpoint: damaged ones with higher numbers (skipped
    # on resume, not yet rewritten) must not push it out.
    for _, old in list_checkpoints(run_dir, kind)[:-keep_last]:
        if old != final:
            old.unlink(missing_ok=True)
            digest_path(old).unlink(missing_ok=True)
    return final


class _HashingWriter:
    """File wrapper for torch.save that hashes what is written."""

    def __init__(self, f: Any, h: Any) -> None:
        self.f, self.h = f, h

    def write(self, data: Any) -> int:
        self.h.update(data)  # a file object's write takes every byte (or raises)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


class _TornWriter:
    """File wrapper for torch.save that reaches fault point ``checkpoint_torn`` once the first write
    is flushed: a kill there leaves a truncated zip under the temporary name."""

    def __init__(self, f: Any) -> None:
        self.f, self.writes = f, 0

    def write(self, data: Any) -> int:
        n = self.f.write(data)
        self.writes += 1
        if self.writes == 1:
            self.f.flush()
            fault_point("checkpoint_torn")
        return n

    def flush(self) -> None:
        self.f.flush()


def load_checkpoint(path: Path, kind: CheckpointKind = PRETRAIN) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (weights_only, on the CPU)."""
    path = Path(path)
    try:
        # mmap: reading the config or the RNG states does not page in the weights.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - re-raised naming the file
        raise CheckpointError(f"{path}: not a readable {kind.label} checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or obj.get("format") != kind.format:
        raise CheckpointError(f"{path}: not a {kind.label} checkpoint (no format {kind.format!r})")
    if obj.get("version") != kind.version:
        raise CheckpointError(f"{path}: checkpoint version {obj.get('version')} is not supported (this tool reads {kind.version})")
    return obj

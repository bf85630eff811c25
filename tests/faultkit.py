"""Helpers of the fault-injection suite (tests/test_faults_*.py): running the CLIs in a fresh
process with a fault armed, comparing caches byte for byte, and checking that nothing a killed
build left behind can be taken for a finished shard; damaging a file (``flip_byte``)."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tec_cache import format as cache_format
from tec_cache.build.verify import verify_cache
from tec_cache.format.fs import is_temporary
from tec_cache.format.manifest import MANIFEST_NAME, ManifestError, load_manifest
from tests.conftest import TINY_ARCH, TINY_IMG, TINY_PATCH, TINY_TOPK

ROOT = Path(__file__).resolve().parents[1]
# Fixed, so a failing draw can be replayed; every fault's arrival number comes from it.
FAULT_SEED = 20_240


def seeded_nth(point: str, arrivals: int, salt: int = 0) -> int:
    """The arrival (1..arrivals) at which to fail ``point``, drawn from FAULT_SEED."""
    assert arrivals >= 1, f"the uninterrupted run never reaches fault point {point!r}"
    words = [FAULT_SEED, salt, *hashlib.sha256(point.encode()).digest()[:4]]
    return int(np.random.default_rng(words).integers(1, arrivals + 1))


def count_arrivals(log: Path) -> Counter:
    """Arrivals per fault point recorded through TEC_FAULT_LOG."""
    return Counter(log.read_text().split()) if log.exists() else Counter()


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: this one's, minus any armed fault, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("TEC_FAULT", "TEC_FAULT_LOG", "TEC_DIST_TIMEOUT")}
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra})
    return env


def run_module(module: str, args: list[str], *, env: dict[str, str] | None = None, torchrun: int = 0,
               timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m module args`` (under ``torchrun --standalone`` with ``torchrun`` ranks); returns the
    finished process and its wall time."""
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] if torchrun else [sys.executable]
    t0 = time.monotonic()
    r = subprocess.run([*prefix, "-m", module, *args], capture_output=True, text=True, env=env or clean_env(),
                       cwd=ROOT, timeout=timeout)
    return r, time.monotonic() - t0


def build_args(data: Path, out: Path, ckpt: Path, *extra: str, views: int = 2, fmt: str = "webdataset") -> list[str]:
    """`tec-cache build` options of the small builds the suite kills (shards of 5 views, batches of 4)."""
    return ["build", "--data", str(data), "--out", str(out), "--checkpoint", str(ckpt), "--arch", TINY_ARCH,
            "--img-size", str(TINY_IMG), "--patch-size", str(TINY_PATCH), "--topk", str(TINY_TOPK), "--views", str(views),
            "--format", fmt, "--shard-size", "5", "--batch-size", "4", "--num-workers", "0", "--device", "cpu", *extra]


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file, manifest excluded (it holds the build's timings)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}


def manifest_sans_run(root: Path) -> dict:
    """The manifest without what differs between equal builds: timings, checkpoint path, digest."""
    m = json.loads((root / MANIFEST_NAME).read_text())
    m["stats"].pop("build")
    m["base_model"].pop("checkpoint")
    m.pop("manifest_sha256")
    return m


def assert_same_cache(out: Path, reference: Path) -> None:
    """Same keys (files) with identical bytes, and the same manifest up to the run's own facts."""
    assert tree(out) == tree(reference)
    assert manifest_sans_run(out) == manifest_sans_run(reference)
    assert verify_cache(out) == []


def _shard_candidates(out: Path, fmt: str) -> list[Path]:
    """Everything under a view-epoch folder that is, or may become, a shard: final names, writers'
    temporaries and set-aside old versions (zarr shards are directories)."""
    suffix = cache_format.get_format(fmt).suffix
    found = []
    for d in sorted(out.glob("ve[0-9][0-9][0-9]")):
        for p in sorted(d.iterdir()):
            if p.name.startswith("shard-") and suffix in p.name and not p.name.endswith(".json"):
                found.append(p)
    return found


def assert_no_partial_shard_accepted(out: Path, reference: Path) -> dict[str, int]:
    """What a killed build left in ``out`` can only be refused or be exactly the reference's.

    * With a manifest (a killed extension, or a kill after the rename), verify passes and every
      listed shard is the reference's; without one, every reader refuses the folder.
    * A shard with its sidecar (what the build counts as done) matches the sidecar and the reference.
    * Anything else with a shard's or a temporary's name, checked against the reference's size and
      sha256 (as it would be were a manifest to list it), either passes, because it is the finished
      reference shard, or fails with a ShardError naming the check. Never a partial shard accepted.

    Returns counts of what was found, for the caller's assertions.
    """
    from tec_train.cache_loader import CacheLoader

    ref = load_manifest(reference)
    ref_entries = {e.path: e for e in ref.shards()}
    seen = {"listed": 0, "sidecar": 0, "refused": 0, "complete_unlisted": 0, "temporary": 0}
    if (out / MANIFEST_NAME).exists():
        assert verify_cache(out) == []
        for e in load_manifest(out).shards():
            assert e == ref_entries[e.path], e.path
            seen["listed"] += 1
    else:
        with pytest.raises(ManifestError, match="not a cache"):
            load_manifest(out)
        with pytest.raises(ManifestError, match="not a cache"):
            CacheLoader(out, batch_size=2, num_workers=0)
    for side in sorted(out.glob("ve[0-9][0-9][0-9]/shard-*.json")):
        if is_temporary(side.name):
            continue
        rel = side.relative_to(out).as_posix()[: -len(".json")]
        info = json.loads(side.read_text())
        want = ref_entries[rel]
        assert (info["num_samples"], info["nbytes"], info["sha256"]) == (want.num_samples, want.nbytes, want.sha256), rel
        assert ref.format.shards.digest(out / rel) == want.sha256, rel
        seen["sidecar"] += 1
    for p in _shard_candidates(out, ref.format.name):
        base = p.name
        for tail in (".tmp", ".old"):
            base = base[: -len(tail)] if base.endswith(tail) else base
        rel = f"{p.parent.name}/{base}"
        want = ref_entries[rel]
        seen["temporary"] += p.name != base
        try:
            reader = ref.format.shards.open_reader(p, ref.fields, ref.format.compressor, expect=want.info)
            assert len(list(reader)) == want.num_samples
            seen["complete_unlisted"] += 1  # a finished shard (e.g. killed between its rename and its sidecar)
        except cache_format.ShardError as err:
            assert str(p) in str(err) and any(c in str(err) for c in ("size", "checksum", "missing", "sample count")), err
            seen["refused"] += 1
    return seen


def flip_byte(path: Path) -> None:
    """Flip one bit of the byte in the middle of ``path``, as a bad disk or a bad copy leaves a file."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(module: str, args: list[str], ranks: list[int], world: int, env: dict[str, str]) -> list[tuple[int, str, float]]:
    """Start the given ranks of a ``world``-rank job as plain processes, without torchrun's agent (as
    the ranks of another node see a lost peer); returns (exit code, output, seconds) per rank."""
    port = str(_free_port())
    t0 = time.monotonic()
    procs = []
    for rank in ranks:
        e = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(world), "RANK": str(rank),
             "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, "-m", module, *args], env=e, cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        results.append((p.returncode, " ".join(out.split()), time.monotonic() - t0))
    return results


def second_writer_refused(module: str, argv: list[str], folder: Path, second: Callable[[], Any], *, option: str,
                          command: str) -> tuple[int, str]:
    """Start ``python -m module argv`` as the first writer of ``folder``; once it holds the lock run
    ``second()`` (a CliRunner invocation of the same command) and check it was refused at once
    naming the first (host, pid, heartbeat) and changing nothing. Returns the first's exit code and
    stderr, for the caller to check that it ended as a lone run does."""
    from tec_cache.format.writer_lock import LOCK_NAME

    first = subprocess.Popen([sys.executable, "-m", module, *argv], env=clean_env(), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (folder / LOCK_NAME).exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        result = second()
        assert first.poll() is None, "the first writer ended before the second started: nothing was tested"
    finally:
        _, err = first.communicate(timeout=240)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"{option} {folder}: another writer holds it: {command} on host {socket.gethostname()}, pid {first.pid}" in text
    assert "heartbeat" in text and "Nothing was changed" in text
    return first.returncode, err

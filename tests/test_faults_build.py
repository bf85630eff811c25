"""Fault injection, stage 1: `tec-cache build` SIGKILLed at 20 seeded points, a full disk, and lost
ranks. Every interrupted build, re-run, ends byte-identical to an uninterrupted one, and between
the two no reader accepts a partial shard (tests/faultkit.py)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from tec_cache.build.builder import BuildConfig, DiskFullError, build_cache
from tec_cache.build.cli import app
from tec_cache.format.fs import is_temporary
from tec_cache.format.manifest import MANIFEST_NAME, load_manifest
from tec_cache.format.writer_lock import LOCK_NAME
from tec_cache.runtime.dist import dist_timeout_s
from tec_cache.runtime.faults import parse_fault, reset_faults
from tests.conftest import make_image_folder, tiny_spec
from tests.faultkit import (
    assert_no_partial_shard_accepted,
    assert_same_cache,
    build_args,
    clean_env,
    count_arrivals,
    launch_ranks,
    run_module,
    second_writer_refused,
    seeded_nth,
)


def _cfg(data: Path, out: Path, ckpt: Path, **kw) -> BuildConfig:
    args = dict(data=data, out=out, checkpoint=ckpt, spec=tiny_spec(), views=2, shard_size=5, batch_size=4,
                num_workers=0, device="cpu")
    args.update(kw)
    return BuildConfig(**args)


def _logged_build(cfg: BuildConfig, log: Path) -> None:
    """An uninterrupted in-process build that records every fault-point arrival in ``log``."""
    os.environ["TEC_FAULT_LOG"] = str(log)
    try:
        build_cache(cfg)
    finally:
        del os.environ["TEC_FAULT_LOG"]


@pytest.fixture(scope="module")
def ref(tiny_ckpt, tmp_path_factory) -> SimpleNamespace:
    """17 images (3 unreadable) in shards of 5: 4 chunks x 2 view-epochs. Reference caches (webdataset,
    zarr, and a 1-view cache to extend) with the fault-point arrivals of their uninterrupted builds."""
    root = tmp_path_factory.mktemp("faults-build")
    data = make_image_folder(root / "data", n_per_class=5)
    ns = SimpleNamespace(data=data, ckpt=tiny_ckpt, root=root)
    ns.wds, ns.zarr, ns.one = root / "wds", root / "zarr", root / "one"
    _logged_build(_cfg(data, ns.wds, tiny_ckpt), root / "wds.log")
    _logged_build(_cfg(data, ns.zarr, tiny_ckpt, format="zarr"), root / "zarr.log")
    build_cache(_cfg(data, ns.one, tiny_ckpt, views=1))
    extended = root / "extended"
    shutil.copytree(ns.one, extended)
    _logged_build(_cfg(data, extended, tiny_ckpt), root / "extend.log")
    assert_same_cache(extended, ns.wds)  # extending 1 -> 2 views gives the 2-view build
    ns.arrivals = {"fresh": count_arrivals(root / "wds.log"), "zarr": count_arrivals(root / "zarr.log"),
                   "extend": count_arrivals(root / "extend.log")}
    return ns


# (scenario, fault point): 20 distinct states a crash can leave. "fresh" builds a 2-view webdataset
# cache from nothing, "extend" adds view-epoch 1 to a finished 1-view cache (its old manifest must
# stay valid throughout), "zarr" builds the directory format. Where in its run each point fails is
# drawn from FAULT_SEED among the arrivals the uninterrupted build makes.
KILLS = [
    ("fresh", "after_forward"),  # targets of a batch computed, not yet queued for writing
    ("fresh", "shard_opened"),  # an empty temporary shard
    ("fresh", "mid_shard_write"),  # a temporary shard with some records
    ("fresh", "before_shard_close"),  # all records written, no end-of-archive blocks, not flushed
    ("fresh", "after_shard_fsync"),  # a complete, fsynced shard still under its temporary name
    ("fresh", "after_shard_rename"),  # a finished shard without its sidecar
    ("fresh", "json_torn"),  # half a sidecar, under its temporary name
    ("fresh", "mid_json_write"),  # a complete sidecar, not yet renamed
    ("fresh", "after_json_rename"),  # the sidecar renamed, the folder not yet fsynced
    ("fresh", "after_shard"),  # between two shards
    ("fresh", "before_barrier"),  # every shard done, ranks not yet agreed
    ("fresh", "after_barrier"),  # before rank 0 reads the sidecars
    ("fresh", "before_manifest"),  # leftovers removed, no manifest
    ("fresh", "manifest_torn"),  # half a manifest, under its temporary name
    ("fresh", "mid_manifest_write"),  # a complete manifest, not yet renamed
    ("fresh", "after_manifest_rename"),  # the manifest in place, the folder not yet fsynced
    ("fresh", "after_manifest"),  # before the final barrier
    ("extend", "mid_shard_write"),  # adding view-epoch 1 to a finished cache
    ("extend", "mid_manifest_write"),  # the old manifest still in place, the new one complete aside
    ("zarr", "mid_zarr_write"),  # a directory shard with some of its arrays
]


@pytest.mark.slow
@pytest.mark.parametrize("scenario, point", KILLS, ids=[f"{s}-{p}" for s, p in KILLS])
def test_killed_build_resumes_to_identical_cache(scenario: str, point: str, ref: SimpleNamespace, tmp_path: Path) -> None:
    nth = seeded_nth(point, ref.arrivals[scenario][point], salt=KILLS.index((scenario, point)))
    fault = f"{point}:{nth}"
    out = tmp_path / "cache"
    reference = ref.zarr if scenario == "zarr" else ref.wds
    if scenario == "extend":
        shutil.copytree(ref.one, out)
    fmt = "zarr" if scenario == "zarr" else "webdataset"
    r, _ = run_module("tec_cache", build_args(ref.data, out, ref.ckpt, fmt=fmt), env=clean_env(TEC_FAULT=fault))
    assert r.returncode == -9, f"{fault}: exit {r.returncode}\n{r.stderr[-2000:]}"
    seen = assert_no_partial_shard_accepted(out, reference)
    if scenario == "extend":
        assert seen["listed"] == 4  # the old manifest, untouched, still lists view-epoch 0
    if point in ("mid_shard_write", "shard_opened", "before_shard_close", "mid_zarr_write"):
        assert seen["temporary"] >= 1 and seen["refused"] >= 1, (fault, seen)  # the partial shard was there, and refused
    # The killed build's lock is left, naming its dead process: the re-run takes it over at once.
    assert json.loads((out / LOCK_NAME).read_text())["pid"] != os.getpid()
    said: list[str] = []
    build_cache(_cfg(ref.data, out, ref.ckpt, format=fmt), log=said.append)
    assert any("took over the lock of tec-cache build" in s and "its process is gone" in s for s in said), said
    assert_same_cache(out, reference)  # the lock is gone again: not a file of the cache


@pytest.mark.slow
@pytest.mark.parametrize("extend", [False, True], ids=["fresh", "extend"])
def test_a_second_build_into_the_same_out_is_refused(extend: bool, ref: SimpleNamespace, tmp_path: Path) -> None:
    """Two builds into one --out (a new cache, or extending one): the second exits 2 at once naming
    the first (host, pid, heartbeat); the first ends byte-identical to a lone build."""
    out = tmp_path / "cache"
    if extend:
        shutil.copytree(ref.one, out)
    argv = build_args(ref.data, out, ref.ckpt)
    rc, err = second_writer_refused("tec_cache", argv, out, lambda: CliRunner().invoke(app, argv), option="--out",
                                    command="tec-cache build")
    assert rc == 0, err[-2000:]
    assert_same_cache(out, ref.wds)
    assert not (out / LOCK_NAME).exists()


@pytest.mark.slow
@pytest.mark.parametrize("point", ["mid_shard_write", "json_torn", "manifest_torn"])
def test_disk_full_fails_clearly_and_resumes(point: str, ref: SimpleNamespace, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC injected at a write: exit 1 naming the file, the space needed and how to resume; the
    half-written file is removed, finished shards are kept (not rewritten) and a re-run completes."""
    nth = seeded_nth(point, ref.arrivals["fresh"][point], salt=100)
    out = tmp_path / "cache"
    reset_faults()
    monkeypatch.setenv("TEC_FAULT", f"{point}:{nth}/enospc")
    r = CliRunner().invoke(app, build_args(ref.data, out, ref.ckpt))
    text = " ".join(r.output.split())
    assert r.exit_code == 1, text
    target = {"mid_shard_write": ".tar", "json_torn": ".tar.json", "manifest_torn": MANIFEST_NAME}[point]
    assert "error: disk full (ENOSPC) while writing " in text and f"{target}:" in text, text
    assert str(out) in text and "is free on" in text and "re-run the same command to resume" in text, text
    if point != "manifest_torn":
        assert "more is needed for the" in text and "views still to build" in text, text
    assert not [p for p in out.rglob("*") if is_temporary(p.name)]  # nothing half-written left behind
    assert_no_partial_shard_accepted(out, ref.wds)
    done = {p: p.stat().st_mtime_ns for p in out.glob("ve*/shard-*.tar") if p.with_name(p.name + ".json").exists()}
    assert done or point == "mid_shard_write"
    monkeypatch.delenv("TEC_FAULT")
    build_cache(_cfg(ref.data, out, ref.ckpt))
    assert {p: p.stat().st_mtime_ns for p in done} == done  # nothing lost: finished shards were kept as they were
    assert_same_cache(out, ref.wds)


def test_disk_full_error_is_an_oserror_with_errno() -> None:
    e = DiskFullError("disk full (ENOSPC) while writing x")
    assert isinstance(e, OSError) and e.errno == 28 and str(e) == "disk full (ENOSPC) while writing x"


@pytest.mark.parametrize("spec, expect", [
    ("mid_shard_write:3", ("mid_shard_write", 3, None, "kill")),
    ("train_step:2@1", ("train_step", 2, 1, "kill")),
    ("json_torn:4@0/enospc", ("json_torn", 4, 0, "enospc")),
    ("after_shard", ("after_shard", 1, None, "kill")),
])
def test_fault_spec_grammar(spec: str, expect: tuple) -> None:
    f = parse_fault(spec)
    assert (f.point, f.nth, f.rank, f.action) == expect


@pytest.mark.parametrize("spec", ["", ":3", "x:y", "x:1@a", "x:1/explode"])
def test_fault_spec_errors_are_named(spec: str) -> None:
    with pytest.raises(ValueError, match="TEC_FAULT"):
        parse_fault(spec)


# ---- lost ranks ----------------------------------------------------------------------------


def test_dist_timeout_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEC_DIST_TIMEOUT", raising=False)
    assert dist_timeout_s() == 1800.0
    monkeypatch.setenv("TEC_DIST_TIMEOUT", "7.5")
    assert dist_timeout_s() == 7.5
    for bad in ("0", "-3", "soon"):
        monkeypatch.setenv("TEC_DIST_TIMEOUT", bad)
        with pytest.raises(ValueError, match="TEC_DIST_TIMEOUT=.*expected a positive number of seconds"):
            dist_timeout_s()


@pytest.mark.slow
def test_lost_rank_under_torchrun_fails_fast_and_the_rerun_resumes(ref: SimpleNamespace, tmp_path: Path) -> None:
    """Rank 1 of 2 SIGKILLed mid-shard: torchrun's agent stops rank 0 and exits non-zero at once,
    naming rank 1; the re-run, again on two ranks, finishes the cache as one process builds it."""
    out = tmp_path / "cache"
    args = build_args(ref.data, out, ref.ckpt)
    r, seconds = run_module("tec_cache", args, env=clean_env(TEC_FAULT="mid_shard_write:2@1"), torchrun=2, timeout=120)
    assert r.returncode != 0 and seconds < 60, (r.returncode, seconds)
    assert "Root Cause" in r.stderr and "rank      : 1 (local_rank: 1)" in r.stderr and "SIGKILL" in r.stderr, r.stderr[-3000:]
    assert_no_partial_shard_accepted(out, ref.wds)
    r, _ = run_module("tec_cache", args, torchrun=2, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_cache(out, ref.wds)
    stats = load_manifest(out).stats
    assert stats is not None and stats.build is not None and stats.build["world_size"] == 2


@pytest.mark.slow
def test_lost_rank_without_the_agent_fails_with_a_clear_message(ref: SimpleNamespace, tmp_path: Path) -> None:
    """Without torchrun to stop it (a peer on another node), the surviving rank does not hang: its
    collective fails as soon as the peer's connection drops, with one line saying what happened."""
    out = tmp_path / "cache"
    (code0, out0, s0), (code1, _, _) = launch_ranks(
        "tec_cache", build_args(ref.data, out, ref.ckpt), [0, 1], 2, clean_env(TEC_FAULT="mid_shard_write:2@1"))
    assert code1 == -9
    assert code0 == 1 and s0 < 90, (code0, s0, out0[-2000:])
    assert "error: rank 0 of 2: lost another rank while waiting for the other ranks to finish their shards" in out0, out0[-2000:]
    assert "re-run the same command to resume" in out0
    assert_no_partial_shard_accepted(out, ref.wds)


@pytest.mark.slow
def test_rank_that_never_joins_is_bounded_by_the_timeout(ref: SimpleNamespace, tmp_path: Path) -> None:
    """A rank that never starts: the others give up after TEC_DIST_TIMEOUT, naming the variable,
    instead of waiting the default 30 minutes."""
    out = tmp_path / "cache"
    [(code, text, seconds)] = launch_ranks("tec_cache", build_args(ref.data, out, ref.ckpt), [0], 2,
                                           clean_env(TEC_DIST_TIMEOUT="4"))
    assert code == 1 and seconds < 60, (code, seconds, text[-2000:])
    assert "rank 0 of 2: lost another rank while joining the process group (waits up to 4 s, TEC_DIST_TIMEOUT)" in text, text[-2000:]
    assert not out.exists()


def _mount(args: list[str]) -> str | None:
    """Run mount/umount; None when it worked, else why not (the test then skips, saying so)."""
    import subprocess

    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except OSError as e:
        return str(e)
    return None if r.returncode == 0 else (r.stderr.strip() or f"exit {r.returncode}")


def _fill(disk: Path) -> Path:
    """Write a file until the disk is full: the space the build is still counting on is gone."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(bytes(1 << 16))
                f.flush()
        except OSError:
            pass
    return filler


@pytest.mark.slow
def test_a_real_full_disk_stops_the_build_clearly_and_the_rerun_ends_identical(ref: SimpleNamespace, tmp_path: Path) -> None:
    """On a tmpfs mounted for the test, another writer fills the disk once the build has written its
    first shard: the build stops naming the file and the bytes still needed and publishes nothing
    partial; a re-run while the disk is full is refused before any work, naming the bytes needed;
    once the space is freed, the same command finishes byte-identical to a build that never ran out."""
    import subprocess
    import sys
    import time

    need = sum(p.stat().st_size for p in ref.wds.rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    disk.mkdir()
    why = _mount(["mount", "-t", "tmpfs", "-o", f"size={4 * need // 4096 * 4096}", "tmpfs", str(disk)])
    if why is not None:
        pytest.skip(f"cannot mount a tmpfs here ({why}); the ENOSPC fault tests above cover the code path")
    try:
        out = disk / "cache"
        argv = [sys.executable, "-m", "tec_cache", *build_args(ref.data, out, ref.ckpt)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env(COLUMNS="200"))
        first = out / "ve000" / "shard-000000.tar"
        while not first.exists() and proc.poll() is None:
            time.sleep(0.005)
        filler = _fill(disk)
        text = " ".join(proc.communicate(timeout=300)[0].split())
        assert proc.returncode == 1 and "error: disk full (ENOSPC) while writing " in text, text
        assert str(out) in text and "is free on" in text and "more is needed for the" in text, text
        assert "re-run the same command to resume" in text, text
        assert not (out / MANIFEST_NAME).exists()
        assert not [p for p in out.rglob("*") if is_temporary(p.name)]
        assert_no_partial_shard_accepted(out, ref.wds)
        r = CliRunner().invoke(app, build_args(ref.data, out, ref.ckpt))  # still full: refused up front
        text = " ".join(r.output.split())
        assert r.exit_code == 1 and f"--out {out}: not enough disk: the" in text and "views still to build need about" in text, text
        filler.unlink()
        r = CliRunner().invoke(app, build_args(ref.data, out, ref.ckpt))
        assert r.exit_code == 0, r.output
        assert_same_cache(out, ref.wds)
    finally:
        _mount(["umount", "-l", str(disk)])

"""One writer per cache folder and run dir (tec_cache/format/writer_lock.py): a second writer is refused at
once naming the holder, a dead or stale holder's lock is taken over, an earlier instance of the same
job is waited for, and the lock file is invisible to the cache's verification and leftover cleanup."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tec_cache.format import writer_lock as wl
from tests.faultkit import ROOT, clean_env


def _foreign_lock(folder: Path, *, host: str = "node-b", pid: int = 4242, age: float = 0.0, job: str | None = None,
                  exiting: bool = False) -> dict:
    """A lock file as another writer leaves it, its heartbeat (and mtime) ``age`` seconds old."""
    folder.mkdir(parents=True, exist_ok=True)
    beat = time.time() - age
    obj = {"format": wl.LOCK_FORMAT, "version": 1, "host": host, "boot_id": None, "pid": pid, "pid_start": None,
           "job": job, "command": "tec-train run", "started": beat - 60, "heartbeat": beat, "token": "f" * 32,
           "exiting": exiting}
    path = folder / wl.LOCK_NAME
    path.write_text(json.dumps(obj))
    os.utime(path, (beat, beat))
    return obj


def _dead_pid() -> int:
    """A pid no process has now (counting down from the highest the kernel hands out)."""
    pid = int(Path("/proc/sys/kernel/pid_max").read_text()) - 1
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    lock = wl.acquire(folder, "tec-train run", "--run-dir")
    held = json.loads((folder / wl.LOCK_NAME).read_text())
    assert (held["host"], held["pid"], held["command"]) == (socket.gethostname(), os.getpid(), "tec-train run")
    with pytest.raises(wl.WriterLockError, match=rf"--run-dir {folder}: another writer holds it: tec-train run on host "
                                                 rf"{socket.gethostname()}, pid {os.getpid()}.*heartbeat [0-9] s ago.*"
                                                 r"Nothing was changed"):
        wl.acquire(folder, "tec-train run", "--run-dir")
    lock.release()
    assert not (folder / wl.LOCK_NAME).exists()
    assert not folder.exists()  # made by the lock only, empty again: removed
    wl.acquire(folder, "tec-train run", "--run-dir").release()


def test_heartbeat_is_rewritten_and_a_takeover_is_noticed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = wl.acquire(tmp_path, "tec-cache build", "--out", stale_s=1.2)  # a beat every 0.2 s
    first = json.loads((tmp_path / wl.LOCK_NAME).read_text())["heartbeat"]
    time.sleep(0.7)
    assert json.loads((tmp_path / wl.LOCK_NAME).read_text())["heartbeat"] > first
    lock.ensure()
    _foreign_lock(tmp_path)  # another writer judged this one stale and took over
    time.sleep(0.7)
    with pytest.raises(wl.WriterLockError, match="taken over by tec-train run on host node-b, pid 4242"):
        lock.ensure()
    lock.release()
    assert json.loads((tmp_path / wl.LOCK_NAME).read_text())["host"] == "node-b"  # the new holder's lock is kept


def test_dead_holder_on_this_host_is_taken_over(tmp_path: Path) -> None:
    _foreign_lock(tmp_path, host=socket.gethostname(), pid=_dead_pid(), age=1.0)
    said: list[str] = []
    lock = wl.acquire(tmp_path, "tec-train run", "--run-dir", say=said.append)
    assert json.loads((tmp_path / wl.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert len(said) == 1 and "took over the lock of tec-train run on host" in said[0] and "its process is gone" in said[0]
    lock.release()


def test_other_host_is_refused_until_its_heartbeat_is_older_than_the_bound(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _foreign_lock(tmp_path, age=30)
    t0 = time.monotonic()
    with pytest.raises(wl.WriterLockError, match=r"host node-b, pid 4242 .*heartbeat 3[0-9] s ago\); it is alive.*older than "
                                                 r"120 s \(TEC_LOCK_STALE_S\)"):
        wl.acquire(tmp_path, "tec-train run", "--run-dir")
    assert time.monotonic() - t0 < 2  # refused at once
    monkeypatch.setenv(wl.STALE_ENV, "20")
    said: list[str] = []
    lock = wl.acquire(tmp_path, "tec-train run", "--run-dir", say=said.append)
    assert "its heartbeat is older than 20 s (TEC_LOCK_STALE_S)" in said[0]
    lock.release()
    monkeypatch.setenv(wl.STALE_ENV, "soon")
    with pytest.raises(ValueError, match="TEC_LOCK_STALE_S='soon': expected a positive number of seconds"):
        wl.acquire(tmp_path, "tec-train run", "--run-dir")


@pytest.mark.slow
def test_an_earlier_instance_of_the_same_job_is_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A requeue (same SLURM job id) starting while the old instance still holds the lock waits for it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tec_cache.format.writer_lock import acquire; "
         "lock = acquire(sys.argv[1], 'tec-train run', '--run-dir'); print('held', flush=True); "
         "time.sleep(1.5); lock.mark_exiting(); time.sleep(0.5); lock.release()", str(tmp_path)],
        env=clean_env(SLURM_JOB_ID="777"), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "held"
    monkeypatch.setenv("SLURM_JOB_ID", "778")
    with pytest.raises(wl.WriterLockError, match=r"job SLURM_JOB_ID=777 .*it is alive"):
        wl.acquire(tmp_path, "tec-train run", "--run-dir")  # another job: refused at once
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    said: list[str] = []
    t0 = time.monotonic()
    lock = wl.acquire(tmp_path, "tec-train run", "--run-dir", say=said.append, poll_s=0.1)
    waited = time.monotonic() - t0
    assert holder.wait(10) == 0
    assert 0.5 < waited < 10, waited
    assert "waiting for tec-train run on host" in said[0] and "an earlier instance of this job" in said[0]
    assert json.loads((tmp_path / wl.LOCK_NAME).read_text())["job"] == "SLURM_JOB_ID=777"
    lock.release()


def test_a_holder_that_stays_alive_past_the_bound_is_refused_after_waiting(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _foreign_lock(tmp_path, host=socket.gethostname(), pid=os.getppid(), exiting=True)  # alive, says it is ending
    t0 = time.monotonic()
    with pytest.raises(wl.WriterLockError, match=r"exiting\); it is still alive after 0.5 s of waiting"):
        wl.acquire(tmp_path, "tec-train run", "--run-dir", stale_s=0.5, poll_s=0.1)
    assert 0.4 < time.monotonic() - t0 < 5


def test_an_unreadable_lock_file_counts_by_its_age(tmp_path: Path) -> None:
    """Half a lock (a writer without hard links, between its create and its content; or damage):
    waited for until its mtime is older than the bound, then taken over."""
    (tmp_path / wl.LOCK_NAME).write_text("{")
    said: list[str] = []
    t0 = time.monotonic()
    lock = wl.acquire(tmp_path, "tec-train run", "--run-dir", stale_s=0.6, poll_s=0.1, say=said.append)
    assert 0.5 < time.monotonic() - t0 < 5
    assert "waiting for an unreadable lock file" in said[0] and "took over the lock of an unreadable lock file" in said[1]
    lock.release()


def test_the_lock_file_is_no_part_of_a_cache(tiny_cache, tmp_path: Path) -> None:
    """Readers neither take nor wait for the lock: verify passes and training reads the cache while a
    writer holds it; a build's leftover cleanup keeps a live lock and its heartbeat temporary."""
    import shutil

    from tec_cache.build.verify import verify_cache
    from tec_cache.format.fs import is_temporary
    from tec_train.cache_loader import CacheLoader

    out = Path(shutil.copytree(tiny_cache.cache, tmp_path / "cache"))
    lock = wl.acquire(out, "tec-cache build", "--out")
    assert verify_cache(out) == []
    loader = CacheLoader(out, batch_size=4, num_workers=0, verify=True)
    assert sum(len(b.image_index) for b in loader.epoch(0)) == 20
    assert wl.is_lock_file(wl.LOCK_NAME) and wl.is_lock_file(f"{wl.LOCK_NAME}.tmp-12-34")
    assert is_temporary(f"{wl.LOCK_NAME}.tmp-12-34") and not wl.is_lock_file(".shard-000000.tar.tmp-12")
    lock.release()
    assert not (out / wl.LOCK_NAME).exists()


def test_job_id_comes_from_the_scheduler(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in wl.JOB_ENVS:
        monkeypatch.delenv(name, raising=False)
    assert wl.job_id() is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert wl.job_id() == "TORCHELASTIC_RUN_ID=abc"
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    assert wl.job_id() == "SLURM_JOB_ID=12"  # the scheduler's id outlives a torchrun launch


def test_a_folder_that_cannot_be_written_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(wl.WriterLockError, match=r"--out .*file/cache: cannot create the folder \(Not a directory\)"):
        wl.acquire(tmp_path / "file" / "cache", "tec-cache build", "--out")

    def refuse(folder: Path, holder: wl.Holder) -> bool:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(wl, "_create", refuse)  # a read-only folder (root, as here, writes into any)
    with pytest.raises(wl.WriterLockError, match=r"--run-dir .*/run: cannot write its lock file \.tec-writer\.lock "
                                                 r"\(Permission denied\); a writer needs a writable folder"):
        wl.acquire(tmp_path / "run", "tec-train run", "--run-dir")
    assert not (tmp_path / "run").exists()  # the folder it made for the lock is gone again


@pytest.mark.parametrize("command", ["run", "finetune"])
def test_a_run_dir_held_by_another_host_is_refused_by_the_cli(command: str, tiny_cache, tmp_path: Path) -> None:
    """`tec-train run` / `finetune` on a run dir another node writes: exit 2 at once naming that
    writer, the run dir exactly as it was."""
    from typer.testing import CliRunner

    from tec_train.cli import app

    run = tmp_path / "run"
    _foreign_lock(run, age=5, job="SLURM_JOB_ID=99")
    (run / "metrics.jsonl").write_text('{"step": 10}\n')
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    if command == "run":
        argv = ["run", "--run-dir", str(run), "--cache", str(tiny_cache.cache), "--model", "vit_tiny_patch8",
                "--depth", "3", "--device", "cpu"]
    else:
        (tmp_path / "src").mkdir()
        argv = ["finetune", str(tmp_path / "src"), "--run-dir", str(run), "--fashion-mnist", "--device", "cpu"]
    t0 = time.monotonic()
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 2, r.output
    assert time.monotonic() - t0 < 10
    text = " ".join(r.output.split())
    assert f"--run-dir {run}: another writer holds it: tec-train run on host node-b, pid 4242, job SLURM_JOB_ID=99 " in text
    age = re.search(r"heartbeat (\d+) s ago\); it is alive\. Nothing was changed", text)
    assert age is not None and int(age.group(1)) >= 5, text
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before

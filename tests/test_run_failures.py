"""A failure inside a data-loader worker ends `tec-cache build`, `tec-train run` (cache and online)
and `tec-train finetune` with one terminal line (what failed, on which sample, where the traceback
went, that re-running resumes); the full traceback lands in the run's log file, and the re-run
finishes what the failed run started."""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from tec_cache.runtime.run_log import BUILD_LOG, RUN_LOG, SampleError, naming_sample, summary
from tests.conftest import TINY_ARCH, TINY_IMG, TINY_PATCH, TINY_TOPK, make_image_folder
from tests.faultkit import assert_same_cache, build_args, clean_env, run_module

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tiny_cache: SimpleNamespace) -> SimpleNamespace:
    return tiny_cache


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _assert_one_line_failure(r, log: Path, *names: str) -> str:
    """Exit 1; the terminal's error is one line naming ``names`` and the log; no traceback on the
    terminal; the log holds the worker's traceback."""
    assert r.returncode == 1, r.stderr[-3000:]
    (line,) = _error_lines(r.stderr)
    for name in (*names, str(log), "in data-loader worker", "re-running the same command"):
        assert name in line, (name, line)
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) < 12, r.stderr
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "Original Traceback" in text
    return line


def test_summary_of_an_in_process_sample_error() -> None:
    with pytest.raises(SampleError) as info:
        with naming_sample("image a/b.jpg"):
            raise ValueError("bits must be\nbetween 1 and 8")
    assert summary(info.value) == "image a/b.jpg: ValueError: bits must be between 1 and 8"
    assert isinstance(info.value.__cause__, ValueError)


def test_build_worker_failure_is_one_line_and_the_rerun_completes(tiny, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    args = build_args(tiny.data, out, tiny.ckpt)
    args[args.index("--num-workers") + 1] = "1"
    r, _ = run_module("tec_cache", args, env=clean_env(TEC_FAULT="cut_views:7/raise"))
    line = _assert_one_line_failure(r, out / BUILD_LOG, "InjectedFault", "image ", "view-epochs")
    assert "keeps the finished shards" in line
    assert not (out / "manifest.json").exists()  # nothing half-built is published
    r, _ = run_module("tec_cache", args)
    assert r.returncode == 0, r.stderr[-3000:]
    (out / BUILD_LOG).unlink()  # the failed run's log; the cache itself is what a clean build gives
    ref = tmp_path / "ref"
    r, _ = run_module("tec_cache", build_args(tiny.data, ref, tiny.ckpt))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_cache(out, ref)


def _run_args(run: Path, *source: str) -> list[str]:
    return ["run", "--run-dir", str(run), *source, "--model", "vit_tiny_patch8", "--depth", "2", "--batch-size", "2",
            "--epochs", "1", "--warmup-epochs", "0", "--num-workers", "1", "--log-every", "1", "--ckpt-every", "1",
            "--device", "cpu"]


def test_train_from_cache_worker_failure_is_one_line_and_the_rerun_resumes(tiny, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = _run_args(run, "--cache", str(tiny.cache))
    r, _ = run_module("tec_train", args, env=clean_env(TEC_FAULT="read_batch:4/raise"))
    _assert_one_line_failure(r, run / RUN_LOG, "InjectedFault", "view-epoch 0, samples")
    steps_before = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps_before == [1, 2, 3]  # the batches before the failing one were trained and checkpointed
    r, _ = run_module("tec_train", args)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # 20 views / batch 2: resumed at step 4, nothing repeated


def test_online_worker_failure_is_one_line(tiny, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = _run_args(run, "--data", str(tiny.data), "--arch", TINY_ARCH, "--checkpoint", str(tiny.ckpt),
                     "--img-size", str(TINY_IMG), "--patch-size", str(TINY_PATCH), "--topk", str(TINY_TOPK))
    r, _ = run_module("tec_train", args, env=clean_env(TEC_FAULT="cut_view:3/raise"))
    _assert_one_line_failure(r, run / RUN_LOG, "InjectedFault", f"of {tiny.data}, view 0")


def test_finetune_unreadable_image_in_a_worker_is_one_line(tiny, tmp_path: Path) -> None:
    """A real bad file (not an injected fault): the line names it."""
    from tec_train.export import export_state_dict, save_export, timm_model_name
    from tests.test_downstream import _student

    data = tmp_path / "data"
    make_image_folder(data / "train", n_per_class=6, bad=False)
    make_image_folder(data / "val", n_per_class=3, bad=False)
    (data / "train" / "class1" / "broken.jpg").write_bytes(b"not a jpeg" * 20)
    student = _student()
    export = tmp_path / "export"
    save_export(export_state_dict(student.state_dict()), export, timm_model_name("vit_tiny_patch4"),
                {**student.encoder_config(), "student_model": "vit_tiny_patch4"})
    run = tmp_path / "ft"
    r, _ = run_module("tec_train", ["finetune", str(export), "--data", str(data), "--run-dir", str(run), "--epochs", "1",
                                    "--batch-size", "4", "--num-workers", "1", "--device", "cpu"])
    _assert_one_line_failure(r, run / RUN_LOG, f"image {data / 'train' / 'class1' / 'broken.jpg'}",
                             "UnidentifiedImageError")


# ---- a main process killed with SIGKILL leaves no worker behind --------------------------------

def _children(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` (from /proc; Linux only, as the guarantee is)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def _running(pid: int) -> bool:
    """Alive and not a zombie (a dead child nobody reaped yet holds no memory)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("command", ["build", "run"])
def test_killed_main_process_leaves_no_worker_running(command: str, tiny, tmp_path: Path) -> None:
    """SIGKILL (the OOM killer, a preempting scheduler) runs no cleanup: the data-loader workers
    must die with their parent, not live on re-parented to init holding their memory. Without the
    parent-death signal they outlive it (blocked writing to a queue nobody reads) for minutes; the
    loader's own watchdog checks only every 5 s, so 3 s tells the two apart."""
    import signal
    import subprocess
    import sys
    import time

    if command == "build":
        data = make_image_folder(tmp_path / "data", n_per_class=40, bad=False)
        args = ["-m", "tec_cache", *build_args(data, tmp_path / "cache", tiny.ckpt, views=8)]
        args[args.index("--num-workers") + 1] = "2"
    else:
        args = ["-m", "tec_train", "run", "--cache", str(tiny.cache), "--run-dir", str(tmp_path / "run"),
                "--model", "vit_tiny_patch8", "--depth", "2", "--batch-size", "2", "--epochs", "500",
                "--num-workers", "2", "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, *args], env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            workers = _children(proc.pid)
            time.sleep(0.02)
        assert len(workers) >= 2, "the command never started its 2 data-loader workers"
        time.sleep(0.5)  # let them fill their queues
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        t0 = time.monotonic()
        while any(_running(w) for w in workers) and time.monotonic() - t0 < 3:
            time.sleep(0.05)
        left = [w for w in workers if _running(w)]
        assert not left, f"workers {left} outlived the killed {command} by 3 s"
    finally:
        proc.kill()
        for w in workers:
            try:
                os.kill(w, signal.SIGKILL)
            except OSError:
                pass

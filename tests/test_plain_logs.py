"""Logs where no terminal is (a job's --output file): a whole plain line every --log-every steps (or
every N seconds for a build) with the loss terms, lr, rate, data wait, elapsed time and ETA, and
tables and paths at full width; and both commands' --version."""
from __future__ import annotations

import io
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from rich.table import Table
from typer.testing import CliRunner

from tec_cache.core.fashion_mnist import DEFAULT_DIR
from tec_cache.runtime.plain_log import LogConsole, PlainProgress, duration, eta
from tec_train.harness.reporting import Reporter
from tests.conftest import TINY_ARCH, TINY_IMG, TINY_PATCH, TINY_TOPK, make_image_folder
from tests.faultkit import ROOT, clean_env

ELAPSED_ETA = r"elapsed (\d+h)?(\d+m)?\d+s eta ((\d+h)?(\d+m)?\d+s|\?)$"


def test_version_of_both_commands_is_the_installed_one() -> None:
    from tec_cache.build.cli import app as cache_app
    from tec_train.cli import app as train_app

    for app, prog in ((cache_app, "tec-cache"), (train_app, "tec-train")):
        r = CliRunner().invoke(app, ["--version"])
        assert r.exit_code == 0 and r.output.strip() == f"{prog} {version('tec-pretrain')}", r.output


def test_log_console_prints_tables_and_paths_whole_where_no_terminal_is() -> None:
    buf = io.StringIO()
    out = LogConsole(file=buf, soft_wrap=True)
    assert not out.is_terminal
    path = "/scratch/" + "a-very-long-folder-name/" * 8 + "checkpoint-00000010.pt"
    t = Table(title="summary")
    t.add_column("item")
    t.add_column("value", justify="right")
    t.add_row("checkpoint", path)
    out.print(t)
    text = buf.getvalue()
    assert path in text and "…" not in text
    # A terminal keeps its own width.
    term = LogConsole(file=io.StringIO(), force_terminal=True, width=60)
    assert term.is_terminal and term.width == 60


def test_plain_progress_line_is_whole_with_elapsed_and_eta() -> None:
    buf = io.StringIO()
    lines = PlainProgress(LogConsole(file=buf), "step")
    lines.start(total=100, done=40)
    fields = {"epoch": 3, "loss": 0.123456789, "name_" * 40: 1.0}
    lines.line(50, fields)
    (line,) = buf.getvalue().splitlines()
    assert line.startswith("step 50/100 epoch 3 loss 0.1235 " + "name_" * 40 + " 1")
    assert re.search(ELAPSED_ETA, line), line
    assert duration(3725) == "1h02m05s" and duration(65) == "1m05s" and duration(4.4) == "4s"
    assert eta(50, 100, 10.0, done_at_start=40) == "50s" and eta(40, 100, 1.0, done_at_start=40) == "?"


def _run_to_file(log: Path, *args: str) -> tuple[int, str]:
    """A command with stdout and stderr going to a file, as under Slurm's --output."""
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", *args], stdout=f, stderr=subprocess.STDOUT, env=clean_env(),
                           cwd=ROOT, timeout=600)
    return r.returncode, log.read_text()


@pytest.mark.slow
def test_build_run_and_finetune_write_plain_lines_to_a_log_file(tiny_ckpt: Path, tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", n_per_class=4, bad=False)  # 12 images, 24 views
    cache = tmp_path / "a-long-folder-name-for-the-cache-that-would-not-fit-in-eighty-columns" / "cache"
    code, text = _run_to_file(
        tmp_path / "build.log", "tec_cache", "build", "--data", str(data), "--out", str(cache), "--checkpoint",
        str(tiny_ckpt), "--arch", TINY_ARCH, "--img-size", str(TINY_IMG), "--patch-size", str(TINY_PATCH), "--topk",
        str(TINY_TOPK), "--views", "2", "--shard-size", "4", "--batch-size", "4", "--num-workers", "0",
        "--device", "cpu", "--log-seconds", "0")
    assert code == 0, text
    views = [ln for ln in text.splitlines() if ln.startswith("views ")]
    assert views[0].startswith("views 0/24 ") and views[-1].startswith("views 24/24 views/s ") and len(views) >= 3, text
    assert all(re.search(ELAPSED_ETA, ln) for ln in views), views
    assert str(cache / "manifest.json") in text and "…" not in text and "building" not in text  # nothing cut, no bar

    run = tmp_path / "run-with-a-long-name-so-that-the-checkpoint-path-is-past-eighty-columns"
    code, text = _run_to_file(
        tmp_path / "run.log", "tec_train", "run", "--run-dir", str(run), "--cache", str(cache), "--model",
        "vit_tiny_patch8", "--depth", "2", "--batch-size", "4", "--epochs", "4", "--warmup-epochs", "1",
        "--num-workers", "0", "--log-every", "3", "--device", "cpu")
    assert code == 0, text
    steps = [ln for ln in text.splitlines() if ln.startswith("step ")]
    # 12 images (one view-epoch) / batch 4 = 3 steps per epoch, 12 in all: a line every 3 steps, one line each.
    assert [ln.split()[1] for ln in steps] == ["3/12", "6/12", "9/12", "12/12"], text
    for ln in steps:
        assert re.match(r"step \d+/12 epoch \d loss \S+ loss_fea \S+ loss_att \S+ lr \S+ images_per_s \S+ "
                        r"data_wait \S+% " + ELAPSED_ETA, ln), ln
    assert str(run / "checkpoint-00000012.pt") in text and "…" not in text and "training" not in text

    if not (DEFAULT_DIR / "train-labels-idx1-ubyte.gz").is_file():
        pytest.skip("fine-tuning's part needs Debian's dataset-fashion-mnist")
    ft = tmp_path / "finetune-run-with-a-long-name-so-that-the-result-path-is-past-eighty-columns"
    code, text = _run_to_file(
        tmp_path / "ft.log", "tec_train", "finetune", str(run), "--run-dir", str(ft), "--fashion-mnist",
        "--train-subset", "64", "--val-subset", "20", "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "0",
        "--num-workers", "0", "--log-every", "4", "--device", "cpu")
    assert code == 0, text
    steps = [ln for ln in text.splitlines() if ln.startswith("step ")]
    # 64 images / batch 8 = 8 steps per epoch: lines at steps 4 and 8 of each epoch, and each epoch's result.
    assert [ln.split()[1] for ln in steps] == ["4/16", "8/16", "8/16", "12/16", "16/16", "16/16"], text
    for ln in steps:
        assert re.match(r"step \d+/16 epoch \d train_loss \S+ lr \S+ ", ln) and re.search(r" images_per_s \S+ data_wait \S+% ", ln), ln
    assert all(re.search(ELAPSED_ETA, ln) for ln in steps) and sum("test_top1" in ln for ln in steps) == 2
    assert str(ft / "result.json") in text and "…" not in text and "fine-tuning" not in text


def test_a_terminal_keeps_the_live_bar(tiny_cache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tec_train.cli as cli
    from tec_train.harness import reporters

    screen = io.StringIO()
    monkeypatch.setattr(cli, "console", LogConsole(file=screen, force_terminal=True, width=100, soft_wrap=True))
    r = CliRunner().invoke(cli.app, ["run", "--run-dir", str(tmp_path / "run"), "--cache", str(tiny_cache.cache), "--model",
                                     "vit_tiny_patch8", "--depth", "2", "--batch-size", "4", "--max-steps", "2",
                                     "--num-workers", "0", "--log-every", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    text = screen.getvalue()
    assert "training" in text and "━" in text  # rich's bar
    assert not re.search(r"^step \d+/\d+ ", text, re.M)  # no plain lines on a terminal
    # Both terminal reporters take every hook a loop calls.
    for reporter in (reporters.RichReporter, reporters.RichFinetuneReporter, reporters.PlainReporter, reporters.PlainFinetuneReporter):
        assert issubclass(reporter, Reporter)


def test_finetune_reporters_take_the_running_status(tmp_path: Path) -> None:
    from tec_train.harness.reporters import PlainFinetuneReporter, RichFinetuneReporter

    summary = {"encoder": {"kind": "export", "model_name": "vit_tiny_patch8", "depth": 2, "embed_dim": 192},
               "data": {"kind": "image_folder", "train_images": 64, "val_images": 20, "num_classes": 2},
               "img_size": 32, "eff_batch": 8, "lr": 1e-3, "optimizer_steps_per_epoch": 4, "amp": "off"}
    stats = {"step": 2, "epoch": 0, "train_loss": 0.7, "lr": 1e-3, "images_per_s": 50.0, "data_wait_fraction": 0.25}
    for terminal, kind in ((True, RichFinetuneReporter), (False, PlainFinetuneReporter)):
        buf = io.StringIO()
        rep = kind(LogConsole(file=buf, force_terminal=terminal, width=100))
        rep.start(total=16, done=0, summary=summary)  # 2 epochs of 4 steps of 2 micro-batches
        rep.advance(4)
        rep.status(4, stats)
        rep.finish()
        if not terminal:
            assert re.search(r"^step 2/8 epoch 0 train_loss 0.7 lr 0.001 images_per_s 50 data_wait 25.0% " + ELAPSED_ETA,
                             buf.getvalue(), re.M), buf.getvalue()

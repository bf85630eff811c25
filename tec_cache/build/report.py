"""How ``tec-cache build`` shows itself on rank 0: a live bar on a terminal, whole plain lines in a
job's log, then the dry run's size estimate or the build's result table.

Data flow: build.build_cache's ``set_total`` / ``progress`` hooks --> BuildProgress (rich bar or
tec_cache.runtime.plain_log lines) --> the console; its BuildResult --> ``dry_run_report`` or
``result_table``. The command line (cli.py) only wires them.
"""
from __future__ import annotations

import time
from typing import Any

from rich import filesize
from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tec_cache.runtime.plain_log import PlainProgress

from .config import BuildConfig

IMAGENET_1K_IMAGES = 1_281_167  # the training split


def size(n: float) -> str:
    return filesize.decimal(int(n))


class BuildProgress:
    """Views built so far and their rate. A terminal gets the live bar; a log file plain lines every
    ``every_s`` seconds (the bar would print once, at the end, cut); ``quiet``: neither (other ranks,
    a dry run). Use as a context manager around the build, passing ``advance`` and ``set_total``."""

    def __init__(self, out: Console, every_s: float, quiet: bool) -> None:
        plain = not out.is_terminal
        self.bar = Progress(TextColumn("[bold]building"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=out, disable=plain or quiet)
        self.task = self.bar.add_task("views", total=None, rate="")
        self.lines = PlainProgress(out, "views", every_s=every_s)
        self.show_lines = plain and not quiet
        self.t0 = time.time()
        self.done = 0

    def __enter__(self) -> BuildProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def advance(self, n: int) -> None:
        self.done += n
        rate = self.done / max(time.time() - self.t0, 1e-9)
        self.bar.update(self.task, advance=n, rate=f"{rate:.1f} views/s")
        if self.show_lines and (self.lines.due() or self.done == self.lines.total):
            self.lines.line(self.done, {"views/s": round(rate, 1)})

    def set_total(self, n: int) -> None:
        self.bar.update(self.task, total=n)
        self.lines.start(n)
        if self.show_lines:
            self.lines.line(0, {})


def dry_run_report(cfg: BuildConfig, estimate: dict[str, Any]) -> list[RenderableType]:
    """What a dry run prints: the recipe, then the size estimate (or that nothing is left to build)."""
    sp = cfg.spec
    grid = sp.img_size // sp.patch_size
    out: list[RenderableType] = [
        f"base model {sp.name} ({sp.arch}): top-k {sp.topk}, tau {sp.tau}, last layers {sp.last_layers}, "
        f"{sp.img_size}px / patch {sp.patch_size} = {grid}x{grid} grid"]
    if not estimate.get("views"):
        return [*out, "nothing to do: every shard of this cache is complete"]
    t = Table(title="dry run: size estimate (nothing written)")
    for col in ("bytes/view", "views to build", "bytes needed", "bytes free"):
        t.add_column(col, justify="right")
    t.add_row(size(estimate["bytes_per_view"] or 0), str(estimate["views"]), size(estimate.get("bytes_needed", 0)),
              size(estimate.get("bytes_free", 0)))
    out.append(t)
    if estimate["bytes_per_view"]:
        # The number a user weighs K and the codec against: the same recipe over ImageNet-1k.
        total = estimate["bytes_per_view"] * IMAGENET_1K_IMAGES * cfg.views
        out.append(f"ImageNet-1k ({IMAGENET_1K_IMAGES:,} images) at {cfg.views} view-epochs, codec {cfg.codec}, "
                   f"{size(estimate['bytes_per_view'])}/view: about {size(total)}")
    return out


def result_table(cfg: BuildConfig, result: Any) -> Table:
    """The build's result (a builder.BuildResult): what this rank built, skipped and wrote."""
    t = Table(title=f"tec-cache build: {cfg.out}")
    t.add_column("item")
    t.add_column("value", justify="right")
    rows = [
        ("views built (this rank)", str(result.views_built)),
        ("shards written (this rank)", str(result.shards_built)),
        ("shards already complete", str(result.shards_skipped)),
        ("unreadable images skipped", str(len(result.skipped_images))),
        ("bytes per view", size(result.bytes_per_view)),
        ("seconds", f"{result.seconds:.1f}"),
        ("views/s", f"{result.views_built / max(result.seconds, 1e-9):.1f}"),
        ("manifest", str(result.manifest_path)),
    ]
    for r in rows:
        t.add_row(*r)
    return t

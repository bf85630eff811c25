"""`tec-cache`: the stage-1 command line (build, inspect, verify, show).

Data flow: flags (derived from TargetRecipe's and BuildConfig's option fields, runtime/flags.py)
--config.build_config (defaults < a pipeline's [cache] table < flags)--> BuildConfig -->
builder.build_cache, shown by report.py (progress, dry-run estimate, result table); or manifest -->
inspect table / verify report. Only rank 0 prints under torchrun.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.markup import escape
from rich.table import Table

from tec_cache.build.config import BuildConfig, build_config
from tec_cache.build.report import BuildProgress, dry_run_report, result_table, size
from tec_cache.core.basemodels import TargetRecipe
from tec_cache.runtime.dist import dist_info
from tec_cache.runtime.flags import flags_from, param, with_flags
from tec_cache.runtime.plain_log import log_console
from tec_cache.runtime.run_log import BUILD_LOG, SampleError, failure_line, from_worker
from tec_cache.runtime.version import version_callback

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Stage 1 of TEC: cache a frozen base model's targets.")
# Errors stay on one greppable line; where no terminal is, tables and paths print at full width.
console = log_console()


@app.callback()
def _main(version: bool | None = typer.Option(None, "--version", callback=version_callback("tec-cache"), is_eager=True,
                                                 help="Print the installed version and exit.")) -> None:
    """Stage 1 of TEC: cache a frozen base model's targets."""


def _fail(msg: str, code: int = 2) -> NoReturn:
    # Messages quote paths, keys and TOML tables like [cache]: never read them as rich markup.
    console.print(f"[bold red]error:[/] {escape(msg)}", markup=True, highlight=False)
    raise typer.Exit(code)


_BUILD_FLAGS = [
    param("pipeline", str | None, typer.Option(None, "--pipeline", help=(
        "Pipeline name (see `tec-train pipelines`) or .toml file: its cache table gives the defaults; flags override them."))),
    *flags_from(TargetRecipe, extra_help={"tau": " recorded for stage 2"}),
    *flags_from(BuildConfig, skip=("spec", "fetched"),
                extra_help={"out": " With --pipeline, defaults to caches/<the pipeline's cache_name>."}),
    param("log_seconds", float, typer.Option(30.0, "--log-seconds", help=(
        "Where output is not a terminal (a job's log file): a progress line every N seconds (0: after every batch of "
        "views), and one at the end."))),
]


@app.command()
@with_flags(_BUILD_FLAGS)
def build(*, pipeline: str | None, log_seconds: float, **flags: Any) -> None:
    """Run the base model over K augmented views of every image and write its targets to shards."""
    if not log_seconds >= 0:
        _fail(f"--log-seconds: must be a number >= 0, got {log_seconds:g}")
    from tec_cache.build.builder import BuildOptionError, build_cache

    info = dist_info()
    say = console.print if info.is_main else (lambda *a, **k: None)
    try:
        cfg = build_config(flags, pipeline)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    try:
        with BuildProgress(console, log_seconds, quiet=not info.is_main or cfg.dry_run) as progress:
            result = build_cache(cfg, log=say, progress=progress.advance, set_total=progress.set_total)
    except BuildOptionError as e:  # found before any work: a usage error
        _fail(str(e))
    except Exception as e:  # every failure ends as one line; the traceback goes to the log
        if isinstance(e, (ValueError, FileNotFoundError, OSError, RuntimeError)) and not isinstance(e, SampleError) \
                and not from_worker(e):
            _fail(str(e), 1)  # the project's own errors name the file and what to do
        # A view that could not be cut, a worker's exception, or an unexpected one: one line here,
        # the traceback in the cache folder's log.
        _fail(failure_line(e, cfg.out / BUILD_LOG, rank=info.rank,
                           resume="re-running the same command keeps the finished shards and builds the rest"), 1)
    for shown in dry_run_report(cfg, result.estimate) if cfg.dry_run else [result_table(cfg, result)]:
        say(shown, highlight=False)
    for s in [] if cfg.dry_run else result.skipped_images:
        say(f"[yellow]skipped[/] {s['key']}: {s['error']}")


CACHE_HELP = ("Cache folder, or its URL (http(s)://, s3://, gs://, ... through fsspec; or 'pipe:COMMAND' with "
              "{path} where the command takes each file's path): remote shards stream, checked as they arrive.")


@app.command()
def inspect(cache: str = typer.Argument(..., help=CACHE_HELP)) -> None:
    """Print what a cache holds: base model, targets, views, codec, counts, bytes and field statistics."""
    from tec_cache.format.manifest import ManifestError, Stats, load_manifest
    from tec_cache.format.remote import is_remote

    if not is_remote(cache) and not Path(cache).is_dir():
        _fail(f"CACHE: no such cache folder {cache} (expected the --out folder of tec-cache build)")
    try:
        man = load_manifest(cache)
    except ManifestError as e:
        _fail(str(e))
    out = log_console(stderr=False, markup=False)  # manifest strings are data: a "[/]" in one must print, not parse
    t = Table(title=f"cache {cache}")
    t.add_column("section")
    t.add_column("value")
    bm, tg = man.base_model, man.targets
    t.add_row("base model", f"{bm.name} ({bm.arch}, D={bm.embed_dim}, H={bm.num_heads}, depth {bm.depth})")
    t.add_row("checkpoint", f"{bm.extra.get('checkpoint')} sha256 {bm.sha256[:16]}...")
    t.add_row("targets", f"L={tg.num_patches} grid {list(tg.grid)}, top-k {tg.topk}, last_layers {tg.last_layers}, tau {tg.tau}")
    rc = man.views.recipe
    t.add_row("views", f"K={man.views.count} view-epochs, seed {man.views.seed}, {rc.size} px, scale {list(rc.scale)}, "
              f"resize {rc.resize}, jpeg q{rc.jpeg_quality}")
    t.add_row("codec", f"{man.codec.name}: " + ", ".join(f"{k} {v.dtype}{list(v.shape)}{'' if v.compress else ' (stored raw)'}"
                                                      for k, v in man.codec.fields.items()))
    t.add_row("format", f"{man.format.name}, {man.format.compressor}, {man.format.shard_size} views/shard")
    src = man.source
    t.add_row("source", f"{src.path} ({src.kind}): {src.num_images} images, {len(src.classes or ())} classes, {len(src.skipped or ())} skipped")
    st = man.stats or Stats()
    total_views = "?" if st.total_views is None else st.total_views
    t.add_row("shards", f"{len(man.shards())} shards, {total_views} views, {size(st.total_bytes or 0)}")
    t.add_row("bytes per view", size(st.bytes_per_view or 0))
    b = st.build or {}
    t.add_row("last build", f"{b.get('seconds')} s, {b.get('views_per_s')} views/s, world size {b.get('world_size')}, {b.get('device')}")
    out.print(t)
    fs = Table(title="target statistics (float, before the codec)")
    for col in ("field", "count", "mean", "std", "min", "max"):
        fs.add_column(col, justify="right")
    for name, s in (st.fields or {}).items():
        fs.add_row(name, str(s.count), f"{s.mean:.4g}", f"{s.std:.4g}", f"{s.min:.4g}", f"{s.max:.4g}")
    out.print(fs)
    ve = Table(title="view-epochs")
    for col in ("view-epoch", "shards", "views"):
        ve.add_column(col, justify="right")
    for v in man.view_epochs:
        ve.add_row(str(v.index), str(len(v.shards)), str(v.num_samples))
    out.print(ve)


@app.command()
def verify(cache: str = typer.Argument(..., help=CACHE_HELP)) -> None:
    """Check every shard against its checksum, size, count and schema; exit 1 naming each bad shard."""
    from tec_cache.build.verify import verify_cache
    from tec_cache.format.manifest import ManifestError
    from tec_cache.format.remote import is_remote

    if not is_remote(cache) and not Path(cache).is_dir():  # a usage error (2); a folder that is not a sound cache is a failed check (1)
        _fail(f"CACHE: no such cache folder {cache} (expected the --out folder of tec-cache build)")
    try:
        problems = verify_cache(cache)
    except ManifestError as e:
        _fail(str(e), 1)
    if problems:
        for p in problems:
            console.print(f"[bold red]BAD[/] {escape(str(p))}")
        console.print(f"[bold red]{len(problems)} bad shard(s)[/] in {escape(str(cache))}")
        raise typer.Exit(1)
    log_console(stderr=False).print(f"[green]ok[/]: every shard of {escape(str(cache))} matches its checksum and schema")


@app.command()
def show(
    cache: str = typer.Argument(..., help=CACHE_HELP),
    out: Path = typer.Option(Path("views.png"), "--out", help="PNG file to write (its folder is created)."),
    n: int = typer.Option(8, "--n", help="Views to draw, one row each."),
    view_epoch: int = typer.Option(0, "--view-epoch", help="Which cached view-epoch to draw from."),
    head: str = typer.Option("mean", "--head", help="mean (average the heads' target distributions) | a head number."),
    seed: int | None = typer.Option(None, "--seed", help="Draw a seeded random sample of views instead of the first n."),
    feat_norm: bool = typer.Option(True, "--feat-norm/--no-feat-norm", help="Add a column with the feature target's norm per patch."),
) -> None:
    """Draw cached views with their targets: top-k patches, cls-row and top-k-row attention targets, feature norms."""
    from tec_cache.build.show import render_views
    from tec_cache.format import ShardError

    try:
        path = render_views(cache, out, n, view_epoch=view_epoch, head=head, seed=seed, feat_norm=feat_norm)
    except ShardError as e:  # a damaged shard is a data problem, not a usage one (as in verify)
        _fail(f"{e}; run `tec-cache verify {cache}`", 1)
    except ValueError as e:  # messages start with the option they concern
        _fail(str(e))
    log_console(stderr=False).print(f"wrote {path}", highlight=False)


def main() -> None:
    app(prog_name="tec-cache")


if __name__ == "__main__":
    main()

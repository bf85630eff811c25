"""`tec-cache`: the stage-1 command line (build, inspect, verify, show).

Data flow: options --> BuildConfig --> build.build_cache (progress bar, summary table) or
manifest --> inspect table / verify report. Only rank 0 prints under torchrun.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tec_cache.dist import dist_info
from tec_cache.run_log import BUILD_LOG, SampleError, failure_line, from_worker

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Stage 1 of TEC: cache a frozen base model's targets.")
console = Console(stderr=True, soft_wrap=True)  # errors stay on one greppable line


def _fail(msg: str, code: int = 2) -> None:
    # Messages quote paths, keys and TOML tables like [cache]: never read them as rich markup.
    console.print(f"[bold red]error:[/] {escape(msg)}", markup=True, highlight=False)
    raise typer.Exit(code)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000.0
    return str(n)


# Defaults of the build options that a preset may set (the flags themselves default to None, so
# that a flag given on the command line can be told apart from one left to the preset).
BUILD_DEFAULTS = {"views": 1, "codec": "int8", "fmt": "webdataset", "compressor": "zstd:3", "shard_size": 256, "seed": 0,
                  "batch_size": 64, "num_workers": 4, "device": "auto", "jpeg_quality": 95}
_PRESET_KEYS = {"basemodel", "checkpoint", "arch", "img_size", "patch_size", "depth", "topk", "last_layers", "tau",
                "views", "codec", "format", "compressor", "shard_size", "seed", "batch_size", "num_workers", "device",
                "jpeg_quality", "cache_name", "data"}


def _build_options(options: dict) -> dict:
    """The build's options: defaults, then the --pipeline preset's [cache] table, then the flags given."""
    from tec_cache.presets import load_pipeline, merge_options

    given = {k: v for k, v in options.items() if k != "pipeline"}
    merged = {**BUILD_DEFAULTS}
    if options["pipeline"] is not None:
        pipe = load_pipeline(options["pipeline"])
        preset = merge_options(pipe.section("cache"), {}, _PRESET_KEYS, f"{pipe.path} [cache]")
        if "format" in preset:
            preset["fmt"] = preset.pop("format")
        cache_name = preset.pop("cache_name", None)
        for key in ("checkpoint", "data"):
            if key in preset:
                preset[key] = Path(preset[key])
        merged.update(preset)
        if given["out"] is None and cache_name:
            merged["out"] = Path("caches") / cache_name
    # Every option ends up as a key: the flag given, else the preset's or default value, else None.
    merged = {**given, **{k: v for k, v in merged.items() if given.get(k) is None}}
    if merged["out"] is None:
        raise ValueError("--out is required: the cache folder to create (or a --pipeline whose preset names a cache_name)")
    return merged


@app.command()
def build(
    out: Optional[Path] = typer.Option(None, "--out", help="Cache folder (created; re-running resumes or extends it). With --pipeline, defaults to caches/<the preset's cache_name>."),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", help="Preset name (see `tec-train pipelines`) or .toml file: its [cache] table gives the defaults; flags override them."),
    data: Optional[Path] = typer.Option(None, "--data", help="ImageNet-style folder or folder of WebDataset .tar shards."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Local base-model weights (MAE, iBOT, DINO, state dict, .safetensors)."),
    basemodel: Optional[str] = typer.Option(None, "--basemodel", help="mae1kbase | mae1k300ep | ibot1kbase | mae1klarge"),
    arch: Optional[str] = typer.Option(None, "--arch", help="Any timm ViT name; overrides the base model's architecture."),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="View size in pixels (default 224)."),
    patch_size: Optional[int] = typer.Option(None, "--patch-size", help="Patch size (default from the arch)."),
    depth: Optional[int] = typer.Option(None, "--depth", help="Block count, when the checkpoint's ViT is shallower than the arch's."),
    topk: Optional[int] = typer.Option(None, "--topk", help="Top-k patch rows of the attention target."),
    last_layers: Optional[int] = typer.Option(None, "--last-layers", help="Blocks averaged into the feature target."),
    tau: Optional[float] = typer.Option(None, "--tau", help="Attention-target temperature recorded for stage 2."),
    views: Optional[int] = typer.Option(None, "--views", help="View-epochs K to hold (a larger K later adds only the missing ones) (default: 1)."),
    codec: Optional[str] = typer.Option(None, "--codec", help="fp16 (reference precision) | int8 (half the bytes) (default: int8)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="webdataset | zarr (default: webdataset)."),
    compressor: Optional[str] = typer.Option(None, "--compressor", help="zstd:LEVEL | none (default: zstd:3)."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Views per shard (default: 256)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the view augmentations (default: 0)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Views per base-model forward (default: 64)."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Decode/crop worker processes (default: 4)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (default: auto)."),
    jpeg_quality: Optional[int] = typer.Option(None, "--jpeg-quality", help="Quality of the stored view JPEGs (default: 95)."),
    strict: bool = typer.Option(False, "--strict", help="Fail on the first unreadable image instead of skipping it."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the size estimate and write nothing."),
) -> None:
    """Run the base model over K augmented views of every image and write its targets to shards."""
    options = dict(locals())  # first statement: exactly the options
    from tec_cache.basemodels import resolve_spec
    from tec_cache.build import BuildConfig, BuildOptionError, build_cache

    info = dist_info()
    say = console.print if info.is_main else (lambda *a, **k: None)
    try:
        o = _build_options(options)
    except ValueError as e:
        _fail(str(e))
    out, data, checkpoint = o["out"], o["data"], o["checkpoint"]
    if data is None:
        _fail("--data is required: an image folder or a folder of .tar shards")
    if checkpoint is None:
        _fail("--checkpoint is required: the base model's weights are never downloaded")
    try:
        spec = resolve_spec(o["basemodel"], arch=o["arch"], img_size=o["img_size"], patch_size=o["patch_size"], topk=o["topk"],
                            tau=o["tau"], last_layers=o["last_layers"], depth=o["depth"])
        cfg = BuildConfig(data=data, out=out, checkpoint=checkpoint, spec=spec, views=o["views"], codec=o["codec"],
                          format=o["fmt"], compressor=o["compressor"], shard_size=o["shard_size"], seed=o["seed"],
                          batch_size=o["batch_size"], num_workers=o["num_workers"], device=o["device"], strict=strict,
                          dry_run=dry_run, jpeg_quality=o["jpeg_quality"])
        cfg.validate()
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    progress = Progress(TextColumn("[bold]building"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not info.is_main or dry_run)
    task = progress.add_task("views", total=None, rate="")
    t0 = time.time()
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        progress.update(task, advance=n, rate=f"{done[0] / max(time.time() - t0, 1e-9):.1f} views/s")

    try:
        with progress:
            result = build_cache(cfg, log=say, progress=advance, set_total=lambda n: progress.update(task, total=n))
    except BuildOptionError as e:  # found before any work: a usage error
        _fail(str(e))
    except Exception as e:  # noqa: BLE001
        if isinstance(e, (ValueError, FileNotFoundError, OSError, RuntimeError)) and not isinstance(e, SampleError) \
                and not from_worker(e):
            _fail(str(e), 1)  # the project's own errors name the file and what to do
        # A view that could not be cut, a worker's exception, or an unexpected one: one line here,
        # the traceback in the cache folder's log.
        _fail(failure_line(e, out / BUILD_LOG, rank=info.rank,
                           resume="re-running the same command keeps the finished shards and builds the rest"), 1)
    est = result.estimate
    if dry_run:
        if not est.get("views"):
            say("nothing to do: every shard of this cache is complete")
            return
        t = Table(title="dry run: size estimate (nothing written)")
        for col in ("bytes/view", "views to build", "bytes needed", "bytes free"):
            t.add_column(col, justify="right")
        t.add_row(_human(est["bytes_per_view"] or 0), str(est["views"]), _human(est.get("bytes_needed", 0)), _human(est.get("bytes_free", 0)))
        say(t)
        return
    t = Table(title=f"tec-cache build: {out}")
    t.add_column("item")
    t.add_column("value", justify="right")
    rows = [
        ("views built (this rank)", str(result.views_built)),
        ("shards written (this rank)", str(result.shards_built)),
        ("shards already complete", str(result.shards_skipped)),
        ("unreadable images skipped", str(len(result.skipped_images))),
        ("bytes per view", _human(result.bytes_per_view)),
        ("seconds", f"{result.seconds:.1f}"),
        ("views/s", f"{result.views_built / max(result.seconds, 1e-9):.1f}"),
        ("manifest", str(result.manifest_path)),
    ]
    for r in rows:
        t.add_row(*r)
    say(t)
    for s in result.skipped_images:
        say(f"[yellow]skipped[/] {s['key']}: {s['error']}")


@app.command()
def inspect(cache: Path = typer.Argument(..., help="Cache folder.")) -> None:
    """Print what a cache holds: base model, targets, views, codec, counts, bytes and field statistics."""
    from tec_cache.format.manifest import ManifestError, Stats, load_manifest

    if not cache.is_dir():
        _fail(f"CACHE: no such cache folder {cache} (expected the --out folder of tec-cache build)")
    try:
        man = load_manifest(cache)
    except ManifestError as e:
        _fail(str(e))
    out = Console(markup=False)  # manifest strings are data: a "[/]" in one must print, not parse
    t = Table(title=f"cache {cache}")
    t.add_column("section")
    t.add_column("value")
    bm, tg = man.base_model, man.targets
    t.add_row("base model", f"{bm.name} ({bm.arch}, D={bm.embed_dim}, H={bm.num_heads}, depth {bm.depth})")
    t.add_row("checkpoint", f"{bm.extra.get('checkpoint')} sha256 {bm.sha256[:16]}...")
    t.add_row("targets", f"L={tg.num_patches} grid {list(tg.grid)}, top-k {tg.topk}, last_layers {tg.last_layers}, tau {tg.tau}")
    rc = man.views.recipe
    t.add_row("views", f"K={man.views.count} view-epochs, seed {man.views.seed}, {rc.size} px, scale {list(rc.scale)}, jpeg q{rc.jpeg_quality}")
    t.add_row("codec", f"{man.codec.name}: " + ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in man.codec.fields.items()))
    t.add_row("format", f"{man.format.name}, {man.format.compressor}, {man.format.shard_size} views/shard")
    src = man.source
    t.add_row("source", f"{src.path} ({src.kind}): {src.num_images} images, {len(src.classes or ())} classes, {len(src.skipped or ())} skipped")
    st = man.stats or Stats()
    total_views = "?" if st.total_views is None else st.total_views
    t.add_row("shards", f"{len(man.shards())} shards, {total_views} views, {_human(st.total_bytes or 0)}")
    t.add_row("bytes per view", _human(st.bytes_per_view or 0))
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
def verify(cache: Path = typer.Argument(..., help="Cache folder.")) -> None:
    """Check every shard against its checksum, size, count and schema; exit 1 naming each bad shard."""
    from tec_cache.format.manifest import ManifestError
    from tec_cache.verify import verify_cache

    if not cache.is_dir():  # a usage error (2); a folder that is not a sound cache is a failed check (1)
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
    Console().print(f"[green]ok[/]: every shard of {escape(str(cache))} matches its checksum and schema")


@app.command()
def show(
    cache: Path = typer.Argument(..., help="Cache folder."),
    out: Path = typer.Option(Path("views.png"), "--out", help="PNG file to write (its folder is created)."),
    n: int = typer.Option(8, "--n", help="Views to draw, one row each."),
    view_epoch: int = typer.Option(0, "--view-epoch", help="Which cached view-epoch to draw from."),
    head: str = typer.Option("mean", "--head", help="mean (average the heads' target distributions) | a head number."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Draw a seeded random sample of views instead of the first n."),
    feat_norm: bool = typer.Option(True, "--feat-norm/--no-feat-norm", help="Add a column with the feature target's norm per patch."),
) -> None:
    """Draw cached views with their targets: top-k patches, cls-row and top-k-row attention targets, feature norms."""
    from tec_cache.format import ShardError
    from tec_cache.show import render_views

    try:
        path = render_views(cache, out, n, view_epoch=view_epoch, head=head, seed=seed, feat_norm=feat_norm)
    except ShardError as e:  # a damaged shard is a data problem, not a usage one (as in verify)
        _fail(f"{e}; run `tec-cache verify {cache}`", 1)
    except ValueError as e:  # messages start with the option they concern
        _fail(str(e))
    Console().print(f"wrote {path}", highlight=False)


def main() -> None:
    app(prog_name="tec-cache")


if __name__ == "__main__":
    sys.exit(main())

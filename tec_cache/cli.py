"""`tec-cache`: the stage-1 command line (build, inspect, verify).

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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tec_cache.dist import dist_info

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Stage 1 of TEC: cache a frozen base model's targets.")
console = Console(stderr=True, soft_wrap=True)  # errors stay on one greppable line


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000.0
    return str(n)


@app.command()
def build(
    out: Path = typer.Option(..., "--out", help="Cache folder (created; re-running resumes or extends it)."),
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
    views: int = typer.Option(1, "--views", help="View-epochs K to hold (a larger K later adds only the missing ones)."),
    codec: str = typer.Option("int8", "--codec", help="fp16 (reference precision) | int8 (half the bytes)."),
    fmt: str = typer.Option("webdataset", "--format", help="webdataset | zarr"),
    compressor: str = typer.Option("zstd:3", "--compressor", help="zstd:LEVEL | none"),
    shard_size: int = typer.Option(256, "--shard-size", help="Views per shard."),
    seed: int = typer.Option(0, "--seed", help="Seed of the view augmentations."),
    batch_size: int = typer.Option(64, "--batch-size", help="Views per base-model forward."),
    num_workers: int = typer.Option(4, "--num-workers", help="Decode/crop worker processes."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    jpeg_quality: int = typer.Option(95, "--jpeg-quality", help="Quality of the stored view JPEGs."),
    strict: bool = typer.Option(False, "--strict", help="Fail on the first unreadable image instead of skipping it."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the size estimate and write nothing."),
) -> None:
    """Run the base model over K augmented views of every image and write its targets to shards."""
    from tec_cache.basemodels import resolve_spec
    from tec_cache.build import BuildConfig, build_cache

    info = dist_info()
    say = console.print if info.is_main else (lambda *a, **k: None)
    if data is None:
        _fail("--data is required: an image folder or a folder of .tar shards")
    if checkpoint is None:
        _fail("--checkpoint is required: the base model's weights are never downloaded")
    try:
        spec = resolve_spec(basemodel, arch=arch, img_size=img_size, patch_size=patch_size, topk=topk, tau=tau,
                            last_layers=last_layers, depth=depth)
        cfg = BuildConfig(data=data, out=out, checkpoint=checkpoint, spec=spec, views=views, codec=codec, format=fmt,
                          compressor=compressor, shard_size=shard_size, seed=seed, batch_size=batch_size,
                          num_workers=num_workers, device=device, strict=strict, dry_run=dry_run, jpeg_quality=jpeg_quality)
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
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        _fail(str(e), 1)
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
    from tec_cache.manifest import ManifestError, load_manifest

    try:
        man = load_manifest(cache)
    except ManifestError as e:
        _fail(str(e))
    raw = man.raw
    out = Console()
    t = Table(title=f"cache {cache}")
    t.add_column("section")
    t.add_column("value")
    bm, tg = raw["base_model"], raw["targets"]
    t.add_row("base model", f"{bm['name']} ({bm['arch']}, D={bm['embed_dim']}, H={bm['num_heads']}, depth {bm['depth']})")
    t.add_row("checkpoint", f"{bm.get('checkpoint')} sha256 {bm['sha256'][:16]}...")
    t.add_row("targets", f"L={tg['num_patches']} grid {tg['grid']}, top-k {tg['topk']}, last_layers {tg['last_layers']}, tau {tg['tau']}")
    rc = raw["views"]["recipe"]
    t.add_row("views", f"K={raw['views']['count']} view-epochs, seed {raw['views']['seed']}, {rc['size']} px, scale {rc['scale']}, jpeg q{rc['jpeg_quality']}")
    t.add_row("codec", f"{raw['codec']['name']}: " + ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in raw["codec"]["fields"].items()))
    t.add_row("format", f"{raw['format']['name']}, {raw['format']['compressor']}, {raw['format']['shard_size']} views/shard")
    src = raw["source"]
    t.add_row("source", f"{src['path']} ({src['kind']}): {src['num_images']} images, {len(src.get('classes', []))} classes, {len(src.get('skipped', []))} skipped")
    st = raw.get("stats", {})
    t.add_row("shards", f"{len(man.shards())} shards, {st.get('total_views', '?')} views, {_human(st.get('total_bytes', 0))}")
    t.add_row("bytes per view", _human(st.get("bytes_per_view", 0)))
    b = st.get("build", {})
    t.add_row("last build", f"{b.get('seconds')} s, {b.get('views_per_s')} views/s, world size {b.get('world_size')}, {b.get('device')}")
    out.print(t)
    fs = Table(title="target statistics (float, before the codec)")
    for col in ("field", "count", "mean", "std", "min", "max"):
        fs.add_column(col, justify="right")
    for name, s in st.get("fields", {}).items():
        fs.add_row(name, str(s["count"]), f"{s['mean']:.4g}", f"{s['std']:.4g}", f"{s['min']:.4g}", f"{s['max']:.4g}")
    out.print(fs)
    ve = Table(title="view-epochs")
    for col in ("view-epoch", "shards", "views"):
        ve.add_column(col, justify="right")
    for v in raw["view_epochs"]:
        ve.add_row(str(v["index"]), str(len(v["shards"])), str(v["num_samples"]))
    out.print(ve)


@app.command()
def verify(cache: Path = typer.Argument(..., help="Cache folder.")) -> None:
    """Check every shard against its checksum, size, count and schema; exit 1 naming each bad shard."""
    from tec_cache.manifest import ManifestError
    from tec_cache.verify import verify_cache

    try:
        problems = verify_cache(cache)
    except ManifestError as e:
        _fail(str(e), 1)
    if problems:
        for p in problems:
            console.print(f"[bold red]BAD[/] {p}")
        console.print(f"[bold red]{len(problems)} bad shard(s)[/] in {cache}")
        raise typer.Exit(1)
    Console().print(f"[green]ok[/]: every shard of {cache} matches its checksum and schema")


def main() -> None:
    app(prog_name="tec-cache")


if __name__ == "__main__":
    sys.exit(main())

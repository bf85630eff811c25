"""`tec-train`: the stage-2 command line (run, export, plot).

Data flow: options (+ the run dir's stored config when resuming) --> TrainConfig --> train.Trainer
(rich progress and a summary table on rank 0) --> checkpoints --> export --> a plain timm ViT.
Every option is checked before any model is built or any data is read; a bad value exits with
code 2 and a message naming the option, a failure during training with code 1.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tec_cache.runtime.config import help_for
from tec_cache.runtime.dist import dist_info
from tec_cache.runtime.plain_log import PlainProgress, log_console
from tec_cache.runtime.run_log import RUN_LOG, SampleError, failure_line, from_worker
from tec_cache.runtime.version import version_callback

from .harness.reporting import Reporter

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Stage 2 of TEC: train a student from cached (or online) base-model targets, and export it.")
# Errors stay on one greppable line; where no terminal is, tables and paths print at full width.
console = log_console()


@app.callback()
def _main(version: bool | None = typer.Option(None, "--version", callback=version_callback("tec-train"), is_eager=True,
                                                 help="Print the installed version and exit.")) -> None:
    """Stage 2 of TEC: train a student from cached (or online) base-model targets, and export it."""


def _fail(msg: str, code: int = 2) -> None:
    # Messages quote paths, keys and TOML tables like [cache]: never read them as rich markup.
    console.print(f"[bold red]error:[/] {escape(msg)}", markup=True, highlight=False)
    raise typer.Exit(code)


def _note(text: str) -> None:
    console.print(text, highlight=False)


def _run_failure(e: Exception, run_dir: Path, rank: int, known: tuple[type[Exception], ...]) -> str:
    """The terminal line of a run that failed after it started. The project's own errors name what
    is wrong in their message; a sample that could not be made, a data-loader worker's exception or
    an unexpected one gets a one-line summary, its traceback goes to the run's log file."""
    if isinstance(e, known) and not isinstance(e, SampleError) and not from_worker(e):
        return f"{type(e).__name__}: {e}"
    return failure_line(e, run_dir / RUN_LOG, rank=rank,
                        resume="re-running the same command resumes from the last checkpoint")


def _run_summary(summary: dict[str, Any]) -> str:
    s = summary["student"]
    return (f"student {s['model']} (depth {s['depth']}, {s['trainable_params']:,} trainable params) on "
            f"{summary['targets']['origin'].get('kind')} targets; effective batch {summary['eff_batch']}, lr {summary['lr']:.3g}, "
            f"{summary['optimizer_steps_per_epoch']} steps/epoch, amp {summary['amp']}")


def _finetune_summary(summary: dict[str, Any]) -> str:
    enc, data = summary["encoder"], summary["data"]
    return (f"encoder {enc['kind']} {enc['model_name']} (depth {enc['depth']}, width {enc['embed_dim']}, img {summary['img_size']}) "
            f"on {data['kind']} ({data['train_images']} train / {data['val_images']} val images, {data['num_classes']} classes); "
            f"effective batch {summary['eff_batch']}, lr {summary['lr']:.3g}, {summary['optimizer_steps_per_epoch']} steps/epoch, "
            f"amp {summary['amp']}")


def _line_fields(record: dict[str, Any], skip: tuple[str, ...] = ("step", "time", "epoch_f")) -> dict[str, Any]:
    """A record's fields for a log line, in its own order; the data wait as a percentage."""
    out: dict[str, Any] = {}
    for k, v in record.items():
        if k in skip or isinstance(v, (list, dict)):
            continue
        out["data_wait" if k == "data_wait_fraction" else k] = f"{v:.1%}" if k == "data_wait_fraction" else v
    return out


class PlainReporter(Reporter):
    """Where output is not a terminal (a job's log file): the summary, then one whole line per
    metrics record (every --log-every steps) with the loss terms, lr, rate, data wait, elapsed time
    and ETA; notices as their own lines. Implements harness.Reporter for ``tec-train run``."""

    def __init__(self, out: Console) -> None:
        self.out = out
        self.lines = PlainProgress(out, "step")

    def summary(self, summary: dict[str, Any]) -> str:
        return _run_summary(summary)

    def start(self, *, total: int, done: int, summary: dict[str, Any]) -> None:
        self.out.print(self.summary(summary), markup=False, highlight=False)
        self.lines.start(total, done)

    def record(self, record: dict[str, Any]) -> None:
        self.lines.line(record["step"], _line_fields(record))

    def message(self, text: str) -> None:
        self.out.print(text, markup=False, highlight=False)


class PlainFinetuneReporter(PlainReporter):
    """``tec-train finetune`` where output is not a terminal: a line every --log-every optimizer steps
    (running loss of the epoch, lr, rate, data wait), and one per epoch with its evaluation."""

    def __init__(self, out: Console) -> None:
        super().__init__(out)
        self.done = 0

    def summary(self, summary: dict[str, Any]) -> str:
        return _finetune_summary(summary)

    def _position(self, done: int, step: int) -> str:
        # Progress counts micro-batches; the line counts optimizer steps (done = step x accum-iter).
        total = self.lines.total
        return f"step {step}/{'?' if total is None or step <= 0 else total // (done // step)}"

    def advance(self, done: int) -> None:
        self.done = done

    def status(self, done: int, stats: dict[str, Any]) -> None:
        self.lines.line(done, _line_fields(stats), self._position(done, stats["step"]))

    def record(self, record: dict[str, Any]) -> None:
        # Comes right after the epoch's last micro-batch was counted by advance().
        self.lines.line(self.done, _line_fields(record), self._position(self.done, record["step"]))


class RichReporter(Reporter):
    """Progress bar over optimizer steps with the latest losses and throughput; rank 0 only (the trainer
    sees to that). Implements harness.Reporter."""

    def __init__(self, out: Console) -> None:
        self.out = out
        self.progress = Progress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=out,
        )
        self.task = self.progress.add_task("steps", total=None, stats="")

    def start(self, *, total: int, done: int, summary: dict[str, Any]) -> None:
        self.out.print(_run_summary(summary), highlight=False)
        self.progress.update(self.task, total=total, completed=done)
        self.progress.start()

    def advance(self, done: int) -> None:
        self.progress.update(self.task, completed=done)

    def record(self, record: dict[str, Any]) -> None:
        stats = f"loss {record['loss']:.4f} "
        if "loss_fea" in record:
            stats += f"(fea {record['loss_fea']:.4f}, att {record['loss_att']:.4f}) "
        stats += f"lr {record['lr']:.2e} {record['images_per_s']:.1f} img/s wait {record['data_wait_fraction']:.0%}"
        self.progress.update(self.task, stats=stats)

    def message(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)

    def finish(self) -> None:
        self.progress.stop()


@app.command()
def pipelines(
    name: str | None = typer.Argument(None, metavar="[NAME]", help="A pipeline (name or .toml file) to print fully resolved: every value of its row, defaults included."),
) -> None:
    """List the pipelines --pipeline takes (one per row of the paper's table, plus CPU-sized ones), or print one resolved."""
    from tec_cache.runtime.pipelines import PipelineError, list_pipelines, load_pipeline, search_dirs

    from .pipeline_tables import resolved_tables

    if name is not None:
        try:
            pipe = load_pipeline(name)
            tables = resolved_tables(pipe)
        except ValueError as e:  # PipelineError, or a recipe the registry refuses
            _fail(str(e))
        out = Console(width=max(Console().width, 100), markup=False)
        top = {k: v for k, v in pipe.raw.items() if not isinstance(v, dict)}
        out.print(f"pipeline {pipe.name} ({pipe.path}): " + ", ".join(f"{k} = {v}" for k, v in top.items()), highlight=False)
        for table, values in tables.items():
            t = Table(title=f"[{table}]")
            t.add_column("option")
            t.add_column("value")
            t.add_column("set by")
            for key, value in values.items():
                origin = pipe.origin.get((table, key))
                t.add_row(key, "-" if value is None else str(value), str(origin.name) if origin else "default")
            out.print(t)
        return
    try:
        found = list_pipelines()
    except PipelineError as e:
        _fail(str(e))
    if not found:
        _fail(f"no pipelines found in {[str(d) for d in search_dirs()] or 'any pipelines/ folder'}")
    rows = [p.summary() for p in found]
    t = Table(title="pipelines (tec-cache build, tec-train run / finetune / knn / linear --pipeline NAME)",
              caption="from " + ", ".join(sorted({str(p.path.parent) for p in found})) + "; `tec-train pipelines NAME` prints one resolved")
    for col in rows[0]:
        t.add_column(col, no_wrap=col == "name")
    for r in rows:
        t.add_row(*r.values())
    Console(width=max(Console().width, 120)).print(t)


def _th(name: str) -> str:
    from .train_config import TrainConfig

    return help_for(TrainConfig, name)


def _fh(name: str) -> str:
    from .finetune_config import FinetuneConfig

    return help_for(FinetuneConfig, name)


@app.command()
def run(
    run_dir: Path = typer.Option(..., "--run-dir", help=_th("run_dir")),
    pipeline: str | None = typer.Option(None, "--pipeline", help="Pipeline name (see `tec-train pipelines`) or .toml file: its pretrain table (base with --objective mae) gives the defaults; flags override them. --cache defaults to caches/<the pipeline's cache_name>."),
    objective: str | None = typer.Option(None, "--objective", help=_th("objective")),
    cache: str | None = typer.Option(None, "--cache", help=_th("cache")),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help=_th("cache_dir")),
    online: bool = typer.Option(False, "--online", help="Online mode with the --pipeline's target recipe (its cache table, as tec-cache build takes it): the base model runs inside the step; give --data (and --checkpoint unless the base model is fetched by name)."),
    online_basemodel: str | None = typer.Option(None, "--online-basemodel", help=_th("online_basemodel")),
    checkpoint: str | None = typer.Option(None, "--checkpoint", help=_th("checkpoint")),
    checkpoint_sha256: str | None = typer.Option(None, "--checkpoint-sha256", help=_th("checkpoint_sha256")),
    data: str | None = typer.Option(None, "--data", help=_th("data")),
    arch: str | None = typer.Option(None, "--arch", help=_th("arch")),
    topk: int | None = typer.Option(None, "--topk", help=_th("topk")),
    tau: float | None = typer.Option(None, "--tau", help=_th("tau")),
    last_layers: int | None = typer.Option(None, "--last-layers", help=_th("last_layers")),
    base_depth: int | None = typer.Option(None, "--base-depth", help=_th("base_depth")),
    resize: str | None = typer.Option(None, "--resize", help=_th("resize")),
    model: str | None = typer.Option(None, "--model", help=_th("model")),
    depth: int | None = typer.Option(None, "--depth", help=_th("depth")),
    img_size: int | None = typer.Option(None, "--img-size", help=_th("img_size")),
    patch_size: int | None = typer.Option(None, "--patch-size", help=_th("patch_size")),
    mask_ratio: float | None = typer.Option(None, "--mask-ratio", help=_th("mask_ratio")),
    init_from: Path | None = typer.Option(None, "--init-from", help=_th("init_from")),
    epochs: int | None = typer.Option(None, "--epochs", help=_th("epochs")),
    warmup_epochs: float | None = typer.Option(None, "--warmup-epochs", help=_th("warmup_epochs")),
    batch_size: int | None = typer.Option(None, "--batch-size", help=_th("batch_size")),
    accum_iter: int | None = typer.Option(None, "--accum-iter", help=_th("accum_iter")),
    blr: float | None = typer.Option(None, "--blr", help=_th("blr")),
    lr: float | None = typer.Option(None, "--lr", help=_th("lr")),
    min_lr: float | None = typer.Option(None, "--min-lr", help=_th("min_lr")),
    weight_decay: float | None = typer.Option(None, "--weight-decay", help=_th("weight_decay")),
    clip_grad: float | None = typer.Option(None, "--clip-grad", help=_th("clip_grad")),
    seed: int | None = typer.Option(None, "--seed", help=_th("seed")),
    num_workers: int | None = typer.Option(None, "--num-workers", help=_th("num_workers")),
    view_order: str | None = typer.Option(None, "--view-order", help=_th("view_order")),
    view_epochs: int | None = typer.Option(None, "--view-epochs", help=_th("view_epochs")),
    val_cache: str | None = typer.Option(None, "--val-cache", help=_th("val_cache")),
    val_every: int | None = typer.Option(None, "--val-every", help=_th("val_every")),
    ckpt_every: int | None = typer.Option(None, "--ckpt-every", help=_th("ckpt_every")),
    keep_last: int | None = typer.Option(None, "--keep-last", help=_th("keep_last")),
    log_every: int | None = typer.Option(None, "--log-every", help=_th("log_every")),
    max_steps: int | None = typer.Option(None, "--max-steps", help=_th("max_steps")),
    device: str | None = typer.Option(None, "--device", help=_th("device")),
    amp: str | None = typer.Option(None, "--amp", help=_th("amp")),
    compile: bool | None = typer.Option(None, "--compile/--no-compile", help=_th("compile")),
    log_samples: bool | None = typer.Option(None, "--log-samples/--no-log-samples", help=_th("log_samples")),
    tensorboard: bool | None = typer.Option(None, "--tensorboard/--no-tensorboard", help=_th("tensorboard")),
    wandb: str | None = typer.Option(None, "--wandb", metavar="PROJECT", help=_th("wandb")),
) -> None:
    """Train a TEC student from a cache (or online), or resume the run in --run-dir."""
    options = dict(locals())  # first statement: exactly the options
    from .harness.errors import NonFiniteLossError
    from .options import run_config
    from .train import Trainer

    info = dist_info()
    flags = {k: v for k, v in options.items() if k not in ("run_dir", "pipeline", "online")}
    try:
        cfg = run_config(str(run_dir), flags, pipeline, online=online, world_size=info.world_size, say=_note)
        trainer = Trainer(cfg, None, RichReporter(console) if console.is_terminal else PlainReporter(console))
    except (ValueError, FileNotFoundError) as e:  # CompatibilityError and ResumeError are ValueErrors
        _fail(str(e), 2)
    try:
        result = trainer.run()
    except NonFiniteLossError as e:
        _fail(str(e), 1)
    except Exception as e:  # noqa: BLE001 - ValueError: ResumeError, ShardError (a shard failing its checksum)
        _fail(_run_failure(e, run_dir, info.rank, (ValueError, RuntimeError, OSError)), 1)
    if not info.is_main:
        return
    t = Table(title=f"tec-train run: {run_dir}")
    t.add_column("item")
    t.add_column("value", justify="right")
    rec = result.last_record or {}
    rows = [
        ("steps this run", str(result.steps_run)),
        ("global step / epoch", f"{result.global_step} / {result.epoch}"),
        ("loss (fea + att)" if "loss_fea" in rec else "loss", "-" if not rec else
         f"{rec['loss']:.5f} ({rec['loss_fea']:.5f} + {rec['loss_att']:.5f})" if "loss_fea" in rec else f"{rec['loss']:.5f}"),
        ("images/s", f"{result.images_per_s:.1f}"),
        ("data wait", f"{result.data_wait_fraction:.1%}"),
        ("seconds in steps", f"{result.seconds:.1f}"),
        ("checkpoint", str(result.checkpoint)),
        ("resumed from", str(result.resumed_from) if result.resumed_from else "-"),
    ]
    for r in rows:
        t.add_row(*r)
    console.print(t)


@app.command()
def export(
    source: Path = typer.Argument(..., metavar="RUN_OR_CKPT", help="A run dir (its latest checkpoint), a tec-train checkpoint, or a reference TEC checkpoint {'model': ...}."),
    out: Path = typer.Option(..., "--out", help="Folder for model.safetensors, model.pth and config.json."),
    model: str | None = typer.Option(None, "--model", help="Student size of a reference checkpoint, e.g. vit_base_patch16 (ours record it)."),
) -> None:
    """Write a plain timm ViT (cls MLP folded into cls_token) that timm.create_model loads strictly."""
    from .export import export_encoder

    try:
        paths = export_encoder(source, out, model)
    except (ValueError, FileNotFoundError, KeyError) as e:
        _fail(str(e))
    for kind, p in paths.items():
        console.print(f"{kind}: {p}", highlight=False)


@app.command()
def plot(
    runs: list[Path] = typer.Argument(..., metavar="RUN...", help="Run dirs (each with a metrics.jsonl); one line per run."),
    out: Path = typer.Option(Path("curves.png"), "--out", help="PNG file to write (its folder is created)."),
    smooth: int = typer.Option(1, "--smooth", help="Trailing moving average over N records (1: raw values)."),
) -> None:
    """Plot loss, loss_fea, loss_att, lr and images/s over the step for one or more runs, to compare them."""
    from .plot import plot_runs

    try:
        path = plot_runs(runs, out, smooth)
    except (ValueError, FileNotFoundError) as e:  # messages name the option or the run dir
        _fail(str(e))
    console.print(f"wrote {path}", highlight=False)


# ---- downstream: finetune, knn, linear ---------------------------------------------------------
_SOURCE_HELP = ("An export folder (tec-train export), a run dir or checkpoint-*.pt of tec-train run (TEC or "
                "--objective mae), a reference TEC checkpoint {'model': ...} (with --model), or a base model's "
                "weights file or URL (with --basemodel NAME or --arch TIMM_NAME); with a registry --basemodel and no SOURCE, "
                "its official weights are fetched, with --basemodel timm:NAME or hf-hub:ORG/REPO and no SOURCE, timm's own.")


def _dataset_dir(data: Path | None, fashion_mnist: bool, fashion_mnist_dir: Path | None) -> tuple[str | None, str | None]:
    """(--data, Fashion-MNIST folder) as strings; --fashion-mnist-dir implies --fashion-mnist."""
    from tec_cache.core.fashion_mnist import DEFAULT_DIR

    fm = str(fashion_mnist_dir) if fashion_mnist_dir is not None else (str(DEFAULT_DIR) if fashion_mnist else None)
    return (str(data) if data is not None else None), fm


class RichFinetuneReporter(Reporter):
    """Progress bar over micro-batches with the last epoch's accuracy; rank 0 only (the finetuner sees to
    that). Implements harness.Reporter."""

    def __init__(self, out: Console) -> None:
        self.out = out
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=out,
        )
        self.task = self.progress.add_task("fine-tuning", total=None, stats="")

    def start(self, *, total: int, done: int, summary: dict[str, Any]) -> None:
        self.out.print(_finetune_summary(summary), highlight=False)
        self.progress.update(self.task, total=total, completed=done)
        self.progress.start()

    def advance(self, done: int) -> None:
        self.progress.update(self.task, completed=done)

    def status(self, done: int, stats: dict[str, Any]) -> None:
        self.progress.update(self.task, stats=f"epoch {stats['epoch']} loss {stats['train_loss']:.4f} lr {stats['lr']:.2e}")

    def record(self, record: dict[str, Any]) -> None:
        stats = (f"epoch {record['epoch']} loss {record['train_loss']:.4f} top-1 {record['test_top1']:.2%} "
                 f"(best {record['best_top1']:.2%}) lr {record['lr']:.2e}")
        self.progress.update(self.task, stats=stats)

    def message(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)

    def finish(self) -> None:
        self.progress.stop()


def _write_json(path: Path | None, obj: dict[str, Any]) -> None:
    if path is None:
        return
    from tec_cache.format.fs import write_json_atomic

    write_json_atomic(path, obj)
    console.print(f"wrote {path}", highlight=False)


def _result_table(title: str, rows: list[tuple[str, str]]) -> None:
    t = Table(title=title)
    t.add_column("item")
    t.add_column("value", justify="right")
    for r in rows:
        t.add_row(*r)
    console.print(t)


@app.command()
def finetune(
    source: str | None = typer.Argument(None, metavar="[SOURCE]", help=_SOURCE_HELP),
    run_dir: Path = typer.Option(..., "--run-dir", help=_fh("run_dir")),
    pipeline: str | None = typer.Option(None, "--pipeline", help="Pipeline name (see `tec-train pipelines`) or .toml file: its finetune table gives the defaults; flags override them."),
    data: Path | None = typer.Option(None, "--data", help=_fh("data")),
    fashion_mnist: bool = typer.Option(False, "--fashion-mnist", help="Use Fashion-MNIST (local idx files, /usr/share/datasets/fashion-mnist)."),
    fashion_mnist_dir: Path | None = typer.Option(None, "--fashion-mnist-dir", help="Fashion-MNIST from this folder instead (implies --fashion-mnist)."),
    model: str | None = typer.Option(None, "--model", help=_fh("model")),
    basemodel: str | None = typer.Option(None, "--basemodel", help=_fh("basemodel")),
    arch: str | None = typer.Option(None, "--arch", help=_fh("arch")),
    checkpoint: str | None = typer.Option(None, "--checkpoint", help=_fh("checkpoint")),
    mlp_token: bool | None = typer.Option(None, "--mlp-token/--fold-mlp-token", help=_fh("mlp_token")),
    global_pool: bool | None = typer.Option(None, "--global-pool/--cls-token", help=_fh("global_pool")),
    img_size: int | None = typer.Option(None, "--img-size", help=_fh("img_size")),
    drop_path: float | None = typer.Option(None, "--drop-path", help=_fh("drop_path")),
    epochs: int | None = typer.Option(None, "--epochs", help=_fh("epochs")),
    warmup_epochs: float | None = typer.Option(None, "--warmup-epochs", help=_fh("warmup_epochs")),
    batch_size: int | None = typer.Option(None, "--batch-size", help=_fh("batch_size")),
    accum_iter: int | None = typer.Option(None, "--accum-iter", help=_fh("accum_iter")),
    blr: float | None = typer.Option(None, "--blr", help=_fh("blr")),
    lr: float | None = typer.Option(None, "--lr", help=_fh("lr")),
    min_lr: float | None = typer.Option(None, "--min-lr", help=_fh("min_lr")),
    layer_decay: float | None = typer.Option(None, "--layer-decay", help=_fh("layer_decay")),
    weight_decay: float | None = typer.Option(None, "--weight-decay", help=_fh("weight_decay")),
    clip_grad: float | None = typer.Option(None, "--clip-grad", help=_fh("clip_grad")),
    aa: str | None = typer.Option(None, "--aa", help=_fh("aa")),
    reprob: float | None = typer.Option(None, "--reprob", help=_fh("reprob")),
    mixup: float | None = typer.Option(None, "--mixup", help=_fh("mixup")),
    cutmix: float | None = typer.Option(None, "--cutmix", help=_fh("cutmix")),
    mixup_prob: float | None = typer.Option(None, "--mixup-prob", help=_fh("mixup_prob")),
    mixup_switch_prob: float | None = typer.Option(None, "--mixup-switch-prob", help=_fh("mixup_switch_prob")),
    mixup_mode: str | None = typer.Option(None, "--mixup-mode", help=_fh("mixup_mode")),
    smoothing: float | None = typer.Option(None, "--smoothing", help=_fh("smoothing")),
    crop_pct: float | None = typer.Option(None, "--crop-pct", help=_fh("crop_pct")),
    train_subset: int | None = typer.Option(None, "--train-subset", help=_fh("train_subset")),
    val_subset: int | None = typer.Option(None, "--val-subset", help=_fh("val_subset")),
    seed: int | None = typer.Option(None, "--seed", help=_fh("seed")),
    num_workers: int | None = typer.Option(None, "--num-workers", help=_fh("num_workers")),
    device: str | None = typer.Option(None, "--device", help=_fh("device")),
    amp: str | None = typer.Option(None, "--amp", help=_fh("amp")),
    keep_last: int | None = typer.Option(None, "--keep-last", help=_fh("keep_last")),
    log_every: int | None = typer.Option(None, "--log-every", help=_fh("log_every")),
    tensorboard: bool | None = typer.Option(None, "--tensorboard/--no-tensorboard", help=_fh("tensorboard")),
    wandb: str | None = typer.Option(None, "--wandb", metavar="PROJECT", help=_fh("wandb")),
) -> None:
    """Fine-tune an encoder end to end with the reference recipe (docs/method.md 6), or resume the run in --run-dir."""
    options = dict(locals())  # first statement: exactly the options
    from .finetune import Finetuner
    from .harness.errors import NonFiniteLossError, ResumeError
    from .options import finetune_config

    info = dist_info()
    flags = {k: v for k, v in options.items() if k not in ("run_dir", "fashion_mnist", "fashion_mnist_dir", "pipeline")}
    flags["fashion_mnist"] = _dataset_dir(data, fashion_mnist, fashion_mnist_dir)[1]
    try:
        cfg = finetune_config(str(run_dir), flags, pipeline, world_size=info.world_size, say=_note)
        runner = Finetuner(cfg, RichFinetuneReporter(console) if console.is_terminal else PlainFinetuneReporter(console))
    except (ValueError, FileNotFoundError) as e:  # ResumeError is a ValueError
        _fail(str(e), 2)
    try:
        result = runner.run()
    except NonFiniteLossError as e:
        _fail(str(e), 1)
    except Exception as e:  # noqa: BLE001
        _fail(_run_failure(e, run_dir, info.rank, (ResumeError, RuntimeError, OSError)), 1)
    if not info.is_main:
        return
    top5 = f"{result.last_top5:.2%}" if result.last_top5 is not None else "-"
    _result_table(f"tec-train finetune: {run_dir}", [
        ("epochs this run / in all", f"{result.epochs_run} / {result.epoch}"),
        ("best top-1 (epoch)", f"{result.best_top1:.2%} ({result.best_epoch})"),
        ("last top-1 / top-5", f"{result.last_top1:.2%} / {top5}"),
        ("encoder", f"{result.config['resolved']['encoder']['kind']} {result.config['resolved']['encoder']['model_name']}"),
        ("resumed from", str(result.resumed_from) if result.resumed_from else "-"),
        ("result", str(run_dir / "result.json")),
    ])


def _evaluate(run: Any, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(config, result) of one knn/linear call; a bad option or source exits 2 before any work."""
    try:
        from .options import eval_config

        flags = {k: v for k, v in options.items() if k not in ("fashion_mnist", "fashion_mnist_dir", "pipeline", "out_json")}
        flags["fashion_mnist"] = _dataset_dir(None, options["fashion_mnist"], options["fashion_mnist_dir"])[1]
        cfg = eval_config(flags, options["pipeline"])
        if options["out_json"] is not None:
            from tec_cache.format.fs import prepare_output_file

            prepare_output_file(options["out_json"], "--out-json")
        return cfg, run(cfg, busy=console.status)
    except (ValueError, FileNotFoundError, KeyError) as e:
        _fail(str(e))
    raise AssertionError("unreachable")


def _eh(name: str, extra: str = "") -> str:
    from .eval_config import EvalConfig

    return help_for(EvalConfig, name, extra)


# Options knn and linear share, declared once.
_Source = Annotated[str | None, typer.Argument(metavar="[SOURCE]", help=_SOURCE_HELP)]
_Pipeline = Annotated[str | None, typer.Option("--pipeline", help="Pipeline name (see `tec-train pipelines`) or .toml file: its eval table gives the defaults; flags override them.")]
_Data = Annotated[Path | None, typer.Option("--data", help=_eh("data"))]
_FashionMnist = Annotated[bool, typer.Option("--fashion-mnist", help="Use Fashion-MNIST (local idx files, /usr/share/datasets/fashion-mnist).")]
_FashionMnistDir = Annotated[Path | None, typer.Option("--fashion-mnist-dir", help="Fashion-MNIST from this folder instead (implies --fashion-mnist).")]
_Pool = Annotated[str | None, typer.Option("--pool", help=_eh("pool"))]
_Model = Annotated[str | None, typer.Option("--model", help=_eh("model"))]
_Basemodel = Annotated[str | None, typer.Option("--basemodel", help=_eh("basemodel"))]
_Arch = Annotated[str | None, typer.Option("--arch", help=_eh("arch"))]
_ImgSize = Annotated[int | None, typer.Option("--img-size", help=_eh("img_size"))]
_PatchSize = Annotated[int | None, typer.Option("--patch-size", help=_eh("patch_size"))]
_Depth = Annotated[int | None, typer.Option("--depth", help=_eh("depth"))]
_BatchSize = Annotated[int | None, typer.Option("--batch-size", help=_eh("batch_size"))]
_NumWorkers = Annotated[int | None, typer.Option("--num-workers", help=_eh("num_workers"))]
_Device = Annotated[str | None, typer.Option("--device", help=_eh("device"))]
_CropPct = Annotated[float | None, typer.Option("--crop-pct", help=_eh("crop_pct"))]
_TrainSubset = Annotated[int | None, typer.Option("--train-subset", help=_eh("train_subset"))]
_ValSubset = Annotated[int | None, typer.Option("--val-subset", help=_eh("val_subset"))]
_Seed = Annotated[int | None, typer.Option("--seed", help=_eh("seed"))]


@app.command()
def knn(
    source: _Source = None,
    pipeline: _Pipeline = None,
    data: _Data = None,
    fashion_mnist: _FashionMnist = False,
    fashion_mnist_dir: _FashionMnistDir = None,
    k: Annotated[int | None, typer.Option("--k", help=_eh("k"))] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help=_eh("temperature"))] = None,
    pool: _Pool = None,
    model: _Model = None,
    basemodel: _Basemodel = None,
    arch: _Arch = None,
    img_size: _ImgSize = None,
    patch_size: _PatchSize = None,
    depth: _Depth = None,
    batch_size: _BatchSize = None,
    num_workers: _NumWorkers = None,
    device: _Device = None,
    crop_pct: _CropPct = None,
    train_subset: _TrainSubset = None,
    val_subset: _ValSubset = None,
    seed: _Seed = None,
    out_json: Annotated[Path | None, typer.Option("--out-json", help="Write the result (and what produced it) here.")] = None,
) -> None:
    """Weighted kNN accuracy of frozen features (DINO protocol: cosine, top-k, exp(sim / T) votes)."""
    options = dict(locals())  # first statement: exactly the options
    from .evaluate import run_knn

    cfg, out = _evaluate(run_knn, options)
    res, meta = out["knn"], out
    _result_table(f"tec-train knn: {source}", [
        ("top-1", f"{res['top1']:.2%}"), ("top-5", f"{res['top5']:.2%}" if "top5" in res else "-"),
        ("k / T", f"{res['k']} / {cfg.temperature}"), ("train / val images", f"{res['num_train']} / {res['num_test']}"),
        ("encoder", f"{meta['encoder']['kind']} {meta['encoder']['model_name']}"), ("pool", cfg.pool),
    ])
    _write_json(out_json, out)


@app.command()
def linear(
    source: _Source = None,
    pipeline: _Pipeline = None,
    data: _Data = None,
    fashion_mnist: _FashionMnist = False,
    fashion_mnist_dir: _FashionMnistDir = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help=_eh("epochs"))] = None,
    lr: Annotated[float | None, typer.Option("--lr", help=_eh("lr"))] = None,
    batch_size: _BatchSize = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay", help=_eh("weight_decay"))] = None,
    warmup_epochs: Annotated[float | None, typer.Option("--warmup-epochs", help=_eh("warmup_epochs"))] = None,
    optimizer: Annotated[str | None, typer.Option("--optimizer", help=_eh("optimizer"))] = None,
    pool: _Pool = None,
    model: _Model = None,
    basemodel: _Basemodel = None,
    arch: _Arch = None,
    img_size: _ImgSize = None,
    patch_size: _PatchSize = None,
    depth: _Depth = None,
    num_workers: _NumWorkers = None,
    device: _Device = None,
    crop_pct: _CropPct = None,
    train_subset: _TrainSubset = None,
    val_subset: _ValSubset = None,
    seed: _Seed = None,
    out_json: Annotated[Path | None, typer.Option("--out-json", help="Write the result (per-epoch curve included) here.")] = None,
) -> None:
    """Linear probe (BatchNorm without affine + Linear, MAE's) trained on frozen, precomputed features."""
    options = dict(locals())  # first statement: exactly the options
    from .evaluate import run_linear

    cfg, out = _evaluate(run_linear, options)
    res, meta = out["linear"], out
    _result_table(f"tec-train linear: {source}", [
        ("best top-1", f"{res['best_top1']:.2%}"), ("last top-1", f"{res['last_top1']:.2%}"),
        ("last top-5", f"{res['last_top5']:.2%}" if res["last_top5"] is not None else "-"),
        ("epochs / lr / batch", f"{cfg.epochs} / {res['lr']:.3g} / {res['batch_size']}"),
        ("train / val images", f"{res['num_train']} / {res['num_test']}"),
        ("encoder", f"{meta['encoder']['kind']} {meta['encoder']['model_name']}"), ("pool", cfg.pool),
    ])
    _write_json(out_json, out)


def main() -> None:
    app(prog_name="tec-train")


if __name__ == "__main__":
    sys.exit(main())

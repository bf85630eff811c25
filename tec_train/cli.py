"""`tec-train`: the stage-2 command line (run, finetune, knn, linear, export, plot, pipelines).

Data flow: flags (derived from the configs' option fields, tec_cache.runtime.flags) --options.py:
defaults < pipeline table < stored run < flags--> TrainConfig | FinetuneConfig | EvalConfig --> one
library call (train.Trainer, finetune.Finetuner, evaluate) with a harness reporter --> one result
table (harness.reporters). Every option is checked before any model is built or any data is read;
a bad value exits with code 2 and a message naming the option, a failure during training with code 1.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tec_cache.runtime.config import PATH_METAVAR
from tec_cache.runtime.dist import dist_info
from tec_cache.runtime.flags import flag_param, flags_from, param, with_flags
from tec_cache.runtime.plain_log import log_console
from tec_cache.runtime.run_log import RUN_LOG, SampleError, failure_line, from_worker
from tec_cache.runtime.version import version_callback

from .eval_config import EvalConfig
from .finetune_config import FinetuneConfig
from .harness.reporters import finetune_rows, knn_rows, linear_rows, reporter_for, result_table, run_rows
from .train_config import TrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Stage 2 of TEC: train a student from cached (or online) base-model targets, and export it.")
# Errors stay on one greppable line; where no terminal is, tables and paths print at full width.
console = log_console()


@app.callback()
def _main(version: bool | None = typer.Option(None, "--version", callback=version_callback("tec-train"), is_eager=True,
                                                 help="Print the installed version and exit.")) -> None:
    """Stage 2 of TEC: train a student from cached (or online) base-model targets, and export it."""


def _fail(msg: str, code: int = 2) -> NoReturn:
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


_PIPELINE_HELP = ("Pipeline name (see `tec-train pipelines`) or .toml file: its {table} gives the defaults; flags "
                  "override them.")


def _pipeline(table: str, extra: str = "") -> inspect.Parameter:
    return param("pipeline", str | None, typer.Option(None, "--pipeline", help=_PIPELINE_HELP.format(table=table) + extra))


@app.command()
@with_flags(
    flag_param(TrainConfig, "run_dir", required=True),
    _pipeline("pretrain table (base with --objective mae)", " --cache defaults to caches/<the pipeline's cache_name>."),
    param("online", bool, typer.Option(False, "--online", help=(
        "Online mode with the --pipeline's target recipe (its cache table, as tec-cache build takes it): the base model "
        "runs inside the step; give --data (and --checkpoint unless the base model is fetched by name)."))),
    flags_from(TrainConfig, skip=("run_dir",)),
)
def run(*, run_dir: str, pipeline: str | None, online: bool, **flags: Any) -> None:
    """Train a TEC student from a cache (or online), or resume the run in --run-dir."""
    from .harness.errors import NonFiniteLossError
    from .options import run_config
    from .train import Trainer

    info = dist_info()
    try:
        cfg = run_config(run_dir, flags, pipeline, online=online, world_size=info.world_size, say=_note)
        trainer = Trainer(cfg, None, reporter_for(console))
    except (ValueError, FileNotFoundError) as e:  # CompatibilityError and ResumeError are ValueErrors
        _fail(str(e), 2)
    try:
        result = trainer.run()
    except NonFiniteLossError as e:
        _fail(str(e), 1)
    except Exception as e:  # noqa: BLE001 - ValueError: ResumeError, ShardError (a shard failing its checksum)
        _fail(_run_failure(e, Path(run_dir), info.rank, (ValueError, RuntimeError, OSError)), 1)
    if info.is_main:
        console.print(result_table(f"tec-train run: {Path(run_dir)}", run_rows(result)))


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


def _fashion_mnist_dir(fashion_mnist: bool, fashion_mnist_dir: str | None) -> str | None:
    """The Fashion-MNIST folder the configs take; --fashion-mnist-dir implies --fashion-mnist."""
    from tec_cache.core.fashion_mnist import DEFAULT_DIR

    return fashion_mnist_dir if fashion_mnist_dir is not None else (str(DEFAULT_DIR) if fashion_mnist else None)


def _write_json(path: str | None, obj: dict[str, Any]) -> None:
    if path is None:
        return
    from tec_cache.format.fs import write_json_atomic

    write_json_atomic(Path(path), obj)
    console.print(f"wrote {path}", highlight=False)


# What the downstream commands share beyond their configs' options: SOURCE and Fashion-MNIST.
_SOURCE = param("source", str | None, typer.Argument(None, metavar="[SOURCE]", help=_SOURCE_HELP))
_FASHION_MNIST = [
    param("fashion_mnist", bool, typer.Option(False, "--fashion-mnist",
                                              help="Use Fashion-MNIST (local idx files, /usr/share/datasets/fashion-mnist).")),
    param("fashion_mnist_dir", str | None, typer.Option(None, "--fashion-mnist-dir", metavar=PATH_METAVAR,
                                                        help="Fashion-MNIST from this folder instead (implies --fashion-mnist).")),
]


@app.command()
@with_flags(_SOURCE, flag_param(FinetuneConfig, "run_dir", required=True), _pipeline("finetune table"),
            flags_from(FinetuneConfig, skip=("source", "run_dir", "fashion_mnist")), _FASHION_MNIST)
def finetune(*, run_dir: str, pipeline: str | None, fashion_mnist: bool, fashion_mnist_dir: str | None, **flags: Any) -> None:
    """Fine-tune an encoder end to end with the reference recipe (docs/method.md 6), or resume the run in --run-dir."""
    from .finetune import Finetuner
    from .harness.errors import NonFiniteLossError, ResumeError
    from .options import finetune_config

    info = dist_info()
    flags["fashion_mnist"] = _fashion_mnist_dir(fashion_mnist, fashion_mnist_dir)
    try:
        cfg = finetune_config(run_dir, flags, pipeline, world_size=info.world_size, say=_note)
        runner = Finetuner(cfg, reporter_for(console, finetune=True))
    except (ValueError, FileNotFoundError) as e:  # ResumeError is a ValueError
        _fail(str(e), 2)
    try:
        result = runner.run()
    except NonFiniteLossError as e:
        _fail(str(e), 1)
    except Exception as e:  # every failure ends as one line; the traceback goes to the log
        _fail(_run_failure(e, Path(run_dir), info.rank, (ResumeError, RuntimeError, OSError)), 1)
    if info.is_main:
        console.print(result_table(f"tec-train finetune: {Path(run_dir)}", finetune_rows(result, str(Path(run_dir) / "result.json"))))


def _evaluate(run: Any, flags: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(config, result) of one knn/linear call; a bad option or source exits 2 before any work."""
    from .options import eval_config

    pipeline, out_json = flags.pop("pipeline"), flags.pop("out_json")
    flags["fashion_mnist"] = _fashion_mnist_dir(flags.pop("fashion_mnist"), flags.pop("fashion_mnist_dir"))
    try:
        cfg = eval_config(flags, pipeline)
        if out_json is not None:
            from tec_cache.format.fs import prepare_output_file

            prepare_output_file(Path(out_json), "--out-json")
        return cfg, run(cfg, busy=console.status)
    except (ValueError, FileNotFoundError, KeyError) as e:
        _fail(str(e))
    raise AssertionError("unreachable")


_PROBE_ONLY = ("epochs", "lr", "weight_decay", "warmup_epochs", "optimizer")
_KNN_ONLY = ("k", "temperature")


def _out_json(help: str) -> inspect.Parameter:
    return param("out_json", str | None, typer.Option(None, "--out-json", metavar=PATH_METAVAR, help=help))


@app.command()
@with_flags(_SOURCE, _pipeline("eval table"), flags_from(EvalConfig, skip=("source", "fashion_mnist", *_PROBE_ONLY)),
            _FASHION_MNIST, _out_json("Write the result (and what produced it) here."))
def knn(*, source: str | None, **flags: Any) -> None:
    """Weighted kNN accuracy of frozen features (DINO protocol: cosine, top-k, exp(sim / T) votes)."""
    from .evaluate import run_knn

    out_json = flags["out_json"]
    cfg, out = _evaluate(run_knn, {**flags, "source": source})
    console.print(result_table(f"tec-train knn: {source}", knn_rows(out, cfg.temperature, cfg.pool)))
    _write_json(out_json, out)


@app.command()
@with_flags(_SOURCE, _pipeline("eval table"), flags_from(EvalConfig, skip=("source", "fashion_mnist", *_KNN_ONLY)),
            _FASHION_MNIST, _out_json("Write the result (per-epoch curve included) here."))
def linear(*, source: str | None, **flags: Any) -> None:
    """Linear probe (BatchNorm without affine + Linear, MAE's) trained on frozen, precomputed features."""
    from .evaluate import run_linear

    out_json = flags["out_json"]
    cfg, out = _evaluate(run_linear, {**flags, "source": source})
    console.print(result_table(f"tec-train linear: {source}", linear_rows(out, cfg.epochs, cfg.pool)))
    _write_json(out_json, out)


def main() -> None:
    app(prog_name="tec-train")


if __name__ == "__main__":
    main()

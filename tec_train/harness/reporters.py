"""How a run shows itself on rank 0: a live rich bar on a terminal, whole plain lines in a job's log,
and the result tables the commands print at the end.

Data flow: a loop's hooks (harness.reporting.Reporter: start, advance, status, record, message,
finish) --> RichReporter / RichFinetuneReporter (terminal) or PlainReporter / PlainFinetuneReporter
(log files, tec_cache.runtime.plain_log) --> the console; a command's result --``result_table``-->
one two-column table. Like the rest of the harness it knows no loop, model or command line.
"""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tec_cache.runtime.plain_log import PlainProgress

from .reporting import Reporter


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


def reporter_for(out: Console, finetune: bool = False) -> Reporter:
    """The live bar on a terminal, plain lines where output is a log file."""
    if finetune:
        return RichFinetuneReporter(out) if out.is_terminal else PlainFinetuneReporter(out)
    return RichReporter(out) if out.is_terminal else PlainReporter(out)


def result_table(title: str, rows: list[tuple[str, str]]) -> Table:
    """A command's result: item | value, values right-aligned."""
    t = Table(title=title)
    t.add_column("item")
    t.add_column("value", justify="right")
    for r in rows:
        t.add_row(*r)
    return t


def run_rows(result: Any) -> list[tuple[str, str]]:
    """The rows of ``tec-train run``'s result table (a train.TrainResult)."""
    rec = result.last_record or {}
    if not rec:
        loss = "-"
    elif "loss_fea" in rec:
        loss = f"{rec['loss']:.5f} ({rec['loss_fea']:.5f} + {rec['loss_att']:.5f})"
    else:
        loss = f"{rec['loss']:.5f}"
    return [
        ("steps this run", str(result.steps_run)),
        ("global step / epoch", f"{result.global_step} / {result.epoch}"),
        ("loss (fea + att)" if "loss_fea" in rec else "loss", loss),
        ("images/s", f"{result.images_per_s:.1f}"),
        ("data wait", f"{result.data_wait_fraction:.1%}"),
        ("seconds in steps", f"{result.seconds:.1f}"),
        ("checkpoint", str(result.checkpoint)),
        ("resumed from", str(result.resumed_from) if result.resumed_from else "-"),
    ]


def finetune_rows(result: Any, result_path: str) -> list[tuple[str, str]]:
    """The rows of ``tec-train finetune``'s result table (a finetune.FinetuneResult)."""
    top5 = f"{result.last_top5:.2%}" if result.last_top5 is not None else "-"
    encoder = result.config["resolved"]["encoder"]
    return [
        ("epochs this run / in all", f"{result.epochs_run} / {result.epoch}"),
        ("best top-1 (epoch)", f"{result.best_top1:.2%} ({result.best_epoch})"),
        ("last top-1 / top-5", f"{result.last_top1:.2%} / {top5}"),
        ("encoder", f"{encoder['kind']} {encoder['model_name']}"),
        ("resumed from", str(result.resumed_from) if result.resumed_from else "-"),
        ("result", result_path),
    ]


def knn_rows(out: dict[str, Any], temperature: float, pool: str) -> list[tuple[str, str]]:
    """The rows of ``tec-train knn``'s result table (evaluate.run_knn's result)."""
    res, enc = out["knn"], out["encoder"]
    return [
        ("top-1", f"{res['top1']:.2%}"), ("top-5", f"{res['top5']:.2%}" if "top5" in res else "-"),
        ("k / T", f"{res['k']} / {temperature}"), ("train / val images", f"{res['num_train']} / {res['num_test']}"),
        ("encoder", f"{enc['kind']} {enc['model_name']}"), ("pool", pool),
    ]


def linear_rows(out: dict[str, Any], epochs: int, pool: str) -> list[tuple[str, str]]:
    """The rows of ``tec-train linear``'s result table (evaluate.run_linear's result)."""
    res, enc = out["linear"], out["encoder"]
    return [
        ("best top-1", f"{res['best_top1']:.2%}"), ("last top-1", f"{res['last_top1']:.2%}"),
        ("last top-5", f"{res['last_top5']:.2%}" if res["last_top5"] is not None else "-"),
        ("epochs / lr / batch", f"{epochs} / {res['lr']:.3g} / {res['batch_size']}"),
        ("train / val images", f"{res['num_train']} / {res['num_test']}"),
        ("encoder", f"{enc['kind']} {enc['model_name']}"), ("pool", pool),
    ]

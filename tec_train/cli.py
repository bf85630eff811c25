"""`tec-train`: the stage-2 command line (run, export).

Data flow: options (+ the run dir's stored config when resuming) --> TrainConfig --> train.Trainer
(rich progress and a summary table on rank 0) --> checkpoints --> export --> a plain timm ViT.
Every option is checked before any model is built or any data is read; a bad value exits with
code 2 and a message naming the option, a failure during training with code 1.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tec_cache.dist import dist_info

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Stage 2 of TEC: train a student from cached (or online) base-model targets, and export it.")
console = Console(stderr=True, soft_wrap=True)  # errors stay on one greppable line


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {msg}", markup=True, highlight=False)
    raise typer.Exit(code)


class RichReporter:
    """Progress bar with the latest losses and throughput; rank 0 only (the trainer sees to that)."""

    def __init__(self, out: Console) -> None:
        self.out = out
        self.progress = Progress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=out,
        )
        self.task = self.progress.add_task("steps", total=None, stats="")

    def start(self, *, total_steps: int, start_step: int, summary: dict[str, Any]) -> None:
        s = summary["student"]
        self.out.print(
            f"student {s['model']} (depth {s['depth']}, {s['trainable_params']:,} trainable params) on "
            f"{summary['targets']['origin'].get('kind')} targets; effective batch {summary['eff_batch']}, lr {summary['lr']:.3g}, "
            f"{summary['optimizer_steps_per_epoch']} steps/epoch, amp {summary['amp']}",
            highlight=False,
        )
        self.progress.update(self.task, total=total_steps, completed=start_step)
        self.progress.start()

    def step(self, global_step: int) -> None:
        self.progress.update(self.task, completed=global_step)

    def metrics(self, record: dict[str, Any]) -> None:
        stats = (f"loss {record['loss']:.4f} (fea {record['loss_fea']:.4f}, att {record['loss_att']:.4f}) "
                 f"lr {record['lr']:.2e} {record['images_per_s']:.1f} img/s wait {record['data_wait_fraction']:.0%}")
        self.progress.update(self.task, stats=stats)

    def message(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)

    def finish(self) -> None:
        self.progress.stop()


@app.command()
def run(
    run_dir: Path = typer.Option(..., "--run-dir", help="Run folder: checkpoints, metrics.jsonl, config.json. Re-running resumes it."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Stage-1 cache folder to train from."),
    online_basemodel: Optional[str] = typer.Option(None, "--online-basemodel", help="Online mode: run this base model inside the step (mae1kbase | mae1k300ep | ibot1kbase | mae1klarge)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Online mode: the base model's local weights."),
    data: Optional[Path] = typer.Option(None, "--data", help="Online mode: ImageNet-style folder or folder of WebDataset .tar shards."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Online mode: any timm ViT as the base model (overrides the registry's)."),
    topk: Optional[int] = typer.Option(None, "--topk", help="Online mode: top-k patch rows of the attention target."),
    tau: Optional[float] = typer.Option(None, "--tau", help="Online mode: attention-target temperature."),
    last_layers: Optional[int] = typer.Option(None, "--last-layers", help="Online mode: blocks averaged into the feature target."),
    base_depth: Optional[int] = typer.Option(None, "--base-depth", help="Online mode: block count of a base ViT shallower than its --arch."),
    model: Optional[str] = typer.Option(None, "--model", help="Student size, timm-style: vit_tiny_patch16, vit_small_patch16, vit_base_patch16, vit_large_patch16, ... (default: vit_base_patch16)"),
    depth: Optional[int] = typer.Option(None, "--depth", help="Override the student's depth (tiny CPU models)."),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="Image size (default: the cache's view size; 224 online)."),
    patch_size: Optional[int] = typer.Option(None, "--patch-size", help="Patch size (default: the --model name's)."),
    mask_ratio: Optional[float] = typer.Option(None, "--mask-ratio", help="Fraction of patches masked (default: 0.75)."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start from a TEC pretraining checkpoint ({'model': ...}, reference or ours), loaded strictly."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs (default: 300)."),
    warmup_epochs: Optional[float] = typer.Option(None, "--warmup-epochs", help="Linear warm-up epochs, clipped to --epochs (default: 40)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Micro-batch per process (default: 256)."),
    accum_iter: Optional[int] = typer.Option(None, "--accum-iter", help="Micro-batches per optimizer step (default: 1)."),
    blr: Optional[float] = typer.Option(None, "--blr", help="Base lr: lr = blr x effective batch / 256 (default: 1.5e-4)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Absolute peak lr (overrides --blr)."),
    min_lr: Optional[float] = typer.Option(None, "--min-lr", help="Final lr of the cosine (default: 0)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay (default: 0.05)."),
    clip_grad: Optional[float] = typer.Option(None, "--clip-grad", help="Clip the gradient norm to this (default: off, as the reference)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of initialisation, shuffling and masks (default: 0)."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Loader worker processes per rank (default: 4)."),
    view_order: Optional[str] = typer.Option(None, "--view-order", help="Which cached view-epoch epoch e reads: cycle (e mod K) | permute (default: cycle)."),
    ckpt_every: Optional[int] = typer.Option(None, "--ckpt-every", help="Checkpoint every N steps (and at every epoch end) (default: 1000)."),
    keep_last: Optional[int] = typer.Option(None, "--keep-last", help="Checkpoints kept (default: 3)."),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="Metrics record every N steps (default: 20)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps in total."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (default: auto)."),
    amp: Optional[str] = typer.Option(None, "--amp", help="auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | off (default: auto)."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the student (CUDA only) (default: off)."),
) -> None:
    """Train a TEC student from a cache (or online), or resume the run in --run-dir."""
    options = dict(locals())  # first statement: exactly the options
    from .train import NonFiniteLossError, ResumeError, Trainer, config_for_run_dir

    info = dist_info()
    given = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items() if v is not None and k != "run_dir"}
    try:
        cfg = config_for_run_dir(str(run_dir), given)
        trainer = Trainer(cfg, None, RichReporter(console))
    except (ValueError, FileNotFoundError) as e:  # CompatibilityError and ResumeError are ValueErrors
        _fail(str(e), 2)
    try:
        result = trainer.run()
    except NonFiniteLossError as e:
        _fail(str(e), 1)
    except (ResumeError, RuntimeError, OSError) as e:
        _fail(f"{type(e).__name__}: {e}", 1)
    if not info.is_main:
        return
    t = Table(title=f"tec-train run: {run_dir}")
    t.add_column("item")
    t.add_column("value", justify="right")
    rec = result.last_record or {}
    rows = [
        ("steps this run", str(result.steps_run)),
        ("global step / epoch", f"{result.global_step} / {result.epoch}"),
        ("loss (fea + att)", f"{rec['loss']:.5f} ({rec['loss_fea']:.5f} + {rec['loss_att']:.5f})" if rec else "-"),
        ("images/s", f"{result.images_per_s:.1f}"),
        ("data wait", f"{result.data_wait_fraction:.1%}"),
        ("seconds in steps", f"{result.seconds:.1f}"),
        ("checkpoint", str(result.checkpoint)),
        ("resumed from", str(result.resumed_from) if result.resumed_from else "-"),
    ]
    for r in rows:
        t.add_row(*r)
    console.print(t)


def _reference_meta(state: dict[str, Any], model: str) -> dict[str, Any]:
    """Encoder architecture of a bare TEC state dict, with the head count from the --model size."""
    from .student import MODEL_SIZES, parse_model_name

    size, _ = parse_model_name(model)
    embed_dim = int(state["cls_token"].shape[-1])
    if embed_dim != MODEL_SIZES[size].embed_dim:
        raise ValueError(f"--model {model}: width {MODEL_SIZES[size].embed_dim}, but the checkpoint's is {embed_dim}")
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    grid = math.isqrt(int(state["pos_embed"].shape[1]) - 1)
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k)))
    return {"img_size": grid * patch, "patch_size": patch, "embed_dim": embed_dim, "depth": depth,
            "num_heads": MODEL_SIZES[size].num_heads, "student_model": model}


@app.command()
def export(
    source: Path = typer.Argument(..., metavar="RUN_OR_CKPT", help="A run dir (its latest checkpoint), a tec-train checkpoint, or a reference TEC checkpoint {'model': ...}."),
    out: Path = typer.Option(..., "--out", help="Folder for model.safetensors, model.pth and config.json."),
    model: Optional[str] = typer.Option(None, "--model", help="Student size of a reference checkpoint, e.g. vit_base_patch16 (ours record it)."),
) -> None:
    """Write a plain timm ViT (cls MLP folded into cls_token) that timm.create_model loads strictly."""
    from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
    from .export import CONFIG_KEYS, export_state_dict, load_tec_checkpoint, save_export, timm_model_name
    from .student import parse_model_name

    path = source
    if source.is_dir():
        found = latest_checkpoint(source)
        if found is None:
            _fail(f"{source}: a run dir without any complete checkpoint-*.pt")
        path = found
    elif not source.is_file():
        _fail(f"{source}: no such run dir or checkpoint file")
    try:
        if model is not None:
            parse_model_name(model)
        try:
            ck = load_checkpoint(path)
        except CheckpointError:
            ck = None
        if ck is not None:
            student = ck["config"]["resolved"]["student"]
            if model is not None and model != student["model"]:
                raise ValueError(f"--model {model}: the checkpoint's student is {student['model']}")
            model = student["model"]
            state = dict(ck["model"])
            meta = {**{k: student[k] for k in CONFIG_KEYS}, "student_model": model, "global_step": ck["global_step"]}
        else:
            state = load_tec_checkpoint(path)
            if model is None:
                raise ValueError(f"--model: {path} is not a tec-train checkpoint, so its student size must be given (e.g. vit_base_patch16)")
            meta = _reference_meta(state, model)
        mlp_token = any(k.startswith("cls_token_mlp.") for k in state)
        paths = save_export(export_state_dict(state, mlp_token=mlp_token), out, timm_model_name(model),
                            {**meta, "source_checkpoint": str(path), "mlp_token_folded": mlp_token})
    except (ValueError, KeyError) as e:
        _fail(str(e))
    for kind, p in paths.items():
        console.print(f"{kind}: {p}", highlight=False)


def main() -> None:
    app(prog_name="tec-train")


if __name__ == "__main__":
    sys.exit(main())

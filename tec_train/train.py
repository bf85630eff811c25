"""The stage-2 pretraining loop: a student trained by an objective from a feed, resumable bit for bit.

Data flow: objective's feed (cache | online base model | pixels | in memory) --prepare--> StepInputs
on the device --> the objective's forward (mask noise from a checkpointed per-rank generator) --> loss terms -->
AdamW step (warm-up + cosine lr per accumulation window) --> metrics.jsonl / progress /
checkpoint-<step>.pt in the run dir.

Steps count optimizer updates. A run dir is resumed from its latest complete checkpoint, which
holds the model, optimizer, scaler, the loader position (epoch, micro-batch), every rank's RNG
states (mask generator included), the metrics interval in progress and the resolved config, so
a killed and resumed run takes exactly the steps an uninterrupted one takes.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

from tec_cache.basemodels import REGISTRY
from tec_cache.dist import destroy_process_group, dist_info, explain_peer_loss, init_process_group, resolve_device
from tec_cache.faults import fault_point
from tec_cache.format.fs import write_json_atomic, write_text_atomic

from .checkpoint import capture_rng, latest_checkpoint, load_checkpoint, remove_stale_temp_files, restore_rng, save_checkpoint
from .export import load_tec_checkpoint
from .objectives import OBJECTIVES, check_geometry, objective_for, student_geometry
from .schedule import WarmupCosine, absolute_lr
from .student import param_groups, parse_model_name
from .target_feeds import StepInputs, TargetFeed

METRICS_NAME = "metrics.jsonl"
AMP_MODES = ("auto", "bf16", "fp16", "off")
VIEW_ORDERS = ("cycle", "permute")
_MASK_TAG = 0x6D61736B  # separates the mask generator's seed stream from the other per-rank seeds


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the message names the step and the term."""


class ResumeError(ValueError):
    """The run dir's checkpoint was made by a run this configuration cannot continue."""


@dataclass
class TrainConfig:
    """Every option of ``tec-train run``; field ``foo_bar`` is the option ``--foo-bar``."""

    run_dir: str
    # tec: predict a base model's targets (from --cache or online); mae: plain MAE on --data pixels.
    objective: str = "tec"
    cache: str | None = None
    # Online mode (the base model runs inside the step), options as in tec-cache build.
    online_basemodel: str | None = None
    checkpoint: str | None = None
    data: str | None = None
    arch: str | None = None
    topk: int | None = None
    tau: float | None = None
    last_layers: int | None = None
    base_depth: int | None = None
    # Student.
    model: str = "vit_base_patch16"
    depth: int | None = None
    img_size: int | None = None
    patch_size: int | None = None
    mask_ratio: float = 0.75
    init_from: str | None = None
    # Optimisation (spec 4).
    epochs: int = 300
    warmup_epochs: float = 40.0
    batch_size: int = 256
    accum_iter: int = 1
    blr: float = 1.5e-4
    lr: float | None = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    clip_grad: float | None = None
    seed: int = 0
    # Loader.
    num_workers: int = 4
    view_order: str = "cycle"
    # Run control.
    ckpt_every: int = 1000
    keep_last: int = 3
    log_every: int = 20
    max_steps: int | None = None
    device: str = "auto"
    amp: str = "auto"
    compile: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def online(self) -> bool:
        return self.online_basemodel is not None or self.arch is not None

    def validate(self, external_source: bool = False) -> None:
        """Option checks that need no model and no data; ValueError names the option."""
        positive = ("epochs", "batch_size", "accum_iter", "ckpt_every", "keep_last", "log_every")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{_opt(name)}: must be a positive integer, got {value!r}")
        for name in ("depth", "img_size", "patch_size", "max_steps", "topk", "last_layers", "base_depth"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{_opt(name)}: must be a positive integer, got {value!r}")
        for name in ("blr", "lr", "clip_grad", "tau"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{_opt(name)}: must be a positive number, got {value!r}")
        for name in ("warmup_epochs", "min_lr", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{_opt(name)}: must be a number >= 0, got {value!r}")
        if not 0 <= self.mask_ratio < 1:
            raise ValueError(f"--mask-ratio: must be in [0, 1), got {self.mask_ratio!r}")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers: must be >= 0, got {self.num_workers!r}")
        if self.seed < 0:
            raise ValueError(f"--seed: must be an integer >= 0, got {self.seed!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective: expected one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"--amp: expected one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.view_order not in VIEW_ORDERS:
            raise ValueError(f"--view-order: expected one of {', '.join(VIEW_ORDERS)}, got {self.view_order!r}")
        try:
            parse_model_name(self.model)
        except ValueError as e:
            raise ValueError(f"--model: {e}") from None
        if self.init_from is not None and not Path(self.init_from).is_file():
            raise ValueError(f"--init-from: no such file {self.init_from}")
        if Path(self.run_dir).exists() and not Path(self.run_dir).is_dir():
            raise ValueError(f"--run-dir: {self.run_dir} exists and is not a folder")
        self._validate_mode(external_source)

    def _validate_mode(self, external_source: bool) -> None:
        online_only = [n for n in ("checkpoint", "data", "topk", "tau", "last_layers", "base_depth") if getattr(self, n) is not None]
        if self.objective == "mae" and not external_source:
            targets = [n for n in ("cache", "online_basemodel", "arch", "checkpoint", "topk", "tau", "last_layers", "base_depth")
                       if getattr(self, n) is not None]
            if targets:
                raise ValueError(f"{_opt(targets[0])}: --objective mae learns from pixels; it takes --data only, no base model or cache")
            if self.data is None or not Path(self.data).exists():
                raise ValueError(f"--data: --objective mae needs an image folder or .tar shards, got {self.data!r}")
            return
        if external_source:
            if self.cache is not None or self.online or online_only:
                raise ValueError("a target feed was passed in: --cache and the online options must not be set")
            return
        if self.cache is not None and self.online:
            raise ValueError("--cache and --online-basemodel/--arch exclude each other: train from a cache or online")
        if self.cache is None and not self.online:
            raise ValueError("one of --cache CACHE or --online-basemodel NAME (or --arch TIMM_NAME) is required")
        if self.cache is not None:
            if online_only:
                raise ValueError(f"{_opt(online_only[0])}: only for online mode (--online-basemodel), not with --cache")
            if not Path(self.cache).is_dir():
                raise ValueError(f"--cache: no such cache folder {self.cache}")
            return
        if self.online_basemodel is not None and self.online_basemodel not in REGISTRY:
            raise ValueError(f"--online-basemodel: unknown base model {self.online_basemodel!r}; expected one of {sorted(REGISTRY)}")
        if self.checkpoint is None or not Path(self.checkpoint).is_file():
            raise ValueError(f"--checkpoint: online mode needs the base model's weights file, got {self.checkpoint!r}")
        if self.data is None or not Path(self.data).exists():
            raise ValueError(f"--data: online mode needs an image folder or .tar shards, got {self.data!r}")


# Options that may differ when a run dir is resumed: they change where things are or how the run
# is watched, never which steps it takes. The paths are free because a cache or dataset may move;
# what they hold is compared through the resolved target spec instead.
MUTABLE_ON_RESUME = frozenset({
    "run_dir", "cache", "checkpoint", "data", "init_from", "num_workers", "ckpt_every", "keep_last",
    "log_every", "max_steps", "device", "compile",
})


def _opt(name: str) -> str:
    return "--" + name.replace("_", "-")


def config_for_run_dir(run_dir: str, given: dict[str, Any]) -> TrainConfig:
    """The config of ``tec-train run``: the options given on top of the run dir's stored ones when it
    has a checkpoint (so ``tec-train run --run-dir R`` alone resumes), else on top of the defaults.

    Raises ResumeError naming the option when a given option contradicts the stored run.
    """
    ckpt = latest_checkpoint(Path(run_dir))
    if ckpt is None:
        return TrainConfig(**{**given, "run_dir": run_dir})
    stored = load_checkpoint(ckpt)["config"]["options"]
    known = {f.name for f in fields(TrainConfig)}
    _check_options(stored, given, ckpt)
    return TrainConfig(**{**{k: v for k, v in stored.items() if k in known}, **given, "run_dir": run_dir})


def _check_options(stored: dict[str, Any], current: dict[str, Any], ckpt: Path) -> None:
    for name, value in current.items():
        if name in MUTABLE_ON_RESUME or name not in stored:
            continue
        if stored[name] != value:
            raise ResumeError(
                f"{_opt(name)}: the run in {ckpt.parent} was started with {stored[name]!r}, now {value!r}; "
                f"a run dir resumes only with the same settings (use a new --run-dir, or --init-from {ckpt})"
            )


class Reporter:
    """Receives progress on rank 0 (the CLI's rich display implements the same hooks). Every hook is optional."""

    def start(self, *, total_steps: int, start_step: int, summary: dict[str, Any]) -> None:
        """Called once before the first step."""

    def step(self, global_step: int) -> None:
        """Called after every optimizer step."""

    def metrics(self, record: dict[str, Any]) -> None:
        """Called with every record appended to metrics.jsonl."""

    def message(self, text: str) -> None:
        """A one-line notice (resume, ignored options)."""

    def finish(self) -> None:
        """Called once when the loop ends, normally or not."""


@dataclass
class TrainResult:
    run_dir: Path
    global_step: int
    epoch: int
    steps_run: int  # optimizer steps taken by this invocation
    seconds: float  # time in steps (data wait included, checkpoint writes excluded)
    images_per_s: float
    data_wait_fraction: float
    last_record: dict[str, Any] | None
    checkpoint: Path | None
    resumed_from: Path | None
    config: dict[str, Any] = field(default_factory=dict)


def resolve_amp(amp: str, device: torch.device) -> str:
    """auto -> bf16 on CUDA, off elsewhere; mixed precision is refused off CUDA (CPUs here lack bf16 units)."""
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "off"
    if amp != "off" and device.type != "cuda":
        raise ValueError(f"--amp {amp}: mixed precision runs on CUDA only; use --amp off (or auto) on {device}")
    return amp


def _load_strict(student: torch.nn.Module, state: dict[str, torch.Tensor], where: str, model: str) -> None:
    """load_state_dict(strict=True), failing with one short line per kind of mismatch."""
    own = student.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def short(items: list[str]) -> str:
            return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "") if items else "none"

        raise ValueError(f"{where}: does not fit student {model} (depth {student.depth}, width {student.embed_dim}): "
                         f"missing keys: {short(missing)}; unexpected keys: {short(unexpected)}; "
                         f"shape mismatches (checkpoint vs student): {short(shapes)}")
    student.load_state_dict(state, strict=True)


def _mask_seed(seed: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, rank, _MASK_TAG]).generate_state(1, np.uint64)[0])


def truncate_metrics(path: Path, global_step: int) -> None:
    """Keep the records up to ``global_step`` (those the checkpoint has seen); drop later and torn lines."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # the half line of a killed writer
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= global_step:
            kept.append(line)
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


class Trainer:
    """One ``tec-train run``: set up (resume or fresh), loop, checkpoint. Use ``train()``."""

    def __init__(self, cfg: TrainConfig, source: TargetFeed | None, reporter: Reporter | None) -> None:
        cfg.validate(external_source=source is not None)
        self.cfg = cfg
        self.info = dist_info()
        self.device = resolve_device(cfg.device, self.info)
        self.amp = resolve_amp(cfg.amp, self.device)
        self.reporter = reporter if (reporter is not None and self.info.is_main) else Reporter()
        self.run_dir = Path(cfg.run_dir)
        self.resumed_from = latest_checkpoint(self.run_dir)
        self.resume = load_checkpoint(self.resumed_from) if self.resumed_from is not None else None
        if self.resume is not None:
            _check_options(self.resume["config"]["options"], cfg.to_json(), self.resumed_from)
            if self.resume["world_size"] != self.info.world_size:
                raise ResumeError(
                    f"world size: the run in {self.run_dir} was started with {self.resume['world_size']} processes, "
                    f"now {self.info.world_size}; the loader position and per-rank RNG states need the same number"
                )
        self.objective = objective_for(cfg.objective)
        self.owns_source = source is None
        if source is not None:
            check_geometry(student_geometry(cfg, source.spec.img_size), (source.spec.img_size, source.spec.patch_size),
                           "target feed")
            self.source = source
        else:
            self.source = self.objective.open_feed(cfg, self.info, self.device, self.amp)
        self.spe = self.source.steps_per_epoch
        self.usable = self.spe // cfg.accum_iter * cfg.accum_iter
        try:
            if self.usable == 0:
                raise ValueError(f"--accum-iter {cfg.accum_iter} exceeds the {self.spe} micro-batches per epoch of each "
                                 f"rank (batch {cfg.batch_size} x {self.info.world_size} processes)")
            if self.resume is not None:
                self._check_resumable(self.resume)
            # Built here, not in run(): an --init-from checkpoint that does not fit the student is a
            # bad option (exit 2 before any work), not a failure of the run.
            self._build()
        except ValueError:
            if self.owns_source:
                self.source.close()
            raise

    def _check_resumable(self, ck: dict[str, Any]) -> None:
        """The stored run must have used the same targets and epoch length this source gives now."""
        stored, now = ck["config"]["resolved"]["targets"], self.source.spec.to_json()
        for key in self.source.spec.IDENTITY:
            if stored.get(key) != now[key]:
                raise ResumeError(f"targets changed since the run started: {key} was {stored.get(key)}, now {now[key]}")
        if stored["origin"].get("base_sha256") != now["origin"].get("base_sha256"):
            raise ResumeError("targets changed since the run started: they come from a different base-model checkpoint")
        if ck["loader"]["steps_per_epoch"] != self.spe:
            raise ResumeError(f"the source now gives {self.spe} micro-batches per epoch, the run was started with "
                              f"{ck['loader']['steps_per_epoch']}")

    # ---- setup -------------------------------------------------------------------------------
    def _build(self) -> None:
        cfg, spec = self.cfg, self.source.spec
        self.terms = self.objective.terms
        # The same seed on every rank gives every rank the same initial weights (DDP would also
        # broadcast rank 0's); afterwards each rank draws from its own stream, as the reference.
        torch.manual_seed(cfg.seed)
        self.student: Any = self.objective.build(cfg, spec)
        torch.manual_seed(cfg.seed + self.info.rank)
        np.random.seed((cfg.seed + self.info.rank) % 2**32)
        random.seed(cfg.seed + self.info.rank)
        self.mask_gen = torch.Generator().manual_seed(_mask_seed(cfg.seed, self.info.rank))
        if self.resume is None and cfg.init_from is not None:
            _load_strict(self.student, load_tec_checkpoint(cfg.init_from), f"--init-from {cfg.init_from}", cfg.model)
        self.student.to(self.device)
        self.eff_batch = cfg.batch_size * cfg.accum_iter * self.info.world_size
        self.peak_lr = cfg.lr if cfg.lr is not None else absolute_lr(cfg.blr, self.eff_batch)
        self.schedule = WarmupCosine(self.peak_lr, cfg.min_lr, min(cfg.warmup_epochs, cfg.epochs), cfg.epochs)
        self.optimizer = torch.optim.AdamW(param_groups(self.student, cfg.weight_decay), lr=self.peak_lr,
                                           betas=(0.9, 0.95), fused=self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        self.resolved = {
            "world_size": self.info.world_size,
            "eff_batch": self.eff_batch,
            "lr": self.peak_lr,
            "warmup_epochs": self.schedule.warmup_epochs,
            "steps_per_epoch": self.spe,
            "optimizer_steps_per_epoch": self.usable // cfg.accum_iter,
            "amp": self.amp,
            "objective": cfg.objective,
            "targets": spec.to_json(),
            "student": {
                "model": cfg.model, **self.student.encoder_config(), "mask_ratio": cfg.mask_ratio,
                "trainable_params": sum(p.numel() for p in self.student.parameters() if p.requires_grad),
                **self.objective.describe(self.student, spec),
            },
        }

    def _restore(self) -> tuple[int, int, int]:
        """Load the resumed checkpoint into the built objects; returns (epoch, micro-batch, global step)."""
        if self.resume is None:
            self.log_accum = self._empty_accum()
            return 0, 0, 0
        ck = self.resume
        self.student.load_state_dict(ck["model"], strict=True)
        self.optimizer.load_state_dict(ck["optimizer"])
        if ck["scaler"] is not None:
            self.scaler.load_state_dict(ck["scaler"])
        restore_rng(ck["rng"][self.info.rank], self.mask_gen)
        self.log_accum = dict(ck["log_accum"])
        self.resume = None  # everything is copied out; let the mapped file go
        return ck["epoch"], ck["step_in_epoch"], ck["global_step"]

    # ---- checkpoint and metrics -----------------------------------------------------------------
    def _save(self, epoch: int, step_in_epoch: int, global_step: int) -> Path | None:
        rng = capture_rng(self.mask_gen)
        if self.distributed:
            every: list[Any] = [None] * self.info.world_size
            tdist.all_gather_object(every, rng)
        else:
            every = [rng]
        if not self.info.is_main:
            return None
        state = {
            "model": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "loader": {"steps_per_epoch": self.spe, "view_epoch": self.source.view_epoch_for(epoch)},
            "log_accum": dict(self.log_accum),
            "rng": every,
            "world_size": self.info.world_size,
            "config": {"options": self.cfg.to_json(), "resolved": self.resolved},
        }
        return save_checkpoint(self.run_dir, state, global_step, self.cfg.keep_last)

    def _empty_accum(self) -> dict[str, Any]:
        return {**{t: 0.0 for t in self.terms}, "n": 0}

    def _log(self, global_step: int, epoch: int, epoch_f: float, lr: float, timing: dict[str, float]) -> dict[str, Any]:
        n = self.log_accum["n"]
        images = timing["micro"] * self.cfg.batch_size * self.info.world_size
        record = {
            "step": global_step,
            "epoch": epoch,
            "epoch_f": epoch_f,
            **{t: self.log_accum[t] / n for t in self.terms},
            "lr": lr,
            "images_per_s": images / max(timing["step_s"], 1e-12),
            "data_wait_fraction": timing["wait_s"] / max(timing["step_s"], 1e-12),
            "time": time.time(),
        }
        self.log_accum = self._empty_accum()
        if self.info.is_main:
            with open(self.run_dir / METRICS_NAME, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            self.reporter.metrics(record)
        return record

    # ---- the loop ------------------------------------------------------------------------------
    def _losses(self, out: Any) -> list[float]:
        """The objective's loss terms averaged over ranks; one sync per micro-batch, as the reference's .item()."""
        vals = torch.stack([getattr(out, t).detach() for t in self.terms]).float()  # [terms]
        if self.distributed:
            tdist.all_reduce(vals)
            vals /= self.info.world_size
        return vals.tolist()

    def _setup(self) -> tuple[int, int, int]:
        """Restore, join the process group, wrap; returns the position (epoch, micro-batch, step)."""
        cfg = self.cfg
        epoch, it, global_step = self._restore()
        if self.device.type == "cuda":
            # NCCL's object collectives (the RNG gather of _save) address the current device.
            torch.cuda.set_device(self.device)
        self.owns_group = self.info.world_size > 1 and not (tdist.is_available() and tdist.is_initialized())
        self.distributed = init_process_group(self.info, self.device)
        if self.distributed:
            # Each rank found its own latest checkpoint; on a run dir that is not shared they differ.
            steps: list[Any] = [None] * self.info.world_size
            tdist.all_gather_object(steps, global_step)
            if len(set(steps)) != 1:
                raise ResumeError(f"ranks resume from different steps {steps}: --run-dir must be one folder every rank sees")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
        # Every parameter feeds the loss (cls MLP, both decoders), so DDP needs no unused-parameter search.
        self.ddp = (DistributedDataParallel(self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
                    if self.distributed else None)
        self.model: Any = self.ddp if self.ddp is not None else self.student
        if cfg.compile and self.device.type == "cuda":
            self.model = torch.compile(self.model)
        elif cfg.compile:
            self.reporter.message(f"--compile ignored on {self.device}: CPU runs eager")
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)
                         if self.amp != "off" else contextlib.nullcontext())
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(self.run_dir)
            truncate_metrics(self.run_dir / METRICS_NAME, global_step)
            write_json_atomic(self.run_dir / "config.json", {"options": cfg.to_json(), "resolved": self.resolved})
            if self.resumed_from is not None:
                self.reporter.message(f"resuming {self.resumed_from.name}: epoch {epoch}, micro-batch {it}, step {global_step}")
        return epoch, it, global_step

    def _micro_step(self, item: Any, sync: bool, where: str) -> list[float]:
        """Forward and backward of one micro-batch; gradients are all-reduced only when ``sync``."""
        inputs: StepInputs = self.source.prepare(item, self.device)
        b = inputs.images.shape[0]
        noise = torch.rand(b, self.student.num_patches, generator=self.mask_gen).to(self.device, non_blocking=True)  # [B, L]
        no_sync = self.ddp.no_sync() if (self.ddp is not None and not sync) else contextlib.nullcontext()
        with no_sync:
            with self.autocast:
                out = self.objective.forward(self.model, inputs, noise)
            losses = self._losses(out)
            named = list(zip(self.terms, losses))
            # The parts name what broke; an objective with one term names its total.
            bad = [f"{n} = {v}" for n, v in (named[1:] or named) if not math.isfinite(v)]
            if bad:
                raise NonFiniteLossError(f"non-finite loss at {where}: {', '.join(bad)}")
            self.scaler.scale(out.loss / self.cfg.accum_iter).backward()
        for name, v in named:
            self.log_accum[name] += v
        self.log_accum["n"] += 1
        return losses

    def _optimizer_step(self) -> None:
        if self.cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def run(self) -> TrainResult:
        cfg = self.cfg
        timing = {"micro": 0, "step_s": 0.0, "wait_s": 0.0}  # since the last metrics record
        total = {"micro": 0, "step_s": 0.0, "wait_s": 0.0}  # this invocation
        last_record: dict[str, Any] | None = None
        last_ckpt: Path | None = None
        self.owns_group = False
        try:
            epoch, it, global_step = self._setup()
            start_step = global_step
            stop_at = cfg.epochs * (self.usable // cfg.accum_iter)
            if cfg.max_steps is not None:
                stop_at = min(stop_at, cfg.max_steps)
            self.reporter.start(total_steps=stop_at, start_step=global_step, summary=self.resolved)
            while global_step < stop_at:
                self.model.train()
                self.optimizer.zero_grad(set_to_none=True)
                batches: Iterator[Any] = iter(self.source.epoch(epoch, start_step=it))
                while it < self.usable and global_step < stop_at:
                    t0 = time.perf_counter()
                    wait = 0.0
                    # The reference sets the lr at the start of each accumulation window.
                    lr = self.schedule(it / self.spe + epoch)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    for j in range(cfg.accum_iter):
                        tw = time.perf_counter()
                        item = next(batches, None)
                        wait += time.perf_counter() - tw
                        if item is None:
                            raise RuntimeError(f"the target feed ended epoch {epoch} after {it} of {self.spe} micro-batches")
                        self._micro_step(item, sync=j == cfg.accum_iter - 1,
                                         where=f"step {global_step + 1} (epoch {epoch}, micro-batch {it})")
                        it += 1
                    self._optimizer_step()
                    global_step += 1
                    dt = time.perf_counter() - t0
                    for acc in (timing, total):
                        acc["micro"] += cfg.accum_iter
                        acc["step_s"] += dt
                        acc["wait_s"] += wait
                    fault_point("train_step")
                    self.reporter.step(global_step)
                    epoch_done = it >= self.usable
                    stopping = global_step >= stop_at
                    if global_step % cfg.log_every == 0 or stopping:
                        last_record = self._log(global_step, epoch, it / self.spe + epoch, lr, timing)
                        timing = {"micro": 0, "step_s": 0.0, "wait_s": 0.0}
                    if global_step % cfg.ckpt_every == 0 or epoch_done or stopping:
                        # The position saved is the next micro-batch to run.
                        pos = (epoch + 1, 0) if epoch_done else (epoch, it)
                        last_ckpt = self._save(pos[0], pos[1], global_step) or last_ckpt
                # Shut the epoch's loader workers down now, also when max_steps stops mid-epoch.
                getattr(batches, "close", lambda: None)()
                if it >= self.usable:
                    # The micro-batches of an incomplete last window are not run: the reference runs
                    # them and then discards their gradient at the next epoch's zero_grad (spec 8.13).
                    epoch, it = epoch + 1, 0
        except (RuntimeError, OSError) as e:
            # A peer rank that died mid-collective: one clear line, not a gloo/NCCL traceback.
            lost = explain_peer_loss(e, "training", "re-run the same command to resume from the last checkpoint")
            if lost is None:
                raise
            raise lost from e
        finally:
            self.reporter.finish()
            if self.owns_source:
                self.source.close()
            if self.owns_group:
                destroy_process_group()
        return TrainResult(
            run_dir=self.run_dir, global_step=global_step, epoch=epoch, steps_run=global_step - start_step,
            seconds=total["step_s"],
            images_per_s=total["micro"] * cfg.batch_size * self.info.world_size / max(total["step_s"], 1e-12),
            data_wait_fraction=total["wait_s"] / max(total["step_s"], 1e-12), last_record=last_record,
            checkpoint=last_ckpt or self.resumed_from, resumed_from=self.resumed_from,
            config={"options": cfg.to_json(), "resolved": self.resolved},
        )


def train(cfg: TrainConfig, *, source: TargetFeed | None = None, reporter: Reporter | None = None) -> TrainResult:
    """Train (or resume) the run ``cfg`` describes; ``source`` replaces the cache/online source (e.g. in memory)."""
    return Trainer(cfg, source, reporter).run()

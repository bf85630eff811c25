"""The stage-2 pretraining loop: a student trained by an objective from a feed, resumable bit for bit.

Data flow: objective's feed (cache | online base model | pixels | in memory) --prepare--> StepInputs
on the device --> the objective's forward (mask noise from a checkpointed per-rank generator) -->
loss terms --> AdamW step (warm-up + cosine lr per accumulation window) --> metrics.jsonl /
progress / checkpoint-<step>.pt in the run dir (through the run harness, ``harness``).

Steps count optimizer updates. One run writes a run dir at a time (its writer lock, taken first). A
run dir is resumed from its newest intact checkpoint (checked against its sha256), which
holds the model, optimizer, scaler, the loader position (epoch, micro-batch), every rank's RNG
states, the metrics interval in progress and the resolved config, so a killed and resumed run takes
exactly the steps an uninterrupted one takes. A larger --epochs on resume extends the run from its
checkpoint; the schedule then follows the new total. A run may also resume on another number of
processes (``elastic``): the effective batch, the epoch's sample position, the schedule and the step
count carry over; mask noise is drawn per (seed, step, rank, micro-batch), so it is defined for any
process count (runs started before that scheme continue their checkpointed mask stream).
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from tec_cache.runtime.dist import explain_peer_loss
from tec_cache.runtime.faults import fault_point

from .elastic import Layout, fit_layout, micro_batch_after
from .harness import (
    PRETRAIN,
    Reporter,
    Resume,
    RunKind,
    RunState,
    Runtime,
    agree_on_position,
    find_resume,
    open_run_dir,
    run_config,
    seed_rank,
)
from .harness.checkpoint_state import PretrainCheckpoint
from .harness.errors import ResumeError
from .harness.reporting import truncate_metrics
from .harness.step import AccumulatingStep, MicroBatch, next_micro_batch
from .harness.trackers import MetricSinks, open_sinks
from .harness.writer import take_run_dir_for
from .held_out import HeldOutLoss
from .objectives import check_geometry, objective_for, student_geometry
from .schedule import build_schedule
from .student import param_groups
from .student_to_timm import load_tec_checkpoint
from .target_feeds import StepInputs, TargetFeed
from .train_config import MUTABLE_ON_RESUME, TrainConfig

_MASK_TAG = 0x6D61736B  # separates the mask generator's seed stream from the other per-rank seeds

PRETRAIN_RUN = RunKind(
    checkpoints=PRETRAIN, label="run", mutable=MUTABLE_ON_RESUME,
    fresh_start="use a new --run-dir, or --init-from {ckpt}",
    world_size_needs="the loader position and per-rank RNG states need the same number",
    progress_key="step", elastic=frozenset({"batch_size", "accum_iter"}),
)
# Mask noise: "per-step" draws each micro-batch's from (seed, step, rank, micro-batch); "stream" (runs
# started before it) from one checkpointed generator per rank, which has no meaning on another count.
MASK_PER_STEP, MASK_STREAM = "per-step", "stream"
SAMPLES_LOG = "samples-rank{rank}.jsonl"


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


def _mask_seed(seed: int, rank: int, *position: int) -> int:
    """A 64-bit seed from (seed, rank[, step, micro-batch]); one stream per rank without a position."""
    return int(np.random.SeedSequence([seed, rank, _MASK_TAG, *position]).generate_state(1, np.uint64)[0])


class Trainer:
    """One ``tec-train run``: set up (resume or fresh), loop, checkpoint. Use ``train()``."""

    def __init__(self, cfg: TrainConfig, source: TargetFeed | None, reporter: Reporter | None) -> None:
        cfg.validate(external_source=source is not None)
        self.cfg = cfg
        self.objective = objective_for(cfg.objective)
        self.runtime = Runtime(cfg.run.device, cfg.run.amp)
        self.info, self.device, self.amp = self.runtime.info, self.runtime.device, self.runtime.amp
        self.reporter = reporter if (reporter is not None and self.info.is_main) else Reporter()
        self.run_dir = Path(cfg.run_dir)
        self.sinks = MetricSinks(self.run_dir)  # rank 0 opens its trackers in _setup
        # One writer per run dir, taken before anything is read from it or written to it.
        self.lock = take_run_dir_for(self.runtime, self.run_dir, "tec-train run", self.reporter.message,
                                     lambda: self._prepare(cfg, source))

    def _prepare(self, cfg: TrainConfig, source: TargetFeed | None) -> None:
        self.resume: Resume | None = find_resume(self.run_dir, PRETRAIN_RUN, cfg.to_json(), self.info.world_size,
                                                 self.reporter.message)
        self.resumed_from = self.resume.path if self.resume is not None else None
        self.owns_source = source is None
        if source is not None:
            check_geometry(student_geometry(cfg, source.spec.img_size), (source.spec.img_size, source.spec.patch_size),
                           "target feed")
            self.source = source
        else:
            self.source = self.objective.open_feed(cfg, self.info, self.device, self.amp)
        self.micro_batches_per_epoch = self.source.steps_per_epoch
        self.layout = Layout(self.info.world_size, cfg.optim.batch_size, cfg.optim.accum_iter)
        self.saved_layout = self.layout
        if self.resume is not None:
            self.cfg = cfg = self._fit_layout(self.resume.state(PretrainCheckpoint))
        # An incomplete last accumulation window is not run (method.md 8.13): whole windows only.
        self.micro_batches_run_per_epoch = self.micro_batches_per_epoch // cfg.optim.accum_iter * cfg.optim.accum_iter
        try:
            if self.micro_batches_run_per_epoch == 0:
                raise ValueError(f"--accum-iter {cfg.optim.accum_iter} exceeds the {self.micro_batches_per_epoch} micro-batches "
                                 f"per epoch of each rank (batch {cfg.optim.batch_size} x {self.info.world_size} processes)")
            if self.resume is not None:
                self._check_resumable(self.resume.state(PretrainCheckpoint))
            self.held_out = None if cfg.val.val_cache is None else HeldOutLoss(
                cfg.val.val_cache, self.source.spec, batch_size=cfg.optim.batch_size, rank=self.info.rank,
                world_size=self.info.world_size, num_workers=cfg.loader.num_workers, seed=cfg.optim.seed)
            # Built here, not in run(): an --init-from checkpoint that does not fit the student is a
            # bad option (exit 2 before any work), not a failure of the run.
            self._build()
        except ValueError:
            if self.owns_source:
                self.source.close()
            held_out = getattr(self, "held_out", None)  # not set when the failure came before it
            if held_out is not None:
                held_out.close()
            raise

    def _fit_layout(self, ck: PretrainCheckpoint) -> TrainConfig:
        """This launch's config with the accumulation that keeps the checkpoint's effective batch."""
        self.saved_layout = Layout(ck.world_size, ck.options["batch_size"], ck.options["accum_iter"])
        self.layout = fit_layout(self.saved_layout, self.layout, str(self.run_dir))
        if self.layout.accum_iter == self.cfg.optim.accum_iter:
            return self.cfg
        optim = replace(self.cfg.optim, accum_iter=self.layout.accum_iter)
        return replace(self.cfg, optim=optim)  # type: ignore[type-var]  # nested_config makes the dataclass at runtime

    def _check_resumable(self, ck: PretrainCheckpoint) -> None:
        """The stored run must have used the same targets and epoch length this source gives now."""
        changed = self.source.spec.difference(ck.resolved.targets)
        if changed is not None:
            raise ResumeError(f"targets changed since the run started: {changed}")
        if self.layout == self.saved_layout and ck.loader.steps_per_epoch != self.micro_batches_per_epoch:
            raise ResumeError(f"the source now gives {self.micro_batches_per_epoch} micro-batches per epoch, the run "
                              f"was started with {ck.loader.steps_per_epoch}")
        steps = self.micro_batches_run_per_epoch // self.layout.accum_iter
        if steps != ck.resolved.optimizer_steps_per_epoch:
            raise ResumeError(f"the source now gives {steps} optimizer steps per epoch ({self.layout.describe()}), the "
                              f"run was started with {ck.resolved.optimizer_steps_per_epoch}")

    # ---- setup -------------------------------------------------------------------------------
    def _build(self) -> None:
        cfg, spec = self.cfg, self.source.spec
        self.terms = self.objective.terms
        # The same seed on every rank gives every rank the same initial weights (DDP would also
        # broadcast rank 0's); afterwards each rank draws from its own stream, as the reference.
        torch.manual_seed(cfg.optim.seed)
        # The objective's own model (its encoder_config, num_patches, ... are used): Any, not nn.Module.
        self.student: Any = cast(Any, self.objective.build(cfg, spec))
        seed_rank(cfg.optim.seed, self.info.rank)
        self.mask_gen = torch.Generator().manual_seed(_mask_seed(cfg.optim.seed, self.info.rank))
        if self.resume is None and cfg.student.init_from is not None:
            _load_strict(self.student, load_tec_checkpoint(cfg.student.init_from), f"--init-from {cfg.student.init_from}", cfg.student.model)
        self.student.to(self.device)
        self.eff_batch = cfg.optim.batch_size * cfg.optim.accum_iter * self.info.world_size
        self.schedule = build_schedule(cfg.optim, self.eff_batch)
        self.peak_lr = self.schedule.lr
        self.optimizer = torch.optim.AdamW(param_groups(self.student, cfg.optim.weight_decay), lr=self.peak_lr,
                                           betas=(0.9, 0.95), fused=self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        self.state = RunState(self.student, self.optimizer, self.scaler, self.mask_gen)
        self._schedule_position()
        self.resolved = {
            "world_size": self.info.world_size,
            "eff_batch": self.eff_batch,
            "lr": self.peak_lr,
            "warmup_epochs": self.schedule.warmup_epochs,
            "steps_per_epoch": self.micro_batches_per_epoch,
            "optimizer_steps_per_epoch": self.micro_batches_run_per_epoch // cfg.optim.accum_iter,
            "epoch_samples": self.epoch_samples,
            "mask_noise": self.mask_noise,
            "layouts": self.layouts,
            "amp": self.amp,
            "objective": cfg.objective,
            "targets": spec.to_json(),
            "student": {
                "model": cfg.student.model, **self.student.encoder_config(), "mask_ratio": cfg.student.mask_ratio,
                "trainable_params": sum(p.numel() for p in self.student.parameters() if p.requires_grad),
                **self.objective.describe(self.student, spec),
            },
        }
        self.extended: list[dict[str, int]] = []

    def _schedule_position(self) -> None:
        """What the run keeps across layouts: the samples an epoch fraction is counted in, the mask
        scheme, and the layouts it ran with (from which step)."""
        if self.resume is None:
            self.epoch_samples: int = self.micro_batches_per_epoch * self.layout.per_micro_step
            self.mask_noise: str = MASK_PER_STEP
            self.layouts: list[dict[str, int]] = [{"from_step": 0, **self._layout_json()}]
            return
        ck = self.resume.state(PretrainCheckpoint)
        res = ck.resolved
        # Runs from before elastic resume count an epoch in their own layout's micro-batches, draw
        # their masks from one checkpointed stream per rank, and ran in one layout.
        self.epoch_samples = (res.epoch_samples if res.epoch_samples is not None
                              else ck.loader.steps_per_epoch * self.saved_layout.per_micro_step)
        self.mask_noise = res.mask_noise if res.mask_noise is not None else MASK_STREAM
        self.layouts = (list(res.layouts) if res.layouts is not None
                        else [{"from_step": 0, **self._layout_json(self.saved_layout)}])
        if self.layout != self.saved_layout:
            self.layouts.append({"from_step": ck.global_step, **self._layout_json()})
            if self.layout.world_size != self.saved_layout.world_size:
                self.mask_noise = MASK_PER_STEP  # a per-rank stream has no meaning on another count

    def _layout_json(self, layout: Layout | None = None) -> dict[str, int]:
        lay = layout or self.layout
        return {"world_size": lay.world_size, "batch_size": lay.batch_size, "accum_iter": lay.accum_iter}

    def _epoch_f(self, epoch: int, micro_batch: int) -> float:
        """Epochs done at this micro-batch, as the schedule and the metrics count them: the reference's
        ``micro_batch / micro_batches_per_epoch + epoch``, counted in samples so that it carries over
        to another layout (the same float in the run's own layout: both are one correctly rounded
        division of the same rational number)."""
        return micro_batch * self.layout.per_micro_step / self.epoch_samples + epoch

    def _restore(self) -> tuple[int, int, int]:
        """Load the resumed checkpoint into the built objects; returns (epoch, micro-batch, global step)."""
        if self.resume is None:
            self.log_accum = self._empty_accum()
            return 0, 0, 0
        ck = self.resume.state(PretrainCheckpoint)
        same_world = ck.world_size == self.info.world_size
        self.state.restore(ck, self.info.rank, rng=same_world)
        epoch, global_step = ck.epoch, ck.global_step
        if not same_world:
            # Every rank's streams anew, from (seed, step, rank): defined for any process count.
            seed_rank(_mask_seed(self.cfg.optim.seed, self.info.rank, global_step) % 2**31, 0)
        self.log_accum = dict(ck.log_accum)
        it = micro_batch_after(self.saved_layout, ck.step_in_epoch, self.layout)
        self.extended = self.resume.history(global_step, epoch)
        self.resume.release()  # everything is copied out; let the mapped file go
        return epoch, it, global_step

    # ---- checkpoint and metrics -----------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return run_config(self.cfg.to_json(), self.resolved, self.extended)

    def _save(self, epoch: int, step_in_epoch: int, global_step: int) -> Path | None:
        position = {
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "loader": {"steps_per_epoch": self.micro_batches_per_epoch, "view_epoch": self.source.view_epoch_for(epoch)},
            "log_accum": dict(self.log_accum),
            "config": self._config(),
        }
        self.lock.ensure()
        return self.state.save(self.runtime, self.run_dir, PRETRAIN_RUN, global_step, self.cfg.run.keep_last, position)

    def _empty_accum(self) -> dict[str, Any]:
        return {**{t: 0.0 for t in self.terms}, "n": 0}

    def _held_out(self, global_step: int, epoch: int, epoch_f: float, log_too: bool) -> dict[str, float]:
        """The held-out loss terms at this step; written as their own record unless the step logs anyway."""
        assert self.held_out is not None
        with torch.random.fork_rng(devices=[]):  # the training's random streams stay as they were
            values = self.held_out.evaluate(self.objective, self.student, self.terms, self.runtime,
                                            self.student.num_patches)
        self.reporter.message(f"held-out loss at step {global_step}: "
                              + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
        if not log_too and self.info.is_main:
            self.sinks.write({"step": global_step, "epoch": epoch, "epoch_f": epoch_f, **values, "time": time.time()})
        return values

    def _log(self, global_step: int, epoch: int, epoch_f: float, lr: float, timing: dict[str, float],
             extra: dict[str, float] | None = None) -> dict[str, Any]:
        n = self.log_accum["n"]
        images = timing["micro"] * self.cfg.optim.batch_size * self.info.world_size
        record = {
            "step": global_step,
            "epoch": epoch,
            "epoch_f": epoch_f,
            **{t: self.log_accum[t] / n for t in self.terms},
            "lr": lr,
            "images_per_s": images / max(timing["step_s"], 1e-12),
            "data_wait_fraction": timing["wait_s"] / max(timing["step_s"], 1e-12),
            **(extra or {}),
            "time": time.time(),
        }
        self.log_accum = self._empty_accum()
        if self.info.is_main:
            self.sinks.write(record)
            self.reporter.record(record)
        return record

    # ---- the loop ------------------------------------------------------------------------------
    def _losses(self, out: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to backpropagate and the objective's loss terms averaged over ranks; one sync per
        micro-batch, as the reference's .item()."""
        vals = torch.stack([getattr(out, t).detach() for t in self.terms]).float()  # [terms]
        if self.runtime.distributed:
            self.runtime.all_reduce_(vals)
            vals /= self.info.world_size
        return out.loss, dict(zip(self.terms, vals.tolist()))

    def _setup(self) -> tuple[int, int, int]:
        """Restore, join the process group, wrap; returns the position (epoch, micro-batch, step)."""
        cfg = self.cfg
        epoch, it, global_step = self._restore()
        if self.info.is_main and self.resume is not None:
            # Sample records past the checkpoint are redone (by whichever ranks exist now).
            for path in self.run_dir.glob(SAMPLES_LOG.format(rank="*")):
                truncate_metrics(path, "step", global_step)
        self.runtime.join()
        agree_on_position(self.runtime, global_step, "steps")
        # Every parameter feeds the loss (cls MLP, both decoders), so DDP needs no unused-parameter search.
        self.model: Any = self.runtime.wrap(self.student)
        self.ddp = self.model if self.runtime.distributed else None
        if cfg.run.compile and self.device.type == "cuda":
            self.model = torch.compile(self.model)
        elif cfg.run.compile:
            self.reporter.message(f"--compile ignored on {self.device}: CPU runs eager")
        self.step = AccumulatingStep(runtime=self.runtime, module=self.student, ddp=self.ddp, optimizer=self.optimizer,
                                     scaler=self.scaler, schedule=self.schedule, accum_iter=cfg.optim.accum_iter,
                                     clip_grad=cfg.optim.clip_grad)
        if self.info.is_main:
            open_run_dir(self.run_dir, PRETRAIN_RUN, global_step, self._config())
            self.sinks = open_sinks(self.run_dir, kept_step=global_step, tensorboard=cfg.run.tensorboard,
                                    wandb_project=cfg.run.wandb, config=self._config(), notice=self.reporter.message)
            if self.resume is not None:
                self.reporter.message(f"resuming {self.resume.path.name}: epoch {epoch}, micro-batch {it}, step {global_step}")
                if self.layout != self.saved_layout:
                    self.reporter.message(f"layout changed: {self.saved_layout.describe()} -> {self.layout.describe()}; "
                                          "the effective batch, the epoch's sample position and the schedule carry over")
                if self.resume.extension is not None:
                    self.reporter.message(self.resume.extension.notice(global_step, epoch))
        return epoch, it, global_step

    def _window(self, batches: Iterator[Any], epoch: int, it: int, step: int, wait: list[float]) -> Iterator[MicroBatch]:
        """The micro-batches of optimizer step ``step`` (1-based), from micro-batch ``it`` of ``epoch`` on,
        prepared on the device with their mask noise; the time spent waiting for data goes to ``wait[0]``."""
        for j in range(self.cfg.optim.accum_iter):
            item = next_micro_batch(batches, wait, "the target feed", epoch, it + j, self.micro_batches_per_epoch)
            if self.cfg.run.log_samples:
                self._log_samples(item, step, epoch, it + j)
            inputs: StepInputs = self.source.prepare(item, self.device)
            b = inputs.images.shape[0]
            if self.mask_noise == MASK_PER_STEP:
                self.mask_gen.manual_seed(_mask_seed(self.cfg.optim.seed, self.info.rank, step, j))
            noise = torch.rand(b, self.student.num_patches, generator=self.mask_gen).to(self.device, non_blocking=True)  # [B, L]
            yield MicroBatch(partial(self.objective.forward, self.model, inputs, noise), self._losses,
                             f"step {step} (epoch {epoch}, micro-batch {it + j})")

    def _log_samples(self, item: Any, step: int, epoch: int, micro_batch: int) -> None:
        """One line per micro-batch in this rank's samples log: which (view-epoch, image) it trains on."""
        index = getattr(item, "image_index", None)
        if index is None:
            return  # an in-memory feed has no sample identity
        rec = {"step": step, "epoch": epoch, "micro_batch": micro_batch, "view_epoch": int(item.view_epoch),
               "image_index": index.tolist()}
        with open(self.run_dir / SAMPLES_LOG.format(rank=self.info.rank), "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    def run(self) -> TrainResult:
        cfg = self.cfg
        micro_batches_run = self.micro_batches_run_per_epoch
        timing = {"micro": 0, "step_s": 0.0, "wait_s": 0.0}  # since the last metrics record
        total = {"micro": 0, "step_s": 0.0, "wait_s": 0.0}  # this invocation
        last_record: dict[str, Any] | None = None
        last_ckpt: Path | None = None
        try:
            epoch, it, global_step = self._setup()
            start_step = global_step
            stop_at = cfg.optim.epochs * (micro_batches_run // cfg.optim.accum_iter)
            if cfg.run.max_steps is not None:
                stop_at = min(stop_at, cfg.run.max_steps)
            self.reporter.start(total=stop_at, done=global_step, summary=self.resolved)
            while global_step < stop_at:
                self.model.train()
                self.optimizer.zero_grad(set_to_none=True)
                batches: Iterator[Any] = iter(self.source.epoch(epoch, start_step=it))
                while it < micro_batches_run and global_step < stop_at:
                    t0 = time.perf_counter()
                    wait = [0.0]
                    lr, values = self.step(self._epoch_f(epoch, it), self._window(batches, epoch, it, global_step + 1, wait))
                    for named in values:
                        for name, v in named.items():
                            self.log_accum[name] += v
                        self.log_accum["n"] += 1
                    it += cfg.optim.accum_iter
                    global_step += 1
                    dt = time.perf_counter() - t0
                    for acc in (timing, total):
                        acc["micro"] += cfg.optim.accum_iter
                        acc["step_s"] += dt
                        acc["wait_s"] += wait[0]
                    fault_point("train_step")
                    self.reporter.advance(global_step)
                    epoch_done = it >= micro_batches_run
                    stopping = global_step >= stop_at
                    logging = global_step % cfg.run.log_every == 0 or stopping
                    held_out = None
                    if self.held_out is not None and (global_step % cfg.val.val_every == 0 or stopping):
                        held_out = self._held_out(global_step, epoch, self._epoch_f(epoch, it), logging)
                    if logging:
                        last_record = self._log(global_step, epoch, self._epoch_f(epoch, it), lr, timing, held_out)
                        timing = {"micro": 0, "step_s": 0.0, "wait_s": 0.0}
                    if global_step % cfg.run.ckpt_every == 0 or epoch_done or stopping:
                        # The position saved is the next micro-batch to run.
                        pos = (epoch + 1, 0) if epoch_done else (epoch, it)
                        last_ckpt = self._save(pos[0], pos[1], global_step) or last_ckpt
                # Shut the epoch's loader workers down now, also when max_steps stops mid-epoch.
                getattr(batches, "close", lambda: None)()
                if it >= micro_batches_run:
                    # The micro-batches of an incomplete last window are not run: the reference runs
                    # them and then discards their gradient at the next epoch's zero_grad (method.md 8.13).
                    epoch, it = epoch + 1, 0
        except (RuntimeError, OSError) as e:
            # A peer rank that died mid-collective: one clear line, not a gloo/NCCL traceback.
            lost = explain_peer_loss(e, "training", "re-run the same command to resume from the last checkpoint")
            if lost is None:
                raise
            raise lost from e
        finally:
            self.sinks.close()
            self.lock.ending()
            self.reporter.finish()
            if self.owns_source:
                self.source.close()
            if self.held_out is not None:
                self.held_out.close()
            self.runtime.leave()
            self.lock.release()
        return TrainResult(
            run_dir=self.run_dir, global_step=global_step, epoch=epoch, steps_run=global_step - start_step,
            seconds=total["step_s"],
            images_per_s=total["micro"] * cfg.optim.batch_size * self.info.world_size / max(total["step_s"], 1e-12),
            data_wait_fraction=total["wait_s"] / max(total["step_s"], 1e-12), last_record=last_record,
            checkpoint=last_ckpt or self.resumed_from, resumed_from=self.resumed_from,
            config=self._config(),
        )


def train(cfg: TrainConfig, *, source: TargetFeed | None = None, reporter: Reporter | None = None) -> TrainResult:
    """Train (or resume) the run ``cfg`` describes; ``source`` replaces the cache/online source (e.g. in memory)."""
    return Trainer(cfg, source, reporter).run()

"""The held-out target loss: how well the student predicts the base model on views it never trains on.

Data flow: --val-cache (an ordinary cache of held-out images, or of training images at view indices
the training cache does not hold) --> checked against the training targets (same base-model
checkpoint, same target shape) --> every --val-every steps and at the end: each rank's share of its
views through the student, no gradient, masks from a fixed seed --> mean loss terms over all ranks
--> ``val_loss``, ``val_loss_fea``, ``val_loss_att`` in metrics.jsonl (``tec-train plot`` draws them).

The same weights give the same numbers at any step (fixed masks, fixed sample set); the training
run's random streams are never touched, so a run with and without --val-cache trains identically.
"""
from __future__ import annotations

from typing import Any

import torch

from tec_cache.format.manifest import ManifestError, load_manifest

from .harness.runtime import Runtime
from .target_feeds import CacheTargetFeed, ImageSpec, TargetSpec

# Seeds the held-out masks; a stream of its own, apart from the training masks' (seed, rank) streams.
_MASK_STREAM = 0x7A1


class HeldOutLoss:
    """The student's loss terms on a validation cache, averaged over its views and over ranks."""

    def __init__(self, path: str, train_spec: ImageSpec, *, batch_size: int, rank: int, world_size: int,
                 num_workers: int, seed: int) -> None:
        try:
            manifest = load_manifest(path)
        except ManifestError as e:
            raise ValueError(f"--val-cache: {e}") from None
        if not isinstance(train_spec, TargetSpec):
            raise ValueError("--val-cache: the held-out loss compares base-model targets; --objective mae has none")
        changed = train_spec.difference(TargetSpec.from_manifest(manifest).to_json())
        if changed is not None:
            raise ValueError(f"--val-cache: {path} does not hold the training targets' kind (from the validation cache "
                             f"to the training one: {changed}); a held-out loss compares the same base model's targets")
        self.seed = seed
        # A batch that fits the validation cache: it may be much smaller than the training one.
        views = min(sum(e.num_samples for e in manifest.shards(v)) for v in range(manifest.num_view_epochs))
        batch = max(1, min(batch_size, views // world_size))
        self.feed = CacheTargetFeed(manifest, batch_size=batch, rank=rank, world_size=world_size,
                                    num_workers=num_workers, seed=seed, view_order="cycle", pin_memory=False)
        self.num_view_epochs = manifest.num_view_epochs

    @torch.no_grad()
    def evaluate(self, objective: Any, model: torch.nn.Module, terms: tuple[str, ...], runtime: Runtime,
                 num_patches: int) -> dict[str, float]:
        """``val_<term>`` means over every view of the validation cache (all ranks together)."""
        masks = torch.Generator().manual_seed(self.seed * 1_000_003 + _MASK_STREAM)
        sums = torch.zeros(len(terms), dtype=torch.float64)
        batches = 0
        for v in range(self.num_view_epochs):
            for item in self.feed.epoch(v):
                inputs = self.feed.prepare(item, runtime.device)
                noise = torch.rand(inputs.images.shape[0], num_patches, generator=masks).to(runtime.device)  # [B, L]
                with runtime.autocast():
                    out = objective.forward(model, inputs, noise)
                sums += torch.stack([getattr(out, t).detach().double().cpu() for t in terms])
                batches += 1
        *totals, count = runtime.all_sum([*sums.tolist(), float(batches)])
        return {f"val_{t}": totals[i] / count for i, t in enumerate(terms)}

    def close(self) -> None:
        self.feed.close()


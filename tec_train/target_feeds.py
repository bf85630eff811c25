"""Target sources: where a training step gets its images and base-model targets from.

Data flow: **target feed** --(host batch)--> ``prepare`` on the training device --> StepInputs
(normalised images + float targets) --> student + losses --> step.

Four sources share one interface, so the trainer never knows which it has:
- ``CacheTargetFeed``: batches from the stage-1 cache (``cache_loader.CacheLoader``); the targets
  cross to the device still quantised and are decoded there.
- ``online.OnlineTargetFeed``: freshly augmented images and the frozen base model running
  inside the step, as the reference does (the speed baseline).
- ``mae.PixelFeed``: augmented images only, for the MAE objective (its spec is an ImageSpec).
- ``InMemoryTargetFeed``: prepared batches held on the device; no loader at all, the ceiling a
  loader is measured against, and a cheap source for tests.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from tec_cache.core.targets import normalise_images
from tec_cache.format.manifest import Manifest


@dataclass(frozen=True, kw_only=True)
class ImageSpec:
    """What a source's images look like: the student's input geometry and normalisation. A pixel
    source (the MAE objective) gives only this; its images are the whole target."""

    img_size: int
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    origin: dict[str, Any] = field(default_factory=dict)  # JSON facts recorded in checkpoints

    # The fields a resumed run must find unchanged (its sizes and geometry).
    IDENTITY: ClassVar[tuple[str, ...]] = ("img_size", "patch_size")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def to_json(self) -> dict[str, Any]:
        return {"img_size": self.img_size, "patch_size": self.patch_size, "mean": list(self.mean),
                "std": list(self.std), "origin": self.origin}

    def difference(self, other: dict[str, Any]) -> str | None:
        """How targets resolved as ``other`` (a ``to_json``, e.g. a checkpoint's) differ from these
        in what a run compares them on (IDENTITY, and the base-model checkpoint); None if they don't."""
        now = self.to_json()
        for key in self.IDENTITY:
            if other.get(key) != now[key]:
                return f"{key} was {other.get(key)}, now {now[key]}"
        if other.get("origin", {}).get("base_sha256") != now["origin"].get("base_sha256"):
            return (f"they come from base-model checkpoint sha256 {other.get('origin', {}).get('base_sha256')}, "
                    f"now {now['origin'].get('base_sha256')}")
        return None


def _triple(values: Sequence[float]) -> tuple[float, float, float]:
    """A per-channel (R, G, B) value as a tuple; ValueError unless there are three."""
    r, g, b = values
    return r, g, b


@dataclass(frozen=True, kw_only=True)
class TargetSpec(ImageSpec):
    """What a source's base-model targets look like: sizes the student's heads, besides its images."""

    dim: int  # D, the base model's width: the student's pred_dim
    heads: int  # H, the base model's heads: the student's attention-prediction heads
    topk: int
    tau: float  # attention-target temperature of the recipe

    IDENTITY: ClassVar[tuple[str, ...]] = ("dim", "heads", "topk", "tau", "img_size", "patch_size")

    def to_json(self) -> dict[str, Any]:
        return {"dim": self.dim, "heads": self.heads, "topk": self.topk, "tau": self.tau, **super().to_json()}

    @staticmethod
    def from_manifest(manifest: Manifest, view_epochs: int | None = None) -> TargetSpec:
        t, recipe, geometry = manifest.targets, manifest.views.recipe, manifest.geometry
        return TargetSpec(
            dim=t.dim, heads=t.heads, topk=t.topk, tau=float(t.tau), img_size=geometry.img_size,
            patch_size=geometry.patch_size, mean=_triple(recipe.mean), std=_triple(recipe.std),
            origin={
                "kind": "cache", "path": manifest.where, "codec": manifest.codec.name, "format": manifest.format.name,
                "base_model": manifest.base_model.name, "base_sha256": manifest.base_model.sha256,
                "view_epochs": view_epochs or manifest.num_view_epochs, "cache_view_epochs": manifest.num_view_epochs,
            },
        )


@dataclass
class StepInputs:
    """One micro-batch on the training device, ready for the student."""

    images: torch.Tensor  # [B, 3, S, S] float32, normalised
    feat: torch.Tensor | None  # [B, L, D] float32; None for the MAE objective (pixels are the target)
    att: torch.Tensor | None  # [B, k+1, H, L] float32
    idx: torch.Tensor | None  # [B, k] int64


class TargetFeed(Protocol):
    """The trainer's view of any source. ``epoch`` yields host-side items; ``prepare`` makes them StepInputs.
    ``spec`` is a TargetSpec for base-model targets, a plain ImageSpec for pixels."""

    @property
    def spec(self) -> ImageSpec: ...  # read-only here, so a feed may hold the narrower TargetSpec

    steps_per_epoch: int  # micro-batches per epoch, equal on every rank

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Any]: ...

    def prepare(self, item: Any, device: torch.device) -> StepInputs: ...

    def view_epoch_for(self, epoch: int) -> int: ...

    def close(self) -> None: ...


class CacheTargetFeed:
    """Batches of cached views; targets decoded on the device from their quantised form."""

    def __init__(self, manifest: Manifest, *, batch_size: int, rank: int, world_size: int, num_workers: int,
                 seed: int, view_order: str, pin_memory: bool, view_epochs: int | None = None) -> None:
        from .cache_loader import CacheLoader

        self.spec = TargetSpec.from_manifest(manifest, view_epochs)
        self.codec = manifest.codec.name
        self.loader = CacheLoader(
            manifest, batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers,
            seed=seed, view_order=view_order, view_epochs=view_epochs, pin_memory=pin_memory,
        )
        self.steps_per_epoch = self.loader.steps_per_epoch

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Any]:
        return self.loader.epoch(epoch, start_step=start_step)

    def prepare(self, item: Any, device: torch.device) -> StepInputs:
        from .cache_loader import decode_targets

        batch = item.to(device, non_blocking=True)
        feat, att, idx = decode_targets(batch, self.codec)  # [B,L,D], [B,k+1,H,L], [B,k]
        return StepInputs(normalise_images(batch.images, self.spec.mean, self.spec.std), feat, att, idx)

    def view_epoch_for(self, epoch: int) -> int:
        return self.loader.view_epoch_for(epoch)

    def close(self) -> None:
        self.loader.close()


class InMemoryTargetFeed:
    """Prepared micro-batches held on the device; every epoch replays them in order."""

    def __init__(self, spec: ImageSpec, batches: list[StepInputs]) -> None:
        if not batches:
            raise ValueError("an in-memory source needs at least one batch")
        self.spec = spec
        self.batches = batches
        self.steps_per_epoch = len(batches)

    @staticmethod
    def from_source(source: TargetFeed, num_batches: int, device: torch.device) -> InMemoryTargetFeed:
        """Prepare the first ``num_batches`` of ``source``'s epoch 0 once and keep them (closes ``source``)."""
        batches: list[StepInputs] = []
        try:
            for item in source.epoch(0):
                batches.append(source.prepare(item, device))
                if len(batches) == num_batches:
                    break
        finally:
            source.close()
        return InMemoryTargetFeed(source.spec, batches)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[StepInputs]:
        return iter(self.batches[start_step:])

    def prepare(self, item: StepInputs, device: torch.device) -> StepInputs:
        return item

    def view_epoch_for(self, epoch: int) -> int:
        return 0

    def close(self) -> None:
        """Nothing to release: the batches belong to whoever made the source."""

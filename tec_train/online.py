"""Online mode: the reference's way, with the frozen base model running inside every step.

Data flow: image folder / tars --OnlineLoader (workers: decode, RandomResizedCrop, flip)--> uint8
batch --> device --> frozen base model (``tec_cache.core.targets.extract_targets``) --> StepInputs
--> student + losses --> step. No cache is read or written; this is the baseline every speed
claim of the cache is measured against, and a way to train without disk for targets.

Augmentation is fresh every epoch and a pure function of (seed, image key, epoch): view index =
epoch in stage 1's view generator, so a resumed or re-ranked run sees the same pixels. The crop is
fed to the base model directly, as in the reference; the JPEG round trip a cache stores its
views through is not part of online mode.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tec_cache.core.basemodels import BaseModelSpec, load_base_model, resolve_weights
from tec_cache.core.images import BadImage, ImageSource
from tec_cache.core.targets import extract_targets, normalise_images
from tec_cache.core.views import WORKER_RESIZE, SourceImage, ViewRecipe, cut_view, image_size, load_source, view_params, view_rng
from tec_cache.runtime.faults import fault_point
from tec_cache.runtime.run_log import naming_sample
from tec_cache.runtime.workers import die_with_parent

from .cache_loader import Batch
from .target_feeds import StepInputs, TargetSpec

_SHUFFLE_TAG = 0x6F6E6C6E  # separates the shuffle's seed stream from the views' (seed, view, key) one


class _EpochBatches(Dataset):
    """Item i: micro-batch i of one rank's epoch, cut from freshly decoded source images."""

    def __init__(self, source: ImageSource, batches: list[np.ndarray], epoch: int, seed: int, recipe: ViewRecipe) -> None:
        self.source, self.batches, self.epoch, self.seed, self.recipe = source, batches, epoch, seed, recipe

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        views, used = [], []
        for index in self.batches[i].tolist():
            index, img = self._decodable(index)
            item = self.source.items[index]
            with naming_sample(f"image {item.key} of {self.source.root}, view {self.epoch}"):
                fault_point("cut_view")
                params = view_params(*image_size(img), view_rng(self.seed, item.key, self.epoch), self.recipe)
                views.append(cut_view(img, params, self.recipe))  # [3, S, S] uint8
            used.append(index)
        return torch.stack(views), torch.tensor(used, dtype=torch.int64)  # [B,3,S,S], [B]

    def _decodable(self, index: int) -> tuple[int, SourceImage]:
        """The image at ``index``, or, when that file is unreadable, the next readable one: a bad
        file must not end a training run (stage 1 skips it the same way), and the stand-in is a
        pure function of the index, so the run stays reproducible."""
        n = len(self.source)
        for k in range(n):
            j = (index + k) % n
            try:
                img = load_source(self.source.read_bytes(j), self.source.items[j].key, self.recipe)
            except (BadImage, OSError) as e:
                warnings.warn(f"online mode: skipping unreadable image: {e}", stacklevel=1)
                continue
            return j, img
        raise BadImage(f"--data {self.source.root}: no readable image at all")


class OnlineLoader:
    """Equal, seeded-shuffled micro-batches of source images per rank; epoch e uses view index e."""

    def __init__(self, source: ImageSource, *, batch_size: int, recipe: ViewRecipe, rank: int = 0, world_size: int = 1,
                 num_workers: int = 2, seed: int = 0, pin_memory: bool = False, mp_context: str | None = None) -> None:
        per_rank = len(source) // world_size
        self.steps_per_epoch = per_rank // batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"--batch-size {batch_size} x world size {world_size} exceeds the {len(source)} images of {source.root}"
            )
        self.source, self.batch_size, self.recipe = source, batch_size, recipe
        self.rank, self.world_size, self.per_rank = rank, world_size, per_rank
        self.num_workers, self.seed, self.pin_memory, self.mp_context = num_workers, seed, pin_memory, mp_context

    def view_epoch_for(self, epoch: int) -> int:
        return epoch

    def order(self, epoch: int) -> list[np.ndarray]:
        """This rank's micro-batches of image indices for ``epoch`` (the same on every re-run)."""
        perm = np.random.default_rng([self.seed, epoch, _SHUFFLE_TAG]).permutation(len(self.source))
        # Every rank takes an equal slice, so DDP never waits on a rank with a short epoch.
        mine = perm[self.rank :: self.world_size][: self.per_rank]
        b = self.batch_size
        return [mine[i * b : (i + 1) * b] for i in range(self.steps_per_epoch)]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        dataset = _EpochBatches(self.source, self.order(epoch)[start_step:], epoch, self.seed, self.recipe)
        # Item-level batches (batch_size=None); the private generator keeps the DataLoader off the
        # global torch RNG, whose state is checkpointed.
        loader = DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=self.num_workers, pin_memory=self.pin_memory,
            multiprocessing_context=self.mp_context if self.num_workers > 0 else None, generator=torch.Generator(),
            worker_init_fn=die_with_parent(),
        )
        for images, index in loader:
            yield Batch(images=images, fields={}, image_index=index, view_epoch=epoch)

    def close(self) -> None:
        """Workers live only as long as an epoch's iterator; nothing stays open."""


class OnlineTargetFeed:
    """OnlineLoader batches plus the frozen base model that turns them into targets on the device."""

    def __init__(self, spec: BaseModelSpec, checkpoint: str | Path | None, source: ImageSource, *, device: torch.device,
                 batch_size: int, rank: int, world_size: int, num_workers: int, seed: int, autocast: bool,
                 resize: str | None = None, checkpoint_sha256: str | None = None) -> None:
        self.base_spec = spec
        path, fetched = resolve_weights(spec, checkpoint, checkpoint_sha256)  # a URL or a registry name: fetched once
        self.model, facts = load_base_model(spec, path, device, fetched)
        # The base model's own input normalisation (a CLIP base's is not ImageNet's); the student keeps its own.
        self.base_mean, self.base_std = tuple(facts["input_mean"]), tuple(facts["input_std"])
        self.autocast = autocast
        # The compared cache's resizer (its manifest's views.recipe.resize); by default a CPU build's.
        recipe = ViewRecipe(size=spec.img_size, resize=WORKER_RESIZE if resize in (None, "auto") else resize)
        vit: Any = self.model  # a timm ViT, whose parts are nn.Module attribute look-ups (untyped)
        self.spec = TargetSpec(
            dim=int(vit.embed_dim), heads=int(vit.blocks[-1].attn.num_heads), topk=spec.topk,
            tau=spec.tau, img_size=spec.img_size, patch_size=spec.patch_size, mean=recipe.mean, std=recipe.std,
            origin={"kind": "online", "base_model": spec.name, "arch": spec.arch, "base_sha256": facts["sha256"],
                    "data": str(source.root), "last_layers": spec.last_layers, "resize": recipe.resize},
        )
        self.loader = OnlineLoader(source, batch_size=batch_size, recipe=recipe, rank=rank, world_size=world_size,
                                   num_workers=num_workers, seed=seed, pin_memory=device.type == "cuda")
        self.steps_per_epoch = self.loader.steps_per_epoch

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        return self.loader.epoch(epoch, start_step=start_step)

    def prepare(self, item: Any, device: torch.device) -> StepInputs:
        pixels = item.images.to(device, non_blocking=True)  # [B,3,S,S] uint8
        images = normalise_images(pixels, self.spec.mean, self.spec.std)
        base_in = images if (self.base_mean, self.base_std) == (tuple(self.spec.mean), tuple(self.spec.std)) \
            else normalise_images(pixels, self.base_mean, self.base_std)
        feat, att, idx = extract_targets(self.model, base_in, topk=self.spec.topk,
                                         last_layers=self.base_spec.last_layers, autocast=self.autocast)
        return StepInputs(images, feat, att, idx)  # [B,3,S,S], [B,L,D], [B,k+1,H,L], [B,k]

    def view_epoch_for(self, epoch: int) -> int:
        return self.loader.view_epoch_for(epoch)

    def close(self) -> None:
        self.loader.close()

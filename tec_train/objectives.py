"""The pretraining objectives ``tec-train run`` trains: TEC (a base model's targets) and plain MAE (pixels).

Data flow: --objective NAME --> ``objective_for`` --> ``open_feed`` (the cache or the online base
model for TEC, the image folder for MAE) --> ``build`` (the model the feed's spec asks for) --> per
micro-batch ``forward`` (StepInputs + mask noise --> an output carrying the loss ``terms``) --> the
loop logs the terms and backpropagates ``loss``. The loop never asks which objective it runs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch

from tec_cache.core.images import open_source
from tec_cache.format.manifest import ManifestError, load_manifest
from tec_cache.runtime.dist import DistInfo

from .student import FeatureAdaptor, build_student, parse_model_name
from .target_feeds import CacheTargetFeed, ImageSpec, StepInputs, TargetFeed, TargetSpec

if TYPE_CHECKING:
    from .train_config import TrainConfig


def student_geometry(cfg: TrainConfig, default_img: int) -> tuple[int, int]:
    """(img_size, patch_size) of the student: options, else the source's image size and the name's patch."""
    _, name_patch = parse_model_name(cfg.student.model)
    return cfg.student.img_size or default_img, cfg.student.patch_size or name_patch


def check_geometry(student: tuple[int, int], targets: tuple[int, int], what: str) -> None:
    """The student's (img_size, patch_size) must be the targets'; CompatibilityError names both."""
    from .cache_loader import CompatibilityError

    (img, patch), (t_img, t_patch) = student, targets
    if img % patch:
        raise CompatibilityError(f"--img-size {img} is not a multiple of the student's patch size {patch}")
    if (img, patch) != (t_img, t_patch):
        raise CompatibilityError(
            f"student patch grid {img // patch}x{img // patch} (img {img}, patch {patch}) does not match the "
            f"{what}'s {t_img // t_patch}x{t_img // t_patch} (img {t_img}, patch {t_patch})"
        )


def _model_overrides(cfg: TrainConfig) -> dict[str, Any]:
    overrides: dict[str, Any] = {"mask_ratio": cfg.student.mask_ratio}
    if cfg.student.depth is not None:
        overrides["depth"] = cfg.student.depth
    return overrides


class Objective:
    """What one objective contributes to the loop; subclasses fill in every method."""

    name: ClassVar[str]
    # The loss terms logged (metrics.jsonl, progress, checkpointed running sums); the first is the
    # total that is backpropagated, the others its parts.
    terms: ClassVar[tuple[str, ...]]

    def open_feed(self, cfg: TrainConfig, info: DistInfo, device: torch.device, amp: str) -> TargetFeed:
        """The source ``cfg`` asks for, checked against the student's geometry before any loading."""
        raise NotImplementedError

    def build(self, cfg: TrainConfig, spec: ImageSpec) -> torch.nn.Module:
        """The model to train for a feed with ``spec`` (on the CPU, freshly initialised)."""
        raise NotImplementedError

    def forward(self, model: Any, inputs: StepInputs, noise: torch.Tensor) -> Any:
        """One micro-batch through ``model`` (maybe DDP-wrapped); the output has an attribute per term."""
        raise NotImplementedError

    def describe(self, model: torch.nn.Module, spec: ImageSpec) -> dict[str, Any]:
        """Facts of the built model the run's resolved config records besides the encoder's."""
        return {}


class TECObjective(Objective):
    """Predict a base model's features and attention of the masked image (method.md 3), from a cache or online."""

    name = "tec"
    terms = ("loss", "loss_fea", "loss_att")

    def open_feed(self, cfg: TrainConfig, info: DistInfo, device: torch.device, amp: str) -> TargetFeed:
        if cfg.targets.cache is not None:
            from .cache_loader import check_compatibility

            try:
                manifest = load_manifest(cfg.targets.cache, local_dir=cfg.targets.cache_dir)
            except ManifestError as e:
                raise ValueError(f"--cache: {e}") from None
            img, patch = student_geometry(cfg, manifest.geometry.img_size)
            check_compatibility(manifest, img_size=img, patch_size=patch)
            return CacheTargetFeed(manifest, batch_size=cfg.optim.batch_size, rank=info.rank, world_size=info.world_size,
                                   num_workers=cfg.loader.num_workers, seed=cfg.optim.seed, view_order=cfg.loader.view_order,
                                   view_epochs=cfg.loader.view_epochs, pin_memory=device.type == "cuda")
        from .online import OnlineTargetFeed

        spec = cfg.targets.recipe(cfg.student.img_size, cfg.student.patch_size).resolve()
        check_geometry(student_geometry(cfg, spec.img_size), (spec.img_size, spec.patch_size), "base model")
        assert cfg.targets.data is not None  # validate(): online mode needs --data
        images = open_source(cfg.targets.data)
        return OnlineTargetFeed(spec, cfg.targets.checkpoint, images, device=device, batch_size=cfg.optim.batch_size,
                                rank=info.rank, world_size=info.world_size, num_workers=cfg.loader.num_workers,
                                seed=cfg.optim.seed, autocast=amp != "off", resize=cfg.targets.resize,
                                checkpoint_sha256=cfg.targets.checkpoint_sha256)

    def build(self, cfg: TrainConfig, spec: ImageSpec) -> torch.nn.Module:
        if not isinstance(spec, TargetSpec):
            raise ValueError(f"--objective tec: the source gives images only ({spec.origin.get('kind')}), "
                             "no base-model targets; use --objective mae for pixels")
        img, patch = student_geometry(cfg, spec.img_size)
        return build_student(cfg.student.model, pred_dim=spec.dim, att_heads=spec.heads, img_size=img, patch_size=patch,
                             att_tau=spec.tau, **_model_overrides(cfg))

    def forward(self, model: Any, inputs: StepInputs, noise: torch.Tensor) -> Any:
        return model(inputs.images, inputs.feat, inputs.att, inputs.idx, noise=noise)

    def describe(self, model: torch.nn.Module, spec: ImageSpec) -> dict[str, Any]:
        assert isinstance(spec, TargetSpec)  # build() refused anything else
        return {"pred_dim": spec.dim, "att_heads": spec.heads, "att_tau": spec.tau,
                "num_adap": cast(FeatureAdaptor, model.get_submodule("encoder_adaptor")).num_adap}


class MAEObjective(Objective):
    """Plain MAE: reconstruct the masked patches' pixels (to make a base model from scratch)."""

    name = "mae"
    terms = ("loss",)

    def open_feed(self, cfg: TrainConfig, info: DistInfo, device: torch.device, amp: str) -> TargetFeed:
        from .mae import PixelFeed

        img, patch = student_geometry(cfg, 224)
        check_geometry((img, patch), (img, patch), "image size")  # only the divisibility check applies
        assert cfg.targets.data is not None  # validate(): --objective mae needs --data
        return PixelFeed(open_source(cfg.targets.data), img_size=img, patch_size=patch, batch_size=cfg.optim.batch_size,
                         rank=info.rank, world_size=info.world_size, num_workers=cfg.loader.num_workers, seed=cfg.optim.seed,
                         pin_memory=device.type == "cuda")

    def build(self, cfg: TrainConfig, spec: ImageSpec) -> torch.nn.Module:
        from .mae import build_mae

        img, patch = student_geometry(cfg, spec.img_size)
        return build_mae(cfg.student.model, img_size=img, patch_size=patch, **_model_overrides(cfg))

    def forward(self, model: Any, inputs: StepInputs, noise: torch.Tensor) -> Any:
        return model(inputs.images, noise=noise)


OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (TECObjective, MAEObjective)}


def objective_for(name: str) -> Objective:
    """The objective --objective ``name`` trains; ValueError lists the known ones."""
    if name not in OBJECTIVES:
        raise ValueError(f"--objective: expected one of {', '.join(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name]()

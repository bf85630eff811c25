"""Base models: the registry of known frozen teachers, building them from timm, loading their weights.

Data flow: (registry name or timm arch) + local checkpoint --> frozen timm ViT --> targets.py.
Weights come only from a local file. Keys are matched strictly: the only keys that may be left
out are classification/projection heads, the final norm (it never feeds a target), and iBOT's
``masked_embed``; anything else fails with the missing and unexpected keys named. A wrong prefix
can never give a silently random teacher.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import timm

from tec_cache.config import POSITIVE, POSITIVE_INT, option


@dataclass(frozen=True)
class BaseModelSpec:
    """A base model and the target recipe the reference uses with it (method.md 4.1)."""

    name: str
    arch: str
    topk: int
    tau: float
    last_layers: int
    img_size: int = 224
    patch_size: int = 16
    depth: int | None = None  # None: the arch's own depth

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


REGISTRY: dict[str, BaseModelSpec] = {
    "mae1kbase": BaseModelSpec("mae1kbase", "vit_base_patch16_224", topk=15, tau=1.8, last_layers=2),
    "mae1k300ep": BaseModelSpec("mae1k300ep", "vit_base_patch16_224", topk=15, tau=1.8, last_layers=2),
    "ibot1kbase": BaseModelSpec("ibot1kbase", "vit_base_patch16_224", topk=9, tau=1.0, last_layers=2),
    "mae1klarge": BaseModelSpec("mae1klarge", "vit_large_patch16_224", topk=15, tau=1.4, last_layers=2),
}

# A base model given only by --arch gets the reference's MAE-base defaults.
CUSTOM_DEFAULTS = {"topk": 15, "tau": 1.8, "last_layers": 2}


def resolve_spec(
    basemodel: str | None,
    *,
    arch: str | None = None,
    img_size: int | None = None,
    patch_size: int | None = None,
    topk: int | None = None,
    tau: float | None = None,
    last_layers: int | None = None,
    depth: int | None = None,
) -> BaseModelSpec:
    """Registry entry (or a custom one from ``arch``) with the given overrides applied.

    Raises ValueError naming the option when the name is unknown or neither is given.
    """
    if basemodel is not None and basemodel not in REGISTRY:
        raise ValueError(f"--basemodel: unknown base model {basemodel!r}; expected one of {sorted(REGISTRY)}")
    if basemodel is None and arch is None:
        raise ValueError("--basemodel or --arch is required: a registry name or a timm ViT name")
    if arch is not None and not timm.is_model(arch):
        raise ValueError(f"--arch: {arch!r} is not a timm model name (e.g. vit_small_patch16_224)")
    if basemodel is not None:
        base = REGISTRY[basemodel]
    else:
        assert arch is not None
        base = BaseModelSpec(f"custom:{arch}", arch, **CUSTOM_DEFAULTS)
    spec = BaseModelSpec(
        name=base.name,
        arch=arch or base.arch,
        topk=base.topk if topk is None else topk,
        tau=base.tau if tau is None else tau,
        last_layers=base.last_layers if last_layers is None else last_layers,
        img_size=base.img_size if img_size is None else img_size,
        patch_size=_arch_patch_size(arch, base.patch_size) if patch_size is None else patch_size,
        depth=depth,
    )
    for opt, value in (("--topk", spec.topk), ("--last-layers", spec.last_layers), ("--img-size", spec.img_size),
                       ("--patch-size", spec.patch_size), ("--depth", 1 if spec.depth is None else spec.depth)):
        if value < 1:
            raise ValueError(f"{opt}: must be a positive integer, got {value}")
    if not (math.isfinite(spec.tau) and spec.tau > 0):
        raise ValueError(f"--tau: must be a positive number, got {spec.tau}")
    if spec.img_size % spec.patch_size:
        raise ValueError(f"--img-size {spec.img_size} is not a multiple of --patch-size {spec.patch_size}")
    grid = (spec.img_size // spec.patch_size) ** 2
    if spec.topk > grid:
        raise ValueError(f"--topk {spec.topk} exceeds the number of patches ({grid})")
    return spec


@dataclass(frozen=True)
class TargetRecipe:
    """What the base model computes: the options of ``tec-cache build`` and of online mode.

    Every field left None takes the registry's value (or the --arch defaults); ``resolve`` checks
    them and gives the BaseModelSpec both the build and the online target feed run.
    """

    basemodel: str | None = option(None, "Registry base model", choices=sorted(REGISTRY))
    arch: str | None = option(None, "Any timm ViT name; overrides the base model's architecture.")
    img_size: int | None = option(None, "View size in pixels", check=POSITIVE_INT, default_text="224")
    patch_size: int | None = option(None, "Patch size", check=POSITIVE_INT, default_text="the arch's")
    depth: int | None = option(None, "Block count, when the checkpoint's ViT is shallower than the arch's.", check=POSITIVE_INT)
    topk: int | None = option(None, "Top-k patch rows of the attention target", check=POSITIVE_INT,
                              default_text="the base model's")
    tau: float | None = option(None, "Attention-target temperature", check=POSITIVE, default_text="the base model's")
    last_layers: int | None = option(None, "Blocks averaged into the feature target", check=POSITIVE_INT,
                                     default_text="the base model's")

    def resolve(self) -> BaseModelSpec:
        return resolve_spec(self.basemodel, arch=self.arch, img_size=self.img_size, patch_size=self.patch_size,
                            topk=self.topk, tau=self.tau, last_layers=self.last_layers, depth=self.depth)


RECIPE_KEYS = ("basemodel", "arch", "img_size", "patch_size", "depth", "topk", "tau", "last_layers")


def _arch_patch_size(arch: str | None, default: int) -> int:
    m = re.search(r"patch(\d+)", arch or "")
    return int(m.group(1)) if m else default


def build_model(spec: BaseModelSpec) -> timm.models.VisionTransformer:
    """Random-weight timm ViT of the spec's shape, ready for ``load_checkpoint``."""
    extra = {} if spec.depth is None else {"depth": spec.depth}
    try:
        model = timm.create_model(
            spec.arch, pretrained=False, num_classes=0, img_size=spec.img_size, patch_size=spec.patch_size, **extra
        )
    except TypeError as e:  # a non-ViT timm model has no img_size/patch_size/depth arguments
        raise ValueError(f"--arch: {spec.arch!r} is not a plain timm VisionTransformer ({e})") from None
    if not isinstance(model, timm.models.VisionTransformer):
        raise ValueError(f"--arch: {spec.arch!r} is not a plain timm VisionTransformer")
    if not model.has_class_token or getattr(model, "no_embed_class", False) or model.num_prefix_tokens != 1:
        raise ValueError(f"--arch: {spec.arch!r} must have exactly one class token and pos_embed over it, as MAE/iBOT ViTs")
    if spec.last_layers > len(model.blocks):
        raise ValueError(f"--last-layers {spec.last_layers} exceeds the model depth {len(model.blocks)}")
    return model


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: no such file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(
            f"--checkpoint: cannot load {path} as a weights-only torch checkpoint ({type(e).__name__}: {e}). "
            "Files holding pickled objects are refused; save a plain state dict."
        ) from e
    if not isinstance(obj, dict):
        raise ValueError(f"--checkpoint: {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def extract_state_dict(ckpt: dict[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Pick the backbone weights out of the known layouts; returns (state dict, layout name)."""
    if isinstance(ckpt.get("model"), dict):
        return ckpt["model"], "mae ('model')"
    if isinstance(ckpt.get("state_dict"), dict):
        return ckpt["state_dict"], "ibot teacher ('state_dict')"
    for entry, prefix in (("teacher", "backbone."), ("student", "module.backbone.")):
        if isinstance(ckpt.get(entry), dict):
            sub = ckpt[entry]
            # Only the backbone keys; the DINO/iBOT projection head lives under another prefix.
            picked = {k[len(prefix):]: v for k, v in sub.items() if k.startswith(prefix)}
            if not picked:
                raise ValueError(f"--checkpoint: {path}: entry {entry!r} has no keys starting with {prefix!r}")
            return picked, f"ibot/dino training checkpoint ({entry!r}, prefix {prefix!r})"
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt, "bare state dict"
    raise ValueError(
        f"--checkpoint: {path}: unknown layout with top-level keys {sorted(ckpt)[:10]}; expected 'model', "
        "'state_dict', 'teacher', 'student' or a bare state dict"
    )


# A full MAE checkpoint (``tec-train run --objective mae``, MAE's visualisation release) carries its
# pixel decoder; the base model is the encoder only.
_IGNORABLE_UNEXPECTED = re.compile(r"^(head\.|head$|masked_embed$|fc_norm\.|mask_token$|decoder_)")
_IGNORABLE_MISSING = re.compile(r"^(head\.|norm\.)")


def load_checkpoint(model: torch.nn.Module, path: Path) -> dict[str, Any]:
    """Load ``path`` into ``model`` strictly (see module docstring). Returns facts for the manifest."""
    ckpt = _read_checkpoint(path)
    sd, layout = extract_state_dict(ckpt, path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    bad_missing = [k for k in missing if not _IGNORABLE_MISSING.match(k)]
    bad_unexpected = [k for k in unexpected if not _IGNORABLE_UNEXPECTED.match(k)]
    if bad_missing or bad_unexpected:
        raise ValueError(
            f"--checkpoint: {path} ({layout}) does not match the base model: "
            f"missing keys {_short(bad_missing)}; unexpected keys {_short(bad_unexpected)}. "
            "Check --basemodel/--arch, --img-size and --patch-size."
        )
    for k, want in expected.items():
        if k in sd and tuple(sd[k].shape) != tuple(want.shape):
            raise ValueError(
                f"--checkpoint: {path}: key {k!r} has shape {list(sd[k].shape)}, the base model expects {list(want.shape)}"
            )
    # Keys allowed to be absent keep the model's own values; everything else must come from the file.
    merged = dict(expected)
    merged.update({k: v for k, v in sd.items() if k in expected})
    model.load_state_dict(merged, strict=True)
    return {"layout": layout, "ignored_missing": missing, "ignored_unexpected": unexpected}


def _short(keys: list[str], n: int = 12) -> str:
    return str(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_base_model(spec: BaseModelSpec, checkpoint: Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build, load strictly and freeze the base model. Returns (model in eval mode, facts)."""
    model = build_model(spec)
    facts = load_checkpoint(model, checkpoint)
    facts["sha256"] = file_sha256(checkpoint)
    facts["path"] = str(checkpoint)
    model.requires_grad_(False).eval().to(device)
    return model, facts

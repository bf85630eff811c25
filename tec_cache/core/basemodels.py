"""Base models: the registry of known frozen teachers, building them from timm, loading their weights.

Data flow: (registry name | ``timm:NAME`` | ``hf-hub:ORG/REPO`` | --arch) + weights (a local
--checkpoint, a URL fetched by weights.py, the registry's official file, or timm's own pretrained
machinery) --> frozen timm ViT (+ its input normalisation) --> targets.py.

A registry name states where its official file comes from and the hash it must have
(``OFFICIAL_WEIGHTS``). ``timm:NAME`` / ``hf-hub:ORG/REPO`` are any timm VisionTransformer with a
class token, loaded by ``timm.create_model(..., pretrained=True)``; they see their own
pretrained_cfg mean/std, and their register/distillation tokens stay out of the targets.
Weights from a file are matched strictly: the only keys that may be left
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
from typing import Any, TypedDict

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from tec_cache.core.weights import HUB_PREFIX, Expected, WeightsError, check_sha256, fetch_weights, hub_offline, mirror_url
from tec_cache.runtime.config import POSITIVE, POSITIVE_INT, option

TIMM_PREFIX = "timm:"


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
    source: str | None = None  # timm:NAME / hf-hub:ORG/REPO: built and loaded by timm's pretrained machinery

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if out["source"] is None:  # registry and --arch bases record what they always did
            del out["source"]
        return out

    @property
    def timm_name(self) -> str | None:
        """The name timm.create_model takes for a timm/hub base (None for registry and --arch bases)."""
        if self.source is None:
            return None
        return self.source[len(TIMM_PREFIX):] if self.source.startswith(TIMM_PREFIX) else self.source


REGISTRY: dict[str, BaseModelSpec] = {
    "mae1kbase": BaseModelSpec("mae1kbase", "vit_base_patch16_224", topk=15, tau=1.8, last_layers=2),
    "mae1k300ep": BaseModelSpec("mae1k300ep", "vit_base_patch16_224", topk=15, tau=1.8, last_layers=2),
    "ibot1kbase": BaseModelSpec("ibot1kbase", "vit_base_patch16_224", topk=9, tau=1.0, last_layers=2),
    "mae1klarge": BaseModelSpec("mae1klarge", "vit_large_patch16_224", topk=15, tau=1.4, last_layers=2),
}

class _RecipeDefaults(TypedDict):
    topk: int
    tau: float
    last_layers: int


# A base model given only by --arch, timm:NAME or hf-hub:ORG/REPO gets the reference's MAE-base defaults.
CUSTOM_DEFAULTS: _RecipeDefaults = {"topk": 15, "tau": 1.8, "last_layers": 2}


@dataclass(frozen=True)
class OfficialWeights:
    """Where a registry name's weights come from and what they must hash to.

    ``md5_prefix`` is the prefix the release README publishes (all that is published for MAE);
    ``sha256`` a full digest where one is known. With neither, the sha256 of the first fetch is
    recorded (sidecar, manifest) and every reuse must match it; ``--checkpoint-sha256`` pins it.
    ``mirror_name``: the file's name under ``$TEC_WEIGHTS_MIRROR``.
    """

    url: str | None
    mirror_name: str | None
    md5_prefix: str | None = None
    sha256: str | None = None
    size: str = ""  # as the docs state it; not checked
    note: str = ""

    def expected(self, sha256: str | None = None) -> Expected:
        return Expected(sha256=sha256 or self.sha256, md5_prefix=self.md5_prefix)


OFFICIAL_WEIGHTS: dict[str, OfficialWeights] = {
    # MAE README, "pre-trained checkpoint" table: md5 8cad7c (ViT-Base), b8b06e (ViT-Large).
    "mae1kbase": OfficialWeights("https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth",
                                 "mae_pretrain_vit_base.pth", md5_prefix="8cad7c", size="about 0.35 GB"),
    "mae1klarge": OfficialWeights("https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth",
                                  "mae_pretrain_vit_large.pth", md5_prefix="b8b06e", size="about 1.2 GB"),
    # iBOT ViT-B/16, block masking, teacher; no digest is published for it. Every iBOT size has
    # this file name, hence the size folder in the mirror name.
    "ibot1kbase": OfficialWeights(
        "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/vitb_16/checkpoint_teacher.pth",
        "vitb_16/checkpoint_teacher.pth", size="not published"),
    "mae1k300ep": OfficialWeights(None, None, note="the 300-epoch MAE ViT-B the reference used was never released"),
}


def official_weights(basemodel: str, sha256: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Fetch (or reuse) a registry name's official file; returns (path, facts for the manifest)."""
    off = OFFICIAL_WEIGHTS.get(basemodel)
    if off is None or off.url is None:
        why = off.note if off is not None else f"{basemodel} has no official download"
        raise WeightsError(f"--basemodel {basemodel}: {why}; give its weights with --checkpoint PATH_OR_URL")
    mirror = mirror_url(off.mirror_name or "")
    got = fetch_weights(off.url, off.expected(check_sha256(sha256)), source=mirror)
    return got.path, got.facts()


def resolve_weights(spec: BaseModelSpec, checkpoint: str | Path | None,
                    sha256: str | None = None) -> tuple[Path | None, dict[str, Any]]:
    """The local weights file of a base model: --checkpoint (a path or a URL), else the registry's
    official file; None for a timm/hub base (timm fetches its own). Returns (path, facts)."""
    from tec_cache.core.weights import resolve_checkpoint

    if checkpoint is not None:
        return resolve_checkpoint(checkpoint, sha256)
    if spec.source is not None:
        if sha256 is not None:
            raise WeightsError(f"--checkpoint-sha256: {spec.source} is fetched by timm's hub cache; pin it with "
                               "hf-hub:ORG/REPO@REVISION, or give the file as --checkpoint")
        return None, {}
    if spec.name in OFFICIAL_WEIGHTS:
        return official_weights(spec.name, sha256)
    raise WeightsError(f"--checkpoint is required for --arch {spec.arch}: its weights file (a path or a URL)")


def is_timm_source(basemodel: str | None) -> bool:
    """``timm:NAME`` or ``hf-hub:ORG/REPO``: a base model from timm's own model zoo or the hub."""
    return basemodel is not None and basemodel.startswith((TIMM_PREFIX, HUB_PREFIX))


def _timm_create(name: str, *, pretrained: bool, img_size: int, depth: int | None = None,
                 label: str | None = None, **kwargs: Any) -> torch.nn.Module:
    """timm.create_model for a timm/hub base; hub failures name the base (``label``: as the user
    wrote it), the hub repo and the hub cache."""
    extra: dict[str, Any] = {} if depth is None else {"depth": depth}
    label = label or name
    try:
        with hub_offline():
            return timm.create_model(name, pretrained=pretrained, img_size=img_size, **extra,
                                     **{"num_classes": 0, **kwargs})
    except TypeError as e:  # not a ViT: no img_size argument
        raise ValueError(f"--basemodel {label}: not a timm VisionTransformer ({e})") from None
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"--basemodel {label}: {e}; expected timm:NAME with a timm model name "
                             "(e.g. timm:vit_base_patch14_dinov2.lvd142m) or hf-hub:ORG/REPO") from None
        raise
    except OSError as e:  # huggingface_hub's errors for a missing file or no network are OSErrors
        from huggingface_hub import constants

        repo = name[len(HUB_PREFIX):] if name.startswith(HUB_PREFIX) else None
        if repo is None:
            cfg = timm.models.get_pretrained_cfg(name)
            repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        where = f"hub repo {repo}" if repo else "timm's pretrained source"
        raise WeightsError(f"--basemodel {label}: its weights or config ({where}) could not be had from the hub or the "
                           f"hub cache {constants.HF_HUB_CACHE} (offline: fetch them once with network, e.g. "
                           f"`huggingface-cli download {repo or 'REPO'}`, and copy that cache over): "
                           f"{type(e).__name__}: {e}") from None


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
    targets: bool = True,
) -> BaseModelSpec:
    """Registry entry (or a custom one from ``arch``) with the given overrides applied.

    Raises ValueError naming the option when the name is unknown or neither is given.
    ``targets=False`` (the downstream evaluations): a timm/hub base only needs to be a ViT, not to
    have the class token and fused attention the targets read.
    """
    if basemodel is not None and not is_timm_source(basemodel) and basemodel not in REGISTRY:
        raise ValueError(f"--basemodel: unknown base model {basemodel!r}; expected one of {sorted(REGISTRY)}, "
                         "timm:NAME (a timm ViT with its pretrained tag) or hf-hub:ORG/REPO")
    if basemodel is None and arch is None:
        raise ValueError("--basemodel or --arch is required: a registry name or a timm ViT name")
    if arch is not None and not timm.is_model(arch):
        raise ValueError(f"--arch: {arch!r} is not a timm model name (e.g. vit_small_patch16_224)")
    if is_timm_source(basemodel):
        assert basemodel is not None
        if arch is not None:
            raise ValueError(f"--arch: {basemodel} names its own architecture; give one of the two")
        return _timm_spec(basemodel, img_size=img_size, patch_size=patch_size, topk=topk, tau=tau,
                          last_layers=last_layers, depth=depth, targets=targets)
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
    return _checked(spec)


def _checked(spec: BaseModelSpec) -> BaseModelSpec:
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


def _timm_spec(source: str, *, img_size: int | None, patch_size: int | None, topk: int | None, tau: float | None,
               last_layers: int | None, depth: int | None, targets: bool = True) -> BaseModelSpec:
    """The spec of a timm/hub base: its architecture and patch size read off the model timm builds
    (on the meta device: no weights, no memory); the recipe defaults are the MAE-base ones."""
    name = source[len(TIMM_PREFIX):] if source.startswith(TIMM_PREFIX) else source
    if source.startswith(TIMM_PREFIX) and not timm.is_model(timm.models.split_model_name_tag(name)[0]):
        raise ValueError(f"--basemodel {source}: {name!r} is not a timm model name "
                         "(e.g. timm:vit_base_patch14_dinov2.lvd142m)")
    size = 224 if img_size is None else img_size
    with torch.device("meta"):
        model = _timm_create(name, pretrained=False, img_size=size, depth=depth, label=source)
    vit = check_timm_vit(model, source, targets=targets)
    own_patch = int(vit.patch_embed.patch_size[0])
    if patch_size is not None and patch_size != own_patch:
        raise ValueError(f"--patch-size {patch_size}: {source} has patch size {own_patch}; its patch embedding is "
                         "taken as trained")
    arch = str(getattr(model, "pretrained_cfg", {}).get("architecture") or timm.models.split_model_name_tag(name)[0])
    return _checked(BaseModelSpec(
        name=source, arch=arch,
        topk=CUSTOM_DEFAULTS["topk"] if topk is None else topk,
        tau=CUSTOM_DEFAULTS["tau"] if tau is None else tau,
        last_layers=CUSTOM_DEFAULTS["last_layers"] if last_layers is None else last_layers,
        img_size=size, patch_size=own_patch, depth=depth, source=source,
    ))


def check_timm_vit(model: torch.nn.Module, source: str, targets: bool = True) -> timm.models.VisionTransformer:
    """A timm/hub base must be a VisionTransformer with a class token and timm's attention layout;
    ValueError names the base and what it lacks. ``targets=False``: a ViT is enough (the downstream
    evaluations pool its tokens; ``--pool cls`` checks the class token itself). Returns ``model``,
    typed as the ViT it was checked to be."""
    if not isinstance(model, timm.models.VisionTransformer):
        raise ValueError(f"--basemodel {source}: {type(model).__name__} is not a timm VisionTransformer; the targets "
                         "need its blocks' qkv attention")
    if not targets:
        return model
    if not model.has_class_token:
        raise ValueError(f"--basemodel {source}: this ViT has no class token (global pool {model.global_pool!r}); the "
                         "attention target is the class token's row and picks the top-k patches by it")
    attn = model.blocks[-1].attn
    if not all(hasattr(attn, a) for a in ("qkv", "num_heads", "scale", "q_norm", "k_norm")):
        raise ValueError(f"--basemodel {source}: its attention ({type(attn).__name__}) has no fused qkv projection "
                         "as timm's Attention; the attention target is read from it")
    grid = model.patch_embed.grid_size
    if grid[0] != grid[1]:
        raise ValueError(f"--basemodel {source}: a {grid[0]}x{grid[1]} patch grid; only square grids are supported")
    return model


def base_normalisation(model: torch.nn.Module, spec: BaseModelSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the base model's input is normalised with: a timm/hub base's pretrained_cfg
    (CLIP's is not ImageNet's); the registry and --arch bases were trained on ImageNet's."""
    if spec.source is None:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean", IMAGENET_DEFAULT_MEAN), cfg.get("std", IMAGENET_DEFAULT_STD)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"--basemodel {spec.source}: pretrained_cfg mean/std {mean}/{std} are not RGB triples")
    return tuple(float(m) for m in mean), tuple(float(x) for x in std)


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 over a model's tensors (name, dtype, shape, bytes in key order): what identifies the
    weights of a timm/hub base, whose file timm reads from its own cache."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class TargetRecipe:
    """What the base model computes: the options of ``tec-cache build`` and of online mode.

    Every field left None takes the registry's value (or the --arch defaults); ``resolve`` checks
    them and gives the BaseModelSpec both the build and the online target feed run.
    """

    basemodel: str | None = option(None, f"Registry base model ({' | '.join(sorted(REGISTRY))}; its official weights are "
                                   "fetched when no --checkpoint is given), timm:NAME (any timm ViT with its pretrained "
                                   "tag) or hf-hub:ORG/REPO")
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


def build_model(spec: BaseModelSpec, pretrained: bool = False, targets: bool = True) -> timm.models.VisionTransformer:
    """Random-weight timm ViT of the spec's shape, ready for ``load_checkpoint``; a timm/hub base
    with ``pretrained`` comes with its weights from timm's pretrained machinery (``targets``: as
    in ``check_timm_vit``)."""
    if spec.timm_name is not None:
        model = _timm_create(spec.timm_name, pretrained=pretrained, img_size=spec.img_size, depth=spec.depth,
                             label=spec.name)
        vit = check_timm_vit(model, spec.name, targets=targets)
        if targets and spec.last_layers > len(vit.blocks):
            raise ValueError(f"--last-layers {spec.last_layers} exceeds the model depth {len(vit.blocks)}")
        return vit
    extra: dict[str, Any] = {} if spec.depth is None else {"depth": spec.depth}
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


def load_base_model(spec: BaseModelSpec, checkpoint: Path | None, device: torch.device | str = "cpu",
                    fetched: dict[str, Any] | None = None, targets: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build, load strictly and freeze the base model. Returns (model in eval mode, facts).

    ``checkpoint`` None: a timm/hub base's own pretrained weights (``resolve_weights`` gives the
    path otherwise); ``fetched``: where a fetched file came from, for the manifest;
    ``targets``: as in ``check_timm_vit``. The facts carry
    the base's input normalisation (``input_mean``/``input_std``) and its ``num_prefix_tokens``.
    """
    if checkpoint is None:
        if spec.source is None:
            raise ValueError(f"--checkpoint is required for {spec.name}: its weights file (a path or a URL)")
        model = build_model(spec, pretrained=True, targets=targets)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        facts: dict[str, Any] = {"layout": "timm pretrained", "ignored_missing": [], "ignored_unexpected": [],
                                 "sha256": state_sha256(model), "sha256_of": "state dict tensors",
                                 "path": str(spec.source), "pretrained_tag": cfg.get("tag"),
                                 "hf_hub_id": cfg.get("hf_hub_id")}
    else:
        model = build_model(spec, targets=targets)
        facts = load_checkpoint(model, checkpoint)
        facts["sha256"] = file_sha256(checkpoint)
        facts["path"] = str(checkpoint)
    facts.update(fetched or {})
    mean, std = base_normalisation(model, spec)
    facts["input_mean"], facts["input_std"] = list(mean), list(std)
    facts["num_prefix_tokens"] = int(getattr(model, "num_prefix_tokens", 1))
    model.requires_grad_(False).eval().to(device)
    return model, facts

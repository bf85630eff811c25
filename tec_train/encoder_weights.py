"""Load any pretrained encoder as a plain timm ViT for the downstream evaluations.

Data flow: export folder | run dir / checkpoint-*.pt (TEC student or MAE objective) | reference
TEC checkpoint {'model': ...} | base model weights (MAE / iBOT layouts) | a timm/hub base
(``timm:NAME``, ``hf-hub:ORG/REPO``: timm's own pretrained weights, or a --checkpoint file)
--> **timm VisionTransformer (num_classes=0) + JSON facts** --> evaluate.py (kNN, linear probe)
and finetune.py.

A timm/hub base keeps its own architecture (registers, distillation token, pre-norm) and its own
input normalisation (``input_normalisation``); every other source is a plain ViT with one class
token, fed ImageNet's mean/std.

Every route checks keys strictly: pretraining-only parts (adaptors, decoders, mask tokens) are the
only keys that may be dropped, and a missing or unknown key fails naming the file and the keys.
Files are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import safetensors.torch
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed

from tec_cache.core.weights import is_url

from .harness.checkpoint_state import StoredConfig
from .harness.checkpoints import digest_path, file_sha256, load_checkpoint, usable_checkpoint, verify_checkpoint_file
from .harness.errors import CheckpointError
from .student import MODEL_SIZES, parse_model_name
from .student_to_timm import CONFIG_KEYS, export_state_dict, load_tec_checkpoint, timm_model_name

SOURCE_KINDS = ("export", "run", "reference", "basemodel")
# Keys of a pretraining checkpoint that no downstream ViT has: TEC's adaptors and decoders, MAE's
# decoder and mask token. The cls MLP is folded into cls_token, not dropped.
_PRETRAIN_ONLY = re.compile(
    r"^(encoder_adaptor\.|forward_fea_decoder\.|forward_att_decoder\.|decoder_|mask_token$|cls_token_mlp\.)"
)
_CLS_MLP_PREFIX = "cls_token_mlp."


@dataclass
class EncoderWeights:
    """An encoder's timm ViT state dict (cls MLP folded), its architecture and where it came from."""

    state: dict[str, torch.Tensor]  # timm ViT keys: cls_token, pos_embed, patch_embed.*, blocks.*, norm.*
    config: dict[str, Any]  # model_name + CONFIG_KEYS, as export's config.json
    facts: dict[str, Any]  # JSON-able: kind, path, ...
    # The unfolded cls token and cls_token_mlp.* of a TEC source (None otherwise): fine-tuning
    # with the reference's --mlp_token keeps and trains the MLP instead of folding it.
    cls_mlp: dict[str, torch.Tensor] | None = field(default=None)


def reference_meta(state: dict[str, Any], model: str) -> dict[str, Any]:
    """Encoder architecture of a bare TEC state dict, with the head count from the --model size."""
    size, _ = parse_model_name(model)
    embed_dim = int(state["cls_token"].shape[-1])
    if embed_dim != MODEL_SIZES[size].embed_dim:
        raise ValueError(f"--model {model}: width {MODEL_SIZES[size].embed_dim}, but the checkpoint's is {embed_dim}")
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    grid = math.isqrt(int(state["pos_embed"].shape[1]) - 1)
    blocks = [int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k))]
    if not blocks:
        raise ValueError("no blocks.N.* keys: not a ViT encoder state dict")
    depth = 1 + max(blocks)
    return {"img_size": grid * patch, "patch_size": patch, "embed_dim": embed_dim, "depth": depth,
            "num_heads": MODEL_SIZES[size].num_heads, "student_model": model}


def _short(keys: list[str], n: int = 8) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _encoder_state(state: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Encoder keys of a pretraining state dict, cls MLP folded in; (state, folded).

    Unknown keys that are neither encoder nor pretraining-only fail: a renamed or prefixed
    checkpoint must not load as a partly random encoder.
    """
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: the state dict holds non-tensor values")
    mlp = any(k.startswith(_CLS_MLP_PREFIX) for k in state)
    try:
        out = export_state_dict(state, mlp_token=mlp)  # keeps cls_token, pos_embed, patch_embed.*, blocks.*, norm.*
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path}: {e}") from None
    unknown = [k for k in state if k not in out and not _PRETRAIN_ONLY.match(k)]
    if unknown:
        raise ValueError(f"{path}: unexpected keys {_short(unknown)} (neither ViT encoder nor pretraining-only keys)")
    return out, mlp


def _cls_mlp(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    if not any(k.startswith(_CLS_MLP_PREFIX) for k in state):
        return None
    return {k: v.detach().clone() for k, v in state.items() if k == "cls_token" or k.startswith(_CLS_MLP_PREFIX)}


# The key of an export's config.json holding model.safetensors' sha256 (exports before it have none).
EXPORT_SHA256_KEY = "safetensors_sha256"


def _say_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _read_export(folder: Path) -> EncoderWeights:
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    config = json.loads(config_path.read_text())
    missing = [k for k in ("model_name", *CONFIG_KEYS) if k not in config]
    if missing:
        raise ValueError(f"{config_path}: lacks {missing}; not a tec-train export")
    want = config.get(EXPORT_SHA256_KEY)
    if want is not None:
        got = file_sha256(weights_path)
        if got != want:
            raise ValueError(f"{weights_path}: sha256 mismatch: the file hashes to {got}, {config_path} records "
                             f"{EXPORT_SHA256_KEY} {want}; the file is damaged (export it again)")
    state = safetensors.torch.load_file(str(weights_path))
    facts = {"kind": "export", "path": str(folder),
             **{k: config[k] for k in config if isinstance(config[k], (str, int, float, bool)) or config[k] is None}}
    return EncoderWeights(state, {k: config[k] for k in ("model_name", *CONFIG_KEYS)}, facts)


def _read_run_checkpoint(ck: dict[str, Any], path: Path, model: str | None) -> EncoderWeights:
    # Only the stored config and the weights: a checkpoint that cannot resume still has an encoder.
    stored = StoredConfig.read(ck, path)  # CheckpointError (a ValueError) naming the file and key
    student = stored.resolved.student or {}
    lacks = [k for k in (*CONFIG_KEYS, "model") if k not in student]
    if lacks:
        raise ValueError(f"{path}: tec-train checkpoint without the student architecture "
                         f"(config.resolved.student lacks {lacks})")
    arch = {k: student[k] for k in (*CONFIG_KEYS, "model")}
    if model is not None and parse_model_name(model) != parse_model_name(arch["model"]):
        raise ValueError(f"--model {model}: the checkpoint's student is {arch['model']}")
    if not isinstance(ck.get("model"), Mapping):
        raise ValueError(f"{path}: tec-train checkpoint without its model's weights (key model)")
    raw = dict(ck["model"])
    state, folded = _encoder_state(raw, path)
    objective = stored.options.get("objective", "tec")
    facts = {"kind": "run", "path": str(path), "objective": objective, "student_model": arch["model"],
             "global_step": ck.get("global_step"), "mlp_token_folded": folded}
    config = {"model_name": timm_model_name(arch["model"]), **{k: arch[k] for k in CONFIG_KEYS}}
    return EncoderWeights(state, config, facts, _cls_mlp(raw))


def _read_reference(path: Path, model: str | None) -> EncoderWeights:
    raw = load_tec_checkpoint(path)
    if model is None:
        raise ValueError(f"--model: {path} is not a tec-train checkpoint or export, so its encoder size must be "
                         "given (e.g. vit_base_patch16)")
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in raw:
            raise ValueError(f"{path}: missing key {key!r}; not a ViT/TEC state dict (keys: {_short(sorted(raw))})")
    state, folded = _encoder_state(raw, path)
    meta = reference_meta(state, model)
    config = {"model_name": timm_model_name(model), **{k: meta[k] for k in CONFIG_KEYS}}
    facts = {"kind": "reference", "path": str(path), "student_model": model, "mlp_token_folded": folded}
    return EncoderWeights(state, config, facts, _cls_mlp(raw))


def _native_img_size(path: Path, patch_size: int, pos_prefix: int = 1) -> int | None:
    """Image size a base-model file's pos_embed was made for (None when it has none: the strict load
    reports it); ``pos_prefix``: the pos_embed entries of prefix tokens (0 for timm's no_embed_class)."""
    from tec_cache.core.basemodels import extract_state_dict

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if "pos_embed" not in f.keys():
                return None
            n = int(f.get_slice("pos_embed").get_shape()[1])
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: only the shape is read
        except Exception:  # noqa: BLE001 - the real load below reports unreadable files
            return None
        if not isinstance(obj, dict):
            return None
        try:
            sd, _ = extract_state_dict(obj, path)
        except ValueError:
            return None
        if "pos_embed" not in sd:
            return None
        n = int(sd["pos_embed"].shape[1])
    grid = math.isqrt(max(n - pos_prefix, 0))
    return grid * patch_size if grid * grid == n - pos_prefix and grid > 0 else None


def _read_basemodel(source: str | Path | None, basemodel: str | None, arch: str | None, patch_size: int | None,
                    depth: int | None, img_size: int | None = None) -> EncoderWeights:
    from tec_cache.core.basemodels import is_timm_source, load_base_model, resolve_spec, resolve_weights

    if basemodel is not None and is_timm_source(basemodel):
        if arch is not None:
            raise ValueError(f"--arch: {basemodel} names its own architecture; give one of the two")
        return _read_timm_base(source, basemodel, img_size, patch_size, depth)
    # topk/last_layers only shape stage-1 targets; 1 keeps resolve_spec's checks from refusing small grids.
    spec = resolve_spec(basemodel, arch=arch, patch_size=patch_size, depth=depth, topk=1, last_layers=1)
    # A URL, or no source with a registry name: fetched (and verified) into the weights cache.
    if source is not None and not is_url(str(source)) and not Path(source).is_file():
        raise FileNotFoundError(f"{source}: no such base-model weights file")
    path_or_none, fetched = resolve_weights(spec, source)
    assert path_or_none is not None
    path = path_or_none
    # Built at the file's own grid (re-sampled afterwards if --img-size differs): --img-size is the
    # resolution wanted, for every kind of source alike.
    native = _native_img_size(path, spec.patch_size)
    if native is not None and native != spec.img_size:
        spec = resolve_spec(basemodel, arch=arch, img_size=native, patch_size=patch_size, depth=depth, topk=1, last_layers=1)
    model: Any  # a timm ViT, whose parts are nn.Module attribute look-ups (untyped)
    model, load_facts = load_base_model(spec, path, fetched=fetched)  # strict: only head / norm / masked_embed may differ
    config = {"model_name": spec.arch, "img_size": spec.img_size, "patch_size": spec.patch_size,
              "embed_dim": model.embed_dim, "depth": len(model.blocks), "num_heads": model.blocks[0].attn.num_heads}
    # A base model file without norm.* (the loader allows it missing) evaluates with an identity
    # final norm; say so.
    norm_missing = any(k.startswith("norm.") for k in load_facts["ignored_missing"])
    facts = {"kind": "basemodel", "path": str(path), **fetched, "basemodel": spec.name, "arch": spec.arch,
             "layout": load_facts["layout"], "sha256": load_facts["sha256"], "norm_initialised": norm_missing}
    return EncoderWeights({k: v.detach().clone() for k, v in model.state_dict().items()}, config, facts)


def _pos_prefix(model: torch.nn.Module) -> int:
    """pos_embed entries in front of the patch grid: none for timm's no_embed_class (DINOv2 with
    registers), else one per prefix token (cls, registers, DeiT's distillation token)."""
    return 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))


def _read_timm_base(source: str | Path | None, basemodel: str, img_size: int | None, patch_size: int | None,
                    depth: int | None) -> EncoderWeights:
    """A ``timm:NAME`` / ``hf-hub:ORG/REPO`` base as stage 1 loads it: timm's pretrained weights
    (through the hub cache) at ``img_size`` (default 224, as ``tec-cache build``; timm's loader
    re-samples pos_embed around the prefix tokens once, as it loads), or ``source`` (a file or
    URL) strictly into its architecture at the file's own grid (re-sampled afterwards)."""
    from tec_cache.core.basemodels import build_model, load_base_model, resolve_spec, resolve_weights

    def spec_at(img: int | None) -> Any:
        # topk/last_layers only shape stage-1 targets; 1 keeps resolve_spec's checks from refusing small grids.
        return resolve_spec(basemodel, img_size=img, patch_size=patch_size, depth=depth, topk=1, last_layers=1,
                            targets=False)

    spec = spec_at(img_size if source is None else None)
    if source is not None and not is_url(str(source)) and not Path(source).is_file():
        raise FileNotFoundError(f"{source}: no such base-model weights file")
    path, fetched = resolve_weights(spec, source)
    if path is not None:
        with torch.device("meta"):  # the architecture's prefix layout only: no weights, no memory
            pos_prefix = _pos_prefix(build_model(spec, targets=False))
        native = _native_img_size(path, spec.patch_size, pos_prefix)
        if native is not None and native != spec.img_size:
            spec = spec_at(native)
    model: Any  # a timm ViT, whose parts are nn.Module attribute look-ups (untyped)
    model, load_facts = load_base_model(spec, path, fetched=fetched, targets=False)
    config = {"model_name": spec.timm_name, "img_size": spec.img_size, "patch_size": spec.patch_size,
              "embed_dim": model.embed_dim, "depth": len(model.blocks), "num_heads": model.blocks[0].attn.num_heads,
              # build_vit re-creates the architecture from the timm name / hub config with these.
              "timm_source": spec.source, "timm_depth": spec.depth,
              "num_prefix_tokens": int(model.num_prefix_tokens), "pos_embed_prefix_tokens": _pos_prefix(model),
              "class_token": bool(model.has_class_token)}
    facts: dict[str, Any] = {"kind": "basemodel", "path": str(path if path is not None else spec.source), **fetched,
             "basemodel": spec.name, "arch": spec.arch,
             **{k: load_facts[k] for k in ("layout", "sha256", "input_mean", "input_std")},
             **{k: load_facts[k] for k in ("sha256_of", "pretrained_tag", "hf_hub_id") if k in load_facts}}
    return EncoderWeights({k: v.detach().clone() for k, v in model.state_dict().items()}, config, facts)


def input_normalisation(facts: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) an encoder's images are normalised with: a timm/hub base's own (its
    pretrained_cfg, as stage 1 records it), ImageNet's for every other source."""
    if facts.get("timm_source"):
        return tuple(facts["input_mean"]), tuple(facts["input_std"])
    return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)


def read_encoder_weights(
    source: Path | str | None,
    *,
    model: str | None = None,
    basemodel: str | None = None,
    arch: str | None = None,
    img_size: int | None = None,
    patch_size: int | None = None,
    depth: int | None = None,
    say: Callable[[str], None] = _say_stderr,
) -> EncoderWeights:
    """The encoder weights of ``source`` (see the module docstring), not yet in a model.

    Digests are checked first: a run dir gives its newest intact checkpoint (``say`` gets a line for
    each damaged one skipped, or for one written before digests), a checkpoint file must match its
    ``.sha256``, an export its config.json's sha256 of model.safetensors; ValueError names a mismatch.

    ``basemodel``/``arch`` select the base-model route (``source`` is its weights file) and take
    ``patch_size``/``depth`` as in tec-cache (its image size is read off the file's pos_embed).
    For the other routes ``patch_size``/``depth`` are fixed by the source and may only repeat its
    values. For every route, an ``img_size`` other than the source's re-samples pos_embed.
    """
    if basemodel is not None or arch is not None:
        weights = _read_basemodel(source, basemodel, arch, patch_size, depth, img_size)
        source = weights.facts["path"]
    elif source is None:
        raise FileNotFoundError("SOURCE: an export folder, run dir, checkpoint file, or base-model weights is required")
    elif (source := Path(source)).is_dir():
        if (source / "config.json").is_file() and (source / "model.safetensors").is_file():
            weights = _read_export(source)
        else:
            found = usable_checkpoint(source, say=say)
            if found is None:
                raise FileNotFoundError(f"{source}: neither an export folder (config.json + model.safetensors) "
                                        "nor a run dir with a complete checkpoint-*.pt")
            weights = _read_run_checkpoint(load_checkpoint(found), found, model)
    elif source.is_file():
        if source.suffix == ".safetensors" and (source.parent / "config.json").is_file():
            weights = _read_export(source.parent)
        else:
            if digest_path(source).exists():
                verify_checkpoint_file(source)  # CheckpointError (a ValueError) names the mismatch
            try:
                ck = load_checkpoint(source)
                if not digest_path(source).exists():
                    verify_checkpoint_file(source, say)  # one of ours written before digests: say so
            except CheckpointError:
                ck = None  # not ours: a reference TEC (or MAE) checkpoint {'model': ...} or a bare state dict
            weights = _read_run_checkpoint(ck, source, model) if ck is not None else _read_reference(source, model)
    else:
        raise FileNotFoundError(f"{source}: no such export folder, run dir or checkpoint file")
    base = basemodel is not None or arch is not None
    for name, value in (("--patch-size", patch_size), ("--depth", depth)):
        key = name[2:].replace("-", "_")
        if not base and value is not None and value != weights.config[key]:
            raise ValueError(f"{name} {value}: {source} has {key} {weights.config[key]}; "
                             "only base models (--basemodel/--arch) take a different one")
    if img_size is not None and img_size != weights.config["img_size"]:
        _resize(weights, img_size, source)
    return weights


def _resize(weights: EncoderWeights, img_size: int, source: Path | str) -> None:
    """Re-sample pos_embed (bicubic, prefix-token entries kept) for another image size, in place."""
    patch = weights.config["patch_size"]
    if img_size % patch:
        raise ValueError(f"--img-size {img_size} is not a multiple of {source}'s patch size {patch}")
    grid = img_size // patch
    old = weights.config["img_size"] // patch
    weights.state["pos_embed"] = resample_abs_pos_embed(
        weights.state["pos_embed"], new_size=[grid, grid], old_size=[old, old],
        num_prefix_tokens=int(weights.config.get("pos_embed_prefix_tokens", 1)),
    )  # [1, prefix + grid^2, C]
    weights.facts["pos_embed_resampled_from"] = weights.config["img_size"]
    weights.config["img_size"] = img_size


def build_vit(config: dict[str, Any], **kwargs: Any) -> timm.models.VisionTransformer:
    """timm ViT of ``config``'s architecture (no head unless ``num_classes`` is passed)."""
    kwargs.setdefault("num_classes", 0)
    if config.get("timm_source"):
        # A timm/hub base: its own architecture by its timm name (a hub repo's from its config.json, via the hub cache).
        from tec_cache.core.basemodels import _timm_create

        return cast(timm.models.VisionTransformer,
                    _timm_create(config["model_name"], pretrained=False, img_size=config["img_size"],
                                 depth=config.get("timm_depth"), label=config["timm_source"], **kwargs))
    if not timm.is_model(config["model_name"]):
        raise ValueError(f"{config['model_name']!r} is not a timm model name")
    return cast(timm.models.VisionTransformer,
                timm.create_model(config["model_name"], pretrained=False, **{k: config[k] for k in CONFIG_KEYS}, **kwargs))


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str,
                      allow_missing: tuple[str, ...] = ()) -> list[str]:
    """load_state_dict that fails naming ``where`` and the missing/unexpected/mis-shaped keys.

    Keys starting with one of ``allow_missing`` may be absent and keep the model's values; the
    ones left so are returned.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    tolerated = [k for k in missing if k.startswith(allow_missing)] if allow_missing else []
    missing = [k for k in missing if k not in tolerated]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"{where}: does not fit {type(model).__name__}: missing keys: {_short(missing)}; "
                         f"unexpected keys: {_short(unexpected)}; shape mismatches (file vs model): {_short(shapes)}")
    model.load_state_dict({**{k: own[k] for k in tolerated}, **state}, strict=True)
    return tolerated


def load_encoder(
    source: Path | str | None,
    *,
    model: str | None = None,
    basemodel: str | None = None,
    arch: str | None = None,
    img_size: int | None = None,
    patch_size: int | None = None,
    depth: int | None = None,
) -> tuple[timm.models.VisionTransformer, dict[str, Any]]:
    """A plain timm ViT (num_classes=0, eval mode, on the CPU) with ``source``'s weights, and JSON facts.

    Sources: an export folder, a run dir (latest checkpoint) or checkpoint-*.pt of ``tec-train run``
    (TEC student or MAE objective), a reference TEC checkpoint ({'model': ...} or bare; needs
    ``model``), or a base model's weights file with ``basemodel`` (registry name) or ``arch``.
    """
    weights = read_encoder_weights(source, model=model, basemodel=basemodel, arch=arch, img_size=img_size,
                                   patch_size=patch_size, depth=depth)
    vit = build_vit(weights.config)
    # The reference's converted releases (method.md 5.3) carry no norm.*: that route alone may lack it.
    allow = ("norm.",) if weights.facts["kind"] == "reference" else ()
    initialised = load_state_strict(vit, weights.state, str(source), allow_missing=allow)
    if initialised:
        weights.facts["norm_initialised"] = True
    facts = {**weights.facts, **weights.config}
    return vit.eval(), facts


__all__ = ["EncoderWeights", "SOURCE_KINDS", "build_vit", "load_encoder", "load_state_strict",
           "input_normalisation", "read_encoder_weights", "reference_meta"]

"""Turn a TEC pretraining checkpoint into a plain timm ViT (spec 5.3).

Data flow: checkpoint -> **export** -> downstream (finetune | knn | linear probe). The student's
pretraining-only parts (encoder adaptor, both decoders, decoder_pos_embed) are dropped and the
input adaptor is folded into the cls token, so the result is an ordinary timm ViT state dict.
Unlike the reference converter, the final ``norm.*`` is kept: it makes the export load strictly
into ``timm.create_model(..., num_classes=0)`` and gives the pretrained features unchanged.
"""
from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from .student import MODEL_SIZES, parse_model_name

_ENCODER_PREFIXES = ("patch_embed.", "blocks.", "norm.")
_ENCODER_KEYS = ("cls_token", "pos_embed")
_CLS_MLP_KEYS = tuple(f"cls_token_mlp.{fc}.{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias"))
CONFIG_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")


def _fold_cls_token(state_dict: dict[str, torch.Tensor]) -> torch.Tensor:
    """cls = fc2(GELU(fc1(cls))): what the student feeds its encoder, computed once."""
    cls = state_dict["cls_token"]  # [1, 1, C]
    hidden = F.gelu(F.linear(cls, state_dict["cls_token_mlp.fc1.weight"], state_dict["cls_token_mlp.fc1.bias"]))
    return F.linear(hidden, state_dict["cls_token_mlp.fc2.weight"], state_dict["cls_token_mlp.fc2.bias"])  # [1, 1, C]


def export_state_dict(student_state_dict: dict[str, torch.Tensor], *, mlp_token: bool = True) -> dict[str, torch.Tensor]:
    """Encoder-only timm ViT state dict: cls_token (cls MLP folded in), pos_embed, patch_embed, blocks, norm."""
    has_mlp = any(k in student_state_dict for k in _CLS_MLP_KEYS)
    if mlp_token and not has_mlp:
        raise ValueError("mlp_token=True but the state dict has no cls_token_mlp.* keys")
    if not mlp_token and has_mlp:
        # Dropping the MLP without folding it would silently change the cls token the encoder saw.
        raise ValueError("state dict has cls_token_mlp.* keys: export it with mlp_token=True")
    out = {
        k: v.detach()
        for k, v in student_state_dict.items()
        if k in _ENCODER_KEYS or k.startswith(_ENCODER_PREFIXES)
    }
    missing = [k for k in _ENCODER_KEYS if k not in out]
    if missing:
        raise ValueError(f"not a TEC student state dict: missing {missing}")
    if mlp_token:
        with torch.no_grad():
            out["cls_token"] = _fold_cls_token(student_state_dict)
    return out


def timm_model_name(student_name: str) -> str:
    """timm architecture name for a student name, e.g. vit_base_patch16 -> vit_base_patch16_224.

    Patch sizes timm has no registered model for (e.g. vit_tiny_patch4) map to the size's
    canonical name; the real patch size and image size travel in config.json.
    """
    size, patch = parse_model_name(student_name)
    candidate = f"vit_{size}_patch{patch}_224"
    if timm.is_model(candidate):
        return candidate
    return f"vit_{size}_patch{MODEL_SIZES[size].patch_size}_224"


def save_export(
    state_dict: dict[str, torch.Tensor], out_dir: str | Path, model_name: str, meta: dict[str, Any]
) -> dict[str, Path]:
    """Write model.safetensors, model.pth (bare state dict) and config.json; returns their paths.

    ``meta`` must hold the encoder architecture (CONFIG_KEYS, e.g. ``TECStudent.encoder_config()``);
    any other JSON-serialisable entries are recorded as well.
    """
    missing = [k for k in CONFIG_KEYS if k not in meta]
    if missing:
        raise ValueError(f"export meta lacks {missing}; needed to rebuild the timm model")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # safetensors refuses non-contiguous or storage-sharing tensors; cloning makes both hold.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    paths = {
        "safetensors": out_dir / "model.safetensors",
        "pth": out_dir / "model.pth",
        "config": out_dir / "config.json",
    }
    safetensors.torch.save_file(tensors, str(paths["safetensors"]), metadata={"model_name": model_name})
    torch.save(tensors, paths["pth"])
    config = {"model_name": model_name, **meta}
    paths["config"].write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return paths


def create_timm_model(config: dict[str, Any]) -> nn.Module:
    """The timm ViT (no head) an export's config.json describes; load the export into it strictly."""
    return timm.create_model(
        config["model_name"],
        pretrained=False,
        num_classes=0,
        **{k: config[k] for k in CONFIG_KEYS},
    )


def load_tec_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """State dict from a TEC pretraining checkpoint ``{'model': ..., 'args': Namespace, ...}`` or a bare one.

    Loads with weights_only=True; the reference's checkpoints pickle an argparse.Namespace under
    'args', which is allowed for this one load only.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: refused by torch.load(weights_only=True); it holds objects other than "
                         f"tensors, containers and argparse.Namespace: {err}") from err
    if isinstance(obj, dict) and "model" in obj:
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"{path}: neither a {{'model': state_dict}} checkpoint nor a bare state dict")
    return dict(obj)


def export_encoder(source: str | Path, out: str | Path, model: str | None = None) -> dict[str, Path]:
    """``tec-train export``: the encoder of a run dir (its latest checkpoint), a tec-train checkpoint
    or a reference TEC checkpoint, written as a plain timm ViT into ``out``; returns the file paths.

    The source is found and read by encoder_weights' routing, as finetune, knn and linear read it;
    ValueError / FileNotFoundError name the argument (RUN_OR_CKPT, --model, --out) before anything
    is written.
    """
    # encoder_weights builds on this module (export_state_dict, timm_model_name): imported here.
    from .harness.checkpoints import latest_checkpoint
    from .encoder_weights import read_encoder_weights

    source, out = Path(source), Path(out)
    if source.is_dir():
        if latest_checkpoint(source) is None:
            raise FileNotFoundError(f"RUN_OR_CKPT: {source} is a folder without any complete checkpoint-*.pt "
                                    "(expected a run dir or a checkpoint file)")
    elif not source.is_file():
        raise FileNotFoundError(f"RUN_OR_CKPT: no such run dir or checkpoint file {source}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} exists and is not a folder (expected a folder for the exported model)")
    if model is not None:
        try:
            parse_model_name(model)
        except ValueError as e:
            raise ValueError(f"--model: {e}") from None
    weights = read_encoder_weights(source, model=model)
    facts = weights.facts
    meta = {**{k: weights.config[k] for k in CONFIG_KEYS}, "student_model": facts["student_model"],
            "source_checkpoint": facts["path"], "mlp_token_folded": facts["mlp_token_folded"]}
    if facts.get("global_step") is not None:
        meta["global_step"] = facts["global_step"]
    return save_export(weights.state, out, weights.config["model_name"], meta)

"""A TEC student's weights as a timm ViT encoder's: which keys are the encoder's, the cls MLP
folded into the cls token, the timm name of a student size, and reading a pretraining checkpoint.

Data flow: TEC pretraining checkpoint (ours or the reference's) --> **load_tec_checkpoint** -->
**export_state_dict** (+ ``timm_model_name``, CONFIG_KEYS) --> export.py (writes an export folder)
and encoder_weights.py (loads any encoder source for the downstream commands).
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import timm
import torch
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

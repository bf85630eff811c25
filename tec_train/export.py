"""Turn a TEC pretraining checkpoint into a plain timm ViT (method.md 5.3).

Data flow: checkpoint -> **export** -> downstream (finetune | knn | linear probe). The student's
pretraining-only parts (encoder adaptor, both decoders, decoder_pos_embed) are dropped and the
input adaptor is folded into the cls token, so the result is an ordinary timm ViT state dict.
Unlike the reference converter, the final ``norm.*`` is kept: it makes the export load strictly
into ``timm.create_model(..., num_classes=0)`` and gives the pretrained features unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
import torch.nn as nn

from .encoder_weights import EXPORT_SHA256_KEY, read_encoder_weights
from .harness.checkpoints import file_sha256, list_checkpoints
from .student import parse_model_name
from .student_to_timm import CONFIG_KEYS, export_state_dict, load_tec_checkpoint, timm_model_name

__all__ = ["CONFIG_KEYS", "create_timm_model", "export_encoder", "export_state_dict", "load_tec_checkpoint", "save_export",
           "timm_model_name"]


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
    # Readers (finetune, knn, linear) check the weights against it before use.
    config = {"model_name": model_name, **meta, EXPORT_SHA256_KEY: file_sha256(paths["safetensors"])}
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


def export_encoder(source: str | Path, out: str | Path, model: str | None = None) -> dict[str, Path]:
    """``tec-train export``: the encoder of a run dir (its latest checkpoint), a tec-train checkpoint
    or a reference TEC checkpoint, written as a plain timm ViT into ``out``; returns the file paths.

    The source is found and read by encoder_weights' routing, as finetune, knn and linear read it;
    ValueError / FileNotFoundError name the argument (RUN_OR_CKPT, --model, --out) before anything
    is written.
    """
    # encoder_weights builds on this module (export_state_dict, timm_model_name): imported here.

    source, out = Path(source), Path(out)
    if source.is_dir():
        if not list_checkpoints(source):
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

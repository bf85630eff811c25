"""Target codecs: how the base model's float targets become the arrays a shard stores, and back.

Data flow: targets (torch, any device) --encode--> numpy fields (written by a shard writer)
--read--> torch fields --decode (on the training device)--> float targets for the losses.

Two codecs:
- ``fp16``: the reference's own precision (its targets are made under fp16 autocast).
- ``int8``: loss-compatible quantisation. The feature loss normalises every channel over the
  tokens of one view, so each channel gets its own affine code (offset + step over its L values);
  the attention loss is a softmax over the keys of one row, so each logit row gets its own affine
  code too. Both keep the full 8 bits for the values the loss actually compares.

Byte compression is the shard format's job (zstd via numcodecs), not the codec's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tec_cache.records import FieldSpec


@dataclass(frozen=True)
class TargetShape:
    """Per-view target sizes: L patches, D feature channels, H heads, k top-k rows."""

    num_patches: int
    dim: int
    heads: int
    topk: int


DecodedTargets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _index_dtype(num_patches: int) -> str:
    return "int16" if num_patches <= np.iinfo(np.int16).max else "int32"


class Fp16Codec:
    """Stores feature and attention targets as float16, indices as int16."""

    name = "fp16"

    def field_specs(self, shape: TargetShape) -> dict[str, FieldSpec]:
        L, D, H, k = shape.num_patches, shape.dim, shape.heads, shape.topk
        return {
            "feat": FieldSpec("float16", (L, D)),
            "att": FieldSpec("float16", (k + 1, H, L)),
            "idx": FieldSpec(_index_dtype(L), (k,)),
        }

    def encode(self, feat: torch.Tensor, att: torch.Tensor, idx: torch.Tensor) -> dict[str, np.ndarray]:
        # feat [B,L,D], att [B,k+1,H,L], idx [B,k]
        return {
            "feat": feat.to(torch.float16).cpu().numpy(),
            "att": att.to(torch.float16).cpu().numpy(),
            "idx": idx.to(torch.int32).cpu().numpy().astype(_index_dtype(feat.shape[1])),
        }

    def decode(self, fields: dict[str, torch.Tensor]) -> DecodedTargets:
        return fields["feat"].float(), fields["att"].float(), fields["idx"].long()


def _affine_quantize(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise ``x`` to int8 with one (lo, step) pair per slice reduced along ``dim``.

    Code q in [-128, 127] stands for lo + (q + 128) * step. lo and step are stored as float16,
    so the rounding uses the float16 values: what is decoded is what was measured.
    """
    x = x.float()
    lo = x.amin(dim=dim, keepdim=True).to(torch.float16)
    hi = x.amax(dim=dim, keepdim=True)
    step = ((hi - lo.float()) / 255.0).to(torch.float16)
    # A constant slice has step 0; any positive step decodes it exactly to lo.
    step = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.round((x - lo.float()) / step.float()).clamp_(0, 255) - 128
    return q.to(torch.int8), lo.squeeze(dim), step.squeeze(dim)


def _affine_dequantize(q: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, dim: int) -> torch.Tensor:
    return (q.float() + 128.0) * step.float().unsqueeze(dim) + lo.float().unsqueeze(dim)


class Int8Codec:
    """Per-channel affine int8 features, per-row affine int8 attention logits, int16 indices."""

    name = "int8"

    def field_specs(self, shape: TargetShape) -> dict[str, FieldSpec]:
        L, D, H, k = shape.num_patches, shape.dim, shape.heads, shape.topk
        return {
            "feat_q": FieldSpec("int8", (L, D)),
            "feat_lo": FieldSpec("float16", (D,)),
            "feat_step": FieldSpec("float16", (D,)),
            "att_q": FieldSpec("int8", (k + 1, H, L)),
            "att_lo": FieldSpec("float16", (k + 1, H)),
            "att_step": FieldSpec("float16", (k + 1, H)),
            "idx": FieldSpec(_index_dtype(L), (k,)),
        }

    def encode(self, feat: torch.Tensor, att: torch.Tensor, idx: torch.Tensor) -> dict[str, np.ndarray]:
        # Quantise where the targets are (the GPU in a real build), copy only int8 to the host.
        feat_q, feat_lo, feat_step = _affine_quantize(feat, dim=1)  # [B,L,D], [B,D], [B,D]
        att_q, att_lo, att_step = _affine_quantize(att, dim=3)  # [B,k+1,H,L], [B,k+1,H] x2
        out = {
            "feat_q": feat_q,
            "feat_lo": feat_lo,
            "feat_step": feat_step,
            "att_q": att_q,
            "att_lo": att_lo,
            "att_step": att_step,
        }
        arrays = {name: t.cpu().numpy() for name, t in out.items()}
        arrays["idx"] = idx.to(torch.int32).cpu().numpy().astype(_index_dtype(feat.shape[1]))
        return arrays

    def decode(self, fields: dict[str, torch.Tensor]) -> DecodedTargets:
        feat = _affine_dequantize(fields["feat_q"], fields["feat_lo"], fields["feat_step"], dim=-2)
        att = _affine_dequantize(fields["att_q"], fields["att_lo"], fields["att_step"], dim=-1)
        return feat, att, fields["idx"].long()


CODECS: dict[str, Fp16Codec | Int8Codec] = {"fp16": Fp16Codec(), "int8": Int8Codec()}


def get_codec(name: str) -> Fp16Codec | Int8Codec:
    """The codec called ``name``; ValueError lists the known ones."""
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; expected one of {sorted(CODECS)}") from None


def stack_fields(per_view: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack per-view numpy fields into batched tensors (the loader's collate step)."""
    return {name: torch.from_numpy(np.stack([v[name] for v in per_view])) for name in per_view[0]}


def split_fields(batch: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Batched encoded fields -> one dict per view (contiguous copies, ready to write)."""
    n = len(next(iter(batch.values())))
    return [{name: np.ascontiguousarray(arr[i]) for name, arr in batch.items()} for i in range(n)]


def fidelity(
    codec: Fp16Codec | Int8Codec, feat: torch.Tensor, att: torch.Tensor, idx: torch.Tensor, tau: float
) -> dict[str, float]:
    """How much a codec changes what the losses see, on a batch of float32 targets.

    feature_cosine: mean over views of the cosine between the original and decoded feature
    target after the loss's own token-axis normalisation; feature_cosine_raw: the same on the raw
    values; att_kl: mean over rows of KL(softmax(att/tau) || softmax(decoded/tau)), in nats.
    """
    fields = codec.encode(feat, att, idx)
    dfeat, datt, didx = codec.decode({k: torch.from_numpy(v) for k, v in fields.items()})
    if not torch.equal(didx, idx.long().cpu()):
        raise AssertionError(f"codec {codec.name} changed the top-k indices")
    feat, att = feat.float().cpu(), att.float().cpu()

    def norm_tokens(x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(dim=1, keepdim=True)) / (x.var(dim=1, keepdim=True) + 1e-6).sqrt()

    def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
        return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).mean().item()

    logp = torch.log_softmax(att / tau, dim=-1)
    logq = torch.log_softmax(datt / tau, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    return {
        "feature_cosine": cosine(norm_tokens(feat), norm_tokens(dfeat)),
        "feature_cosine_raw": cosine(feat, dfeat),
        "feature_max_abs_err": (feat - dfeat).abs().max().item(),
        "att_kl": kl,
    }

"""Target codecs: how the base model's float targets become the arrays a shard stores, and back.

Data flow: targets (torch, any device) --encode--> numpy fields (written by a shard writer)
--read--> torch fields --decode (on the training device)--> float targets for the losses.

Three codecs:
- ``fp16``: the reference's own precision (its targets are made under fp16 autocast).
- ``int8``: loss-compatible quantisation to 8-bit codes. The feature loss normalises every
  channel over the tokens of one view, so each channel gets its own affine code (offset + step
  over its L values); the attention loss is a softmax over the keys of one row, so each logit row
  gets its own affine code too. The step is tied to each slice's std (see RESOLUTION), the scale
  the losses actually compare at.
- ``int8-coarse``: the same fields and decoding as ``int8`` at a coarse step (sigma/2.5 of each
  feature channel, sigma/16 of each logit row), so the codes take few distinct values and the
  shard's zstd stores them in fewer bits: 32% fewer target bytes than int8 (27% fewer per view,
  JPEG included) at a feature cosine of 0.9935 after the loss's normalisation and an attention KL
  of 2e-6 nats (benchmarks/bench_codecs.py, ViT-B-shaped targets). Packing 4-bit codes two
  to a byte was measured too: zstd then finds less to compress, and the bytes end up larger at a
  worse cosine.

Byte compression is the shard format's job (zstd via numcodecs), not the codec's; the codec only
says which of its fields zstd is worth its time on (``FieldSpec.compress``), as measured on
ViT-B-shaped targets (benchmarks/bench_fields.py): a field is compressed when zstd saves at least
5% of it and 1 KB per view. So the feature codes (20% saved for int8, 49% for int8-coarse) and fp16's
feature and logit arrays (8%) are compressed; int8's logit codes (1.4%, at sigma/64 they are close
to incompressible) are not, int8-coarse's (20%) are; the per-slice offsets and steps (under 300
bytes saved for 0.04 ms per view, write and read) and the indices (zstd makes them longer) never.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tec_cache.format.schema import FieldSpec


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
            "idx": FieldSpec(_index_dtype(L), (k,), compress=False),
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


# Quantisation step: at most sigma/resolution of the slice it codes. The losses only see each
# feature channel normalised by its std over tokens and each logit row through a softmax, so the
# error that matters is relative to sigma. Features: sigma/16 leaves an error std of sigma/55
# (feature cosine ~0.9998 after the loss's normalisation) while the codes keep a low enough
# entropy for zstd to store them in ~6 bits. Logit rows are a fifth of the bytes and feed
# exp(x/tau), so they get sigma/64 (KL ~1e-5 nats for rows with std 3 at tau 1.8).
# Heavy-tailed slices use the min-max step (range/255) instead, so no value is ever clipped.
FEATURE_RESOLUTION = 16.0
LOGIT_RESOLUTION = 64.0
# Views quantised per pass on the CPU: one ViT-B view is ~0.6 MB of float32, so a few views stay
# in cache between the passes; a whole 64-view batch per pass measured 1.6x slower per view.
_CPU_GROUP = 4


def _affine_quantize(x: torch.Tensor, dim: int, resolution: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise ``x`` to uint8 with one (lo, step) pair per slice reduced along ``dim``.

    Code q in [0, 255] stands for lo + q * step. lo and step are stored as float16, so the
    rounding uses the float16 values: what is decoded is what was measured.
    """
    x = x.float()
    n = x.shape[dim]
    # amin/amax/sum are single fast passes on the CPU; aminmax and std over a middle axis are
    # several times slower there. The std only sets the step, so the one-pass formula is enough.
    lo = x.amin(dim=dim, keepdim=True).to(torch.float16).float()
    hi = x.amax(dim=dim, keepdim=True)
    mean = x.sum(dim=dim, keepdim=True) / n
    var = ((x * x).sum(dim=dim, keepdim=True) - n * mean * mean) / max(n - 1, 1)
    sd = var.clamp_(min=0.0).sqrt_()
    step = torch.maximum((hi - lo) / 255.0, sd / resolution).to(torch.float16).float()
    # A constant slice has step 0; any positive step decodes it exactly to lo.
    step = torch.where(step > 0, step, torch.ones_like(step))
    inv = 1.0 / step
    # floor(x/step - lo/step + 0.5) = round((x - lo)/step): one fused pass instead of four.
    # float -> uint8 directly is several times slower on the CPU than through int16 (same
    # truncation, values already in [0, 255]).
    q = torch.addcmul(0.5 - lo * inv, x, inv).clamp_(0.0, 255.0).to(torch.int16).to(torch.uint8)
    return q, lo.to(torch.float16).squeeze(dim), step.to(torch.float16).squeeze(dim)


def _affine_dequantize(q: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, dim: int) -> torch.Tensor:
    return q.float() * step.float().unsqueeze(dim) + lo.float().unsqueeze(dim)


class Int8Codec:
    """8-bit codes: per-channel affine features, per-row affine attention logits, int16 indices.

    ``feature_resolution`` / ``logit_resolution``: the step is at most sigma/resolution of each
    slice (see FEATURE_RESOLUTION); a coarser step trades fidelity for bytes after compression.
    """

    def __init__(self, name: str = "int8", feature_resolution: float = FEATURE_RESOLUTION,
                 logit_resolution: float = LOGIT_RESOLUTION, compress_logits: bool = False) -> None:
        self.name = name
        self.feature_resolution, self.logit_resolution = feature_resolution, logit_resolution
        self.compress_logits = compress_logits

    def field_specs(self, shape: TargetShape) -> dict[str, FieldSpec]:
        L, D, H, k = shape.num_patches, shape.dim, shape.heads, shape.topk
        return {
            "feat_q": FieldSpec("uint8", (L, D)),
            "feat_lo": FieldSpec("float16", (D,), compress=False),
            "feat_step": FieldSpec("float16", (D,), compress=False),
            "att_q": FieldSpec("uint8", (k + 1, H, L), compress=self.compress_logits),
            "att_lo": FieldSpec("float16", (k + 1, H), compress=False),
            "att_step": FieldSpec("float16", (k + 1, H), compress=False),
            "idx": FieldSpec(_index_dtype(L), (k,), compress=False),
        }

    def encode(self, feat: torch.Tensor, att: torch.Tensor, idx: torch.Tensor) -> dict[str, np.ndarray]:
        # Quantise where the targets are (the GPU in a real build), copy only the codes to the host.
        group = feat.shape[0] if feat.is_cuda else _CPU_GROUP
        parts: dict[str, list[torch.Tensor]] = {}
        for i in range(0, feat.shape[0], group):
            fq, flo, fst = _affine_quantize(feat[i:i + group], dim=1, resolution=self.feature_resolution)  # [g,L,D], [g,D], [g,D]
            aq, alo, ast = _affine_quantize(att[i:i + group], dim=3, resolution=self.logit_resolution)  # [g,k+1,H,L], [g,k+1,H] x2
            for name, t in (("feat_q", fq), ("feat_lo", flo), ("feat_step", fst), ("att_q", aq), ("att_lo", alo), ("att_step", ast)):
                parts.setdefault(name, []).append(t)
        arrays = {name: torch.cat(ts).cpu().numpy() for name, ts in parts.items()}
        arrays["idx"] = idx.to(torch.int32).cpu().numpy().astype(_index_dtype(feat.shape[1]))
        return arrays

    def decode(self, fields: dict[str, torch.Tensor]) -> DecodedTargets:
        feat = _affine_dequantize(fields["feat_q"], fields["feat_lo"], fields["feat_step"], dim=-2)
        att = _affine_dequantize(fields["att_q"], fields["att_lo"], fields["att_step"], dim=-1)
        return feat, att, fields["idx"].long()


# The coarse resolutions: the largest feature step that keeps the feature cosine (after the loss's
# normalisation) above 0.99 with a margin on ViT-B-shaped targets (0.9935 measured at 2.5; 0.9898
# at 2). Logit rows keep sigma/16: a random network's logits are small, but a trained base model's
# rows have a std near 3, where sigma/4 costs 7e-3 nats of KL at tau 1.8 and sigma/16 4e-4.
COARSE_FEATURE_RESOLUTION = 2.5
COARSE_LOGIT_RESOLUTION = 16.0
CODECS: dict[str, Fp16Codec | Int8Codec] = {
    "fp16": Fp16Codec(),
    "int8": Int8Codec(),
    "int8-coarse": Int8Codec("int8-coarse", COARSE_FEATURE_RESOLUTION, COARSE_LOGIT_RESOLUTION, compress_logits=True),
}


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

"""The TEC student: a masked ViT encoder with the conditional adapter and two decoders (method.md 3).

Data flow: cache -> loader -> **student + adapter** -> losses -> step. The loader hands over the
images the base model saw and its cached targets (feature [B, L, D], attention logits
[B, k+1, H, L], top-k indices [B, k]); the student masks the image, encodes the visible tokens,
fuses all encoder layers through the encoder adaptor and predicts both targets. D and H are the
base model's and only size the prediction heads, so one cache trains students of any width/depth.

Parameter names follow the reference ``TECViT`` (method.md 5.2) so its checkpoints load strictly.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import torch
import torch.nn as nn
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Block
from timm.optim import param_groups_weight_decay

from .losses import attention_loss, feature_loss
from .pos_embed import sincos_pos_embed

# Every block norm in the reference uses eps 1e-6; only the encoder adaptor keeps nn.LayerNorm's
# default 1e-5 (method.md 8.5). Typed as the class it makes: timm's Block annotates norm_layer as a
# class, though it only calls it (timm's own models pass partials too).
BlockNorm = cast(type[nn.LayerNorm], partial(nn.LayerNorm, eps=1e-6))
ADAPTOR_LN_EPS = 1e-5


@dataclass
class StudentOutput:
    """Everything one student forward produces; the step only needs ``loss``."""

    loss: torch.Tensor  # [] = loss_fea + loss_att (weights 1.0, hard-coded as in the reference)
    loss_fea: torch.Tensor  # []
    loss_att: torch.Tensor  # [] (0 when pred_att is off)
    pred_fea: torch.Tensor  # [B, L, pred_dim]
    pred_att: torch.Tensor | None  # [B, k+1, att_heads, L] or None when pred_att is off
    mask: torch.Tensor  # [B, L], 1 = masked
    ids_restore: torch.Tensor  # [B, L]
    latent: torch.Tensor  # [B, 1+len_keep, C], encoder-adaptor output fed to both decoders


def random_masking(
    x: torch.Tensor, noise: torch.Tensor, mask_ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE masking, shared by the TEC student and the plain MAE objective (method.md 3.3).

    x: [B, L, C]; noise: [B, L]. Keeps the int(L * (1 - mask_ratio)) patches with the smallest
    noise; returns kept tokens [B, len_keep, C], mask [B, L] (1 = removed, in original patch
    order) and ids_restore [B, L].
    """
    b, n, c = x.shape
    len_keep = int(n * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)  # [B, L], ascending: smallest noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [B, L]
    ids_keep = ids_shuffle[:, :len_keep]  # [B, len_keep]
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, c))  # [B, len_keep, C]
    mask = torch.ones(b, n, device=x.device)  # [B, L], float32 even under autocast
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # [B, L]
    return kept, mask, ids_restore


def init_linear_and_norm(module: nn.Module) -> None:
    """MAE's final initialisation pass (method.md 3.9): xavier-uniform Linear weights, zero biases,
    LayerNorm weight 1 and bias 0, over every submodule."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MaskedEncoderMixin:
    """What the TEC student and the plain MAE share: an encoder under MAE's names (patch_embed,
    cls_token, pos_embed, blocks, norm) with fixed sin-cos tables, and its unmasked forward as a
    downstream ViT sees it. The host module defines those attributes and ``decoder_pos_embed``."""

    img_size: int | tuple[int, int]
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    patch_embed: PatchEmbed
    cls_token: nn.Parameter
    pos_embed: nn.Parameter
    decoder_pos_embed: nn.Parameter
    blocks: nn.ModuleList
    norm: nn.LayerNorm

    def _init_tables_and_embeddings(self, grid_h: int, grid_w: int, decoder_embed_dim: int) -> None:
        """Sin-cos pos embeds, xavier patch embedding, N(0, 0.02) cls token (method.md 3.9), in this order."""
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed(self.embed_dim, grid_h, grid_w).unsqueeze(0))
            self.decoder_pos_embed.copy_(sincos_pos_embed(decoder_embed_dim, grid_h, grid_w).unsqueeze(0))
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over the flattened patch
        nn.init.normal_(self.cls_token, std=0.02)

    def encoder_config(self) -> dict[str, Any]:
        """The encoder's architecture, as export writes it to config.json."""
        return {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
        }

    def cls_embed(self) -> torch.Tensor:
        """The cls token as it enters the encoder: cls + pos_embed[0]; [1, 1, C]."""
        return self.cls_token + self.pos_embed[:, :1]

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Unmasked encoder with the final norm, as a downstream ViT sees it; [B, 1+L, C].

        Equals timm's ``VisionTransformer.forward_features`` on the exported weights.
        """
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]  # [B, L, C]
        x = torch.cat([self.cls_embed().expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1+L, C]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class FeatureAdaptor(nn.Module):
    """Encoder adaptor: fuses the stacked outputs of all encoder layers into one C-wide feature.

    The depth*C input is layer-normalised as a whole, cut into ``num_adap`` consecutive chunks
    (each holding depth/num_adap layers), each chunk is projected to C and refined by a residual
    MLP, and the chunk results are summed and normalised (method.md 3.5).
    """

    def __init__(self, embed_dim: int, depth: int, num_adap: int, mlp_hidden: int) -> None:
        super().__init__()
        if num_adap < 1 or depth % num_adap != 0:
            raise ValueError(
                f"encoder adaptor: depth {depth} must be divisible by num_adap {num_adap}; "
                f"pass num_adap explicitly (a divisor of {depth})"
            )
        self.num_adap = num_adap
        self.chunk = depth * embed_dim // num_adap
        self.adap_before = nn.LayerNorm(depth * embed_dim, eps=ADAPTOR_LN_EPS)
        self.fuse_fcs = nn.ModuleList(nn.Linear(self.chunk, embed_dim) for _ in range(num_adap))
        self.adap_mlps = nn.ModuleList(
            Mlp(embed_dim, hidden_features=mlp_hidden, out_features=embed_dim) for _ in range(num_adap)
        )
        self.adap_after = nn.LayerNorm(embed_dim, eps=ADAPTOR_LN_EPS)

    def forward(self, layers: torch.Tensor) -> torch.Tensor:
        z = self.adap_before(layers)  # [B, N, depth*C]
        total = None
        for chunk, fc, mlp in zip(z.split(self.chunk, dim=-1), self.fuse_fcs, self.adap_mlps):
            y = fc(chunk)  # [B, N, C]
            y = y + mlp(y)  # [B, N, C]
            total = y if total is None else total + y
        return self.adap_after(total)  # [B, N, C]


class _DecoderStem(nn.Module):
    """What both decoders own besides their head: input projection, mask token and final norm.

    The transformer blocks are shared between the decoders, so they live on the student
    (``decoder_blocks``) and are passed in, keeping the state-dict names of the reference.
    """

    def __init__(self, embed_dim: int, decoder_embed_dim: int) -> None:
        super().__init__()
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_norm = BlockNorm(decoder_embed_dim)

    def decode(
        self,
        latent: torch.Tensor,
        ids_restore: torch.Tensor,
        blocks: nn.ModuleList,
        pos_embed: torch.Tensor,
    ) -> torch.Tensor:
        """Un-shuffle the visible tokens among mask tokens and run the shared blocks; [B, 1+L, Cd]."""
        x = self.decoder_embed(latent)  # [B, 1+keep, Cd]
        b, n_vis, cd = x.shape
        n_patches = ids_restore.shape[1]
        fill = self.mask_token.expand(b, n_patches + 1 - n_vis, cd)  # [B, L-keep, Cd]
        patches = torch.cat([x[:, 1:], fill], dim=1)  # [B, L, Cd], shuffled order
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, cd))  # [B, L, Cd]
        x = torch.cat([x[:, :1], patches], dim=1) + pos_embed  # [B, 1+L, Cd]
        for blk in blocks:
            x = blk(x)
        return self.decoder_norm(x)  # [B, 1+L, Cd]


class FeatureDecoder(_DecoderStem):
    """Predicts the base model's (normalised) feature target for every patch (method.md 3.6)."""

    def __init__(self, embed_dim: int, decoder_embed_dim: int, pred_dim: int) -> None:
        super().__init__(embed_dim, decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, pred_dim)

    def forward(
        self, latent: torch.Tensor, ids_restore: torch.Tensor, blocks: nn.ModuleList, pos_embed: torch.Tensor
    ) -> torch.Tensor:
        x = self.decode(latent, ids_restore, blocks, pos_embed)  # [B, 1+L, Cd]
        return self.decoder_pred(x)[:, 1:]  # [B, L, pred_dim]


class AttentionDecoder(_DecoderStem):
    """Predicts the base model's last-block attention logits for the cls and top-k query rows (method.md 3.7)."""

    def __init__(self, embed_dim: int, decoder_embed_dim: int, pred_dim: int, att_heads: int) -> None:
        super().__init__(embed_dim, decoder_embed_dim)
        if pred_dim % att_heads != 0:
            raise ValueError(f"attention decoder: pred_dim {pred_dim} is not divisible by att_heads {att_heads}")
        self.pred_dim = pred_dim
        self.att_heads = att_heads
        # The reference scales by the full pred_dim, not the head dim (method.md 8.2); kept for parity.
        self.scale = pred_dim**-0.5
        self.decoder_qk = nn.Linear(decoder_embed_dim, 2 * pred_dim)

    def forward(
        self,
        latent: torch.Tensor,
        ids_restore: torch.Tensor,
        idx: torch.Tensor,
        blocks: nn.ModuleList,
        pos_embed: torch.Tensor,
    ) -> torch.Tensor:
        x = self.decode(latent, ids_restore, blocks, pos_embed)  # [B, 1+L, Cd]
        b, n_tok, _ = x.shape
        h, dh = self.att_heads, self.pred_dim // self.att_heads
        qk = self.decoder_qk(x).reshape(b, n_tok, 2, h, dh).permute(2, 0, 3, 1, 4)  # [2, B, H, 1+L, dh]
        q, k = qk[0], qk[1]  # [B, H, 1+L, dh] each
        # Query rows: cls first, then the patch rows in the teacher's top-k order (+1 skips cls).
        idx = idx.long()  # caches may store indices in a narrow integer type
        rows = torch.cat([idx.new_zeros(b, 1), idx + 1], dim=1)  # [B, k+1]
        q = torch.gather(q, 2, rows[:, None, :, None].expand(-1, h, -1, dh))  # [B, H, k+1, dh]
        logits = (q @ k.transpose(-2, -1)) * self.scale  # [B, H, k+1, 1+L]
        return logits.transpose(1, 2)[..., 1:]  # [B, k+1, H, L], cls key column dropped


class TECStudent(MaskedEncoderMixin, nn.Module):
    """Masked ViT student with input adaptor (cls MLP), encoder adaptor and feature/attention decoders."""

    def __init__(
        self,
        img_size: int | tuple[int, int],
        patch_size: int,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 2,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        pred_dim: int = 768,
        att_heads: int = 12,
        num_adap: int | None = None,
        mlp_token: bool = True,
        pred_att: bool = True,
        mask_ratio: float = 0.75,
        att_tau: float = 1.8,
    ) -> None:
        super().__init__()
        if num_adap is None:
            num_adap = depth // 3 if depth >= 3 else 1
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.pred_dim = pred_dim
        self.att_heads = att_heads
        self.mlp_token = mlp_token
        self.pred_att = pred_att
        self.mask_ratio = mask_ratio
        self.att_tau = att_tau

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        grid_h, grid_w = self.patch_embed.grid_size
        self.num_patches = grid_h * grid_w
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Frozen but stored as parameters, so they appear in the state dict like the reference's.
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim), requires_grad=False)
        self.cls_token_mlp = Mlp(embed_dim, hidden_features=4 * embed_dim, out_features=embed_dim) if mlp_token else None
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=BlockNorm) for _ in range(depth)
        )
        self.norm = BlockNorm(embed_dim)

        self.encoder_adaptor = FeatureAdaptor(embed_dim, depth, num_adap, 4 * decoder_embed_dim)
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, 1 + self.num_patches, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=BlockNorm)
            for _ in range(decoder_depth)
        )
        self.forward_fea_decoder = FeatureDecoder(embed_dim, decoder_embed_dim, pred_dim)
        self.forward_att_decoder = (
            AttentionDecoder(embed_dim, decoder_embed_dim, pred_dim, att_heads) if pred_att else None
        )
        self._init_weights(grid_h, grid_w, decoder_embed_dim)

    def _init_weights(self, grid_h: int, grid_w: int, decoder_embed_dim: int) -> None:
        """Spec 3.9 initialisation (distributions only; seed-level parity is not a goal)."""
        self._init_tables_and_embeddings(grid_h, grid_w, decoder_embed_dim)
        nn.init.normal_(self.forward_fea_decoder.mask_token, std=0.02)
        if self.forward_att_decoder is not None:
            nn.init.normal_(self.forward_att_decoder.mask_token, std=0.02)
        init_linear_and_norm(self)

    def cls_embed(self) -> torch.Tensor:
        """The cls token as it enters the encoder: MLP(cls) + pos_embed[0]; [1, 1, C]."""
        cls = self.cls_token_mlp(self.cls_token) if self.cls_token_mlp is not None else self.cls_token
        return cls + self.pos_embed[:, :1]

    def random_masking(
        self, x: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MAE masking: keep the len_keep patches with the smallest noise (method.md 3.3).

        x: [B, L, C]; noise: [B, L]. Returns kept tokens [B, len_keep, C], mask [B, L]
        (1 = removed, in original patch order) and ids_restore [B, L].
        """
        return random_masking(x, noise, self.mask_ratio)

    def forward_encoder(
        self, imgs: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible tokens; returns (stacked layer outputs [B, 1+keep, depth*C], mask, ids_restore).

        The stack holds the raw outputs of blocks 0..depth-2 and norm(last block), cls included
        (method.md 3.4/8.6).
        """
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]  # [B, L, C]
        x, mask, ids_restore = self.random_masking(x, noise)  # [B, keep, C]
        x = torch.cat([self.cls_embed().expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1+keep, C]
        layers = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            layers.append(self.norm(x) if i == self.depth - 1 else x)
        return torch.cat(layers, dim=-1), mask, ids_restore  # [B, 1+keep, depth*C]

    def _check_targets(
        self, imgs: torch.Tensor, feat_target: torch.Tensor, att_target: torch.Tensor | None, idx: torch.Tensor | None
    ) -> None:
        b = imgs.shape[0]
        want = (b, self.num_patches, self.pred_dim)
        if tuple(feat_target.shape) != want:
            raise ValueError(f"feature target is {list(feat_target.shape)}, student expects {list(want)} (B, L, pred_dim)")
        if not self.pred_att:
            return
        if att_target is None or idx is None:
            raise ValueError("student was built with pred_att=True but no attention target / top-k indices were given")
        k = idx.shape[1] if idx.ndim == 2 else -1
        want_att = (b, k + 1, self.att_heads, self.num_patches)
        if idx.shape[0] != b or tuple(att_target.shape) != want_att:
            raise ValueError(
                f"attention target is {list(att_target.shape)} with idx {list(idx.shape)}, student expects "
                f"{list(want_att)} with idx [{b}, {k}] (B, k+1, att_heads, L)"
            )

    def forward(
        self,
        imgs: torch.Tensor,
        feat_target: torch.Tensor,
        att_target: torch.Tensor | None = None,
        idx: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> StudentOutput:
        """One pretraining forward: mask, encode, adapt, decode, and both losses.

        imgs [B, 3, H, W]; feat_target [B, L, pred_dim]; att_target [B, k+1, att_heads, L];
        idx [B, k] (integer patch indices 0..L-1 in top-k order); noise [B, L] replays a mask
        exactly, and is drawn fresh when None, as the reference does inside its forward.
        """
        self._check_targets(imgs, feat_target, att_target, idx)
        if noise is None:
            noise = torch.rand(imgs.shape[0], self.num_patches, device=imgs.device)  # [B, L]
        layers, mask, ids_restore = self.forward_encoder(imgs, noise)  # [B, 1+keep, depth*C]
        latent = self.encoder_adaptor(layers)  # [B, 1+keep, C]
        pred_fea = self.forward_fea_decoder(
            latent, ids_restore, self.decoder_blocks, self.decoder_pos_embed
        )  # [B, L, pred_dim]
        loss_fea = feature_loss(feat_target, pred_fea, mask)
        if self.forward_att_decoder is not None:
            assert att_target is not None  # _check_targets: pred_att needs the attention target
            pred_att = self.forward_att_decoder(
                latent, ids_restore, idx, self.decoder_blocks, self.decoder_pos_embed
            )  # [B, k+1, H, L]
            loss_att = attention_loss(att_target, pred_att, self.att_tau)
        else:
            pred_att = None
            loss_att = torch.zeros((), device=loss_fea.device, dtype=loss_fea.dtype)
        return StudentOutput(
            loss=loss_fea + loss_att,
            loss_fea=loss_fea,
            loss_att=loss_att,
            pred_fea=pred_fea,
            pred_att=pred_att,
            mask=mask,
            ids_restore=ids_restore,
            latent=latent,
        )


@dataclass(frozen=True)
class ModelSize:
    """Encoder size (as timm's ViT of that name) and the TEC decoder paired with it."""

    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    patch_size: int
    num_adap: int | None = None  # None: depth // 3, the reference's groups of three layers


MODEL_SIZES: dict[str, ModelSize] = {
    # Decoders for B and L are the reference's (method.md 3.1); ti/s/h keep its head dim of 32-64.
    # ViT-H's 32 layers are not a multiple of 3, so its adaptor fuses 8 groups of 4 layers.
    "tiny": ModelSize(192, 12, 3, 128, 2, 4, 16),
    "small": ModelSize(384, 12, 6, 256, 2, 8, 16),
    "base": ModelSize(768, 12, 12, 512, 2, 16, 16),
    "large": ModelSize(1024, 24, 16, 768, 2, 16, 16),
    "huge": ModelSize(1280, 32, 16, 1024, 2, 16, 14, num_adap=8),
}

_NAME_RE = re.compile(r"^(?:mae_)?vit_(?P<size>[a-z]+)_patch(?P<patch>\d+)$")


def parse_model_name(name: str) -> tuple[str, int]:
    """'vit_base_patch16' / 'mae_vit_base_patch16' / 'vit_tiny_patch4' -> (size, patch_size)."""
    m = _NAME_RE.match(name)
    if m is None or m.group("size") not in MODEL_SIZES:
        known = ", ".join(f"vit_{s}_patch{v.patch_size}" for s, v in MODEL_SIZES.items())
        raise ValueError(f"unknown student model {name!r}; known sizes: {known} (any _patchN suffix)")
    return m.group("size"), int(m.group("patch"))


def build_student(
    name: str,
    *,
    pred_dim: int,
    att_heads: int,
    img_size: int | tuple[int, int],
    patch_size: int | None = None,
    **overrides: Any,
) -> TECStudent:
    """Build a student by timm-style name; pred_dim/att_heads are the base model's (from the cache).

    ``patch_size`` overrides the name's suffix; ``overrides`` are any other TECStudent argument
    (e.g. depth=6 for a tiny CPU model). A size's own num_adap applies only at its own depth.
    """
    size, name_patch = parse_model_name(name)
    s = MODEL_SIZES[size]
    kwargs: dict[str, Any] = dict(
        embed_dim=s.embed_dim,
        depth=s.depth,
        num_heads=s.num_heads,
        decoder_embed_dim=s.decoder_embed_dim,
        decoder_depth=s.decoder_depth,
        decoder_num_heads=s.decoder_num_heads,
    )
    if s.num_adap is not None and "depth" not in overrides:
        kwargs["num_adap"] = s.num_adap
    kwargs.update(overrides)
    return TECStudent(
        img_size=img_size,
        patch_size=patch_size if patch_size is not None else name_patch,
        pred_dim=pred_dim,
        att_heads=att_heads,
        **kwargs,
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups (method.md 4): 1-D and ``.bias`` params get no decay, every other trainable tensor
    (cls_token and mask tokens included) gets ``weight_decay``; frozen pos embeds are left out."""
    return param_groups_weight_decay(model, weight_decay)

"""TEC student: pos embeds (method.md 9.1), bookkeeping (9.7), masking (3.3), an independent
re-implementation of the forward (3.4-3.7) and gradient flow (9.6). Tiny CPU models except the
ViT-B/L bookkeeping, which runs on the meta device."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tec_train.losses import attention_loss, feature_loss
from tec_train.pos_embed import sincos_pos_embed
from tec_train.student import MODEL_SIZES, AttentionDecoder, FeatureDecoder, TECStudent, build_student, param_groups

B, IMG, PATCH, L, K = 2, 32, 4, 64, 3
BASE_D, BASE_H = 64, 4  # a base model whose width differs from the student's


def tiny_student(embed_dim: int = 48, num_heads: int = 3, **kw) -> TECStudent:
    kw = {"depth": 6, "decoder_embed_dim": 32, "decoder_num_heads": 4, **kw}
    return build_student(
        "vit_tiny_patch4", pred_dim=BASE_D, att_heads=BASE_H, img_size=IMG,
        embed_dim=embed_dim, num_heads=num_heads, **kw,
    )


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "imgs": torch.randn(B, 3, IMG, IMG, generator=g),
        "feat_target": torch.randn(B, L, BASE_D, generator=g),
        "att_target": torch.randn(B, K + 1, BASE_H, L, generator=g),
        "idx": torch.stack([torch.randperm(L, generator=g)[:K] for _ in range(B)]),
        "noise": torch.rand(B, L, generator=g),
    }


@pytest.fixture(scope="module")
def vit_b() -> TECStudent:
    with torch.device("meta"):
        return build_student("mae_vit_base_patch16", pred_dim=768, att_heads=12, img_size=224)


# ---------------------------------------------------------------- method.md 9.1: sin-cos pos embed


@pytest.mark.parametrize(
    ("dim", "total"), [(768, 69594.49385916878), (512, 46340.33310267379), (1024, 92849.19791831236)]
)
def test_pos_embed_sums(dim: int, total: float) -> None:
    table = sincos_pos_embed(dim, 14, 14)
    assert table.shape == (197, dim) and table.dtype == torch.float32
    assert table.double().sum().item() == pytest.approx(total, rel=1e-6)


def test_pos_embed_values_and_layout() -> None:
    table = sincos_pos_embed(768, 14, 14)
    assert table.double().abs().sum().item() == pytest.approx(84118.4156846929, rel=1e-6)
    token = 1 + 2 * 14 + 3  # row 2, col 3
    assert table[token, 1].item() == pytest.approx(0.27837998, abs=1e-7)  # column half
    assert table[token, 385].item() == pytest.approx(0.94423677, abs=1e-7)  # row half
    assert torch.all(table[0] == 0)
    torch.testing.assert_close(sincos_pos_embed(768, 14, 14, cls_token=False), table[1:])
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed(6, 2, 2)


def test_pos_embed_non_square_grid_is_row_major() -> None:
    table = sincos_pos_embed(8, 2, 3, cls_token=False)  # [6, 8]
    # Token (r=1, c=2): column half encodes 2, row half encodes 1.
    torch.testing.assert_close(table[1 * 3 + 2, :4], sincos_pos_embed(4 * 2, 1, 3, cls_token=False)[2, :4])
    assert table[5, 4].item() == pytest.approx(torch.sin(torch.tensor(1.0)).item())


def test_student_pos_embeds_are_frozen_sincos() -> None:
    s = tiny_student()
    torch.testing.assert_close(s.pos_embed[0], sincos_pos_embed(48, 8, 8))
    torch.testing.assert_close(s.decoder_pos_embed[0], sincos_pos_embed(32, 8, 8))
    assert not s.pos_embed.requires_grad and not s.decoder_pos_embed.requires_grad
    assert {"pos_embed", "decoder_pos_embed"} <= set(s.state_dict())


# ---------------------------------------------------------------- method.md 9.7: bookkeeping


def _count(module: torch.nn.Module | None) -> int:
    assert module is not None
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _eps(model: torch.nn.Module, name: str) -> float:
    norm = model.get_submodule(name)
    assert isinstance(norm, torch.nn.LayerNorm), name
    return norm.eps


def _lin(x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """``layer``'s affine map, by hand."""
    assert isinstance(layer, torch.nn.Linear)
    return F.linear(x, layer.weight, layer.bias)


def _ln(x: torch.Tensor, norm: torch.nn.Module, eps: float) -> torch.Tensor:
    """Layer norm over the last dim with ``norm``'s affine weights and the given eps."""
    assert isinstance(norm, torch.nn.LayerNorm)
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, eps=eps)


def test_vit_b_trainable_parameter_breakdown(vit_b: TECStudent) -> None:
    encoder = (
        _count(vit_b.patch_embed) + vit_b.cls_token.numel() + _count(vit_b.blocks) + _count(vit_b.norm)
    )
    assert _count(vit_b) == 118_342_144
    assert encoder == 85_647_360
    assert _count(vit_b.cls_token_mlp) == 4_722_432
    assert _count(vit_b.encoder_adaptor) == 19_695_104
    assert _count(vit_b.forward_fea_decoder) == 789_248
    assert _count(vit_b.forward_att_decoder) == 1_183_232
    assert _count(vit_b.decoder_blocks) == 6_304_768
    assert vit_b.encoder_adaptor.num_adap == 4
    assert vit_b.pos_embed.shape == (1, 197, 768) and vit_b.decoder_pos_embed.shape == (1, 197, 512)


def test_vit_l_trainable_parameter_count() -> None:
    with torch.device("meta"):
        vit_l = build_student("vit_large_patch16", pred_dim=1024, att_heads=16, img_size=224)
    assert _count(vit_l) == 405_200_384
    assert vit_l.encoder_adaptor.num_adap == 8


def _expected_reference_keys(depth: int, decoder_depth: int, num_adap: int) -> set[str]:
    """The reference TECViT state-dict names (method.md 5.2), written out independently of the module."""
    wb = ("weight", "bias")
    block = [f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for p in wb]
    keys = {"cls_token", "pos_embed", "decoder_pos_embed", "forward_fea_decoder.mask_token",
            "forward_att_decoder.mask_token"}
    keys |= {f"patch_embed.proj.{p}" for p in wb} | {f"norm.{p}" for p in wb}
    keys |= {f"blocks.{i}.{k}" for i in range(depth) for k in block}
    keys |= {f"decoder_blocks.{i}.{k}" for i in range(decoder_depth) for k in block}
    keys |= {f"cls_token_mlp.{fc}.{p}" for fc in ("fc1", "fc2") for p in wb}
    keys |= {f"encoder_adaptor.{m}.{p}" for m in ("adap_before", "adap_after") for p in wb}
    keys |= {f"encoder_adaptor.fuse_fcs.{g}.{p}" for g in range(num_adap) for p in wb}
    keys |= {f"encoder_adaptor.adap_mlps.{g}.{fc}.{p}" for g in range(num_adap) for fc in ("fc1", "fc2") for p in wb}
    keys |= {f"forward_fea_decoder.{m}.{p}" for m in ("decoder_embed", "decoder_norm", "decoder_pred") for p in wb}
    keys |= {f"forward_att_decoder.{m}.{p}" for m in ("decoder_embed", "decoder_norm", "decoder_qk") for p in wb}
    return keys


def test_state_dict_keys_match_reference(vit_b: TECStudent) -> None:
    sd = vit_b.state_dict()
    assert set(sd) == _expected_reference_keys(depth=12, decoder_depth=2, num_adap=4)
    shapes = {
        "encoder_adaptor.adap_before.weight": (9216,),
        "encoder_adaptor.fuse_fcs.0.weight": (768, 2304),
        "encoder_adaptor.adap_mlps.0.fc1.weight": (2048, 768),
        "forward_fea_decoder.decoder_pred.weight": (768, 512),
        "forward_att_decoder.decoder_qk.weight": (1536, 512),
        "forward_att_decoder.mask_token": (1, 1, 512),
        "cls_token_mlp.fc1.weight": (3072, 768),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key


def test_norm_eps_follow_reference(vit_b: TECStudent) -> None:
    assert _eps(vit_b, "encoder_adaptor.adap_before") == 1e-5 and _eps(vit_b, "encoder_adaptor.adap_after") == 1e-5
    assert _eps(vit_b, "norm") == 1e-6 and _eps(vit_b, "blocks.0.norm1") == 1e-6
    assert _eps(vit_b, "decoder_blocks.0.norm2") == 1e-6 and _eps(vit_b, "forward_att_decoder.decoder_norm") == 1e-6


def test_weight_decay_groups(vit_b: TECStudent) -> None:
    groups = param_groups(vit_b, 0.05)
    name_of = {id(p): n for n, p in vit_b.named_parameters()}
    by_wd = {g["weight_decay"]: {name_of[id(p)] for p in g["params"]} for g in groups}
    assert set(by_wd) == {0.0, 0.05}
    trainable = {n: p for n, p in vit_b.named_parameters() if p.requires_grad}
    assert by_wd[0.05] == {n for n, p in trainable.items() if p.ndim >= 2 and not n.endswith(".bias")}
    assert by_wd[0.0] == {n for n, p in trainable.items() if p.ndim <= 1}
    assert {"cls_token", "forward_fea_decoder.mask_token", "forward_att_decoder.mask_token"} <= by_wd[0.05]
    assert not {"pos_embed", "decoder_pos_embed"} & (by_wd[0.0] | by_wd[0.05])


# ---------------------------------------------------------------- construction


def test_build_student_names() -> None:
    with torch.device("meta"):
        s = build_student("vit_small_patch16", pred_dim=768, att_heads=12, img_size=224)
        assert (s.embed_dim, s.depth, s.num_heads, s.patch_size) == (384, 12, 6, 16)
        h = build_student("vit_huge_patch14", pred_dim=1024, att_heads=16, img_size=224)
        assert (h.embed_dim, h.depth, h.num_heads, h.num_patches) == (1280, 32, 16, 256)
        assert h.encoder_adaptor.num_adap == 8
        assert build_student("vit_huge_patch14", pred_dim=64, att_heads=4, img_size=28, depth=6).encoder_adaptor.num_adap == 2
    t = tiny_student()
    assert (t.patch_size, t.num_patches, t.depth, t.encoder_adaptor.num_adap) == (4, 64, 6, 2)
    for size, cfg in MODEL_SIZES.items():
        assert cfg.decoder_embed_dim % cfg.decoder_num_heads == 0 and cfg.embed_dim % cfg.num_heads == 0, size
    with pytest.raises(ValueError, match="known sizes: vit_tiny_patch16"):
        build_student("vit_giant_patch16", pred_dim=64, att_heads=4, img_size=32)
    with pytest.raises(ValueError, match="known sizes"):
        build_student("resnet50", pred_dim=64, att_heads=4, img_size=32)


def test_num_adap_must_divide_depth() -> None:
    with pytest.raises(ValueError, match="depth 7 must be divisible by num_adap 2"):
        tiny_student(depth=7)
    assert tiny_student(depth=7, num_adap=7).encoder_adaptor.chunk == 48
    assert tiny_student(depth=2).encoder_adaptor.num_adap == 1


def test_target_shape_errors(batch) -> None:
    s = tiny_student()
    with pytest.raises(ValueError, match="feature target"):
        s(batch["imgs"], batch["feat_target"][..., :32], batch["att_target"], batch["idx"])
    with pytest.raises(ValueError, match="attention target"):
        s(batch["imgs"], batch["feat_target"], batch["att_target"][:, :, :2], batch["idx"])
    with pytest.raises(ValueError, match="pred_att=True"):
        s(batch["imgs"], batch["feat_target"], None, None)


def test_without_attention_or_cls_mlp(batch) -> None:
    s = tiny_student(pred_att=False, mlp_token=False)
    assert s.forward_att_decoder is None and s.cls_token_mlp is None
    assert not any(k.startswith(("forward_att_decoder", "cls_token_mlp")) for k in s.state_dict())
    out = s(batch["imgs"], batch["feat_target"], noise=batch["noise"])
    assert out.pred_att is None and out.loss_att.item() == 0.0
    assert out.loss.item() == out.loss_fea.item()
    torch.testing.assert_close(s.cls_embed(), s.cls_token + s.pos_embed[:, :1])


# ---------------------------------------------------------------- method.md 3.3: masking


def test_random_masking(batch) -> None:
    s = tiny_student()
    seen = []
    s.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
    out = s(**batch)
    len_keep = int(L * 0.25)
    assert seen == [(B, 1 + len_keep, 48)]
    assert out.latent.shape == (B, 1 + len_keep, 48)
    assert torch.all(out.mask.sum(1) == L - len_keep)
    ids_shuffle = torch.argsort(batch["noise"], dim=1)
    assert torch.equal(out.ids_restore, torch.argsort(ids_shuffle, dim=1))
    assert torch.equal(torch.gather(ids_shuffle, 1, out.ids_restore), torch.arange(L).expand(B, L))
    for b in range(B):  # the smallest-noise patches are the kept ones
        assert torch.all(out.mask[b, ids_shuffle[b, :len_keep]] == 0)
        assert torch.all(out.mask[b, ids_shuffle[b, len_keep:]] == 1)

    again = s(**batch)
    assert torch.equal(again.mask, out.mask) and again.loss.item() == out.loss.item()
    other = s(**{**batch, "noise": torch.rand(B, L)})
    assert not torch.equal(other.mask, out.mask)


def test_default_noise_is_torch_rand(batch) -> None:
    s = tiny_student()
    args = {k: v for k, v in batch.items() if k != "noise"}
    torch.manual_seed(7)
    drawn = s(**args)
    torch.manual_seed(7)
    replay = s(**args, noise=torch.rand(B, L))
    assert torch.equal(drawn.mask, replay.mask) and drawn.loss.item() == replay.loss.item()


# ---------------------------------------------------------------- method.md 3.4-3.7: independent re-implementation


def _ref_encoder(s: TECStudent, imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    w = s.patch_embed.proj
    tokens = F.conv2d(imgs, w.weight, w.bias, stride=PATCH).flatten(2).transpose(1, 2)  # [B, L, C]
    tokens = tokens + s.pos_embed[0, 1:]
    keep = torch.argsort(noise, dim=1)[:, : int(L * 0.25)]  # [B, keep]
    visible = torch.stack([tokens[b, keep[b]] for b in range(B)])  # [B, keep, C]
    mlp = s.cls_token_mlp
    assert mlp is not None
    cls = _lin(F.gelu(_lin(s.cls_token, mlp.fc1)), mlp.fc2)
    x = torch.cat([(cls + s.pos_embed[:, :1]).expand(B, -1, -1), visible], dim=1)  # [B, 1+keep, C]
    outs = []
    for blk in s.blocks:
        x = blk(x)
        outs.append(x)
    outs[-1] = _ln(x, s.norm, eps=1e-6)
    return torch.cat(outs, dim=-1)  # [B, 1+keep, depth*C]


def _ref_adaptor(s: TECStudent, layers: torch.Tensor) -> torch.Tensor:
    a = s.encoder_adaptor
    z = _ln(layers, a.adap_before, eps=1e-5)
    width = layers.shape[-1] // a.num_adap
    total = None
    for g in range(a.num_adap):
        y = _lin(z[..., g * width : (g + 1) * width], a.fuse_fcs[g])
        m = a.adap_mlps[g]
        y = y + _lin(F.gelu(_lin(y, m.get_submodule("fc1"))), m.get_submodule("fc2"))
        total = y if total is None else total + y
    assert total is not None
    return _ln(total, a.adap_after, eps=1e-5)


def _ref_decode(s: TECStudent, dec: FeatureDecoder | AttentionDecoder | None, latent: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    assert dec is not None
    x = _lin(latent, dec.decoder_embed)  # [B, 1+keep, Cd]
    keep = torch.argsort(noise, dim=1)[:, : latent.shape[1] - 1]
    full = dec.mask_token.expand(B, 1 + L, -1).clone()  # [B, 1+L, Cd]
    full[:, 0] = x[:, 0]
    for b in range(B):
        for j, patch in enumerate(keep[b].tolist()):
            full[b, 1 + patch] = x[b, 1 + j]
    x = full + s.decoder_pos_embed
    for blk in s.decoder_blocks:
        x = blk(x)
    return _ln(x, dec.decoder_norm, eps=1e-6)


def _ref_attention_logits(s: TECStudent, latent: torch.Tensor, noise: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    dec = s.forward_att_decoder
    x = _ref_decode(s, dec, latent, noise)
    assert dec is not None
    qk = _lin(x, dec.decoder_qk)  # [B, 1+L, 2D]
    q, k = qk[..., :BASE_D], qk[..., BASE_D:]
    dh = BASE_D // BASE_H
    out = torch.empty(B, K + 1, BASE_H, L)
    for b in range(B):
        query_tokens = [0] + [1 + int(i) for i in idx[b]]  # cls, then top-k order
        for j, t in enumerate(query_tokens):
            for h in range(BASE_H):
                qv = q[b, t, h * dh : (h + 1) * dh]
                out[b, j, h] = (k[b, 1:, h * dh : (h + 1) * dh] @ qv) * BASE_D**-0.5
    return out


def test_forward_matches_independent_reimplementation(batch) -> None:
    torch.manual_seed(1)
    s = tiny_student()
    with torch.no_grad():
        out = s(**batch)
        layers, mask, ids_restore = s.forward_encoder(batch["imgs"], batch["noise"])
        ref_layers = _ref_encoder(s, batch["imgs"], batch["noise"])
        torch.testing.assert_close(layers, ref_layers, atol=1e-5, rtol=1e-5)
        ref_latent = _ref_adaptor(s, ref_layers)
        torch.testing.assert_close(out.latent, ref_latent, atol=1e-5, rtol=1e-5)

        dec = s.forward_fea_decoder
        ref_fea = _lin(_ref_decode(s, dec, ref_latent, batch["noise"]), dec.decoder_pred)[:, 1:]
        torch.testing.assert_close(out.pred_fea, ref_fea, atol=1e-5, rtol=1e-5)
        ref_att = _ref_attention_logits(s, ref_latent, batch["noise"], batch["idx"])
        assert out.pred_att.shape == (B, K + 1, BASE_H, L)
        torch.testing.assert_close(out.pred_att, ref_att, atol=1e-5, rtol=1e-5)

        torch.testing.assert_close(out.loss_fea, feature_loss(batch["feat_target"], ref_fea, mask))
        torch.testing.assert_close(out.loss_att, attention_loss(batch["att_target"], ref_att, 1.8))
        torch.testing.assert_close(out.loss, out.loss_fea + out.loss_att)


def test_attention_query_rows_follow_idx_order(batch) -> None:
    s = tiny_student()
    with torch.no_grad():
        out = s(**batch)
        flipped = s(**{**batch, "idx": batch["idx"].flip(1)})
    torch.testing.assert_close(flipped.pred_att[:, 0], out.pred_att[:, 0])  # cls row first either way
    torch.testing.assert_close(flipped.pred_att[:, 1:], out.pred_att[:, 1:].flip(1))


# ---------------------------------------------------------------- method.md 9.6: gradients


def test_gradients_reach_every_part_and_both_branches_share_blocks(batch) -> None:
    s = tiny_student()
    names = [
        "cls_token_mlp.fc1.weight",
        "encoder_adaptor.fuse_fcs.0.weight",
        "decoder_blocks.0.attn.qkv.weight",
        "forward_att_decoder.decoder_qk.weight",
    ]
    params = dict(s.named_parameters())
    watched = [params[n] for n in names]
    out = s(**batch)
    g_fea = torch.autograd.grad(out.loss_fea, watched, retain_graph=True, allow_unused=True)
    g_att = torch.autograd.grad(out.loss_att, watched, retain_graph=True)
    g_all = torch.autograd.grad(out.loss_fea + out.loss_att, watched)
    for name, g in zip(names, g_all):
        assert g.abs().sum() > 0, name
    shared = names.index("decoder_blocks.0.attn.qkv.weight")
    assert g_fea[shared].abs().sum() > 0 and g_att[shared].abs().sum() > 0
    torch.testing.assert_close(g_fea[shared] + g_att[shared], g_all[shared])
    assert g_fea[names.index("forward_att_decoder.decoder_qk.weight")] is None


# ---------------------------------------------------------------- any student size, one cache


@pytest.mark.parametrize(("embed_dim", "num_heads"), [(48, 3), (96, 6)])
def test_students_of_any_width_train_on_the_same_targets(batch, embed_dim: int, num_heads: int) -> None:
    torch.manual_seed(0)
    s = tiny_student(embed_dim=embed_dim, num_heads=num_heads)
    opt = torch.optim.AdamW(param_groups(s, 0.05), lr=1e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(6):
        out = s(**batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert out.pred_fea.shape == (B, L, BASE_D) and out.pred_att.shape == (B, K + 1, BASE_H, L)
    assert losses[-1] < losses[0]


def test_reference_state_dict_loads_strictly() -> None:
    src = tiny_student()
    dst = tiny_student()
    assert set(src.state_dict()) == _expected_reference_keys(depth=6, decoder_depth=2, num_adap=2)
    dst.load_state_dict(src.state_dict(), strict=True)
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key

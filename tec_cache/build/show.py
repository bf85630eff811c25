"""`tec-cache show`: a picture of what a cache holds, to check targets by eye.

Data flow: manifest --> the chosen view-epoch's shards --> records (view JPEG + encoded fields)
--codec.decode--> feat [L,D], att [k+1,H,L], idx [k] --> per-patch maps on the patch grid --> one
PNG, one row per view: the view with its top-k patches outlined, the cls row's attention target
softmax(att[0]/tau), the mean of the top-k rows' targets, and (optionally) the feature-target norm.

Everything is drawn with matplotlib's Agg canvas on a private Figure (no pyplot, no display, no
global backend switch), so it runs on headless machines and inside other programs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from tec_cache.core.codecs import get_codec, stack_fields
from tec_cache.core.figures import DPI, save_png
from tec_cache.core.views import decode_view
from tec_cache.format.fs import prepare_output_file
from tec_cache.format.manifest import Manifest, ManifestError, load_manifest
from tec_cache.format.remote import is_remote
from tec_cache.format.schema import ViewRecord

__all__ = ["attention_map", "feature_norm_map", "parse_head", "render_views", "select_records"]

# Inches per grid cell and for the title band; with DPI these fix the PNG's pixel size, so a
# caller (or a test) knows it in advance: width = columns * CELL_IN * DPI.
CELL_IN = 2.6
TITLE_IN = 0.6
HEAT_ALPHA = 0.55  # enough to read the map, little enough to still see the view under it
HEAT_CMAP = "inferno"
TOPK_COLOR = "#00e5ff"  # cyan: stands out on natural images and on the inferno map


def parse_head(head: str | int | None, heads: int) -> int | None:
    """``"mean"``/None -> None (average over heads); ``"N"``/N -> head N, checked against ``heads``."""
    if head is None or (isinstance(head, str) and head.strip().lower() == "mean"):
        return None
    try:
        h = int(head)
    except ValueError:
        raise ValueError(f"--head: expected 'mean' or a head number, got {head!r}") from None
    if not 0 <= h < heads:
        raise ValueError(f"--head: head {h} out of range; the cache's targets have {heads} heads (0..{heads - 1})")
    return h


def attention_map(att: np.ndarray | torch.Tensor, tau: float, grid: tuple[int, int], head: int | None = None) -> np.ndarray:
    """Mean target distribution of some attention rows, as a [gh, gw] map over the patch grid.

    ``att`` holds logit rows [R, H, L] (e.g. ``att[0:1]`` for the cls row, ``att[1:]`` for the top-k
    rows). Each row's target is softmax(att / tau) over the L patch keys, exactly what the attention
    loss compares with; the map averages those distributions over the R rows and over the heads (or
    takes one head), so it is itself a distribution: non-negative, summing to 1.
    """
    logits = np.asarray(att.detach().cpu().numpy() if isinstance(att, torch.Tensor) else att, dtype=np.float64)  # [R,H,L]
    if logits.ndim != 3:
        raise ValueError(f"attention rows must be [R, H, L], got shape {list(logits.shape)}")
    gh, gw = grid
    if logits.shape[-1] != gh * gw:
        raise ValueError(f"attention rows have {logits.shape[-1]} keys, the patch grid {gh}x{gw} has {gh * gw}")
    if head is not None:
        logits = logits[:, head : head + 1]  # [R,1,L]
    z = logits / tau
    z -= z.max(axis=-1, keepdims=True)  # stable softmax
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)  # [R,H',L]
    return p.mean(axis=(0, 1)).reshape(gh, gw)  # [gh,gw]


def feature_norm_map(feat: np.ndarray | torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """L2 norm of each patch's feature target [L, D] -> [gh, gw] (raw targets, before the loss's normalisation)."""
    f = np.asarray(feat.detach().cpu().numpy() if isinstance(feat, torch.Tensor) else feat, dtype=np.float64)  # [L,D]
    gh, gw = grid
    if f.ndim != 2 or f.shape[0] != gh * gw:
        raise ValueError(f"feature target must be [{gh * gw}, D] for a {gh}x{gw} grid, got {list(f.shape)}")
    return np.linalg.norm(f, axis=1).reshape(gh, gw)  # [gh,gw]


def _open_cache(cache: Path | str) -> Manifest:
    if is_remote(cache):
        try:
            return load_manifest(cache)
        except ManifestError as e:
            raise ValueError(f"CACHE: {e}") from None
    cache = Path(cache)
    if not cache.exists():
        raise ValueError(f"CACHE: {cache} does not exist")
    if not cache.is_dir():
        raise ValueError(f"CACHE: {cache} is not a folder")
    try:
        return load_manifest(cache)
    except ManifestError as e:
        raise ValueError(f"CACHE: {e}") from None


def select_records(man: Manifest, view_epoch: int, n: int, seed: int | None = None) -> list[ViewRecord]:
    """Up to ``n`` records of ``view_epoch``: the first n in manifest order, or with ``seed`` a
    seeded sample without repeats (shown in cache order). Each touched shard is read once."""
    if n < 1:
        raise ValueError(f"--n: must be at least 1, got {n}")
    if seed is not None and seed < 0:
        raise ValueError(f"--seed: must be an integer >= 0, got {seed}")
    if not 0 <= view_epoch < man.num_view_epochs:
        raise ValueError(f"--view-epoch: {view_epoch} out of range; the cache holds view-epochs 0..{man.num_view_epochs - 1}")
    entries = man.shards(view_epoch)
    offsets = np.concatenate([[0], np.cumsum([e.num_samples for e in entries], dtype=np.int64)])
    total = int(offsets[-1])
    if total == 0:
        raise ValueError(f"--view-epoch: view-epoch {view_epoch} of {man.where} holds no views")
    count = min(n, total)
    if seed is None:
        picks = np.arange(count)
    else:
        picks = np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))
    shard_of = np.searchsorted(offsets, picks, side="right") - 1
    records: list[ViewRecord] = []
    for s in dict.fromkeys(shard_of.tolist()):  # shards in order of first use
        reader = man.open_shard(entries[s])
        records.extend(reader.read_many((picks[shard_of == s] - offsets[s]).tolist()))
    return records


@dataclass(frozen=True)
class _Panel:
    title: str
    values: np.ndarray  # [gh, gw]
    # Distributions start their colour scale at 0, so colour reads as a share of the mass; norms
    # start at their minimum, since they differ little between patches compared to their size.
    from_zero: bool = True


def _draw_view(ax: Axes, image: np.ndarray, title: str) -> None:
    ax.imshow(image, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _overlay(ax: Axes, image: np.ndarray, panel: _Panel, extent: tuple[float, float, float, float]) -> None:
    _draw_view(ax, image, panel.title)
    lo, hi = (0.0 if panel.from_zero else float(panel.values.min())), float(panel.values.max())
    ax.imshow(panel.values, cmap=HEAT_CMAP, alpha=HEAT_ALPHA, interpolation="nearest", extent=extent, vmin=lo,
              vmax=hi if hi > lo else lo + 1.0)


def render_views(
    cache: Path | str,
    out: Path,
    n: int = 8,
    *,
    view_epoch: int = 0,
    head: str | int | None = None,
    seed: int | None = None,
    feat_norm: bool = True,
) -> Path:
    """Draw ``n`` cached views and their targets into the PNG ``out``; returns ``out``.

    One row per view (the first n of ``view_epoch``, or a ``seed``-ed sample of it). Columns: the
    view with its top-k patches outlined (rank numbers at their corners); the cls row's target
    softmax(att[0]/tau); the mean of the k top-k rows' targets; with ``feat_norm``, the feature
    target's norm per patch. ``head`` is "mean" (average over heads) or a head number. Bad input
    raises ValueError whose message starts with the option it concerns (CACHE, --n, --out, ...);
    an unreadable shard raises ``tec_cache.format.ShardError``.
    """
    if n < 1:
        raise ValueError(f"--n: must be at least 1, got {n}")
    man = _open_cache(cache)
    tg = man.targets
    gh, gw = tg.grid
    tau, k, heads = float(tg.tau), tg.topk, tg.heads
    head_idx = parse_head(head, heads)
    out = prepare_output_file(out)
    records = select_records(man, view_epoch, n, seed)

    # Decode all chosen views at once, exactly as the training loader does (codec.decode on stacked fields).
    feat, att, idx = get_codec(man.codec.name).decode(stack_fields([r.fields for r in records]))  # [N,L,D], [N,k+1,H,L], [N,k]
    images = [decode_view(r.image).permute(1, 2, 0).numpy() for r in records]  # each [S,S,3] uint8
    size = images[0].shape[0]
    ph, pw = size / gh, size / gw  # patch size in pixels
    # imshow pixel centres sit on integers, so the view spans [-0.5, size - 0.5]; the maps share that extent.
    extent = (-0.5, size - 0.5, size - 0.5, -0.5)
    head_name = "mean over heads" if head_idx is None else f"head {head_idx}"

    cols = 4 if feat_norm else 3
    rows = len(records)
    fig = Figure(figsize=(cols * CELL_IN, rows * CELL_IN + TITLE_IN), dpi=DPI, layout="constrained")
    fig.suptitle(
        f"{man.name}: view-epoch {view_epoch}, tau {tau:g}, k {k}, {head_name}, codec {man.codec.name}, {man.format.name}",
        fontsize=10,
    )
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, rec in enumerate(records):
        top = idx[r].tolist()  # [k] patch indices, best first
        ax = axes[r, 0]
        _draw_view(ax, images[r], f"{rec.key} (ve {rec.view_epoch})\n{rec.image_key}")
        for rank, j in enumerate(top):
            y, x = divmod(int(j), gw)
            ax.add_patch(Rectangle((x * pw - 0.5, y * ph - 0.5), pw, ph, fill=False, edgecolor=TOPK_COLOR, linewidth=1.5))
            ax.text(x * pw + 0.5, y * ph + 0.5, str(rank + 1), color=TOPK_COLOR, fontsize=6, ha="left", va="top")
        cls_map = attention_map(att[r, :1], tau, (gh, gw), head_idx)  # [gh,gw]
        topk_map = attention_map(att[r, 1:], tau, (gh, gw), head_idx)  # [gh,gw]
        panels = [
            _Panel(f"cls row softmax(att/tau)\nmax {cls_map.max():.3f} (uniform {1 / (gh * gw):.3f})", cls_map),
            _Panel(f"mean of top-{k} rows\nmax {topk_map.max():.3f}", topk_map),
        ]
        if feat_norm:
            norm = feature_norm_map(feat[r], (gh, gw))  # [gh,gw]
            panels.append(_Panel(f"feature-target norm\n{norm.min():.3g}..{norm.max():.3g}", norm, from_zero=False))
        for c, panel in enumerate(panels, start=1):
            _overlay(axes[r, c], images[r], panel, extent)
    return save_png(fig, out, "--out")

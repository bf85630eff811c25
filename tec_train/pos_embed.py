"""Fixed 2-D sin-cos position embeddings (method.md 3.2).

Data flow: cache -> loader -> **student** (pos_embed / decoder_pos_embed are built here once,
frozen) -> losses -> step. Identical to MAE's table so that reference TEC checkpoints, whose frozen
embeddings are stored in the state dict, match what this project computes.
"""
from __future__ import annotations

import torch


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[sin(p*w_i) for i < dim/2, then cos(p*w_i)], w_i = 10000^(-i/(dim/2)); float64 [N, dim]."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)  # [dim/2]
    omega = 1.0 / 10000.0**omega  # [dim/2]
    angles = positions.reshape(-1, 1).to(torch.float64) * omega.reshape(1, -1)  # [N, dim/2]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # [N, dim]


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """2-D sin-cos table [1 + grid_h*grid_w, dim] (no cls row when cls_token=False), float32.

    Tokens are row-major (r * grid_w + c). Channels [0, dim/2) encode the column index and
    [dim/2, dim) the row index; that swap is MAE's naming quirk, kept for checkpoint parity. The
    cls row is all zeros. Computed in float64 and cast once, as the reference's numpy code does.
    Always built on the CPU so it also works inside a ``torch.device('meta')`` context.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    with torch.device("cpu"):
        rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)  # [gh*gw]
        cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)  # [gh*gw]
        table = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)  # [gh*gw, dim]
        if cls_token:
            table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], dim=0)  # [1+gh*gw, dim]
        return table.to(torch.float32)

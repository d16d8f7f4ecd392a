"""Resampling of absolute position embeddings to a new patch grid."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int] | int,
    old_grid: tuple[int, int] | int | None = None,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resample ``pos_embed`` (1, prefix + gh*gw, d) to ``new_grid`` (rows, cols).

    Bicubic with antialiasing, computed in float32; prefix (class) tokens are kept as they are.
    ``old_grid`` defaults to a square grid. The same grid returns ``pos_embed`` itself.
    """
    new_grid = _pair(new_grid)
    num_grid_tokens = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(num_grid_tokens)
        if side * side != num_grid_tokens:
            raise ValueError(f"pos_embed has {num_grid_tokens} grid tokens, not a square grid: pass old_grid")
        old_grid = (side, side)
    old_grid = _pair(old_grid)
    if old_grid[0] * old_grid[1] != num_grid_tokens:
        raise ValueError(f"old_grid {old_grid} does not match the {num_grid_tokens} grid tokens of pos_embed")
    if new_grid == old_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    grid = rearrange(grid.float(), "b (gh gw) d -> b d gh gw", gh=old_grid[0], gw=old_grid[1])
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    grid = rearrange(grid, "b d gh gw -> b (gh gw) d").to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def _pair(value: tuple[int, int] | int) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))

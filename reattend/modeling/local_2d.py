"""2-D local attention masks for image tokens (CLEAR): circular windows on a token grid, tile-ordered layouts.

An image query at grid cell (y, x) sees image keys with (Δy)² + (Δx)² < r², and every text token; text queries
see everything. Sequences hold ``text_tokens`` text tokens first, then the h x w image tokens in some order.

Raster order (row by row) puts a circle's rows W tokens apart, so the 128-token blocks a block-sparse kernel
(FlexAttention) works in are mostly empty yet still computed. Tile order lays out t x t tiles one after another, so
a block covers a compact patch and far fewer blocks are touched; ``block_kept_fraction`` measures that.
"""

from __future__ import annotations

import torch


def grid_positions(height: int, width: int, *, tile: int | None = None) -> torch.Tensor:
    """(h*w, 2) integer (y, x) of each image token in sequence order: raster, or tile x tile tiles in raster order
    of tiles, each tile raster-ordered inside."""
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    pos = torch.stack([y.reshape(-1), x.reshape(-1)], dim=-1)
    if tile is None:
        return pos
    if height % tile or width % tile:
        raise ValueError(f"tile={tile} must divide the grid {height}x{width}; choose a divisor of both sides")
    key = (pos[:, 0] // tile) * (width // tile) * tile * tile + (pos[:, 1] // tile) * tile * tile \
        + (pos[:, 0] % tile) * tile + pos[:, 1] % tile
    return pos[torch.argsort(key)]


def circle_mask_function(positions: torch.Tensor, radius: float, text_tokens: int = 0):
    """Mask function (transformers / FlexAttention ``mask_mod`` signature) over sequence indices.

    ``positions``: (n_image, 2) grid cells of the image tokens, which follow ``text_tokens`` text tokens.
    """
    n_image = positions.shape[0]
    ys, xs = positions[:, 0], positions[:, 1]
    r2 = radius * radius

    def mask(batch_idx, head_idx, q_idx, kv_idx):
        qi = (q_idx - text_tokens).clamp(0, n_image - 1)
        ki = (kv_idx - text_tokens).clamp(0, n_image - 1)
        near = (ys[qi] - ys[ki]) ** 2 + (xs[qi] - xs[ki]) ** 2 < r2
        return (q_idx < text_tokens) | (kv_idx < text_tokens) | near

    return mask


def dense_mask(positions: torch.Tensor, radius: float, text_tokens: int = 0) -> torch.Tensor:
    """The (N, N) boolean mask, N = text_tokens + image tokens (for tests and small grids)."""
    n = text_tokens + positions.shape[0]
    idx = torch.arange(n)
    zero = idx.new_zeros(())
    return circle_mask_function(positions, radius, text_tokens)(zero, zero, idx.view(-1, 1), idx.view(1, -1))


def kept_fraction(positions: torch.Tensor, radius: float, text_tokens: int = 0) -> float:
    """Fraction of query-key pairs attended: the share of attention FLOPs an exact sparse kernel still spends."""
    return dense_mask(positions, radius, text_tokens).float().mean().item()


def block_kept_fraction(positions: torch.Tensor, radius: float, text_tokens: int = 0, block: int = 128) -> float:
    """Fraction of (query block, key block) pairs with any attended pair: what a block-sparse kernel computes."""
    mask = dense_mask(positions, radius, text_tokens)
    n = mask.shape[0]
    pad = -n % block
    mask = torch.nn.functional.pad(mask, (0, pad, 0, pad))
    blocks = mask.view((n + pad) // block, block, (n + pad) // block, block).any(dim=3).any(dim=1)
    return blocks.float().mean().item()

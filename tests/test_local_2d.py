"""2-D local masks: circular windows on an image-token grid, text tokens global, tile-ordered layouts."""

import pytest
import torch

from reattend.modeling.local_2d import block_kept_fraction, dense_mask, grid_positions, kept_fraction


def brute_force(height, width, radius, text_tokens, positions):
    n = text_tokens + height * width
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if i < text_tokens or j < text_tokens:
                mask[i, j] = True
            else:
                (yi, xi), (yj, xj) = positions[i - text_tokens].tolist(), positions[j - text_tokens].tolist()
                mask[i, j] = (yi - yj) ** 2 + (xi - xj) ** 2 < radius ** 2
    return mask


@pytest.mark.parametrize("tile", [None, 2, 4])
def test_circle_mask_matches_brute_force(tile):
    positions = grid_positions(4, 8, tile=tile)
    assert torch.equal(dense_mask(positions, 2.5, text_tokens=3), brute_force(4, 8, 2.5, 3, positions))


def test_tile_order_is_a_permutation_with_contiguous_tiles():
    raster, tiled = grid_positions(8, 12), grid_positions(8, 12, tile=4)
    assert sorted(map(tuple, tiled.tolist())) == sorted(map(tuple, raster.tolist()))
    for start in range(0, 96, 16):
        chunk = tiled[start:start + 16]
        assert (chunk // 4).unique(dim=0).shape[0] == 1, "each run of t*t tokens must be one tile"
    # the same attention pattern, only relabelled: the kept fraction does not depend on the layout
    assert kept_fraction(raster, 3) == pytest.approx(kept_fraction(tiled, 3))
    with pytest.raises(ValueError, match="tile=5 must divide the grid 8x12"):
        grid_positions(8, 12, tile=5)


def test_tile_order_touches_fewer_blocks_than_raster():
    # CLEAR's setting: a 64 x 64 latent grid, FlexAttention's 128-token blocks (two raster rows, or two 8 x 8 tiles)
    raster, tiled = grid_positions(64, 64), grid_positions(64, 64, tile=8)
    assert block_kept_fraction(tiled, 16) < 0.8 * block_kept_fraction(raster, 16)
    small = grid_positions(16, 16)
    assert block_kept_fraction(small, 100, block=64) == 1.0
    # an interior query keeps the lattice points of the open disc: for r = 4, 7 + 2 * (7 + 7 + 5) = 45 cells
    assert dense_mask(grid_positions(32, 32), 4)[16 * 32 + 16].sum().item() == 45

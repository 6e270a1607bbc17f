"""2-D local attention: circular windows on an image-token grid, text tokens global, pooled keys, tile layouts."""

import shutil
import warnings

import pytest
import torch

from reattend.modeling import local_2d
from reattend.modeling.local_2d import (
    block_kept_fraction,
    dense_mask,
    grid_positions,
    kept_fraction,
    local_2d_attention,
    pool_keys,
    tile_offsets,
    tile_path_fraction,
)


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


def qkv(batch, heads, length, dim, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, dim, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def pool_weights(heads, d, seed=1, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple((0.5 + torch.rand(heads, d, d, generator=g)).requires_grad_(requires_grad) for _ in range(2))


def reference_attention(q, k, v, height, width, radius, text_tokens, pooled=None):
    """Brute force: the loop mask above, pooled keys appended for image queries, softmax written out."""
    mask = brute_force(height, width, radius, text_tokens, grid_positions(height, width))
    if pooled is not None:
        pk, pv = (pool_keys(x[:, :, text_tokens:], w, height, width) for x, w in zip((k, v), pooled))
        k, v = torch.cat([k, pk], dim=-2), torch.cat([v, pv], dim=-2)
        extra = torch.zeros(mask.shape[0], pk.shape[-2], dtype=torch.bool)
        extra[text_tokens:] = True
        mask = torch.cat([mask, extra], dim=1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


# (height, width, text tokens, radius, tile, pool): square and non-square grids, tiles that divide the grid and
# tiles that do not (the tile path pads the grid), radii below one tile and across several
CASES = [
    (8, 8, 0, 2.5, 4, None),
    (8, 6, 3, 2.5, 2, None),
    (6, 10, 5, 1.5, 3, 2),
    (8, 6, 4, 3.2, None, 2),
    (10, 6, 2, 4.0, 4, None),
    (12, 8, 7, 6.5, 2, 4),
    (8, 8, 2, 20.0, 2, 4),
]


@pytest.mark.parametrize("height,width,text,radius,tile,pool", CASES)
def test_dense_path_matches_brute_force(height, width, text, radius, tile, pool):
    q, k, v = qkv(2, 3, text + height * width, 8)
    pooled = pool_weights(3, pool) if pool else None
    out = local_2d_attention(q, k, v, height=height, width=width, radius=radius, text_tokens=text,
                             pool_weights=pooled, backend="dense")
    torch.testing.assert_close(out, reference_attention(q, k, v, height, width, radius, text, pooled))


@pytest.mark.parametrize("height,width,text,radius,tile,pool", CASES)
def test_tile_path_matches_dense_outputs_and_gradients(height, width, text, radius, tile, pool):
    q, k, v = qkv(2, 3, text + height * width, 8, requires_grad=True)
    pooled = pool_weights(3, pool, requires_grad=True) if pool else ()
    inputs = [q, k, v, *pooled]
    results = []
    for path in ("tiles", "dense"):
        out = local_2d_attention(q, k, v, height=height, width=width, radius=radius, text_tokens=text,
                                 pool_weights=pooled or None, tile=tile, backend=path)
        results.append((out, torch.autograd.grad((out * torch.linspace(-1, 1, 8)).sum(), inputs)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("height,width,text,radius,tile,pool", [c for c in CASES if c[4] is None or
                                                                 (c[0] % c[4] == 0 and c[1] % c[4] == 0)])
def test_flex_path_matches_dense_forward_on_cpu(height, width, text, radius, tile, pool):
    # Eager FlexAttention on CPU (no backward there): checks the mask_mod and the tile-ordered layout.
    q, k, v = qkv(2, 2, text + height * width, 16)
    pooled = pool_weights(2, pool) if pool else None
    kwargs = dict(height=height, width=width, radius=radius, text_tokens=text, pool_weights=pooled)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = local_2d_attention(q, k, v, tile=tile, backend="flex", **kwargs)
    torch.testing.assert_close(flex, local_2d_attention(q, k, v, backend="dense", **kwargs), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tile", [None, 8])
def test_compiled_flex_on_cuda_matches_dense(tile):
    height, width, text = 32, 16, 77
    q, k, v = (x.cuda().requires_grad_() for x in qkv(2, 4, text + height * width, 64))
    pooled = tuple(w.cuda().requires_grad_() for w in pool_weights(4, 4))
    inputs = [q, k, v, *pooled]
    results = []
    for path in ("flex", "dense"):
        out = local_2d_attention(q, k, v, height=height, width=width, radius=5.5, text_tokens=text,
                                 pool_weights=pooled, tile=tile, backend=path)
        results.append((out, torch.autograd.grad(out.square().sum(), inputs)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=2e-3, atol=2e-3)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="compiling on CPU needs a C++ compiler")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit deprecations raised inside inductor
def test_compiled_flex_skips_blocks_and_matches_dense_on_cpu():
    # The CUDA path (compiled FlexAttention, blocks skipped by the block mask) compiled for CPU; forward only there.
    height, width, text, radius = 32, 32, 7, 5.0
    q, k, v = qkv(1, 2, text + height * width, 16)
    pooled = pool_weights(2, 4)
    pooled_kv = tuple(pool_keys(x[:, :, text:], w, height, width) for x, w in zip((k, v), pooled))
    block_mask, _ = local_2d._flex_block_mask(height, width, radius, text, 64, 8, "cpu")
    assert block_mask.sparsity() > 15
    with torch.no_grad():
        out = local_2d._flex_attention(q, k, v, height, width, radius, text, pooled_kv, None, tile=8, compiled=True)
    expected = local_2d_attention(q, k, v, height=height, width=width, radius=radius, text_tokens=text,
                                  pool_weights=pooled, backend="dense")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_radius_covering_the_grid_is_full_attention_on_every_path():
    q, k, v = qkv(1, 2, 3 + 48, 8)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for path in ("tiles", "dense"):
        out = local_2d_attention(q, k, v, height=8, width=6, radius=9, text_tokens=3, backend=path)
        torch.testing.assert_close(out, full)
    # just inside the diagonal the far corners drop out, and the tile path must still agree with the reference
    kwargs = dict(height=8, width=6, radius=(7 ** 2 + 5 ** 2) ** 0.5, text_tokens=3)
    near = local_2d_attention(q, k, v, backend="dense", **kwargs)
    assert not torch.allclose(near, full)
    torch.testing.assert_close(local_2d_attention(q, k, v, backend="tiles", tile=4, **kwargs), near)


def test_tile_offsets_match_brute_force():
    for radius, tile in [(1, 4), (2.5, 2), (4, 4), (7.9, 4), (8, 8), (16, 8), (16, 16), (3.0, 1)]:
        reach = int(radius) // tile + 2
        cells = [(y, x) for y in range(tile) for x in range(tile)]
        brute = {(a, b) for a in range(-reach, reach + 1) for b in range(-reach, reach + 1)
                 if any((a * tile + ky - qy) ** 2 + (b * tile + kx - qx) ** 2 < radius ** 2
                        for qy, qx in cells for ky, kx in cells)}
        assert set(tile_offsets(radius, tile)) == brute, (radius, tile)


def test_pooling_uniform_weights_is_average_pooling_and_bad_options_raise():
    q, k, v = qkv(2, 3, 8 * 6, 8)
    uniform = torch.full((3, 2, 2), 0.25)
    pooled = pool_keys(k, uniform, 8, 6)
    expected = torch.nn.functional.avg_pool2d(k.transpose(-1, -2).reshape(6, 8, 8, 6), 2).reshape(2, 3, 8, 12)
    torch.testing.assert_close(pooled, expected.transpose(-1, -2))
    with pytest.raises(ValueError, match="pool=4 does not divide the 8x6 token grid"):
        local_2d_attention(q, k, v, height=8, width=6, radius=2, pool_weights=(uniform.new_ones(3, 4, 4),) * 2)
    with pytest.raises(ValueError, match="radius=0"):
        local_2d_attention(q, k, v, height=8, width=6, radius=0)
    with pytest.raises(ValueError, match="sequence length 48 != text_tokens 2"):
        local_2d_attention(q, k, v, height=8, width=6, radius=2, text_tokens=2)
    with pytest.raises(ValueError, match="backend='fast' is not one of"):
        local_2d_attention(q, k, v, height=8, width=6, radius=2, backend="fast")


def test_tile_path_computes_a_fraction_of_the_pairs():
    # 64 x 64 grid, r = 8, 8 x 8 tiles: 3 x 3 tiles minus nothing = 9 tiles of 64 keys per query
    assert len(tile_offsets(8, 8)) == 9
    assert tile_path_fraction(64, 64, 8, tile=8) == pytest.approx(9 * 64 / 4096)
    assert tile_path_fraction(64, 64, 16, tile=8) < 0.4


@pytest.mark.parametrize("budget", [1000, 2 * 3072, 2 * 3072 * 4])
def test_tile_path_chunks_agree(budget, monkeypatch):
    # 3072 elements per head and query tile (9 key tiles + 34 text and pooled keys padded to 3 tiles, x 16 keys x 16
    # dims): budgets that split the heads, take one tile per chunk, and take the 9 tiles 4 at a time
    q, k, v = qkv(1, 2, 4 + 12 * 10, 16, requires_grad=True)
    kwargs = dict(height=12, width=10, radius=2.2, text_tokens=4, pool_weights=pool_weights(2, 2), tile=4)
    expected = local_2d_attention(q, k, v, backend="dense", **kwargs)
    monkeypatch.setattr(local_2d, "_TILE_CHUNK_ELEMENTS", budget)
    out = local_2d_attention(q, k, v, backend="tiles", **kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.sum(), [q, k, v]), torch.autograd.grad(expected.sum(), [q, k, v])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_cpu_default_is_dense_for_small_grids_and_tiles_otherwise(monkeypatch):
    calls = []
    monkeypatch.setattr(local_2d, "_dense_attention", lambda q, *args: calls.append("dense") or q)
    monkeypatch.setattr(local_2d, "_tile_attention", lambda q, *args, tile: calls.append(f"tiles{tile}") or q)
    monkeypatch.delenv("REATTEND_KERNELS", raising=False)
    for height, width, radius, tile in [(14, 14, 4, None), (64, 64, 8, None), (32, 32, 2.5, 4), (80, 80, 30, None)]:
        q = torch.zeros(1, 1, height * width, 4)
        local_2d_attention(q, q, q, height=height, width=width, radius=radius, tile=tile)
    # ViT-sized: 8 x 8 tiles would cover most pairs; large grids never build the N x N mask
    assert calls == ["dense", "tiles8", "tiles4", "tiles8"]

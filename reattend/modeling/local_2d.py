"""2-D local attention for image tokens (CLEAR): circular windows on a token grid, tile-ordered layouts.

An image query at grid cell (y, x) sees image keys with (Δy)² + (Δx)² < r², and every text token; text queries
see everything. Sequences hold ``text_tokens`` text tokens first, then the h x w image tokens in raster order.
Optional pooled keys (CLEAR's down-sampled global keys): per-head weighted averages of the image keys/values over
d x d blocks, seen by every image query and by no text query.

Raster order (row by row) puts a circle's rows W tokens apart, so the 128-token blocks a block-sparse kernel
(FlexAttention) works in are mostly empty yet still computed. Tile order lays out t x t tiles one after another, so
a block covers a compact patch and far fewer blocks are touched; ``block_kept_fraction`` measures that.

``local_2d_attention`` has three paths that compute the same thing: ``dense`` (an (N, N) boolean mask and SDPA;
the reference, and the CPU default for small grids), ``tiles`` (the CPU path: each t x t query tile attends to the
key tiles the circle can reach, so no N x N mask is built) and ``flex`` (FlexAttention with a block mask over the
tile-ordered sequence; compiled on CUDA). Tile re-ordering happens inside the op: callers pass and get raster order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from .attention_backend import resolve_backend

PATHS = ("dense", "tiles", "flex")
_PATH_FOR_BACKEND = {"triton": "flex", "reference": "cpu"}
_CPU_TILE = 8
# Default CPU choice: the dense mask while the tile path would compute over half the pairs anyway and the mask is
# small (ViT-sized grids); the tile path otherwise.
_DENSE_MAX_TOKENS = 4096
# Elements (batch x heads x gathered keys x head dim) gathered per SDPA call on the tile path; bounds temporaries.
_TILE_CHUNK_ELEMENTS = 1 << 20


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


def tile_offsets(radius: float, tile: int) -> list[tuple[int, int]]:
    """Offsets (in tiles) of the key tiles holding a cell within ``radius`` of some cell of a query tile."""
    def gap(a: int) -> int:  # smallest cell distance along one axis between tiles ``a`` apart
        return max(0, (abs(a) - 1) * tile + 1)

    reach = math.ceil(radius) // tile + 1
    r2 = radius * radius
    span = range(-reach, reach + 1)
    return [(a, b) for a in span for b in span if gap(a) ** 2 + gap(b) ** 2 < r2]


def _offsets_in_grid(radius: float, tile: int, tile_rows: int, tile_cols: int) -> list[tuple[int, int]]:
    """``tile_offsets`` without the offsets that fall outside a grid of that many tiles from every tile."""
    return [(a, b) for a, b in tile_offsets(radius, tile) if abs(a) < tile_rows and abs(b) < tile_cols]


def tile_path_fraction(height: int, width: int, radius: float, tile: int = _CPU_TILE, text_tokens: int = 0) -> float:
    """Fraction of the dense query-key pairs the CPU tile path computes (text queries stay dense)."""
    n = height * width
    ty, tx = math.ceil(height / tile), math.ceil(width / tile)
    keys = len(_offsets_in_grid(radius, tile, ty, tx)) * tile * tile
    image_rows = ty * tx * tile * tile * (keys + text_tokens)
    return (image_rows + text_tokens * (n + text_tokens)) / (n + text_tokens) ** 2


def pool_keys(x: torch.Tensor, weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per-head weighted pooling over d x d blocks: x (B, H, h*w, D) in raster order, weight (H, d, d) ->
    (B, H, (h/d)*(w/d), D), blocks in raster order."""
    d = weight.shape[-1]
    B, H, _, D = x.shape
    blocks = x.reshape(B, H, height // d, d, width // d, d, D)
    return torch.einsum("bhyixjd,hij->bhyxd", blocks, weight.to(x.dtype)).reshape(B, H, -1, D)


def local_2d_attention(q, k, v, *, height: int, width: int, radius: float, text_tokens: int = 0,
                       scale: float | None = None, pool_weights=None, tile: int | None = None,
                       backend: str | None = None) -> torch.Tensor:
    """Circular-window attention over ``text_tokens`` text tokens followed by an h x w raster-ordered image grid.

    q, k, v: (B, H, text_tokens + h*w, D). ``pool_weights``: None or (key weight, value weight), each (H, d, d).
    ``tile``: the layout of the block-sparse paths (None: raster for ``flex``, 8 x 8 tiles for ``tiles``).
    ``backend``: ``dense``, ``tiles`` or ``flex``; by default REATTEND_KERNELS decides (``flex`` for CUDA tensors
    when triton imports; otherwise ``tiles``, or ``dense`` for grids of at most 4096 tokens where the tiles would
    cover over half the pairs). Returns (B, H, text_tokens + h*w, D) in the input order.
    """
    check_options(radius=radius, tile=tile)
    n = height * width
    if q.shape[-2] != text_tokens + n:
        raise ValueError(f"sequence length {q.shape[-2]} != text_tokens {text_tokens} + grid {height}x{width}")
    pooled = None
    if pool_weights is not None:
        d = pool_weights[0].shape[-1]
        if height % d or width % d:
            raise ValueError(f"pool={d} does not divide the {height}x{width} token grid; use a pool size dividing "
                             f"both sides (or pool=None)")
        pooled = tuple(pool_keys(x[:, :, text_tokens:], w, height, width) for x, w in zip((k, v), pool_weights))
    elif radius * radius > (height - 1) ** 2 + (width - 1) ** 2:
        # The circle covers the whole grid: full attention, computed as the teacher computes it.
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    path = backend or _PATH_FOR_BACKEND[resolve_backend(q)]
    if path == "cpu" and backend is None:
        small = text_tokens + n <= _DENSE_MAX_TOKENS
        dense_anyway = tile_path_fraction(height, width, radius, tile or _CPU_TILE, text_tokens) > 0.5
        path = "dense" if small and dense_anyway else "tiles"
    if path not in PATHS:
        raise ValueError(f"backend={path!r} is not one of {PATHS}")
    args = (q, k, v, height, width, radius, text_tokens, pooled, scale)
    if path == "dense":
        return _dense_attention(*args)
    if path == "flex":
        return _flex_attention(*args, tile=tile)
    return _tile_attention(*args, tile=tile or _CPU_TILE)


def check_options(*, radius: float, tile: int | None = None, pool: int | None = None) -> None:
    """ValueError naming the option, its value and a fix, for settings no grid can satisfy."""
    if not (isinstance(radius, (int, float)) and radius > 0 and math.isfinite(radius)):
        raise ValueError(f"radius={radius!r}: must be a positive number of grid cells; pass e.g. radius=8")
    for name, value in (("tile", tile), ("pool", pool)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name}={value!r}: must be a positive integer or None; pass e.g. {name}=8 or None")


def _with_pooled(k, v, mask, pooled, text_tokens):
    """Append pooled keys/values, visible to image queries only."""
    pk, pv = pooled
    image_query = torch.arange(mask.shape[0], device=mask.device) >= text_tokens
    mask = torch.cat([mask, image_query[:, None].expand(-1, pk.shape[-2])], dim=1)
    return torch.cat([k, pk], dim=-2), torch.cat([v, pv], dim=-2), mask


def _dense_attention(q, k, v, height, width, radius, text_tokens, pooled, scale):
    mask = dense_mask(grid_positions(height, width), radius, text_tokens).to(q.device)
    if pooled is not None:
        k, v, mask = _with_pooled(k, v, mask, pooled, text_tokens)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@dataclass(frozen=True)
class _TileLayout:
    tiles: tuple[int, int]  # tile rows, tile columns (the grid padded up to whole tiles)
    key_tiles: torch.Tensor  # (tiles, keys / (t*t)) each query tile's key tiles, as indices into the tile array
    mask: torch.Tensor  # (tiles, t*t, keys); query cells past the grid edge see everything (their rows are dropped)


@lru_cache(maxsize=16)
def _tile_layout(height: int, width: int, radius: float, tile: int, extra: int, device: str) -> _TileLayout:
    """The tile array holds the grid's tiles, then one zero tile (standing for tiles past the edge), then ``extra``
    always-visible keys (text, pooled) padded to whole tiles; every query tile's key list ends with those."""
    ty, tx = math.ceil(height / tile), math.ceil(width / tile)
    t2, n_tiles = tile * tile, ty * tx
    offsets = torch.tensor(_offsets_in_grid(radius, tile, ty, tx))  # (O, 2)
    cell = torch.stack(torch.meshgrid(torch.arange(tile), torch.arange(tile), indexing="ij"), -1).reshape(-1, 2)
    tile_yx = torch.stack(torch.meshgrid(torch.arange(ty), torch.arange(tx), indexing="ij"), -1).reshape(-1, 1, 2)

    def inside(yx):
        return (yx[..., 0] >= 0) & (yx[..., 0] < height) & (yx[..., 1] >= 0) & (yx[..., 1] < width)

    near = tile_yx + offsets  # (tiles, O, 2)
    in_grid = (near[..., 0] >= 0) & (near[..., 0] < ty) & (near[..., 1] >= 0) & (near[..., 1] < tx)
    extra_tiles = -(-extra // t2)
    key_tiles = torch.cat([torch.where(in_grid, near[..., 0] * tx + near[..., 1], n_tiles),
                           (n_tiles + 1 + torch.arange(extra_tiles)).expand(n_tiles, -1)], dim=1)
    key_rel = (offsets[:, None, :] * tile + cell[None]).reshape(-1, 2)  # relative to the query tile's origin
    circle = ((key_rel[None, :, :] - cell[:, None, :]) ** 2).sum(-1) < radius * radius  # the same for every tile
    origin = tile_yx * tile
    mask = circle[None] & inside(origin + key_rel)[:, None, :]
    extra_mask = (torch.arange(extra_tiles * t2) < extra).expand(n_tiles, t2, -1)
    mask = torch.cat([mask, extra_mask], dim=-1) | ~inside(origin + cell)[:, :, None]
    return _TileLayout((ty, tx), key_tiles.to(device), mask.to(device))


def _to_tiles(x, height, width, tile):
    """(BH, h*w, D) raster -> (BH, tiles, t*t, D), the grid padded with zeros up to whole tiles."""
    BH, _, D = x.shape
    ty, tx = math.ceil(height / tile), math.ceil(width / tile)
    grid = F.pad(x.view(BH, height, width, D), (0, 0, 0, tx * tile - width, 0, ty * tile - height))
    return grid.view(BH, ty, tile, tx, tile, D).transpose(2, 3).reshape(BH, ty * tx, tile * tile, D)


def _tile_chunks(q_tiles, key_tiles):
    """(heads slice, tiles slice) chunks small enough that the allocator reuses their memory: fresh large buffers
    are page-faulted in on every call, which costs as much as the attention itself."""
    BH, n_tiles, _, D = q_tiles.shape
    n_keys = key_tiles.shape[1] * q_tiles.shape[2]
    heads = min(BH, max(1, _TILE_CHUNK_ELEMENTS // (n_keys * D)))
    per_chunk = max(1, _TILE_CHUNK_ELEMENTS // (heads * n_keys * D))
    for h0 in range(0, BH, heads):
        for i0 in range(0, n_tiles, per_chunk):
            yield slice(h0, min(BH, h0 + heads)), slice(i0, min(n_tiles, i0 + per_chunk))


def _gather(tiles, heads, key_tiles):
    """Each query tile's key tiles, (heads, query tiles, keys, D)."""
    part = tiles[heads].index_select(1, key_tiles.reshape(-1))
    return part.view(part.shape[0], key_tiles.shape[0], -1, part.shape[-1])


class _TileAttention(torch.autograd.Function):
    """SDPA of query tiles over their gathered key tiles, chunk by chunk. The backward recomputes each chunk's
    attention and adds its key/value gradients into one buffer: through autograd, every chunk's gather would
    allocate (and zero) a gradient the size of the whole key array."""

    @staticmethod
    def forward(ctx, q_tiles, k_tiles, v_tiles, key_tiles, mask, scale):
        out = torch.empty_like(q_tiles)
        for heads, tiles in _tile_chunks(q_tiles, key_tiles):
            out[heads, tiles] = F.scaled_dot_product_attention(
                q_tiles[heads, tiles], _gather(k_tiles, heads, key_tiles[tiles]),
                _gather(v_tiles, heads, key_tiles[tiles]), attn_mask=mask[tiles].unsqueeze(0), scale=scale)
        ctx.save_for_backward(q_tiles, k_tiles, v_tiles, key_tiles, mask)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q_tiles, k_tiles, v_tiles, key_tiles, mask = ctx.saved_tensors
        grad_q, grad_k, grad_v = torch.empty_like(q_tiles), torch.zeros_like(k_tiles), torch.zeros_like(v_tiles)
        t2, D = q_tiles.shape[2:]
        for heads, tiles in _tile_chunks(q_tiles, key_tiles):
            index = key_tiles[tiles]
            with torch.enable_grad():
                inputs = [q_tiles[heads, tiles].detach().requires_grad_(),
                          _gather(k_tiles, heads, index).requires_grad_(),
                          _gather(v_tiles, heads, index).requires_grad_()]
                out = F.scaled_dot_product_attention(*inputs, attn_mask=mask[tiles].unsqueeze(0), scale=ctx.scale)
                dq, dk, dv = torch.autograd.grad(out, inputs, grad_out[heads, tiles])
            grad_q[heads, tiles] = dq
            grad_k[heads].index_add_(1, index.reshape(-1), dk.reshape(dk.shape[0], -1, t2, D))
            grad_v[heads].index_add_(1, index.reshape(-1), dv.reshape(dv.shape[0], -1, t2, D))
        return grad_q, grad_k, grad_v, None, None, None


def _tile_attention(q, k, v, height, width, radius, text_tokens, pooled, scale, *, tile):
    """Each query tile attends to the key tiles within reach plus the global keys. Key tiles are gathered whole and
    query tiles run as SDPA heads, so the mask is (tiles, t*t, keys per tile), never (N, N)."""
    B, H, _, D = q.shape
    T, BH, t2 = text_tokens, B * H, tile * tile
    global_k = torch.cat([k[:, :, :T], *([pooled[0]] if pooled else [])], dim=-2).reshape(BH, -1, D)
    global_v = torch.cat([v[:, :, :T], *([pooled[1]] if pooled else [])], dim=-2).reshape(BH, -1, D)
    G = global_k.shape[1]
    layout = _tile_layout(height, width, float(radius), tile, G, str(q.device))
    q_tiles = _to_tiles(q[:, :, T:].reshape(BH, -1, D), height, width, tile)

    def tile_array(x, glob):
        glob = F.pad(glob, (0, 0, 0, -G % t2)).view(BH, -(-G // t2), t2, D)
        return torch.cat([_to_tiles(x[:, :, T:].reshape(BH, -1, D), height, width, tile),
                          x.new_zeros(BH, 1, t2, D), glob], dim=1)

    k_tiles, v_tiles = tile_array(k, global_k), tile_array(v, global_v)
    out = _TileAttention.apply(q_tiles, k_tiles, v_tiles, layout.key_tiles, layout.mask, scale)
    ty, tx = layout.tiles
    out = out.view(B, H, ty, tx, tile, tile, D).transpose(3, 4).reshape(B, H, ty * tile, tx * tile, D)
    out = out[:, :, :height, :width].reshape(B, H, height * width, D)
    if T == 0:
        return out
    # Text queries see every text and image key (not the pooled ones): exactly the teacher's rows.
    text = F.scaled_dot_product_attention(q[:, :, :T], k, v, scale=scale)
    return torch.cat([text, out], dim=-2)


_compiled_flex = None


@lru_cache(maxsize=8)
def _flex_block_mask(height, width, radius, text_tokens, n_pooled, tile, device):
    from torch.nn.attention.flex_attention import create_block_mask

    pos = grid_positions(height, width, tile=tile).to(device)
    # Contiguous copies: compiled FlexAttention (the CPU template at least) rejects strided captured buffers.
    ys, xs = pos[:, 0].contiguous(), pos[:, 1].contiguous()
    n, r2 = height * width, radius * radius
    # Layout: queries [image (layout order), text]; keys [image, text, pooled]. Image tokens start at 0 so that
    # 128-token blocks line up with tiles whatever the text length.

    def mask_mod(b, h, q_idx, kv_idx):
        qi, ki = q_idx.clamp(max=n - 1), kv_idx.clamp(max=n - 1)
        near = (ys[qi] - ys[ki]) ** 2 + (xs[qi] - xs[ki]) ** 2 < r2
        image_query = q_idx < n
        pooled_key = kv_idx >= n + text_tokens
        image_key = kv_idx < n
        return (image_query & (~image_key | near)) | (~image_query & ~pooled_key)

    q_len, kv_len = n + text_tokens, n + text_tokens + n_pooled
    return create_block_mask(mask_mod, None, None, q_len, kv_len, device=device), pos[:, 0] * width + pos[:, 1]


def _flex_attention(q, k, v, height, width, radius, text_tokens, pooled, scale, *, tile, compiled=None):
    """``compiled``: default on CUDA; tests also compile on CPU (forward only there)."""
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    T = text_tokens
    n_pooled = pooled[0].shape[-2] if pooled else 0
    block_mask, order = _flex_block_mask(height, width, float(radius), T, n_pooled, tile, str(q.device))
    inverse = torch.argsort(order)
    qf = torch.cat([q[:, :, T:][:, :, order], q[:, :, :T]], dim=-2)
    kf = torch.cat([k[:, :, T:][:, :, order], k[:, :, :T], *([pooled[0]] if pooled else [])], dim=-2)
    vf = torch.cat([v[:, :, T:][:, :, order], v[:, :, :T], *([pooled[1]] if pooled else [])], dim=-2)
    if q.is_cuda if compiled is None else compiled:
        # Compiled once per process: FlexAttention fuses and skips the masked-out blocks only when compiled.
        _compiled_flex = _compiled_flex or torch.compile(flex_attention, dynamic=False)
        out = _compiled_flex(qf, kf, vf, block_mask=block_mask, scale=scale)
    else:
        out = flex_attention(qf, kf, vf, block_mask=block_mask, scale=scale)
    n = height * width
    return torch.cat([out[:, :, n:], out[:, :, :n][:, :, inverse]], dim=-2)

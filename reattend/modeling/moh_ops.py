"""Mixture-of-head attention in plain PyTorch: the masked dense reference and the sparse path.

Shapes: ``q`` (B, H, T, d) after RoPE (or before it, for ``sparse_moh`` given ``rope``); ``k``/``v``
(B, H_kv, S, d), the keys a step sees (the cache included), contiguous and ending at the last query, so query
``t`` sits at key index ``S - T + t``;
``gates`` (B, T, H) with 0 for every head a token did not select. Heads ``0 .. shared - 1`` are shared
(always on), the rest routed.

The dense reference computes every head and multiplies by the gates afterwards (what the released MoH
code does: no saving). The sparse path computes the shared heads densely and, for each routed head, only
the rows of the tokens that selected it, against only the keys those rows can see; ``moh_output`` then
applies the output projection to active heads only. On CUDA the routed rows run in one Triton kernel launch
(``moh_triton``, chosen by ``attention_backend.resolve_backend``); the PyTorch code here is its reference and
the CPU path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention_backend import resolve_backend
from .linear_attention import rotate_half

# Selected rows of one head are processed in blocks of this many queries: each block attends to the keys up
# to its last query only, so the causal triangle is mostly skipped, as a causal dense kernel skips it. 128 rather
# than 256: ~9% less CPU time at T=2K (half the wasted triangle, matmuls still large enough to run at full speed).
QUERY_BLOCK = 128


def allowed_keys(query_index: torch.Tensor, start: int, stop: int, window: int | None) -> torch.Tensor:
    """(n, stop - start) bool: which keys ``start .. stop - 1`` each query (given by its key index) may see."""
    j = torch.arange(start, stop, device=query_index.device)
    allowed = j[None, :] <= query_index[:, None]
    if window is not None:
        allowed &= query_index[:, None] - j[None, :] < window
    return allowed


def _as_bool_mask(attention_mask: torch.Tensor | None, keys: int) -> torch.Tensor | None:
    """transformers' 4-D mask (bool, or additive float) as bool (B, T, S); None when absent or not matching."""
    if attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[-1] != keys:
        return None
    mask = attention_mask[:, 0]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def dense_attention(q, k, v, *, scale: float, window: int | None, attention_mask=None, groups: int | None = None):
    """Causal (optionally sliding-window) softmax attention of query heads ``0 .. q.shape[1] - 1``: (B, h, T, d).

    ``groups``: query heads per KV head (default: all query heads are in ``q``).
    """
    T, S = q.shape[-2], k.shape[-2]
    groups = groups or q.shape[1] // k.shape[1]
    kv_head = torch.arange(q.shape[1], device=q.device) // groups
    k, v = k.index_select(1, kv_head), v.index_select(1, kv_head)
    extra = _as_bool_mask(attention_mask, S)
    if extra is None and window is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = allowed_keys(torch.arange(S - T, S, device=q.device), 0, S, window)
    mask = mask if extra is None else mask & extra[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def masked_dense_moh(q, k, v, gates, *, scale: float, window: int | None, attention_mask=None) -> torch.Tensor:
    """Reference: every head computed, then scaled by its gate (0 = not selected). Returns (B, T, H, d)."""
    out = dense_attention(q, k, v, scale=scale, window=window, attention_mask=attention_mask)
    return out.transpose(1, 2) * gates[..., None].to(out.dtype)


def _selected_rows_attention(q_rows, rows, k, v, *, scale, window, extra):
    """Attention of selected query rows (ascending key indices ``rows``) over one KV head ``k``/``v`` (S, d).

    ``extra``: (n, S) bool, transformers' mask for these rows (e.g. padding), or None. Plain matmul + softmax:
    on CPU, SDPA with an explicit mask runs ~2.5x slower per row than its causal kernel, so a block's scores are
    materialised ((QUERY_BLOCK, keys) is small) and only the part right of the block's first query is masked.
    """
    outs = []
    # Scaling the (n, d) queries is cheaper than scaling the (n, keys) scores.
    q_rows = q_rows * scale
    for a in range(0, rows.numel(), QUERY_BLOCK):
        idx = rows[a:a + QUERY_BLOCK]
        stop = int(idx[-1]) + 1
        start = 0 if window is None else max(0, int(idx[0]) - window + 1)
        scores = q_rows[a:a + QUERY_BLOCK] @ k[start:stop].transpose(0, 1)
        if window is None and extra is None:
            # Keys before the block's first query are visible to every row of the block.
            first = int(idx[0])
            future = torch.arange(first, stop, device=idx.device)[None, :] > idx[:, None]
            scores[:, first - start:].masked_fill_(future, float("-inf"))
        else:
            mask = allowed_keys(idx, start, stop, window)
            if extra is not None:
                mask = mask & extra[a:a + QUERY_BLOCK, start:stop]
            scores.masked_fill_(~mask, float("-inf"))
        outs.append(torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v[start:stop])
    return torch.cat(outs)


def _gather_rows(q, b, head, t):
    """``q[b, head, t]`` as (n, d), by index_select on a flat view: several times faster on CPU than advanced
    indexing over three dimensions. Projected queries are usually (B, T, H, d) in memory (a transposed view),
    which is flattened as it lies rather than copied into (B, H, T, d) first."""
    B, H, T, d = q.shape
    if q.transpose(1, 2).is_contiguous():
        return q.transpose(1, 2).reshape(B * T * H, d).index_select(0, (b * T + t) * H + head)
    return q.reshape(B * H * T, d).index_select(0, (b * H + head) * T + t)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (the rotate-half convention of ``linear_attention.apply_rope``); ``cos``/``sin`` broadcast to ``x``."""
    return x * cos + rotate_half(x) * sin


def routed_rows(selected: torch.Tensor, *, shared: int, kv_heads: int):
    """The rows the routed heads compute: ``(batch, kv_head, token, head)`` index tensors of the selected
    (token, query head) pairs, sorted by batch, then KV head, then token, then head."""
    B, T, R = selected.shape
    H = shared + R
    active = torch.zeros(B, T, H, dtype=torch.bool, device=selected.device)
    active[..., shared:] = selected
    b, kv_head, t, g = active.view(B, T, kv_heads, H // kv_heads).permute(0, 2, 1, 3).nonzero(as_tuple=True)
    return b, kv_head, t, kv_head * (H // kv_heads) + g


def sparse_moh(q, k, v, selected, *, shared: int, scale: float, window: int | None, attention_mask=None,
               backend: str | None = None, rope=None):
    """Shared heads densely; each routed head only on the tokens that selected it.

    ``selected`` (B, T, R) bool. Returns ``(shared_out (B, T, shared, d), routed)`` where ``routed`` lists
    ``(head, batch index, token indices (n,), outputs (n, d))`` for every non-empty (batch, routed head).
    The selected rows of all routed heads that share a KV head are attended together, in position order: one
    long query list per KV head instead of a short one per query head. Nothing here depends on the gates, so
    the caller scales rows (keeping gradients) as it projects them.

    ``backend`` (or ``REATTEND_KERNELS``, see ``attention_backend.resolve_backend``): ``triton`` runs the
    routed rows in one fused kernel launch (``moh_triton``); a transformers mask that adds anything to causality
    and the window (e.g. padding) is not supported there and takes the PyTorch path.

    ``rope``: ``(cos, sin)``, each (B, T, d), when ``q`` is not yet rotated: the shared heads are then rotated
    whole and the routed heads only on their selected rows (rotating the unselected rows is wasted work).
    """
    B, H, T, d = q.shape
    H_kv, S = k.shape[1], k.shape[-2]
    if rope is not None:
        cos, sin = (x.expand(B, T, d) for x in rope)
    shared_out = None
    if shared:
        q_shared = q[:, :shared] if rope is None else rotate(q[:, :shared], cos[:, None], sin[:, None])
        shared_out = dense_attention(q_shared, k, v, scale=scale, window=window, attention_mask=attention_mask,
                                     groups=H // H_kv).transpose(1, 2)
    extra = _as_bool_mask(attention_mask, S)
    if extra is not None and torch.equal(extra, allowed_keys(torch.arange(S - T, S, device=q.device), 0, S, window)
                                         .expand_as(extra)):
        # transformers' mask says nothing beyond causality and the window (gemma3's sliding layers pass one).
        extra = None
    b, kv_head, t, head = routed_rows(selected, shared=shared, kv_heads=H_kv)
    if not t.numel():
        return shared_out, []
    q_rows = _gather_rows(q, b, head, t)
    if rope is not None:
        token = b * T + t
        cos_rows, sin_rows = (x.reshape(B * T, d).index_select(0, token) for x in (cos, sin))
        q_rows = rotate(q_rows, cos_rows, sin_rows)
    positions, segments = t + (S - T), b * H_kv + kv_head
    if extra is None and resolve_backend(q, backend) == "triton":
        # The `from .module import name` form keeps the kernel file in exported checkpoints (see attention_backend).
        from .moh_triton import triton_selected_rows_attention

        out = triton_selected_rows_attention(q_rows, positions, segments, k, v, scale=scale, window=window)
    else:
        outs, first = [], 0
        for segment, n in enumerate(torch.bincount(segments, minlength=B * H_kv).tolist()):
            if n:
                rows = slice(first, first + n)
                batch, kv = divmod(segment, H_kv)
                outs.append(_selected_rows_attention(
                    q_rows[rows], positions[rows], k[batch, kv], v[batch, kv], scale=scale, window=window,
                    extra=None if extra is None else extra[batch, t[rows]]))
                first += n
        out = torch.cat(outs)
    # Regroup the rows by (head, batch), tokens ascending, for the per-head output projection.
    order = torch.argsort((head * B + b) * T + t)
    out, t = out.index_select(0, order), t[order]
    routed, first = [], 0
    for pair, n in enumerate(torch.bincount(head * B + b, minlength=H * B).tolist()):
        if n:
            routed.append((pair // B, pair % B, t[first:first + n], out[first:first + n]))
            first += n
    return shared_out, routed


def moh_output(shared_out, routed, gates, o_proj: torch.nn.Module, *, shape, head_dim: int) -> torch.Tensor:
    """Gate and project the heads' outputs: ``o_proj`` over active heads only.

    ``gates`` (B, T, H), or None when every active head's gate is exactly 1 and nothing needs its gradient
    (hard gates at inference), which skips the multiplications. A plain ``nn.Linear`` is applied slice by slice
    (shared heads on all tokens, each routed head on its own rows). Any other module (e.g. a peft LoRA wrapper
    during recovery) must see its whole input, so the active rows are scattered into a zero tensor and it is
    called once: same result, no saving.
    """
    B, T, H = shape

    def gated(rows, b, tokens, head):
        return rows if gates is None else rows * gates[b, tokens, head, None].to(rows.dtype)

    h_s = 0 if shared_out is None else shared_out.shape[2]
    if h_s and gates is not None:
        shared_out = shared_out * gates[..., :h_s, None].to(shared_out.dtype)
    if type(o_proj) is not torch.nn.Linear:
        heads = torch.zeros(B, T, H - h_s, head_dim, dtype=o_proj.weight.dtype, device=o_proj.weight.device)
        if shared_out is not None:
            heads = torch.cat([shared_out, heads], dim=2)
        for head, b, tokens, out in routed:
            heads = heads.index_put((torch.full_like(tokens, b), tokens, torch.full_like(tokens, head)),
                                    gated(out, b, tokens, head))
        return o_proj(heads.reshape(B, T, H * head_dim))
    weight = o_proj.weight
    if shared_out is not None:
        y = F.linear(shared_out.reshape(B, T, h_s * head_dim), weight[:, : h_s * head_dim]).reshape(B * T, -1)
    else:
        y = torch.zeros(B * T, weight.shape[0], dtype=weight.dtype, device=weight.device)
    for head, b, tokens, out in routed:
        rows = gated(out, b, tokens, head)
        # In place: y is not needed by any backward, and an out-of-place add would copy all of it per head.
        y.index_add_(0, b * T + tokens, F.linear(rows, weight[:, head * head_dim:(head + 1) * head_dim]))
    y = y.view(B, T, -1)
    return y if o_proj.bias is None else y + o_proj.bias

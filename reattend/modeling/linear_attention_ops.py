"""Plain-PyTorch linear and sliding-window-hybrid attention.

These functions are the reference every fused kernel is tested against, and the path used on CPU.
They import only torch because this file is bundled into exported checkpoints.

Shapes: queries/keys/values ``(B, H, T, d)`` with K/V already repeated to the H query heads;
feature-mapped queries/keys ``(B, H, T, F)``; recurrent state ``(B, H, F, d + 1)`` in float32, where the
last column is the normaliser ``z = sum phi(k)`` (the "ones column" of METHODS.md section 5).

Hybrid attention (LoLCATs sliding window + linear, one shared normaliser), for query i:
  softmax keys: the last ``window`` positions (query included) and the first ``sinks`` positions;
  linear keys:  every other earlier key, i.e. ``sinks <= j <= i - window``;
  y_i = (g * sum_soft exp(s_ij - m_i) v_j + l * phi(q_i) S) / (g * sum_soft exp(s_ij - m_i) + l * phi(q_i) z)
with g = gamma (per head) and l = 1 - gamma when ``affine`` else 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "quadratic_linear_weights",
    "quadratic_linear_attention",
    "chunked_linear_attention",
    "linear_attention_step",
    "quadratic_hybrid_attention",
    "hybrid_attention_weights",
    "chunked_hybrid_attention",
    "hybrid_attention_step",
    "hybrid_prefill_state",
    "fold_into_state",
    "hedgehog_features",
]


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Accumulate in float32 at least (float64 inputs stay float64 so tests can compare exactly)."""
    return x if x.dtype == torch.float64 else x.float()


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def _normalise(num: torch.Tensor, eps: float) -> torch.Tensor:
    return num[..., :-1] / num[..., -1:].clamp_min(eps)


def fold_into_state(state: torch.Tensor | None, k_feat: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Return ``state + sum_j phi(k_j) [v_j, 1]`` over the time axis of ``k_feat``/``v`` (float32)."""
    update = torch.einsum("bhtf,bhtd->bhfd", _acc(k_feat), _with_ones(_acc(v)))
    return update if state is None else state + update


def quadratic_linear_weights(q_feat, k_feat, eps: float = 1e-6):
    """Causal linear attention's normalised T x T weights (rows sum to 1)."""
    T = q_feat.shape[-2]
    scores = torch.einsum("bhif,bhjf->bhij", _acc(q_feat), _acc(k_feat))
    scores = scores * torch.ones(T, T, device=q_feat.device, dtype=scores.dtype).tril()
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(eps)


def quadratic_linear_attention(q_feat, k_feat, v, eps: float = 1e-6):
    """O(T^2) causal linear attention: the definition, for tests."""
    return (quadratic_linear_weights(q_feat, k_feat, eps) @ _acc(v)).to(v.dtype)


# Long sequences are processed this many tokens at a time, carrying the state: the intermediates of one
# segment stay small enough to be reused from cache and the allocator, so time grows linearly with T
# (one pass over 32K tokens at once ran ~2x slower per token than 1K-token segments on a 2-core CPU).
SEGMENT_TOKENS = 1024


def chunked_linear_attention(
    q_feat: torch.Tensor,
    k_feat: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
    eps: float = 1e-6,
    output_final_state: bool = False,
    segment_tokens: int = SEGMENT_TOKENS,
):
    """Causal linear attention in O(T * chunk) memory; returns ``(output, final_state or None)``."""
    T = q_feat.shape[-2]
    if T <= segment_tokens:
        return _chunked_linear_segment(q_feat, k_feat, v, initial_state, chunk_size, eps, output_final_state)
    outputs, state = [], initial_state
    for start in range(0, T, segment_tokens):
        part = slice(start, start + segment_tokens)
        out, state = _chunked_linear_segment(q_feat[:, :, part], k_feat[:, :, part], v[:, :, part], state,
                                             chunk_size, eps, True)
        outputs.append(out)
    return torch.cat(outputs, dim=2), state if output_final_state else None


def _chunked_linear_segment(q_feat, k_feat, v, initial_state, chunk_size, eps, output_final_state):
    B, H, T, Fdim = q_feat.shape
    d = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    qf, kf, vv = _acc(q_feat), _acc(k_feat), _with_ones(_acc(v))
    if pad:
        qf, kf, vv = (F.pad(x, (0, 0, 0, pad)) for x in (qf, kf, vv))
    n = (T + pad) // C
    qf = qf.view(B, H, n, C, Fdim)
    kf = kf.view(B, H, n, C, Fdim)
    vv = vv.view(B, H, n, C, d + 1)
    per_chunk = torch.einsum("bhncf,bhncd->bhnfd", kf, vv)
    prefix = per_chunk.cumsum(dim=2) - per_chunk
    if initial_state is not None:
        prefix = prefix + _acc(initial_state).unsqueeze(2)
    inter = torch.einsum("bhncf,bhnfd->bhncd", qf, prefix)
    causal = torch.ones(C, C, device=v.device, dtype=torch.bool).tril()
    intra_scores = torch.einsum("bhnif,bhnjf->bhnij", qf, kf).masked_fill(~causal, 0.0)
    num = inter + intra_scores @ vv
    out = _normalise(num, eps).reshape(B, H, n * C, d)[:, :, :T].to(v.dtype)
    final = None
    if output_final_state:
        final = per_chunk.sum(dim=2)
        if initial_state is not None:
            final = final + _acc(initial_state)
    return out, final


def linear_attention_step(q_feat, k_feat, v, state, eps: float = 1e-6):
    """One decode step of pure linear attention: fold the new token, then read. Returns ``(o, state)``."""
    state = fold_into_state(state, k_feat, v)
    num = torch.einsum("bhtf,bhfd->bhtd", _acc(q_feat), state)
    return _normalise(num, eps).to(v.dtype), state


def _gates(gamma: torch.Tensor, affine: bool):
    g = _acc(gamma).view(1, -1, 1, 1)
    return g, (1.0 - g) if affine else torch.ones_like(g)


def quadratic_hybrid_attention(
    q, k, v, q_feat, k_feat, gamma, *, window: int, sinks: int = 0, scale: float, affine: bool = False, eps: float = 1e-6
):
    """O(T^2) hybrid attention: the definition, for tests and for the Hedgehog cross-entropy loss."""
    weights = hybrid_attention_weights(q, k, q_feat, k_feat, gamma, window=window, sinks=sinks, scale=scale, affine=affine, eps=eps)
    return (weights @ _acc(v)).to(v.dtype)


def hybrid_attention_weights(q, k, q_feat, k_feat, gamma, *, window, sinks=0, scale, affine=False, eps=1e-6):
    """The hybrid layer's normalised T x T attention weights (rows sum to 1)."""
    T = q.shape[-2]
    i = torch.arange(T, device=q.device).view(T, 1)
    j = torch.arange(T, device=q.device).view(1, T)
    causal = j <= i
    soft_mask = causal & ((i - j < window) | (j < sinks))
    lin_mask = causal & ~soft_mask
    s = torch.einsum("bhid,bhjd->bhij", _acc(q), _acc(k)) * scale
    s = s.masked_fill(~soft_mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    g, lam = _gates(gamma, affine)
    soft = g * torch.exp(s - m)
    lin = lam * torch.einsum("bhif,bhjf->bhij", _acc(q_feat), _acc(k_feat)).masked_fill(~lin_mask, 0.0)
    w = soft + lin
    return w / w.sum(dim=-1, keepdim=True).clamp_min(eps)


def chunked_hybrid_attention(
    q, k, v, q_feat, k_feat, gamma, *, window: int, sinks: int = 0, scale: float, affine: bool = False, eps: float = 1e-6,
    segment_tokens: int = SEGMENT_TOKENS,
):
    """Hybrid attention in O(T * window) memory, blocks of ``window`` queries at a time.

    Long sequences go in segments of about ``segment_tokens`` queries (a multiple of the window). A segment
    is computed on its own span plus the ``window`` keys before it, with the sinks passed explicitly and every
    older non-sink key folded into a linear state, so the result is the same as one pass over the sequence.
    """
    T = q.shape[-2]
    seg = max(window, segment_tokens // window * window)
    if T <= seg or seg - window < sinks:
        return _hybrid_segment(q, k, v, q_feat, k_feat, gamma, window=window, sinks=sinks, scale=scale, affine=affine,
                               eps=eps)
    sink_k, sink_v = k[:, :, :sinks], v[:, :, :sinks]
    outputs = [_hybrid_segment(q[:, :, :seg], k[:, :, :seg], v[:, :, :seg], q_feat[:, :, :seg], k_feat[:, :, :seg], gamma,
                               window=window, sinks=sinks, scale=scale, affine=affine, eps=eps)]
    state, folded = None, sinks
    for start in range(seg, T, seg):
        first = start - window  # the span starts one window early so every query sees its whole window
        state = fold_into_state(state, k_feat[:, :, folded:first], v[:, :, folded:first])
        folded = first
        span = slice(first, start + seg)
        out = _hybrid_segment(q[:, :, span], k[:, :, span], v[:, :, span], q_feat[:, :, span], k_feat[:, :, span], gamma,
                              window=window, sinks=sinks, scale=scale, affine=affine, eps=eps, offset=first,
                              sink_kv=(sink_k, sink_v), initial_state=state)
        outputs.append(out[:, :, window:])
    return torch.cat(outputs, dim=2)


def _hybrid_segment(q, k, v, q_feat, k_feat, gamma, *, window, sinks, scale, affine, eps, offset: int = 0,
                    sink_kv=None, initial_state=None):
    """Hybrid attention of the queries of a span that starts at absolute position ``offset``.

    With blocks as wide as the window, the window of every query in block b lies in blocks b-1 and b,
    and every key older than the window lies in blocks < b-1 (summarised by a prefix state), in the
    part of block b-1 the window has left, or before the span (``initial_state``; sinks in ``sink_kv``).
    Queries in the span's first block see only the span, so a span with ``offset`` > 0 must start one
    window before the queries it is for.
    """
    B, H, T, d = q.shape
    Fdim = q_feat.shape[-1]
    W = window
    pad = (-T) % W
    qq, kk, vv = _acc(q), _acc(k), _acc(v)
    qf, kf = _acc(q_feat), _acc(k_feat)
    pos = offset + torch.arange(T + pad, device=q.device)
    not_sink = (pos >= sinks).to(qq.dtype)
    if pad:
        qq, kk, vv, qf, kf = (F.pad(x, (0, 0, 0, pad)) for x in (qq, kk, vv, qf, kf))
    n = (T + pad) // W
    blk = lambda x: x.view(B, H, n, W, x.shape[-1])  # noqa: E731
    prev = lambda x: F.pad(x, (0, 0, 0, 0, 1, 0))[:, :, :-1]  # noqa: E731  block b-1 aligned under block b
    qb, kb, vb, qfb, kfb = blk(qq), blk(kk), blk(vv), blk(qf), blk(kf)
    kp, vp, kfp = prev(kb), prev(vb), prev(kfb)
    not_sink_b = not_sink.view(n, W)
    not_sink_p = F.pad(not_sink_b, (0, 0, 1, 0))[:-1]
    r = torch.arange(W, device=q.device).view(W, 1)
    c = torch.arange(W, device=q.device).view(1, W)
    first_block = (torch.arange(n, device=q.device) == 0).view(n, 1, 1)

    s_cur = torch.einsum("bhnid,bhnjd->bhnij", qb, kb) * scale
    s_cur = s_cur.masked_fill(~(c <= r), float("-inf"))
    s_prev = torch.einsum("bhnid,bhnjd->bhnij", qb, kp) * scale
    s_prev = s_prev.masked_fill(~(c > r) | first_block, float("-inf"))
    parts = [s_cur, s_prev]
    if sinks > 0:
        ks, vs = (kk[:, :, :sinks], vv[:, :, :sinks]) if sink_kv is None else (_acc(sink_kv[0]), _acc(sink_kv[1]))
        s_sink = torch.einsum("bhnid,bhjd->bhnij", qb, ks) * scale
        qpos = pos.view(n, W, 1)
        spos = torch.arange(ks.shape[-2], device=q.device).view(1, 1, -1)
        s_sink = s_sink.masked_fill(~(spos <= qpos - W), float("-inf"))
        parts.append(s_sink)
    m = torch.cat(parts, dim=-1).amax(dim=-1, keepdim=True)
    g, lam = _gates(gamma, affine)
    g = g.unsqueeze(2)
    lam = lam.unsqueeze(2)
    vbo, vpo = _with_ones(vb), _with_ones(vp)
    num = g * (torch.exp(s_cur - m) @ vbo + torch.exp(s_prev - m) @ vpo)
    if sinks > 0:
        num = num + g * (torch.exp(s_sink - m) @ _with_ones(vs).unsqueeze(2))

    kf_masked = kfb * not_sink_b.view(1, 1, n, W, 1)
    per_block = torch.einsum("bhnjf,bhnjd->bhnfd", kf_masked, vbo)
    older = per_block.cumsum(dim=2) - per_block
    older = F.pad(older, (0, 0, 0, 0, 1, 0))[:, :, :-1]  # blocks <= b-2
    if initial_state is not None:
        older = older + initial_state.unsqueeze(2)
    lin = torch.einsum("bhnif,bhnfd->bhnid", qfb, older)
    lin_scores = torch.einsum("bhnif,bhnjf->bhnij", qfb, kfp * not_sink_p.view(1, 1, n, W, 1))
    lin = lin + lin_scores.masked_fill(~(c <= r), 0.0) @ vpo
    num = num + lam * lin
    out = _normalise(num, eps).reshape(B, H, n * W, d)[:, :, :T]
    return out.to(v.dtype)


def hybrid_prefill_state(k_feat, v, *, window: int, sinks: int = 0):
    """Linear state after a prefill of T tokens: keys that have left the window and are not sinks.

    The decode cache keeps the last ``window - 1`` keys; everything older except the sinks is summarised here.
    """
    T = k_feat.shape[-2]
    end = max(T - (window - 1), 0)
    start = min(sinks, end)
    state = fold_into_state(None, k_feat[:, :, start:end], v[:, :, start:end])
    return state


def hybrid_attention_step(q, q_feat, k, v, state, gamma, *, scale: float, affine: bool = False, eps: float = 1e-6):
    """One decode query over softmax keys ``k``/``v`` (sinks + window, query's own key included) and a linear state.

    ``q``: (B, H, 1, d); ``k``/``v``: (B, H, L, d); ``state``: (B, H, F, d + 1) float32 or None.
    """
    s = torch.einsum("bhid,bhjd->bhij", _acc(q), _acc(k)) * scale
    m = s.amax(dim=-1, keepdim=True)
    g, lam = _gates(gamma, affine)
    num = g * (torch.exp(s - m) @ _with_ones(_acc(v)))
    if state is not None:
        num = num + lam * torch.einsum("bhif,bhfd->bhid", _acc(q_feat), state)
    return _normalise(num, eps).to(v.dtype)


def hedgehog_features(x, weight, bias, eps: float = 1e-12):
    """Hedgehog feature map (LoLCATs form), the reference for its fused kernel.

    ``x``: (B, H, T, d); ``weight``: (H, d, f); ``bias``: (H, f) or (H, 1, f). Returns
    ``[softmax(z) || softmax(-z)]`` over the feature axis with ``z = x W_h + b_h``, clamped at ``eps``: (B, H, T, 2f).
    """
    H, _, f = weight.shape
    z = torch.einsum("bhtd,hdf->bhtf", x, weight.to(x.dtype)) + bias.reshape(H, 1, f).to(x.dtype)
    z = z.float()
    phi = torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)
    return phi.clamp_min(eps).to(x.dtype)

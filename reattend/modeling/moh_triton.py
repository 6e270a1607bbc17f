"""Triton kernel for the sparse MoH path: selected query rows of the routed heads against their KV head.

Same math as ``moh_ops._selected_rows_attention`` (the reference these kernels are tested against). Inputs:
``q_rows`` (N, d), the query vectors of the selected (token, query head) rows of every (batch, KV head)
*segment*, packed one segment after another; ``positions`` (N,), each row's key index (query token ``t`` of a
step over ``S`` keys sits at ``S - T + t``), ascending within a segment; ``segments`` (N,), each row's
segment ``b * H_kv + kv_head``, non-decreasing; ``k``/``v`` (B, H_kv, S, d). A row attends causally
(optionally within a sliding window) to its KV head's keys.

Design: the forward pass and the dq pass run one program per block of ``BM`` rows of one segment, walking
only the key blocks between the window start of the block's first row and the block's last row (rows are
sorted by position, so that is the block's whole span), with an online softmax in float32. The dk/dv pass
runs one program per (segment, key block) and walks only the row range that can see those keys (found on
the host with a binary search), so every dk/dv element is written once: deterministic, no atomics.
Operands are upcast to float32 before ``tl.dot`` (wrong on bf16 under ``TRITON_INTERPRET=1``).

This file is bundled into exported checkpoints: it imports only torch and triton (optional).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = ["triton_selected_rows_attention", "HAS_TRITON"]

HAS_TRITON = triton is not None


def _launch_configs(d: int) -> tuple[int, dict]:
    """Padded head dim and, per kernel, (rows per block or step, keys per block or step, warps).

    Every tile is float32 in registers (the dk/dv pass holds six); these are the largest blocks for which ptxas
    (sm_90) reports no register spills. Chosen by compiling, not yet timed on a GPU.
    """
    bd = max(16, 1 << (int(d) - 1).bit_length())
    if bd <= 64:
        return bd, {"fwd": (64, 64, 4), "dq": (64, 64, 8), "dkv": (32, 64, 8)}
    if bd <= 128:
        return bd, {"fwd": (64, 64, 8), "dq": (32, 64, 8), "dkv": (32, 64, 8)}
    return bd, {"fwd": (32, 32, 8), "dq": (32, 32, 8), "dkv": (16, 32, 8)}


if HAS_TRITON:

    @triton.jit
    def _tile(X, base, rows, valid, D: tl.constexpr, BD: tl.constexpr):
        cols = tl.arange(0, BD)
        return tl.load(X + base + rows[:, None] * D + cols[None, :],
                       mask=valid[:, None] & (cols[None, :] < D), other=0.0).to(tl.float32)

    @triton.jit
    def _scores(q, k, pos, cols, scale, window, WINDOWED: tl.constexpr, PRECISION: tl.constexpr):
        # Scaled q k^T of a (rows x keys) tile, -inf where a row may not see a key.
        ok = cols[None, :] <= pos[:, None]
        if WINDOWED:
            ok = ok & (pos[:, None] - cols[None, :] < window)
        return tl.where(ok, tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, float("-inf"))

    @triton.jit
    def _row_block(BLOCKS, POS, BM: tl.constexpr):
        # A row block's rows, their key indices, its first and last row's key index, and its segment.
        pid = tl.cast(tl.program_id(0), tl.int64)
        row0 = tl.load(BLOCKS + pid * 3).to(tl.int64)
        row_end = tl.load(BLOCKS + pid * 3 + 1).to(tl.int64)
        seg = tl.load(BLOCKS + pid * 3 + 2).to(tl.int64)
        rows = row0 + tl.arange(0, BM)
        valid = rows < row_end
        first = tl.load(POS + row0).to(tl.int64)
        last = tl.load(POS + tl.minimum(row0 + BM, row_end) - 1).to(tl.int64)
        # Padding rows pretend to be the first row, so that they never see an empty key set (NaN).
        pos = tl.where(valid, tl.load(POS + rows, mask=valid, other=0).to(tl.int64), first)
        return rows, valid, pos, first, last, seg

    @triton.jit
    def _key_range(first, last, window, BN: tl.constexpr, WINDOWED: tl.constexpr):
        lo = first * 0
        if WINDOWED:
            lo = tl.maximum(first - window + 1, 0) // BN * BN
        return lo, last + 1

    @triton.jit
    def _fwd_kernel(Q, K, V, POS, BLOCKS, O, LSE, S, scale, window,
                    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    WINDOWED: tl.constexpr, PRECISION: tl.constexpr):
        rows, valid, pos, first, last, seg = _row_block(BLOCKS, POS, BM)
        kv_base = seg * S * D
        q = _tile(Q, 0, rows, valid, D, BD)
        # A finite start: a row whose first visited key block is wholly outside its window would otherwise
        # compute exp(-inf - (-inf)).
        m = tl.full([BM], -1.0e30, tl.float32)
        l = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, BD], tl.float32)
        lo, hi = _key_range(first, last, window, BN, WINDOWED)
        for start in range(lo, hi, BN):
            cols = tl.cast(start, tl.int64) + tl.arange(0, BN)
            kin = cols < hi
            k = _tile(K, kv_base, cols, kin, D, BD)
            v = _tile(V, kv_base, cols, kin, D, BD)
            s = _scores(q, k, pos, cols, scale, window, WINDOWED, PRECISION)
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            m = m_new
        od = tl.arange(0, BD)
        tl.store(O + rows[:, None] * D + od[None, :], (acc / l[:, None]).to(O.dtype.element_ty),
                 mask=valid[:, None] & (od[None, :] < D))
        tl.store(LSE + rows, m + tl.log(l), mask=valid)

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, POS, BLOCKS, DO, LSE, DELTA, DQ, S, scale, window,
                       D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       WINDOWED: tl.constexpr, PRECISION: tl.constexpr):
        rows, valid, pos, first, last, seg = _row_block(BLOCKS, POS, BM)
        kv_base = seg * S * D
        q = _tile(Q, 0, rows, valid, D, BD)
        do = _tile(DO, 0, rows, valid, D, BD)
        lse = tl.load(LSE + rows, mask=valid, other=0.0)
        delta = tl.load(DELTA + rows, mask=valid, other=0.0)
        dq = tl.zeros([BM, BD], tl.float32)
        lo, hi = _key_range(first, last, window, BN, WINDOWED)
        for start in range(lo, hi, BN):
            cols = tl.cast(start, tl.int64) + tl.arange(0, BN)
            kin = cols < hi
            k = _tile(K, kv_base, cols, kin, D, BD)
            v = _tile(V, kv_base, cols, kin, D, BD)
            p = tl.exp(_scores(q, k, pos, cols, scale, window, WINDOWED, PRECISION) - lse[:, None])
            ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
            dq += tl.dot(ds, k, input_precision=PRECISION)
        od = tl.arange(0, BD)
        tl.store(DQ + rows[:, None] * D + od[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=valid[:, None] & (od[None, :] < D))

    @triton.jit
    def _bwd_dkv_kernel(Q, K, V, POS, KV_ROWS, DO, LSE, DELTA, DK, DV, S, NKB, scale, window,
                        D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        WINDOWED: tl.constexpr, PRECISION: tl.constexpr):
        kb = tl.cast(tl.program_id(0), tl.int64)
        seg = tl.cast(tl.program_id(1), tl.int64)
        r_lo = tl.load(KV_ROWS + (seg * NKB + kb) * 2).to(tl.int64)
        r_hi = tl.load(KV_ROWS + (seg * NKB + kb) * 2 + 1).to(tl.int64)
        kv_base = seg * S * D
        cols = kb * BN + tl.arange(0, BN)
        kin = cols < S
        k = _tile(K, kv_base, cols, kin, D, BD)
        v = _tile(V, kv_base, cols, kin, D, BD)
        dk = tl.zeros([BN, BD], tl.float32)
        dv = tl.zeros([BN, BD], tl.float32)
        for r in range(r_lo, r_hi, BM):
            rows = tl.cast(r, tl.int64) + tl.arange(0, BM)
            valid = rows < r_hi
            pos = tl.load(POS + rows, mask=valid, other=-1).to(tl.int64)
            q = _tile(Q, 0, rows, valid, D, BD)
            do = _tile(DO, 0, rows, valid, D, BD)
            lse = tl.load(LSE + rows, mask=valid, other=0.0)
            delta = tl.load(DELTA + rows, mask=valid, other=0.0)
            # pos = -1 masks padding rows out through the causal test; keys past S are never <= a row's pos.
            p = tl.exp(_scores(q, k, pos, cols, scale, window, WINDOWED, PRECISION) - lse[:, None])
            dv += tl.dot(tl.trans(p), do, input_precision=PRECISION)
            ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
            dk += tl.dot(tl.trans(ds), q, input_precision=PRECISION)
        od = tl.arange(0, BD)
        out = kv_base + cols[:, None] * D + od[None, :]
        mask = kin[:, None] & (od[None, :] < D)
        tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask)


def _require_triton():
    if not HAS_TRITON:
        raise RuntimeError("the Triton MoH kernel needs the `triton` package; install it, or set "
                           "REATTEND_KERNELS=reference")


def _row_blocks(segments: torch.Tensor, n_segments: int, bm: int) -> torch.Tensor:
    """(blocks, 3) int32: first row, end row (exclusive) and segment of every block of ``bm`` rows."""
    counts = torch.bincount(segments, minlength=n_segments)
    ends = counts.cumsum(0)
    per_segment = (counts + bm - 1) // bm
    segment = torch.repeat_interleave(torch.arange(n_segments, device=segments.device), per_segment)
    first_block = torch.repeat_interleave(per_segment.cumsum(0) - per_segment, per_segment)
    index_in_segment = torch.arange(segment.numel(), device=segments.device) - first_block
    row0 = ends[segment] - counts[segment] + index_in_segment * bm
    return torch.stack([row0, ends[segment], segment], dim=1).to(torch.int32).contiguous()


def _rows_per_key_block(positions, segments, n_segments: int, S: int, window: int | None, bn: int) -> torch.Tensor:
    """(segments, key blocks, 2) int32: the packed row range [lo, hi) that can see each key block.

    Rows are sorted by (segment, position), so one global binary search finds both ends: a row sees key block
    [a, a + bn) iff its position is >= a and, with a window, < a + bn - 1 + window.
    """
    stride = S + bn + (window or 0)
    key = segments.to(torch.int64) * stride + positions.to(torch.int64)
    seg = torch.arange(n_segments, device=key.device)[:, None] * stride
    starts = torch.arange(0, S, bn, device=key.device)[None, :]
    lo = torch.searchsorted(key, seg + starts)
    if window is None:
        hi_query = (seg + stride).expand_as(lo).contiguous()
    else:
        hi_query = seg + starts + bn - 1 + window
    hi = torch.searchsorted(key, hi_query)
    return torch.stack([lo, hi], dim=-1).to(torch.int32).contiguous()


def _constants(q_rows, d: int, window: int | None, bm: int, bn: int) -> dict:
    # float32 inputs: exact float32 products unless torch itself allows TF32 for float32 matmuls (exact products
    # also cost register spills on sm_90). 16-bit inputs: TF32's 10-bit mantissa holds them exactly and rounds
    # only the float32 intermediates (probabilities, score gradients), below bf16 precision.
    exact = q_rows.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    precision = "ieee" if exact else "tf32"
    bd = _launch_configs(d)[0]
    return dict(D=d, BD=bd, BM=bm, BN=bn, WINDOWED=window is not None, PRECISION=precision)


class _SelectedRowsAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_rows, k, v, positions, segments, scale, window):
        B, H_kv, S, d = k.shape
        q_rows, k, v = q_rows.contiguous(), k.contiguous(), v.contiguous()
        positions = positions.to(torch.int32).contiguous()
        out = torch.empty_like(q_rows)
        lse = torch.empty(q_rows.shape[0], dtype=torch.float32, device=q_rows.device)
        bm, bn, warps = _launch_configs(d)[1]["fwd"]
        blocks = _row_blocks(segments, B * H_kv, bm)
        if blocks.shape[0]:
            _fwd_kernel[(blocks.shape[0],)](q_rows, k, v, positions, blocks, out, lse, S, scale, window or 0,
                                            **_constants(q_rows, d, window, bm, bn), num_warps=warps)
        ctx.save_for_backward(q_rows, k, v, positions, segments, out, lse)
        ctx.scale, ctx.window = scale, window
        return out

    @staticmethod
    def backward(ctx, do):
        q_rows, k, v, positions, segments, out, lse = ctx.saved_tensors
        B, H_kv, S, d = k.shape
        window = ctx.window
        configs = _launch_configs(d)[1]
        do = do.contiguous()
        delta = (do.float() * out.float()).sum(-1)
        dq = torch.empty_like(q_rows)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        bm, bn, warps = configs["dq"]
        blocks = _row_blocks(segments, B * H_kv, bm)
        if blocks.shape[0]:
            _bwd_dq_kernel[(blocks.shape[0],)](q_rows, k, v, positions, blocks, do, lse, delta, dq, S, ctx.scale,
                                               window or 0, **_constants(q_rows, d, window, bm, bn), num_warps=warps)
        bm, bn, warps = configs["dkv"]
        kv_rows = _rows_per_key_block(positions, segments, B * H_kv, S, window, bn)
        _bwd_dkv_kernel[(kv_rows.shape[1], B * H_kv)](
            q_rows, k, v, positions, kv_rows, do, lse, delta, dk, dv, S, kv_rows.shape[1], ctx.scale, window or 0,
            **_constants(q_rows, d, window, bm, bn), num_warps=warps)
        return dq, dk, dv, None, None, None, None


def triton_selected_rows_attention(q_rows, positions, segments, k, v, *, scale: float, window: int | None = None):
    """Attention of packed selected query rows over their KV heads; returns (N, d) in ``q_rows``' dtype.

    See the module docstring for the layout. Differentiable w.r.t. ``q_rows``, ``k`` and ``v``.
    """
    _require_triton()
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"k and v must both be (B, H_kv, S, d); got {tuple(k.shape)} and {tuple(v.shape)}")
    if q_rows.dim() != 2 or q_rows.shape[1] != k.shape[-1]:
        raise ValueError(f"q_rows must be (N, {k.shape[-1]}); got {tuple(q_rows.shape)}")
    if positions.shape != (q_rows.shape[0],) or segments.shape != positions.shape:
        raise ValueError(f"positions and segments must be ({q_rows.shape[0]},); got {tuple(positions.shape)} "
                         f"and {tuple(segments.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None; got {window}")
    return _SelectedRowsAttention.apply(q_rows, k, v, positions, segments.to(torch.int64), float(scale), window)

"""Fused Triton kernels for causal linear attention, the sliding-window + linear hybrid, its decode step,
and the Hedgehog feature map.

Same shapes and math as ``linear_attention_ops`` (the reference these kernels are tested against):
``q``/``k``/``v`` ``(B, H, T, d)``, ``q_feat``/``k_feat`` ``(B, H, T, F)``, state ``(N, H, F, d + 1)`` float32
with the normaliser ``z`` in the last column. Variable-length batches are packed along T with ``B == 1`` and
described by ``cu_seqlens`` (``N + 1`` cumulative offsets, int32/int64); every sequence then has its own
initial/final state.

Design: one program per (sequence, head) walks the sequence in blocks of ``BT`` tokens and keeps the
running state (``F x d`` plus ``z``) in registers, in float32. Every operand is upcast to float32 before
``tl.dot`` (TF32 tensor cores on a GPU) because ``tl.dot`` on bf16 operands is wrong under
``TRITON_INTERPRET=1``, where CI runs these kernels. Backward passes recompute the attention scores from
the inputs and a few per-row statistics saved by the forward pass (normaliser, softmax max and argmax).

This file is bundled into exported checkpoints: it imports only torch and triton (optional).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = [
    "triton_linear_attention",
    "triton_hybrid_attention",
    "triton_hybrid_decode_step",
    "triton_hedgehog_features",
    "HAS_TRITON",
]

HAS_TRITON = triton is not None


def _pow2(n: int) -> int:
    return max(16, 1 << (int(n) - 1).bit_length())


def _block_t(F: int, d: int) -> int:
    # Register budget: the F x d state and four BT x max(F, d) tiles live in registers at once.
    return 64 if max(F, d) <= 64 else 32


def _warps(F: int, d: int) -> int:
    # Spread the larger float32 state over more threads rather than spilling it.
    return 4 if max(F, d) <= 64 else 8


if HAS_TRITON:

    @triton.jit
    def _seq_bounds(CU, n, T, VARLEN: tl.constexpr):
        # Returns (first token, number of tokens, batch index) of program n's sequence.
        if VARLEN:
            bos = tl.load(CU + n).to(tl.int64)
            length = tl.load(CU + n + 1).to(tl.int64) - bos
            b = 0
        else:
            bos = 0
            length = tl.cast(T, tl.int64)
            b = n
        return bos, length, b

    @triton.jit
    def _load_tile(X, base, rows, valid, ncols: tl.constexpr, BC: tl.constexpr):
        cols = tl.arange(0, BC)
        return tl.load(
            X + (base + rows)[:, None] * ncols + cols[None, :],
            mask=valid[:, None] & (cols[None, :] < ncols),
            other=0.0,
        ).to(tl.float32)

    @triton.jit
    def _store_tile(X, base, rows, valid, val, ncols: tl.constexpr, BC: tl.constexpr):
        cols = tl.arange(0, BC)
        tl.store(
            X + (base + rows)[:, None] * ncols + cols[None, :],
            val.to(X.dtype.element_ty),
            mask=valid[:, None] & (cols[None, :] < ncols),
        )

    @triton.jit
    def _load_state(Hs, sbase, F: tl.constexpr, D: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr):
        of = tl.arange(0, BF)
        od = tl.arange(0, BD)
        S = tl.load(
            Hs + sbase + of[:, None] * (D + 1) + od[None, :],
            mask=(of[:, None] < F) & (od[None, :] < D),
            other=0.0,
        )
        z = tl.load(Hs + sbase + of * (D + 1) + D, mask=of < F, other=0.0)
        return S, z

    @triton.jit
    def _store_state(Hs, sbase, S, z, F: tl.constexpr, D: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr):
        of = tl.arange(0, BF)
        od = tl.arange(0, BD)
        tl.store(Hs + sbase + of[:, None] * (D + 1) + od[None, :], S, mask=(of[:, None] < F) & (od[None, :] < D))
        tl.store(Hs + sbase + of * (D + 1) + D, z, mask=of < F)

    @triton.jit
    def _dnum(DO, DEN, base, rows, valid, eps, D: tl.constexpr, BD: tl.constexpr):
        # y = num / max(den, eps): the gradient w.r.t. num, and den itself.
        do = _load_tile(DO, base, rows, valid, D, BD)
        den = tl.load(DEN + base + rows, mask=valid, other=1.0)
        return do / tl.maximum(den, eps)[:, None], den

    @triton.jit
    def _dden(dnum_dot_num, den, eps):
        # dL/dden = -(dnum . num) / den. The dq kernels form dnum . num from recomputed float32 terms rather
        # than from the stored (possibly bf16) output, whose rounding would bias gamma's summed gradient.
        return tl.where(den >= eps, -dnum_dot_num / tl.maximum(den, eps), 0.0)

    # ---------------------------------------------------------------- pure linear attention

    @triton.jit
    def _linear_fwd_kernel(
        QF, KF, V, O, DEN, H0, HT, CU, T, H, eps,
        F: tl.constexpr, D: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
        VARLEN: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n = pid // H
        h = pid % H
        bos, L, b = _seq_bounds(CU, n, T, VARLEN)
        base = (tl.cast(b, tl.int64) * H + h) * T + bos
        sbase = (tl.cast(n, tl.int64) * H + h) * F * (D + 1)
        ot = tl.arange(0, BT)
        causal = ot[:, None] >= ot[None, :]
        if HAS_H0:
            S, z = _load_state(H0, sbase, F, D, BF, BD)
        else:
            S = tl.zeros([BF, BD], tl.float32)
            z = tl.zeros([BF], tl.float32)
        for c in range(0, tl.cdiv(L, BT)):
            rows = tl.cast(c, tl.int64) * BT + ot
            valid = rows < L
            qf = _load_tile(QF, base, rows, valid, F, BF)
            kf = _load_tile(KF, base, rows, valid, F, BF)
            v = _load_tile(V, base, rows, valid, D, BD)
            A = tl.where(causal, tl.dot(qf, tl.trans(kf)), 0.0)
            num = tl.dot(A, v) + tl.dot(qf, S)
            den = tl.sum(A, 1) + tl.sum(qf * z[None, :], 1)
            _store_tile(O, base, rows, valid, num / tl.maximum(den, eps)[:, None], D, BD)
            tl.store(DEN + base + rows, den, mask=valid)
            S += tl.dot(tl.trans(kf), v)
            z += tl.sum(kf, 0)
        if STORE_HT:
            _store_state(HT, sbase, S, z, F, D, BF, BD)

    @triton.jit
    def _linear_bwd_dq_kernel(
        QF, KF, V, DO, DEN, DQF, DDEN, H0, CU, T, H, eps,
        F: tl.constexpr, D: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
        VARLEN: tl.constexpr, HAS_H0: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n = pid // H
        h = pid % H
        bos, L, b = _seq_bounds(CU, n, T, VARLEN)
        base = (tl.cast(b, tl.int64) * H + h) * T + bos
        sbase = (tl.cast(n, tl.int64) * H + h) * F * (D + 1)
        ot = tl.arange(0, BT)
        causal = ot[:, None] >= ot[None, :]
        if HAS_H0:
            S, z = _load_state(H0, sbase, F, D, BF, BD)
        else:
            S = tl.zeros([BF, BD], tl.float32)
            z = tl.zeros([BF], tl.float32)
        for c in range(0, tl.cdiv(L, BT)):
            rows = tl.cast(c, tl.int64) * BT + ot
            valid = rows < L
            qf = _load_tile(QF, base, rows, valid, F, BF)
            kf = _load_tile(KF, base, rows, valid, F, BF)
            v = _load_tile(V, base, rows, valid, D, BD)
            dnum, den = _dnum(DO, DEN, base, rows, valid, eps, D, BD)
            # dq_feat = dqf_num + dden * dqf_den, the parts through the numerator and the normaliser.
            dqf_num = tl.dot(tl.where(causal, tl.dot(dnum, tl.trans(v)), 0.0), kf) + tl.dot(dnum, tl.trans(S))
            dqf_den = tl.dot(tl.where(causal, 1.0, 0.0), kf) + z[None, :]
            dden = _dden(tl.sum(qf * dqf_num, 1), den, eps)
            _store_tile(DQF, base, rows, valid, dqf_num + dden[:, None] * dqf_den, F, BF)
            tl.store(DDEN + base + rows, dden, mask=valid)
            S += tl.dot(tl.trans(kf), v)
            z += tl.sum(kf, 0)

    @triton.jit
    def _linear_bwd_dkv_kernel(
        QF, KF, V, DO, DEN, DDEN, DKF, DV, DHT, DH0, CU, T, H, eps,
        F: tl.constexpr, D: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
        VARLEN: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n = pid // H
        h = pid % H
        bos, L, b = _seq_bounds(CU, n, T, VARLEN)
        base = (tl.cast(b, tl.int64) * H + h) * T + bos
        sbase = (tl.cast(n, tl.int64) * H + h) * F * (D + 1)
        ot = tl.arange(0, BT)
        causal_t = ot[None, :] >= ot[:, None]  # key j (row) seen by query i (column)
        if HAS_DHT:
            dS, dz = _load_state(DHT, sbase, F, D, BF, BD)
        else:
            dS = tl.zeros([BF, BD], tl.float32)
            dz = tl.zeros([BF], tl.float32)
        nc = tl.cdiv(L, BT)
        for r in range(0, nc):
            rows = (nc - 1 - tl.cast(r, tl.int64)) * BT + ot
            valid = rows < L
            qf = _load_tile(QF, base, rows, valid, F, BF)
            kf = _load_tile(KF, base, rows, valid, F, BF)
            v = _load_tile(V, base, rows, valid, D, BD)
            dnum, _ = _dnum(DO, DEN, base, rows, valid, eps, D, BD)
            dden = tl.load(DDEN + base + rows, mask=valid, other=0.0)
            At = tl.where(causal_t, tl.dot(kf, tl.trans(qf)), 0.0)
            dv = tl.dot(At, dnum) + tl.dot(kf, dS)
            dAt = tl.where(causal_t, tl.dot(v, tl.trans(dnum)) + dden[None, :], 0.0)
            dkf = tl.dot(dAt, qf) + tl.dot(v, tl.trans(dS)) + dz[None, :]
            _store_tile(DKF, base, rows, valid, dkf, F, BF)
            _store_tile(DV, base, rows, valid, dv, D, BD)
            dS += tl.dot(tl.trans(qf), dnum)
            dz += tl.sum(qf * dden[:, None], 0)
        if STORE_DH0:
            _store_state(DH0, sbase, dS, dz, F, D, BF, BD)

    # ---------------------------------------------------------------- sliding window + linear hybrid

    @triton.jit
    def _hybrid_masks(rows, cols, L, W, SINKS):
        # rows: query positions (BT,), cols: key positions (BT,); returns (softmax mask, linear mask) [i, j].
        inb = (cols >= 0) & (cols < L)
        diff = rows[:, None] - cols[None, :]
        soft = inb[None, :] & (diff >= 0) & ((diff < W) | (cols[None, :] < SINKS))
        lin = inb[None, :] & (diff >= W) & (cols[None, :] >= SINKS)
        return soft, lin

    @triton.jit
    def _hybrid_fwd_kernel(
        Q, K, V, QF, KF, GAMMA, O, DEN, MAX, ARG, CU, T, H, W, SINKS, scale, eps,
        F: tl.constexpr, D: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
        VARLEN: tl.constexpr, AFFINE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n = pid // H
        h = pid % H
        bos, L, b = _seq_bounds(CU, n, T, VARLEN)
        base = (tl.cast(b, tl.int64) * H + h) * T + bos
        g = tl.load(GAMMA + h).to(tl.float32)
        if AFFINE:
            lam = 1.0 - g
        else:
            lam = 1.0
        ot = tl.arange(0, BT)
        S = tl.zeros([BF, BD], tl.float32)
        z = tl.zeros([BF], tl.float32)
        n_win_tiles = tl.cdiv(W + BT - 1, BT)
        for qb in range(0, tl.cdiv(L, BT)):
            s0 = tl.cast(qb, tl.int64) * BT
            rows = s0 + ot
            valid = rows < L
            q = _load_tile(Q, base, rows, valid, D, BD)
            qf = _load_tile(QF, base, rows, valid, F, BF)
            m = tl.full([BT], -1.0e30, tl.float32)
            arg = tl.zeros([BT], tl.int64)
            l = tl.zeros([BT], tl.float32)
            acc = tl.zeros([BT, BD], tl.float32)
            lin_num = tl.dot(qf, S)
            lin_den = tl.sum(qf * z[None, :], 1)
            ws = s0 - W + 1
            # Sinks the window no longer covers come first, then the window span [s0 - W + 1, s0 + BT - 1].
            n_sink_only = tl.maximum(tl.minimum(ws, SINKS), 0)
            for kb in range(0, tl.cdiv(n_sink_only, BT) + n_win_tiles):
                if kb < tl.cdiv(n_sink_only, BT):
                    cols = tl.cast(kb, tl.int64) * BT + ot
                    cols = tl.where(cols < n_sink_only, cols, -1)
                else:
                    cols = ws + (tl.cast(kb, tl.int64) - tl.cdiv(n_sink_only, BT)) * BT + ot
                soft, lin = _hybrid_masks(rows, cols, L, W, SINKS)
                kin = (cols >= 0) & (cols < L)
                k = _load_tile(K, base, cols, kin, D, BD)
                v = _load_tile(V, base, cols, kin, D, BD)
                kf = _load_tile(KF, base, cols, kin, F, BF)
                s = tl.where(soft, tl.dot(q, tl.trans(k)) * scale, float("-inf"))
                tile_max = tl.max(s, 1)
                tile_arg = tl.argmax(s, 1)
                tile_col = tl.sum(tl.where(ot[None, :] == tile_arg[:, None], cols[None, :], 0), 1)
                arg = tl.where(tile_max > m, tile_col, arg)
                m_new = tl.maximum(m, tile_max)
                p = tl.exp(s - m_new[:, None])
                alpha = tl.exp(m - m_new)
                l = l * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p, v)
                m = m_new
                A = tl.where(lin, tl.dot(qf, tl.trans(kf)), 0.0)
                lin_num += tl.dot(A, v)
                lin_den += tl.sum(A, 1)
            den = g * l + lam * lin_den
            y = (g * acc + lam * lin_num) / tl.maximum(den, eps)[:, None]
            _store_tile(O, base, rows, valid, y, D, BD)
            tl.store(DEN + base + rows, den, mask=valid)
            tl.store(MAX + base + rows, m, mask=valid)
            tl.store(ARG + base + rows, arg, mask=valid)
            # Keys [s0 - W + 1, s0 + BT - W] leave the window of the next block: fold the non-sinks into S, z.
            cols = ws + ot
            kin = (cols >= SINKS) & (cols >= 0) & (cols < L)
            kf = _load_tile(KF, base, cols, kin, F, BF)
            v = _load_tile(V, base, cols, kin, D, BD)
            S += tl.dot(tl.trans(kf), v)
            z += tl.sum(kf, 0)

    @triton.jit
    def _hybrid_bwd_dq_kernel(
        Q, K, V, QF, KF, GAMMA, DO, DEN, MAX, ARG, DQ, DQF, DDEN, DG, DGAMMA, CU, T, H, W, SINKS, scale, eps,
        F: tl.constexpr, D: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
        VARLEN: tl.constexpr, AFFINE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n = pid // H
        h = pid % H
        bos, L, b = _seq_bounds(CU, n, T, VARLEN)
        base = (tl.cast(b, tl.int64) * H + h) * T + bos
        g = tl.load(GAMMA + h).to(tl.float32)
        if AFFINE:
            lam = 1.0 - g
        else:
            lam = 1.0
        ot = tl.arange(0, BT)
        od = tl.arange(0, BD)
        S = tl.zeros([BF, BD], tl.float32)
        z = tl.zeros([BF], tl.float32)
        n_win_tiles = tl.cdiv(W + BT - 1, BT)
        for qb in range(0, tl.cdiv(L, BT)):
            s0 = tl.cast(qb, tl.int64) * BT
            rows = s0 + ot
            valid = rows < L
            q = _load_tile(Q, base, rows, valid, D, BD)
            qf = _load_tile(QF, base, rows, valid, F, BF)
            m = tl.load(MAX + base + rows, mask=valid, other=0.0)
            dnum, den = _dnum(DO, DEN, base, rows, valid, eps, D, BD)
            # Every gradient is (part through the numerators) + dden * (part through the normaliser); dden is
            # only known once the row is done, so both parts are accumulated.
            dq_num = tl.zeros([BT, BD], tl.float32)
            dq_den = tl.zeros([BT, BD], tl.float32)
            soft_num = tl.zeros([BT], tl.float32)  # sum_soft P_ij dnum_i . v_j
            l = tl.zeros([BT], tl.float32)  # sum_soft P_ij
            dqf_num = tl.dot(dnum, tl.trans(S))
            dqf_den = tl.zeros([BT, BF], tl.float32) + z[None, :]
            ws = s0 - W + 1
            n_sink_only = tl.maximum(tl.minimum(ws, SINKS), 0)
            for kb in range(0, tl.cdiv(n_sink_only, BT) + n_win_tiles):
                if kb < tl.cdiv(n_sink_only, BT):
                    cols = tl.cast(kb, tl.int64) * BT + ot
                    cols = tl.where(cols < n_sink_only, cols, -1)
                else:
                    cols = ws + (tl.cast(kb, tl.int64) - tl.cdiv(n_sink_only, BT)) * BT + ot
                soft, lin = _hybrid_masks(rows, cols, L, W, SINKS)
                kin = (cols >= 0) & (cols < L)
                k = _load_tile(K, base, cols, kin, D, BD)
                v = _load_tile(V, base, cols, kin, D, BD)
                kf = _load_tile(KF, base, cols, kin, F, BF)
                p = tl.where(soft, tl.exp(tl.dot(q, tl.trans(k)) * scale - m[:, None]), 0.0)
                dnv = tl.dot(dnum, tl.trans(v))
                pd = p * dnv
                soft_num += tl.sum(pd, 1)
                l += tl.sum(p, 1)
                dq_num += tl.dot(pd, k)
                dq_den += tl.dot(p, k)
                dqf_num += tl.dot(tl.where(lin, dnv, 0.0), kf)
                dqf_den += tl.dot(tl.where(lin, 1.0, 0.0), kf)
            lin_num = tl.sum(qf * dqf_num, 1)  # dnum_i . (linear part of num_i)
            dden = _dden(g * soft_num + lam * lin_num, den, eps)
            dsoft = soft_num + dden * l  # dL/dg through the softmax part: sum_soft P_ij (dnum_i . v_j + dden_i)
            dqf_lin = dqf_num + dden[:, None] * dqf_den
            # The softmax max m_i = s_{i, argmax} is not a constant here (the linear terms are not rescaled by
            # exp(-m_i)), so the argmax key's score receives -g * dsoft_i as well.
            arg = tl.load(ARG + base + rows, mask=valid, other=0)
            k_arg = tl.load(K + (base + arg)[:, None] * D + od[None, :], mask=valid[:, None] & (od[None, :] < D), other=0.0)
            dq = (g * scale) * (dq_num + dden[:, None] * dq_den - dsoft[:, None] * k_arg.to(tl.float32))
            _store_tile(DQ, base, rows, valid, dq, D, BD)
            _store_tile(DQF, base, rows, valid, lam * dqf_lin, F, BF)
            tl.store(DDEN + base + rows, dden, mask=valid)
            tl.store(DG + base + rows, g * dsoft, mask=valid)
            if AFFINE:
                dgam = dsoft - tl.sum(qf * dqf_lin, 1)
            else:
                dgam = dsoft
            tl.store(DGAMMA + base + rows, dgam, mask=valid)
            cols = ws + ot
            kin = (cols >= SINKS) & (cols >= 0) & (cols < L)
            kf = _load_tile(KF, base, cols, kin, F, BF)
            v = _load_tile(V, base, cols, kin, D, BD)
            S += tl.dot(tl.trans(kf), v)
            z += tl.sum(kf, 0)

    @triton.jit
    def _hybrid_bwd_dkv_kernel(
        Q, K, V, QF, KF, GAMMA, DO, DEN, DDEN, MAX, ARG, DG, DK, DV, DKF, CU, T, H, W, SINKS, scale, eps,
        F: tl.constexpr, D: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
        VARLEN: tl.constexpr, AFFINE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n = pid // H
        h = pid % H
        bos, L, b = _seq_bounds(CU, n, T, VARLEN)
        base = (tl.cast(b, tl.int64) * H + h) * T + bos
        g = tl.load(GAMMA + h).to(tl.float32)
        if AFFINE:
            lam = 1.0 - g
        else:
            lam = 1.0
        ot = tl.arange(0, BT)
        # dS, dz: sum of q_feat_i (x) [dnum_i, dden_i] over the queries that see the current key block only
        # through the linear state, i.e. i >= t0 + BT + W - 1.
        dS = tl.zeros([BF, BD], tl.float32)
        dz = tl.zeros([BF], tl.float32)
        nb = tl.cdiv(L, BT)
        for r in range(0, nb):
            t0 = (nb - 1 - tl.cast(r, tl.int64)) * BT
            cols = t0 + ot
            kin = cols < L
            k = _load_tile(K, base, cols, kin, D, BD)
            v = _load_tile(V, base, cols, kin, D, BD)
            kf = _load_tile(KF, base, cols, kin, F, BF)
            not_sink = (cols >= SINKS)[:, None]
            dv = tl.where(not_sink, lam * tl.dot(kf, dS), 0.0)
            dkf = tl.where(not_sink, lam * (tl.dot(v, tl.trans(dS)) + dz[None, :]), 0.0)
            dk = tl.zeros([BT, BD], tl.float32)
            q_state = t0 + BT + W - 1
            # Sink keys stay in every later query's softmax, so their block meets every later query.
            q_end = tl.minimum(tl.where(t0 < SINKS, L, q_state), L)
            for qt in range(0, tl.cdiv(q_end - t0, BT)):
                rows = t0 + tl.cast(qt, tl.int64) * BT + ot
                valid = rows < q_end
                q = _load_tile(Q, base, rows, valid, D, BD)
                qf = _load_tile(QF, base, rows, valid, F, BF)
                m = tl.load(MAX + base + rows, mask=valid, other=0.0)
                dgi = tl.load(DG + base + rows, mask=valid, other=0.0)
                arg = tl.load(ARG + base + rows, mask=valid, other=-1)
                dnum, _ = _dnum(DO, DEN, base, rows, valid, eps, D, BD)
                dden = tl.load(DDEN + base + rows, mask=valid, other=0.0)
                # Rows of these tiles are keys j, columns are queries i.
                diff = rows[None, :] - cols[:, None]
                soft = kin[:, None] & valid[None, :] & (diff >= 0) & ((diff < W) | (cols[:, None] < SINKS))
                lin = kin[:, None] & valid[None, :] & (diff >= W) & not_sink & (rows[None, :] < q_state)
                pt = tl.where(soft, tl.exp(tl.dot(k, tl.trans(q)) * scale - m[None, :]), 0.0)
                dpv = tl.dot(v, tl.trans(dnum)) + dden[None, :]
                dv += g * tl.dot(pt, dnum)
                ds = g * pt * dpv - tl.where(arg[None, :] == cols[:, None], dgi[None, :], 0.0)
                dk += tl.dot(ds, q)
                At = tl.where(lin, tl.dot(kf, tl.trans(qf)), 0.0)
                dv += lam * tl.dot(At, dnum)
                dkf += lam * tl.dot(tl.where(lin, dpv, 0.0), qf)
            _store_tile(DK, base, cols, kin, dk * scale, D, BD)
            _store_tile(DV, base, cols, kin, dv, D, BD)
            _store_tile(DKF, base, cols, kin, dkf, F, BF)
            rows = t0 + W - 1 + ot
            valid = rows < L
            qf = _load_tile(QF, base, rows, valid, F, BF)
            dnum, _ = _dnum(DO, DEN, base, rows, valid, eps, D, BD)
            dden = tl.load(DDEN + base + rows, mask=valid, other=0.0)
            dS += tl.dot(tl.trans(qf), dnum)
            dz += tl.sum(qf * dden[:, None], 0)

    @triton.jit
    def _hybrid_decode_kernel(
        Q, QF, K, V, S0, GAMMA, KL, VL, O, S1, H, L, NL, scale, eps,
        F: tl.constexpr, D: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr,
        HAS_STATE: tl.constexpr, AFFINE: tl.constexpr, STORE_STATE: tl.constexpr,
    ):
        pid = tl.cast(tl.program_id(0), tl.int64)
        h = pid % H
        of = tl.arange(0, BF)
        od = tl.arange(0, BD)
        ol = tl.arange(0, BL)
        mf = of < F
        md = od < D
        g = tl.load(GAMMA + h).to(tl.float32)
        if AFFINE:
            lam = 1.0 - g
        else:
            lam = 1.0
        q = tl.load(Q + pid * D + od, mask=md, other=0.0).to(tl.float32)
        qf = tl.load(QF + pid * F + of, mask=mf, other=0.0).to(tl.float32)
        m = tl.full([1], -1.0e30, tl.float32)
        l = tl.zeros([1], tl.float32)
        acc = tl.zeros([BD], tl.float32)
        for c in range(0, tl.cdiv(L, BL)):
            cols = tl.cast(c, tl.int64) * BL + ol
            kin = cols < L
            k = _load_tile(K, pid * L, cols, kin, D, BD)
            v = _load_tile(V, pid * L, cols, kin, D, BD)
            s = tl.where(kin, tl.sum(k * q[None, :], 1) * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 0))
            p = tl.exp(s - m_new)
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            m = m_new
        num = g * acc
        den = g * l
        sbase = pid * F * (D + 1)
        if HAS_STATE:
            S, z = _load_state(S0, sbase, F, D, BF, BD)
            num += lam * tl.sum(qf[:, None] * S, 0)
            den += lam * tl.sum(qf * z, 0)
        else:
            S = tl.zeros([BF, BD], tl.float32)
            z = tl.zeros([BF], tl.float32)
        tl.store(O + pid * D + od, (num / tl.maximum(den, eps)).to(O.dtype.element_ty), mask=md)
        if STORE_STATE:
            for c in range(0, tl.cdiv(NL, BL)):
                cols = tl.cast(c, tl.int64) * BL + ol
                kin = cols < NL
                kf = _load_tile(KL, pid * NL, cols, kin, F, BF)
                v = _load_tile(VL, pid * NL, cols, kin, D, BD)
                S += tl.dot(tl.trans(kf), v)
                z += tl.sum(kf, 0)
            _store_state(S1, sbase, S, z, F, D, BF, BD)

    # ---------------------------------------------------------------- Hedgehog feature map

    @triton.jit
    def _hedgehog_softmaxes(X, W, B_, base, rows, valid, h, D: tl.constexpr, FH: tl.constexpr,
                            BD: tl.constexpr, BFH: tl.constexpr):
        # z = x W_h + b_h for a block of rows, then softmax(z) and softmax(-z) over the f features.
        od = tl.arange(0, BD)
        of = tl.arange(0, BFH)
        mf = of < FH
        x = _load_tile(X, base, rows, valid, D, BD)
        w = tl.load(
            W + tl.cast(h, tl.int64) * D * FH + od[:, None] * FH + of[None, :],
            mask=(od[:, None] < D) & mf[None, :],
            other=0.0,
        ).to(tl.float32)
        b = tl.load(B_ + tl.cast(h, tl.int64) * FH + of, mask=mf, other=0.0).to(tl.float32)
        z = tl.dot(x, w) + b[None, :]
        zp = tl.where(mf[None, :], z, float("-inf"))
        zn = tl.where(mf[None, :], -z, float("-inf"))
        ep = tl.exp(zp - tl.max(zp, 1)[:, None])
        en = tl.exp(zn - tl.max(zn, 1)[:, None])
        return x, w, ep / tl.sum(ep, 1)[:, None], en / tl.sum(en, 1)[:, None]

    @triton.jit
    def _hedgehog_fwd_kernel(
        X, W, B_, PHI, T, H, eps,
        D: tl.constexpr, FH: tl.constexpr, BD: tl.constexpr, BFH: tl.constexpr, BT: tl.constexpr,
    ):
        pid = tl.cast(tl.program_id(0), tl.int64)
        h = pid % H
        rows = tl.cast(tl.program_id(1), tl.int64) * BT + tl.arange(0, BT)
        valid = rows < T
        base = pid * T
        _, _, pp, pn = _hedgehog_softmaxes(X, W, B_, base, rows, valid, h, D, FH, BD, BFH)
        of = tl.arange(0, BFH)
        out = PHI + (base + rows)[:, None] * (2 * FH) + of[None, :]
        mask = valid[:, None] & (of[None, :] < FH)
        tl.store(out, tl.maximum(pp, eps).to(PHI.dtype.element_ty), mask=mask)
        tl.store(out + FH, tl.maximum(pn, eps).to(PHI.dtype.element_ty), mask=mask)

    @triton.jit
    def _hedgehog_bwd_kernel(
        X, W, B_, DPHI, DX, DW, DB, T, H, SPLITS, eps,
        D: tl.constexpr, FH: tl.constexpr, BD: tl.constexpr, BFH: tl.constexpr, BT: tl.constexpr,
    ):
        # Program (b*H + h, s) handles row blocks s, s + SPLITS, ... and writes its partial dW_h, db_h.
        pid = tl.cast(tl.program_id(0), tl.int64)
        split = tl.cast(tl.program_id(1), tl.int64)
        h = pid % H
        base = pid * T
        od = tl.arange(0, BD)
        of = tl.arange(0, BFH)
        mf = of < FH
        dw = tl.zeros([BD, BFH], tl.float32)
        db = tl.zeros([BFH], tl.float32)
        for i in range(0, tl.cdiv(tl.cdiv(T, BT) - split, SPLITS)):
            rows = (split + tl.cast(i, tl.int64) * SPLITS) * BT + tl.arange(0, BT)
            valid = rows < T
            x, w, pp, pn = _hedgehog_softmaxes(X, W, B_, base, rows, valid, h, D, FH, BD, BFH)
            gp_ptr = DPHI + (base + rows)[:, None] * (2 * FH) + of[None, :]
            mask = valid[:, None] & mf[None, :]
            # clamp_min(eps) passes the gradient only where the softmax reached eps.
            gp = tl.where(pp >= eps, tl.load(gp_ptr, mask=mask, other=0.0).to(tl.float32), 0.0)
            gn = tl.where(pn >= eps, tl.load(gp_ptr + FH, mask=mask, other=0.0).to(tl.float32), 0.0)
            dz = pp * (gp - tl.sum(gp * pp, 1)[:, None]) - pn * (gn - tl.sum(gn * pn, 1)[:, None])
            _store_tile(DX, base, rows, valid, tl.dot(dz, tl.trans(w)), D, BD)
            dw += tl.dot(tl.trans(x), dz)
            db += tl.sum(dz, 0)
        pbase = (tl.cast(pid // H, tl.int64) * SPLITS + split) * H + h
        tl.store(DW + pbase * D * FH + od[:, None] * FH + of[None, :], dw, mask=(od[:, None] < D) & mf[None, :])
        tl.store(DB + pbase * FH + of, db, mask=mf)


def _require_triton():
    if not HAS_TRITON:
        raise RuntimeError("the Triton backend needs `triton` (pip install triton); use backend='reference'")


def _layout(q_feat: torch.Tensor, cu_seqlens: torch.Tensor | None):
    """Returns (number of sequences N, cu_seqlens or a dummy pointer, varlen flag)."""
    B = q_feat.shape[0]
    if cu_seqlens is None:
        return B, q_feat, False
    if B != 1:
        raise ValueError(f"cu_seqlens needs the packed layout with batch size 1, got batch size {B}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor of N + 1 cumulative sequence offsets")
    if int(cu_seqlens[-1]) != q_feat.shape[2]:
        raise ValueError(f"cu_seqlens[-1]={int(cu_seqlens[-1])} must equal the packed length {q_feat.shape[2]}")
    return cu_seqlens.numel() - 1, cu_seqlens.to(device=q_feat.device).contiguous(), True


class _LinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_feat, k_feat, v, initial_state, cu_seqlens, output_final_state, eps):
        q_feat, k_feat, v = (x.contiguous() for x in (q_feat, k_feat, v))
        B, H, T, F = q_feat.shape
        D = v.shape[-1]
        N, cu, varlen = _layout(q_feat, cu_seqlens)
        h0 = None if initial_state is None else initial_state.float().contiguous()
        o = torch.empty_like(v)
        den = torch.empty(B, H, T, device=v.device, dtype=torch.float32)
        ht = torch.empty(N, H, F, D + 1, device=v.device, dtype=torch.float32) if output_final_state else None
        consts = dict(F=F, D=D, BF=_pow2(F), BD=_pow2(D), BT=_block_t(F, D), VARLEN=varlen, num_warps=_warps(F, D))
        _linear_fwd_kernel[(N * H,)](
            q_feat, k_feat, v, o, den, h0 if h0 is not None else den, ht if ht is not None else den, cu, T, H, eps,
            HAS_H0=h0 is not None, STORE_HT=ht is not None, **consts,
        )
        ctx.save_for_backward(q_feat, k_feat, v, den, h0, cu_seqlens)
        ctx.meta = (N, consts, eps, None if initial_state is None else initial_state.dtype)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q_feat, k_feat, v, den, h0, cu_seqlens = ctx.saved_tensors
        N, consts, eps, h0_dtype = ctx.meta
        B, H, T, F = q_feat.shape
        _, cu, _ = _layout(q_feat, cu_seqlens)
        do = do.contiguous()
        dqf, dkf, dv = torch.empty_like(q_feat), torch.empty_like(k_feat), torch.empty_like(v)
        dden = torch.empty_like(den)
        dh0 = torch.empty_like(h0) if h0 is not None and ctx.needs_input_grad[3] else None
        dht = None if dht is None else dht.float().contiguous()
        _linear_bwd_dq_kernel[(N * H,)](
            q_feat, k_feat, v, do, den, dqf, dden, h0 if h0 is not None else den, cu, T, H, eps,
            HAS_H0=h0 is not None, **consts,
        )
        _linear_bwd_dkv_kernel[(N * H,)](
            q_feat, k_feat, v, do, den, dden, dkf, dv, dht if dht is not None else den, dh0 if dh0 is not None else den,
            cu, T, H, eps, HAS_DHT=dht is not None, STORE_DH0=dh0 is not None, **consts,
        )
        if dh0 is not None:
            dh0 = dh0.to(h0_dtype)
        return dqf, dkf, dv, dh0, None, None, None


def triton_linear_attention(
    q_feat, k_feat, v, initial_state=None, output_final_state=False, *, cu_seqlens=None, eps: float = 1e-6
):
    """Causal linear attention with the fused kernels; returns ``(output, final_state or None)``."""
    _require_triton()
    return _LinearAttention.apply(q_feat, k_feat, v, initial_state, cu_seqlens, output_final_state, eps)


class _HybridAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_feat, k_feat, gamma, cu_seqlens, window, sinks, scale, affine, eps):
        q, k, v, q_feat, k_feat = (x.contiguous() for x in (q, k, v, q_feat, k_feat))
        gamma_c = gamma.contiguous()
        B, H, T, D = q.shape
        F = q_feat.shape[-1]
        N, cu, varlen = _layout(q_feat, cu_seqlens)
        o = torch.empty_like(v)
        den = torch.empty(B, H, T, device=v.device, dtype=torch.float32)
        mx = torch.empty_like(den)
        arg = torch.empty(B, H, T, device=v.device, dtype=torch.int64)
        consts = dict(
            F=F, D=D, BF=_pow2(F), BD=_pow2(D), BT=_block_t(F, D), VARLEN=varlen, AFFINE=bool(affine),
            num_warps=_warps(F, D),
        )
        scalars = (T, H, int(window), int(sinks), float(scale), float(eps))
        _hybrid_fwd_kernel[(N * H,)](q, k, v, q_feat, k_feat, gamma_c, o, den, mx, arg, cu, *scalars, **consts)
        ctx.save_for_backward(q, k, v, q_feat, k_feat, gamma_c, den, mx, arg, cu_seqlens)
        ctx.meta = (N, consts, scalars)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, q_feat, k_feat, gamma, den, mx, arg, cu_seqlens = ctx.saved_tensors
        N, consts, scalars = ctx.meta
        _, cu, _ = _layout(q_feat, cu_seqlens)
        H = q.shape[1]
        do = do.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dqf, dkf = torch.empty_like(q_feat), torch.empty_like(k_feat)
        dden, dg_row, dgamma_row = (torch.zeros_like(den) for _ in range(3))
        _hybrid_bwd_dq_kernel[(N * H,)](
            q, k, v, q_feat, k_feat, gamma, do, den, mx, arg, dq, dqf, dden, dg_row, dgamma_row, cu, *scalars, **consts
        )
        _hybrid_bwd_dkv_kernel[(N * H,)](
            q, k, v, q_feat, k_feat, gamma, do, den, dden, mx, arg, dg_row, dk, dv, dkf, cu, *scalars, **consts
        )
        dgamma = dgamma_row.sum(dim=(0, 2)).to(gamma.dtype)
        return dq, dk, dv, dqf, dkf, dgamma, None, None, None, None, None, None


def triton_hybrid_attention(
    q, k, v, q_feat, k_feat, gamma, *, window, sinks=0, scale, affine=False, eps: float = 1e-6, cu_seqlens=None
):
    """Sliding-window softmax + linear attention (one shared normaliser) with the fused kernels."""
    _require_triton()
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return _HybridAttention.apply(q, k, v, q_feat, k_feat, gamma, cu_seqlens, window, sinks, scale, affine, eps)


def triton_hybrid_decode_step(
    q, q_feat, k, v, state, gamma, *, scale, affine=False, k_feat_leaving=None, v_leaving=None, eps: float = 1e-6
):
    """One decode query over softmax keys ``k``/``v`` and the linear ``state``, then fold the leaving keys.

    A single kernel launch; inference only (no autograd). Returns ``(output, new_state)`` like the reference.
    """
    _require_triton()
    B, H, _, D = q.shape
    F = q_feat.shape[-1]
    L = k.shape[-2]
    q, q_feat, k, v = (x.contiguous() for x in (q, q_feat, k, v))
    fold = k_feat_leaving is not None and k_feat_leaving.shape[-2] > 0
    NL = k_feat_leaving.shape[-2] if fold else 0
    kl = k_feat_leaving.contiguous() if fold else q_feat
    vl = v_leaving.contiguous() if fold else v
    s0 = None if state is None else state.float().contiguous()
    o = torch.empty_like(q)
    s1 = torch.empty(B, H, F, D + 1, device=q.device, dtype=torch.float32) if fold else s0
    _hybrid_decode_kernel[(B * H,)](
        q, q_feat, k, v, s0 if s0 is not None else o, gamma.contiguous(), kl, vl, o, s1 if s1 is not None else o,
        H, L, NL, float(scale), float(eps),
        F=F, D=D, BF=_pow2(F), BD=_pow2(D), BL=_block_t(F, D),
        HAS_STATE=s0 is not None, AFFINE=bool(affine), STORE_STATE=fold, num_warps=_warps(F, D),
    )
    return o, s1


class _HedgehogFeatures(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x = x.contiguous()
        B, H, T, D = x.shape
        FH = weight.shape[-1]
        w = weight.contiguous()
        b = bias.reshape(H, FH).contiguous()
        phi = torch.empty(B, H, T, 2 * FH, device=x.device, dtype=x.dtype)
        consts = dict(D=D, FH=FH, BD=_pow2(D), BFH=_pow2(FH), BT=_block_t(FH, D))
        grid = (B * H, triton.cdiv(T, consts["BT"]))
        _hedgehog_fwd_kernel[grid](x, w, b, phi, T, H, eps, **consts)
        ctx.save_for_backward(x, w, b)
        ctx.meta = (consts, eps, weight.dtype, bias.shape, bias.dtype)
        return phi

    @staticmethod
    def backward(ctx, dphi):
        x, w, b = ctx.saved_tensors
        consts, eps, w_dtype, b_shape, b_dtype = ctx.meta
        B, H, T, D = x.shape
        FH = w.shape[-1]
        # Enough row-block splits to fill the device; each split writes one partial dW, summed here.
        splits = max(1, min(triton.cdiv(T, consts["BT"]), 64 // max(1, B * H) + 1))
        dx = torch.empty_like(x)
        dw = torch.empty(B, splits, H, D, FH, device=x.device, dtype=torch.float32)
        db = torch.empty(B, splits, H, FH, device=x.device, dtype=torch.float32)
        _hedgehog_bwd_kernel[(B * H, splits)](x, w, b, dphi.contiguous(), dx, dw, db, T, H, splits, eps, **consts)
        return dx, dw.sum(dim=(0, 1)).to(w_dtype), db.sum(dim=(0, 1)).reshape(b_shape).to(b_dtype), None


def triton_hedgehog_features(x, weight, bias, eps: float = 1e-12):
    """Fused Hedgehog feature map: per-head projection and both softmaxes in one kernel (and one backward)."""
    _require_triton()
    return _HedgehogFeatures.apply(x, weight, bias, eps)

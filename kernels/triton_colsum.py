"""Second pass: colsum_j = sum_i p_ij, attention each key receives, from the forward's final lse.

One program owns a block of keys and walks the query blocks that can see them, recomputing the
scores (one q.k product per tile, half the forward's matrix work and no P.V) and summing
p = exp2(s2 - lse2_i) down the columns in registers: no atomics, each key written once.
Under key_scale each p is multiplied by the row's ACT factor for the key's side (set or rest),
which the forward saved per row.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_forward import _floordiv, _p_from_lse


@triton.jit
def _colsum_tile(
    u, col, k, Q_bh, sqm, sqd, Lse2_bh, Coef_bh, offs_n, inset, KeyValid_b, KbKeys_b,
    Sq, Sk, OFF, window, qk_scale, cap2, bias2, uniform,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_TRUE: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KV: tl.constexpr,
    SOFTCAP: tl.constexpr, KEY_BIAS: tl.constexpr, HAS_UNIFORM: tl.constexpr, KEY_SCALE: tl.constexpr,
    PRESCALED: tl.constexpr, PREC: tl.constexpr,
):
    rows = u * BLOCK_M + tl.arange(0, BLOCK_M)
    pos_m = OFF + rows
    offs_d = tl.arange(0, HEAD_DIM)
    qp = Q_bh + rows[:, None] * sqm + offs_d[None, :] * sqd
    if MASKED:
        qmask = rows[:, None] < Sq
        if D_TRUE != HEAD_DIM:
            qmask = qmask & (offs_d[None, :] < D_TRUE)
        q = tl.load(qp, mask=qmask, other=0.0)
        lse2 = tl.load(Lse2_bh + rows, mask=rows < Sq, other=float("inf"))
    else:
        if D_TRUE != HEAD_DIM:
            q = tl.load(qp, mask=offs_d[None, :] < D_TRUE, other=0.0)
        else:
            q = tl.load(qp)
        lse2 = tl.load(Lse2_bh + rows)
    p = _p_from_lse(q, k, offs_n, lse2, Sk, KbKeys_b, qk_scale, cap2, bias2, uniform,
                    SOFTCAP, KEY_BIAS, HAS_UNIFORM, PRESCALED, PREC)
    if MASKED:
        vis = offs_n[None, :] < Sk
        if CAUSAL:
            vis = vis & (offs_n[None, :] <= pos_m[:, None])
        if HAS_WINDOW:
            dist = pos_m[:, None] - offs_n[None, :]
            if CAUSAL:
                vis = vis & (dist < window)
            else:
                vis = vis & (dist < window) & (-dist < window)
        p = tl.where(vis, p, 0.0)
    if KEY_SCALE:
        if MASKED:
            cs = tl.load(Coef_bh + 2 * rows, mask=rows < Sq, other=1.0)
            cr = tl.load(Coef_bh + 2 * rows + 1, mask=rows < Sq, other=1.0)
        else:
            cs = tl.load(Coef_bh + 2 * rows)
            cr = tl.load(Coef_bh + 2 * rows + 1)
        p = p * tl.where(inset[None, :], cs[:, None], cr[:, None])
    # Summed over rows once at the end: a per-tile column reduction would cross warps every tile.
    return col + p


@triton.jit
def _colsum_kernel(
    Q, K, Lse2, Coef, Colsum,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd,
    H, G, Sq, Sk, OFF, qk_scale, cap2, window,
    KeyValid, KsKeys, ks_bs, ks_hs, KbKeys, KbBias, HeadMask,
    HEAD_DIM: tl.constexpr, D_TRUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KV: tl.constexpr, SOFTCAP: tl.constexpr,
    KEY_BIAS: tl.constexpr, KEY_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_UNIFORM: tl.constexpr,
    PRESCALED: tl.constexpr, PREC: tl.constexpr, LEN_BUCKET,
):
    """Grid (cdiv(Sk, BLOCK_N), B * H). Lse2 [B, H, Sq] base-2 lse (+inf for rows that see nothing),
    Coef [B, H, Sq, 2] ACT factors; writes Colsum [B, H, Sk] float32 (NaN for zero-ablated heads)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    b64 = b.to(tl.int64)
    kmask = offs_n[:, None] < Sk
    if D_TRUE != HEAD_DIM:
        kmask = kmask & (offs_d[None, :] < D_TRUE)
    k = tl.load(K + b64 * skb + hk.to(tl.int64) * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=kmask, other=0.0)
    Q_bh = Q + b64 * sqb + h.to(tl.int64) * sqh
    Lse2_bh = Lse2 + pid_bh.to(tl.int64) * Sq
    Coef_bh = Coef + pid_bh.to(tl.int64) * Sq * 2
    KeyValid_b = KeyValid + b64 * Sk
    KbKeys_b = KbKeys + b64 * Sk
    inset = offs_n < 0
    if KEY_SCALE:
        inset = tl.load(KsKeys + b64 * ks_bs + h.to(tl.int64) * ks_hs + offs_n, mask=offs_n < Sk, other=0) != 0
    zero_head = False
    uniform = False
    if HAS_ZERO:
        zero_head = tl.load(HeadMask + h) != 0
    if HAS_UNIFORM:
        uniform = tl.load(HeadMask + h) != 0
    bias2 = 0.0
    if KEY_BIAS:
        bias2 = tl.load(KbBias + h).to(tl.float32) * 1.4426950408889634

    # Query rows r (position OFF + r) that can see some key in [n0, n0 + BLOCK_N).
    r_lo = 0
    if CAUSAL:
        r_lo = tl.maximum(n0 - OFF, 0)
    r_hi = Sq
    if HAS_WINDOW:
        r_hi = tl.minimum(Sq, tl.maximum(n0 + BLOCK_N - 1 + window - OFF, 0))
        if not CAUSAL:
            r_lo = tl.maximum(n0 - window + 1 - OFF, 0)
    u_lo = r_lo // BLOCK_M
    u_hi = (r_hi + BLOCK_M - 1) // BLOCK_M
    if HAS_ZERO:
        u_hi = tl.where(zero_head, u_lo, u_hi)
    # Interior query blocks: full, and every row sees every key of the block.
    u_int_lo = 0
    if CAUSAL:
        u_int_lo = tl.maximum(n0 + BLOCK_N - OFF + BLOCK_M - 1, 0) // BLOCK_M
    u_int_hi = Sq // BLOCK_M
    if n0 + BLOCK_N > Sk:
        u_int_hi = u_int_lo  # ragged key block: keep the bounds mask everywhere
    if HAS_WINDOW:
        u_int_hi = tl.minimum(u_int_hi, tl.maximum(_floordiv(window + n0 - OFF - BLOCK_M, BLOCK_M) + 1, 0))
        if not CAUSAL:
            u_int_lo = tl.maximum(u_int_lo, _floordiv(n0 + BLOCK_N - 1 - OFF - window, BLOCK_M) + 1)
    u_a = tl.minimum(tl.maximum(u_int_lo, u_lo), u_hi)
    u_b = tl.minimum(tl.maximum(u_int_hi, u_a), u_hi)

    col = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for u in range(u_lo, u_a):
        col = _colsum_tile(u, col, k, Q_bh, sqm, sqd, Lse2_bh, Coef_bh, offs_n, inset, KeyValid_b, KbKeys_b,
                           Sq, Sk, OFF, window, qk_scale, cap2, bias2, uniform,
                           BLOCK_M, BLOCK_N, HEAD_DIM, D_TRUE, True, CAUSAL, HAS_WINDOW, HAS_KV, SOFTCAP,
                           KEY_BIAS, HAS_UNIFORM, KEY_SCALE, PRESCALED, PREC)
    for u in range(u_a, u_b):
        col = _colsum_tile(u, col, k, Q_bh, sqm, sqd, Lse2_bh, Coef_bh, offs_n, inset, KeyValid_b, KbKeys_b,
                           Sq, Sk, OFF, window, qk_scale, cap2, bias2, uniform,
                           BLOCK_M, BLOCK_N, HEAD_DIM, D_TRUE, False, CAUSAL, HAS_WINDOW, HAS_KV, SOFTCAP,
                           KEY_BIAS, HAS_UNIFORM, KEY_SCALE, PRESCALED, PREC)
    for u in range(u_b, u_hi):
        col = _colsum_tile(u, col, k, Q_bh, sqm, sqd, Lse2_bh, Coef_bh, offs_n, inset, KeyValid_b, KbKeys_b,
                           Sq, Sk, OFF, window, qk_scale, cap2, bias2, uniform,
                           BLOCK_M, BLOCK_N, HEAD_DIM, D_TRUE, True, CAUSAL, HAS_WINDOW, HAS_KV, SOFTCAP,
                           KEY_BIAS, HAS_UNIFORM, KEY_SCALE, PRESCALED, PREC)
    col = tl.sum(col, 0)
    if HAS_KV:
        # A padded key receives nothing: its scores were never part of any row's softmax.
        kv = tl.load(KeyValid_b + offs_n, mask=offs_n < Sk, other=0) != 0
        col = tl.where(kv, col, 0.0)
    if HAS_ZERO:
        col = tl.where(zero_head, float("nan"), col)
    tl.store(Colsum + pid_bh.to(tl.int64) * Sk + offs_n, col, mask=offs_n < Sk)

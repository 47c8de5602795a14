"""Triton forward kernel: FlashAttention-2 online softmax that also accumulates the one-pass statistics.

Scores live in base 2 (s2 = s * log2 e) so the exponential is one `exp2`. The masses of the loop
(match, next_match on the dense path; keyset) are running sums of the same unnormalised
probabilities p = exp2(s2 - m) that feed the output, rescaled by the same alpha when the row
maximum m moves, and divided by the same normaliser l at the end; entropy uses A = sum p (s2 - m),
also rescaled. keyset_mass rides on the tensor cores: the bf16/fp16 p of P.V times a [BN, KW] tile
of key weights (column 0 the key set), so its error is that of P.V (<= 2^-9 of the mass in bf16).
Masses that touch one or two key tiles per row block (sink_mass, offset_mass) are recomputed in the
epilogue from q, their keys and the final lse, so the loop carries no code for them.

Under `key_scale` (ACT) every accumulator is split into the part on the key set and the rest, and the
epilogue combines them with the two factors beta and (1 - beta S)/(1 - S) that only the final S knows.
Top-k keeps raw scores (no rescaling needed) in one list, or two lists (set / rest) under key_scale.

Per-row work is cheap; per-element work is what costs. Each statistic is a constexpr flag, so a
statistic that was not requested is not compiled in. Key blocks are visited in three phases: masked
blocks on the window's left edge, interior blocks where every (row, key) pair is visible (no mask
arithmetic), masked blocks on the causal diagonal / right edge.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Token id that no real token has: marks "no previous token" for next_match.
NO_TOKEN_ID = -2147483648
NO_TOKEN = tl.constexpr(NO_TOKEN_ID)


@triton.jit
def _tanh(x):
    # tl.math has no tanh usable both by the CPU interpreter and the GPU backends; this form
    # saturates cleanly to +-1 (exp overflow gives 1 - 0, underflow gives 1 - 2).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _floordiv(x, d):
    """Floor division of a scalar that may be negative (Triton's // truncates toward zero)."""
    return tl.where(x >= 0, x // d, -((d - 1 - x) // d))


@triton.jit
def _scores(qk, offs_n, Sk, KbKeys_b, qk_scale, cap2, bias2, uniform,
            SOFTCAP: tl.constexpr, KEY_BIAS: tl.constexpr, HAS_UNIFORM: tl.constexpr,
            PRESCALED: tl.constexpr):
    """Score tile [BM, BN] after softcap, key bias and uniform masking.

    PRESCALED: in base-2 units; otherwise the raw q.k (the scale is folded into exp2's FMA later).
    """
    if SOFTCAP:
        s = _tanh(qk * qk_scale) * cap2
    elif PRESCALED:
        s = qk * qk_scale
    else:
        s = qk
    if KEY_BIAS:
        kb = tl.load(KbKeys_b + offs_n, mask=offs_n < Sk, other=0).to(tl.float32)
        s = s + kb[None, :] * bias2
    if HAS_UNIFORM:
        s = tl.where(uniform, 0.0, s)
    return s


@triton.jit
def _p_from_lse(q, k, offs_n, lse2, Sk, KbKeys_b, qk_scale, cap2, bias2, uniform,
                SOFTCAP: tl.constexpr, KEY_BIAS: tl.constexpr, HAS_UNIFORM: tl.constexpr,
                PRESCALED: tl.constexpr, PREC: tl.constexpr):
    """Final probabilities p = exp2(s2 - lse2) of the tile q k^T [BM, BN] (second passes: colsum, pairs).
    Rows with lse2 = +inf (they see nothing) get p = 0 without a branch."""
    qk = tl.dot(q, tl.trans(k), input_precision=PREC)
    s = _scores(qk, offs_n, Sk, KbKeys_b, qk_scale, cap2, bias2, uniform,
                SOFTCAP, KEY_BIAS, HAS_UNIFORM, PRESCALED)
    if PRESCALED:
        d = s - lse2[:, None]
    else:
        d = s * qk_scale - lse2[:, None]
    return tl.exp2(d)


@triton.jit
def _visible(s, offs_n, pos_m, Sk, window, KeyValid_b,
             MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KV: tl.constexpr):
    """Sets invisible (row, key) scores to -inf. Interior tiles without padding skip all of it."""
    if MASKED:
        vis = offs_n[None, :] < Sk
        if CAUSAL:
            vis = vis & (offs_n[None, :] <= pos_m[:, None])
        if HAS_WINDOW:
            if CAUSAL:
                vis = vis & (pos_m[:, None] - offs_n[None, :] < window)
            else:
                dist = pos_m[:, None] - offs_n[None, :]
                vis = vis & (dist < window) & (-dist < window)
        if HAS_KV:
            kv = tl.load(KeyValid_b + offs_n, mask=offs_n < Sk, other=0)
            vis = vis & (kv[None, :] != 0)
        s = tl.where(vis, s, float("-inf"))
    elif HAS_KV:
        kv = tl.load(KeyValid_b + offs_n)
        s = tl.where(kv[None, :] != 0, s, float("-inf"))
    return s


@triton.jit
def _first_max(x, BLOCK_N: tl.constexpr):
    """Row maximum of x [BM, BN] and the first column that holds it ([BM] each).

    A plain max, then the first column equal to it: not one (value, index) reduction
    (`tl.max(..., return_indices=True)`), which compiles to a serial compare-and-select chain
    through the row, and the exp2 of the whole tile waits for its maximum. Same result, ties to the
    first column; the forward with top-1 ran 2-11% faster (KERNEL_NOTES log 32)."""
    xmax = tl.max(x, 1)
    arg = tl.min(tl.where(x == xmax[:, None], tl.arange(0, BLOCK_N)[None, :], BLOCK_N), 1)
    return xmax, arg


@triton.jit
def _topk_insert(vals, idx, x, n0, BLOCK_N: tl.constexpr, TOPK: tl.constexpr, KPAD: tl.constexpr):
    """Merge the TOPK largest entries of the tile x [BM, BN] into the running list (vals, idx) [BM, KPAD].

    The list is unsorted; padding slots hold +inf so they are never the minimum that gets replaced.
    """
    kc = tl.arange(0, KPAD)[None, :]
    cols = tl.arange(0, BLOCK_N)[None, :]
    for _r in tl.static_range(TOPK):
        tmax, targ = _first_max(x, BLOCK_N)
        lmin, lpos = tl.min(vals, 1, return_indices=True)
        sel = (kc == lpos[:, None]) & (tmax > lmin)[:, None]
        vals = tl.where(sel, tmax[:, None], vals)
        idx = tl.where(sel, (targ + n0)[:, None], idx)
        x = tl.where(cols == targ[:, None], float("-inf"), x)
    return vals, idx


@triton.jit
def _fwd_tile(
    t, q, K_bh, V_bh, skn, skd, svn, svd,
    acc, acc_s, m_i, l_i, ls_i, ent, ents, top1, tv, ti, tvs, tis, mm, mms, nm, nms, kw, kws,
    pos_m, tok_q, KeyValid_b, Tok_b, PrevTok_b, KeyW_b, KsKeys_b, KbKeys_b,
    Sk, window, qk_scale, cap2, bias2, uniform,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_TRUE: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KV: tl.constexpr,
    SOFTCAP: tl.constexpr, KEY_BIAS: tl.constexpr, HAS_UNIFORM: tl.constexpr, KEY_SCALE: tl.constexpr,
    ENT: tl.constexpr, TOPK: tl.constexpr, KPAD: tl.constexpr, FAST_TOP1: tl.constexpr,
    MATCH: tl.constexpr, NEXT: tl.constexpr, KEYSET: tl.constexpr, KW: tl.constexpr,
    PRESCALED: tl.constexpr, PREC: tl.constexpr,
):
    """One key block t of the online-softmax loop, for output and every per-element statistic.

    sink_mass and offset_mass are not here: they touch one or two tiles per row block, and the
    epilogue recomputes them from the final lse (`_offset_prob`)."""
    n0 = t * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kp = K_bh + offs_n[:, None] * skn + offs_d[None, :] * skd
    vp = V_bh + offs_n[:, None] * svn + offs_d[None, :] * svd
    if MASKED:
        lmask = offs_n[:, None] < Sk
        if D_TRUE != HEAD_DIM:
            lmask = lmask & (offs_d[None, :] < D_TRUE)
        k = tl.load(kp, mask=lmask, other=0.0)
    elif D_TRUE != HEAD_DIM:
        lmask = offs_d[None, :] < D_TRUE
        k = tl.load(kp, mask=lmask, other=0.0)
    else:
        k = tl.load(kp)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC)
    s = _scores(qk, offs_n, Sk, KbKeys_b, qk_scale, cap2, bias2, uniform,
                SOFTCAP, KEY_BIAS, HAS_UNIFORM, PRESCALED)
    s = _visible(s, offs_n, pos_m, Sk, window, KeyValid_b, MASKED, CAUSAL, HAS_WINDOW, HAS_KV)
    # Only masked tiles (or padding) can hold a row that is all -inf: only they need the guards.

    if FAST_TOP1:
        tmax, targ = _first_max(s, BLOCK_N)
    else:
        tmax = tl.max(s, 1)
    if PRESCALED:
        m_new = tl.maximum(m_i, tmax)
    else:
        m_new = tl.maximum(m_i, tmax * qk_scale)
    if FAST_TOP1:
        # Strictly greater: the first key reaching the maximum wins, as within a tile.
        top1 = tl.where(m_new > m_i, targ + n0, top1)
    if MASKED or HAS_KV:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    if PRESCALED:
        d = s - m_use[:, None]
    else:
        d = s * qk_scale - m_use[:, None]
    p = tl.exp2(d)
    if ENT:
        # A = sum p (s2 - m): moving m to m' adds (m - m') l before the alpha rescale.
        shift = tl.where(m_i == float("-inf"), 0.0, m_i - m_use)
        if MASKED or HAS_KV:
            pd = p * tl.maximum(d, -1.0e30)  # 0 * -inf would be NaN on masked keys
        else:
            pd = p * d
    if KEY_SCALE:
        # Under ACT, l_i and ent hold the parts off the key set (the epilogue adds the set parts):
        # the rest mass 1 - S then needs no subtraction, which lost precision when S was near 1.
        inset = tl.load(KsKeys_b + offs_n, mask=offs_n < Sk, other=0) != 0
        p_set = tl.where(inset[None, :], p, 0.0)
        p_rest = tl.where(inset[None, :], 0.0, p)
        if ENT:
            ents = alpha * (ents + shift * ls_i) + tl.sum(tl.where(inset[None, :], pd, 0.0), 1)
            ent = alpha * (ent + shift * l_i) + tl.sum(tl.where(inset[None, :], 0.0, pd), 1)
        ls_i = ls_i * alpha + tl.sum(p_set, 1)
        l_i = l_i * alpha + tl.sum(p_rest, 1)
    else:
        if ENT:
            ent = alpha * (ent + shift * l_i) + tl.sum(pd, 1)
        l_i = l_i * alpha + tl.sum(p, 1)

    if D_TRUE != HEAD_DIM:
        vmask = offs_d[None, :] < D_TRUE
        if MASKED:
            vmask = vmask & (offs_n[:, None] < Sk)
        v = tl.load(vp, mask=vmask, other=0.0)
    elif MASKED:
        v = tl.load(vp, mask=offs_n[:, None] < Sk, other=0.0)
    else:
        v = tl.load(vp)
    if KEYSET and KW >= 16:
        # Key weights [BN, KW] (column 0: the key set) times the same rounded p as P.V, on the
        # tensor cores: no per-element work, the rescale is KW columns per row.
        wp = KeyW_b + offs_n[:, None] * KW + tl.arange(0, KW)[None, :]
        if MASKED:
            w = tl.load(wp, mask=offs_n[:, None] < Sk, other=0.0)
        else:
            w = tl.load(wp)
    if KEY_SCALE:
        pr = p_rest.to(v.dtype)
        ps = p_set.to(v.dtype)
        acc = tl.dot(pr, v, acc * alpha[:, None], input_precision=PREC)
        acc_s = tl.dot(ps, v, acc_s * alpha[:, None], input_precision=PREC)
        if KEYSET and KW >= 16:
            kw = tl.dot(pr, w, kw * alpha[:, None], input_precision=PREC)
            kws = tl.dot(ps, w, kws * alpha[:, None], input_precision=PREC)
    else:
        pv = p.to(v.dtype)
        acc = tl.dot(pv, v, acc * alpha[:, None], input_precision=PREC)
        if KEYSET and KW >= 16:
            kw = tl.dot(pv, w, kw * alpha[:, None], input_precision=PREC)
    if KEYSET and KW < 16:
        # Per-element alternative (KW < 16): float32 weights [Sk], fp32 p, into column 0.
        if MASKED:
            w1 = tl.load(KeyW_b + offs_n, mask=offs_n < Sk, other=0.0)
        else:
            w1 = tl.load(KeyW_b + offs_n)
        col0 = tl.arange(0, KW)[None, :] == 0
        if KEY_SCALE:
            kw = kw * alpha[:, None] + tl.where(col0, tl.sum(p_rest * w1[None, :], 1)[:, None], 0.0)
            kws = kws * alpha[:, None] + tl.where(col0, tl.sum(p_set * w1[None, :], 1)[:, None], 0.0)
        else:
            kw = kw * alpha[:, None] + tl.where(col0, tl.sum(p * w1[None, :], 1)[:, None], 0.0)

    if TOPK > 0 and not FAST_TOP1:
        if KEY_SCALE:
            tvs, tis = _topk_insert(tvs, tis, tl.where(inset[None, :], s, float("-inf")), n0,
                                    BLOCK_N, TOPK, KPAD)
            tv, ti = _topk_insert(tv, ti, tl.where(inset[None, :], float("-inf"), s), n0,
                                  BLOCK_N, TOPK, KPAD)
        else:
            tv, ti = _topk_insert(tv, ti, s, n0, BLOCK_N, TOPK, KPAD)

    if MATCH:
        if MASKED:
            tk = tl.load(Tok_b + offs_n, mask=offs_n < Sk, other=NO_TOKEN)
        else:
            tk = tl.load(Tok_b + offs_n)
        eq = tok_q[:, None] == tk[None, :]
        if MASKED or not CAUSAL:
            eq = eq & (offs_n[None, :] < pos_m[:, None])
        if KEY_SCALE:
            mm = mm * alpha + tl.sum(tl.where(eq, p_rest, 0.0), 1)
            mms = mms * alpha + tl.sum(tl.where(eq, p_set, 0.0), 1)
        else:
            mm = mm * alpha + tl.sum(tl.where(eq, p, 0.0), 1)
    if NEXT:
        # PrevTok[j] = tok[j - 1], or NO_TOKEN where key j - 1 is padding or absent (built on the host).
        if MASKED:
            tp = tl.load(PrevTok_b + offs_n, mask=offs_n < Sk, other=NO_TOKEN)
        else:
            tp = tl.load(PrevTok_b + offs_n)
        eqn = tok_q[:, None] == tp[None, :]
        if not CAUSAL:
            eqn = eqn & (offs_n[None, :] <= pos_m[:, None])
        if KEY_SCALE:
            nm = nm * alpha + tl.sum(tl.where(eqn, p_rest, 0.0), 1)
            nms = nms * alpha + tl.sum(tl.where(eqn, p_set, 0.0), 1)
        else:
            nm = nm * alpha + tl.sum(tl.where(eqn, p, 0.0), 1)
    return (acc, acc_s, m_new, l_i, ls_i, ent, ents, top1, tv, ti, tvs, tis, mm, mms, nm, nms, kw, kws)


@triton.jit
def _key_visible(j, pos_m, Sk, window, KeyValid_b, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 HAS_KV: tl.constexpr):
    """[BM] bool: row pos_m may see key j (both [BM])."""
    ok = (j >= 0) & (j < Sk)
    if CAUSAL:
        ok = ok & (j <= pos_m)
    if HAS_WINDOW:
        if CAUSAL:
            ok = ok & (pos_m - j < window)
        else:
            ok = ok & (pos_m - j < window) & (j - pos_m < window)
    if HAS_KV:
        ok = ok & (tl.load(KeyValid_b + j, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _offset_prob(Q_rows, sqd, row_ok, K_bh, skn, skd, j, pos_m, lse2, Sk, window, KeyValid_b, KbKeys_b,
                 qk_scale, cap2, bias2, uniform,
                 HEAD_DIM: tl.constexpr, D_TRUE: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 HAS_KV: tl.constexpr, SOFTCAP: tl.constexpr, KEY_BIAS: tl.constexpr,
                 HAS_UNIFORM: tl.constexpr):
    """p_{i, j_i} [BM] for one key j_i per row, recomputed from q, k_j and the final base-2 lse (one
    gathered key row per query row: the loop needs no offset code). 0 where the key is hidden.

    q is re-read from global memory (Q_rows [BM] row pointers) in 16-column chunks: keeping the
    [BM, D] q tile live through the loop for this, as a float32 product, cost the whole kernel ~55
    registers and one resident program per SM."""
    ok = _key_visible(j, pos_m, Sk, window, KeyValid_b, CAUSAL, HAS_WINDOW, HAS_KV)
    qk = tl.zeros_like(lse2)
    for c in tl.static_range(HEAD_DIM // 16):
        offs_d = c * 16 + tl.arange(0, 16)
        qmask = row_ok[:, None]
        kmask = ok[:, None]
        if D_TRUE != HEAD_DIM:
            qmask = qmask & (offs_d[None, :] < D_TRUE)
            kmask = kmask & (offs_d[None, :] < D_TRUE)
        qc = tl.load(Q_rows[:, None] + offs_d[None, :] * sqd, mask=qmask, other=0.0)
        kc = tl.load(K_bh + j[:, None] * skn + offs_d[None, :] * skd, mask=kmask, other=0.0)
        qk += tl.sum(qc.to(tl.float32) * kc.to(tl.float32), 1)
    if SOFTCAP:
        s = _tanh(qk * qk_scale) * cap2
    else:
        s = qk * qk_scale
    if KEY_BIAS:
        s = s + tl.load(KbKeys_b + j, mask=ok, other=0).to(tl.float32) * bias2
    if HAS_UNIFORM:
        s = tl.where(uniform, 0.0, s)
    return tl.where(ok, tl.exp2(s - lse2), 0.0)


@triton.jit
def _mass(acc, part, cset, crest, inv_l, KEY_SCALE: tl.constexpr):
    """A running mass normalised by l. Under ACT, acc is the share off the key set and part the share
    on it (summed apart, so no subtraction cancels): beta on the set, (1 - beta S)/(1 - S) on the rest."""
    if KEY_SCALE:
        acc = cset * part + crest * acc
    return acc * inv_l


@triton.jit
def _store_row(Ptr, v, valid, zero_head, row_ok, HAS_ZERO: tl.constexpr):
    """Per-row statistic: 0 on rows that see nothing, NaN on zero-ablated heads."""
    v = tl.where(valid, v, 0.0)
    if HAS_ZERO:
        v = tl.where(zero_head, float("nan"), v)
    tl.store(Ptr, v, mask=row_ok)


@triton.jit
def _xlogx(x):
    return tl.where(x > 0, x * tl.log(tl.maximum(x, 1e-38)), tl.where(x == 0, 0.0, float("nan")))


@triton.jit
def _attn_fwd(
    Q, K, V, Out,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    H, G, Sq, Sk, OFF,
    qk_scale, cap2, window, sink_k,
    KeyValid, Tok, PrevTok, KeyW, KsKeys, ks_bs, ks_hs, KsBeta, KbKeys, KbBias, HeadMask, First, Offs,
    LseO, EntO, AmaxO, MprobO, SinkO, OffO, MatchO, NextO, KsetO, Lse2Int, CoefInt, HotIdx,
    HEAD_DIM: tl.constexpr, D_TRUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KV: tl.constexpr, SOFTCAP: tl.constexpr,
    KEY_BIAS: tl.constexpr, KEY_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_UNIFORM: tl.constexpr,
    LSE: tl.constexpr, ENT: tl.constexpr, TOPK: tl.constexpr, KPAD: tl.constexpr,
    SINK: tl.constexpr, NOFF: tl.constexpr, MATCH: tl.constexpr,
    NEXT: tl.constexpr, KEYSET: tl.constexpr, KW: tl.constexpr, SAVE_LSE: tl.constexpr, PREC: tl.constexpr,
    PRESCALED: tl.constexpr, FAST_TOP1: tl.constexpr, HOT_M: tl.constexpr, HOT_N: tl.constexpr, N_HOT: tl.constexpr,
    HEAVY: tl.constexpr, LEN_BUCKET,
):
    """Grid (cdiv(Sq, BLOCK_M), B * H). Out [B, H, Sq, D] contiguous; statistics [B, H, Sq(, n)] float32.

    Lse2Int [B, H, Sq]: base-2 lse for the colsum pass (+inf on rows that see nothing);
    CoefInt [B, H, Sq, 2]: the ACT factors (set, rest) of each row. HotIdx [B, Sq] (HOT_M / HOT_N): the
    hot-token slot of each row, -1 if none; the key weights' columns 1 .. N_HOT (match) and N_HOT + 1 ..
    2 N_HOT (next_match) hold those tokens' keys (`token_columns.py`); other rows' masses are written 0
    for the pair pass to add to. KsKeys: ACT's key set, sequence b's
    (head h's) at KsKeys + b * ks_bs + h * ks_hs (ks_hs = 0: one set for every head).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    pos_m = OFF + rows
    row_ok = rows < Sq
    offs_d = tl.arange(0, HEAD_DIM)
    b64 = b.to(tl.int64)
    qmask = row_ok[:, None]
    if D_TRUE != HEAD_DIM:
        qmask = qmask & (offs_d[None, :] < D_TRUE)
    Q_rows = Q + b64 * sqb + h.to(tl.int64) * sqh + rows * sqm
    q = tl.load(Q_rows[:, None] + offs_d[None, :] * sqd, mask=qmask, other=0.0)
    K_bh = K + b64 * skb + hk.to(tl.int64) * skh
    V_bh = V + b64 * svb + hk.to(tl.int64) * svh
    kb_off = b64 * Sk
    KeyValid_b = KeyValid + kb_off
    Tok_b = Tok + kb_off
    PrevTok_b = PrevTok + kb_off
    if KW >= 16:
        KeyW_b = KeyW + kb_off * KW
    else:
        KeyW_b = KeyW + kb_off
    KsKeys_b = KsKeys + b64 * ks_bs + h.to(tl.int64) * ks_hs
    KbKeys_b = KbKeys + kb_off

    zero_head = False
    uniform = False
    if HAS_ZERO:
        zero_head = tl.load(HeadMask + h) != 0
    if HAS_UNIFORM:
        uniform = tl.load(HeadMask + h) != 0
    bias2 = 0.0
    if KEY_BIAS:
        bias2 = tl.load(KbBias + h).to(tl.float32) * 1.4426950408889634
    first = 0
    if SINK:
        first = tl.load(First + b)
    tok_q = rows
    if MATCH or NEXT:
        tok_q = tl.load(Tok_b + pos_m, mask=row_ok, other=NO_TOKEN)

    # Key blocks this query block can see, and the interior ones that need no mask.
    pos0 = OFF + m0
    pos_last = OFF + tl.minimum(m0 + BLOCK_M, Sq) - 1
    hi = Sk
    if CAUSAL:
        hi = pos_last + 1
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(pos0 - window + 1, 0)
        if not CAUSAL:
            hi = tl.minimum(pos_last + window, Sk)
    t_lo = lo // BLOCK_N
    t_hi = (hi + BLOCK_N - 1) // BLOCK_N
    if HAS_ZERO:
        t_hi = tl.where(zero_head, t_lo, t_hi)
    t_int_hi = Sk // BLOCK_N
    if CAUSAL:
        t_int_hi = tl.minimum(t_int_hi, pos0 // BLOCK_N)  # strictly below the diagonal
    t_int_lo = 0
    if HAS_WINDOW:
        t_int_lo = (tl.maximum(pos0 + BLOCK_M - 1 - window, -1) + BLOCK_N) // BLOCK_N
        if not CAUSAL:
            t_int_hi = tl.minimum(t_int_hi, _floordiv(pos0 + window, BLOCK_N))
    t_a = tl.minimum(tl.maximum(t_int_lo, t_lo), t_hi)
    t_b = tl.minimum(tl.maximum(t_int_hi, t_a), t_hi)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    ls_i = tl.zeros([BLOCK_M], tl.float32)
    ent = tl.zeros([BLOCK_M], tl.float32)
    ents = tl.zeros([BLOCK_M], tl.float32)
    top1 = tl.full([BLOCK_M], -1, tl.int32)
    kcol = tl.arange(0, KPAD)[None, :]
    tv = tl.where(kcol < TOPK, float("-inf"), float("inf")) + tl.zeros([BLOCK_M, KPAD], tl.float32)
    ti = tl.full([BLOCK_M, KPAD], -1, tl.int32)
    tvs = tv
    tis = ti
    mm = tl.zeros([BLOCK_M], tl.float32)
    mms = tl.zeros([BLOCK_M], tl.float32)
    nm = tl.zeros([BLOCK_M], tl.float32)
    nms = tl.zeros([BLOCK_M], tl.float32)
    kw = tl.zeros([BLOCK_M, KW], tl.float32)
    kws = tl.zeros([BLOCK_M, KW], tl.float32)

    # Three phases, unrolled at compile time: window-edge blocks (masked), interior (no mask), diagonal /
    # right edge (masked).
    for phase in tl.static_range(3):
        if phase == 0:
            t0 = t_lo
            t1 = t_a
        elif phase == 1:
            t0 = t_a
            t1 = t_b
        else:
            t0 = t_b
            t1 = t_hi
        for t in range(t0, t1):
            (acc, acc_s, m_i, l_i, ls_i, ent, ents, top1, tv, ti, tvs, tis, mm, mms, nm, nms, kw, kws) = _fwd_tile(
                t, q, K_bh, V_bh, skn, skd, svn, svd,
                acc, acc_s, m_i, l_i, ls_i, ent, ents, top1, tv, ti, tvs, tis, mm, mms, nm, nms, kw, kws,
                pos_m, tok_q, KeyValid_b, Tok_b, PrevTok_b, KeyW_b, KsKeys_b, KbKeys_b,
                Sk, window, qk_scale, cap2, bias2, uniform,
                BLOCK_M, BLOCK_N, HEAD_DIM, D_TRUE, phase != 1, CAUSAL, HAS_WINDOW, HAS_KV, SOFTCAP, KEY_BIAS,
                HAS_UNIFORM, KEY_SCALE, ENT, TOPK, KPAD, FAST_TOP1, MATCH, NEXT, KEYSET, KW, PRESCALED, PREC)

    # ---- epilogue: normalise, apply ACT, write output and statistics ----
    if HAS_KV:
        q_ok = tl.load(KeyValid_b + pos_m, mask=row_ok, other=0) != 0
    else:
        q_ok = row_ok
    if KEY_SCALE:
        l_rest = l_i
        l_i = ls_i + l_rest
    valid = q_ok & (l_i > 0)
    inv_l = tl.where(valid, 1.0 / tl.where(valid, l_i, 1.0), 0.0)
    log2l = tl.log2(tl.where(valid, l_i, 1.0))
    lse2 = m_i + log2l
    if KEY_SCALE:
        beta = tl.load(KsBeta + h).to(tl.float32)
        S = ls_i * inv_l
        rest = l_rest * inv_l
        guard = rest <= 1e-6
        cset = tl.where(guard, 1.0, beta)
        crest = tl.where(guard, 1.0, 1.0 + (1.0 - beta) * S / tl.where(guard, 1.0, rest))  # (1 - beta S) / rest
        out = (acc_s * cset[:, None] + acc * crest[:, None]) * inv_l[:, None]
    else:
        cset = inv_l  # unused without ACT
        crest = inv_l
        out = acc * inv_l[:, None]
    lse2_p = tl.where(valid, lse2, float("inf"))  # p = exp2(s2 - lse2_p): 0 on rows that see nothing
    omask = row_ok[:, None]
    if D_TRUE != HEAD_DIM:
        omask = omask & (offs_d[None, :] < D_TRUE)
    o_base = (pid_bh.to(tl.int64) * Sq) * D_TRUE
    tl.store(Out + o_base + rows[:, None] * D_TRUE + offs_d[None, :], out.to(Out.dtype.element_ty), mask=omask)

    NAN = float("nan")
    srow = pid_bh.to(tl.int64) * Sq + rows
    if LSE:
        v_lse = tl.where(valid, lse2 * 0.6931471805599453, float("-inf"))
        if HAS_ZERO:
            v_lse = tl.where(zero_head, NAN, v_lse)
        tl.store(LseO + srow, v_lse, mask=row_ok)
    if SAVE_LSE:
        tl.store(Lse2Int + srow, tl.where(valid, lse2, float("inf")), mask=row_ok)
        if KEY_SCALE:
            tl.store(CoefInt + 2 * srow, cset, mask=row_ok)
            tl.store(CoefInt + 2 * srow + 1, crest, mask=row_ok)
    if ENT:
        if KEY_SCALE:
            xs = 0.6931471805599453 * (ents * inv_l - S * log2l)
            xr = 0.6931471805599453 * (ent * inv_l - rest * log2l)  # ent: the rest part under ACT
            v_ent = -(S * _xlogx(cset) + rest * _xlogx(crest)) - (cset * xs + crest * xr)
        else:
            v_ent = 0.6931471805599453 * (log2l - ent * inv_l)
        v_ent = tl.where(valid, v_ent, 0.0)
        if HAS_ZERO:
            v_ent = tl.where(zero_head, NAN, v_ent)
        tl.store(EntO + srow, v_ent, mask=row_ok)
    if TOPK > 0:
        kc = tl.arange(0, KPAD)[None, :]
        if FAST_TOP1:
            pa = tl.where(kc == 0, tl.exp2(m_i - lse2)[:, None], -1.0)
            ia = tl.where(kc == 0, top1[:, None], -1)
        else:
            if PRESCALED:
                sa = tv
            else:
                sa = tv * qk_scale
            # Listed keys only (ti >= 0) of rows that see a key: a row that sees none has lse2 = -inf
            # and exp2(-inf + inf) = NaN; an unlisted slot ranks below a listed key whose p underflows.
            listed = valid[:, None] & (kc < TOPK) & (ti >= 0)
            pa = tl.where(listed, tl.exp2(sa - lse2[:, None]), -1.0)
            ia = ti
            if KEY_SCALE:
                pa = tl.where(listed, pa * crest[:, None], -1.0)
        pb = tl.full([BLOCK_M, KPAD], -1.0, tl.float32)
        ib = ti
        if KEY_SCALE:
            if PRESCALED:
                sb = tvs
            else:
                sb = tvs * qk_scale
            pb = tl.where(valid[:, None] & (kc < TOPK) & (tis >= 0), tl.exp2(sb - lse2[:, None]) * cset[:, None], -1.0)
            ib = tis
        for r in tl.static_range(TOPK):
            va, ja = tl.max(pa, 1, return_indices=True)
            vb, jb = tl.max(pb, 1, return_indices=True)
            take_a = va >= vb
            ida = tl.sum(tl.where(kc == ja[:, None], ia, 0), 1)
            idb = tl.sum(tl.where(kc == jb[:, None], ib, 0), 1)
            pr = tl.where(take_a, va, vb)
            ix = tl.where(take_a, ida, idb)
            pa = tl.where((kc == ja[:, None]) & take_a[:, None], -1.0, pa)
            pb = tl.where((kc == jb[:, None]) & (~take_a)[:, None], -1.0, pb)
            # -1 only where the row has no further visible key (a listed key whose p underflows to 0
            # keeps its index, as in the torch path)
            ok = valid & (pr >= 0) & (ix >= 0)
            pr = tl.where(ok, pr, 0.0)
            ix = tl.where(ok, ix, -1)
            if HAS_ZERO:
                pr = tl.where(zero_head, NAN, pr)
                ix = tl.where(zero_head, -1, ix)
            tl.store(AmaxO + srow * TOPK + r, ix.to(tl.int64), mask=row_ok)
            tl.store(MprobO + srow * TOPK + r, pr, mask=row_ok)
    if SINK:
        # The first sink_k valid keys, clipped to the keys this block can see at all: one broadcast
        # key row per step (sink_k is 1 in most requests), the same recomputation as the offsets.
        sk_lo = tl.maximum(first, lo)
        sk_hi = tl.minimum(first + sink_k, hi)
        if HAS_ZERO:
            sk_hi = tl.where(zero_head, sk_lo, sk_hi)
        v = tl.zeros([BLOCK_M], tl.float32)
        for jj in range(sk_lo, sk_hi):
            j = tl.zeros([BLOCK_M], tl.int32) + jj
            pj = _offset_prob(Q_rows, sqd, row_ok, K_bh, skn, skd, j, pos_m, lse2_p, Sk, window, KeyValid_b, KbKeys_b,
                              qk_scale, cap2, bias2, uniform, HEAD_DIM, D_TRUE, CAUSAL, HAS_WINDOW, HAS_KV,
                              SOFTCAP, KEY_BIAS, HAS_UNIFORM)
            if KEY_SCALE:
                pj = pj * tl.where(tl.load(KsKeys_b + jj) != 0, cset, crest)
            v += pj
        _store_row(SinkO + srow, v, valid, zero_head, row_ok, HAS_ZERO)
    if NOFF > 0:
        for o in tl.static_range(NOFF):
            tgt = pos_m - tl.load(Offs + o)
            po = _offset_prob(Q_rows, sqd, row_ok, K_bh, skn, skd, tgt, pos_m, lse2_p, Sk, window, KeyValid_b, KbKeys_b,
                              qk_scale, cap2, bias2, uniform, HEAD_DIM, D_TRUE, CAUSAL, HAS_WINDOW, HAS_KV,
                              SOFTCAP, KEY_BIAS, HAS_UNIFORM)
            if KEY_SCALE:
                ins = tl.load(KsKeys_b + tgt, mask=row_ok & (tgt >= 0) & (tgt < Sk), other=0) != 0
                po = po * tl.where(ins, cset, crest)
            _store_row(OffO + srow * NOFF + o, po, valid, zero_head, row_ok, HAS_ZERO)
    if MATCH:
        _store_row(MatchO + srow, _mass(mm, mms, cset, crest, inv_l, KEY_SCALE), valid, zero_head, row_ok,
                   HAS_ZERO)
    if NEXT:
        _store_row(NextO + srow, _mass(nm, nms, cset, crest, inv_l, KEY_SCALE), valid, zero_head, row_ok,
                   HAS_ZERO)
    if KEYSET:
        # Column 0 of the key-weight accumulators.
        wcol = tl.arange(0, KW)[None, :] == 0
        km = tl.sum(tl.where(wcol, kw, 0.0), 1)
        kms = tl.sum(tl.where(wcol, kws, 0.0), 1)
        _store_row(KsetO + srow, _mass(km, kms, cset, crest, inv_l, KEY_SCALE), valid, zero_head, row_ok,
                   HAS_ZERO)
    if HOT_M or HOT_N:
        hot = tl.load(HotIdx + b64 * Sq + rows, mask=row_ok, other=-1)
        wc = tl.arange(0, KW)[None, :]
        if HOT_M:
            # The column counts the row's own key (its token is u), which match (j < i) leaves out: its
            # p is recomputed, as an offset's is. The column holds the bf16 p of P.V, this one is fp32:
            # the difference stays within 2^-9 of (match mass + p_ii) <= 2^-9; max() keeps it >= 0.
            p_ii = _offset_prob(Q_rows, sqd, row_ok, K_bh, skn, skd, pos_m, pos_m, lse2_p, Sk, window, KeyValid_b,
                                KbKeys_b, qk_scale, cap2, bias2, uniform, HEAD_DIM, D_TRUE, CAUSAL, HAS_WINDOW,
                                HAS_KV, SOFTCAP, KEY_BIAS, HAS_UNIFORM)
            hm = tl.maximum(tl.sum(tl.where(wc == 1 + hot[:, None], kw, 0.0), 1) * inv_l - p_ii, 0.0)
            _store_row(MatchO + srow, tl.where(hot >= 0, hm, 0.0), valid, zero_head, row_ok, HAS_ZERO)
        if HOT_N:
            hn = tl.sum(tl.where(wc == 1 + N_HOT + hot[:, None], kw, 0.0), 1)
            _store_row(NextO + srow, tl.where(hot >= 0, hn * inv_l, 0.0), valid, zero_head, row_ok, HAS_ZERO)


@triton.jit
def _match_counts(
    Tok, PrevTok, KeyValid, MatchC, NextC, Sq, Sk, OFF, window,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_KV: tl.constexpr, MATCH: tl.constexpr, NEXT: tl.constexpr,
):
    """Grid (cdiv(Sq, BLOCK_M), B). MatchC / NextC [B, Sq] float32.

    The counts depend on tokens and visibility only, not on scores: computed once per sequence
    instead of once per head, and broadcast over heads by the caller. PrevTok [B, Sk]: the token
    before each key (NO_TOKEN where none or padding), as the forward reads it.
    """
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos_m = OFF + rows
    row_ok = rows < Sq
    b64 = b.to(tl.int64)
    Tok_b = Tok + b64 * Sk
    PrevTok_b = PrevTok + b64 * Sk
    KeyValid_b = KeyValid + b64 * Sk
    tok_q = tl.load(Tok_b + pos_m, mask=row_ok, other=NO_TOKEN)
    q_ok = row_ok
    if HAS_KV:
        q_ok = q_ok & (tl.load(KeyValid_b + pos_m, mask=row_ok, other=0) != 0)
    pos0 = OFF + pid_m * BLOCK_M
    pos_last = OFF + tl.minimum(pid_m * BLOCK_M + BLOCK_M, Sq) - 1
    hi = Sk
    if CAUSAL:
        hi = pos_last + 1
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(pos0 - window + 1, 0)
        if not CAUSAL:
            hi = tl.minimum(pos_last + window, Sk)
    cm = tl.zeros([BLOCK_M], tl.float32)
    cn = tl.zeros([BLOCK_M], tl.float32)
    for t in range(lo // BLOCK_N, (hi + BLOCK_N - 1) // BLOCK_N):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        vis = (offs_n[None, :] < Sk) & q_ok[:, None]
        if CAUSAL:
            vis = vis & (offs_n[None, :] <= pos_m[:, None])
        if HAS_WINDOW:
            dist = pos_m[:, None] - offs_n[None, :]
            if CAUSAL:
                vis = vis & (dist < window)
            else:
                vis = vis & (dist < window) & (-dist < window)
        if HAS_KV:
            vis = vis & (tl.load(KeyValid_b + offs_n, mask=offs_n < Sk, other=0) != 0)[None, :]
        if MATCH:
            tk = tl.load(Tok_b + offs_n, mask=offs_n < Sk, other=NO_TOKEN)
            eq = vis & (tok_q[:, None] == tk[None, :]) & (offs_n[None, :] < pos_m[:, None])
            cm += tl.sum(eq.to(tl.float32), 1)
        if NEXT:
            tp = tl.load(PrevTok_b + offs_n, mask=offs_n < Sk, other=NO_TOKEN)
            eqn = vis & (tok_q[:, None] == tp[None, :]) & (offs_n[None, :] <= pos_m[:, None])
            cn += tl.sum(eqn.to(tl.float32), 1)
    if MATCH:
        tl.store(MatchC + b64 * Sq + rows, cm, mask=row_ok)
    if NEXT:
        tl.store(NextC + b64 * Sq + rows, cn, mask=row_ok)

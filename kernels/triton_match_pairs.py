"""match_mass / next_match_mass off the dense loop: a pass over equal-token pairs only.

On text, the pairs (i, j) with tok_j == tok_i (match) or tok_{j-1} == tok_i (next_match) are a few
percent of all pairs, yet the dense forward pays a compare + select + add on every score for each
of the two statistics. Here query rows and keys are sorted by token (per sequence) so that equal
tokens form contiguous runs; a program owns BLOCK_M sorted query rows and walks only the sorted
keys whose token lies between its first and last row's token, recomputing p = exp2(s2 - lse2_i)
from the forward's saved base-2 lse (the same recomputation as the colsum pass, ACT factors
included) and summing it where the tokens are equal and the pair is visible. Each row's pairs all
lie in its program's key range, so each row is written once, no atomics.

`attention_triton` takes this path for match / next_match on problems above
`DENSE_MATCH_MAX_SCORES` scores; below it the fixed host cost of the sorts and launches is larger
than the dense in-loop comparisons (`MATCH_PATH` forces either). Both compute the same sums of the
same probabilities. Nothing here waits for the device: the plan (two sorts and a binary-search
kernel) is queued behind the forward. The walk is bounded whatever the text: a tile visits at most Sk keys
(at most twice the dense causal score count, one repeated token: the identity order, i.e. the dense
pass); on text (Zipf ids) it is ~2% of the causal scores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_forward import NO_TOKEN_ID, _p_from_lse

_Q_SENTINEL = NO_TOKEN_ID + 1  # padded query rows: equal to no key
_Q_SENTINEL_C = tl.constexpr(_Q_SENTINEL)
NO_TOKEN_C = tl.constexpr(NO_TOKEN_ID)


@triton.jit
def _pair_walk(q, tq, pos_m, lse2, cs, cr, K_bh, skn, skd, PermK_b, TokK_b, KsKeys_b, KbKeys_b, lo, hi,
               Sk, qk_scale, cap2, bias2, uniform, window,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_TRUE: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, STRICT: tl.constexpr, SOFTCAP: tl.constexpr,
               KEY_BIAS: tl.constexpr, KEY_SCALE: tl.constexpr, HAS_UNIFORM: tl.constexpr,
               PRESCALED: tl.constexpr, PREC: tl.constexpr):
    """Walk the sorted keys lo..hi of one query tile: (sum of p over equal visible pairs, their count)."""
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([BLOCK_M], tl.float32)
    cnt = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        idx_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = idx_n < hi
        jpos = tl.load(PermK_b + idx_n, mask=n_ok, other=0).to(tl.int32)
        jpos = tl.where(n_ok, jpos, Sk)  # out of range: fails every visibility test below
        tk = tl.load(TokK_b + idx_n, mask=n_ok, other=NO_TOKEN_C)
        kmask = n_ok[:, None]
        if D_TRUE != HEAD_DIM:
            kmask = kmask & (offs_d[None, :] < D_TRUE)
        k = tl.load(K_bh + jpos[:, None] * skn + offs_d[None, :] * skd, mask=kmask, other=0.0)
        p = _p_from_lse(q, k, jpos, lse2, Sk, KbKeys_b, qk_scale, cap2, bias2, uniform,
                        SOFTCAP, KEY_BIAS, HAS_UNIFORM, PRESCALED, PREC)
        keep = tq[:, None] == tk[None, :]
        if STRICT:
            keep = keep & (jpos[None, :] < pos_m[:, None])
        else:
            keep = keep & (jpos[None, :] <= pos_m[:, None])
        if HAS_WINDOW:
            dist = pos_m[:, None] - jpos[None, :]
            keep = keep & (dist < window)
            if not CAUSAL:
                keep = keep & (-dist < window)
        if KEY_SCALE:
            inset = tl.load(KsKeys_b + jpos, mask=jpos < Sk, other=0) != 0
            p = p * tl.where(inset[None, :], cs[:, None], cr[:, None])
        acc += tl.sum(tl.where(keep, p, 0.0), 1)
        cnt += tl.sum(keep.to(tl.float32), 1)
    return acc, cnt


@triton.jit
def _pair_mass_kernel(
    Q, K, Lse2, Coef, PermQ, TokQ,
    Out1, Count1, PermK1, TokK1, KLo1, KHi1, Out2, Count2, PermK2, TokK2, KLo2, KHi2,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd,
    H, G, Sq, Sk, OFF, qk_scale, cap2, window, n_tiles,
    KbKeys, KbBias, KsKeys, ks_bs, ks_hs, HeadMask,
    HEAD_DIM: tl.constexpr, D_TRUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, MATCH: tl.constexpr, NEXT: tl.constexpr,
    SOFTCAP: tl.constexpr, KEY_BIAS: tl.constexpr, KEY_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr,
    HAS_UNIFORM: tl.constexpr, PRESCALED: tl.constexpr, PREC: tl.constexpr, ADD: tl.constexpr, LEN_BUCKET,
):
    """Grid (n_tiles, B * H). PermQ/TokQ [B, Sq]: query rows sorted by token (padded rows carry a
    sentinel); for match (set 1: strict, j < i) and next_match (set 2: j <= i) PermK/TokK [B, Sk]:
    keys sorted by the token they are compared with (tok_j, or tok_{j-1}; padding / no predecessor =
    NO_TOKEN_ID), KLo/KHi [B, n_tiles]: the sorted key range of each tile. Writes Out [B, H, Sq] =
    sum of p_ij over equal, visible pairs; head 0's programs also write Count [B, Sq], the number of
    such pairs (the same for every head). One program does both statistics: the query rows, q and
    the lse are loaded once. ADD: Out already holds the hot-token rows' masses from the forward and 0
    elsewhere (`token_columns.py`); the sums are added to it. LEN_BUCKET: autotune key only."""
    u = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    b64 = b.to(tl.int64)
    idx_m = u * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = idx_m < Sq
    rows = tl.load(PermQ + b64 * Sq + idx_m, mask=m_ok, other=0).to(tl.int32)
    tq = tl.load(TokQ + b64 * Sq + idx_m, mask=m_ok, other=_Q_SENTINEL_C)
    pos_m = OFF + rows
    offs_d = tl.arange(0, HEAD_DIM)
    qmask = m_ok[:, None]
    if D_TRUE != HEAD_DIM:
        qmask = qmask & (offs_d[None, :] < D_TRUE)
    q = tl.load(Q + b64 * sqb + h.to(tl.int64) * sqh + rows[:, None] * sqm + offs_d[None, :] * sqd,
                mask=qmask, other=0.0)
    srow = pid_bh.to(tl.int64) * Sq + rows
    lse2 = tl.load(Lse2 + srow, mask=m_ok, other=float("inf"))
    cs = lse2
    cr = lse2
    if KEY_SCALE:
        cs = tl.load(Coef + 2 * srow, mask=m_ok, other=1.0)
        cr = tl.load(Coef + 2 * srow + 1, mask=m_ok, other=1.0)
    K_bh = K + b64 * skb + hk.to(tl.int64) * skh
    KbKeys_b = KbKeys + b64 * Sk
    KsKeys_b = KsKeys + b64 * ks_bs + h.to(tl.int64) * ks_hs
    uniform = False
    if HAS_UNIFORM:
        uniform = tl.load(HeadMask + h) != 0
    bias2 = 0.0
    if KEY_BIAS:
        bias2 = tl.load(KbBias + h).to(tl.float32) * 1.4426950408889634
    zero = False
    if HAS_ZERO:
        zero = tl.load(HeadMask + h) != 0
    for which in tl.static_range(2):
        if which == 0:
            DO = MATCH
            OutP, CountP, PermK, TokK, KLo, KHi = Out1, Count1, PermK1, TokK1, KLo1, KHi1
        else:
            DO = NEXT
            OutP, CountP, PermK, TokK, KLo, KHi = Out2, Count2, PermK2, TokK2, KLo2, KHi2
        if DO:
            # match: j < i (strict); next_match: j <= i.
            acc, cnt = _pair_walk(q, tq, pos_m, lse2, cs, cr, K_bh, skn, skd, PermK + b64 * Sk, TokK + b64 * Sk,
                                  KsKeys_b, KbKeys_b, tl.load(KLo + b64 * n_tiles + u),
                                  tl.load(KHi + b64 * n_tiles + u), Sk, qk_scale, cap2, bias2, uniform, window,
                                  BLOCK_M, BLOCK_N, HEAD_DIM, D_TRUE, CAUSAL, HAS_WINDOW, which == 0, SOFTCAP,
                                  KEY_BIAS, KEY_SCALE, HAS_UNIFORM, PRESCALED, PREC)
            if ADD:
                acc += tl.load(OutP + srow, mask=m_ok, other=0.0)
            if HAS_ZERO:
                acc = tl.where(zero, float("nan"), acc)
            tl.store(OutP + srow, acc, mask=m_ok)
            if h == 0:
                tl.store(CountP + b64 * Sq + rows, cnt, mask=m_ok)


@triton.jit
def _pair_ranges_kernel(SortedQ, PermQ, SortedK, PermK, KLo, KHi, NSent, Sq, Sk, OFF, n_tiles, n_steps,
                        BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, CAUSAL: tl.constexpr):
    """Grid (cdiv(n_tiles, BLOCK_T), B): each query tile's range [KLo, KHi) of sorted keys, by two
    binary searches vectorised over BLOCK_T tiles (n_steps = bit length of Sk). Lower end: the first
    key whose token is >= the tile's first token that is not the sentinel (NSent [B]: sentinel rows,
    sorted first; a tile that starts with them would otherwise walk every key below its last token);
    upper end: the first key past (last token, last row's position) in (token, position) order (past
    the last token alone when not causal)."""
    b64 = tl.program_id(1).to(tl.int64)
    u = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    u_ok = u < n_tiles
    last = tl.minimum(u * BLOCK_M + BLOCK_M - 1, Sq - 1)
    first = tl.minimum(tl.maximum(u * BLOCK_M, tl.load(NSent + b64)), last)
    t_first = tl.load(SortedQ + b64 * Sq + first, mask=u_ok, other=0)
    t_last = tl.load(SortedQ + b64 * Sq + last, mask=u_ok, other=0)
    if CAUSAL:
        p_last = OFF + tl.load(PermQ + b64 * Sq + last, mask=u_ok, other=0).to(tl.int32)
    else:
        p_last = t_last * 0 + Sk
    lo_a = tl.zeros([BLOCK_T], tl.int32)
    hi_a = lo_a + Sk
    lo_b = lo_a
    hi_b = hi_a
    for _s in range(n_steps):
        act_a = lo_a < hi_a
        mid_a = (lo_a + hi_a) // 2
        va = tl.load(SortedK + b64 * Sk + mid_a, mask=act_a & u_ok, other=0)
        right_a = va < t_first
        lo_a = tl.where(act_a & right_a, mid_a + 1, lo_a)
        hi_a = tl.where(act_a & ~right_a, mid_a, hi_a)
        act_b = lo_b < hi_b
        mid_b = (lo_b + hi_b) // 2
        vb = tl.load(SortedK + b64 * Sk + mid_b, mask=act_b & u_ok, other=0)
        pb = tl.load(PermK + b64 * Sk + mid_b, mask=act_b & u_ok, other=0).to(tl.int32)
        right_b = (vb < t_last) | ((vb == t_last) & (pb <= p_last))
        lo_b = tl.where(act_b & right_b, mid_b + 1, lo_b)
        hi_b = tl.where(act_b & ~right_b, mid_b, hi_b)
    tl.store(KLo + b64 * n_tiles + u, lo_a, mask=u_ok)
    tl.store(KHi + b64 * n_tiles + u, tl.maximum(lo_b, lo_a), mask=u_ok)


def sort_rows(tok_q: torch.Tensor):
    """Query rows sorted by (token, position): (perm_q int64, sorted tokens) [B, Sq]. A stable sort
    on the int32 ids alone gives that order, positions being ascending already."""
    sorted_q, perm_q = torch.sort(tok_q, dim=1, stable=True)
    return perm_q, sorted_q


def pair_plan(perm_q: torch.Tensor, sorted_q: torch.Tensor, tok_k: torch.Tensor, block_m: int, causal: bool,
              sorted_keys: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Sorted keys and each query tile's key range, all on the device (no host sync).

    perm_q / sorted_q from `sort_rows` (padded rows carry _Q_SENTINEL), tok_k [B, Sk] int32; query
    row r sits at key position Sk - Sq + r. Rows and keys are in (token, position) order, so under
    causal masking a tile's range can stop at its last row's (token, position): later keys of that
    token are in every row's future, and no row of the tile holds a larger token. `sorted_keys`
    (perm_k, sorted_k): tok_k already sorted (the query sort, when queries and keys are the same
    tokens). Returns (perm_q, sorted_q, perm_k, sorted_k, k_lo, k_hi): perms int64 as torch.sort
    gives them, ranges int32 [B, n_tiles]. The walk is (k_hi - k_lo).sum() * block_m slots.
    """
    B, Sq = sorted_q.shape
    Sk = tok_k.shape[1]
    perm_k, sorted_k = sorted_keys if sorted_keys is not None else sort_rows(tok_k)
    n_tiles = triton.cdiv(Sq, block_m)
    k_lo = torch.empty(B, n_tiles, dtype=torch.int32, device=sorted_q.device)
    k_hi = torch.empty_like(k_lo)
    n_sent = (sorted_q == _Q_SENTINEL).sum(1, dtype=torch.int32)  # padded (and hot) rows, sorted first
    block_t = 64
    _pair_ranges_kernel[(triton.cdiv(n_tiles, block_t), B)](
        sorted_q, perm_q, sorted_k, perm_k, k_lo, k_hi, n_sent, Sq, Sk, Sk - Sq, n_tiles, max(1, Sk.bit_length()),
        BLOCK_M=block_m, BLOCK_T=block_t, CAUSAL=causal)
    return perm_q, sorted_q, perm_k, sorted_k, k_lo, k_hi


def query_tokens(tok: torch.Tensor, key_valid: torch.Tensor | None, Sq: int) -> torch.Tensor:
    """[B, Sq] token of each query row (position Sk - Sq + r); padded rows get a sentinel."""
    tq = tok[:, tok.shape[1] - Sq:]
    if key_valid is not None:
        tq = torch.where(key_valid[:, tok.shape[1] - Sq:].to(tq.device), tq, torch.full_like(tq, _Q_SENTINEL))
    return tq.contiguous()


def key_tokens(tok: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """[B, Sk] token compared at each key; padded keys get NO_TOKEN_ID (equal to no query)."""
    if key_valid is None:
        return tok.contiguous()
    return torch.where(key_valid.to(tok.device), tok, torch.full_like(tok, NO_TOKEN_ID)).contiguous()

"""match_mass / next_match_mass off the dense loop: a pass over equal-token pairs only.

On text, the pairs (i, j) with tok_j == tok_i (match) or tok_{j-1} == tok_i (next_match) are a few
percent of all pairs, yet the dense forward pays a compare + select + add on every score for each
of the two statistics. Here query rows and keys are sorted by token (per sequence) so that equal
tokens form contiguous runs; a program owns BLOCK_M sorted query rows and walks only the sorted
keys whose token lies between its first and last row's token, recomputing p = exp2(s2 - lse2_i)
from the forward's saved base-2 lse (the same recomputation as the colsum pass, ACT factors
included) and summing it where the tokens are equal and the pair is visible. Each row's pairs all
lie in its program's key range, so each row is written once, no atomics.

`attention_triton` takes this path when the walked tile area is small next to the dense score
count (`SPARSE_MAX_FRACTION`); repetitive inputs (one token repeated: S^2/2 pairs) keep the dense
in-kernel statistic. Both compute the same sums of the same probabilities.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_forward import NO_TOKEN_ID, _scores

# Sparse when the sorted-pair walk covers at most this fraction of the dense causal score count
# (its tiles are gathered and fully masked, so an element costs a few dense elements).
SPARSE_MAX_FRACTION = 0.125
_Q_SENTINEL = NO_TOKEN_ID + 1  # padded query rows: equal to no key
_Q_SENTINEL_C = tl.constexpr(_Q_SENTINEL)
NO_TOKEN_C = tl.constexpr(NO_TOKEN_ID)


@triton.jit
def _pair_mass_kernel(
    Q, K, Lse2, Coef, Out, Count, PermQ, TokQ, PermK, TokK, KLo, KHi,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd,
    H, G, Sq, Sk, OFF, qk_scale, cap2, window, n_tiles,
    KbKeys, KbBias, KsKeys, HeadMask,
    HEAD_DIM: tl.constexpr, D_TRUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, STRICT: tl.constexpr, SOFTCAP: tl.constexpr,
    KEY_BIAS: tl.constexpr, KEY_SCALE: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_UNIFORM: tl.constexpr,
    PRESCALED: tl.constexpr, PREC: tl.constexpr, COUNT: tl.constexpr,
):
    """Grid (n_tiles, B * H). PermQ/TokQ [B, Sq]: query rows sorted by token (padded rows carry a
    sentinel), PermK/TokK [B, Sk]: keys sorted by the token they are compared with (tok_j, or
    tok_{j-1}; padding / no predecessor = NO_TOKEN_ID); KLo/KHi [B, n_tiles]: the sorted key range
    of each tile. Writes Out [B, H, Sq] = sum of p_ij over equal, visible pairs with j < i (STRICT)
    or j <= i. COUNT: head 0's programs also write Count [B, Sq], the number of such pairs (the
    same for every head), so the pass replaces the dense token-count kernel."""
    u = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    b64 = b.to(tl.int64)
    idx_m = u * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = idx_m < Sq
    rows = tl.load(PermQ + b64 * Sq + idx_m, mask=m_ok, other=0)
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
    if KEY_SCALE:
        cs = tl.load(Coef + 2 * srow, mask=m_ok, other=1.0)
        cr = tl.load(Coef + 2 * srow + 1, mask=m_ok, other=1.0)
    K_bh = K + b64 * skb + hk.to(tl.int64) * skh
    KbKeys_b = KbKeys + b64 * Sk
    uniform = False
    if HAS_UNIFORM:
        uniform = tl.load(HeadMask + h) != 0
    bias2 = 0.0
    if KEY_BIAS:
        bias2 = tl.load(KbBias + h).to(tl.float32) * 1.4426950408889634
    lo = tl.load(KLo + b64 * n_tiles + u)
    hi = tl.load(KHi + b64 * n_tiles + u)
    acc = tl.zeros([BLOCK_M], tl.float32)
    cnt = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        idx_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = idx_n < hi
        jpos = tl.load(PermK + b64 * Sk + idx_n, mask=n_ok, other=0)
        jpos = tl.where(n_ok, jpos, Sk)  # out of range: fails every visibility test below
        tk = tl.load(TokK + b64 * Sk + idx_n, mask=n_ok, other=NO_TOKEN_C)
        kmask = n_ok[:, None]
        if D_TRUE != HEAD_DIM:
            kmask = kmask & (offs_d[None, :] < D_TRUE)
        k = tl.load(K_bh + jpos[:, None] * skn + offs_d[None, :] * skd, mask=kmask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        s = _scores(qk, jpos, Sk, KbKeys_b, qk_scale, cap2, bias2, uniform,
                    SOFTCAP, KEY_BIAS, HAS_UNIFORM, PRESCALED)
        if PRESCALED:
            d = s - lse2[:, None]
        else:
            d = s * qk_scale - lse2[:, None]
        p = tl.exp2(d)
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
            inset = tl.load(KsKeys + b64 * Sk + jpos, mask=jpos < Sk, other=0) != 0
            p = p * tl.where(inset[None, :], cs[:, None], cr[:, None])
        acc += tl.sum(tl.where(keep, p, 0.0), 1)
        if COUNT:
            cnt += tl.sum(keep.to(tl.float32), 1)
    if HAS_ZERO:
        acc = tl.where(tl.load(HeadMask + h) != 0, float("nan"), acc)
    tl.store(Out + srow, acc, mask=m_ok)
    if COUNT:
        if h == 0:
            tl.store(Count + b64 * Sq + rows, cnt, mask=m_ok)


def sort_rows(tok_q: torch.Tensor):
    """Query rows sorted by (token, position): (perm_q int64, sorted tokens) [B, Sq]. A stable sort
    on the int32 ids alone gives that order, positions being ascending already."""
    sorted_q, perm_q = torch.sort(tok_q, dim=1, stable=True)
    return perm_q, sorted_q


def pair_plan(perm_q: torch.Tensor, sorted_q: torch.Tensor, tok_k: torch.Tensor, block_m: int, causal: bool):
    """Sorted keys and each query tile's key range (no host sync: `walked` stays a tensor).

    perm_q / sorted_q from `sort_rows` (padded rows carry _Q_SENTINEL), tok_k [B, Sk] int32; query
    row r sits at key position Sk - Sq + r. Rows and keys are in (token, position) order, so under
    causal masking a tile's range can stop at its last row's (token, position): later keys of that
    token are in every row's future, and no row of the tile holds a larger token. Returns
    (perm_q, sorted_q, perm_k, sorted_k, k_lo, k_hi, walked) with int32 index tensors and walked = a
    0-d tensor, the (row, key) slots the pass visits summed over the batch.
    """
    B, Sq = sorted_q.shape
    Sk = tok_k.shape[1]
    dev = sorted_q.device
    sorted_k, perm_k = torch.sort(tok_k, dim=1, stable=True)
    ck_sorted = sorted_k.long() * (Sk + 1) + perm_k
    n_tiles = triton.cdiv(Sq, block_m)
    first = torch.arange(n_tiles, device=dev) * block_m
    last = torch.clamp(first + block_m - 1, max=Sq - 1)
    pos_last = (perm_q[:, last] + (Sk - Sq)) if causal else torch.full_like(perm_q[:, last], Sk)
    k_lo = torch.searchsorted(ck_sorted, (sorted_q[:, first].long() * (Sk + 1)).contiguous(), right=False)
    k_hi = torch.searchsorted(ck_sorted, (sorted_q[:, last].long() * (Sk + 1) + pos_last).contiguous(), right=True)
    k_hi = torch.maximum(k_hi, k_lo)
    walked = (k_hi - k_lo).sum() * block_m
    i32 = torch.int32
    return (perm_q.to(i32).contiguous(), sorted_q.contiguous(), perm_k.to(i32).contiguous(),
            sorted_k.contiguous(), k_lo.to(i32).contiguous(), k_hi.to(i32).contiguous(), walked)


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

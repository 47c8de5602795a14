"""match / next_match of each sequence's most frequent tokens on the tensor cores (host side).

The pair pass (`triton_match_pairs.py`) walks, for every query row, the keys holding its token. On
text a few frequent tokens own almost all of those pairs: with Zipf ids (the benchmark's), the 7
most frequent tokens of a sequence are ~25% of its rows and ~92-95% of its equal-token pairs, and
their rows make the pair pass's longest walks. The forward already multiplies the bf16 p of P.V by
a [BN, 16] tile of key weights when keyset_mass is asked for (column 0: the key set), and 15 of the
16 columns were zeros. Here they carry, for each of the n_hot most frequent query tokens u, the
indicator of keys whose token is u (match, columns 1..n_hot) and of keys whose previous token is u
(next_match, columns 1 + n_hot ..). A row whose token is hot reads its column in the epilogue; the
diagonal key (its own token, not a match: match wants j < i) is taken out there, its p recomputed
as an offset's is. Those rows leave the pair pass, which adds its sums for the other rows to the
forward's. Same probabilities, summed in another order; the hot rows' masses carry the key-weight
product's bf16 rounding of p (as keyset_mass does): within 2^-9 of (mass + p_ii) <= 2^-9.

Causal attention only (non-causal match keys would include later keys, which a per-key column
cannot exclude), without key_scale (ACT splits every accumulator in two). Counts of hot rows come
from prefix sums of the same columns, exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .triton_match_pairs import _Q_SENTINEL

N_HOT = 7  # hot tokens per sequence: 1 + 2 x 7 columns fit the 16-column key-weight tile


def hot_tokens(sorted_q: torch.Tensor, n_hot: int) -> torch.Tensor:
    """[B, n_hot] int32: the n_hot most frequent tokens of each sequence's query rows (from the
    rows sorted by token, `sort_rows`), ties to the smaller token; _Q_SENTINEL in slots left over
    when a sequence has fewer distinct tokens. Padded rows (the sentinel) are never hot. No host sync."""
    B, Sq = sorted_q.shape
    first = torch.searchsorted(sorted_q, sorted_q)  # start of each row's run of equal tokens
    run = torch.searchsorted(sorted_q, sorted_q, right=True) - first
    starts = (first == torch.arange(Sq, device=sorted_q.device)) & (sorted_q != _Q_SENTINEL)
    score = torch.where(starts, run, torch.zeros_like(run))
    n = min(n_hot, Sq)
    count, at = score.topk(n, dim=1)  # ties: topk's order; any choice gives the same sums
    hot = torch.where(count > 0, sorted_q.gather(1, at), torch.full_like(count, _Q_SENTINEL, dtype=torch.int32))
    return F.pad(hot.to(torch.int32), (0, n_hot - n), value=_Q_SENTINEL)


def hot_row_index(tok_q: torch.Tensor, hot: torch.Tensor) -> torch.Tensor:
    """[B, Sq] int32: the hot slot of each query row's token, -1 where it is not hot (padded rows too)."""
    eq = (tok_q[:, :, None] == hot[:, None, :]) & (hot != _Q_SENTINEL)[:, None, :]
    return torch.where(eq.any(2), eq.int().argmax(2), -1).to(torch.int32)


def fill_hot_columns(key_weights: torch.Tensor, key_tok: dict[str, torch.Tensor], hot: torch.Tensor) -> None:
    """Write the hot tokens' key columns into key_weights [B, Sk, 16] (column 0, the key set, stays):
    columns 1 .. n_hot for match (key j's token is u), n_hot + 1 .. 2 n_hot for next_match (key j's
    previous token is u). key_tok: the compared token of each key per statistic (NO_TOKEN_ID on
    padding, as `key_tokens` gives it); a statistic not in it keeps zero columns."""
    n_hot = hot.shape[1]
    for i, name in enumerate(("match_mass", "next_match_mass")):
        if name in key_tok:
            key_weights[:, :, 1 + i * n_hot:1 + (i + 1) * n_hot] = key_tok[name][:, :, None] == hot[:, None, :]


def hot_counts(key_weights: torch.Tensor, row_hot: torch.Tensor, n_hot: int, window: int | None) -> dict:
    """{"match_mass", "next_match_mass"}: [B, Sq] float32 visible keys in each hot row's column (j < i
    for match, j <= i for next_match, within the causal window), 0 on rows that are not hot; query
    row i sits at position Sk - Sq + i. One prefix sum over the columns of `fill_hot_columns`
    (padded keys are already 0 there; float32 sums of 0 / 1 are exact up to 2^24 keys)."""
    B, Sk = key_weights.shape[:2]
    Sq = row_hot.shape[1]
    pre = F.pad(key_weights[:, :, 1:1 + 2 * n_hot].float().cumsum(1), (0, 0, 1, 0))  # pre[:, j]: keys < j
    pos = torch.arange(Sk - Sq, Sk, device=pre.device)
    lo = (pos - window + 1).clamp(min=0) if window is not None else torch.zeros_like(pos)

    def rows(j):
        return pre.gather(1, j.view(1, Sq, 1).expand(B, Sq, 2 * n_hot))

    u = row_hot.clamp(min=0).long()[:, :, None]
    before = rows(lo)
    is_hot = row_hot >= 0
    match = (rows(pos) - before).gather(2, u)[:, :, 0]
    nxt = (rows(pos + 1) - before).gather(2, u + n_hot)[:, :, 0]
    return {"match_mass": torch.where(is_hot, match, 0.0), "next_match_mass": torch.where(is_hot, nxt, 0.0)}

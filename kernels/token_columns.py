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


def hot_key_columns(key_tok: torch.Tensor, hot: torch.Tensor) -> torch.Tensor:
    """[B, Sk, n_hot] bool: key j's compared token (tok_j for match, tok_{j-1} for next_match, with
    NO_TOKEN_ID on padding, as `key_tokens` gives it) equals hot token u."""
    return key_tok[:, :, None] == hot[:, None, :]


def hot_counts(cols: torch.Tensor, row_hot: torch.Tensor, Sk: int, window: int | None, strict: bool) -> torch.Tensor:
    """[B, Sq] float32: visible keys j in column row_hot[i] for query row i at position Sk - Sq + i
    (j < i for match, j <= i for next_match, within the causal window); 0 on rows that are not hot.
    cols [B, Sk, n_hot] from `hot_key_columns` (padded keys are already false)."""
    B, Sq = row_hot.shape
    n_hot = cols.shape[2]
    pre = F.pad(cols.to(torch.int32).cumsum(1, dtype=torch.int32), (0, 0, 1, 0))  # pre[:, j] = sum over keys < j
    pos = torch.arange(Sk - Sq, Sk, device=cols.device)
    hi = pos if strict else pos + 1
    lo = (pos - window + 1).clamp(min=0) if window is not None else torch.zeros_like(pos)

    def at(j):
        rows = pre.gather(1, j.view(1, Sq, 1).expand(B, Sq, n_hot))
        return rows.gather(2, row_hot.clamp(min=0).long()[:, :, None])[:, :, 0]

    return torch.where(row_hot >= 0, at(hi) - at(lo), 0).float()

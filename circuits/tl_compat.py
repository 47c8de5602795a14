"""TransformerLens `detect_head` scores (TL 4.3, transformer_lens.head_detector) from attention statistics.

TL materialises each head's [S, S] pattern A and a 0/1 detection pattern D and scores
  mul: sum(A' * D) / sum(A')           abs: 1 - round(sum|A - D|' / S, 3)
where ' means column 0 (exclude_bos) and/or the diagonal (exclude_current_token) zeroed, per
prompt; a list of prompts gets the mean of the per-prompt scores. D (lower triangular):
  previous_token_head:  D[i, i-1] = 1
  duplicate_token_head: D[i, j] = 1 for j < i with t_j == t_i            -> match_mass / match_count
  induction_head:       D[i, j] = 1 for 1 <= j <= i with t_{j-1} == t_i  -> next_match_mass / count
Because D is 0/1, sum|A - D| = sum A + #ones(D) - 2 sum(A * D) over the entries kept, so every
score is a closed form of per-row statistics: row sums (1), p_{i,0} (`sink_mass`, sink_k = 1),
p_{i,i} and p_{i,i-1} (`offset_mass` at offsets 0 and 1), the match masses and their counts, and
the token ids for the few entries the exclusions remove:
  exclude_bos removes p_{i,0} from every row; from D it removes (1, 0) for previous-token and
    (i, 0) with t_i == t_0 for duplicate-token (induction's D has no column 0);
  exclude_current_token removes p_{i,i}; D has diagonal entries only for induction, where
    t_{i-1} == t_i.
Row 0 (the first real token) has p_{0,0} = 1 and no D entries.

The kept row mass after exclusions is read from `content_mass` (keys that are neither column 0 nor
the query, summed directly) plus whichever of p_{i,0}, p_{i,i} is kept, never as 1 - p_{i,0} -
p_{i,i}: for heads that park nearly all their mass on BOS or themselves that difference is a few
float32 ulps of noise, and TL (which sums the kept entries of A) would disagree far beyond 1e-4.
"""

from __future__ import annotations

import torch

from headscope.kernels.stats import StatsRequest
from headscope.probe.errors import InputError, RecordingError

# The statistics every TL-compatible score needs; merge into a detector's own request.
TL_STATS = dict(sink_k=1, offsets=(0, 1), match=True, next_match=True, content=True)
TL_KINDS = {"previous_token": "previous_token", "previous_token_head": "previous_token",
            "duplicate_token": "duplicate_token", "duplicate_token_head": "duplicate_token",
            "induction": "induction", "induction_head": "induction"}


def tl_request(offsets=(), **extra) -> StatsRequest:
    """A StatsRequest with what `tl_compatible_scores` needs plus the given offsets / statistics."""
    return StatsRequest(sink_k=1, offsets=tuple(sorted({0, 1, *offsets})), match=True, next_match=True,
                        content=True, **extra)


def _offset(rec, c: int) -> torch.Tensor:
    offs = list(rec.request.offsets)
    if c not in offs:
        raise RecordingError(f"offset_mass at offset {c} was not recorded (offsets {offs}); use tl_request().")
    return rec.stat("offset_mass")[..., offs.index(c)].double()


def tl_compatible_scores(rec, kind: str, error_measure: str = "mul", exclude_bos: bool = False,
                         exclude_current_token: bool = False, per_prompt: bool = False,
                         round_abs: bool = True) -> torch.Tensor:
    """TL `detect_head(model, prompts, kind, ...)` for every head, from a Recording.

    Args:
        rec: a Recording made with `tl_request()` (needs tokens; padding must be right-sided or
            absent: TL scores each prompt at its own length, so do we).
        kind: "previous_token", "duplicate_token" or "induction" (TL's "*_head" names accepted).
        error_measure: "mul" or "abs"; abs is rounded to 3 decimals per prompt as TL does unless
            round_abs=False.
    Returns:
        [L, H] float64 mean over prompts, or [B, L, H] with per_prompt=True.
    """
    if kind not in TL_KINDS:
        raise InputError(f"TL-compatible scores exist for {sorted(set(TL_KINDS.values()))}, not {kind!r}.")
    if error_measure not in ("mul", "abs"):
        raise InputError(f"error_measure must be 'mul' or 'abs', got {error_measure!r}.")
    kind = TL_KINDS[kind]
    tok = rec.tokens
    valid = rec.attention_mask.bool()
    if tok.numel() == 0:
        raise RecordingError("the recording holds no tokens; TL-compatible scores need token ids.")
    B, S = tok.shape
    if valid.shape != (B, S) or (valid[:, 1:] & ~valid[:, :-1]).any():
        raise InputError("TL-compatible scores need unpadded or right-padded prompts.")
    n = valid.sum(1)  # [B] tokens per prompt
    pos = torch.arange(S, device=tok.device)
    later = (valid & (pos > 0))[:, None, None, :].to(torch.float64)  # real rows after the first
    first = (pos == 0)[None, None, None, :].to(torch.float64)
    p0 = rec.stat("sink_mass").double()
    diag = _offset(rec, 0)
    bos, cur = float(exclude_bos), float(exclude_current_token)

    if exclude_bos or exclude_current_token:
        kept = rec.stat("content_mass").double() + (1 - bos) * p0 + (1 - cur) * diag
    else:
        kept = torch.ones_like(p0)
    row_sum = later * kept + first * float(not (exclude_bos or exclude_current_token))
    den = row_sum.sum(-1)

    if kind == "previous_token":
        prev = _offset(rec, 1)
        num = (later * prev).sum(-1) - bos * prev[..., 1] * (n >= 2)[:, None, None]
        ones = ((n - 1).clamp_min(0) - bos * (n >= 2)).to(torch.float64)[:, None, None]
    elif kind == "duplicate_token":
        same_first = (valid & (pos > 0) & (tok == tok[:, :1]))[:, None, None, :].to(torch.float64)
        num = (later * rec.stat("match_mass").double()).sum(-1) - bos * (same_first * p0).sum(-1)
        ones = (later * rec.stat("match_count").double()).sum(-1) - bos * same_first.sum(-1)
    else:
        rep = torch.zeros_like(valid)
        rep[:, 1:] = valid[:, 1:] & (tok[:, 1:] == tok[:, :-1])
        rep = rep[:, None, None, :].to(torch.float64)
        num = (later * rec.stat("next_match_mass").double()).sum(-1) - cur * (rep * diag).sum(-1)
        ones = (later * rec.stat("next_match_count").double()).sum(-1) - cur * rep.sum(-1)

    if error_measure == "mul":
        score = num / den
    else:
        dist = (den + ones - 2 * num) / n[:, None, None].to(torch.float64)
        score = 1 - (torch.round(dist, decimals=3) if round_abs else dist)
    return score if per_prompt else score.mean(0)

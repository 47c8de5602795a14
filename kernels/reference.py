"""Exact attention with statistics in plain torch, one chunk of query rows at a time.

This is the CPU path of `headscope.kernels.attention` and the reference the Triton kernel is
tested against. Each chunk of C query rows materialises its full score rows [B, H, C, K] (K = the
keys that chunk can see), so every statistic is computed from the exact softmax, in float32, with
memory O(B * H * C * Sk) instead of O(B * H * Sq * Sk).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .edits import SCALE_GUARD, KeyBias, KeyScale
from .stats import StatsRequest

# Elements of one [B, H, C, K] float32 score block; chunk size is chosen to stay near this.
_BLOCK_ELEMENTS = 1 << 22


def visible_keys(Sq: int, Sk: int, key_valid: torch.Tensor, q_rows: torch.Tensor, k_lo: int, k_hi: int,
                 causal: bool, window: int | None) -> torch.Tensor:
    """Bool [B, C, K]: which keys k_lo..k_hi-1 each query row (absolute position q_rows) may see."""
    i = q_rows[:, None]
    j = torch.arange(k_lo, k_hi, device=key_valid.device)[None, :]
    ok = torch.ones(i.shape[0], j.shape[1], dtype=torch.bool, device=key_valid.device)
    if causal:
        ok &= j <= i
    if window is not None:
        ok &= (i - j < window) if causal else ((i - j).abs() < window)
    q_valid = key_valid[:, q_rows]  # a padded query sees nothing
    return ok[None] & key_valid[:, None, k_lo:k_hi] & q_valid[:, :, None]


def key_range(c0: int, c1: int, Sq: int, Sk: int, causal: bool, window: int | None) -> tuple[int, int]:
    """Keys [lo, hi) that query rows c0..c1-1 can possibly see (skips fully masked key blocks)."""
    off = Sk - Sq
    hi = min(Sk, off + c1) if causal else Sk
    lo = 0
    if window is not None:
        lo = max(0, off + c0 - window + 1)
    return lo, hi


def first_valid_key(key_valid: torch.Tensor) -> torch.Tensor:
    """[B] index of the first non-padded key (0 when there is none)."""
    return key_valid.int().argmax(dim=1)


def _apply_key_scale(p: torch.Tensor, keys: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """ACT arithmetic on probabilities p [B, H, C, K] with key set keys [B, K] (or per head
    [B, H, K]) and beta [H]."""
    ks = (keys[:, None, None, :] if keys.dim() == 2 else keys[:, :, None, :]).to(p.dtype)
    S = (p * ks).sum(-1, keepdim=True)
    b = beta.to(p.dtype)[None, :, None, None]
    rest = 1.0 - S
    guard = rest <= SCALE_GUARD
    factor = torch.where(guard, torch.ones_like(S), (1.0 - b * S) / torch.where(guard, torch.ones_like(rest), rest))
    scale_set = torch.where(guard, torch.ones_like(S), b)
    return torch.where(ks.bool(), p * scale_set, p * factor)


def _masked_softmax_(s: torch.Tensor, vis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of scores s [B, H, C, K] over visible keys, computed in place in s (one exp pass:
    the CPU path's time goes into full passes over the score block). Returns (p, lse [B, H, C]);
    rows with no visible key get p = 0 and lse = -inf."""
    if s.requires_grad:
        # autograd (head importance, pruning) needs exp's output unmodified: the out-of-place path
        s = s.masked_fill(~vis, -math.inf)
        lse = torch.logsumexp(s, dim=-1)
        return torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None]).masked_fill(~vis, 0.0), lse
    # an additive 0 / -inf mask: same result as masked_fill, but masked_fill with a mask broadcast
    # over heads costs about 10x an add on CPU
    s.add_(torch.zeros(vis.shape, dtype=s.dtype, device=s.device).masked_fill_(~vis, -math.inf))
    m = s.amax(dim=-1, keepdim=True)
    m.masked_fill_(torch.isinf(m), 0.0)
    p = s.sub_(m).exp_()
    denom = p.sum(dim=-1, keepdim=True)
    lse = (m + denom.log()).squeeze(-1)
    return p.div_(denom.clamp_min(torch.finfo(p.dtype).tiny)), lse


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    key_valid: torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None,
    keyset: torch.Tensor | None = None,
    request: StatsRequest = StatsRequest(),
    head_mask: torch.Tensor | None = None,
    head_mask_mode: str = "zero",
    key_scale: KeyScale | None = None,
    key_bias: KeyBias | None = None,
    pattern_heads: list[int] | None = None,
    chunk: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Attention output and statistics; arguments as `headscope.kernels.attention` (validated there).

    q [B, H, Sq, D], k/v [B, Hkv, Sk, D] (H a multiple of Hkv, GQA by broadcasting, no copy).
    key_valid [B, Sk] bool, token_ids [B, Sk] int, keyset [B, Sk] bool.
    pattern_heads: query heads whose full probability rows to return as stats["pattern"]
    [B, len(pattern_heads), Sq, Sk] (the caller has checked this fits in memory).
    Returns out [B, H, Sq, D] in q's dtype and float32 statistics (shapes in `stats`).
    """
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = H // Hkv
    dev = q.device
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    if key_valid is None:
        key_valid = torch.ones(B, Sk, dtype=torch.bool, device=dev)
    off = Sk - Sq
    if chunk is None:
        chunk = max(16, min(Sq, _BLOCK_ELEMENTS // max(1, B * H * Sk)))

    # float32 at least (statistics need it); float64 inputs stay float64 so exactness tests can be exact
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(work).reshape(B, Hkv, G, Sq, D)
    kf, vf = k.to(work), v.to(work)
    out = torch.zeros(B, H, Sq, vf.shape[-1], dtype=work, device=dev)
    stats = allocate_stats(request, B, H, Sq, Sk, dev)
    if pattern_heads:
        stats["pattern"] = torch.zeros(B, len(pattern_heads), Sq, Sk, dtype=torch.float32, device=dev)
    uniform = head_mask if (head_mask is not None and head_mask_mode == "uniform") else None
    first = first_valid_key(key_valid) if request.sink_k else None

    for c0 in range(0, Sq, chunk):
        c1 = min(Sq, c0 + chunk)
        lo, hi = key_range(c0, c1, Sq, Sk, causal, window)
        if hi <= lo:
            continue
        rows = torch.arange(c0, c1, device=dev) + off
        vis = visible_keys(Sq, Sk, key_valid, rows, lo, hi, causal, window)[:, None]  # [B,1,C,K]
        s = torch.einsum("bhgqd,bhkd->bhgqk", qf[..., c0:c1, :], kf[:, :, lo:hi]).reshape(B, H, c1 - c0, hi - lo)
        s.mul_(scale)
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        if key_bias is not None:
            s = s + key_bias.bias.to(work)[None, :, None, None] * key_bias.keys[:, None, None, lo:hi].to(work)
        if uniform is not None:
            s = torch.where(uniform[None, :, None, None], torch.zeros_like(s), s)
        p, lse = _masked_softmax_(s, vis)
        if key_scale is not None:
            p = _apply_key_scale(p, key_scale.keys[..., lo:hi], key_scale.beta)
        out[:, :, c0:c1] = torch.einsum("bhgqk,bhkd->bhgqd", p.reshape(B, Hkv, G, c1 - c0, hi - lo),
                                        vf[:, :, lo:hi]).reshape(B, H, c1 - c0, -1)
        if pattern_heads:
            stats["pattern"][:, :, c0:c1, lo:hi] = p[:, pattern_heads]
        if request.lse:
            stats["lse"][:, :, c0:c1] = lse
        accumulate_stats(stats, request, p, vis, rows, c0, c1, lo, hi, key_valid, token_ids, keyset, first)

    if head_mask is not None and head_mask_mode == "zero":
        out[:, head_mask] = 0.0
        for name, t in stats.items():
            if name == "argmax":
                t[:, head_mask] = -1
            elif name != "pattern":
                t[:, head_mask] = math.nan
    return out.to(q.dtype), stats


def allocate_stats(request: StatsRequest, B: int, H: int, Sq: int, Sk: int, device) -> dict[str, torch.Tensor]:
    """Zero-initialised output tensors for every requested statistic (lse starts at -inf)."""
    f32 = dict(dtype=torch.float32, device=device)
    stats: dict[str, torch.Tensor] = {}
    for name in request.names():
        if name == "colsum":
            stats[name] = torch.zeros(B, H, Sk, **f32)
        elif name == "argmax":
            stats[name] = torch.full((B, H, Sq, request.topk), -1, dtype=torch.int64, device=device)
        elif name == "max_prob":
            stats[name] = torch.zeros(B, H, Sq, request.topk, **f32)
        elif name == "offset_mass":
            stats[name] = torch.zeros(B, H, Sq, len(request.offsets), **f32)
        elif name == "lse":
            stats[name] = torch.full((B, H, Sq), -math.inf, **f32)
        else:
            stats[name] = torch.zeros(B, H, Sq, **f32)
    return stats


def stats_from_probs(p: torch.Tensor, request: StatsRequest, *, causal: bool = True, window: int | None = None,
                     key_valid: torch.Tensor | None = None, token_ids: torch.Tensor | None = None,
                     keyset: torch.Tensor | None = None, scores: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Statistics of already-materialised attention probabilities p [B, H, Sq, Sk].

    For backends that expose patterns (TransformerLens' hook_pattern, nnsight). `lse` needs the
    pre-softmax scores [B, H, Sq, Sk] (masked entries -inf); without them it is not produced.
    """
    B, H, Sq, Sk = p.shape
    dev = p.device
    if key_valid is None:
        key_valid = torch.ones(B, Sk, dtype=torch.bool, device=dev)
    if request.lse and scores is None:
        request = replace(request, lse=False)
    stats = allocate_stats(request, B, H, Sq, Sk, dev)
    rows = torch.arange(Sq, device=dev) + (Sk - Sq)
    vis = visible_keys(Sq, Sk, key_valid, rows, 0, Sk, causal, window)[:, None]
    p = p.float().masked_fill(~vis, 0.0)
    if request.lse:
        stats["lse"][:] = torch.logsumexp(scores.float().masked_fill(~vis, -math.inf), dim=-1)
    first = first_valid_key(key_valid) if request.sink_k else None
    accumulate_stats(stats, request, p, vis, rows, 0, Sq, 0, Sk, key_valid, token_ids, keyset, first)
    return stats


def accumulate_stats(stats: dict, request: StatsRequest, p: torch.Tensor, vis: torch.Tensor, rows: torch.Tensor,
                     c0: int, c1: int, lo: int, hi: int, key_valid: torch.Tensor, token_ids: torch.Tensor | None,
                     keyset: torch.Tensor | None, first: torch.Tensor | None) -> None:
    """Write the statistics of probability rows p [B, H, C, K] (queries c0..c1-1 at absolute
    positions `rows`, keys lo..hi-1, visibility vis [B, 1, C, K]) into the preallocated `stats`.

    Everything but lse is a function of p alone, so backends that only see materialised patterns
    (TransformerLens, nnsight) get their statistics from this same code.
    """
    B, H = p.shape[:2]
    dev = p.device
    if request.entropy:
        stats["entropy"][:, :, c0:c1] = -torch.special.xlogy(p, p).sum(-1)
    if request.topk:
        kk = min(request.topk, hi - lo)
        val, idx = p.topk(kk, dim=-1)
        idx = torch.where(val > 0, idx + lo, torch.full_like(idx, -1))
        stats["argmax"][:, :, c0:c1, :kk] = idx
        stats["max_prob"][:, :, c0:c1, :kk] = val
    if request.sink_k:
        jrel = torch.arange(lo, hi, device=dev)[None, :] - first[:, None]
        sink = (jrel >= 0) & (jrel < request.sink_k)
        stats["sink_mass"][:, :, c0:c1] = (p * sink[:, None, None, :]).sum(-1)
    if request.offsets:
        offsets = torch.tensor(request.offsets, device=dev, dtype=torch.long)
        jj = rows[:, None] - offsets[None, :] - lo  # [C, n] index into the chunk's key axis
        inside = (jj >= 0) & (jj < hi - lo)
        g = p.gather(-1, jj.clamp(0, hi - lo - 1)[None, None].expand(B, H, -1, -1))
        stats["offset_mass"][:, :, c0:c1] = g * inside[None, None]
    if request.match or request.next_match:
        tq = token_ids[:, rows]  # [B, C]
        j = torch.arange(lo, hi, device=dev)
        if request.match:
            eq = (tq[:, :, None] == token_ids[:, None, lo:hi]) & (j[None, None, :] < rows[None, :, None])
            eq = eq[:, None] & vis
            stats["match_mass"][:, :, c0:c1] = (p * eq).sum(-1)
            stats["match_count"][:, :, c0:c1] = eq.sum(-1).float().expand(B, H, -1)
        if request.next_match:
            prev_tok = torch.cat([token_ids[:, :1], token_ids[:, :-1]], dim=1)[:, lo:hi]
            prev_ok = torch.cat([torch.zeros_like(key_valid[:, :1]), key_valid[:, :-1]], dim=1)[:, lo:hi]
            eq = (tq[:, :, None] == prev_tok[:, None, :]) & prev_ok[:, None, :]
            eq = eq & (j[None, None, :] <= rows[None, :, None])
            eq = eq[:, None] & vis
            stats["next_match_mass"][:, :, c0:c1] = (p * eq).sum(-1)
            stats["next_match_count"][:, :, c0:c1] = eq.sum(-1).float().expand(B, H, -1)
    if request.keyset:
        stats["keyset_mass"][:, :, c0:c1] = (p * keyset[:, None, None, lo:hi]).sum(-1)
    if request.colsum:
        stats["colsum"][:, :, lo:hi] += p.sum(-2)

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
_BLOCK_ELEMENTS = 1 << 20


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


def _apply_key_scale(p: torch.Tensor, r: torch.Tensor, keys: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """ACT arithmetic on probabilities p * r (p [B, H, C, K] unnormalised, r [B, H, C, 1]) with
    key set keys [B, K] (or per head [B, H, K]) and beta [H]; returns the new unnormalised p (the
    same r still applies). beta = 1 gives factors of exactly 1, so p is returned bitwise unchanged."""
    ks = (keys[:, None, None, :] if keys.dim() == 2 else keys[:, :, None, :]).to(p.dtype)
    S = (p * ks).sum(-1, keepdim=True) * r
    b = beta.to(p.dtype)[None, :, None, None]
    # The rest mass summed on its own: 1 - S cancels when S is near 1, and the factor divides by it
    # (float32 masses were off by 1e-2 on peaked rows).
    rest = (p * (1.0 - ks)).sum(-1, keepdim=True) * r
    guard = rest <= SCALE_GUARD
    # (1 - b S) / rest written as 1 + (1 - b) S / rest (S + rest = 1): exactly 1 when b = 1
    factor = torch.where(guard, torch.ones_like(S), 1.0 + (1.0 - b) * S / torch.where(guard, torch.ones_like(rest), rest))
    scale_set = torch.where(guard, torch.ones_like(S), b)
    return torch.where(ks.bool(), p * scale_set, p * factor)


# Finite stand-in for -inf on invisible keys: shifted and clamped (below) it gives exp = 1.6e-38, and
# e * t stays finite where -inf would give NaN, so the entropy sum needs no extra masking pass.
_NEG = -1e30
_EMPTY = -1e29  # a row maximum below this means the row sees no key
# Shifted scores are clamped here before exp: on CPU, exp of arguments below about -87 (results
# that underflow into denormals, and the masked _NEG entries) takes a slow path, 5-30x the time of
# ordinary arguments. exp(-87) = 1.6e-38 is a normal float32, below a float32 ulp of any row sum
# (>= 1), so masses and outputs are unchanged in float32; patterns are masked back to exact zeros.
_EXP_FLOOR = -87.0


def _mask_bands(c0: int, c1: int, lo: int, hi: int, off: int, causal: bool, window: int | None,
                all_valid: bool) -> list[tuple[int, int]]:
    """Key column ranges [x0, x1) inside [lo, hi) where some row c0..c1-1 of the chunk cannot see
    some key. Without padding only the causal diagonal block and the window edge need a mask:
    building and adding it over all K columns was a full extra pass over the score block."""
    if not all_valid:
        return [(lo, hi)]
    a, b = lo, hi  # [a, b): columns every row of the chunk sees
    if causal:
        b = min(b, off + c0 + 1)
    if window is not None:
        a = max(a, off + c1 - window)
        if not causal:
            b = min(b, off + c0 + window)
    if a >= b:
        return [(lo, hi)]
    return [(x0, x1) for x0, x1 in ((lo, a), (b, hi)) if x1 > x0]


def _row_max_argmax(s: torch.Tensor, width: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Row maximum and the index of its first occurrence, [..., 1] each, for a contiguous s [..., K].

    torch's max-with-indices is not vectorised on CPU (about 7x the time of amax), so take the
    maxima of blocks of `width` keys (vectorised), pick the first best block, and search only it."""
    K = s.shape[-1]
    nb = K // width
    if nb < 2 or not s.is_contiguous():
        return s.max(dim=-1, keepdim=True)
    blocks = s.as_strided(s.shape[:-1] + (nb, width), s.stride()[:-1] + (width, 1))
    m, bi = blocks.amax(dim=-1).max(dim=-1, keepdim=True)
    inner = blocks.gather(-2, bi[..., None].expand(*bi.shape, width)).squeeze(-2).argmax(dim=-1, keepdim=True)
    idx = bi * width + inner
    if K > nb * width:  # the last partial block: only a strictly larger value moves the first maximum
        tm, ti = s[..., nb * width:].max(dim=-1, keepdim=True)
        later = tm > m
        m, idx = torch.where(later, tm, m), torch.where(later, ti + nb * width, idx)
    return m, idx


def _chunk_probs(s: torch.Tensor, top1: bool, out: torch.Tensor):
    """Unnormalised softmax of a masked score block s [B, H, C, K] (invisible keys hold _NEG).

    Returns (e, t, m, denom, idx): e = exp(t) written into `out` (a reused buffer: on CPU that is
    faster than exp in place), where t = max(s - m, _EXP_FLOOR) is left in s for the entropy,
    row maximum m and denom = sum(e) as [B, H, C, 1], and the argmax
    idx [B, H, C, 1] when `top1`. p = e / denom; callers fold 1/denom into each reduction rather
    than paying a full pass to normalise.
    """
    if top1:
        m, idx = _row_max_argmax(s)
    else:
        m, idx = s.amax(dim=-1, keepdim=True), None
    t = s.sub_(m).clamp_min_(_EXP_FLOOR)
    e = torch.exp(t, out=out)
    return e, t, m, e.sum(dim=-1, keepdim=True), idx


def _view(buf: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A contiguous tensor of `shape` on the front of a flat buffer."""
    return buf[:math.prod(shape)].view(shape)


def _masked_softmax(s: torch.Tensor, vis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-place softmax over visible keys for autograd (head importance, pruning need exp's
    output unmodified). Returns (p, lse [B, H, C]); rows with no visible key: p = 0, lse = -inf."""
    s = s.masked_fill(~vis, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None]).masked_fill(~vis, 0.0), lse


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
    all_valid = bool(key_valid.all())
    off = Sk - Sq
    if chunk is None:
        chunk = max(16, min(Sq, _BLOCK_ELEMENTS // max(1, B * H * Sk)))

    # float32 at least (statistics need it); float64 inputs stay float64 so exactness tests can be exact
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = (q.to(work) * scale).reshape(B, Hkv, G, Sq, D)
    kf, vf = k.to(work), v.to(work)
    out = torch.zeros(B, H, Sq, vf.shape[-1], dtype=work, device=dev)
    stats = allocate_stats(request, B, H, Sq, Sk, dev)
    if pattern_heads:
        stats["pattern"] = torch.zeros(B, len(pattern_heads), Sq, Sk, dtype=torch.float32, device=dev)
    uniform = head_mask if (head_mask is not None and head_mask_mode == "uniform") else None
    first = first_valid_key(key_valid) if request.sink_k else None
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    # p is exactly softmax(s) unless ACT rescales it afterwards: then entropy and top-k come from p
    exact_softmax = key_scale is None and not grad
    fast_entropy = request.entropy and exact_softmax
    top1 = request.topk == 1 and exact_softmax
    # score and probability blocks are written into two buffers reused by every chunk: fresh
    # multi-megabyte tensors per chunk cost page faults comparable to a pass over the block
    n_buf = 0 if grad else B * H * min(chunk, Sq) * Sk  # no chunk sees more than Sk keys
    s_buf = torch.empty(n_buf, dtype=work, device=dev)
    e_buf = torch.empty(n_buf, dtype=work, device=dev)

    for c0 in range(0, Sq, chunk):
        c1 = min(Sq, c0 + chunk)
        lo, hi = key_range(c0, c1, Sq, Sk, causal, window)
        if hi <= lo:
            continue
        rows = torch.arange(c0, c1, device=dev) + off
        shape = (B, H, c1 - c0, hi - lo)
        if grad:
            s = torch.einsum("bhgqd,bhkd->bhgqk", qf[..., c0:c1, :], kf[:, :, lo:hi]).reshape(shape)
        else:
            s = _view(s_buf, (B, Hkv, G, c1 - c0, hi - lo))
            torch.matmul(qf[..., c0:c1, :], kf[:, :, None, lo:hi].transpose(-1, -2), out=s)
            s = s.view(shape)
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        if key_bias is not None:
            s = s + key_bias.bias.to(work)[None, :, None, None] * key_bias.keys[:, None, None, lo:hi].to(work)
        if uniform is not None:
            s = torch.where(uniform[None, :, None, None], torch.zeros_like(s), s)
        # visibility as a mask only where exact zeros matter: autograd, patterns, top-k beyond the row max
        need_vis = grad or pattern_heads or (request.topk and (request.topk > 1 or not exact_softmax))
        vis = visible_keys(Sq, Sk, key_valid, rows, lo, hi, causal, window)[:, None] if need_vis else None

        r = None  # p = e * r when r is set (1/denom folded into each reduction), else p = e
        if grad:
            e, lse = _masked_softmax(s, vis)
            if key_scale is not None:
                # e is normalised here (r = 1); the ACT arithmetic is differentiable as it stands.
                e = _apply_key_scale(e, torch.ones_like(e[..., :1]), key_scale.keys[..., lo:hi], key_scale.beta)
        else:
            for x0, x1 in _mask_bands(c0, c1, lo, hi, off, causal, window, all_valid):
                band = visible_keys(Sq, Sk, key_valid, rows, x0, x1, causal, window)
                s[..., x0 - lo:x1 - lo].add_(torch.zeros(band.shape, dtype=work, device=dev)
                                             .masked_fill_(~band, _NEG)[:, None])
            e, t, m, denom, idx = _chunk_probs(s, top1, _view(e_buf, shape))
            empty = m < _EMPTY
            r = torch.where(empty, 0.0, 1.0 / denom)  # [B, H, C, 1]
            lse = torch.where(empty, -math.inf, m + denom.log()).squeeze(-1)
            if fast_entropy:
                # -sum p log p = log denom - sum(e t) / denom, with t = s - m <= 0: no cancellation
                ent = denom.log().squeeze(-1) - torch.linalg.vecdot(e, t) * r.squeeze(-1)
                stats["entropy"][:, :, c0:c1] = ent.masked_fill_(empty.squeeze(-1), 0.0)
            if top1:
                stats["max_prob"][:, :, c0:c1] = r
                stats["argmax"][:, :, c0:c1] = torch.where(r > 0, idx + lo, -1)
            if key_scale is not None:
                e = _apply_key_scale(e, r, key_scale.keys[..., lo:hi], key_scale.beta)
        pv = torch.einsum("bhgqk,bhkd->bhgqd", e.reshape(B, Hkv, G, c1 - c0, hi - lo), vf[:, :, lo:hi])
        pv = pv.reshape(B, H, c1 - c0, -1)
        out[:, :, c0:c1] = pv if r is None else pv * r
        if pattern_heads:
            ph = e[:, pattern_heads] * vis  # exact zeros where a row cannot look
            stats["pattern"][:, :, c0:c1, lo:hi] = ph if r is None else ph * r[:, pattern_heads]
        if request.lse:
            stats["lse"][:, :, c0:c1] = lse
        if not exact_softmax:
            entropy_topk(stats, request, e, c0, c1, lo, r, vis)
        elif request.topk > 1:
            topk_stats(stats, request.topk, e * vis, c0, c1, lo, r)
        accumulate_stats(stats, request, e, rows, c0, c1, lo, hi, key_valid, token_ids, keyset, first, causal, window,
                         r=r)

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
    entropy_topk(stats, request, p, 0, Sq, 0)
    accumulate_stats(stats, request, p, rows, 0, Sq, 0, Sk, key_valid, token_ids, keyset, first, causal, window)
    return stats


def entropy_topk(stats: dict, request: StatsRequest, p: torch.Tensor, c0: int, c1: int, lo: int,
                 r: torch.Tensor | None = None, vis: torch.Tensor | None = None) -> None:
    """Entropy and top-k of probability rows p [B, H, C, K] (times r [B, H, C, 1] when given;
    queries c0..c1-1, keys from lo): the definitions. The chunked forward has cheaper exact forms
    when p is a plain softmax."""
    if request.entropy:
        pn = p if r is None else p * r
        stats["entropy"][:, :, c0:c1] = -torch.special.xlogy(pn, pn).sum(-1)
    if request.topk:  # invisible keys hold exp(_EXP_FLOOR), not 0: masked so they never rank
        topk_stats(stats, request.topk, p if vis is None else p * vis, c0, c1, lo, r)


def topk_stats(stats: dict, k: int, p: torch.Tensor, c0: int, c1: int, lo: int, r: torch.Tensor | None = None) -> None:
    """argmax / max_prob of rows p [B, H, C, K] (times r [B, H, C, 1] when given); -1 where a row
    has fewer than k keys with mass."""
    kk = min(k, p.shape[-1])
    val, idx = p.topk(kk, dim=-1)
    if r is not None:
        val = val * r
    stats["argmax"][:, :, c0:c1, :kk] = torch.where(val > 0, idx + lo, -1)
    stats["max_prob"][:, :, c0:c1, :kk] = val


def _token_pairs(token_ids: torch.Tensor, rows: torch.Tensor, lo: int, hi: int, key_valid: torch.Tensor,
                 causal: bool, window: int | None, nxt: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(b, c, k) of the visible (query row c, key lo + k) pairs whose tokens match: tok_j == tok_i
    for j < i (match) or tok_{j-1} == tok_i for 1 <= j <= i (next_match). Equal tokens are usually
    rare, so visibility is checked on those pairs only, not as full [B, C, K] masks."""
    tq = token_ids[:, rows]  # [B, C]
    if nxt:
        keys = token_ids[:, max(lo - 1, 0):hi - 1]
        if lo == 0:  # key 0 has no previous token: give it one no query can match
            keys = torch.cat([torch.full_like(token_ids[:, :1], torch.iinfo(token_ids.dtype).min), keys], dim=1)
    else:
        keys = token_ids[:, lo:hi]
    b, c, k = (tq[:, :, None] == keys[:, None, :]).nonzero(as_tuple=True)
    i, j = rows[c], k + lo
    ok = (j <= i) if nxt else (j < i)
    if nxt:
        ok &= key_valid[b, (j - 1).clamp_min(0)]
    if window is not None:
        ok &= ((i - j) < window) if causal else ((i - j).abs() < window)
    ok &= key_valid[b, j] & key_valid[b, i]  # (causality is in the definitions: j < i, j <= i)
    return b[ok], c[ok], k[ok]


def _pair_mass(p: torch.Tensor, b: torch.Tensor, c: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """sum over the given (b, c, k) pairs of p[b, :, c, k] -> [B, H, C]; p [B, H, C, K]."""
    B, H, C, K = p.shape
    if b.numel() * 8 > B * C * K:  # repetitive text: a dense pass is cheaper than the gather
        eq = torch.zeros(B, C, K, dtype=p.dtype, device=p.device)
        eq[b, c, k] = 1
        return (p * eq[:, None]).sum(-1)
    mass = torch.zeros(B, C, H, dtype=p.dtype, device=p.device)
    mass.index_put_((b, c), p[b, :, c, k], accumulate=True)
    return mass.permute(0, 2, 1)


def accumulate_stats(stats: dict, request: StatsRequest, p: torch.Tensor, rows: torch.Tensor, c0: int, c1: int,
                     lo: int, hi: int, key_valid: torch.Tensor, token_ids: torch.Tensor | None,
                     keyset: torch.Tensor | None, first: torch.Tensor | None, causal: bool, window: int | None,
                     r: torch.Tensor | None = None) -> None:
    """Write the mass statistics (everything linear in p: sink, offsets, token matches, key set,
    colsum) of probability rows into the preallocated `stats`. Rows are p [B, H, C, K], or p * r
    with r [B, H, C, 1] when the caller has not normalised them; queries c0..c1-1 at absolute
    positions `rows`, keys lo..hi-1; invisible entries of p are 0, or exp(_EXP_FLOOR) times 1/denom
    in the chunked forward, below a float32 ulp of any mass (causal / window / padding only decide
    which token pairs are counted).

    Every statistic but lse is a function of p alone, so backends that only see materialised
    patterns (TransformerLens, nnsight) get their statistics from this same code.
    """
    B, H = p.shape[:2]
    dev = p.device
    scaled = (lambda x: x) if r is None else (lambda x: x * r.squeeze(-1))
    if request.sink_k:
        jrel = first[:, None] + torch.arange(request.sink_k, device=dev)[None, :] - lo  # [B, sink_k]
        inside = (jrel >= 0) & (jrel < hi - lo)
        g = p.gather(-1, jrel.clamp(0, hi - lo - 1)[:, None, None, :].expand(B, H, p.shape[2], -1))
        stats["sink_mass"][:, :, c0:c1] = scaled((g * inside[:, None, None, :]).sum(-1))
    if request.offsets:
        offsets = torch.tensor(request.offsets, device=dev, dtype=torch.long)
        jj = rows[:, None] - offsets[None, :] - lo  # [C, n] index into the chunk's key axis
        inside = (jj >= 0) & (jj < hi - lo)
        g = p.gather(-1, jj.clamp(0, hi - lo - 1)[None, None].expand(B, H, -1, -1)) * inside[None, None]
        stats["offset_mass"][:, :, c0:c1] = g if r is None else g * r
    for name, wanted, nxt in (("match", request.match, False), ("next_match", request.next_match, True)):
        if not wanted:
            continue
        b, c, k = _token_pairs(token_ids, rows, lo, hi, key_valid, causal, window, nxt)
        stats[f"{name}_mass"][:, :, c0:c1] = scaled(_pair_mass(p, b, c, k))
        count = torch.zeros(B, c1 - c0, dtype=torch.float32, device=dev)
        count.index_put_((b, c), torch.ones_like(b, dtype=torch.float32), accumulate=True)
        stats[f"{name}_count"][:, :, c0:c1] = count[:, None]
    if request.keyset:
        stats["keyset_mass"][:, :, c0:c1] = scaled(torch.einsum("bhck,bk->bhc", p, keyset[:, lo:hi].to(p.dtype)))
    if request.content:
        # summed directly, not as 1 - sink - self: for heads that park nearly all their mass on BOS
        # or themselves the remainder is tiny and the subtraction would lose it to rounding
        j = torch.arange(lo, hi, device=dev)
        keep = (j[None, :] != rows[:, None])[None]  # [1, C, K]
        if request.sink_k:
            jrel = j[None, :] - first[:, None]
            keep = keep & ~((jrel >= 0) & (jrel < request.sink_k))[:, None, :]
        stats["content_mass"][:, :, c0:c1] = scaled((p * keep[:, None]).sum(-1))
    if request.colsum:
        w = p.sum(-2) if r is None else torch.einsum("bhck,bhc->bhk", p, r.squeeze(-1))
        stats["colsum"][:, :, lo:hi] += w

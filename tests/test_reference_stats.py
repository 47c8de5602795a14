"""The chunked torch path against an independent computation on the materialised softmax.

The reference here builds the full [B, H, Sq, Sk] probability matrix with an explicit
position-by-position mask (no code shared with kernels/reference.py) and derives every
statistic from it with the textbook formula. Acceptance: 1e-5 in float32.
"""

import math

import pytest
import torch

from headscope.kernels import KernelInputError, KeyBias, KeyScale, StatsRequest, attention
from headscope.kernels.reference import attention_reference

TOL = 1e-5


def materialised(q, k, v, *, causal, window, key_valid, sm_scale=None, softcap=None, bias=None, uniform=None,
                 beta=None, scale_keys=None):
    """Eager attention: full mask by loops, full softmax. Returns P [B,H,Sq,Sk], scores, out, mask [B,Sq,Sk]."""
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    kk = k.repeat_interleave(H // Hkv, dim=1).double()
    vv = v.repeat_interleave(H // Hkv, dim=1).double()
    s = (q.double() @ kk.transpose(-1, -2)) * (sm_scale or 1 / math.sqrt(D))
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias[0].double()[None, :, None, None] * bias[1][:, None, None, :].double()
    if uniform is not None:
        s[:, uniform] = 0.0
    mask = torch.zeros(B, Sq, Sk, dtype=torch.bool)
    for b in range(B):
        for i in range(Sq):
            ia = Sk - Sq + i
            for j in range(Sk):
                ok = bool(key_valid[b, j]) and bool(key_valid[b, ia])
                if causal and j > ia:
                    ok = False
                if window is not None and (ia - j >= window if causal else abs(ia - j) >= window):
                    ok = False
                mask[b, i, j] = ok
    s_m = s.masked_fill(~mask[:, None], -math.inf)
    P = torch.softmax(s_m, dim=-1).nan_to_num(0.0)
    if beta is not None:
        ks = scale_keys[:, None, None, :].double()
        S = (P * ks).sum(-1, keepdim=True)
        b_ = beta.double()[None, :, None, None]
        fac = (1 - b_ * S) / (1 - S)
        new = torch.where(ks.bool(), b_ * P, P * fac)
        P = torch.where((1 - S) <= 1e-6, P, new)
    return P, s_m, P @ vv, mask


def eager_stats(P, s_m, mask, key_valid, tokens, keyset, offsets, sink_k, topk):
    B, H, Sq, Sk = P.shape
    out = {}
    out["lse"] = torch.logsumexp(s_m, -1)
    out["entropy"] = -(torch.where(P > 0, P * P.log(), torch.zeros_like(P))).sum(-1)
    vals, idx = P.topk(topk, -1)
    out["max_prob"] = vals
    out["argmax"] = torch.where(vals > 0, idx, torch.full_like(idx, -1))
    first = [int(torch.nonzero(key_valid[b])[0]) if key_valid[b].any() else 0 for b in range(B)]
    sink = torch.zeros(B, Sk)
    match = torch.zeros(B, Sq, Sk)
    nxt = torch.zeros(B, Sq, Sk)
    off = torch.zeros(B, Sq, Sk, len(offsets))
    for b in range(B):
        sink[b, first[b]: first[b] + sink_k] = 1
        for i in range(Sq):
            ia = Sk - Sq + i
            for j in range(Sk):
                if not mask[b, i, j]:
                    continue
                if j < ia and tokens[b, j] == tokens[b, ia]:
                    match[b, i, j] = 1
                if 1 <= j <= ia and key_valid[b, j - 1] and tokens[b, j - 1] == tokens[b, ia]:
                    nxt[b, i, j] = 1
                for n, c in enumerate(offsets):
                    if j == ia - c:
                        off[b, i, j, n] = 1
    out["sink_mass"] = (P * sink[:, None, None, :]).sum(-1)
    out["offset_mass"] = torch.einsum("bhij,bijn->bhin", P, off.double())
    out["match_mass"] = (P * match[:, None]).sum(-1)
    out["match_count"] = match.sum(-1)[:, None].expand(B, H, Sq)
    out["next_match_mass"] = (P * nxt[:, None]).sum(-1)
    out["next_match_count"] = nxt.sum(-1)[:, None].expand(B, H, Sq)
    out["keyset_mass"] = (P * keyset[:, None, None, :]).sum(-1)
    content = torch.ones(B, Sq, Sk, dtype=torch.float64) - sink[:, None, :]
    content[:, torch.arange(Sq), torch.arange(Sq) + Sk - Sq] = 0
    out["content_mass"] = (P * content[:, None]).sum(-1)
    out["colsum"] = P.sum(-2)
    return out


def _padding(B, Sk, kind, gen):
    kv = torch.ones(B, Sk, dtype=torch.bool)
    if kind == "right":
        kv[0, Sk - 3:] = False
    elif kind == "left":
        kv[1, :4] = False
    return kv


CASES = [
    # causal, window, padding, H, Hkv, Sq, Sk, D
    (True, None, "none", 4, 4, 17, 17, 8),
    (True, None, "right", 6, 2, 19, 19, 16),  # GQA 3:1
    (True, 5, "left", 4, 2, 21, 21, 8),  # sliding window + left padding
    (False, None, "right", 4, 4, 13, 13, 8),  # encoder with padding
    (False, 4, "none", 2, 1, 12, 12, 8),  # non-causal window, MQA
    (True, None, "left", 6, 3, 3, 20, 8),  # cached decoding: 3 queries over 20 keys
    (True, 7, "right", 4, 2, 1, 16, 8),  # single decode step in a window
]


# (topk, vocab): top-3 with 4 token ids exercises topk and the dense token-match path; top-1 with
# 50 ids the forward's argmax-from-row-max form and its sparse gather of equal-token pairs
@pytest.mark.parametrize("topk,vocab", [(3, 4), (1, 50)])
@pytest.mark.parametrize("causal,window,padding,H,Hkv,Sq,Sk,D", CASES)
def test_every_statistic_matches_materialised_softmax(causal, window, padding, H, Hkv, Sq, Sk, D, topk, vocab):
    gen = torch.Generator().manual_seed(hash((causal, window, padding, H, Sq, vocab)) % 2**31)
    B = 2
    q = torch.randn(B, H, Sq, D, generator=gen) * 1.5
    k = torch.randn(B, Hkv, Sk, D, generator=gen) * 1.5
    v = torch.randn(B, Hkv, Sk, D, generator=gen)
    kv = _padding(B, Sk, padding, gen)
    tokens = torch.randint(0, vocab, (B, Sk), generator=gen)
    keyset = torch.rand(B, Sk, generator=gen) < 0.3
    offsets = (1, 2, 5, -1) if not causal else (0, 1, 3)
    req = StatsRequest.all(topk=topk, sink_k=2, offsets=offsets, keyset=True, content=True)
    out, st = attention_reference(q, k, v, causal=causal, window=window, key_valid=kv, token_ids=tokens,
                                  keyset=keyset, request=req, chunk=5)
    P, s_m, ref_out, mask = materialised(q, k, v, causal=causal, window=window, key_valid=kv)
    ref = eager_stats(P, s_m, mask, kv, tokens, keyset, offsets, 2, topk)
    assert torch.allclose(out.double(), ref_out, atol=TOL)
    for name in req.names():
        got, want = st[name], ref[name]
        if name == "argmax":
            # ties are measure-zero with random floats; compare where the top-k values are distinct
            assert torch.equal(got, want), name
            continue
        if name == "lse":
            finite = torch.isfinite(want)
            assert torch.equal(torch.isfinite(got), finite)
            got, want = got[finite], want[finite]
        assert torch.allclose(got.double(), want.double(), atol=TOL), (name, (got.double() - want).abs().max())
    # padded queries see nothing
    rows_valid = kv[:, Sk - Sq:]
    assert (st["sink_mass"].permute(0, 2, 1)[~rows_valid] == 0).all()


def test_chunk_size_does_not_change_results():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 40, 8, generator=gen) for _ in range(3))
    tokens = torch.randint(0, 5, (1, 40), generator=gen)
    req = StatsRequest.all(topk=2, offsets=(1, 4))
    a = attention_reference(q, k, v, token_ids=tokens, request=req, chunk=7, window=9)
    b = attention_reference(q, k, v, token_ids=tokens, request=req, chunk=40, window=9)
    assert torch.allclose(a[0], b[0], atol=1e-6)
    for n in req.names():
        assert torch.allclose(a[1][n].float(), b[1][n].float(), atol=1e-6), n


def _rand(gen, B=2, H=4, Hkv=2, S=15, D=8):
    return (torch.randn(B, H, S, D, generator=gen), torch.randn(B, Hkv, S, D, generator=gen),
            torch.randn(B, Hkv, S, D, generator=gen))


def test_head_mask_zero_and_uniform():
    gen = torch.Generator().manual_seed(5)
    q, k, v = _rand(gen)
    kv = torch.ones(2, 15, dtype=torch.bool)
    hm = torch.tensor([False, True, False, True])
    out, st = attention(q, k, v, stats=StatsRequest(entropy=True, sink_k=1), head_mask=hm, head_mask_mode="zero")
    base, _ = attention(q, k, v)
    assert (out[:, hm] == 0).all() and torch.allclose(out[:, ~hm], base[:, ~hm])
    assert torch.isnan(st["entropy"][:, hm]).all() and not torch.isnan(st["entropy"][:, ~hm]).any()
    out_u, st_u = attention(q, k, v, stats=StatsRequest(entropy=True), head_mask=hm, head_mask_mode="uniform")
    P, _, ref_out, _ = materialised(q, k, v, causal=True, window=None, key_valid=kv, uniform=hm)
    assert torch.allclose(out_u.double(), ref_out, atol=TOL)
    # uniform rows: entropy = log(number of visible keys) = log(i + 1)
    assert torch.allclose(st_u["entropy"][0, 1], torch.log(torch.arange(1, 16).float()), atol=1e-5)


def test_key_scale_is_act_arithmetic_and_differs_from_bias():
    gen = torch.Generator().manual_seed(7)
    q, k, v = _rand(gen)
    kv = torch.ones(2, 15, dtype=torch.bool)
    keys = torch.zeros(2, 15, dtype=torch.bool)
    keys[:, 0] = True
    keys[1, 6] = True
    beta = torch.tensor([0.4, 1.0, 0.1, 0.4])
    req = StatsRequest(keyset=True, entropy=True, colsum=True)
    out, st = attention(q, k, v, stats=req, keyset=keys, key_scale=KeyScale(beta, keys))
    P, _, ref_out, mask = materialised(q, k, v, causal=True, window=None, key_valid=kv, beta=beta, scale_keys=keys)
    assert torch.allclose(out.double(), ref_out, atol=TOL)
    assert torch.allclose(st["colsum"].double(), P.sum(-2), atol=TOL)
    # mass on the set is exactly beta times the original, except the first row (all mass on key 0: guarded)
    _, st0 = attention(q, k, v, stats=StatsRequest(keyset=True), keyset=keys)
    ratio = st["keyset_mass"][:, :, 1:] / st0["keyset_mass"][:, :, 1:]
    assert torch.allclose(ratio, beta[None, :, None].expand_as(ratio), atol=1e-5)
    assert torch.allclose(st["keyset_mass"][:, :, 0], st0["keyset_mass"][:, :, 0])
    # beta = 1 changes nothing
    same, _ = attention(q, k, v, key_scale=KeyScale(torch.ones(4), keys))
    base, _ = attention(q, k, v)
    assert torch.equal(same, base)
    # a logit bias of log(beta) renormalises: a different operation
    biased, stb = attention(q, k, v, stats=StatsRequest(keyset=True), keyset=keys,
                            key_bias=KeyBias(torch.log(beta), keys))
    assert not torch.allclose(biased, out, atol=1e-3)
    _, _, ref_b, _ = materialised(q, k, v, causal=True, window=None, key_valid=kv, bias=(torch.log(beta), keys))
    assert torch.allclose(biased.double(), ref_b, atol=TOL)


def test_key_scale_applies_under_autograd():
    """With gradients on (any forward of a model outside no_grad), ACT must still change attention:
    the differentiable path gives the no-grad path's numbers and gradients that see beta."""
    gen = torch.Generator().manual_seed(8)
    q, k, v = _rand(gen)
    keys = torch.zeros(2, 15, dtype=torch.bool)
    keys[:, 0] = True
    ks = KeyScale(torch.tensor([0.4, 1.0, 0.1, 0.4]), keys)
    req = StatsRequest(keyset=True, entropy=True)
    with torch.no_grad():
        ref_out, ref = attention(q, k, v, stats=req, keyset=keys, key_scale=ks)
    qg = q.clone().requires_grad_(True)
    out, st = attention(qg, k, v, stats=req, keyset=keys, key_scale=ks)
    assert torch.allclose(out, ref_out, atol=1e-5)
    for name in ("keyset_mass", "entropy"):
        assert torch.allclose(st[name], ref[name], atol=1e-5), name
    plain, _ = attention(q, k, v)
    assert (ref_out - plain).abs().max() > 1e-2  # the edit is not a no-op on these inputs
    out.sum().backward()
    assert torch.isfinite(qg.grad).all()


def test_softcap_matches_eager():
    gen = torch.Generator().manual_seed(9)
    q, k, v = _rand(gen)
    q = q * 4
    out, _ = attention(q, k, v, softcap=5.0)
    _, _, ref, _ = materialised(q, k, v, causal=True, window=None, key_valid=torch.ones(2, 15, dtype=torch.bool),
                                softcap=5.0)
    assert torch.allclose(out.double(), ref, atol=TOL)


def test_chunked_path_memory_is_not_quadratic():
    # 4096 queries x 4096 keys x 4 heads would be 256 MB as one float32 matrix; the chunk bounds each block.
    from headscope.kernels.reference import _BLOCK_ELEMENTS

    q = torch.randn(1, 4, 4096, 8)
    chunk = max(16, min(4096, _BLOCK_ELEMENTS // (1 * 4 * 4096)))
    assert chunk * 4096 * 4 <= _BLOCK_ELEMENTS


@pytest.mark.parametrize("bad", [
    dict(q=(1, 3, 4, 8), k=(1, 2, 4, 8)),  # heads not divisible
    dict(q=(1, 2, 5, 8), k=(1, 2, 4, 8)),  # more queries than keys
    dict(q=(1, 2, 0, 8), k=(1, 2, 0, 8)),  # empty
])
def test_bad_shapes_raise(bad):
    q = torch.randn(*bad["q"])
    k = torch.randn(*bad["k"])
    with pytest.raises(KernelInputError):
        attention(q, k, k)


def test_bad_requests_raise():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(KernelInputError, match="token_ids"):
        attention(q, q, q, stats=StatsRequest(match=True))
    with pytest.raises(KernelInputError, match="keyset"):
        attention(q, q, q, stats=StatsRequest(keyset=True))
    with pytest.raises(KernelInputError, match="beta"):
        attention(q, q, q, key_scale=KeyScale(torch.tensor([0.0, 1.0]), torch.ones(1, 4, dtype=torch.bool)))
    with pytest.raises(KernelInputError, match="finite"):
        attention(q, q, q, key_scale=KeyScale(torch.tensor([math.nan, 1.0]), torch.ones(1, 4, dtype=torch.bool)))
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(KernelInputError, match="integer tensor"):  # 1.2 and 1.7 would both become token 1
        attention(q, q, q, stats=StatsRequest(match=True), token_ids=ids.float())
    with pytest.raises(KernelInputError, match="must lie in"):  # 2**32 + 5 would equal 5 as an int32
        attention(q, q, q, stats=StatsRequest(match=True), token_ids=ids + 2**32 + 5)
    with pytest.raises(KernelInputError, match="window"):  # 2.5 reads as < 2.5 on one path, < 2 on the other
        attention(q, q, q, window=2.5)
    with pytest.raises(KernelInputError, match="softcap"):
        attention(q, q, q, softcap=0.0)
    with pytest.raises(KernelInputError, match="empty batch"):
        attention(q[:0], q[:0], q[:0])
    with pytest.raises(KernelInputError, match=r"\(0, 1\]"):  # beta S > 1 would make probabilities negative
        attention(q, q, q, key_scale=KeyScale(torch.tensor([1.05, 1.0]), torch.ones(1, 4, dtype=torch.bool)))


@pytest.mark.parametrize("K", [1, 31, 33, 64, 100, 1024])
def test_row_max_argmax_is_first_maximum(K):
    """The blocked argmax of the forward's top-1 path against a plain scan, ties included."""
    from headscope.kernels.reference import _row_max_argmax

    s = torch.randn(2, 3, 7, K, generator=torch.Generator().manual_seed(K))
    s[0, 0, 0] = 1.0  # every key ties
    s[1, 2, 3, K // 2:] = s[1, 2, 3].max() + 1  # a tie that spans blocks
    m, idx = _row_max_argmax(s)
    ref_m = s.max(-1, keepdim=True).values
    first = (s == ref_m).float().argmax(-1, keepdim=True)  # float argmax: first occurrence
    assert torch.equal(m, ref_m)
    assert torch.equal(idx, first)

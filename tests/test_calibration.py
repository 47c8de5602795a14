"""ACT attention calibration: the arithmetic against a materialised softmax, sink detection against
brute force, beta = 1 / beta -> 0 on the embedded model, bad input."""

import math

import pytest
import torch

from headscope.circuits.calibration import CalibrationError, accuracy, calibrate, sink_keys
from headscope.kernels import KeyBias, KeyScale, StatsRequest, attention
from headscope.probe import LayerEdit
from headscope.probe.errors import HeadIndexError


def _softmax_causal(q, k):
    B, H, S, D = q.shape
    G = H // k.shape[1]
    s = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(G, 1)) / math.sqrt(D)
    s = s.masked_fill(torch.triu(torch.ones(S, S, dtype=torch.bool), 1), -math.inf)
    return torch.softmax(s, -1)


def test_key_scale_is_the_act_formula_per_head_keys():
    torch.manual_seed(0)
    B, H, Hkv, S, D = 2, 4, 2, 12, 8
    q, k, v = torch.randn(B, H, S, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    keys = torch.rand(B, H, S) < 0.3
    beta = torch.tensor([0.4, 0.1, 1.0, 0.7])
    out, st = attention(q, k, v, key_scale=KeyScale(beta, keys), pattern_heads=list(range(H)), backend="torch",
                        stats=StatsRequest(colsum=True))
    p = _softmax_causal(q, k)
    ks = keys[:, :, None, :].float()
    Sset = (p * ks).sum(-1, keepdim=True)
    b = beta[None, :, None, None]
    ref = torch.where(ks.bool(), b * p, p * (1 - b * Sset) / (1 - Sset))  # DESIGN.md / authors' code
    # rows with all their mass on the set have nowhere to move it: unchanged (the authors force row 0 to 1)
    full = (1 - Sset) <= 1e-6
    assert full.any()
    ref = torch.where(full, p, ref)
    torch.testing.assert_close(st["pattern"], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref.sum(-1), torch.ones(B, H, S), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, ref @ v.repeat_interleave(2, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st["colsum"], ref.sum(-2), atol=1e-5, rtol=1e-5)
    # a logit bias of log(beta) on the same keys is a different (renormalising) operation
    shared = keys[:, 0]
    o_scale, _ = attention(q, k, v, key_scale=KeyScale(beta, shared), backend="torch")
    o_bias, _ = attention(q, k, v, key_bias=KeyBias(beta.log(), shared), backend="torch")
    assert (o_scale - o_bias)[:, [0, 1, 3]].abs().max() > 1e-2
    torch.testing.assert_close((o_scale - o_bias)[:, 2], torch.zeros(B, S, D), atol=1e-6, rtol=0)  # beta 1


def test_sink_keys_brute_force():
    torch.manual_seed(1)
    B, H, S = 2, 3, 10
    p = torch.softmax(torch.randn(B, H, S, S) * 3, -1).tril()
    p = p / p.sum(-1, keepdim=True)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 7:] = 0  # right padding: padded queries see nothing
    p[1, :, 7:] = 0
    colsum = p.sum(-2)
    got = sink_keys(colsum, mask, threshold=0.1)
    for b in range(B):
        n = int(mask[b].sum())
        for h in range(H):
            found = [j for j in range(n) if colsum[b, h, j] / (n - j) > 0.1]
            want = set(found[1:])
            assert set(torch.nonzero(got[b, h])[:, 0].tolist()) == want


@pytest.mark.parametrize("causal,window", [(True, 4), (False, None), (False, 3)])
def test_sink_keys_count_the_queries_that_see_each_key(causal, window):
    """The mean is over the real queries that can see key j: a sliding window caps them (a window
    layer's late keys were judged against S - j queries), an encoder's every query sees every key."""
    torch.manual_seed(2)
    B, H, S = 2, 2, 12
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    colsum = torch.rand(B, H, S) * 2
    got = sink_keys(colsum, mask, threshold=0.3, causal=causal, window=window)
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    vis = (j <= i) if causal else torch.ones(S, S, dtype=torch.bool)
    if window is not None:
        vis &= (i - j).abs() < window
    for b in range(B):
        real = mask[b].bool()
        seen = (vis & real[:, None]).sum(0)
        for h in range(H):
            found = [k for k in range(S) if real[k] and colsum[b, h, k] / max(int(seen[k]), 1) > 0.3]
            assert set(torch.nonzero(got[b, h])[:, 0].tolist()) == set(found[1:]), (b, h)


@pytest.fixture(scope="module")
def batch(model):
    return model.tokenize(["Review: The soup was cold. The staff, however, were kind.\nSentiment:"], prepend_bos=True)


def test_beta_one_changes_nothing_and_model_restored(model, batch):
    heads = [(l, h) for l in (3, 10) for h in range(model.meta.n_heads)]
    with torch.no_grad():
        before = model.hf(**batch).logits
        # the same attention arithmetic on the calibrated layers (the exact chunked path, reached by
        # a uniform-mode mask of no heads), transformers' SDPA on the others, as under calibrate()
        noop = {l: LayerEdit(head_mask=torch.zeros(model.meta.n_heads, dtype=torch.bool), head_mask_mode="uniform")
                for l in (3, 10)}
        with model.edit_attention(noop):
            plain = model.hf(**batch).logits
        with calibrate(model, heads, batch, beta=1.0) as used:
            same = model.hf(**batch).logits
        after = model.hf(**batch).logits
    assert any(u.any() for u in used.values()), "the prompt should have non-BOS sinks"
    torch.testing.assert_close(same, plain, atol=1e-6, rtol=0)
    assert torch.equal(before, after) and model.state.edits == {}


def test_beta_to_zero_removes_sink_attention(model, batch):
    heads = [(l, h) for l in range(model.meta.n_layers) for h in range(model.meta.n_heads)]
    L = 12
    heads = [(L, h) for h in range(model.meta.n_heads)]
    with calibrate(model, heads, batch, beta=1e-7) as used:
        _, rec = model.run_recorded(batch["input_ids"], batch["attention_mask"], StatsRequest(colsum=True))
    keys = used[L][0]  # [H, S]
    assert keys.any()
    cs = rec.stats["colsum"][0, L]  # [H, S]
    assert cs[keys].abs().max() < 1e-5
    S = batch["input_ids"].shape[1]
    torch.testing.assert_close(cs.sum(-1), torch.full((model.meta.n_heads,), float(S)), atol=1e-3, rtol=0)
    with calibrate(model, heads, batch, beta=0.4):
        with torch.no_grad():
            changed = model.hf(**batch).logits
    with model.record():
        with torch.no_grad():
            plain = model.hf(**batch).logits
    assert (changed - plain).abs().max() > 1e-4


def test_accuracy_counts_argmax_choices(model):
    items = [{"prompt": "The opposite of hot is", "choices": [" cold", " banana"], "label": 0},
             {"prompt": "The opposite of up is", "choices": [" down", " purple"], "label": 1}]
    assert accuracy(model, items) == 0.5


def test_bad_input(model, batch):
    for beta in (0.0, -0.4, 1.05, float("nan"), float("inf")):
        with pytest.raises(CalibrationError):
            with calibrate(model, [(0, 0)], batch, beta=beta):
                pass
    with pytest.raises(HeadIndexError):
        with calibrate(model, [(0, 99)], batch):
            pass
    with pytest.raises(CalibrationError):
        accuracy(model, [])

"""Per-head activation patching against independent references: the clean run itself, and a plain
torch pre-hook on o_proj that swaps one head's input columns (no headscope machinery)."""

import pytest
import torch

from headscope.circuits.patching import last_logits, patch_heads, patched_logits
from headscope.probe.errors import InputError

CLEAN = "In 2010 the president of the United States was Barack"
CORRUPT = "In 2018 the president of the United States was Barack"


@pytest.fixture(scope="module")
def pair(model):
    clean = model.tokenize(CLEAN, prepend_bos=True)["input_ids"]
    corrupt = model.tokenize(CORRUPT, prepend_bos=True)["input_ids"]
    assert clean.shape == corrupt.shape and not torch.equal(clean, corrupt)
    return clean, corrupt


def _o_proj(model, layer):
    return model.attention_modules[layer].o_proj


def _manual_patch_logits(model, clean, corrupt, layer, head, alpha=1.0):
    """Reference: capture o_proj's input on the clean run and move head `head`'s D columns of the
    corrupted run's o_proj input toward it by alpha (1: replace), with torch hooks only (SDPA
    attention, no recorder, no edits) -> last-position logits."""
    D = model.meta.head_dim
    cols = slice(head * D, (head + 1) * D)
    saved = {}
    h = _o_proj(model, layer).register_forward_pre_hook(lambda m, a: saved.__setitem__("x", a[0].detach().clone()))
    with torch.no_grad():
        model.hf(input_ids=clean, use_cache=False)
    h.remove()

    def move(m, a):
        x = a[0].clone()
        x[..., cols] = saved["x"][..., cols] if alpha == 1.0 else x[..., cols] + alpha * (saved["x"][..., cols] - x[..., cols])
        return (x,)

    h = _o_proj(model, layer).register_forward_pre_hook(move)
    try:
        with torch.no_grad():
            return model.hf(input_ids=corrupt, use_cache=False).logits[:, -1].float()
    finally:
        h.remove()


def test_patching_every_head_reproduces_clean_run(model, pair):
    clean, corrupt = pair
    L, H = model.meta.n_layers, model.meta.n_heads
    ref_clean = last_logits(model, clean)
    ref_corrupt = last_logits(model, corrupt)
    assert (ref_clean - ref_corrupt).abs().max() > 0.1  # the corruption matters
    full = patched_logits(model, clean, corrupt, [(l, h) for l in range(L) for h in range(H)])
    torch.testing.assert_close(full, ref_clean, atol=2e-4, rtol=1e-4)
    # a patch of nothing-but-one-layer is not the clean run (the test above could not pass by accident)
    one = patched_logits(model, clean, corrupt, [(5, h) for h in range(H)])
    assert (one - ref_clean).abs().max() > 1e-2


def test_single_head_patch_matches_hook_reference(model, pair):
    clean, corrupt = pair
    obama = model.tokenizer(" Obama")["input_ids"][0]
    trump = model.tokenizer(" Trump")["input_ids"][0]

    def metric(logits):
        return (logits[:, obama] - logits[:, trump]).mean()

    heads = [(0, 3), (7, 1), (15, 8), (29, 0)]
    base = float(metric(last_logits(model, corrupt)))
    for per in (1, 3):  # rows in one batch must not leak into each other
        eff = patch_heads(model, clean, corrupt, metric, heads=heads, heads_per_batch=per)
        for l, h in heads:
            ref = float(metric(_manual_patch_logits(model, clean, corrupt, l, h))) - base
            assert eff[l, h].item() == pytest.approx(ref, abs=2e-4), (l, h, per)
        mask = torch.ones_like(eff, dtype=torch.bool)
        mask[[l for l, _ in heads], [h for _, h in heads]] = False
        assert torch.isnan(eff[mask]).all()
    assert eff[torch.isfinite(eff)].abs().max() > 1e-3  # at least one head moves the metric


def test_patching_bad_input(model, pair):
    clean, corrupt = pair
    with pytest.raises(InputError, match="same token shape"):
        patch_heads(model, clean, corrupt[:, :-1], lambda x: x.sum())
    with pytest.raises(Exception, match="out of range|layer|head"):
        patch_heads(model, clean, corrupt, lambda x: x.sum(), heads=[(99, 0)])


def test_attribution_patching_is_the_derivative_of_the_patch(model, pair):
    """Each head's attribution = d/d alpha metric(z_corrupt + alpha (z_clean - z_corrupt)) at alpha = 0,
    by central differences through plain hooks; and it tracks activation patching across heads."""
    from headscope.circuits.patching import attribution_patch_heads

    clean, corrupt = pair
    a = model.tokenizer(" Obama", add_special_tokens=False)["input_ids"][0]
    b = model.tokenizer(" Trump", add_special_tokens=False)["input_ids"][0]

    def metric(logits):
        return (logits[:, a] - logits[:, b]).mean()

    attr = attribution_patch_heads(model, clean, corrupt, metric)
    assert attr.shape == (model.meta.n_layers, model.meta.n_heads) and torch.isfinite(attr).all()
    order = attr.abs().flatten().argsort(descending=True)
    picks = [divmod(int(i), model.meta.n_heads) for i in order[:3]] + [(2, 1), (20, 7)]
    eps = 1e-2
    for l, h in picks:
        plus = float(metric(_manual_patch_logits(model, clean, corrupt, l, h, eps)))
        minus = float(metric(_manual_patch_logits(model, clean, corrupt, l, h, -eps)))
        deriv = (plus - minus) / (2 * eps)
        assert float(attr[l, h]) == pytest.approx(deriv, abs=2e-3, rel=2e-2), (l, h)
    assert attr.abs().max() > 0.05
    act = patch_heads(model, clean, corrupt, metric)
    r = torch.corrcoef(torch.stack([attr.flatten(), act.flatten()]))[0, 1]
    assert r > 0.5, float(r)  # first order tracks the patch on this pair (r printed in RESULTS.md)

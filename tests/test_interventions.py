"""Mean and resample ablation: the right z replaced, the known damage done, the model left as it was."""

import pytest
import torch

from headscope.circuits.ablation import ablate_heads
from headscope.circuits.interventions import mean_ablate, mean_z, resample_ablate
from headscope.kernels.stats import StatsRequest
from headscope.probe.errors import HeadIndexError, InputError

TEXTS = ["The cat sat on the warm mat by the door.", "Rain fell over the quiet town all night long."]


def _repeated(model, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(1000, 10000, (2, T), generator=g)
    ids = torch.cat([torch.ones(2, 1, dtype=torch.long), r, r], 1)
    return ids, T


def _halves_loss(model, ids, T):
    """Mean next-token loss on the first (random) copy and on the second (repeated) copy."""
    with torch.no_grad():
        logits = model.hf(input_ids=ids, use_cache=False).logits
    nll = -torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    return float(nll[:, 1:T].mean()), float(nll[:, T + 1:].mean())


@pytest.fixture(scope="module")
def induction(model):
    ids, T = _repeated(model)
    _, rec = model.run_recorded(ids, None, StatsRequest(offsets=(T - 1,)))
    score = rec.stats["offset_mass"][:, :, :, T + 1:, 0].mean((0, 3))  # [L, H] on the second copy
    order = torch.argsort(score.flatten(), descending=True)
    H = model.meta.n_heads
    top = [divmod(int(i), H) for i in order[:4]]
    return ids, T, top, score


def test_mean_z_matches_recorded_average(model):
    heads = [(3, 1), (5, 4)]
    zm = mean_z(model, TEXTS, heads)
    batch = model.tokenize(TEXTS, prepend_bos=True)
    _, rec = model.run_recorded(batch["input_ids"], batch["attention_mask"], head_out=[3, 5])
    valid = batch["attention_mask"].bool()
    for l in (3, 5):
        ref = rec.z(l)[valid].mean(0)  # [H, D]
        torch.testing.assert_close(zm[l], ref, atol=1e-5, rtol=1e-5)


def test_mean_ablation_replaces_z_and_composes_with_recording(model):
    heads = [(4, 2), (4, 7)]
    zm = mean_z(model, TEXTS, heads)
    batch = model.tokenize(["A completely different sentence about ships."], prepend_bos=True)
    with mean_ablate(model, heads, zm):
        _, rec = model.run_recorded(batch["input_ids"], batch["attention_mask"], head_out=[4])
    _, clean = model.run_recorded(batch["input_ids"], batch["attention_mask"], head_out=[4])
    z, z0 = rec.z(4)[0], clean.z(4)[0]  # [S, H, D]
    for h in (2, 7):
        torch.testing.assert_close(z[:, h], zm[4][h].expand_as(z[:, h]))
    others = [h for h in range(model.meta.n_heads) if h not in (2, 7)]
    torch.testing.assert_close(z[:, others], z0[:, others])


def test_resample_uses_source_z(model):
    src = model.tokenize(["Numbers like seven and eight follow six in order here."], prepend_bos=True)
    tgt = model.tokenize(["The dog ran."], prepend_bos=True)
    S = tgt["input_ids"].shape[1]
    _, rs = model.run_recorded(src["input_ids"], src["attention_mask"], head_out=[6])
    with resample_ablate(model, [(6, 3)], src):
        _, rec = model.run_recorded(tgt["input_ids"], tgt["attention_mask"], head_out=[6])
    torch.testing.assert_close(rec.z(6)[0, :, 3], rs.z(6)[0, :S, 3])
    with pytest.raises(InputError, match="at least as long"):
        with resample_ablate(model, [(6, 3)], tgt):
            model.hf(**src)


def test_resample_in_cached_decoding_takes_the_step_position(model):
    """A cached decode step (one query at position S - 1) replaces z with the source's z at S - 1, as
    the full forward does, not the source's position 0 (it did: last logits off by 25)."""
    src = model.tokenize(["Alice went to the market and bought some fresh apples and pears today"], prepend_bos=True)
    ids = model.tokenize(["The quick brown fox jumps over the lazy dog"], prepend_bos=True)["input_ids"]
    heads = [(layer, h) for layer in range(0, model.meta.n_layers, 3) for h in range(model.meta.n_heads)]
    with torch.no_grad(), resample_ablate(model, heads, src, seed=0):
        full = model.hf(input_ids=ids, use_cache=False).logits[0, -1]
        past = model.hf(input_ids=ids[:, :-1], use_cache=True).past_key_values
        step = model.hf(input_ids=ids[:, -1:], past_key_values=past, use_cache=True).logits[0, -1]
    assert (full - step).abs().max() < 1e-3
    with torch.no_grad():
        assert (model.hf(input_ids=ids, use_cache=False).logits[0, -1] - full).abs().max() > 1.0  # it did ablate


def test_resample_draws_one_source_row_per_example_for_every_layer(model):
    texts = ["One two three four five six seven eight.", "Red green blue yellow black white pink grey.",
             "Monday Tuesday Wednesday Thursday Friday Saturday.", "North south east west up down left right."]
    src = model.tokenize(texts, prepend_bos=True)
    S = int(src["attention_mask"].sum(1).min())  # every source row is real on these positions
    tgt = {"input_ids": src["input_ids"][:, :S].flip(0).contiguous(), "attention_mask": torch.ones(4, S, dtype=torch.long)}
    layers = (2, 7, 11)
    _, rs = model.run_recorded(src["input_ids"], src["attention_mask"], head_out=list(layers))
    with resample_ablate(model, [(l, 0) for l in layers], src, seed=3):
        _, rec = model.run_recorded(tgt["input_ids"], tgt["attention_mask"], head_out=list(layers))
    rows = []
    for l in layers:
        z = rec.z(l)[:, :, 0]  # [B, S, D]
        ref = rs.z(l)[:, :S, 0]
        rows.append([int(((ref - z[b]).abs().amax((1, 2)) < 1e-5).nonzero()[0]) for b in range(4)])
    assert rows[0] == rows[1] == rows[2]  # the same counterfactual example in every layer
    assert sorted(rows[0]) == [0, 1, 2, 3]  # a permutation: no source row used twice


def test_resample_refuses_padding_under_real_tokens(model):
    src = model.tokenize(["Short one.", "A much longer source sentence with many more tokens in it."])
    tgt = model.tokenize(["Another long target sentence, long enough to pass short.", "Tiny."])
    with pytest.raises(InputError, match="padding"):
        with resample_ablate(model, [(3, 1)], src, seed=0), torch.no_grad():
            model.hf(**tgt)


def test_nested_ablations_on_one_layer_unwind(model):
    batch = model.tokenize(TEXTS, prepend_bos=True)
    with torch.no_grad():
        before = model.hf(**batch).logits
        with ablate_heads(model, [(3, 1)]):
            with ablate_heads(model, [(3, 2)]):
                both = model.hf(**batch).logits
            outer = model.hf(**batch).logits
        assert model.state.edits == {}
        after = model.hf(**batch).logits
    assert (both - outer).abs().max() > 1e-4
    assert torch.equal(before, after)


def test_ablating_induction_heads_raises_loss_on_repeats(model, induction):
    ids, T, top, score = induction
    assert score.max() > 0.3, "the embedded model should have induction heads"
    first0, base = _halves_loss(model, ids, T)
    zm = mean_z(model, TEXTS, top)
    results = {}
    for name, ctx in (("zero_top", lambda: ablate_heads(model, top)),
                      ("mean_top", lambda: mean_ablate(model, top, zm)),
                      ("resample_top", lambda: resample_ablate(model, top, {"input_ids": _repeated(model, seed=1)[0]}))):
        with ctx():
            results[name] = _halves_loss(model, ids, T)
    for name, (first, second) in results.items():
        # the repeated half gets much harder to predict; the random half, unpredictable anyway, much less so
        assert second > base + 0.5, name
        assert second - base > 2 * (first - first0), name


def test_model_unchanged_after_each_context(model):
    batch = model.tokenize(TEXTS, prepend_bos=True)
    with torch.no_grad():
        before = model.hf(**batch).logits
    zm = mean_z(model, TEXTS, [(2, 2)])
    with mean_ablate(model, [(2, 2)], zm):
        model.hf(**batch)
    with resample_ablate(model, [(2, 2)], batch):
        model.hf(**batch)
    with torch.no_grad():
        after = model.hf(**batch).logits
    assert torch.equal(before, after)
    assert model.state.edits == {}


def test_bad_input(model):
    with pytest.raises(HeadIndexError):
        mean_z(model, TEXTS, [(30, 0)])
    with pytest.raises(HeadIndexError):
        with mean_ablate(model, [(0, 9)], reference_batches=TEXTS):
            pass
    with pytest.raises(InputError, match="needs z_means"):
        with mean_ablate(model, [(0, 1)]):
            pass
    with pytest.raises(InputError, match="empty"):
        mean_z(model, [], [(0, 1)])
    with pytest.raises(InputError, match="shape"):
        with mean_ablate(model, [(0, 1)], {0: torch.zeros(3, 3)}):
            pass


def test_sdpa_shortcut_equals_exact_path(model, monkeypatch):
    """Edits that leave the attention probabilities alone (zero ablation, z edits) run on
    transformers' SDPA when nothing is recorded; the exact chunked path must give the same logits."""
    import headscope.probe.native as native

    ids = torch.randint(1000, 20000, (2, 40), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1
    calls = []
    real = native._plain_attention_suffices
    monkeypatch.setattr(native, "_plain_attention_suffices", lambda *a: calls.append(real(*a)) or calls[-1])
    with torch.no_grad():
        plain = model.hf(input_ids=ids).logits
        with ablate_heads(model, [(3, 0), (3, 4), (11, 2)]):
            fast = model.hf(input_ids=ids).logits
        assert calls and all(calls)  # every layer took the shortcut
        calls.clear()
        model.state.backend = "torch"
        try:
            with ablate_heads(model, [(3, 0), (3, 4), (11, 2)]):
                exact = model.hf(input_ids=ids).logits
        finally:
            model.state.backend = "auto"
        assert calls and not any(calls)
    assert (fast - plain).abs().max() > 1e-2  # the ablation did something
    torch.testing.assert_close(fast, exact, atol=1e-4, rtol=0)

"""Value-vector editing (the temporal-heads edit) against independent references: a plain torch
hook that rewrites the value projection's output (no headscope machinery), the attention of one head
materialised from its recorded q, k, v, and single-example runs for batched edits."""

import pytest
import torch

from headscope.circuits.ablation import ablate_heads
from headscope.circuits.temporal import load_facts, phrase_positions, prompt_ids
from headscope.circuits.value_edit import (ValueEditCase, cases_from_facts, edit_values, head_grid, head_values,
                                           value_edit_sweep, value_means)
from headscope.kernels.stats import StatsRequest
from headscope.probe import LayerEdit
from headscope.probe.errors import InputError

TEXT = "In 2009, the president of Russia was"
SOURCE = "In 2009, the president of South Korea was"
LAYER, POS = 4, 3


@pytest.fixture(scope="module")
def ids(model):
    return torch.tensor([prompt_ids(model, TEXT)], device=model.device)


def _delta(model, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(model.meta.head_dim, generator=g)


def _v_proj_edit_logits(model, ids, layer, kv_head, delta, pos):
    """Reference: add delta to kv head `kv_head`'s columns of v_proj's output at `pos` (plain hook)."""
    D = model.meta.head_dim
    cols = slice(kv_head * D, (kv_head + 1) * D)

    def hook(module, args, out):
        if out.shape[1] <= pos:  # a cached decode step: the prompt's v is in the cache already
            return out
        out = out.clone()
        out[:, pos, cols] += delta.to(out.dtype)
        return out

    h = model.attention_modules[layer].v_proj.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model.hf(input_ids=ids, use_cache=False).logits.float()
    finally:
        h.remove()


def test_editing_a_whole_kv_group_equals_editing_its_values(model, ids):
    group = model.meta.n_heads // model.meta.n_kv_heads
    delta = _delta(model)
    ref = _v_proj_edit_logits(model, ids, LAYER, 1, delta, POS)
    with torch.no_grad():
        base = model.hf(input_ids=ids, use_cache=False).logits.float()
        with edit_values(model, {(LAYER, h): delta for h in range(group, 2 * group)}, POS):
            ours = model.hf(input_ids=ids, use_cache=False).logits.float()
    assert (ref - base)[0, POS:].abs().max() > 0.05  # the edit matters
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    # off by one position is a different edit
    with torch.no_grad(), edit_values(model, {(LAYER, h): delta for h in range(group, 2 * group)}, POS + 1):
        shifted = model.hf(input_ids=ids, use_cache=False).logits.float()
    assert (shifted - ref).abs().max() > 1e-2


def test_edit_persists_through_cached_generation(model, ids):
    """Generated tokens attend to the edited key too: greedy generation with the edit equals
    generation with the value projection rewritten on the prompt pass (the cache keeps it)."""
    group = model.meta.n_heads // model.meta.n_kv_heads
    delta = _delta(model, seed=1, scale=8.0)
    D = model.meta.head_dim

    def hook(module, args, out):
        if out.shape[1] <= POS:
            return out
        out = out.clone()
        out[:, POS, :D] += delta.to(out.dtype)
        return out

    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  pad_token_id=model.tokenizer.eos_token_id, attention_mask=torch.ones_like(ids))
    h = model.attention_modules[LAYER].v_proj.register_forward_hook(hook)
    try:
        with torch.no_grad():
            ref = model.hf.generate(input_ids=ids, **kwargs)
    finally:
        h.remove()
    with torch.no_grad(), edit_values(model, {(LAYER, h): delta for h in range(group)}, POS):
        ours = model.hf.generate(input_ids=ids, **kwargs)
    assert torch.equal(ours.sequences, ref.sequences)
    for a, b in zip(ours.scores, ref.scores):
        torch.testing.assert_close(a.float(), b.float(), atol=3e-4, rtol=1e-4)


def test_one_query_head_against_its_materialised_attention(model, ids):
    """GQA: editing one query head changes that head only, by softmax(q k^T) @ (v + delta at POS)."""
    group = model.meta.n_heads // model.meta.n_kv_heads
    head = group + 1  # the middle head of kv group 1
    delta = _delta(model, seed=2)
    _, rec = model.run_recorded(ids, qkv=[LAYER], head_out=[LAYER], stop_after_layer=LAYER)
    with edit_values(model, {(LAYER, head): delta}, POS):
        _, edited = model.run_recorded(ids, head_out=[LAYER], stop_after_layer=LAYER)
    q, k, v = (t[0, 0].float() for t in (rec.q, rec.k, rec.v))  # [H or Hkv, S, D]
    S = q.shape[1]
    scores = q[head] @ k[1].T / model.meta.head_dim ** 0.5
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    v_edit = v[1].clone()
    v_edit[POS] += delta
    ref = torch.softmax(scores, -1) @ v_edit
    z0, z1 = rec.z(LAYER)[0].float(), edited.z(LAYER)[0].float()  # [S, H, D]
    torch.testing.assert_close(z1[:, head], ref, atol=1e-4, rtol=1e-4)
    assert (z1[POS:, head] - z0[POS:, head]).abs().max() > 0.05
    others = [h for h in range(model.meta.n_heads) if h != head]
    torch.testing.assert_close(z1[:, others], z0[:, others], atol=1e-5, rtol=0)


def test_batched_deltas_and_positions_match_single_runs(model):
    facts = load_facts(kind="temporal")[:2]
    rows = [prompt_ids(model, f.prompt) for f in facts]
    assert len(rows[0]) == len(rows[1])
    ids = torch.tensor(rows, device=model.device)
    deltas = torch.stack([_delta(model, seed=3), _delta(model, seed=4)])
    positions = [2, 5]
    with torch.no_grad(), edit_values(model, {(LAYER, 0): deltas, (LAYER + 2, 7): 0.5 * deltas}, positions):
        both = model.hf(input_ids=ids, use_cache=False).logits.float()
    for r in range(2):
        with torch.no_grad(), edit_values(model, {(LAYER, 0): deltas[r], (LAYER + 2, 7): 0.5 * deltas[r]}, positions[r]):
            one = model.hf(input_ids=ids[r:r + 1], use_cache=False).logits.float()
        torch.testing.assert_close(both[r:r + 1], one, atol=2e-4, rtol=1e-4)


def test_value_means_are_the_source_values_without_bos(model):
    """Reference: v_proj's output captured by a plain hook, kv head h // group, BOS left out."""
    heads = [(LAYER, 2), (LAYER + 1, 8)]
    means = value_means(model, SOURCE, heads)
    ids = torch.tensor([prompt_ids(model, SOURCE)], device=model.device)
    group = model.meta.n_heads // model.meta.n_kv_heads
    D = model.meta.head_dim
    seen = {}
    hooks = [model.attention_modules[l].v_proj.register_forward_hook(
        lambda m, a, out, l=l: seen.__setitem__(l, out.detach().float())) for l in (LAYER, LAYER + 1)]
    try:
        with torch.no_grad():
            model.hf(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    vals = head_values(model, ids, heads)
    for l, h in heads:
        v = seen[l][0, :, (h // group) * D:(h // group + 1) * D]
        torch.testing.assert_close(vals[(l, h)][0], v)
        torch.testing.assert_close(means[(l, h)], v[1:].mean(0))


def test_sweep_rows_are_single_head_edits(model):
    case = cases_from_facts(load_facts(kind="temporal")[:1])[0]
    heads = [(2, 3), (LAYER, 5), (9, 0)]
    df = value_edit_sweep(model, [case], heads=heads, coeffs=(1.0, 4.0), batch_size=2, progress=False)
    assert len(df) == 6
    target = torch.tensor([prompt_ids(model, case.target)], device=model.device)
    answer = model.tokenizer(" " + case.answer, add_special_tokens=False)["input_ids"]
    full = torch.cat([target, torch.tensor([answer], device=model.device)], 1)
    pos = phrase_positions(model, case.target, case.phrase)[-1]
    means = value_means(model, case.source, heads)

    def answer_logprob():
        with torch.no_grad():
            logp = torch.log_softmax(model.hf(input_ids=full, use_cache=False).logits[0].float(), -1)
        n = target.shape[1]
        return float(sum(logp[n - 1 + i, t] for i, t in enumerate(answer))), int(logp[n - 1].argmax())

    base_lp, base_first = answer_logprob()
    assert df.attrs["baseline"][0]["answer_logprob"] == pytest.approx(base_lp, abs=1e-3)
    for _, row in df.iterrows():
        hd = (int(row["layer"]), int(row["head"]))
        with edit_values(model, {hd: row["coeff"] * means[hd]}, pos):
            lp, first = answer_logprob()
        assert row.answer_logprob == pytest.approx(lp, abs=1e-3)
        assert row.logprob_change == pytest.approx(lp - base_lp, abs=1e-3)
        assert row.first_token_changed == (first != base_first)
        assert row.answer_first == (first == answer[0])
    assert df.logprob_change.abs().max() > 1e-3  # the edits do something
    grid = head_grid(df, model.meta.n_layers, model.meta.n_heads, "first_token_changed", "sum")
    assert grid[2, 3] == df[(df.layer == 2) & (df["head"] == 3)].first_token_changed.sum()
    assert torch.isnan(torch.tensor(grid[0, 0]))
    # the control: the same edit with the target's own value means
    own = value_means(model, case.target, heads)
    row = df.iloc[-1]
    hd = (int(row["layer"]), int(row["head"]))
    with edit_values(model, {hd: row["coeff"] * own[hd]}, pos):
        lp, _ = answer_logprob()
    assert row["control_change"] == pytest.approx(lp - base_lp, abs=1e-3)
    assert row["specific_change"] == pytest.approx(row["logprob_change"] - row["control_change"], abs=1e-5)
    assert head_grid(df, model.meta.n_layers, model.meta.n_heads)[hd] == pytest.approx(
        df[(df.layer == hd[0]) & (df["head"] == hd[1])].specific_change.median())


def test_continuation_check_against_a_direct_generation(model):
    """answer_in_continuation: a greedy continuation under the same edit contains the answer (True for
    the edited row, by construction of the answer); coeff 0 changes nothing and is never checked."""
    head, coeff, n = (LAYER, 0), 40.0, 4
    prompt = torch.tensor([prompt_ids(model, TEXT)], device=model.device)
    pos = phrase_positions(model, TEXT, "2009")[-1]
    delta = coeff * value_means(model, SOURCE, [head])[head]
    with edit_values(model, {head: delta}, pos), torch.no_grad():
        out = model.hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                do_sample=False, pad_token_id=model.tokenizer.eos_token_id)
    with torch.no_grad():
        plain = model.hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                  do_sample=False, pad_token_id=model.tokenizer.eos_token_id)
    edited_text = model.tokenizer.decode(out[0, prompt.shape[1]:])
    assert edited_text != model.tokenizer.decode(plain[0, prompt.shape[1]:])
    answer = edited_text.split()[-1]  # a word only the edited continuation has at its end
    df = value_edit_sweep(model, [ValueEditCase(SOURCE, TEXT, "2009", answer)], heads=[head], coeffs=(0.0, coeff),
                          continuation_tokens=n, control=False, progress=False)
    zero, edited = df.iloc[0], df.iloc[1]
    assert not zero["first_token_changed"] and not zero["answer_in_continuation"]
    assert edited["first_token_changed"] and edited["answer_in_continuation"]


def test_value_edit_refusals(model, ids):
    delta = _delta(model)
    with pytest.raises(InputError, match="D = 64"):
        with edit_values(model, {(LAYER, 0): delta[:10]}, POS):
            pass
    with pytest.raises(InputError, match="non-negative"):
        with edit_values(model, {(LAYER, 0): delta}, -1):
            pass
    with pytest.raises(InputError, match="does not occur"):
        value_edit_sweep(model, [ValueEditCase(SOURCE, TEXT, "1999", "Putin")], heads=[(0, 0)], progress=False)
    with pytest.raises(InputError, match="for 2 examples; this batch has 1"):
        with edit_values(model, {(LAYER, 0): delta}, [POS, POS + 1]), torch.no_grad():
            model.hf(input_ids=ids, use_cache=False)
    with pytest.raises(InputError, match="listed twice"):
        value_edit_sweep(model, [ValueEditCase(SOURCE, TEXT, "2009", "Putin")], heads=[(0, 0), (0, 0)], progress=False)
    with pytest.raises(InputError, match="NaN or inf"):
        LayerEdit(value_delta=torch.full((9, 64), float("nan")), value_keys=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(InputError, match="same B"):
        with edit_values(model, {(LAYER, 0): delta[None].expand(2, -1), (LAYER, 1): delta[None]}, POS):
            pass
    with pytest.raises(InputError, match="both value_delta"):
        LayerEdit(value_delta=torch.zeros(9, 64))
    keys = torch.zeros(1, ids.shape[1], dtype=torch.bool)
    keys[0, POS] = True
    with edit_values(model, {(LAYER, 0): delta}, POS):
        with pytest.raises(InputError, match="keyset_mass"):
            model.run_recorded(ids, stats=StatsRequest(keyset=True), keyset=keys)
        with pytest.raises(InputError, match="one value edit per layer"):
            with edit_values(model, {(LAYER, 1): delta}, POS), torch.no_grad():
                model.hf(input_ids=ids, use_cache=False)


def test_a_zero_ablated_head_stays_zero_under_a_value_edit(model, ids):
    """Head 0 ablated and edited: its output stays 0. Head 1 edited beside it: its output moves by
    p[:, POS] x delta against the ablation alone (p from its recorded q, k)."""
    d0, d1 = _delta(model), _delta(model, seed=6)
    with ablate_heads(model, [(LAYER, 0)]):
        _, alone = model.run_recorded(ids, head_out=[LAYER], qkv=[LAYER], stop_after_layer=LAYER)
        with edit_values(model, {(LAYER, 0): d0, (LAYER, 1): d1}, POS):
            _, rec = model.run_recorded(ids, head_out=[LAYER], stop_after_layer=LAYER)
    z, z0 = rec.z(LAYER)[0].float(), alone.z(LAYER)[0].float()
    assert torch.isfinite(z).all() and (z[:, 0] == 0).all()
    q, k = alone.q[0, 0, 1].float(), alone.k[0, 0, 0].float()
    S = q.shape[0]
    scores = (q @ k.T / model.meta.head_dim ** 0.5).masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    column = torch.softmax(scores, -1)[:, POS]
    torch.testing.assert_close(z[:, 1] - z0[:, 1], column[:, None] * d1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(z[:, 2:], z0[:, 2:], atol=1e-6, rtol=0)


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_size=32,
                       intermediate_size=64, vocab_size=100, sliding_window=4, max_position_embeddings=64,
                       attn_logit_softcapping=5.0)
    return Gemma2ForCausalLM(cfg).eval(), torch.randint(0, 100, (1, 12))


def _bert():
    from headscope.probe import load_model

    m = load_model("all-minilm-l6-v2")
    return m.hf, m.tokenize(["A man is playing a guitar on the stage tonight."])["input_ids"]


@pytest.mark.parametrize("make", [_gemma2, _bert], ids=["gemma2_window_softcap", "bert_bidirectional"])
def test_value_edit_is_the_attention_column_times_delta(make):
    """Any architecture: the edited head's output moves by p[:, pos] x delta, with p from transformers'
    own eager attention (sliding window: queries 4+ tokens later do not move; softcap; bidirectional:
    queries before pos move too)."""
    from eager_reference import eager_patterns
    from headscope.probe import load_model

    hf, ids = make()
    model = load_model(hf)
    layer, head, pos = 0, 1, 5
    delta = _delta(model, seed=5)
    _, base = model.run_recorded(ids, head_out=[layer], stop_after_layer=layer)
    with edit_values(model, {(layer, head): delta}, pos):
        _, edited = model.run_recorded(ids, head_out=[layer], stop_after_layer=layer)
    column = eager_patterns(model, ids)[0, layer, head, :, pos]  # [S]
    moved = edited.z(layer)[0, :, head].float() - base.z(layer)[0, :, head].float()
    torch.testing.assert_close(moved, column[:, None] * delta, atol=1e-5, rtol=1e-4)
    assert column.abs().max() > 0.01
    if model.meta.causal:
        assert (column[pos + 4:] == 0).all() and (column[:pos] == 0).all()
    else:
        assert column[:pos].sum() > 0


def test_positions_and_deltas_in_every_accepted_form(model, ids):
    """An int, a numpy int, a 0-d tensor, a list, a [B, S] mask; a [1, H, D] layer delta for a batch."""
    import numpy as np

    delta = _delta(model, seed=7)
    ids2 = ids.expand(2, -1)

    def logits(positions, batch=ids):
        with torch.no_grad(), edit_values(model, {(LAYER, 3): delta}, positions):
            return model.hf(input_ids=batch, use_cache=False).logits.float()

    ref = logits(POS)
    mask = torch.zeros(1, ids.shape[1], dtype=torch.bool)
    mask[0, POS] = True
    for form in (np.int64(POS), torch.tensor(POS), [POS], np.array([POS]), torch.tensor([POS]), mask):
        torch.testing.assert_close(logits(form), ref)
    both = logits([POS, POS], ids2)
    torch.testing.assert_close(both, ref.expand(2, -1, -1))
    per_layer = torch.zeros(1, model.meta.n_heads, model.meta.head_dim)
    per_layer[0, 3] = delta
    keys = mask.clone()
    with torch.no_grad(), model.edit_attention({LAYER: LayerEdit(value_delta=per_layer, value_keys=keys)}):
        torch.testing.assert_close(model.hf(input_ids=ids2, use_cache=False).logits.float(), both)

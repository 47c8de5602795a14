"""Detectors and their causal checks against references written here in plain torch, on transformers'
eager attention matrices (attn_implementation="eager", output_attentions=True) or hooks on o_proj:
no headscope statistics, kernels or edits are used to compute the expected numbers."""

import numpy as np
import pytest
import torch

from headscope.circuits import DetectorConfig, run_detector
from headscope.circuits import prompts as P
from headscope.circuits.detect_sink import sink_alpha
from headscope.circuits.patching import last_logits, patch_heads
from headscope.circuits.scores import score_grid
from headscope.circuits.validation import random_head_sets
from headscope.probe import load_model

from eager_reference import eager_patterns


def _grid(model, df, column="score"):
    return torch.tensor(score_grid(df, model.meta.n_layers, model.meta.n_heads, column))


def _eager(model, ids):
    """eager_patterns for models (Gemma2) that have no SDPA path to switch back to."""
    impl = model.hf.config._attn_implementation
    model.hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model.hf(input_ids=ids, output_attentions=True, use_cache=False)
    finally:
        model.hf.set_attn_implementation(impl)
    return torch.stack(out.attentions, 1).double()  # [B, L, H, S, S]


# ---- sink: alpha over the queries that can see key 0 ------------------------------------------
def test_sink_alpha_sliding_window_layers_average_over_queries_that_see_key0():
    """DESIGN: alpha = mean attention key 0 receives over all queries that can see it. In a sliding
    window layer (window w < S) only the first w queries see key 0; averaging over all S diluted
    alpha by w / S (0.13 instead of 0.52 here) and Sink_1^eps with it."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_size=32,
                       intermediate_size=64, vocab_size=100, sliding_window=4, max_position_embeddings=64)
    model = load_model(Gemma2ForCausalLM(cfg).eval())
    assert model.meta.sliding_windows == (4, None)
    S = 16
    ids = torch.randint(0, 100, (3, S), generator=torch.Generator().manual_seed(1))
    A = _eager(model, ids)
    i, j = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    sees = torch.stack([(i >= j) & (i - j < 4), i >= j])  # [L, S, S]: query i sees key j
    assert (A[:, 0][..., ~sees[0]] == 0).all()  # the reference's own visibility rule holds
    n_see = sees.sum(1).double()  # [L, S] queries that see each key
    alpha_ref = (A[..., 0].sum(-1) / n_see[None, :, None, 0]).mean(0)  # [L, H]
    share = A.sum(-2) / n_see[None, :, None, :]  # [B, L, H, S]
    judged = (torch.arange(S) >= 1) & (n_see >= 2)[:, None, :]  # [L, 1, S]
    extra_ref = ((share > 0.1) & judged[None]).sum(-1).double().mean(0)
    alpha, extra, _ = sink_alpha(model, ids, DetectorConfig(batch_size=3, progress=False), 0.1, 2)
    assert (alpha - alpha_ref).abs().max() < 1e-5, (alpha, alpha_ref)
    assert (extra - extra_ref).abs().max() < 1e-9, (extra, extra_ref)


@pytest.fixture(scope="module")
def encoder():
    return load_model("all-minilm-l6-v2")


def test_extra_sinks_in_an_encoder_count_every_query(encoder):
    """ACT's rule divides colsum_j by the number of queries that see key j: S - j in a causal model,
    S in a (non-causal) encoder. Dividing by S - j there flagged the last keys of every prompt as
    sinks (1.91 extra sinks per head and prompt on all-MiniLM-L6-v2 at S = 64 instead of 0.125)."""
    m = encoder
    assert not m.meta.causal
    S = 64
    tok, _ = P.text_windows(m.tokenizer, seq_len=S, n=4, seed=0, bos=False)
    A = _eager(m, tok)
    alpha_ref = A[..., 0].mean(-1).mean(0)
    share = A.sum(-2) / S
    extra_ref = ((share > 0.1) & (torch.arange(S) >= 1)).sum(-1).double().mean(0)
    alpha, extra, _ = sink_alpha(m, tok, DetectorConfig(batch_size=4, progress=False), 0.1, 8)
    assert (alpha - alpha_ref).abs().max() < 1e-5
    assert (extra - extra_ref).abs().max() < 1e-9, (float(extra.mean()), float(extra_ref.mean()))


# ---- every score column of the positional detectors against eager attention ------------------
def test_sink_scores_match_eager(model):
    res = run_detector(model, "sink", DetectorConfig(seq_len=32, n_prompts=4, batch_size=4, progress=False,
                                                     validate=False, seed=2, params={"compare_no_bos": False}))
    tok, _ = P.text_windows(model.tokenizer, seq_len=32, n=4, seed=2)
    assert int(tok[0, 0]) == model.tokenizer.bos_token_id
    A = eager_patterns(model, tok).double()
    alpha = A[..., 0].mean(dim=(0, 3))  # key 0 over all 32 queries (all see it)
    assert (_grid(model, res.scores) - alpha).abs().max() < 1e-5
    assert res.summary["sink_ratio"] == pytest.approx(float((alpha > 0.3).double().mean()))
    S = 32
    share = A.sum(-2) / (S - torch.arange(S)).double()
    judged = (torch.arange(S) >= 1) & ((S - torch.arange(S)) >= 8)
    extra = ((share > 0.1) & judged).sum(-1).double().mean(0)
    assert (_grid(model, res.scores, "extra_sinks") - extra).abs().max() < 1e-9


def test_previous_token_score_matches_eager(model):
    res = run_detector(model, "previous_token", DetectorConfig(seq_len=32, n_prompts=4, batch_size=4, progress=False,
                                                               validate=False, seed=2))
    tok, _ = P.text_windows(model.tokenizer, seq_len=32, n=4, seed=2)
    A = eager_patterns(model, tok).double()
    i = torch.arange(2, 32)  # BOS at 0: from query 2, so the previous token is never the BOS sink
    ref = A[..., i, i - 1].mean(dim=(0, 3))
    assert (_grid(model, res.scores) - ref).abs().max() < 1e-5


@pytest.mark.parametrize("kind,shift", [("induction", 1), ("duplicate_token", 0)])
def test_repeat_scores_match_eager(model, kind, shift):
    T = 10
    res = run_detector(model, kind, DetectorConfig(seq_len=2 * T + 1, n_prompts=4, batch_size=4, progress=False,
                                                   validate=False, seed=2))
    tok = P.repeated_random_tokens(model.tokenizer, 4, T, 2, 2, True)
    A = eager_patterns(model, tok).double()
    i = torch.arange(1 + T, 1 + 2 * T)  # the second copy
    ref = A[..., i, i - T + shift].mean(dim=(0, 3))
    got = _grid(model, res.scores)
    assert (got - ref).abs().max() < 1e-5
    assert got.max() > 0.3  # the embedded model has such heads: the comparison is not of zeros
    if kind == "induction":  # Olsson prefix matching, 25 x 4, on the prompts of seed + 1
        Pp, R = 25, 4
        tok = P.repeated_random_tokens(model.tokenizer, 4, Pp, R, 3, True)
        A = eager_patterns(model, tok).double()
        total, n = 0.0, 0
        for b in range(len(tok)):
            for q in range(1 + Pp, tok.shape[1]):
                keys = [k for k in range(1, q + 1) if tok[b, k - 1] == tok[b, q]]
                total = total + A[b, :, :, q, keys].sum(-1)
                n += 1
        assert (_grid(model, res.scores, "prefix_matching") - total / n).abs().max() < 1e-5


# ---- causal checks ------------------------------------------------------------------------------
def test_random_head_sets_exclude_top_and_follow_seeds():
    top = [(0, 0), (1, 2), (3, 4)]
    sets = random_head_sets(4, 5, 3, 6, seed=7, exclude=top)
    pool = [(l, h) for l in range(4) for h in range(5) if (l, h) not in top]
    for i, s in enumerate(sets):
        assert len(set(s)) == 3 and not set(s) & set(top)
        idx = np.random.default_rng(7 + i).choice(len(pool), size=3, replace=False)
        assert s == sorted(pool[j] for j in idx)


# ---- patching with padding ------------------------------------------------------------------------
TEXTS = ["In 2010 the president of the United States was Barack", "Rain fell."]


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_logits_reads_the_last_real_token(model, side):
    """last_logits took position mask.sum() - 1, the last real token only under right padding: with
    left padding it read a pad position's logits (max difference 30.9 on this batch)."""
    batch = model.tokenize(TEXTS, prepend_bos=True, padding_side=side)
    got = last_logits(model, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        ref = torch.stack([model.hf(**model.tokenize(t, prepend_bos=True), use_cache=False).logits[0, -1]
                           for t in TEXTS]).float()
    assert (got - ref).abs().max() < 1e-3


def test_patch_heads_left_padded_matches_unpadded(model):
    clean = model.tokenize(["In 2010 the president of the United States was", "Rain fell on the town."],
                           prepend_bos=True, padding_side="left")
    corrupt = model.tokenize(["In 2018 the president of the United States was", "Snow fell on the town."],
                             prepend_bos=True, padding_side="left")
    assert torch.equal(clean["attention_mask"], corrupt["attention_mask"])
    assert not clean["attention_mask"].all()
    heads = [(3, 1), (14, 6), (25, 2)]
    tok = model.tokenizer(" Barack")["input_ids"][0]

    def metric(logits):
        return logits[:, tok].mean()

    got = patch_heads(model, clean["input_ids"], corrupt["input_ids"], metric, heads=heads,
                      attention_mask=clean["attention_mask"])
    # reference: each prompt pair unpadded, one at a time; the metric is a mean over prompts
    ref = torch.zeros(len(heads))
    for b in range(2):
        keep = clean["attention_mask"][b].bool()
        eff = patch_heads(model, clean["input_ids"][b, keep], corrupt["input_ids"][b, keep], metric, heads=heads)
        ref += torch.stack([eff[l, h] for l, h in heads]) / 2
    assert (torch.stack([got[l, h] for l, h in heads]) - ref).abs().max() < 1e-3


# ---- sizes that leave nothing to measure --------------------------------------------------------
@pytest.mark.parametrize("kind,field,value", [("retrieval", "n_prompts", 0), ("retrieval", "n_prompts", -1),
                                              ("retrieval", "seq_len", 0), ("temporal", "n_prompts", 0),
                                              ("temporal", "n_prompts", -2)])
def test_retrieval_and_temporal_refuse_empty_sizes(model, monkeypatch, kind, field, value):
    """None means the published default; 0 ran the default (6 trials, 24 facts, 512 tokens) and a
    negative count ran no trial and reported that 'the model retrieved no needle in 0 trials'.
    Like the other detectors they refuse it, before any forward."""
    from headscope.probe.errors import InputError

    calls = []
    monkeypatch.setattr(model.hf, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(InputError, match=field):
        run_detector(model, kind, DetectorConfig(progress=False, **{field: value}))
    assert calls == []


def test_validation_refuses_an_empty_head_set():
    """k = 0 compared two empty ablations and reported 'the top-0 heads are no more harmful than random'."""
    from headscope.circuits.validation import validate_heads
    from headscope.probe.errors import InputError

    with pytest.raises(InputError, match="k must be >= 1"):
        validate_heads(None, "sink", [(0, 0)], lambda m: 0.0, k=0, n_random=2)


# ---- interventions against plain torch hooks on o_proj / a plain softmax -----------------------
def _o_proj_hooked(model, ids, mask, replace, eager=True):
    """Logits with o_proj's input of each layer in `replace` rewritten by replace[layer](x [B, S, H, D], vs)
    (vs: that layer's v_proj output), under transformers' eager attention."""
    H, D = model.meta.n_heads, model.meta.head_dim
    hooks, vs = [], {}
    for l, fn in replace.items():
        att = model.attention_modules[l]
        hooks.append(att.v_proj.register_forward_hook(lambda mod, i, o, l=l: vs.__setitem__(l, o)))

        def pre(mod, args, l=l, fn=fn):
            x = args[0].clone()
            return (fn(x.view(*x.shape[:2], H, D), vs[l]).reshape(x.shape),)
        hooks.append(att.o_proj.register_forward_pre_hook(pre))
    impl = model.hf.config._attn_implementation
    if eager:
        model.hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model.hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
    finally:
        model.hf.set_attn_implementation(impl)
        for h in hooks:
            h.remove()


ABLATED = [(3, 1), (3, 5), (10, 8), (20, 0)]  # heads 1 and 5 of layer 3 read different kv heads (GQA 9/3)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("mode", ["zero", "uniform"])
def test_ablate_heads_matches_o_proj_reference(model, mode, side):
    """zero: the head writes nothing; uniform: z_i = mean of v_j over the real keys j <= i (its kv head)."""
    from headscope.circuits.ablation import ablate_heads

    batch = model.tokenize(["The cat sat on the warm mat by the door and slept.", "Rain fell."], prepend_bos=True,
                           padding_side=side)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    H, Hkv, D = model.meta.n_heads, model.meta.n_kv_heads, model.meta.head_dim
    S = ids.shape[1]
    allowed = torch.ones(S, S).tril().bool()[None] & mask.bool()[:, None, :]
    w = allowed.float() / allowed.float().sum(-1, keepdim=True).clamp_min(1)  # [B, S, S] uniform rows

    def fn_for(layer):
        def fn(x, v):
            for l, h in ABLATED:
                if l == layer:
                    x[:, :, h] = 0 if mode == "zero" else w @ v.view(*v.shape[:2], Hkv, D)[:, :, h // (H // Hkv)]
            return x
        return fn

    ref = _o_proj_hooked(model, ids, mask, {l: fn_for(l) for l in {l for l, _ in ABLATED}})
    with ablate_heads(model, ABLATED, mode), torch.no_grad():
        got = model.hf(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        plain = model.hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got - ref)[real].abs().max() < 1e-3
    assert (got - plain)[real].abs().max() > 1.0  # the ablation changes the logits


def test_mean_and_resample_ablation_match_o_proj_reference(model):
    from headscope.circuits.interventions import mean_ablate, mean_z, resample_ablate

    H, D = model.meta.n_heads, model.meta.head_dim
    heads = [(4, 2), (4, 7), (9, 0)]
    ref_batch = model.tokenize(["The cat sat on the warm mat by the door.", "Rain fell over the quiet town."],
                               prepend_bos=True)
    src = model.tokenize(["Numbers like seven and eight follow six in order here, and nine after them."],
                         prepend_bos=True)
    tgt = model.tokenize(["A completely different sentence about ships and the sea."], prepend_bos=True)
    S = tgt["input_ids"].shape[1]
    saved = {}

    def grab(batch):
        saved.clear()
        hs = [model.attention_modules[l].o_proj.register_forward_pre_hook(
            lambda mod, a, l=l: saved.__setitem__(l, a[0].detach().clone().view(*a[0].shape[:2], H, D)))
            for l in (4, 9)]
        with torch.no_grad():
            model.hf(**batch, use_cache=False)
        for h in hs:
            h.remove()
        return dict(saved)

    real = ref_batch["attention_mask"].bool()
    z_ref = {l: z[real].double().mean(0).float() for l, z in grab(ref_batch).items()}  # [H, D] over real tokens
    z_src = grab(src)

    def put(values):
        def fn_for(layer):
            def fn(x, v):
                for l, h in heads:
                    if l == layer:
                        x[:, :, h] = values(layer, h)
                return x
            return fn
        return _o_proj_hooked(model, tgt["input_ids"], tgt["attention_mask"], {l: fn_for(l) for l in (4, 9)},
                              eager=False)

    with mean_ablate(model, heads, mean_z(model, [ref_batch], heads)), torch.no_grad():
        got = model.hf(**tgt).logits
    assert (got - put(lambda l, h: z_ref[l][h])).abs().max() < 1e-3
    with resample_ablate(model, heads, src), torch.no_grad():
        got = model.hf(**tgt).logits
    assert (got - put(lambda l, h: z_src[l][:, :S, h])).abs().max() < 1e-3


def test_sink_removal_matches_plain_softmax_reference(model):
    """without_sink (the sink check's intervention): in the chosen heads p'_i0 = beta p_i0 and the other
    keys get p_ij (1 - beta p_i0) / (1 - p_i0) (ACT arithmetic, beta -> 0), rows that hold nothing
    elsewhere (row 0) unchanged; computed here on a float64 softmax of q k^T."""
    from transformers import AttentionInterface

    from headscope.circuits.detect_sink import without_sink

    heads = [(2, 3), (2, 5), (15, 0), (27, 8)]
    tok, _ = P.text_windows(model.tokenizer, seq_len=32, n=2, seed=1)

    def ref_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        B, H, S, D = query.shape
        rep = H // key.shape[1]
        k, v = key.repeat_interleave(rep, 1).double(), value.repeat_interleave(rep, 1).double()
        s = query.double() @ k.transpose(-1, -2) * (scaling if scaling is not None else D ** -0.5)
        s = s.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
        p = torch.softmax(s, -1)
        for l, h in heads:
            if l == module.layer_idx:
                s0 = p[:, h, :, :1]
                new = torch.cat([p[:, h, :, :1] * 1e-6, p[:, h, :, 1:] * (1 - 1e-6 * s0) / (1 - s0).clamp_min(1e-30)], -1)
                p[:, h] = torch.where(1 - s0 > 1e-6, new, p[:, h])
        return (p @ v).to(query.dtype).transpose(1, 2).contiguous(), p

    AttentionInterface.register("review_sink_reference", ref_attention)
    impl = model.hf.config._attn_implementation
    model.hf.set_attn_implementation("review_sink_reference")
    try:
        with torch.no_grad():
            ref = model.hf(input_ids=tok, use_cache=False).logits
    finally:
        model.hf.set_attn_implementation(impl)
    with without_sink(model, heads, 2, 32), torch.no_grad():
        got = model.hf(input_ids=tok, use_cache=False).logits
    with torch.no_grad():
        plain = model.hf(input_ids=tok, use_cache=False).logits
    assert (got - ref).abs().max() < 1e-3
    assert (got - plain).abs().max() > 1.0


def test_importance_is_the_mean_of_per_example_absolute_gradients(model):
    """Michel et al.: I_h = E_x |dL(x)/dxi_h|, the absolute value per example before the mean (with one
    example, |E dL/dxi| would pass too). Reference: a gate on o_proj's input, autograd per unpadded text."""
    from headscope.circuits.importance import head_importance

    texts = ["The cat sat on the warm mat by the door and slept all day.", "Rain fell.",
             "Numbers like seven and eight follow six."]
    L, H, D = model.meta.n_layers, model.meta.n_heads, model.meta.head_dim
    total = torch.zeros(L, H, dtype=torch.float64)
    signed = torch.zeros(L, H, dtype=torch.float64)
    for t in texts:
        ids = model.tokenize(t, prepend_bos=True)["input_ids"]
        gate = torch.ones(L, H, requires_grad=True)
        hooks = [model.attention_modules[l].o_proj.register_forward_pre_hook(
            lambda mod, a, l=l: ((a[0].view(*a[0].shape[:2], H, D) * gate[l][:, None]).view(a[0].shape),))
            for l in range(L)]
        try:
            with torch.enable_grad():
                logits = model.hf(input_ids=ids, use_cache=False).logits
                loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
                g, = torch.autograd.grad(loss, gate)
        finally:
            for h in hooks:
                h.remove()
        total += g.abs().double()
        signed += g.double()
    ref = (total / len(texts)).float()
    assert (ref - (signed / len(texts)).abs().float()).abs().max() > 1e-3  # the two readings differ here
    imp = head_importance(model, texts, normalize=False)
    assert ((imp - ref).abs().max() / ref.abs().max()) < 1e-3
    torch.testing.assert_close(head_importance(model, texts), ref / ref.norm(dim=1, keepdim=True), atol=1e-4, rtol=1e-3)


def test_sink_check_uses_the_asked_number_of_prompts(model, monkeypatch):
    """validation_prompts was rounded to a multiple of batch_size (6 with batch 4 became 4): every
    asked prompt must be used, in batches of one size (the sink key set's)."""
    import headscope.circuits.detect_sink as ds

    asked = []
    real = ds.text_windows
    monkeypatch.setattr(ds, "text_windows", lambda tok, texts, T, n, *a, **k: asked.append(n) or real(tok, texts, T, n, *a, **k))
    res = run_detector(model, "sink", DetectorConfig(seq_len=16, n_prompts=2, batch_size=4, top_k=2, n_random=1,
                                                     progress=False,
                                                     params={"validation_prompts": 6, "compare_no_bos": False}))
    assert asked[-1] == 6 and res.validation is not None

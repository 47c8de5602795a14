"""Sink / previous-token / induction / duplicate-token detectors on the embedded model.

References: TransformerLens' own head_detector functions on a TransformerBridge of the same
weights; materialised attention patterns; causal ablation against random head sets.
"""

import numpy as np
import pytest
import torch

from headscope.circuits import DetectorConfig, run_detector, top_heads
from headscope.circuits import prompts as P
from headscope.circuits.detect_positional import detect_induction, detect_previous_token
from headscope.circuits.detect_sink import detect_sink
from headscope.circuits.tl_compat import tl_compatible_scores, tl_request
from headscope.kernels.stats import StatsRequest
from headscope.probe.errors import InputError

hd = pytest.importorskip("transformer_lens.head_detector")
KINDS = ["previous_token", "duplicate_token", "induction"]
EXCLUSIONS = [(False, False), (True, False), (False, True), (True, True)]


@pytest.fixture(scope="module")
def bridge():
    """A TransformerBridge on a separate copy of the embedded model (the bridge rewires its model)."""
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    from headscope.probe import load_model

    other = load_model()
    return build_bridge_from_module(other.hf, type(other.hf).__name__, hf_config=other.hf.config,
                                    tokenizer=other.tokenizer)


@pytest.fixture(scope="module")
def tl_prompts(model):
    rep = P.repeated_random_tokens(model.tokenizer, 2, 11, seed=0)  # [2, 23]
    nat, _ = P.text_windows(model.tokenizer, seq_len=23, n=2, seed=5)
    return torch.cat([rep, nat])


@pytest.fixture(scope="module")
def bridge_patterns(bridge, tl_prompts):
    """[B, L, H, S, S] patterns from the bridge's hook_pattern cache, one prompt per run as TL does."""
    pats = []
    for b in range(len(tl_prompts)):
        _, cache = bridge.run_with_cache(tl_prompts[b:b + 1], remove_batch_dim=True)
        pats.append(torch.stack([cache["pattern", l] for l in range(bridge.cfg.n_layers)]))
    return torch.stack(pats)


def _tl_reference(patterns, tokens, kind, measure, eb, ec):
    """TL's detection pattern and similarity function on the bridge's patterns.

    Returns (scores [B, L, H], masked row mass [B, L, H]). detect_head itself re-tokenizes strings,
    and random token ids do not survive a decode/encode round trip, so for these prompts we call the
    two functions detect_head is made of on the bridge's patterns (test_detect_head_on_text calls
    detect_head itself).
    """
    B, L, H = patterns.shape[:3]
    out = torch.zeros(B, L, H, dtype=torch.float64)
    kept = torch.zeros(B, L, H, dtype=torch.float64)
    for b in range(B):
        D = getattr(hd, f"get_{kind}_head_detection_pattern")(tokens[b:b + 1])
        for l in range(L):
            for h in range(H):
                A = patterns[b, l, h].clone()
                out[b, l, h] = hd.compute_head_attention_similarity_score(
                    A, D, exclude_bos=eb, exclude_current_token=ec, error_measure=measure)
                if eb:
                    A[:, 0] = 0
                if ec:
                    A.fill_diagonal_(0)
                kept[b, l, h] = A.sum() / len(A)
    return out, kept


@pytest.mark.parametrize("kind", KINDS)
def test_tl_compatible_scores_match_transformer_lens(model, bridge_patterns, tl_prompts, kind):
    _, rec = model.run_recorded(tl_prompts, torch.ones_like(tl_prompts), tl_request())
    exact, total = 0, 0
    for measure in ("mul", "abs"):
        for eb, ec in EXCLUSIONS:
            ref, kept = _tl_reference(bridge_patterns, tl_prompts, kind, measure, eb, ec)
            ours = tl_compatible_scores(rec, kind, measure, eb, ec, per_prompt=True)
            tol = torch.full_like(kept, 1e-4)
            if measure == "abs":
                raw = 1 - tl_compatible_scores(rec, kind, measure, eb, ec, per_prompt=True, round_abs=False)
                tie = ((raw * 1000) % 1 - 0.5).abs() < 0.01  # TL rounds to 3 decimals: skip exact ties
                tol = torch.where(tie, torch.full_like(tol, 1.1e-3), torch.full_like(tol, 1e-4))
            diff = (ours - ref).abs()
            assert (diff <= tol).all(), (measure, eb, ec, float((diff - tol).max()))
            exact += int((tol <= 1e-4).sum())
            total += tol.numel()
    print(f"{kind}: {exact}/{total} prompt-head scores compared at 1e-4, the rest are abs-measure rounding ties")
    assert exact > 0.97 * total


def test_detect_head_on_text(model, bridge):
    """detect_head itself (string prompts, TL's own BOS handling) vs ours on the same tokens."""
    texts = ["The cat sat on the mat and the cat slept on the mat.",
             "Rivers change their course over time, and rivers carry sand far downstream."]
    batch = model.tokenize(texts, prepend_bos=True)
    for t, row in zip(texts, batch["input_ids"]):
        n = len(bridge.to_tokens(t)[0])
        assert torch.equal(bridge.to_tokens(t)[0], row[:n])
    recs = [model.run_recorded(model.tokenize(t, prepend_bos=True)["input_ids"], None, tl_request())[1]
            for t in texts]
    for kind in KINDS:
        for measure in ("mul", "abs"):
            for eb, ec in EXCLUSIONS:
                ref = hd.detect_head(bridge, texts, f"{kind}_head", exclude_bos=eb, exclude_current_token=ec,
                                     error_measure=measure)
                ours = torch.stack([tl_compatible_scores(r, kind, measure, eb, ec) for r in recs]).mean(0)
                assert (ours - ref.double()).abs().max() < 1e-4, (kind, measure, eb, ec)


@pytest.fixture(scope="module")
def induction(model):
    return detect_induction(model, DetectorConfig(n_prompts=8, batch_size=8, progress=False, n_random=5, top_k=8))


def test_induction_heads_cause_repeated_half_loss(induction):
    v = induction.validation
    ratio = v.top_k_damage / v.random_median
    print(f"induction top-8 {top_heads(induction.scores, 8)} damage {v.top_k_damage:.3f} "
          f"vs random median {v.random_median:.3f} (ratio {ratio:.1f})")
    assert v.passed and v.top_k_damage >= 2 * v.random_median
    assert len(v.random_k_damage) == 5
    df = induction.scores
    best = df.iloc[0]
    assert best.score > 0.3 and best.prefix_matching > 0.3
    # the offset score and TL's match-based score agree on which heads are induction heads
    assert np.corrcoef(df.score, df.tl_mul)[0, 1] > 0.9


def test_previous_token_heads_cause_damage(model):
    res = detect_previous_token(model, DetectorConfig(n_prompts=8, progress=False, n_random=5, top_k=8))
    v = res.validation
    print(f"previous-token top-8 {top_heads(res.scores, 8)} damage {v.top_k_damage:.3f} "
          f"vs random median {v.random_median:.3f}")
    assert v.passed and v.top_k_damage >= 2 * v.random_median
    assert res.scores.iloc[0].score > 0.5


def test_sink_alpha_equals_materialised_column_zero(model):
    cfg = DetectorConfig(seq_len=64, n_prompts=6, batch_size=6, progress=False, validate=False,
                         params={"compare_no_bos": False})
    res = detect_sink(model, cfg)
    tokens, _ = P.text_windows(model.tokenizer, seq_len=64, n=6, seed=0)
    _, rec = model.run_recorded(tokens, torch.ones_like(tokens), StatsRequest(), patterns=True)
    alpha = rec.patterns[..., 0].double().mean(dim=(0, 3))  # [L, H]: column 0 over all rows and prompts
    got = torch.tensor(np.array([res.scores.set_index(["layer", "head"]).score.loc[(l, h)]
                                 for l in range(30) for h in range(9)])).view(30, 9)
    assert (got - alpha).abs().max() < 1e-5
    assert res.summary["sink_ratio"] == pytest.approx(float((alpha > 0.3).double().mean()))
    print(f"Sink_1^0.3 at T=64: {res.summary['sink_ratio_percent']}%")


def test_same_seed_same_scores(model):
    cfg = dict(seq_len=33, n_prompts=4, progress=False, validate=False)
    a = run_detector(model, "duplicate_token", DetectorConfig(seed=3, **cfg)).scores
    b = run_detector(model, "duplicate_token", DetectorConfig(seed=3, **cfg)).scores
    c = run_detector(model, "duplicate_token", DetectorConfig(seed=4, **cfg)).scores
    assert a.equals(b)
    assert not np.allclose(a.sort_values(["layer", "head"]).score, c.sort_values(["layer", "head"]).score)


@pytest.mark.parametrize("kind,seq_len", [("induction", 8), ("duplicate_token", 5), ("previous_token", 2),
                                          ("sink", 1)])
def test_seq_len_too_short(model, kind, seq_len):
    with pytest.raises(InputError, match="seq_len"):
        run_detector(model, kind, DetectorConfig(seq_len=seq_len, n_prompts=2, progress=False))


def test_bad_sizes_fail_before_recording(model, monkeypatch):
    """previous_token's validation set needs a longer seq_len than its detection pass, and a sink run
    needs a prompt: both are refused before any forward (not after the detection work)."""
    calls = []
    monkeypatch.setattr(model.hf, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(InputError, match="validation runs on"):
        run_detector(model, "previous_token", DetectorConfig(seq_len=8, n_prompts=2, progress=False))
    with pytest.raises(InputError, match="n_prompts"):
        run_detector(model, "sink", DetectorConfig(seq_len=16, n_prompts=0, progress=False))
    assert calls == []


def test_ablation_delta_of_each_top_induction_head_against_a_plain_hook(model):
    """--ablate-each: each top head's ablation_delta is the repeated-half loss with that head's o_proj
    input columns zeroed by a plain hook, minus the loss without it (same validation tokens)."""
    import torch.nn.functional as F

    from headscope.circuits.detect_positional import _repeat_validation_set

    cfg = DetectorConfig(n_prompts=4, batch_size=4, progress=False, n_random=2, top_k=3, ablate_each=True)
    res = detect_induction(model, cfg)
    tokens, targets, _ = _repeat_validation_set(model, cfg)
    D = model.meta.head_dim

    def loss(head=None):
        hook = None
        if head is not None:
            l, h = head

            def zero(mod, args):
                x = args[0].clone()
                x[..., h * D:(h + 1) * D] = 0
                return (x,)
            hook = model.attention_modules[l].o_proj.register_forward_pre_hook(zero)
        try:
            with torch.no_grad():
                logits = model.hf(input_ids=tokens, use_cache=False).logits.float()
        finally:
            if hook is not None:
                hook.remove()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
        return float(nll[targets[:, 1:]].mean())

    base = loss()
    got = res.scores.dropna(subset=["ablation_delta"])
    assert len(got) == 3
    for _, row in got.iterrows():
        assert row["ablation_delta"] == pytest.approx(loss((int(row["layer"]), int(row["head"]))) - base, abs=2e-4)
    assert got["ablation_delta"].max() > 0.01  # a top induction head matters on its own

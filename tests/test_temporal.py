"""Temporal heads (Park et al. 2025 proxy): the shipped fact set, candidate-probability evaluation
against a plain per-candidate computation, year attention against eager attention, and the detector
with its temporal-vs-invariant causal check on the embedded model."""

import pytest
import torch

from headscope.circuits.detect_temporal import detect_temporal, year_attention
from headscope.circuits.detectors import DetectorConfig
from headscope.circuits.temporal import (answer_ids, candidate_eval, candidate_probability, load_facts,
                                         phrase_positions, prompt_ids)
from headscope.probe.errors import InputError

from eager_reference import eager_patterns


def test_fact_set_shape(model):
    facts = load_facts()
    temporal = [f for f in facts if f.kind == "temporal"]
    invariant = [f for f in facts if f.kind == "invariant"]
    assert len(temporal) >= 30 and len(invariant) >= 15
    for f in facts:
        assert len(prompt_ids(model, f.prompt)) == len(prompt_ids(model, f.corrupt_prompt)), f.prompt
        pos = phrase_positions(model, f.prompt, f.year)
        assert model.tokenizer.decode(torch.tensor(prompt_ids(model, f.prompt))[pos]).strip() == f.year
        if f.kind == "temporal":
            assert f.answer != f.corrupt_answer and f.year != f.corrupt_year
            assert answer_ids(model, f.answer)[0] != answer_ids(model, f.corrupt_answer)[0], f.prompt
        else:
            assert f.answer == f.corrupt_answer


def test_load_facts_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "temporal", "prompt": "x"}\n')
    with pytest.raises(InputError, match="missing fields"):
        load_facts(bad)
    with pytest.raises(InputError, match="cannot read"):
        load_facts(tmp_path / "nope.jsonl")


def _manual_prob(model, prompt, candidates, true):
    """One unpadded forward per candidate, log-probs summed by hand."""
    p = prompt_ids(model, prompt)
    lps = []
    for c in candidates:
        a = answer_ids(model, c)
        with torch.no_grad():
            logits = model.hf(input_ids=torch.tensor([p + a]), use_cache=False).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        lps.append(sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(a)))
    lps = torch.tensor(lps)
    return float(torch.softmax(lps, 0)[candidates.index(true)]), int(lps.argmax()) == candidates.index(true)


def test_candidate_probability_matches_manual(model):
    facts = load_facts()
    pick = [facts[0], facts[20], [f for f in facts if f.kind == "invariant"][0]]
    probs, ok = candidate_eval(model, pick, batch_size=5)  # batches cut through facts, with padding
    for f, p, o in zip(pick, probs, ok):
        ref, ref_ok = _manual_prob(model, f.prompt, list(f.candidates), f.answer)
        assert float(p) == pytest.approx(ref, abs=1e-4)
        assert bool(o) == ref_ok
    corrupt = candidate_probability(model, pick[:1], use_corrupt=True)
    ref, _ = _manual_prob(model, pick[0].corrupt_prompt, list(pick[0].candidates), pick[0].corrupt_answer)
    assert float(corrupt[0]) == pytest.approx(ref, abs=1e-4)


def test_year_attention_matches_eager(model):
    f = load_facts(kind="temporal")[0]
    ours = year_attention(model, [f])
    ids = torch.tensor([prompt_ids(model, f.prompt)])
    att = eager_patterns(model, ids).unbind(1)  # per layer [B, H, S, S]
    pos = phrase_positions(model, f.prompt, f.year)
    ref = torch.stack([a[0, :, -1, pos].sum(-1) for a in att]).float()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_temporal_detector_and_validation(model):
    cfg = DetectorConfig(n_prompts=2, top_k=8, n_random=2, progress=False)
    res = detect_temporal(model, cfg)
    s = res.summary
    assert s["n_temporal"] >= 30 and s["n_invariant"] >= 15 and s["n_patched"] == 2 == s["n_patched_used"]
    assert 0 < s["temporal_candidate_prob"] < 1 and 0 < s["invariant_candidate_prob"] < 1
    assert s["patching"]["n_year_sensitive"] >= 2  # facts whose year steers the answer exist
    df = res.scores
    assert df["score"].notna().all()
    assert ((df["year_mass"] >= 0) & (df["year_mass"] <= 1 + 1e-5)).all()
    v = res.validation
    assert v is not None and v.baseline > s["temporal_candidate_prob"]  # validated on the facts it knows
    assert len(v.random_k_damage) == 2 and "invariant" in v.notes
    inv = s["invariant_validation"]
    assert inv["baseline"] == pytest.approx(s["invariant_candidate_prob"])
    # the same numbers, named the same way, as the verdict's control in to_dict()
    ctl = v.to_dict()["control"]
    assert inv["random_k_damage"] == pytest.approx(ctl["random_k_damage"])
    assert inv["random_k_damage_all"] == pytest.approx(ctl["random_k_damage_all"])


def test_temporal_patching_by_attribution(model, monkeypatch):
    """method="attribution": the score is the mean first-order effect over the patched facts over the
    mean logit-difference gap, each effect from attribution_patch_heads (itself checked against a
    central difference in test_patching.py); detect_temporal passes its "patching" parameter on."""
    from headscope.circuits import detect_temporal as dt
    from headscope.circuits.patching import attribution_patch_heads

    facts = load_facts(kind="temporal")[:4]
    score, info = dt.temporal_patching(model, facts, 2, method="attribution")
    used = [next(f for f in facts if f.prompt == k["prompt"]) for k in info["facts"]]
    assert len(used) == 2
    effects, gaps = [], []
    for f in used:
        clean, corrupt, a, b = dt._pair(model, f)
        effects.append(attribution_patch_heads(model, clean, corrupt, lambda lg, a=a, b=b: (lg[:, a] - lg[:, b]).mean()))
        lc, lx = dt.logit_gaps(model, [f])[0]
        gaps.append(lc - lx)
    torch.testing.assert_close(score, torch.stack(effects).mean(0) / (sum(gaps) / len(gaps)), atol=1e-5, rtol=1e-4)
    with pytest.raises(InputError, match="patching must be one of"):
        dt.temporal_patching(model, facts[:1], 1, method="gradient")

    asked = {}

    def fake(model, facts, n, heads_per_batch, progress, method):
        asked["method"] = method
        return torch.zeros(model.meta.n_layers, model.meta.n_heads), {"facts": [], "n_year_sensitive": 0}

    monkeypatch.setattr(dt, "temporal_patching", fake)
    res = detect_temporal(model, DetectorConfig(n_prompts=1, validate=False, params={"patching": "attribution"}))
    assert asked["method"] == "attribution" == res.summary["patching"]["method"]
    with pytest.raises(InputError, match="patching must be one of"):
        detect_temporal(model, DetectorConfig(n_prompts=1, validate=False, params={"patching": "eap-ig"}))

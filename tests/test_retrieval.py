"""Retrieval heads (Wu et al. 2024): aggregation against the published Figure 3, ROUGE-1 by hand,
needle prompt construction, hit counting against transformers' eager attention matrix, and the
detector with its causal check on the embedded model."""

import json
import re
from pathlib import Path

import pytest
import torch

from headscope.circuits.detect_retrieval import aggregate_retrieval, detect_retrieval, grid_walk, hit_scores, run_trial
from headscope.circuits.detectors import DetectorConfig, run_detector
from headscope.circuits.needle import NEEDLES, build_needle_prompt, haystack_sentences, rouge1_recall
from headscope.probe.errors import InputError

from eager_reference import eager_patterns


def _fixtures() -> Path | None:
    for base in (Path(__file__).parents[2] / "shared" / "fixtures", Path("/work/shared/fixtures")):
        if (base / "retrieval_head_scores").is_dir():
            return base / "retrieval_head_scores"
    return None


# Figure 3 of Wu et al. 2024, as tabulated in shared/fixtures/README.md (percent, 0.1% precision).
FIGURE3 = {
    "llama-2-7b-80k.json": (1024, 70.2, 26.6, 2.6, 0.6, 33),
    "Mistral-7B-v0.2-hf.json": (1024, 65.0, 30.8, 3.7, 0.5, 43),
}
LLAMA_TOP = [((16, 19), 0.94), ((11, 15), 0.92), ((8, 26), 0.80), ((6, 9), 0.62), ((7, 12), 0.61)]


@pytest.mark.parametrize("name", sorted(FIGURE3))
def test_aggregation_reproduces_figure3(name):
    folder = _fixtures()
    if folder is None:
        pytest.skip("shared/fixtures/retrieval_head_scores not found beside the repo nor at /work/shared/fixtures")
    per_trial = json.loads((folder / name).read_text())
    df, summary = aggregate_retrieval(per_trial)
    n, zero, low, mid, high, n_ret = FIGURE3[name]
    assert summary["n_heads"] == n == len(df)
    assert round(100 * summary["frac_zero"], 1) == zero
    assert round(100 * summary["frac_0_0.1"], 1) == low
    assert round(100 * summary["frac_0.1_0.5"], 1) == mid
    assert round(100 * summary["frac_above_0.5"], 1) == high
    assert summary["n_retrieval_heads"] == n_ret == int(df["retrieval_head"].sum())
    if name.startswith("llama"):
        top = [((t["layer"], t["head"]), round(t["score"], 2)) for t in summary["top_heads"]]
        assert top == LLAMA_TOP
        best = df.sort_values("rank").head(5)
        assert [(int(l), int(h)) for l, h in zip(best["layer"], best["head"])] == [lh for lh, _ in LLAMA_TOP]


def test_aggregation_bad_keys():
    with pytest.raises(InputError, match="layer-head"):
        aggregate_retrieval({"a": [0.1]})
    with pytest.raises(InputError):
        aggregate_retrieval({})


@pytest.mark.parametrize("nL,nD", [(1, 2), (2, 3), (3, 2), (3, 4), (2, 2), (4, 6)])
def test_grid_walk_visits_every_cell_before_repeating(nL, nD):
    lengths, depths = list(range(nL)), [d / 10 for d in range(nD)]
    walk = grid_walk(lengths, depths)
    assert sorted(walk) == sorted((a, b) for a in lengths for b in depths)
    first = walk[:max(nL, nD)]
    assert {a for a, _ in first} == set(lengths) and {b for _, b in first} == set(depths)


def test_rouge1_recall_by_hand():
    # reference words: the x2, cat, sat, on, mat (6); hypothesis has the x1, cat, on, mat -> 4 / 6
    assert rouge1_recall("The cat sat on the mat.", "the cat on a mat") == pytest.approx(4 / 6)
    assert rouge1_recall("Captain Biscuit.", "It is named captain BISCUIT!") == 1.0
    assert rouge1_recall("a a b", "a a a a") == pytest.approx(2 / 3)  # counts are clipped
    assert rouge1_recall("purple elephant seven", "") == 0.0
    assert rouge1_recall("Taipei 101 tower", "taipei-101") == pytest.approx(2 / 3)
    with pytest.raises(InputError):
        rouge1_recall("...", "x")


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_prompt_construction(model, depth):
    tok = model.tokenizer
    needle = NEEDLES[0]
    p = build_needle_prompt(tok, needle, 400, depth)
    a, b = p.needle_chars
    assert p.text[a:b] == needle.text
    before, after = p.text[:a], p.text[b:]
    sentences = haystack_sentences()
    # at a sentence boundary: the context before ends a haystack sentence, the one after starts one
    if depth > 0:
        assert before.endswith(" ") and before.rstrip()[-1] in ".!?"
        assert any(before.rstrip().endswith(s) for s in sentences)
    if depth < 1:
        assert any(after.startswith(" " + s) for s in sentences)
    assert abs(p.insert_depth - depth) < 0.12
    # the answer span holds exactly the answer's tokens
    s0, s1 = p.answer_span
    assert tok.decode(p.input_ids[s0:s1]).strip() == needle.answer_text
    assert s0 > 0 and s1 < len(p.input_ids)
    # the haystack plus needle stay within the asked context length and close to it
    ctx = p.text[p.text.index(sentences[0]): p.text.index("\n\n")]
    n_ctx = len(tok(ctx, add_special_tokens=False)["input_ids"])
    assert 400 - 60 <= n_ctx <= 400 + 2
    # question after the context, inside the chat template, BOS (<|im_start|>) first
    assert p.text.index(needle.question) > b
    assert p.text.startswith("<|im_start|>") and p.text.rstrip().endswith("assistant")
    assert int(p.input_ids[0]) == tok.bos_token_id
    assert p.input_ids.tolist() == tok(p.text, add_special_tokens=False)["input_ids"]


def test_needle_prompt_answer_substring_and_errors(model):
    from headscope.circuits.needle import Needle

    n = Needle("The lighthouse keeper's cat is named Captain Biscuit.", "What is the cat called?", "Captain Biscuit")
    p = build_needle_prompt(model.tokenizer, n, 200, 0.5)
    s0, s1 = p.answer_span
    assert model.tokenizer.decode(p.input_ids[s0:s1]).strip() == "Captain Biscuit"
    with pytest.raises(InputError, match="too short"):
        build_needle_prompt(model.tokenizer, n, 10, 0.5)
    with pytest.raises(InputError, match="depth"):
        build_needle_prompt(model.tokenizer, n, 200, 1.5)
    with pytest.raises(InputError, match="substring"):
        Needle("abc.", "q?", "xyz")


def test_hit_scores_by_hand():
    # 1 layer, 2 heads; prompt of 6 tokens, answer span [2, 4) holding tokens 7, 8; emitted 7, 8, 9
    tokens = torch.tensor([1, 5, 7, 8, 6, 3, 7, 8])
    argmax = torch.full((1, 2, 8), -1)
    argmax[0, 0, 5:8] = torch.tensor([2, 3, 3])  # hits 7 at row 5 and 8 at row 6; row 7 emits 9: no hit
    argmax[0, 1, 5:8] = torch.tensor([3, 2, 0])  # right span, wrong tokens: no hits
    s = hit_scores(argmax, tokens, prompt_len=6, emitted=[7, 8, 9], span=(2, 4))
    assert s.tolist() == [[1.0, 0.0]]


def _eager_hits(model, prompt, emitted):
    """Reference: transformers' eager attention matrix over prompt + emitted tokens (no headscope)."""
    ids = torch.cat([prompt.input_ids, torch.tensor(emitted[:-1], dtype=torch.long)])[None]
    att = eager_patterns(model, ids).unbind(1)  # per layer [B, H, S, S]
    S = prompt.input_ids.shape[0]
    s0, s1 = prompt.answer_span
    w = torch.tensor(emitted)
    out = torch.zeros(len(att), att[0].shape[1])
    for l, a in enumerate(att):
        rows = a[0, :, S - 1: S - 1 + len(emitted)].argmax(-1)  # [H, n]
        hit = (rows >= s0) & (rows < s1) & (ids[0][rows] == w)
        out[l] = hit.sum(-1).float() / (s1 - s0)
    return out


def test_trial_hits_match_materialised_attention(model):
    p = build_needle_prompt(model.tokenizer, NEEDLES[2], 160, 0.5)
    trial = run_trial(model, p)
    assert len(trial.emitted) > 0
    ref = _eager_hits(model, p, trial.emitted)
    # the decode-time argmax (cached, chunked statistics) and the eager matrix may differ only on exact ties
    assert (trial.scores - ref).abs().gt(1e-6).sum() <= 2
    if trial.recall > 0.5:
        assert trial.scores.max() > 0.3  # a model that copies the needle has heads that point at it


def test_retrieval_detector_and_validation(model):
    """On SmolLM2-135M at short contexts: records what is true (retrieval rate), that scores only come
    from retrieved trials, and that the causal check runs and reports a verdict."""
    cfg = DetectorConfig(seq_len=256, n_prompts=3, top_k=8, n_random=2, progress=False,
                         params={"n_validation": 2, "lengths": [160, 256], "depths": [0.2, 0.8]})
    res = detect_retrieval(model, cfg)
    s = res.summary
    assert s["n_trials"] == 3 and 0 <= s["n_retrieved"] <= 3
    assert s["retrieval_rate"] == pytest.approx(s["n_retrieved"] / 3)
    assert all(0.0 <= t["recall"] <= 1.0 for t in s["trials"])
    assert s["n_retrieved"] >= 2, f"SmolLM2 retrieved {s['n_retrieved']}/3 short needles: {s['trials']}"
    assert len(res.scores) == model.meta.n_layers * model.meta.n_heads
    assert all(len(v) == s["n_retrieved"] for v in s["per_trial"].values())
    assert s["n_retrieval_heads"] == int((res.scores["score"] > 0.1).sum()) > 0
    v = res.validation
    assert v is not None and len(v.random_k_damage) == 2
    assert 0.5 < v.baseline <= 1.0  # validation prompts are retrieved trials
    assert re.search(r"top-8 retrieval heads", v.verdict())
    # the causal check itself (Wu et al.'s masking): the top heads cost the needle at least twice
    # the recall the median random 8-head set costs
    assert v.top_k_damage >= 2 * v.random_median and v.top_k_damage > 0, v.verdict()


def test_context_lengths_clamped_to_the_model_are_reported(model):
    """Lengths that leave no room for the question and answer were cut to fit without a word."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from headscope.probe import HeadscopeModel

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      hidden_size=16, intermediate_size=32, vocab_size=len(model.tokenizer),
                                      max_position_embeddings=300)).eval()
    tiny = HeadscopeModel(hf, model.tokenizer)
    res = run_detector(tiny, "retrieval", DetectorConfig(seq_len=256, n_prompts=3, validate=False, progress=False,
                                                         params={"max_new_tokens": 2}))
    s = res.summary
    assert s["context_lengths"] == [64, 128, 172]
    assert sorted({t["context_tokens"] for t in s["trials"]}) == [64, 128, 172]
    assert "[64, 128, 256]" in s["note_lengths"] and "300 positions" in s["note_lengths"]

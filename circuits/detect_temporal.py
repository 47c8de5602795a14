"""Temporal heads: a cheap, honest proxy for Park et al. 2025 ("Does time have its place? Temporal
heads: where language models recall time-specific information").

The paper finds temporal heads with EAP-IG circuits. Here each head is scored by activation
patching (headscope.circuits.patching; or its first-order estimate, attribution patching) between
a fact at one year (clean) and the same prompt at another year with another answer (corrupted):
the share of the clean-vs-corrupted logit difference (first token of the clean answer minus first
token of the corrupted answer) that patching the head alone restores, as a ratio of means over the
facts. Beside it, `year_mass`: the head's attention
from the last position onto the year tokens (keyset_mass; our addition).

Causal check, as the paper evaluates: mean candidate probability of the true answer on temporal
facts and on time-invariant controls, before and after zero-ablating the top-k heads, against k
random heads. Temporal heads should hurt temporal facts, and hurt them more than invariant ones.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from headscope.kernels.stats import StatsRequest
from headscope.probe import HeadscopeModel
from headscope.probe.errors import InputError

from .ablation import ablate_heads
from .detectors import DetectorConfig, check_params
from .patching import attribution_patch_heads, last_logits, patch_heads
from .scores import DetectorResult, Validation, head_scores, top_heads
from .validation import validate_heads
from .temporal import (TemporalFact, answer_ids, candidate_eval, candidate_probability, load_facts, phrase_positions,
                       prompt_ids)

DEFAULTS = {"ablation_mode": "zero", "heads_per_batch": 64, "patching": "activation"}
PATCHING = ("activation", "attribution")
DEFAULT_FACTS = 24


def _pair(model: HeadscopeModel, fact: TemporalFact) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    clean = prompt_ids(model, fact.prompt)
    corrupt = prompt_ids(model, fact.corrupt_prompt)
    if len(clean) != len(corrupt):
        raise InputError(f"{fact.prompt!r} and {fact.corrupt_prompt!r} tokenize to different lengths "
                         f"({len(clean)} vs {len(corrupt)}); patching needs aligned prompts.")
    a, b = answer_ids(model, fact.answer)[0], answer_ids(model, fact.corrupt_answer)[0]
    if a == b:
        raise InputError(f"answers {fact.answer!r} and {fact.corrupt_answer!r} start with the same token.")
    return torch.tensor([clean]), torch.tensor([corrupt]), a, b


def year_attention(model: HeadscopeModel, facts: list[TemporalFact]) -> torch.Tensor:
    """[L, H] mean attention from each prompt's last position onto its year tokens (keyset_mass)."""
    total = torch.zeros(model.meta.n_layers, model.meta.n_heads)
    for f in facts:
        ids = torch.tensor([prompt_ids(model, f.prompt)], device=model.device)
        keys = torch.zeros_like(ids, dtype=torch.bool)
        keys[0, phrase_positions(model, f.prompt, f.year)] = True
        _, rec = model.run_recorded(ids, None, StatsRequest(keyset=True), keyset=keys)
        total += rec.stats["keyset_mass"][0, :, :, -1].float().cpu()
    return total / len(facts)


def logit_gaps(model: HeadscopeModel, facts: list[TemporalFact]) -> list[tuple[float, float]]:
    """Per fact (LD clean, LD corrupted), LD = logit of the clean answer's first token minus the
    corrupted answer's, at the last prompt position."""
    out = []
    for f in facts:
        clean, corrupt, a, b = _pair(model, f)
        lc = last_logits(model, clean.to(model.device))[0]
        lx = last_logits(model, corrupt.to(model.device))[0]
        out.append((float(lc[a] - lc[b]), float(lx[a] - lx[b])))
    return out


def temporal_patching(model: HeadscopeModel, facts: list[TemporalFact], n: int | None = None,
                      heads_per_batch: int = 64, progress: bool = False,
                      method: str = "activation") -> tuple[torch.Tensor, dict]:
    """[L, H] patching score (ratio of means, see module doc) over the `n` facts whose year moves the
    logit difference most (LD clean - LD corrupted > 0 only: elsewhere the year does not steer the model).
    method "attribution": the first-order estimate (`attribution_patch_heads`), one forward and one
    backward per fact instead of L x H / heads_per_batch forwards."""
    if method not in PATCHING:
        raise InputError(f"patching must be one of {PATCHING}, got {method!r}.")
    gaps = logit_gaps(model, facts)
    ranked = sorted((g[0] - g[1], i) for i, g in enumerate(gaps) if g[0] - g[1] > 0)[::-1][:n]
    effects, totals, kept = [], [], []
    for gap, i in tqdm(ranked, desc="patching temporal facts", disable=not progress):
        f = facts[i]
        clean, corrupt, a, b = _pair(model, f)

        def metric(logits, a=a, b=b):
            return (logits[:, a] - logits[:, b]).mean()

        effects.append(attribution_patch_heads(model, clean, corrupt, metric) if method == "attribution"
                       else patch_heads(model, clean, corrupt, metric, heads_per_batch=heads_per_batch))
        totals.append(gap)
        kept.append({"prompt": f.prompt, "corrupt_prompt": f.corrupt_prompt, "ld_clean": gaps[i][0],
                     "ld_corrupt": gaps[i][1]})
    info = {"facts": kept, "n_year_sensitive": sum(g[0] - g[1] > 0 for g in gaps), "n_checked": len(facts)}
    if not effects:
        L, H = model.meta.n_layers, model.meta.n_heads
        return torch.full((L, H), float("nan")), info
    info["mean_logit_diff_gap"] = float(np.mean(totals))
    return torch.stack(effects).mean(0) / float(np.mean(totals)), info


def validate_temporal(model: HeadscopeModel, scores, temporal: list[TemporalFact], invariant: list[TemporalFact],
                      k: int = 8, n_random: int = 5, seed: int = 0, mode: str = "zero",
                      progress: bool = False, each: bool = False) -> tuple[Validation, dict]:
    """Drop of the mean true-answer candidate probability on temporal facts when the top-k heads are
    ablated vs k random heads -> (Validation, the same numbers on the invariant controls, same head sets)."""
    if not temporal or not invariant:
        raise InputError("temporal validation needs temporal facts and invariant controls.")
    top = top_heads(scores, k)

    def run(facts, what, each=False):
        return validate_heads(model, "temporal", top, lambda m: float(candidate_probability(m, facts).mean()), k,
                              n_random, seed, metric=f"drop of mean true-answer candidate probability, {what} "
                                                     f"({mode} ablation)",
                              ablate=lambda m, heads: ablate_heads(m, heads, mode=mode), higher_is_worse=False,
                              progress=progress, each=each)

    v, inv = run(temporal, "temporal facts", each), run(invariant, "invariant facts")
    v.notes = (f"temporal {v.baseline:.3f} -> {v.baseline - v.top_k_damage:.3f}, invariant {inv.baseline:.3f} -> "
               f"{inv.baseline - inv.top_k_damage:.3f} with the top-{k} heads {top} ablated; random {k}-head sets: "
               f"temporal drop median {v.random_median:.3f}, invariant drop median {inv.random_median:.3f} "
               f"({len(temporal)} temporal facts the model knows, {len(invariant)} invariant facts).")
    v.control = {"metric": inv.metric, "baseline": inv.baseline, "top_k_damage": inv.top_k_damage,
                 "random_k_damage": list(inv.random_k_damage)}
    # named as in Validation.to_dict()'s control: random_k_damage the median, _all every set's
    return v, {"baseline": inv.baseline, "top_k": inv.baseline - inv.top_k_damage, "top_k_damage": inv.top_k_damage,
               "random_k_damage": inv.random_median, "random_k_damage_all": list(inv.random_k_damage)}


def detect_temporal(model: HeadscopeModel, config: DetectorConfig | None = None) -> DetectorResult:
    """Score every head as a temporal head (patching proxy of Park et al. 2025).

    config.n_prompts: temporal facts patched (default 24): those whose year moves the answers' logit
        difference most; validation uses the facts the model answers right (candidate argmax);
        accuracy is reported on every fact;
    config.prompts_file: a jsonl of facts in the format of circuits/data/temporal_facts.jsonl;
    config.params: "ablation_mode" (zero), "heads_per_batch" (64), "patching" ("activation", or
        "attribution": its first-order estimate, for models where L x H patches per fact are too many).
    """
    config = config or DetectorConfig()
    check_params("temporal", config)  # also when called directly, not through run_detector
    p = {**DEFAULTS, **config.params}
    if p["patching"] not in PATCHING:
        raise InputError(f"temporal parameter patching must be one of {PATCHING}, got {p['patching']!r}.")
    n = config.n_prompts if config.n_prompts is not None else DEFAULT_FACTS
    if n < 1:  # None means the default; 0 or less patches no fact
        raise InputError(f"n_prompts must be >= 1, got {n}.")
    facts = load_facts(config.prompts_file)
    temporal = [f for f in facts if f.kind == "temporal"]
    invariant = [f for f in facts if f.kind == "invariant"]
    if not temporal:
        raise InputError("the temporal detector needs facts of kind 'temporal'.")
    prob_t, ok_t = candidate_eval(model, temporal)
    # validation asks about the facts the model knows; patching about the facts whose year steers it
    known = [f for f, ok in zip(temporal, ok_t.tolist()) if ok]
    asked = known or temporal
    if not known:
        warnings.warn("the model answers none of the temporal facts; validation asks about all of them "
                      "(summary: validation_facts = 'all, none known').", stacklevel=2)
    score, info = temporal_patching(model, temporal, n, p["heads_per_batch"], config.progress, p["patching"])
    info["method"] = p["patching"]
    patched = [f for f in temporal if any(k["prompt"] == f.prompt for k in info["facts"])] or temporal[:n]
    year_mass = year_attention(model, patched)
    df = head_scores("temporal", score, {"year_mass": year_mass})
    summary = {"n_temporal": len(temporal), "n_invariant": len(invariant), "n_known": int(ok_t.sum()),
               "n_patched": len(patched), "n_patched_used": len(info["facts"]),
               "temporal_candidate_prob": float(prob_t.mean()),
               "temporal_accuracy": float(ok_t.float().mean()),
               "validation_facts": "known" if known else "all, none known",
               "patching": info}
    if invariant:
        prob_i, ok_i = candidate_eval(model, invariant)
        summary.update({"invariant_candidate_prob": float(prob_i.mean()),
                        "invariant_accuracy": float(ok_i.float().mean())})
    validation = None
    if config.validate and invariant and info["facts"]:
        validation, summary["invariant_validation"] = validate_temporal(
            model, df, asked, invariant, config.top_k, config.n_random, config.seed, p["ablation_mode"],
            progress=config.progress, each=config.ablate_each)
    return DetectorResult(kind="temporal", scores=df, summary=summary, validation=validation)


detect_temporal.known_params = tuple(DEFAULTS)
# The CLI reads a --prompts file through this before any detector runs (a plain .txt fails here,
# not after the other detectors' minutes of work).
detect_temporal.check_prompts = load_facts

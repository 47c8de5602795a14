"""Retrieval heads (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality").

Per trial (needle, context length, depth): greedy decoding under `model.record(StatsRequest(topk=1))`
keeps only each head's top-1 key per query row (O(S) memory, no pattern). Query row S-1+t emits
generated token t (w); head (l, h) hits when its argmax key lies inside the needle's answer span and
holds w. Trial score = hits / |answer span|. Only trials whose answer has ROUGE-1 recall > 0.5 count;
a head's score is the mean over counted trials; retrieval head: score > 0.1.

Difference from the authors' script: it scores decode steps only, skipping the first answer token
(predicted by the prefill's last row); we score every emitted token, as the paper's definition reads.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from headscope.kernels.stats import StatsRequest
from headscope.probe import HeadscopeModel
from headscope.probe.errors import InputError

from .ablation import ablate_heads
from .detectors import DetectorConfig, check_params
from .needle import NEEDLES, Needle, NeedlePrompt, build_needle_prompt, haystack_sentences, rouge1_recall
from .prompts import load_prompts
from .scores import DetectorResult, Validation, head_scores, top_heads
from .validation import validate_heads

DEFAULTS = {
    "threshold": 0.1,          # retrieval head: mean score > 0.1
    "rouge_threshold": 0.5,    # trials count when ROUGE-1 recall > 0.5
    "depths": (0.1, 0.5, 0.9),
    "lengths": None,           # None: (seq_len / 4, seq_len / 2, seq_len) context tokens
    "max_new_tokens": None,    # None: answer tokens + 8
    "n_validation": 4,         # retrieved trials re-run under ablation (the shortest ones)
    "ablation_mode": "uniform",  # the paper's masking
}
DEFAULT_SEQ_LEN = 512
DEFAULT_TRIALS = 6


@dataclass
class Trial:
    """One needle trial: the prompt, what the model answered, and per-head scores [L, H]."""

    prompt: NeedlePrompt
    response: str
    recall: float
    scores: torch.Tensor
    emitted: list[int] = field(default_factory=list)


def _stop_ids(model: HeadscopeModel) -> list[int]:
    tok = model.tokenizer
    ids = {i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) if isinstance(i, int) and i >= 0}
    return sorted(ids)


def _answer_text(model: HeadscopeModel, emitted: list[int]) -> tuple[str, int]:
    """Decoded answer up to its first line break (Wu et al. stop there) and how many tokens that is."""
    for n in range(1, len(emitted) + 1):
        if "\n" in model.tokenizer.decode(emitted[:n]):
            return model.tokenizer.decode(emitted[: n - 1]), n - 1
    return model.tokenizer.decode(emitted), len(emitted)


def generate_answer(model: HeadscopeModel, prompt: NeedlePrompt, max_new_tokens: int) -> list[int]:
    """Greedy continuation of the prompt (token ids, stop tokens removed)."""
    ids = prompt.input_ids[None].to(model.device)
    stops = _stop_ids(model)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stops or None, pad_token_id=stops[0] if stops else None)
    emitted = out[0, ids.shape[1]:].tolist()
    while emitted and emitted[-1] in stops:
        emitted.pop()
    return emitted


def hit_scores(argmax: torch.Tensor, tokens: torch.Tensor, prompt_len: int, emitted: list[int],
               span: tuple[int, int]) -> torch.Tensor:
    """Retrieval score of every head for one trial.

    argmax: [L, H, S'] top-1 key of each query row (S' >= prompt_len + len(emitted) - 1);
    tokens: [S''] token ids of the prompt (and beyond); emitted: generated tokens w_0..w_{n-1}, w_t
    emitted by query row prompt_len - 1 + t; span: [start, end) answer positions in the prompt.
    Returns [L, H] = hits / |span|.
    """
    n = len(emitted)
    L, H = argmax.shape[:2]
    if n == 0:
        return torch.zeros(L, H)
    rows = argmax[:, :, prompt_len - 1: prompt_len - 1 + n].long()  # [L, H, n]
    w = torch.tensor(emitted, device=rows.device)
    inside = (rows >= span[0]) & (rows < span[1])
    key_tok = tokens.to(rows.device)[rows.clamp(0, tokens.shape[0] - 1)]
    hits = (inside & (key_tok == w)).sum(-1)
    return (hits.float() / (span[1] - span[0])).cpu()


def run_trial(model: HeadscopeModel, prompt: NeedlePrompt, max_new_tokens: int | None = None) -> Trial:
    """Decode one needle prompt greedily while recording each head's argmax key -> Trial."""
    if max_new_tokens is None:
        max_new_tokens = (prompt.answer_span[1] - prompt.answer_span[0]) + 8
    model.check_length(prompt.input_ids.shape[0] + max_new_tokens)
    S = prompt.input_ids.shape[0]
    with model.record(StatsRequest(topk=1)) as rec:
        emitted = generate_answer(model, prompt, max_new_tokens)
    response, n = _answer_text(model, emitted)
    emitted = emitted[:n]
    argmax = rec.stats["argmax"][0, ..., 0]  # [L, H, S']
    scores = hit_scores(argmax, prompt.input_ids, S, emitted, prompt.answer_span)
    return Trial(prompt=prompt, response=response, recall=rouge1_recall(prompt.needle.answer_text, response),
                 scores=scores, emitted=emitted)


def grid_walk(lengths, depths) -> list[tuple]:
    """Every (length, depth) cell once, ordered so that the first max(nL, nD) cover every length and
    every depth. Cell j is (j mod nL, j mod nD), distinct for j < lcm(nL, nD) (Chinese remainder);
    each further block of lcm cells shifts the depth by one, which reaches the other gcd - 1 classes
    of (length - depth) mod gcd."""
    nL, nD = len(lengths), len(depths)
    lcm = nL * nD // math.gcd(nL, nD)
    return [(lengths[j % nL], depths[(j % nD + j // lcm) % nD]) for j in range(nL * nD)]


def needle_prompts(model: HeadscopeModel, lengths, depths, n_trials: int, seed: int = 0,
                   needles: tuple[Needle, ...] = NEEDLES, haystack: str | None = None) -> list[NeedlePrompt]:
    """n_trials prompts over the grid lengths x depths, each with a needle drawn (seeded) from `needles`;
    the grid is walked so that every length and depth appears before any repeats."""
    if model.tokenizer is None:
        raise InputError("needle prompts need a tokenizer.")
    rng = random.Random(seed)
    sentences = haystack_sentences(haystack)
    nL, nD = len(lengths), len(depths)
    grid = grid_walk(lengths, depths)
    out = []
    for t in range(n_trials):
        L, d = grid[t % len(grid)]
        out.append(build_needle_prompt(model.tokenizer, rng.choice(needles), int(L), float(d), sentences))
    return out


def aggregate_retrieval(per_trial: dict, threshold: float = 0.1, n_layers: int | None = None,
                        n_heads: int | None = None, kind: str = "retrieval") -> tuple[pd.DataFrame, dict]:
    """Per-trial scores {"layer-head": [score of each counted trial]} -> (HeadScores, summary).

    The format of the published head_score/*.json files (Wu et al.). Score = mean over trials (NaN for
    a head with no counted trial). Summary: heads, share with mean = 0, (0, 0.1], (0.1, 0.5], > 0.5,
    the number of heads above `threshold`, and the top heads.
    """
    if not per_trial:
        raise InputError("aggregate_retrieval: no per-trial scores given.")
    keys = []
    for k in per_trial:
        try:
            l, h = (int(x) for x in str(k).split("-"))
        except ValueError:
            raise InputError(f"per-trial keys must be 'layer-head', got {k!r}.") from None
        keys.append((l, h))
    L = n_layers or max(l for l, _ in keys) + 1
    H = n_heads or max(h for _, h in keys) + 1
    grid = np.full((L, H), np.nan)
    n_trials = np.zeros((L, H), dtype=int)
    for (l, h), v in zip(keys, per_trial.values()):
        v = np.asarray(v, dtype=float)
        n_trials[l, h] = v.size
        grid[l, h] = v.mean() if v.size else np.nan
    df = head_scores(kind, grid, {"n_trials": n_trials, "retrieval_head": grid > threshold})
    return df, retrieval_summary(grid, threshold)


def retrieval_summary(grid: np.ndarray, threshold: float = 0.1, n_top: int = 5) -> dict:
    """Histogram of head scores (Wu et al. Figure 3 buckets) and the top heads."""
    a = np.asarray(grid, dtype=float)
    v = a[np.isfinite(a)]
    n = v.size
    frac = (lambda m: float(m.sum()) / n) if n else (lambda m: float("nan"))
    order = np.argsort(-np.nan_to_num(a, nan=-1.0), axis=None)[:n_top]
    top = [{"layer": int(i // a.shape[1]), "head": int(i % a.shape[1]), "score": float(a.flat[i])} for i in order
           if np.isfinite(a.flat[i])]
    return {"n_heads": int(a.size), "n_scored": int(n), "frac_zero": frac(v == 0),
            "frac_0_0.1": frac((v > 0) & (v <= 0.1)), "frac_0.1_0.5": frac((v > 0.1) & (v <= 0.5)),
            "frac_above_0.5": frac(v > 0.5), "n_retrieval_heads": int((v > threshold).sum()),
            "threshold": threshold, "top_heads": top}


def needle_accuracy(model: HeadscopeModel, prompts: list[NeedlePrompt], max_new_tokens: int | None = None) -> float:
    """Mean ROUGE-1 recall of the needle over `prompts` (greedy answers, first line)."""
    def one(p):
        n = max_new_tokens or (p.answer_span[1] - p.answer_span[0]) + 8
        text, _ = _answer_text(model, generate_answer(model, p, n))
        return rouge1_recall(p.needle.answer_text, text)

    return float(np.mean([one(p) for p in prompts]))


def validate_retrieval(model: HeadscopeModel, scores: pd.DataFrame, prompts: list[NeedlePrompt], k: int = 8,
                       n_random: int = 5, seed: int = 0, mode: str = "uniform",
                       max_new_tokens: int | None = None, progress: bool = False, each: bool = False) -> Validation:
    """Needle accuracy (ROUGE-1 recall) lost when the top-k retrieval heads are masked vs k random heads."""
    if not prompts:
        raise InputError("retrieval validation needs at least one needle prompt.")
    top = top_heads(scores, k)
    return validate_heads(model, "retrieval", top, lambda m: needle_accuracy(m, prompts, max_new_tokens), k,
                          n_random, seed, metric=f"needle ROUGE-1 recall lost ({mode} attention masking)",
                          ablate=lambda m, heads: ablate_heads(m, heads, mode=mode), higher_is_worse=False,
                          notes=f"{len(prompts)} retrieved needle prompts; top heads {top}.", progress=progress,
                          each=each)


def detect_retrieval(model: HeadscopeModel, config: DetectorConfig | None = None) -> DetectorResult:
    """Score every head's retrieval behaviour on needle-in-a-haystack trials (Wu et al. 2024).

    config.seq_len: longest context in tokens (default 512 here; the paper goes to 50k+);
    config.n_prompts: number of trials (default 6); config.params: see DEFAULTS
    ("lengths", "depths", "threshold", "rouge_threshold", "max_new_tokens", "n_validation").
    """
    config = config or DetectorConfig()
    p = {**DEFAULTS, **config.params}
    check_params("retrieval", config)  # also when called directly, not through run_detector
    seq_len = config.seq_len if config.seq_len is not None else DEFAULT_SEQ_LEN
    n_trials = config.n_prompts if config.n_prompts is not None else DEFAULT_TRIALS
    if seq_len < 1 or n_trials < 1:  # None means the default; 0 or less leaves nothing to measure
        raise InputError(f"retrieval needs seq_len >= 1 and n_prompts >= 1, got seq_len {seq_len}, "
                         f"n_prompts {n_trials}.")
    lengths = p["lengths"] or sorted({max(64, seq_len // 4), max(64, seq_len // 2), seq_len})
    asked_lengths, clamped = list(lengths), False
    if model.meta.max_positions and max(lengths) + 128 > model.meta.max_positions:
        # 128 tokens stay free for the question and the answer
        lengths, clamped = sorted({min(x, model.meta.max_positions - 128) for x in lengths}), True
    haystack = p.get("haystack")
    if haystack is None and config.prompts_file:
        haystack = " ".join(load_prompts(config.prompts_file))
    prompts = needle_prompts(model, lengths, tuple(p["depths"]), n_trials, config.seed,
                             haystack=haystack)
    trials = [run_trial(model, pr, p["max_new_tokens"])
              for pr in tqdm(prompts, desc="needle trials", disable=not config.progress)]
    kept = [t for t in trials if t.recall > p["rouge_threshold"]]
    L, H = model.meta.n_layers, model.meta.n_heads
    per_trial = {f"{l}-{h}": [float(t.scores[l, h]) for t in kept] for l in range(L) for h in range(H)}
    if kept:
        df, summary = aggregate_retrieval(per_trial, p["threshold"], L, H)
    else:
        df = head_scores("retrieval", np.full((L, H), np.nan))
        summary = retrieval_summary(np.full((L, H), np.nan), p["threshold"])
    summary.update({
        "context_lengths": list(lengths),
        "n_trials": len(trials), "n_retrieved": len(kept),
        "retrieval_rate": len(kept) / len(trials) if trials else float("nan"),
        "mean_recall": float(np.mean([t.recall for t in trials])) if trials else float("nan"),
        "trials": [{"context_tokens": t.prompt.context_tokens, "depth": t.prompt.depth,
                    "prompt_tokens": int(t.prompt.input_ids.shape[0]), "needle": t.prompt.needle.text,
                    "response": t.response, "recall": t.recall} for t in trials],
        "per_trial": per_trial,
    })
    if clamped:
        summary["note_lengths"] = (f"context lengths {asked_lengths} do not fit {model.meta.name}'s "
                                   f"{model.meta.max_positions} positions with 128 tokens for the question and "
                                   f"answer: ran {list(lengths)}.")
    if not kept:
        summary["note"] = (f"the model retrieved no needle (ROUGE-1 recall > {p['rouge_threshold']}) in "
                           f"{len(trials)} trials: no head can be scored.")
    validation = None
    if config.validate and kept:
        val_prompts = [t.prompt for t in sorted(kept, key=lambda t: t.prompt.input_ids.shape[0])][: p["n_validation"]]
        validation = validate_retrieval(model, df, val_prompts, config.top_k, config.n_random, config.seed,
                                        p["ablation_mode"], p["max_new_tokens"], config.progress, config.ablate_each)
    return DetectorResult(kind="retrieval", scores=df, summary=summary, validation=validation)


detect_retrieval.known_params = tuple(DEFAULTS) + ("haystack",)

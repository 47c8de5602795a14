"""Head pruning on the embedded model: iterative pruning curve (Michel et al.) and wall time per
token of physically pruned vs unpruned models, measured side by side in one run.

    HEADSCOPE_CACHE=/tmp/hscache .venv/bin/python benchmarks/pruning_bench.py [--out results.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from headscope.circuits.ablation import ablate_heads
from headscope.circuits.importance import iterative_pruning
from headscope.circuits.next_token import DATA
from headscope.circuits.pruning import n_attention_params, prune
from headscope.probe import load_model


def per_token_seconds(models: dict, batch: dict, repeats: int) -> dict[str, float]:
    """Median wall seconds per token of each model, runs interleaved so load changes hit all alike."""
    times = {k: [] for k in models}
    n_tok = int(batch["attention_mask"].sum())
    with torch.no_grad():
        for m in models.values():
            m.hf(**batch, use_cache=False)  # warm-up
        for _ in range(repeats):
            for name, m in models.items():
                t = time.perf_counter()
                m.hf(**batch, use_cache=False)
                times[name].append((time.perf_counter() - t) / n_tok)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/pruning.md")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--texts", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_model()
    texts = [t for t in (DATA / "pruning_corpus.txt").read_text().splitlines() if t.strip()]
    imp_texts, eval_texts = texts[: args.texts // 2], texts[args.texts // 2: args.texts]
    batches = [model.tokenize(imp_texts, prepend_bos=True)]
    t0 = time.perf_counter()
    curve = iterative_pruning(model, batches, step=0.1, max_fraction=0.5,
                              metric=lambda m, pruned: _loss(m, eval_texts, pruned))
    curve_s = time.perf_counter() - t0
    total = model.meta.n_total_heads
    lines = ["### Iterative pruning curve (importance on %d texts, LM loss on %d held-out texts; %.0f s)"
             % (len(imp_texts), len(eval_texts), curve_s), "",
             "| step | heads pruned | fraction | held-out LM loss |", "|---|---|---|---|"]
    for r in curve.itertuples():
        lines.append(f"| {r.step} | {r.n_pruned} | {r.fraction:.3f} | {r.metric:.4f} |")

    # Speed: prune the first 25% / 50% of heads in the curve's pruning order.
    order = curve.iloc[-1].heads
    n25, n50 = round(0.25 * total), round(0.5 * total)
    h25, f25, h50, f50 = order[:n25], n25 / total, order[:n50], n50 / total
    p25, p50 = prune(model, h25), prune(model, h50)
    batch = model.tokenize([" ".join(texts)] * 2, prepend_bos=True)
    secs = per_token_seconds({"unpruned": model, "pruned_25": p25, "pruned_50": p50}, batch, args.repeats)
    with torch.no_grad():
        ref = {}
        for name, heads, pm in (("pruned_25", h25, p25), ("pruned_50", h50, p50)):
            with ablate_heads(model, heads):
                masked = model.hf(**batch, use_cache=False).logits
            # same attention arithmetic on both sides (the exact torch path), so the difference is pruning's
            impl = pm.hf.config._attn_implementation
            pm.hf.set_attn_implementation("headscope")
            ref[name] = float((pm.hf(**batch, use_cache=False).logits - masked).abs().max())
            pm.hf.set_attn_implementation(impl)
    S = batch["input_ids"].shape[1]
    lines += ["", f"### Wall time per token, forward of 2 x {S} tokens, fp32 CPU, median of {args.repeats} "
              "interleaved runs", "",
              "| model | heads pruned | attention params | s / token | speed vs unpruned | max abs logit diff vs masked |",
              "|---|---|---|---|---|---|",
              f"| unpruned | 0 | {n_attention_params(model):,} | {secs['unpruned']:.2e} | 1.00x | - |"]
    for name, frac, pm in (("pruned_25", f25, p25), ("pruned_50", f50, p50)):
        lines.append(f"| {name} | {frac:.0%} | {n_attention_params(pm):,} | {secs[name]:.2e} | "
                     f"{secs['unpruned'] / secs[name]:.2f}x | {ref[name]:.1e} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _loss(model, texts, pruned):
    from headscope.circuits.importance import lm_loss

    return lm_loss(model, [model.tokenize(texts, prepend_bos=True)], pruned)


if __name__ == "__main__":
    main()

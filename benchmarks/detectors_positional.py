"""Measured findings of the sink / previous-token / induction / duplicate-token detectors.

Runs each detector with its defaults (and causal validation) on the embedded model and prints a
markdown block for benchmarks/RESULTS.md: Sink_1^0.3, top heads per kind, validation ratios,
wall time per detector.

    .venv/bin/python benchmarks/detectors_positional.py [--n-prompts N] [--kinds sink,induction]
"""

from __future__ import annotations

import argparse
import time

from headscope.circuits import DetectorConfig, run_detector, top_heads
from headscope.probe import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="sink,previous_token,induction,duplicate_token")
    ap.add_argument("--n-prompts", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = load_model()
    lines = []
    for kind in args.kinds.split(","):
        t = time.perf_counter()
        res = run_detector(model, kind, DetectorConfig(n_prompts=args.n_prompts, seed=args.seed, progress=True))
        wall = time.perf_counter() - t
        df = res.scores
        best = ", ".join(f"L{l}H{h} {s:.2f}" for (l, h), s in zip(top_heads(df, 8), df.score.head(8)))
        lines.append(f"- **{kind}** ({wall:.0f} s, {res.summary.get('n_prompts')} prompts x "
                     f"{res.summary.get('seq_len')} tokens): top-8 {best}")
        if kind == "sink":
            s = res.summary
            lines.append(f"  - Sink_1^{s['eps']} = {100 * s['sink_ratio']:.1f}% with {s['bos_token']} at position 0; "
                         f"{100 * s.get('sink_ratio_no_bos', float('nan')):.1f}% with the first text token at 0. "
                         f"Extra sinks ({s['extra_sinks']['rule']}): {s['extra_sinks']['heads_with_extra_sinks']} "
                         f"heads, top tokens {s['extra_sinks']['top_tokens'][:5]}")
        if kind == "induction":
            top = df.head(8)
            lines.append(f"  - top-8 prefix matching {top.prefix_matching.round(2).tolist()}, copying "
                         f"{top.copying.round(2).tolist()}, TL mul {top.tl_mul.round(2).tolist()}")
        v = res.validation
        if v is not None:
            ratio = v.top_k_damage / v.random_median if v.random_median > 0 else float("inf")
            lines.append(f"  - validation ({v.metric}): top-{v.k} {v.top_k_damage:.3f} vs random "
                         f"{[round(x, 3) for x in v.random_k_damage]} (median {v.random_median:.3f}, "
                         f"ratio {ratio:.1f}x, baseline {v.baseline:.3f}) -> {'PASS' if v.passed else 'FAIL'}")
        print("\n".join(lines[-3:]), flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

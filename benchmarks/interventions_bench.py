"""ACT attention calibration, memory injection and value-vector edits on the embedded model (task
metrics, no timings).

    HEADSCOPE_CACHE=/tmp/hscache .venv/bin/python benchmarks/interventions_bench.py act|memory|value_edit
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from headscope.circuits import value_edit as ve
from headscope.circuits.calibration import accuracy, candidate_heads, choice_logprobs, select_heads
from headscope.circuits.memory_injection import injection_sweep, sweep_heatmap
from headscope.circuits.next_token import load_jsonl
from headscope.circuits.temporal import load_facts
from headscope.probe import load_model


def md_table(df, index: bool = False) -> str:
    """A pandas DataFrame as a markdown table (no tabulate dependency)."""
    d = df.reset_index() if index else df
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    rows = ["| " + " | ".join(str(c) for c in d.columns) + " |", "|" + "---|" * len(d.columns)]
    rows += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in d.itertuples(index=False)]
    return "\n".join(rows)


def act(model, args) -> list[str]:
    items = load_jsonl("sentiment.jsonl")
    cal, test = items[: len(items) // 2], items[len(items) // 2:]
    t0 = time.perf_counter()
    cands = candidate_heads(model, cal, limit=args.candidates)
    sel = select_heads(model, cal, cands, sequential=False)
    heads = sel.attrs["heads"]
    before = accuracy(model, test)
    after = accuracy(model, test, heads=heads) if heads else before
    lab = torch.tensor([it["label"] for it in test])
    lp0 = choice_logprobs(model, test)
    lp1 = choice_logprobs(model, test, heads=heads) if heads else lp0
    margin = lambda lp: float((lp[torch.arange(len(lab)), lab] - lp[torch.arange(len(lab)), 1 - lab]).mean())  # noqa: E731
    return [f"### ACT on sentiment.jsonl (beta 0.4, threshold 0.1; {time.perf_counter() - t0:.0f} s)", "",
            f"Calibration split {len(cal)} prompts, test split {len(test)} prompts (80 written for this project). "
            f"Candidates: the {len(cands)} heads with most attention on non-first sinks; each calibrated alone on "
            f"the calibration split (baseline accuracy {sel.attrs['baseline']:.3f}); kept: {heads}.", "",
            "| split | prompts | accuracy before | accuracy after | mean log-prob margin (true - other) before / after |",
            "|---|---|---|---|---|",
            f"| test | {len(test)} | {before:.3f} | {after:.3f} | {margin(lp0):.3f} / {margin(lp1):.3f} |", "",
            "Per-candidate accuracy on the calibration split:", "",
            md_table(sel)]


def memory(model, args) -> list[str]:
    layers = list(range(0, model.meta.n_layers, args.layer_step))
    taus = [int(t) for t in args.taus.split(",")]
    t0 = time.perf_counter()
    df = injection_sweep(model, layers=layers, taus=taus)
    best = df.loc[df.median_rel_change.idxmax()]
    ctrl = injection_sweep(model, layers=[int(best.layer)], taus=taus, control=True)
    cbest = ctrl.loc[ctrl.tau == best.tau].iloc[0]
    fig = sweep_heatmap(df)
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    fig.write_html("benchmarks/results/memory_injection_heatmap.html", include_plotlyjs="cdn")
    grid = df.pivot(index="layer", columns="tau", values="median_rel_change")
    return [f"### Memory injection on multihop.jsonl ({df.attrs['n_prompts']} prompts; "
            f"{time.perf_counter() - t0:.0f} s)", "",
            f"Layers {layers} x tau {taus} (a CPU-sized subset of the 30 x 15 grid that `injection_sweep` runs by "
            "default). Value: median over prompts of the relative change of the first answer token's probability.",
            "", md_table(grid, index=True), "",
            f"Best: layer {int(best.layer)}, tau {best.tau:g}: median relative change {best.median_rel_change:+.3f}, "
            f"mean change {best.mean_delta:+.4f}, improved on {best.frac_improved:.0%} of prompts. "
            f"Control (another prompt's memory, same layer and tau): median relative change "
            f"{cbest.median_rel_change:+.3f}, improved on {cbest.frac_improved:.0%}.", "",
            "Heatmap: benchmarks/results/memory_injection_heatmap.html"]


def value_edit(model, args) -> list[str]:
    """Every head, every temporal fact, with the control (the target's own value means)."""
    cases = ve.cases_from_facts(load_facts(kind="temporal"))
    coeffs = [float(c) for c in args.coeffs.split(",")]
    t0 = time.perf_counter()
    df = ve.value_edit_sweep(model, cases, coeffs=coeffs, batch_size=90)
    secs = time.perf_counter() - t0
    cols = ["logprob_change", "control_change", "specific_change"]
    per = df.groupby(["coeff", "layer", "head"])[cols].median()
    per["real_gt_control"] = df.assign(win=df.specific_change > 0).groupby(["coeff", "layer", "head"]).win.mean()
    per["answer_first"] = df.groupby(["coeff", "layer", "head"]).answer_first.sum()
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    per.round(5).to_csv("benchmarks/results/value_edit_heads.csv")
    ve.sweep_heatmap(df, model.meta.n_layers, model.meta.n_heads).write_html(
        "benchmarks/results/value_edit_heatmap.html", include_plotlyjs="cdn")
    lines = [f"### Value edits on the temporal facts ({len(cases)} cases x {model.meta.n_total_heads} heads x "
             f"coeff {coeffs}, with control; {secs:.0f} s)", ""]
    for c in coeffs:
        top = per.loc[c].sort_values("logprob_change", ascending=False).head(10)
        lines += [f"coeff {c:g}: the ten heads with the largest median change of the answer's log-prob", "",
                  md_table(top, index=True), ""]
        spec = per.loc[c].sort_values("specific_change", ascending=False).head(5)
        lines += [f"coeff {c:g}: largest median specific_change (edit minus control)", "", md_table(spec, index=True), ""]
    return lines + ["Per head: benchmarks/results/value_edit_heads.csv; heatmap: "
                    "benchmarks/results/value_edit_heatmap.html"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["act", "memory", "value_edit"])
    ap.add_argument("--candidates", type=int, default=12)
    ap.add_argument("--layer-step", type=int, default=3)
    ap.add_argument("--taus", default="1,2,4,8,15")
    ap.add_argument("--coeffs", default="6", help="value_edit: coefficients of the source value mean")
    args = ap.parse_args()
    model = load_model()
    lines = {"act": act, "memory": memory, "value_edit": value_edit}[args.what](model, args)
    out = Path(f"benchmarks/results/{args.what}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

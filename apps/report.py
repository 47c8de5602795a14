"""The `headscope rank` HTML report: one self-contained file (plotly.js inlined once).

Per head kind: a layer x head heatmap of the scores, the top-k table, the causal-validation bars
(damage from ablating the top-k heads vs each random k-head set), the model-level findings of the
detector's `summary` (e.g. Sink_1^eps), the plain verdict, and attention-pattern thumbnails of
the top heads on a short prompt.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from headscope.circuits.scores import DetectorResult, score_grid
from headscope.probe import ModelMeta

from .explorer_figures import score_scale
from .rank_output import jsonable, scored


@dataclass
class Thumbnail:
    """Attention pattern of one head on the thumbnail prompt: probs [S, S] (query rows, key columns)."""

    layer: int
    head: int
    tokens: list[str]
    probs: np.ndarray


class _Figures:
    """Renders figures as HTML fragments, inlining plotly.js into the first one only."""

    def __init__(self):
        self.first = True

    def __call__(self, fig: go.Figure) -> str:
        out = fig.to_html(full_html=False, include_plotlyjs=self.first, config={"displaylogo": False})
        self.first = False
        return out


def heatmap(result: DetectorResult, meta: ModelMeta) -> go.Figure:
    grid = score_grid(result.scores, meta.n_layers, meta.n_heads)
    scale, reverse, mid = score_scale(grid)
    fig = go.Figure(go.Heatmap(z=grid, x=list(range(meta.n_heads)), y=list(range(meta.n_layers)),
                               colorscale=scale, reversescale=reverse, zmid=mid, colorbar=dict(title="score"),
                               hovertemplate="layer %{y} head %{x}<br>score %{z:.4g}<extra></extra>"))
    fig.update_layout(title=f"{result.kind}: score of every head", xaxis_title="head", yaxis_title="layer",
                      height=max(320, 14 * meta.n_layers + 120), width=max(360, 40 * meta.n_heads + 200),
                      margin=dict(l=50, r=20, t=50, b=40))
    fig.update_yaxes(autorange="reversed", dtick=max(1, meta.n_layers // 15))
    return fig


def validation_bars(result: DetectorResult) -> go.Figure:
    """Damage of the top-k set (red) and of each random k-head set (grey); with a control behaviour
    (temporal: invariant facts) the same head sets' damage to the control is drawn beside them, since
    the verdict depends on it."""
    v = result.validation
    names = [f"top-{v.k}"] + [f"random {i + 1}" for i in range(len(v.random_k_damage))]
    values = [v.top_k_damage] + list(v.random_k_damage)
    colors = ["#d62728"] + ["#7f7f7f"] * len(v.random_k_damage)
    fig = go.Figure(go.Bar(x=names, y=values, marker_color=colors, name=f"{result.kind}: {v.metric}",
                           hovertemplate="%{x}: %{y:.4g}<extra>" + html.escape(result.kind) + "</extra>"))
    if v.control:
        c = v.control
        control = [c["top_k_damage"]] + list(c["random_k_damage"])
        fig.add_trace(go.Bar(x=names[:len(control)], y=control, name=f"control: {c['metric']}",
                             marker=dict(color=["#ff9896"] + ["#c7c7c7"] * (len(control) - 1), pattern_shape="/"),
                             hovertemplate="%{x}: %{y:.4g}<extra>control</extra>"))
        fig.update_layout(barmode="group", showlegend=True, legend=dict(orientation="h", y=-0.25, font=dict(size=10)))
    if v.random_k_damage:  # the check passes when the top set does damage above this line (and > 0)
        fig.add_hline(y=v.random_max, line_dash="dash", annotation_text="largest random set")
    # The metric's full wording is long: it goes in the caption under the figure, not on the axis.
    fig.update_layout(title=f"{result.kind}: damage when {v.k} heads are ablated", yaxis_title="damage",
                      height=380 if v.control else 300, width=640 if v.control else 520,
                      margin=dict(l=60, r=20, t=60, b=40))
    return fig


def thumbnails(kind: str, thumbs: list[Thumbnail]) -> go.Figure:
    fig = make_subplots(rows=1, cols=len(thumbs), subplot_titles=[f"L{t.layer}H{t.head}" for t in thumbs],
                        horizontal_spacing=0.04)
    for i, t in enumerate(thumbs, start=1):
        labels = [f"{j}:{tok}" for j, tok in enumerate(t.tokens)]
        fig.add_trace(go.Heatmap(z=t.probs, x=labels, y=labels, colorscale="Blues", zmin=0, zmax=1,
                                 showscale=False,
                                 hovertemplate="query %{y}<br>key %{x}<br>p = %{z:.3f}<extra></extra>"),
                      row=1, col=i)
        fig.update_yaxes(autorange="reversed", showticklabels=False, row=1, col=i)
        fig.update_xaxes(showticklabels=False, row=1, col=i)
    fig.update_layout(title=f"{kind}: attention of the top heads on a short prompt (rows: queries, columns: keys)",
                      height=260, width=min(1100, 220 * len(thumbs) + 80), margin=dict(l=20, r=20, t=70, b=20))
    return fig


# What "score" is for kinds whose detector summary carries no "definition" (the positional detectors'
# summaries do, with their period); wording from the detectors' module docstrings.
SCORE_DEFINITIONS = {
    "sink": "alpha, the mean attention that key 0 (the first token) receives over all queries that see it, "
            "own row included (Gu et al. 2024); Sink_1^eps counts the heads with alpha > eps",
    "previous_token": "mean attention on the previous token (offset_mass[1]) on natural text",
    "induction": "mean attention on the token after the current token's earlier copy (offset_mass[T - 1]) over "
                 "the second copy of [BOS] r r",
    "duplicate_token": "mean attention on the current token's earlier copy (offset_mass[T]) over the second copy "
                       "of [BOS] r r",
    "retrieval": "mean over the trials where the model retrieved the needle of the share of the needle's answer "
                 "span the head copies (decode steps whose top-1 key lies in the answer span and holds the "
                 "emitted token, / |answer span|; Wu et al. 2024); retrieval head: score > threshold",
    "temporal": "share of the logit difference between a fact's answer at its year and at another year that "
                "patching this head alone restores (activation patching, ratio of means over the facts; a proxy "
                "for Park et al. 2025)",
}


def score_definition(kind: str, summary: dict) -> str | None:
    d = summary.get("definition") if isinstance(summary, dict) else None
    return str(d) if d else SCORE_DEFINITIONS.get(kind)


def _table(rows: list[list], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, list) and len(x) > 12:
        return f"[{', '.join(_fmt(v) for v in x[:12])}, ... ({len(x)} values)]"
    if isinstance(x, list):
        return "[" + ", ".join(_fmt(v) for v in x) + "]"
    if isinstance(x, dict) and len(x) > 12:  # e.g. retrieval's per_trial: one entry per head
        return f"{{{len(x)} entries; in heads.json's summary}}"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in x.items()) + "}"
    return str(x)


def top_table(result: DetectorResult, k: int) -> str:
    best = scored(result.scores).head(k)  # heads without a score are nobody's top heads
    extra = [c for c in best.columns if c not in ("kind", "layer", "head", "score", "rank") and best[c].notna().any()]
    rows = [[int(r["rank"]), int(r["layer"]), int(r["head"]), _fmt(float(r["score"]))] + [_fmt(jsonable(r[c])) for c in extra]
            for _, r in best.iterrows()]
    return _table(rows, ["rank", "layer", "head", "score"] + extra)


def findings(summary: dict) -> str:
    items = jsonable(summary)
    if not items:
        return ""
    lis = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(_fmt(v))}</li>" for k, v in items.items())
    return f"<h3>Model-level findings</h3><ul>{lis}</ul>"


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1150px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f3f3f3}.verdict{padding:.5em 1em;border-left:4px solid #2ca02c;background:#f4fbf4}
.verdict.fail{border-color:#d62728;background:#fdf3f3}section{margin-bottom:3em}
.row{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
"""


def render_report(meta: ModelMeta, results: dict[str, DetectorResult], *, top_k: int = 8,
                  thumbs: dict[str, list[Thumbnail]] | None = None, run_info: dict | None = None) -> str:
    """The whole report as one HTML string (needs no network: plotly.js is inside)."""
    fig = _Figures()
    info = run_info or {}
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>headscope report: {html.escape(meta.name)}</title>"
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>Attention heads of {html.escape(meta.name)}</h1>",
             f"<p>{meta.n_layers} layers x {meta.n_heads} heads ({meta.n_kv_heads} key/value heads), head_dim "
             f"{meta.head_dim}. Detectors: {', '.join(results)}.</p>"]
    if info:
        parts.append("<details><summary>Run settings and timing</summary>"
                     + _table([[k, _fmt(v)] for k, v in jsonable(info).items()], ["setting", "value"]) + "</details>")
    for kind, r in results.items():
        parts.append(f"<section id='{kind}'><h2>{html.escape(kind)}</h2>")
        n_scored = int(r.scores["score"].notna().sum())
        if n_scored == 0:
            note = r.summary.get("note") if isinstance(r.summary, dict) else None
            parts.append("<p class='verdict fail'>No head could be scored, so there is no ranking and no causal "
                         "check for this kind." + (f" {html.escape(str(note))}" if note else "") + "</p>"
                         + findings(r.summary) + "</section>")
            continue
        if r.validation is not None:
            cls = "verdict" if r.validation.passed else "verdict fail"
            parts.append(f"<p class='{cls}'>Causal check: {html.escape(r.validation.verdict())}</p>")
        else:
            parts.append("<p class='verdict fail'>No causal check was run for this kind.</p>")
        definition = score_definition(kind, r.summary)
        if definition:
            parts.append(f"<p><small>score = {html.escape(definition)}.</small></p>")
        parts.append("<div class='row'>" + fig(heatmap(r, meta)))
        k = r.validation.k if r.validation is not None else top_k  # the heads the verdict speaks of
        parts.append(f"<div><h3>Top {k} heads</h3>{top_table(r, k)}</div></div>")
        if r.validation is not None:
            v = r.validation
            caption = f"Damage = {v.metric}; baseline {_fmt(float(v.baseline))}."
            if v.control:
                caption += (f" Control (hatched bars, same head sets): {v.control['metric']}; baseline "
                            f"{_fmt(float(v.control['baseline']))}.")
            caption += f" {v.notes}" if v.notes else ""
            parts.append(fig(validation_bars(r)) + f"<p><small>{html.escape(caption)}</small></p>")
        parts.append(findings(r.summary))
        if thumbs and thumbs.get(kind):
            parts.append(fig(thumbnails(kind, thumbs[kind])))
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)

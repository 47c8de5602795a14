"""Plotly figures of the head explorer (pure functions of arrays, so tests can read their data)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go


def score_scale(grid: np.ndarray) -> tuple[str, bool, float | None]:
    """(colorscale, reversescale, midpoint) for an [L, H] score grid. Signed scores (temporal's
    patching effects) get a diverging scale centred on 0, so a head that works against the behaviour
    does not read as merely "low"; non-negative ones the sequential Viridis."""
    if np.isfinite(grid).any() and np.nanmin(grid) < 0:
        return "RdBu", True, 0.0
    return "Viridis", False, None


def head_map(grid: np.ndarray, title: str, selected: tuple[int, int] | None = None) -> go.Figure:
    """Layer x head map of an [L, H] score grid, x = layer, y = head.

    Drawn as square scatter markers rather than go.Heatmap because Streamlit's selection events
    (st.plotly_chart(on_select=...)) return nothing for heatmap traces; markers can be clicked.
    """
    L, H = grid.shape
    layer, head = np.meshgrid(np.arange(L), np.arange(H), indexing="ij")
    z = grid.ravel()
    finite = np.isfinite(z)
    cell = int(np.clip(760 / max(L, 1), 8, 28))
    scale, reverse, mid = score_scale(grid)
    fig = go.Figure(go.Scatter(
        x=layer.ravel()[finite], y=head.ravel()[finite], mode="markers",
        marker=dict(symbol="square", size=cell - 2, color=z[finite], colorscale=scale,
                    reversescale=reverse, cmid=mid, showscale=True, colorbar=dict(title="score"), line=dict(width=0)),
        customdata=z[finite],
        hovertemplate="layer %{x}, head %{y}<br>score %{customdata:.4f}<extra></extra>",
        name="heads",
    ))
    if not finite.all():
        # Unscored heads as open grey squares: a filled NaN marker is drawn dark grey, which reads as a
        # low score beside Viridis's dark end (the HTML report leaves those cells blank).
        fig.add_trace(go.Scatter(
            x=layer.ravel()[~finite], y=head.ravel()[~finite], mode="markers",
            marker=dict(symbol="square-open", size=cell - 4, color="#bbbbbb", line=dict(width=1)),
            hovertemplate="layer %{x}, head %{y}<br>not scored<extra></extra>", name="not scored"))
    if selected is not None:
        fig.add_trace(go.Scatter(x=[selected[0]], y=[selected[1]], mode="markers", hoverinfo="skip",
                                 marker=dict(symbol="square-open", size=cell + 2, color="red", line=dict(width=3)),
                                 name="selected"))
    fig.update_layout(
        title=title, height=max(260, cell * H + 140), width=cell * L + 220, showlegend=False,
        xaxis=dict(title="layer", dtick=1 if L <= 32 else None, range=[-0.6, L - 0.4], zeroline=False),
        yaxis=dict(title="head", dtick=1, range=[H - 0.4, -0.6], zeroline=False),
        clickmode="event+select", dragmode=False, margin=dict(l=50, r=20, t=50, b=40),
        plot_bgcolor="white",
    )
    return fig


def pattern_heatmap(pattern: np.ndarray, labels: list[str], title: str) -> go.Figure:
    """[S, S] attention pattern (rows = queries, columns = keys) with token labels and hover values."""
    S = pattern.shape[0]
    masked = np.where(np.tril(np.ones((S, S), dtype=bool)), pattern, np.nan) if _is_causal(pattern) else pattern
    fig = go.Figure(go.Heatmap(
        z=masked, x=labels, y=labels, colorscale="Blues", zmin=0.0, zmax=1.0, colorbar=dict(title="p"),
        hovertemplate="query %{y}<br>key %{x}<br>p = %{z:.4f}<extra></extra>",
    ))
    size = int(np.clip(18 * S + 200, 360, 900))
    fig.update_layout(title=title, height=size, xaxis=dict(title="key", tickangle=-60, type="category"),
                      yaxis=dict(title="query", autorange="reversed", type="category"),
                      margin=dict(l=120, r=20, t=50, b=120))
    return fig


def _is_causal(pattern: np.ndarray) -> bool:
    return bool(np.allclose(np.triu(pattern, 1), 0.0))


def statistics_lines(stats: pd.DataFrame, title: str) -> go.Figure:
    """Per-position entropy, sink mass, previous-token mass and max prob of one head."""
    fig = go.Figure()
    for col, axis in (("sink_mass", "y"), ("prev_token_mass", "y"), ("max_prob", "y"), ("entropy", "y2")):
        fig.add_trace(go.Scatter(x=stats["position"], y=stats[col], mode="lines", name=col, yaxis=axis,
                                 hovertemplate=f"position %{{x}}<br>{col} %{{y:.4f}}<extra></extra>"))
    fig.update_layout(title=title, height=420, xaxis=dict(title="query position"),
                      yaxis=dict(title="attention mass", range=[0, 1.02]),
                      yaxis2=dict(title="entropy (nats)", overlaying="y", side="right"),
                      legend=dict(orientation="h", y=-0.2))
    return fig


def top_tokens_bars(table: pd.DataFrame, title: str) -> go.Figure:
    """Grouped bars of next-token probabilities before and after an intervention."""
    fig = go.Figure([go.Bar(x=table["token"], y=table["p_before"], name="before"),
                     go.Bar(x=table["token"], y=table["p_after"], name="after")])
    fig.update_layout(title=title, barmode="group", height=380, yaxis=dict(title="probability"),
                      xaxis=dict(title="next token", type="category"))
    return fig


def attribution_bars(shares: np.ndarray, title: str) -> go.Figure:
    """Share of a latent's decoder norm in each head's block ([H], sums to 1)."""
    fig = go.Figure(go.Bar(x=[f"head {h}" for h in range(len(shares))], y=shares))
    fig.update_layout(title=title, height=300, yaxis=dict(title="share of decoder norm", range=[0, 1]))
    return fig

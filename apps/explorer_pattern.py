"""Attention pattern page: the selected head on the sidebar's prompt, as the full matrix for short
prompts and as per-position statistics (no S x S matrix) for long ones."""

from __future__ import annotations

import streamlit as st

from . import explorer_cache as C
from . import explorer_state as S
from .explorer_figures import pattern_heatmap, statistics_lines


def render_pattern() -> None:
    model = C.current_model()
    layer, head = C.selected_head(model.meta.n_layers, model.meta.n_heads)
    spec, prompt = st.session_state.get("model_spec", ""), st.session_state.get("prompt", "")
    ids, labels = S.encode_prompt(model, prompt)  # empty / over-long prompts stop here with a clear error
    n = ids.shape[1]
    force_stats = st.toggle("Statistics view (entropy, sink mass, previous-token mass per position)",
                            value=False, key="force_stats")
    title = f"layer {layer} head {head} · {n} tokens"
    if n <= S.PATTERN_MAX_TOKENS and not force_stats:
        with st.spinner(f"recording the pattern of layer {layer} head {head}..."):
            pattern, labels = C.pattern_view(spec, prompt, layer, head)
        st.plotly_chart(pattern_heatmap(pattern, labels, title), key="pattern_fig")
        return
    if n > S.PATTERN_MAX_TOKENS:
        st.info(f"{n} tokens is more than {S.PATTERN_MAX_TOKENS}: showing per-position statistics "
                "instead of the full attention matrix.")
    with st.spinner(f"recording statistics of layer {layer} head {head}..."):
        stats = C.statistics_view(spec, prompt, layer, head)
    c = st.columns(4)
    # from position 1 on, as the head map's prompt maps: position 0 sees only itself
    c[0].metric("mean entropy (nats)", f"{stats['entropy'][1:].mean():.3f}")
    c[1].metric("mean sink mass", f"{stats['sink_mass'][1:].mean():.3f}")
    c[2].metric("mean previous-token mass", f"{stats['prev_token_mass'][1:].mean():.3f}")
    c[3].metric("mean max prob", f"{stats['max_prob'][1:].mean():.3f}")
    st.plotly_chart(statistics_lines(stats, title), key="stats_fig")
    st.dataframe(stats, hide_index=True, key="stats_table")

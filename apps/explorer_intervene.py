"""Intervene page: ablate, calibrate or value-edit heads and compare the next-token distribution
before/after."""

from __future__ import annotations

import streamlit as st

from headscope.circuits import ablate_heads

from . import explorer_cache as C
from . import explorer_state as S
from .explorer_figures import top_tokens_bars

MODES = ("zero ablation", "uniform ablation", "ACT calibration", "value edit")
SOURCE_DEFAULT = "In 2009, the president of South Korea was"


def _show_sinks(model, ids, heads, used) -> None:
    """Which keys ACT scaled in each head (sinks beyond the first, found on this prompt)."""
    labels = S.token_labels(model.tokenizer, ids[0].tolist())
    rows = [{"head": f"L{l}H{h}", "sink tokens scaled": ", ".join(labels[j] for j in used[l][0, h].nonzero()[:, 0].tolist())
             or "(none beyond the first: this head is unchanged)"} for l, h in heads]
    st.dataframe(rows, hide_index=True, key="iv_sinks")


def render_intervene() -> None:
    model = C.current_model()
    meta = model.meta
    default = f"{st.session_state.get('sel_layer', 0)}.{st.session_state.get('sel_head', 0)}"
    if st.session_state.get("iv_heads_default") != default:
        # a head picked in the sidebar (or on the head map) replaces what the box held
        st.session_state["iv_heads_default"] = default
        st.session_state["iv_heads"] = default
    text = st.text_input("Heads (layer.head, comma separated)", key="iv_heads")
    mode = st.radio("Intervention", MODES, horizontal=True, key="iv_mode")
    beta = st.slider("beta (ACT: attention on sink tokens is scaled by beta)", 0.05, 1.0, 0.4, 0.05,
                     key="iv_beta") if mode == "ACT calibration" else 1.0
    encoded = None
    if mode == "value edit":  # the token to edit is picked before the run
        encoded = S.encode_prompt(model, st.session_state.get("prompt", ""))
        labels = encoded[1]
        st.caption("Adds coeff x (the head's value vectors averaged over a source prompt, BOS left out) to "
                   "the head's value at one token of your prompt: the temporal-heads paper's edit. Every "
                   "later query that attends to that token reads the change.")
        source = st.text_input("Source prompt (whose values are averaged)", SOURCE_DEFAULT, key="iv_source")
        pos_label = st.selectbox("Token of your prompt to edit", labels, index=len(labels) - 1, key="iv_pos")
        coeff = st.slider("coeff", -10.0, 10.0, 3.0, 0.5, key="iv_coeff")
    if not st.button("Apply and compare", key="iv_run", type="primary"):
        st.caption("The next-token distribution after the prompt, before and after the intervention.")
        return
    heads = S.parse_heads(text, meta.n_layers, meta.n_heads)
    ids, labels = encoded or S.encode_prompt(model, st.session_state.get("prompt", ""))
    progress = st.progress(0.0, text="forward without intervention...")
    before = S.next_token_probs(model, ids)
    progress.progress(0.5, text=f"forward with {mode} of {len(heads)} head(s)...")
    if mode == "ACT calibration":
        from headscope.circuits.calibration import calibrate

        context = calibrate(model, heads, {"input_ids": ids}, beta=beta)
    elif mode == "value edit":
        from headscope.circuits.value_edit import edit_values, value_means

        means = value_means(model, source, heads)
        context = edit_values(model, {hd: coeff * means[hd] for hd in heads}, labels.index(pos_label))
    else:
        context = ablate_heads(model, heads, mode=mode.split()[0])
    with context as used:
        after = S.next_token_probs(model, ids)
    progress.progress(1.0, text="done")
    if mode == "ACT calibration":
        _show_sinks(model, ids, heads, used)
    table = S.compare_top(model.tokenizer, before, after, k=10)
    c = st.columns(3)
    c[0].metric("KL(before || after) nats", f"{S.kl_divergence(before, after):.4g}")
    c[1].metric("top-1 before", table.loc[table["rank_before"] == 1, "token"].iloc[0])
    after_top = S.compare_top(model.tokenizer, after, after, k=1)["token"].iloc[0]
    c[2].metric("top-1 after", after_top)
    st.plotly_chart(top_tokens_bars(table, f"{mode} of {', '.join(f'L{l}H{h}' for l, h in heads)}"), key="iv_fig")
    st.dataframe(table, hide_index=True, key="iv_table")

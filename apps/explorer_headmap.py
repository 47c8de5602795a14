"""Head map page: a layer x head map per head kind (from a rank report, detectors run here, or the
prompt's own statistics); clicking a cell selects that head for the other pages."""

from __future__ import annotations

import numpy as np
import streamlit as st

from . import explorer_cache as C
from . import explorer_state as S
from .explorer_figures import head_map


def _on_select(chart_key: str) -> None:
    # Runs before the rerun, so it may still set the sidebar widgets' state.
    event = st.session_state.get(chart_key) or {}
    points = (event.get("selection") or {}).get("points") or []
    picked = S.point_to_head(points[0]) if points else None
    if picked is not None:
        st.session_state["sel_layer"], st.session_state["sel_head"] = picked


def _detector_maps(model) -> dict[str, np.ndarray]:
    """Detectors run from this page on the loaded model (validation off: it ablates many head sets)."""
    try:
        from headscope.circuits import KINDS, DetectorConfig, run_detector
        from headscope.circuits.scores import score_grid
    except ImportError as exc:
        st.info(f"head detectors are not available in this install ({exc}).")
        return {}
    # per model: a map scored on another model would offer heads this one does not have
    spec = st.session_state.get("model_spec", "")
    maps = st.session_state.setdefault("detector_maps", {}).setdefault(spec, {})
    with st.expander("Score heads with a detector on the loaded model"):
        kind = st.selectbox("detector", KINDS, key="det_kind")
        n_prompts = st.number_input("prompts", min_value=1, max_value=64, value=4, key="det_n")
        if st.button("Run detector", key="det_run"):
            with st.spinner(f"running the {kind} detector on {n_prompts} prompts..."):
                try:
                    result = run_detector(model, kind, DetectorConfig(n_prompts=int(n_prompts), validate=False,
                                                                      progress=False))
                except ModuleNotFoundError:
                    st.info(f"the {kind} detector is not written yet in this version of headscope.")
                    return maps
            maps[f"detector: {kind}"] = score_grid(result.scores, model.meta.n_layers, model.meta.n_heads)
            st.success(f"{kind}: scored {len(result.scores)} heads.")
    return maps


def render_headmap() -> None:
    report = C.current_report()
    maps: dict[str, np.ndarray] = {}
    if report is not None:
        st.caption(f"report {report.path} · model {report.model} · {report.n_layers} layers x {report.n_heads} heads")
        maps.update({k: report.grid(k) for k in report.kinds})
    use_prompt = st.checkbox("Add maps of the prompt's own attention statistics (runs the model)",
                             value=report is None, key="prompt_maps")
    model = None
    if use_prompt or report is None:
        model = C.current_model()
        if report is not None and report.model not in ("?", model.meta.name):
            st.warning(f"the report was written for {report.model}; the prompt maps below are of {model.meta.name}.")
        with st.spinner("recording every head on the prompt..."):
            maps.update(C.prompt_maps(st.session_state.get("model_spec", ""), st.session_state.get("prompt", "")))
        maps.update(_detector_maps(model))
    if not maps:
        st.info("nothing to show: open a rank report or tick the prompt maps.")
        return
    kind = st.radio("Head kind", list(maps), horizontal=True, key="kind")
    grid = maps[kind]
    L, H = grid.shape
    try:
        selected = C.selected_head(L, H)
    except S.HeadIndexError as exc:
        st.error(f"invalid head selection: {exc}")
        selected = None
    chart_key = "map_" + "".join(c if c.isalnum() else "_" for c in kind)
    st.plotly_chart(head_map(grid, f"{kind} (click a head)", selected), key=chart_key, on_select=lambda: _on_select(chart_key),
                    selection_mode="points", width="content")
    if selected is not None:
        st.metric(f"{kind} score of layer {selected[0]} head {selected[1]}", f"{grid[selected]:.4f}")
    st.subheader("Top heads")
    if report is not None and kind in report.kinds:
        # the report's own ranks (its order among tied scores), so both views list the same heads
        # heads without a score (NaN: e.g. retrieval when no needle was retrieved) are nobody's top heads
        top = report.scores[(report.scores["kind"] == kind) & report.scores["score"].notna()].sort_values("rank").head(10)
        rows = [{"rank": int(r["rank"]), "layer": int(r["layer"]), "head": int(r["head"]), "score": float(r["score"])}
                for _, r in top.iterrows()]
    else:
        order = np.argsort(-np.nan_to_num(grid.ravel(), nan=-np.inf), kind="stable")[:10]
        rows = [{"rank": i + 1, "layer": int(o // H), "head": int(o % H), "score": float(grid.ravel()[o])}
                for i, o in enumerate(order)]
    if not rows:
        st.info(f"no head has a {kind} score in this report, so there are no top heads.")
    st.dataframe(rows, hide_index=True)
    if report is not None and kind in report.validation:
        v = report.validation[kind]
        st.caption(v.get("verdict") or f"causal validation: top-{v.get('k')} damage {v.get('top_k_damage')} vs "
                   f"random {v.get('random_k_damage')} ({v.get('metric')})")

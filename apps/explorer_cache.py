"""Streamlit caches of the explorer: the model once per process, one-head views per (prompt, head)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from . import explorer_state as S


@st.cache_resource(show_spinner=False, max_entries=2)
def get_model(spec: str):
    """The loaded model for a spec ("" = the embedded SmolLM2), shared by every session."""
    from headscope.probe import load_model

    return load_model(spec.strip() or None)


@st.cache_resource(show_spinner=False, max_entries=4)
def get_report(path: str, stamp: tuple = ()) -> S.Report:
    """The report at `path`; `stamp` (files' mtimes and sizes) makes a rewritten report load anew."""
    return S.load_report(path)


def file_stamp(path: str) -> tuple:
    """(name, mtime_ns, size) of the files a report directory is read from (path itself if a file)."""
    p = Path(path).expanduser()
    files = [p / "heads.json", p / "heads.csv"] if p.is_dir() else [p]
    return tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.exists())


@st.cache_resource(show_spinner=False, max_entries=32)
def pattern_view(spec: str, prompt: str, layer: int, head: int):
    model = get_model(spec)
    ids, labels = S.encode_prompt(model, prompt)
    return S.head_pattern(model, ids, layer, head), labels


@st.cache_resource(show_spinner=False, max_entries=32)
def statistics_view(spec: str, prompt: str, layer: int, head: int):
    model = get_model(spec)
    ids, labels = S.encode_prompt(model, prompt)
    stats = S.head_statistics(model, ids, layer, head)
    stats.insert(1, "token", labels)
    return stats


@st.cache_resource(show_spinner=False, max_entries=8)
def prompt_maps(spec: str, prompt: str) -> dict:
    model = get_model(spec)
    ids, _ = S.encode_prompt(model, prompt)
    return S.prompt_head_means(model, ids)


def current_report():
    """The report named in the sidebar, or None; a bad directory raises ReportError (in-page error)."""
    path = st.session_state.get("report_dir", "").strip()
    return get_report(path, file_stamp(path)) if path else None


def current_model():
    spec = st.session_state.get("model_spec", "")
    with st.spinner(f"loading {spec or 'the embedded model'} (once per process)..."):
        return get_model(spec)


def selected_head(n_layers: int, n_heads: int) -> tuple[int, int]:
    """The sidebar's (layer, head), validated; HeadIndexError becomes an in-page error."""
    return S.check_head(n_layers, n_heads, st.session_state.get("sel_layer", 0), st.session_state.get("sel_head", 0))

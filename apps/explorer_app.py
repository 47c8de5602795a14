"""The headscope head explorer (Streamlit). Start it with `headscope explore`.

The sidebar holds everything that lives across pages (source, selected head, prompt) so that
Streamlit keeps those widgets' values when the page changes. Configuration from the CLI arrives in
environment variables: HEADSCOPE_EXPLORE_MODEL, HEADSCOPE_EXPLORE_REPORT, HEADSCOPE_EXPLORE_SAE.
"""

from __future__ import annotations

import os

import streamlit as st

from headscope.apps import explorer_cache as C
from headscope.apps.explorer_headmap import render_headmap
from headscope.apps.explorer_intervene import render_intervene
from headscope.apps.explorer_pattern import render_pattern
from headscope.apps.explorer_sae import render_sae
from headscope.kernels.errors import HeadscopeError

PAGES = {"Head map": render_headmap, "Attention pattern": render_pattern, "Intervene": render_intervene,
         "SAE latents": render_sae}
DEFAULT_PROMPT = ("When Mary and John went to the store, John gave a drink to Mary. "
                  "When Mary and John went to the store, John gave a drink to")


def sidebar() -> str:
    sb = st.sidebar
    sb.title("headscope explorer")
    page = sb.radio("Page", list(PAGES), key="page")
    sb.text_input("Model (empty = embedded SmolLM2-135M-Instruct; a local dir or hub id)",
                  value=os.environ.get("HEADSCOPE_EXPLORE_MODEL", ""), key="model_spec")
    sb.text_input("Rank report directory (heads.json / heads.csv)",
                  value=os.environ.get("HEADSCOPE_EXPLORE_REPORT", ""), key="report_dir")
    sb.markdown("**Selected head** (click one on the head map, or type it)")
    c1, c2 = sb.columns(2)
    c1.number_input("layer", value=0, step=1, key="sel_layer")
    c2.number_input("head", value=0, step=1, key="sel_head")
    sb.text_area("Prompt", value=DEFAULT_PROMPT, height=150, key="prompt")
    return page


def main() -> None:
    st.set_page_config(page_title="headscope explorer", layout="wide")
    page = sidebar()
    st.header(page)
    try:
        PAGES[page]()
    except HeadscopeError as exc:
        st.error(str(exc))
    except Exception as exc:  # noqa: BLE001 - the page shows what went wrong instead of a stack trace
        st.error(f"unexpected error ({type(exc).__name__}): {exc}")


main()

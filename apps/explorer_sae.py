"""SAE latents page: browse a saved sparse autoencoder's latents (top contexts, head attribution)."""

from __future__ import annotations

import os

import streamlit as st


def render_sae() -> None:
    st.text_input("Saved SAE directory", value=os.environ.get("HEADSCOPE_EXPLORE_SAE", ""), key="sae_dir")
    try:
        from headscope.sae import load_sae  # noqa: F401
    except ImportError:
        st.info("Saving and loading SAEs (headscope.sae.load_sae) is not in this version of headscope yet; "
                "this page will browse latents once it is.")
        return

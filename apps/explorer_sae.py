"""SAE latents page: browse a saved sparse autoencoder on a layer's head outputs: the latents most
active on the prompt, one latent's head attribution and its top-activating contexts."""

from __future__ import annotations

import os

import pandas as pd
import streamlit as st
import torch

from . import explorer_cache as C
from .explorer_figures import attribution_bars


@st.cache_resource(show_spinner=False, max_entries=4)
def _sae(path: str, stamp: tuple):
    """The SAE at path; `stamp` (`sae_stamp`) keys the cache, so a folder rewritten on disk (a new
    training run, `sae train --resume`) is read again instead of showing the old SAE."""
    from headscope.sae.saelens_format import load_sae

    return load_sae(path)


def sae_stamp(path: str) -> tuple:
    """(name, mtime_ns, size) of each file directly in the SAE folder (the path itself if a file)."""
    p = os.path.expanduser(path)
    if not os.path.isdir(p):
        return C.file_stamp(p) if os.path.exists(p) else ()
    return tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in os.scandir(p) if e.is_file()))


@st.cache_resource(show_spinner=False, max_entries=16)
def _prompt_latents(spec: str, path: str, stamp: tuple, prompt: str, n: int = 10) -> pd.DataFrame:
    """The n latents with the largest activation anywhere on the prompt (BOS left out)."""
    from headscope.apps.explorer_state import encode_prompt
    from headscope.sae.activations import stream_activations

    model, sae = C.get_model(spec), _sae(path, stamp)
    ids, labels = encode_prompt(model, prompt)
    with torch.no_grad():
        f = sae.encode(next(stream_activations(model, sae.cfg.layer, sae.cfg.site, [ids], skip_first=True)))
    best, where = f.max(dim=0)
    top = best.topk(min(n, f.shape[1]))
    return pd.DataFrame({"latent": top.indices.numpy(), "max_activation": top.values.numpy(),
                         "at_token": [labels[int(where[i]) + 1] for i in top.indices]})


@st.cache_resource(show_spinner=False, max_entries=16)
def _top_contexts(spec: str, path: str, stamp: tuple, prompt: str, latent: int, n_docs: int) -> pd.DataFrame:
    from headscope.apps.explorer_state import encode_prompt
    from headscope.sae.corpus import default_corpus, packed_batches
    from headscope.sae.metrics import top_activating

    model, sae = C.get_model(spec), _sae(path, stamp)
    batches = [encode_prompt(model, prompt)[0]]
    if n_docs:
        batches += list(packed_batches(model.tokenizer, default_corpus(n_docs, seed=0), seq_len=128, batch_size=1,
                                       bos_id=model.tokenizer.bos_token_id))
    rows = top_activating(model, sae, sae.cfg.layer, batches, [latent], n=10)
    return pd.DataFrame(rows, columns=["rank", "activation", "token", "context", "row", "position"])


def render_sae() -> None:
    path = st.text_input("Saved SAE directory (SAELens format: cfg.json + sae_weights.safetensors)",
                         value=os.environ.get("HEADSCOPE_EXPLORE_SAE", ""), key="sae_dir").strip()
    if not path:
        st.info("Enter the directory of an SAE saved with headscope.sae.saelens_format.save_sae "
                "(or `headscope sae train`) to browse its latents.")
        return
    stamp = sae_stamp(path)
    with st.spinner("loading the SAE..."):
        sae = _sae(path, stamp)
    cfg = sae.cfg
    model = C.current_model()
    st.caption(f"{cfg.arch} SAE · d_in {cfg.d_in} · {cfg.d_sae} latents · layer {cfg.layer} · site {cfg.site}"
               f"{f' · k {cfg.k}' if cfg.arch in ('topk', 'batchtopk') else ''} · trained on {cfg.model or '?'}")
    if cfg.model and cfg.model != model.meta.name:
        st.warning(f"this SAE was trained on {cfg.model}; the loaded model is {model.meta.name}.")
    from headscope.sae.activations import ActivationError, site_dim

    if not 0 <= cfg.layer < model.meta.n_layers or site_dim(model.meta, cfg.site) != cfg.d_in:
        raise ActivationError(f"this SAE reads layer {cfg.layer} {cfg.site} with d_in {cfg.d_in}, which "
                              f"{model.meta.name} does not have: load the model it was trained on.")
    spec, prompt = st.session_state.get("model_spec", ""), st.session_state.get("prompt", "")
    st.subheader("Latents most active on the prompt")
    with st.spinner("encoding the prompt's activations..."):
        st.dataframe(_prompt_latents(spec, path, stamp, prompt), hide_index=True, key="sae_prompt_latents")
    latent = st.number_input("latent", value=0, step=1, key="sae_latent")
    if not 0 <= latent < cfg.d_sae:
        st.error(f"latent {latent} is out of range: this SAE has latents 0..{cfg.d_sae - 1}.")
        return
    if cfg.site == "z":
        from headscope.sae.metrics import head_attribution

        shares = head_attribution(sae, model.meta.n_heads, model.meta.head_dim)[int(latent)].numpy()
        st.plotly_chart(attribution_bars(shares, f"latent {latent}: decoder norm per head"), key="sae_attr")
    n_docs = st.number_input("documents of the embedded corpus to search (besides the prompt)", min_value=0,
                             max_value=256, value=8, step=4, key="sae_docs")
    if st.button("Find top-activating contexts", key="sae_top"):
        with st.spinner(f"encoding the prompt and {n_docs} documents..."):
            st.dataframe(_top_contexts(spec, path, stamp, prompt, int(latent), int(n_docs)), hide_index=True,
                         key="sae_contexts")

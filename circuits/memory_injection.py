"""Memory injection (Sakarvadia et al. 2023): add tau * (summed input embeddings of memory tokens)
to one layer's attention output, and sweep layers x tau on a multi-hop prompt set."""

from __future__ import annotations

from contextlib import contextmanager

import math

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from headscope.probe import HeadscopeModel
from headscope.probe.errors import InputError

from .next_token import first_token_id, last_token_logprobs, load_jsonl


def memory_vector(model: HeadscopeModel, memory) -> torch.Tensor:
    """m = sum of the input embeddings of the memory's tokens, as the model's embedding layer gives them
    (scale included) -> [d_model] (no BOS); a list of
    memories (one per example of a batch) -> [B, d_model]."""
    if isinstance(memory, (list, tuple)):
        if not memory:
            raise InputError("empty list of memories.")
        return torch.stack([memory_vector(model, m) for m in memory])
    if not isinstance(memory, str) or not memory.strip():
        raise InputError("empty memory: give the words to inject, e.g. 'George Washington'.")
    ids = model.tokenizer(memory, add_special_tokens=False)["input_ids"]
    # The embedding module's forward, not its weight rows: Gemma's scales them by sqrt(d_model), and
    # m must be what the model's first layer sees.
    embed = model.hf.get_input_embeddings()
    with torch.no_grad():
        return embed(torch.tensor([ids], device=embed.weight.device))[0].float().sum(0)


@contextmanager
def inject_memory(model: HeadscopeModel, memory, layer: int, tau: float, positions="all"):
    """Inside the block, layer `layer`'s attention output (after o_proj) gets tau * m added.

    memory: words (str), or one str per example of the batches run inside the block.

    positions: "all" (default, every position) or a bool mask [S] / [B, S].
    """
    tau = float(tau)
    if not math.isfinite(tau):
        raise InputError(f"tau must be a finite number, got {tau}.")
    mask = None if isinstance(positions, str) and positions == "all" else positions
    if isinstance(mask, str):
        raise InputError(f"positions must be 'all' or a bool mask, got {positions!r}.")
    with model.add_to_attention_output(layer, tau * memory_vector(model, memory), mask):
        yield model


def answer_probs(model: HeadscopeModel, prompts: list[str], answers: list[str]) -> torch.Tensor:
    """[N] probability of each answer's first token after its prompt (one batch)."""
    ids = torch.tensor([first_token_id(model, a) for a in answers])
    return last_token_logprobs(model, prompts, batch_size=len(prompts)).gather(1, ids[:, None])[:, 0].exp()


def injection_sweep(model: HeadscopeModel, items=None, *, layers=None, taus=range(1, 16), control: bool = False,
                    ) -> pd.DataFrame:
    """Inject each item's memory at every (layer, tau) and measure the first answer token.

    Args:
        items: rows with question, memory, answer (default: circuits/data/multihop.jsonl).
        control: inject another item's memory (unrelated words) instead of the item's own.
    Returns:
        one row per (layer, tau): median_rel_change = median over prompts of (p' - p) / p,
        mean_delta = mean p' - p, frac_improved; attrs["base_probs"] holds p [N].
    """
    items = load_jsonl("multihop.jsonl") if items is None else items
    if not items:
        raise InputError("no prompts to sweep.")
    if control and len(items) < 2:
        raise InputError("control=True injects another item's memory: it needs at least two items "
                         "(with one, the control would inject the item's own memory).")
    layers = list(range(model.meta.n_layers)) if layers is None else list(layers)
    qs = [it["question"] for it in items]
    ans = [it["answer"] for it in items]
    mems = [it["memory"] for it in items]
    if control:
        shift = len(items) // 2 or 1
        mems = mems[shift:] + mems[:shift]
    base = answer_probs(model, qs, ans)
    rows = []
    for layer in tqdm(layers, desc="memory injection sweep"):
        for tau in taus:
            with inject_memory(model, mems, layer, tau):
                after = answer_probs(model, qs, ans)
            rel = (after - base) / base
            rows.append({"layer": layer, "tau": float(tau), "median_rel_change": float(np.median(rel.cpu().numpy())),
                         "mean_delta": float((after - base).mean()), "frac_improved": float((after > base).float().mean())})
    df = pd.DataFrame(rows)
    df.attrs["base_probs"] = base
    df.attrs["n_prompts"] = len(items)
    return df


def sweep_heatmap(df: pd.DataFrame, value: str = "median_rel_change", title: str | None = None):
    """Plotly heatmap of a sweep: layers (y) x tau (x)."""
    import plotly.express as px

    grid = df.pivot(index="layer", columns="tau", values=value)
    return px.imshow(grid, aspect="auto", origin="lower", color_continuous_scale="RdBu_r", color_continuous_midpoint=0,
                     labels={"x": "tau", "y": "layer", "color": value},
                     title=title or f"memory injection: {value} of the first answer token (n = {df.attrs.get('n_prompts')})")

"""Attention calibration (ACT; Yu et al. 2024, "Unveiling and Harnessing Hidden Attention Sinks").

Per input and per head, a key j is a sink when colsum_j / (number of queries that see j) > 0.1;
the first sink found (normally BOS) is skipped. In the chosen heads the attention on the other
sinks is scaled by beta = 0.4 and the freed mass goes to the remaining keys in proportion:
p'_ij = beta p_ij on the sinks, p_ij (1 - beta S_i) / (1 - S_i) elsewhere (`key_scale`).

As in the authors' code (GATECH-EIC/ACT, models/llama_modelling_aug.py) a head's sinks come from
its own attention map as it is when the layer runs, i.e. after the calibration of earlier layers:
with `sequential=True` (default) each layer's colsum is recorded with the earlier layers already
calibrated; `sequential=False` takes every layer's sinks from one uncalibrated pass (cheaper).
"""

from __future__ import annotations

import math
import operator
from contextlib import contextmanager

import pandas as pd
import torch
from tqdm.auto import tqdm

from headscope.kernels.errors import HeadscopeError
from headscope.kernels.stats import StatsRequest
from headscope.probe import HeadscopeModel, LayerEdit

from .ablation import heads_by_layer
from .detect_sink import visible_query_counts
from .next_token import first_token_id

BETA = 0.4
THRESHOLD = 0.1


class CalibrationError(HeadscopeError, ValueError):
    """Bad calibration parameters (beta, threshold) or task items."""


def check_beta(beta) -> float:
    beta = float(beta)
    if not math.isfinite(beta) or not 0 < beta <= 1:
        raise CalibrationError(f"beta must be a finite number in (0, 1] (got {beta}); beta = 1 changes nothing, "
                               "beta -> 0 removes the sinks' attention (ACT uses 0.4); beta > 1 would make "
                               "probabilities negative on rows where beta times the sink mass exceeds 1.")
    return beta


def sink_keys(colsum: torch.Tensor, attention_mask: torch.Tensor | None = None, *, threshold: float = THRESHOLD,
              skip_first: bool = True, causal: bool = True, window: int | None = None) -> torch.Tensor:
    """ACT sinks from column sums.

    Args:
        colsum: [B, H, S] attention each key receives, summed over queries.
        attention_mask: [B, S] (1 = real token), for padded batches.
        window: the layer's sliding window (query i sees key j when i - j < window), None for full.
    Returns:
        [B, H, S] bool: keys whose mean received attention, over the real queries that can see
        them, exceeds `threshold`, without the first one.
    """
    B, H, S = colsum.shape
    valid = torch.ones(B, S, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
    seen = visible_query_counts(valid, causal, window)
    ratio = colsum.float().cpu() / seen[:, None, :].clamp_min(1)
    sinks = (ratio > threshold) & valid[:, None, :]
    if skip_first:
        first = torch.where(sinks.any(-1), sinks.float().argmax(-1), torch.full((B, H), -1))
        sinks &= torch.arange(S)[None, None, :] != first[..., None]
    return sinks


def _window(model: HeadscopeModel, layer: int) -> int | None:
    return model.meta.sliding_windows[layer] if model.meta.sliding_windows else None


def _colsum(model: HeadscopeModel, batch: dict, layer: int) -> torch.Tensor:
    _, rec = model.run_recorded(batch["input_ids"], batch.get("attention_mask"), StatsRequest(colsum=True),
                                stop_after_layer=layer)
    return rec.stats["colsum"][:, layer]


@contextmanager
def calibrate(model: HeadscopeModel, heads, batch: dict, *, beta: float = BETA, threshold: float = THRESHOLD,
              sequential: bool = True):
    """ACT on `heads` [(layer, head), ...] for the forwards of `batch` (a tokenized dict) in the block.

    Sinks depend on the input, so the block must run this same batch (same ids and padding).
    Yields {layer: [B, H, S] bool} the sink key sets used.
    """
    beta = check_beta(beta)
    masks = heads_by_layer(model, heads)
    edits: dict[int, LayerEdit] = {}
    used: dict[int, torch.Tensor] = {}
    mask = batch.get("attention_mask")
    if not sequential and masks:
        _, rec = model.run_recorded(batch["input_ids"], mask, StatsRequest(colsum=True),
                                    stop_after_layer=max(masks))
    for layer in sorted(masks):
        if sequential:
            with model.edit_attention(edits):
                cs = _colsum(model, batch, layer)
        else:
            cs = rec.stats["colsum"][:, layer]
        keys = sink_keys(cs, mask, threshold=threshold, causal=model.meta.causal,
                         window=_window(model, layer)) & masks[layer][None, :, None]
        used[layer] = keys
        betas = torch.where(masks[layer], torch.tensor(beta), torch.tensor(1.0))
        edits[layer] = LayerEdit(key_scale_beta=betas, keys=keys.to(model.device))
    with model.edit_attention(edits):
        yield used


def _choice_ids(model: HeadscopeModel, item: dict) -> list[int]:
    """First token ids of an item's choices; refuses ties (they would make accuracy meaningless)."""
    choices = item.get("choices") or []
    if not choices:
        raise CalibrationError(f"a task item needs choices (prompt {item.get('prompt')!r}).")
    ids = [first_token_id(model, c) for c in choices]
    if len(set(ids)) < len(ids):
        toks = [model.tokenizer.convert_ids_to_tokens(i) for i in ids]
        raise CalibrationError(f"choices {choices!r} share a first token ({toks}); choices are scored by their first "
                               f"token, so these would tie (prompt {item.get('prompt')!r}). Reword them.")
    return ids


def _label(item: dict) -> int:
    label = item.get("label")
    try:
        label = None if isinstance(label, bool) else operator.index(label)  # ints, numpy / torch integers
    except TypeError:
        label = None
    if label is None or not 0 <= label < len(item.get("choices") or []):
        raise CalibrationError(f"a task item's label must be an integer index into its choices; got label "
                               f"{item.get('label')!r} for choices {item.get('choices')!r}.")
    return label


def choice_logprobs(model: HeadscopeModel, items: list[dict], *, heads=(), beta: float = BETA,
                    threshold: float = THRESHOLD, batch_size: int = 40, sequential: bool = True) -> torch.Tensor:
    """[N, n_choices] log-probabilities of each choice's first token after its prompt, optionally
    with ACT on `heads`. items: {"prompt", "choices": [...], "label": index}."""
    if not items:
        raise CalibrationError("no task items.")
    choice_ids = [_choice_ids(model, it) for it in items]
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        batch = model.tokenize([it["prompt"] for it in chunk], prepend_bos=True, padding_side="right")
        last = batch["attention_mask"].sum(1) - 1
        with torch.no_grad():
            if heads:
                with calibrate(model, heads, batch, beta=beta, threshold=threshold, sequential=sequential):
                    logits = model.hf(**batch, use_cache=False).logits
            else:
                logits = model.hf(**batch, use_cache=False).logits
        lp = torch.log_softmax(logits[torch.arange(len(chunk)), last].float(), -1).cpu()
        ids = torch.tensor(choice_ids[i:i + batch_size])
        out.append(lp.gather(1, ids))
    return torch.cat(out)


def accuracy(model: HeadscopeModel, items: list[dict], **kw) -> float:
    """Fraction of items whose label has the highest first-token probability among the choices."""
    labels = torch.tensor([_label(it) for it in items])
    lp = choice_logprobs(model, items, **kw)
    return float((lp.argmax(1) == labels).float().mean())


def candidate_heads(model: HeadscopeModel, items: list[dict], *, threshold: float = THRESHOLD,
                    limit: int | None = None) -> list[tuple[int, int]]:
    """Heads with sinks beyond the first on the items, most attention on them first (one pass)."""
    batch = model.tokenize([it["prompt"] for it in items], prepend_bos=True, padding_side="right")
    _, rec = model.run_recorded(batch["input_ids"], batch["attention_mask"], StatsRequest(colsum=True))
    cs = rec.stats["colsum"]  # [B, L, H, S]
    score = {}
    for layer in range(model.meta.n_layers):
        sinks = sink_keys(cs[:, layer], batch["attention_mask"], threshold=threshold, causal=model.meta.causal,
                          window=_window(model, layer))
        mass = (cs[:, layer].cpu() * sinks).sum((0, 2))
        for h in range(model.meta.n_heads):
            if mass[h] > 0:
                score[(layer, h)] = float(mass[h])
    ranked = sorted(score, key=score.get, reverse=True)
    return ranked[:limit] if limit else ranked


def select_heads(model: HeadscopeModel, items: list[dict], candidates=None, *, beta: float = BETA,
                 threshold: float = THRESHOLD, sequential: bool = True) -> pd.DataFrame:
    """Calibrate one candidate head at a time on the calibration items; keep those that raise accuracy.

    Returns one row per candidate (layer, head, accuracy, delta, keep); attrs["baseline"] is the
    uncalibrated accuracy and attrs["heads"] the kept heads.
    """
    beta = check_beta(beta)
    candidates = candidate_heads(model, items, threshold=threshold) if candidates is None else list(candidates)
    base = accuracy(model, items)
    rows = []
    for layer, head in tqdm(candidates, desc="ACT head selection"):
        acc = accuracy(model, items, heads=[(layer, head)], beta=beta, threshold=threshold, sequential=sequential)
        rows.append({"layer": layer, "head": head, "accuracy": acc, "delta": acc - base, "keep": acc > base})
    df = pd.DataFrame(rows, columns=["layer", "head", "accuracy", "delta", "keep"])
    df.attrs["baseline"] = base
    df.attrs["heads"] = [(int(r.layer), int(r.head)) for r in df.itertuples() if r.keep]
    return df

"""Head importance and iterative pruning (Michel et al. 2019, "Are Sixteen Heads Really Better than One?").

A gate xi_h multiplies every head's output z; importance I_h = E_x |dL(x)/dxi_h| at xi = 1, which
equals |sum_pos <z_h, dL/dz_h>| per example. Gradients run through the exact torch attention path
(the Triton kernel has no backward); the gate is a `LayerEdit(z_fn=...)`, so no hook is touched.
"""

from __future__ import annotations

from contextlib import contextmanager

import pandas as pd
import torch
from tqdm.auto import tqdm

from headscope.probe import HeadscopeModel, LayerEdit
from headscope.probe.errors import InputError

from .ablation import ablate_heads
from .interventions import as_batches
from .pruning import PruningError


def _token_losses(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean next-token cross-entropy per example -> [B]."""
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    nll = -lp.gather(-1, ids[:, 1:, None])[..., 0]
    m = torch.ones_like(nll) if mask is None else mask[:, 1:].float() * mask[:, :-1].float()
    return (nll * m).sum(1) / m.sum(1).clamp_min(1)


@contextmanager
def frozen_parameters(model: HeadscopeModel):
    """The model's parameters get no gradients inside the block (gradient runs want d/d activations
    only; weight gradients would cost a model's worth of memory); their flags come back on exit."""
    params = list(model.hf.parameters())
    was = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)


def head_importance(model: HeadscopeModel, texts, *, normalize: bool = True, pruned=()) -> torch.Tensor:
    """Importance [L, H] of every head on a text set (texts or tokenized batches).

    pruned: heads already removed (their gate is held at 0; their importance is reported as NaN).
    normalize: divide each layer's importances by their l2 norm (Michel et al.).
    """
    L, H = model.meta.n_layers, model.meta.n_heads
    keep = torch.ones(L, H)
    for l, h in pruned:
        keep[model.meta.check_head(int(l), int(h))] = 0.0
    total = torch.zeros(L, H, dtype=torch.float64)
    n = 0
    with frozen_parameters(model):
        for batch in tqdm(as_batches(model, texts), desc="head importance", leave=False):
            ids, mask = batch["input_ids"], batch.get("attention_mask")
            gate = torch.ones(ids.shape[0], L, H, requires_grad=True)

            def z_fn(z, layer, gate=gate):
                g = gate[:, layer] * keep[layer]
                return z * g.to(z.device, z.dtype)[:, :, None, None]

            with torch.enable_grad(), model.edit_attention({l: LayerEdit(z_fn=z_fn) for l in range(L)}):
                logits = model.hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
                _token_losses(logits, ids, mask).sum().backward()
            total += gate.grad.abs().double().sum(0)
            n += ids.shape[0]
    imp = (total / max(n, 1)).float()
    if normalize:
        imp = imp / imp.norm(dim=1, keepdim=True).clamp_min(1e-20)
    return imp.masked_fill(keep == 0, float("nan"))


def lm_loss(model: HeadscopeModel, texts, pruned=()) -> float:
    """Mean next-token loss over a text set, with `pruned` heads zero-ablated."""
    losses = []
    with ablate_heads(model, list(pruned)):
        for batch in as_batches(model, texts):
            with torch.no_grad():
                logits = model.hf(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                  use_cache=False).logits
            losses.append(_token_losses(logits, batch["input_ids"], batch.get("attention_mask")))
    return float(torch.cat(losses).mean())


def iterative_pruning(model: HeadscopeModel, texts, *, step: float = 0.1, max_fraction: float = 0.5,
                      metric=None, normalize: bool = True) -> pd.DataFrame:
    """Prune the least important `step` fraction of all heads, re-estimate importance, repeat.

    Args:
        texts: text set for importance (and for the default metric, LM loss).
        metric: fn(model, pruned_heads) -> float evaluated after each step; default LM loss on texts.
        max_fraction: stop once this fraction of all heads is pruned. A layer always keeps one head.
    Returns:
        DataFrame (step, n_pruned, fraction, metric, heads) with heads = the cumulative pruned list.
    """
    if not 0 < step <= 1 or not 0 <= max_fraction < 1:
        raise InputError(f"step must be in (0, 1] and max_fraction in [0, 1); got {step}, {max_fraction}.")
    L, H = model.meta.n_layers, model.meta.n_heads
    total = L * H
    per_step = max(1, round(step * total))
    metric = metric or (lambda m, pruned: lm_loss(m, texts, pruned))
    pruned: list[tuple[int, int]] = []
    rows = [{"step": 0, "n_pruned": 0, "fraction": 0.0, "metric": metric(model, pruned), "heads": []}]
    target = int(max_fraction * total + 1e-9)
    bar = tqdm(total=target, desc="iterative pruning")
    while len(pruned) < target:
        imp = head_importance(model, texts, normalize=normalize, pruned=pruned)
        left = torch.full((L,), H)
        for l, _ in pruned:
            left[l] -= 1
        order = [divmod(int(i), H) for i in torch.argsort(imp.flatten().nan_to_num(float("inf")))]
        chosen = []
        for l, h in order:
            if len(chosen) >= min(per_step, target - len(pruned)):
                break
            if (l, h) in pruned or left[l] <= 1:
                continue
            chosen.append((l, h))
            left[l] -= 1
        if not chosen:
            raise PruningError("no head left that can be pruned without emptying a layer.")
        pruned += chosen
        bar.update(len(chosen))
        rows.append({"step": len(rows), "n_pruned": len(pruned), "fraction": len(pruned) / total,
                     "metric": metric(model, pruned), "heads": list(pruned)})
    bar.close()
    return pd.DataFrame(rows)


def pruning_figure(curve: pd.DataFrame, metric_name: str = "LM loss"):
    """Plotly line: metric against the fraction of heads pruned."""
    import plotly.express as px

    return px.line(curve, x="fraction", y="metric", markers=True,
                   labels={"fraction": "fraction of heads pruned", "metric": metric_name},
                   title="Iterative head pruning (Michel et al. 2019)")

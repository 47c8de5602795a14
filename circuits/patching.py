"""Per-head activation patching between a clean and a corrupted prompt, and its linear
approximation, attribution patching.

Run the corrupted prompt, replace one head's output z (before the output projection) by the clean
run's z at every position, and measure a metric on the next-token logits. The effect of head
(l, h) is metric(patched) - metric(corrupted): how much of the clean behaviour that head alone
restores. Many heads are patched in one forward: the corrupted prompt is repeated along the batch
and batch row r patches its own (layer, head) through `LayerEdit.z_fn`, so a whole model
(L x H heads) costs ceil(L*H / heads_per_batch) forwards instead of L*H.

Attribution patching (Nanda 2023; Syed et al. 2023) replaces each patch by the first-order term
<z_clean - z_corrupt, d metric / d z> at the corrupted run: one clean forward and one corrupted
forward + backward for every head at once, whatever the model size. It is exact for a metric linear
in z and drifts from activation patching where the model is not (e.g. heads whose effect passes
through a saturated softmax); check the heads it ranks first with `patch_heads`.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from headscope.probe import HeadscopeModel, LayerEdit
from headscope.probe.errors import InputError

from .importance import frozen_parameters

# metric_fn(logits [B, V] at the last position) -> scalar (mean over the B prompts)
MetricFn = Callable[[torch.Tensor], torch.Tensor]
# Cap on one patching batch's final-position logits and hidden states, to bound memory.
_DEFAULT_HEADS_PER_BATCH = 64


def _check_pair(model: HeadscopeModel, clean_ids: torch.Tensor, corrupt_ids: torch.Tensor,
                attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    clean_ids = clean_ids[None] if clean_ids.dim() == 1 else clean_ids
    corrupt_ids = corrupt_ids[None] if corrupt_ids.dim() == 1 else corrupt_ids
    if clean_ids.shape != corrupt_ids.shape:
        raise InputError(f"clean and corrupted prompts must have the same token shape to patch position by "
                         f"position, got {tuple(clean_ids.shape)} and {tuple(corrupt_ids.shape)}; pick a corruption "
                         "that keeps the token count (e.g. another year or name of the same length).")
    if attention_mask is not None and attention_mask.shape != clean_ids.shape:
        raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} != prompt shape {tuple(clean_ids.shape)}.")
    model.check_length(clean_ids.shape[1])
    return clean_ids.to(model.device), corrupt_ids.to(model.device)


def last_logits(model: HeadscopeModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token logits [B, V] at each row's last real token (right or left padding)."""
    with torch.no_grad():
        return _last_logits(model, input_ids, attention_mask)


def _last_logits(model: HeadscopeModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    # without padding only the last position's logits are needed (the vocabulary projection dominates)
    keep = {"logits_to_keep": 1} if attention_mask is None else {}
    out = model.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **keep)
    logits = out.logits
    if attention_mask is None:
        return logits[:, -1].float()
    # the last position holding a real token: mask.sum() - 1 only under right padding
    real = attention_mask.to(logits.device).bool()
    S = real.shape[1]
    last = (S - 1 - real.flip(1).long().argmax(1)).long()
    return logits[torch.arange(logits.shape[0], device=logits.device), last].float()


def clean_head_outputs(model: HeadscopeModel, clean_ids: torch.Tensor, layers: list[int],
                       attention_mask: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """The clean run's per-head outputs: layer -> z [B, H, S, D] (the z_fn layout)."""
    with model.record(head_out=layers) as rec, torch.no_grad():
        model.hf(input_ids=clean_ids, attention_mask=attention_mask, use_cache=False)
    return {l: rec.z(l).transpose(1, 2).contiguous() for l in layers}


def patch_heads(model: HeadscopeModel, clean_ids: torch.Tensor, corrupt_ids: torch.Tensor, metric_fn: MetricFn,
                heads=None, *, attention_mask: torch.Tensor | None = None, heads_per_batch: int | None = None,
                progress: bool = False) -> torch.Tensor:
    """Activation patching of single heads, clean -> corrupted.

    Args:
        clean_ids, corrupt_ids: [B, S] (or [S]) token ids of equal shape; position i of one is patched
            into position i of the other.
        metric_fn: logits [B, V] at the last (real) position -> scalar, e.g. a logit difference.
        heads: (layer, head) pairs to patch; None = every head.
        attention_mask: [B, S] shared by both prompts (right or left padding), or None.
        heads_per_batch: heads patched per forward (the batch holds heads_per_batch x B prompts).
    Returns:
        [L, H] float tensor: metric(corrupted with head (l, h) patched from clean) - metric(corrupted);
        NaN for heads not asked for.
    """
    clean_ids, corrupt_ids = _check_pair(model, clean_ids, corrupt_ids, attention_mask)
    L, H = model.meta.n_layers, model.meta.n_heads
    if heads is None:
        heads = [(l, h) for l in range(L) for h in range(H)]
    heads = [model.meta.check_head(int(l), int(h)) for l, h in heads]
    if not heads:
        raise InputError("patch_heads: the head list is empty.")
    B = clean_ids.shape[0]
    per = heads_per_batch or max(1, _DEFAULT_HEADS_PER_BATCH // B)
    mask = attention_mask.to(model.device) if attention_mask is not None else None
    clean_z = clean_head_outputs(model, clean_ids, sorted({l for l, _ in heads}), mask)
    base = float(metric_fn(last_logits(model, corrupt_ids, mask)))

    effect = torch.full((L, H), float("nan"))
    chunks = [heads[i: i + per] for i in range(0, len(heads), per)]
    for chunk in tqdm(chunks, desc="patching heads", disable=not progress):
        n = len(chunk)
        ids = corrupt_ids.repeat(n, 1)
        m = mask.repeat(n, 1) if mask is not None else None
        edits = {}
        for layer in sorted({l for l, _ in chunk}):
            rows = [(i, h) for i, (l, h) in enumerate(chunk) if l == layer]
            edits[layer] = LayerEdit(z_fn=_row_patch(clean_z[layer], rows, B))
        with model.edit_attention(edits):
            logits = last_logits(model, ids, m)
        for i, (l, h) in enumerate(chunk):
            effect[l, h] = float(metric_fn(logits[i * B: (i + 1) * B])) - base
    return effect


def _row_patch(clean: torch.Tensor, rows: list[tuple[int, int]], B: int):
    """z_fn writing the clean z of head h into the B batch rows of patch slot i, for each (i, h)."""
    def z_fn(z: torch.Tensor, layer: int) -> torch.Tensor:
        if z.shape[2] != clean.shape[2]:
            raise InputError("patch_heads runs full forwards only (no cached decoding).")
        z = z.clone()
        for i, h in rows:
            z[i * B: (i + 1) * B, h] = clean[:, h].to(z.dtype)
        return z
    return z_fn


def patched_logits(model: HeadscopeModel, clean_ids: torch.Tensor, corrupt_ids: torch.Tensor, heads,
                   *, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Last-real-position logits [B, V] of the corrupted prompt with all `heads` patched from clean at once
    (a circuit patch; patching every head of every layer reproduces the clean run)."""
    clean_ids, corrupt_ids = _check_pair(model, clean_ids, corrupt_ids, attention_mask)
    heads = [model.meta.check_head(int(l), int(h)) for l, h in heads]
    mask = attention_mask.to(model.device) if attention_mask is not None else None
    layers = sorted({l for l, _ in heads})
    clean_z = clean_head_outputs(model, clean_ids, layers, mask)
    B = clean_ids.shape[0]
    edits = {l: LayerEdit(z_fn=_row_patch(clean_z[l], [(0, h) for ll, h in heads if ll == l], B)) for l in layers}
    with model.edit_attention(edits):
        return last_logits(model, corrupt_ids, mask)


def attribution_patch_heads(model: HeadscopeModel, clean_ids: torch.Tensor, corrupt_ids: torch.Tensor,
                            metric_fn: MetricFn, *, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attribution patching of every head, clean -> corrupted (first-order `patch_heads`).

    Args as `patch_heads`. Returns [L, H]: sum over batch, positions and head_dim of
    (z_clean - z_corrupt) * d metric / d z_corrupt, the linear estimate of metric(patched) -
    metric(corrupted). The backward runs through the exact torch attention path (the Triton kernel
    has no backward); the model's parameters get no gradients.
    """
    clean_ids, corrupt_ids = _check_pair(model, clean_ids, corrupt_ids, attention_mask)
    L, H = model.meta.n_layers, model.meta.n_heads
    mask = attention_mask.to(model.device) if attention_mask is not None else None
    clean_z = clean_head_outputs(model, clean_ids, list(range(L)), mask)
    corrupt_z: dict[int, torch.Tensor] = {}
    # z + 0 with the 0 a leaf: its .grad is the total derivative d metric / d z, through the later
    # layers too (a detached z per layer would cut those paths)
    probe = {l: None for l in range(L)}

    def z_fn(z: torch.Tensor, layer: int) -> torch.Tensor:
        corrupt_z[layer] = z.detach()
        probe[layer] = torch.zeros_like(z, requires_grad=True)
        return z + probe[layer]

    with frozen_parameters(model), torch.enable_grad(), \
            model.edit_attention({l: LayerEdit(z_fn=z_fn) for l in range(L)}):
        metric = metric_fn(_last_logits(model, corrupt_ids, mask))
        if metric.dim() != 0:
            raise InputError(f"metric_fn must return a scalar, got shape {tuple(metric.shape)}.")
        metric.backward()
    effect = torch.empty(L, H)
    for l in range(L):
        diff = clean_z[l].to(corrupt_z[l].dtype) - corrupt_z[l]
        effect[l] = (diff * probe[l].grad).float().sum((0, 2, 3)).cpu()
    return effect

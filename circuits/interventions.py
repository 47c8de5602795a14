"""Mean and resample ablation of any set of heads, through `LayerEdit(z_fn=...)`.

z is a head's output before the output projection: the recorder gives it as [B, S, H, D],
a `z_fn` sees it as [B, H, Sq, D]. Zero and uniform ablation: `headscope.circuits.ablation`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch
from tqdm.auto import tqdm

from headscope.probe import HeadscopeModel, LayerEdit
from headscope.probe.errors import InputError

from .ablation import heads_by_layer


def as_batches(model: HeadscopeModel, batches) -> list[dict]:
    """Texts (str or list of str) or an iterable of tokenized batch dicts -> list of batch dicts."""
    if isinstance(batches, (str, dict)):
        batches = [batches]
    batches = list(batches)
    if not batches:
        raise InputError("the reference set is empty: give at least one text or tokenized batch.")
    if all(isinstance(b, str) for b in batches):
        return [model.tokenize(batches, prepend_bos=True)]
    for b in batches:
        if not isinstance(b, dict) or "input_ids" not in b:
            raise InputError("batches must be texts or dicts with input_ids (and attention_mask), "
                             f"as model.tokenize returns; got {type(b).__name__}.")
    return batches


def mean_z(model: HeadscopeModel, reference_batches, heads) -> dict[int, torch.Tensor]:
    """Mean per-head output over every real token of a reference set.

    Args:
        reference_batches: texts or tokenized batch dicts.
        heads: [(layer, head), ...].
    Returns:
        {layer: z_mean [H, D]} for every layer with a requested head (all H heads of it are averaged;
        only the requested ones are used by `mean_ablate`).
    """
    masks = heads_by_layer(model, heads)
    layers = sorted(masks)
    total = {l: torch.zeros(model.meta.n_heads, model.meta.head_dim, dtype=torch.float64) for l in layers}
    count = 0
    for batch in tqdm(as_batches(model, reference_batches), desc="mean z", leave=False):
        mask = batch.get("attention_mask")
        _, rec = model.run_recorded(batch["input_ids"], mask, head_out=layers, stop_after_layer=layers[-1])
        valid = mask.bool() if mask is not None else torch.ones_like(batch["input_ids"], dtype=torch.bool)
        for l in layers:
            z = rec.z(l).double().cpu()  # [B, S, H, D]
            total[l] += z[valid.cpu()].sum(0)
        count += int(valid.sum())
    return {l: (t / count).float() for l, t in total.items()}


@contextmanager
def mean_ablate(model: HeadscopeModel, heads, z_means: dict[int, torch.Tensor] | None = None,
                reference_batches=None):
    """Replace the outputs of `heads` by their mean over a reference set (at every position).

    Give either z_means (from `mean_z`) or reference_batches (texts or batch dicts).
    """
    masks = heads_by_layer(model, heads)
    if z_means is None:
        if reference_batches is None:
            raise InputError("mean_ablate needs z_means (from mean_z) or reference_batches.")
        z_means = mean_z(model, reference_batches, heads)
    missing = [l for l in masks if l not in z_means]
    if missing:
        raise InputError(f"z_means has no entry for layers {missing}; compute it with mean_z for these heads.")
    H, D = model.meta.n_heads, model.meta.head_dim
    for l in masks:
        if tuple(z_means[l].shape) != (H, D):
            raise InputError(f"z_means[{l}] must have shape [H, D] = [{H}, {D}], got {tuple(z_means[l].shape)}.")

    def z_fn(z, layer):
        m = masks[layer].to(z.device)[None, :, None, None]
        return torch.where(m, z_means[layer].to(z.device, z.dtype)[None, :, None, :], z)

    with model.edit_attention({l: LayerEdit(z_fn=z_fn) for l in masks}):
        yield model


def record_z(model: HeadscopeModel, batch: dict, layers: Iterable[int]) -> dict[int, torch.Tensor]:
    """Per-head outputs of one batch: {layer: z [B, H, S, D]} (the layout a z_fn sees)."""
    layers = sorted(set(layers))
    _, rec = model.run_recorded(batch["input_ids"], batch.get("attention_mask"), head_out=layers,
                                stop_after_layer=layers[-1])
    return {l: rec.z(l).transpose(1, 2).contiguous() for l in layers}


@contextmanager
def resample_ablate(model: HeadscopeModel, heads, source, *, seed: int = 0):
    """Replace the outputs of `heads` by their outputs on other inputs (resample ablation).

    Args:
        source: a tokenized batch dict (or texts) whose z replace ours, position by position;
            example b of the ablated batch gets source example perm[b] for one seeded random
            permutation shared by every layer (drawn with replacement only when the source has
            fewer examples than the batch). The source must be at least as long as the inputs run
            inside the block (full forwards; cached decoding is not supported), and each real
            (unpadded) position of an input must be a real position of its source example.
    """
    masks = heads_by_layer(model, heads)
    src = as_batches(model, source)
    if len(src) != 1:
        raise InputError("resample_ablate takes one source batch (texts or one tokenized dict).")
    zs = record_z(model, src[0], masks)
    n_src, _, s_len, _ = next(iter(zs.values())).shape
    src_mask = src[0].get("attention_mask")
    src_real = src_mask.bool().cpu() if src_mask is not None else torch.ones(n_src, s_len, dtype=torch.bool)
    perms: dict[int, torch.Tensor] = {}

    def source_rows(B: int) -> torch.Tensor:
        # one draw per batch size, so that every layer of an example resamples the same source example
        if B not in perms:
            gen = torch.Generator().manual_seed(seed)
            perms[B] = (torch.randperm(n_src, generator=gen)[:B] if n_src >= B
                        else torch.randint(0, n_src, (B,), generator=gen))
        return perms[B]

    def z_fn(z, layer):
        B, _, Sq, _ = z.shape
        sz = zs[layer]
        # This call's queries are the last Sq positions of the sequence so far (a cached decode step
        # is one query at position seq_len - 1, not position 0): take the source's same positions.
        end = model.state.seq_len or Sq
        start = end - Sq
        if sz.shape[2] < end:
            raise InputError(f"resample source has {sz.shape[2]} positions but the input has {end}; "
                             "use a source batch at least as long as the inputs.")
        idx = source_rows(B)
        real = model.state.attention_mask
        real = real[:, -Sq:].cpu() if real is not None else torch.ones(B, Sq, dtype=torch.bool)
        bad = (real & ~src_real[idx, start:end]).any(1)
        if bad.any():
            rows = bad.nonzero().flatten().tolist()
            raise InputError(f"resample ablation: input rows {rows} have real tokens where their source examples "
                             f"{idx[bad].tolist()} are padding; use source prompts at least as long as the inputs.")
        repl = sz[idx, :, start:end].to(z.device, z.dtype)
        return torch.where(masks[layer].to(z.device)[None, :, None, None], repl, z)

    with model.edit_attention({l: LayerEdit(z_fn=z_fn) for l in masks}):
        yield model

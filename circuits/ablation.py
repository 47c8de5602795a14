"""Head ablation contexts: zero and uniform-attention ablation of any set of heads.

(Mean and resample ablation of z live in headscope.circuits.interventions.)
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from headscope.probe import HeadscopeModel, LayerEdit
from headscope.probe.errors import InputError


def heads_by_layer(model: HeadscopeModel, heads) -> dict[int, torch.Tensor]:
    """[(layer, head), ...] -> {layer: [H] bool mask}, validating every index."""
    masks: dict[int, torch.Tensor] = {}
    for pair in heads:
        if len(pair) != 2:
            raise InputError(f"heads must be (layer, head) pairs, got {pair!r}.")
        layer, head = model.meta.check_head(int(pair[0]), int(pair[1]))
        masks.setdefault(layer, torch.zeros(model.meta.n_heads, dtype=torch.bool))[head] = True
    return masks


@contextmanager
def ablate_heads(model: HeadscopeModel, heads, mode: str = "zero"):
    """Ablate `heads` [(layer, head), ...] in every forward inside the block (yields the model).
    mode "zero": the head writes nothing; "uniform": the head attends uniformly to the keys it can
    see (the retrieval paper's masking, query set to 0)."""
    if mode not in ("zero", "uniform"):
        raise InputError(f"ablate_heads mode must be 'zero' or 'uniform', got {mode!r} "
                         "(mean / resample ablation: headscope.circuits.interventions).")
    masks = heads_by_layer(model, heads)
    with model.edit_attention({l: LayerEdit(head_mask=m, head_mask_mode=mode) for l, m in masks.items()}):
        yield model

"""`LayerEdit`: what an intervention asks of one layer's attention computation.

Interventions in headscope.circuits express themselves as LayerEdits and enter them with
`HeadscopeModel.edit_attention`; the native attention function applies them inside the kernel
call (head masks, ACT key scaling, logit bias) or to the per-head outputs z right after it
(mean / resample ablation, patching, value edits), for any architecture the probe supports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from headscope.kernels.edits import HEAD_MASK_MODES

from .errors import InputError

# z_fn(z, layer) -> z with z [B, H, Sq, D]; Sq < S during cached decoding (the last Sq positions).
ZFn = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(eq=False)  # identity: contexts remove exactly the edit they added (tensor fields have no ==)
class LayerEdit:
    """One layer's attention intervention.

    head_mask: [H] bool heads to ablate; head_mask_mode "zero" or "uniform".
    key_scale_beta / key_bias: [H] per-head factor / logit bias applied on `keys`, a [B, S] bool key
        set over the whole sequence (positions beyond it count as outside the set); key_scale_beta
        also takes per-head key sets [B, H, S] (ACT's sinks; both backends).
    z_fn: called on the per-head outputs z [B, H, Sq, D] of the layer; returns the edited z.
    """

    head_mask: torch.Tensor | None = None
    head_mask_mode: str = "zero"
    key_scale_beta: torch.Tensor | None = None
    key_bias: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    z_fn: ZFn | None = None

    def __post_init__(self):
        if self.head_mask_mode not in HEAD_MASK_MODES:
            raise InputError(f"head_mask_mode must be one of {HEAD_MASK_MODES}, got {self.head_mask_mode!r}.")
        if (self.key_scale_beta is not None or self.key_bias is not None) and self.keys is None:
            raise InputError("key_scale_beta / key_bias need `keys`, a [B, S] bool key set.")


def keys_of_call(keys: torch.Tensor, seq_len: int | None, Sk: int) -> torch.Tensor:
    """A key set [B, S] (or [B, H, S]) over the sequence -> the Sk keys of one attention call (the
    last Sk of the seq_len tokens so far). Positions past the set count as outside it (tokens
    generated after the prompt)."""
    n = max(seq_len or 0, Sk)
    if keys.shape[-1] < n:
        keys = torch.cat([keys, keys.new_zeros(*keys.shape[:-1], n - keys.shape[-1])], -1)
    return keys[..., :n][..., n - Sk:]


def merge_edits(edits: list[LayerEdit], H: int) -> LayerEdit:
    """Combine the edits that several active interventions put on one layer."""
    if len(edits) == 1:
        return edits[0]
    masks = [e for e in edits if e.head_mask is not None]
    modes = {e.head_mask_mode for e in masks}
    if len(modes) > 1:
        raise InputError("two active interventions ablate heads of one layer in different modes (zero and uniform).")
    scaled = [e for e in edits if e.key_scale_beta is not None]
    biased = [e for e in edits if e.key_bias is not None]
    if len(scaled) > 1 or len(biased) > 1 or (scaled and biased and scaled[0].keys is not biased[0].keys):
        raise InputError("at most one key-scaling and one key-bias intervention (on one key set) per layer.")
    mask = None
    for e in masks:
        mask = e.head_mask.clone() if mask is None else mask | e.head_mask
    z_fns = [e.z_fn for e in edits if e.z_fn is not None]

    def chained(z, layer):
        for fn in z_fns:
            z = fn(z, layer)
        return z

    keyed = (scaled or biased or [None])[0]
    return LayerEdit(head_mask=mask, head_mask_mode=modes.pop() if modes else "zero",
                     key_scale_beta=scaled[0].key_scale_beta if scaled else None,
                     key_bias=biased[0].key_bias if biased else None,
                     keys=keyed.keys if keyed is not None else None, z_fn=chained if z_fns else None)

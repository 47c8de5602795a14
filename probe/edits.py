"""`LayerEdit`: what an intervention asks of one layer's attention computation.

Interventions in headscope.circuits express themselves as LayerEdits and enter them with
`HeadscopeModel.edit_attention`; the native attention function applies them inside the kernel
call (head masks, ACT key scaling, logit bias) or to the per-head outputs z right after it
(mean / resample ablation, patching) or, for value edits, through the attention probabilities on
the edited keys (see `LayerEdit.value_delta`), for any architecture the probe supports.
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
    value_delta / value_keys: add value_delta [H, D] (or one per example, [B, H, D]) to each query
        head's value vector at the keys of value_keys, a [B, S] bool key set (B = 1: every example;
        the temporal-heads edit). The value vectors themselves are not touched: p does not depend
        on v, so the edit is exactly z_i += p_i(value_keys) * value_delta with the call's own
        probabilities (one keyset_mass statistic), which keeps it per query head under GQA and
        applies it to every later query that attends to those keys, cached decoding included.
    """

    head_mask: torch.Tensor | None = None
    head_mask_mode: str = "zero"
    key_scale_beta: torch.Tensor | None = None
    key_bias: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    z_fn: ZFn | None = None
    value_delta: torch.Tensor | None = None
    value_keys: torch.Tensor | None = None

    def __post_init__(self):
        if self.head_mask_mode not in HEAD_MASK_MODES:
            raise InputError(f"head_mask_mode must be one of {HEAD_MASK_MODES}, got {self.head_mask_mode!r}.")
        if (self.key_scale_beta is not None or self.key_bias is not None) and self.keys is None:
            raise InputError("key_scale_beta / key_bias need `keys`, a [B, S] bool key set.")
        if (self.value_delta is None) != (self.value_keys is None):
            raise InputError("a value edit needs both value_delta ([H, D] or [B, H, D]) and value_keys ([B, S] bool).")
        if self.value_keys is not None and (self.value_keys.dtype != torch.bool or self.value_keys.dim() != 2):
            raise InputError(f"value_keys must be a [B, S] bool key set, got {tuple(self.value_keys.shape)} "
                             f"{self.value_keys.dtype}.")
        if self.value_delta is not None and self.value_delta.dim() not in (2, 3):
            raise InputError(f"value_delta must be [H, D] or [B, H, D], got shape {tuple(self.value_delta.shape)}.")
        if self.value_delta is not None and not torch.isfinite(self.value_delta).all():
            raise InputError("value_delta has NaN or inf entries.")


def keys_of_call(keys: torch.Tensor, seq_len: int | None, Sk: int) -> torch.Tensor:
    """A key set [B, S] (or [B, H, S]) over the sequence -> the Sk keys of one attention call (the
    last Sk of the seq_len tokens so far). Positions past the set count as outside it (tokens
    generated after the prompt)."""
    n = max(seq_len or 0, Sk)
    if keys.shape[-1] < n:
        keys = torch.cat([keys, keys.new_zeros(*keys.shape[:-1], n - keys.shape[-1])], -1)
    return keys[..., :n][..., n - Sk:]


def add_value_delta(out: torch.Tensor, mass: torch.Tensor, delta: torch.Tensor, layer: int) -> torch.Tensor:
    """out [B, H, Sq, D] + mass [B, H, Sq] x delta ([H, D] or [B, H, D]): the value edit, where mass is
    each query's attention on the edited keys in this very call (so after any calibration or bias)."""
    B, H, _, D = out.shape
    delta = delta.to(out.device, torch.float32)
    if tuple(delta.shape[-2:]) != (H, D) or (delta.dim() == 3 and delta.shape[0] not in (1, B)):
        raise InputError(f"value_delta of layer {layer} has shape {tuple(delta.shape)}; this call needs [H, D] = "
                         f"[{H}, {D}] or [B, H, D] = [{B}, {H}, {D}] (B = 1: the same for every example).")
    if delta.dim() == 2:
        delta = delta[None]
    # NaN only where a zero-ablated head has no probabilities (its output stays 0) or a padding
    # query sees no key at all.
    mass = torch.nan_to_num(mass, nan=0.0)
    return (out.float() + mass[..., None] * delta[:, :, None, :]).to(out.dtype)


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
    valued = [e for e in edits if e.value_delta is not None]
    if len(valued) > 1:
        raise InputError("at most one value edit per layer: give every edited head of the layer in one edit.")

    def chained(z, layer):
        for fn in z_fns:
            z = fn(z, layer)
        return z

    keyed = (scaled or biased or [None])[0]
    return LayerEdit(head_mask=mask, head_mask_mode=modes.pop() if modes else "zero",
                     key_scale_beta=scaled[0].key_scale_beta if scaled else None,
                     key_bias=biased[0].key_bias if biased else None,
                     keys=keyed.keys if keyed is not None else None, z_fn=chained if z_fns else None,
                     value_delta=valued[0].value_delta if valued else None,
                     value_keys=valued[0].value_keys if valued else None)

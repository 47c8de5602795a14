"""Interventions the attention computation accepts (DESIGN.md, "Interventions").

- `head_mask` [H] bool: ablate heads, mode "zero" (output 0, work skipped) or "uniform"
  (query set to 0: uniform attention over the keys the row may see).
- `KeyScale`: attention calibration (ACT). With S_i the row's mass on the key set,
  p'_ij = beta_h p_ij on the set and p_ij (1 - beta_h S_i)/(1 - S_i) elsewhere; rows with
  1 - S_i <= SCALE_GUARD are left unchanged (there is no mass elsewhere to receive the freed part).
- `KeyBias`: adds bias_h to the logits of the key set (renormalising; not ACT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import KernelInputError

SCALE_GUARD = 1e-6
HEAD_MASK_MODES = ("zero", "uniform")


@dataclass(frozen=True)
class KeyScale:
    """ACT calibration. beta: [H] per-head factor (1 = unchanged); keys: [B, Sk] bool key set, or
    [B, H, Sk] for one key set per head (ACT finds sinks per head)."""

    beta: torch.Tensor
    keys: torch.Tensor


@dataclass(frozen=True)
class KeyBias:
    """Logit bias. bias: [H] per-head additive logit bias; keys: [B, Sk] bool key set."""

    bias: torch.Tensor
    keys: torch.Tensor


def _check_keys(name: str, keys: torch.Tensor, B: int, Sk: int, H: int | None = None) -> None:
    shapes = [(B, Sk)] + ([(B, H, Sk)] if H is not None else [])
    if keys.dtype != torch.bool or tuple(keys.shape) not in shapes:
        raise KernelInputError(f"{name}.keys must be a bool tensor of shape [B, Sk] = [{B}, {Sk}]"
                               + (f" or [B, H, Sk] = [{B}, {H}, {Sk}]" if H is not None else "")
                               + f", got {tuple(keys.shape)} {keys.dtype}.")


def _check_per_head(name: str, t: torch.Tensor, H: int) -> None:
    if t.shape != (H,):
        raise KernelInputError(f"{name} must have shape [H] = [{H}], got {tuple(t.shape)}.")
    if not torch.isfinite(t).all():
        raise KernelInputError(f"{name} must be finite; got {t.tolist()}.")


def validate_edits(H: int, B: int, Sk: int, head_mask, head_mask_mode, key_scale, key_bias) -> None:
    """Raise KernelInputError when an intervention does not fit the attention call."""
    if head_mask is not None:
        if head_mask.dtype != torch.bool or head_mask.shape != (H,):
            raise KernelInputError(f"head_mask must be a bool tensor of shape [H] = [{H}], "
                                   f"got {tuple(head_mask.shape)} {head_mask.dtype}.")
        if head_mask_mode not in HEAD_MASK_MODES:
            raise KernelInputError(f"head_mask_mode must be one of {HEAD_MASK_MODES}, got {head_mask_mode!r}.")
    if key_scale is not None:
        _check_per_head("key_scale.beta", key_scale.beta, H)
        if (key_scale.beta <= 0).any() or (key_scale.beta > 1).any():
            # beta > 1 would give the rest of a row the factor (1 - beta S) / (1 - S) < 0 wherever
            # beta S > 1: negative probabilities. A logit bias (key_bias) raises attention safely.
            raise KernelInputError(f"key_scale.beta must be in (0, 1] (got {key_scale.beta.tolist()}); "
                                   "beta -> 0 removes the keys' attention, beta = 1 changes nothing; "
                                   "to raise attention on a key set use key_bias (a logit bias).")
        _check_keys("key_scale", key_scale.keys, B, Sk, H)
    if key_bias is not None:
        _check_per_head("key_bias.bias", key_bias.bias, H)
        _check_keys("key_bias", key_bias.keys, B, Sk)


def finite_or_raise(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise KernelInputError(f"{name} must be a finite number, got {value}.")
    return value

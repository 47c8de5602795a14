"""Shared glue for backends that see materialised attention probabilities (TransformerLens, nnsight).

They feed each layer's probabilities p [B, H, S, S] (and, where available, the pre-softmax scores)
into the same `Recorder` the native backend uses, so every backend produces the same `Recording`
(same shapes, masks, pattern selection, memory check and error messages). Statistics come from
`headscope.kernels.reference.stats_from_probs`, the definitions the kernel is tested against.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from headscope.kernels.reference import stats_from_probs, visible_keys
from headscope.kernels.stats import StatsRequest

from .errors import InputError
from .meta import ModelMeta
from .model import tokenize_texts
from .recorder import Recorder, _layers_arg, pattern_spec
from .recording import Recording


def batch_inputs(inputs, tokenizer, meta: ModelMeta, device, attention_mask=None, prepend_bos: bool = False,
                 padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Text, list of texts, or token ids [S] / [B, S] -> (input_ids [B, S], attention_mask [B, S])."""
    if isinstance(inputs, (str, list, tuple)) and (isinstance(inputs, str) or all(isinstance(t, str) for t in inputs)):
        batch = tokenize_texts(tokenizer, inputs, meta, device, prepend_bos=prepend_bos, padding_side=padding_side)
        return batch["input_ids"], batch["attention_mask"]
    if isinstance(inputs, Mapping):  # a dict or a tokenizer's BatchEncoding
        if attention_mask is not None and inputs.get("attention_mask") is not None:
            raise InputError("two attention masks: the inputs dict has one and attention_mask= was given; pass one.")
        mask = inputs.get("attention_mask") if attention_mask is None else attention_mask
        return batch_inputs(inputs["input_ids"], tokenizer, meta, device, mask)
    if not isinstance(inputs, torch.Tensor) or inputs.dtype not in (torch.int32, torch.int64):
        raise InputError(f"give text, a list of texts, or integer token ids [B, S]; got {type(inputs).__name__}.")
    ids = inputs[None] if inputs.dim() == 1 else inputs
    if ids.dim() != 2:
        raise InputError(f"token ids must be [S] or [B, S], got shape {tuple(inputs.shape)}.")
    if attention_mask is None:
        mask = torch.ones_like(ids)
    else:
        mask = torch.as_tensor(attention_mask)
        mask = mask[None] if mask.dim() == 1 and inputs.dim() == 1 else mask
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)} but the token ids have "
                             f"{tuple(inputs.shape)}; give one mask entry per token.")
    return ids.to(device), mask.to(device)


def extra_inputs(inputs, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model inputs of a dict / BatchEncoding besides input_ids and attention_mask: token_type_ids
    (sentence pairs; they change an encoder's attention) are returned to be passed on, shaped like the
    ids; anything else is refused rather than dropped."""
    if not isinstance(inputs, Mapping):
        return {}
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask") and v is not None}
    token_types = extra.pop("token_type_ids", None)
    if extra:
        raise InputError(f"the inputs carry {sorted(extra)}, which this backend does not pass to the model; give "
                         "input_ids, attention_mask and (for sentence pairs) token_type_ids only.")
    if token_types is None:
        return {}
    token_types = torch.as_tensor(token_types)
    token_types = token_types[None] if token_types.dim() == 1 else token_types
    if token_types.shape != ids.shape:
        raise InputError(f"token_type_ids has shape {tuple(token_types.shape)} but the token ids have "
                         f"{tuple(ids.shape)}.")
    return {"token_type_ids": token_types.to(ids.device)}


def make_recorder(meta: ModelMeta, device, request: StatsRequest | None, patterns, head_out, keyset,
                  max_pattern_bytes: int | None) -> tuple[Recorder, StatsRequest]:
    request = request or StatsRequest()
    if request.keyset and keyset is None:
        raise InputError("keyset_mass was requested: pass keyset=, a [B, S] bool mask of the key positions.")
    rec = Recorder(meta, torch.device(device), request, pattern_spec(meta, patterns),
                   _layers_arg(meta, head_out, "head_out"), [], keyset, None, max_pattern_bytes)
    return rec, request


def add_layer_probs(recorder: Recorder, layer: int, p: torch.Tensor, scores: torch.Tensor | None = None,
                    z: torch.Tensor | None = None) -> None:
    """Hand one layer's probabilities p [B, H, S, S] (scores likewise, for lse; z [B, S, H, D]) to the recorder."""
    meta, request = recorder.meta, recorder.request
    S = p.shape[-1]
    key_valid = recorder._seg["mask"][:, -S:]
    window = meta.sliding_windows[layer] if meta.sliding_windows else None
    stats = stats_from_probs(
        p, request, causal=meta.causal, window=window, key_valid=key_valid,
        token_ids=recorder.key_tokens(S) if request.needs_tokens else None,
        keyset=recorder.key_set(S) if request.keyset else None, scores=scores)
    heads = recorder.pattern_heads_for(layer)
    if heads:
        rows = torch.arange(p.shape[2], device=p.device) + (S - p.shape[2])
        vis = visible_keys(p.shape[2], S, key_valid, rows, 0, S, meta.causal, window)[:, None]
        stats["pattern"] = p[:, heads].float().masked_fill(~vis, 0.0)
    recorder.add(layer, stats, None if z is None else z.transpose(1, 2), None, None, None)


def finish(recorder: Recorder, backend: str) -> Recording:
    rec = Recording(meta=recorder.meta, tokens=torch.zeros(0, 0, dtype=torch.long),
                    attention_mask=torch.zeros(0, 0, dtype=torch.bool), request=recorder.request, backend=backend)
    return recorder.finish(rec)

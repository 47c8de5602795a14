"""What a transformers forward call was given, however the caller passed it.

`model(ids, mask)` is as valid as `model(input_ids=ids, attention_mask=mask)`; hooks that read only
`kwargs` would miss the positional mask and record padding as real tokens. Binding the call to the
forward's signature gives one dict either way.
"""

from __future__ import annotations

import inspect

import torch


def bound_arguments(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """The forward call's arguments by name (extra keyword arguments merged in)."""
    # The class's forward, not the instance's: tools that wrap an instance's forward (nnsight,
    # accelerate hooks) leave it as (*args, **kwargs), which would hide the names.
    sig = inspect.signature(type(module).forward)
    bound = sig.bind_partial(module, *args, **kwargs).arguments
    out = {}
    for i, (name, value) in enumerate(bound.items()):
        if i == 0:
            continue  # self
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def call_cache(call: dict):
    """The KV cache of a call: transformers >= 5.25 passes it as `cache`, earlier as `past_key_values`."""
    cache = call.get("cache")
    return cache if cache is not None else call.get("past_key_values")


def past_length(cache) -> int:
    """Tokens already in the cache (0 without one)."""
    return int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0


def call_length(call: dict) -> tuple[torch.Tensor | None, int, int]:
    """(input_ids or None, batch, new tokens) of a call; None for the length if it has no inputs."""
    ids = call.get("input_ids")
    ref = ids if ids is not None else call.get("inputs_embeds")
    if ref is None:
        return ids, 0, -1
    return ids, ref.shape[0], ref.shape[1]

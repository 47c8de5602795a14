"""Batched forward passes the detectors share: recorded batches and masked next-token loss."""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from headscope.kernels.stats import StatsRequest
from headscope.probe.errors import InputError


def recorded_batches(model, tokens: torch.Tensor, request: StatsRequest, batch_size: int, progress: bool = False,
                     desc: str = "", **record_kwargs) -> Iterator[tuple[torch.Tensor, object, object]]:
    """Run unpadded token rows [N, S] through `model.run_recorded` in batches.

    Yields (ids [b, S] on the model's device, model output, Recording) per batch.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}.")
    model.check_length(tokens.shape[1])
    for s in tqdm(range(0, len(tokens), batch_size), desc=desc, disable=not progress, leave=False):
        ids = tokens[s:s + batch_size].to(model.device)
        out, rec = model.run_recorded(ids, torch.ones_like(ids), request, **record_kwargs)
        yield ids, out, rec


def token_loss(model, tokens: torch.Tensor, targets: torch.Tensor, batch_size: int, progress: bool = False,
               desc: str = "loss") -> float:
    """Mean next-token cross-entropy (nats) over the target positions.

    tokens [N, S] int64 unpadded; targets [N, S] bool marks the tokens to be predicted (token j is
    predicted from position j - 1, so targets[:, 0] must be False). Runs under whatever
    `model.edit_attention` / ablation context is active.
    """
    if targets.dtype != torch.bool:  # an int 0/1 mask would index the losses by position
        raise InputError(f"targets must be a bool mask, got dtype {targets.dtype}; use targets.bool().")
    if targets.shape != tokens.shape or targets[:, 0].any():
        raise InputError("targets must be a [N, S] bool mask like tokens, with no target at position 0.")
    total, count = 0.0, 0
    for s in tqdm(range(0, len(tokens), batch_size), desc=desc, disable=not progress, leave=False):
        ids = tokens[s:s + batch_size].to(model.device)
        tgt = targets[s:s + batch_size, 1:].to(model.device)
        with torch.no_grad():
            logits = model.hf(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
        total += float(ce[tgt.flatten()].sum())
        count += int(tgt.sum())
    if count == 0:
        raise InputError("no target positions to compute the loss on.")
    return total / count

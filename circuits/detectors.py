"""The detector registry: every head kind, its detector function, and one config shape for all.

A detector is `fn(model: HeadscopeModel, config: DetectorConfig) -> DetectorResult`. It scores every
head from attention statistics (so it runs at any length), exposes its paper's parameters with the
paper's defaults through `config.params`, and, when `config.validate`, fills
`DetectorResult.validation` with the causal check (top-k heads vs random k heads ablated).

Under `torchrun` (multi-process `headscope rank`) every process runs every detector: build the full
prompt set from the seed, loop over `headscope.circuits.sharding.shard(prompts)` only, accumulate
sums and counts, merge them with `sharding.all_reduce_sum` before dividing (see that module's
docstring). In one process those calls are the identity. Raise `InputError` before any heavy work
when `config.seq_len` is too short for the detector, and expose the minimum as a `min_seq_len`
attribute of the function (an int, or `config -> int`), which the CLI checks before loading the model:
otherwise a short --seq-len stops the run at that detector, after the others' work.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from headscope.probe.errors import InputError

from .scores import KINDS, DetectorResult

# kind -> "module:function"; imported lazily so one detector's import cost is not paid by others.
_DETECTORS = {
    "sink": "headscope.circuits.detect_sink:detect_sink",
    "previous_token": "headscope.circuits.detect_positional:detect_previous_token",
    "induction": "headscope.circuits.detect_positional:detect_induction",
    "duplicate_token": "headscope.circuits.detect_positional:detect_duplicate_token",
    "retrieval": "headscope.circuits.detect_retrieval:detect_retrieval",
    "temporal": "headscope.circuits.detect_temporal:detect_temporal",
}
assert tuple(_DETECTORS) == KINDS


@dataclass
class DetectorConfig:
    """Options shared by every detector. None means "the detector's published default".

    seq_len: prompt length in tokens; n_prompts: how many prompts; batch_size: prompts per forward;
    seed: seeds every random choice (same seed, same scores); validate: run the causal check
    (`DetectorResult.validation`, else None); top_k: heads ablated in validation; n_random: random
    head sets (seeds) in validation; ablate_each: validation also ablates each top head alone (top_k
    more runs of the kind's behaviour metric; the `ablation_delta` column); progress: tqdm bars;
    prompts_file: user prompts (.txt / .jsonl / a saved HF dataset folder);
    params: kind-specific parameters (e.g. {"eps": 0.3} for sink; each detector's module docstring
    lists its own, and an unknown name raises InputError).
    """

    seq_len: int | None = None
    n_prompts: int | None = None
    batch_size: int = 8
    seed: int = 0
    top_k: int = 8
    validate: bool = True
    n_random: int = 5
    ablate_each: bool = False
    progress: bool = True
    prompts_file: str | None = None
    params: dict = field(default_factory=dict)


def get_detector(kind: str) -> Callable[..., DetectorResult]:
    """The detector function `fn(model, config) -> DetectorResult` of a kind (one of `KINDS`)."""
    if kind not in _DETECTORS:
        raise InputError(f"unknown detector {kind!r}; choose from {', '.join(KINDS)}.")
    module, fn = _DETECTORS[kind].split(":")
    return getattr(importlib.import_module(module), fn)


def check_params(kind: str, config: DetectorConfig) -> None:
    """InputError for a kind-specific parameter the detector does not read (a typo would otherwise be
    ignored and the default used). Detectors list theirs in a `known_params` attribute."""
    known = getattr(get_detector(kind), "known_params", None)
    unknown = sorted(set(config.params) - set(known)) if known is not None else []
    if unknown:
        raise InputError(f"unknown {kind} parameters {unknown}; known: {sorted(known)}.")


def run_detector(model, kind: str, config: DetectorConfig | None = None) -> DetectorResult:
    """Score every head of `model` (a HeadscopeModel) as `kind` (one of `KINDS`).

    Returns a `DetectorResult`: `scores`, the HeadScores frame (one row per head, best first:
    kind, layer, head, score, rank and the kind's extra columns), `summary` (model-level findings
    and the settings used) and `validation` (a `Validation`; None with `config.validate=False`, or
    when there is nothing to validate, e.g. retrieval when the model retrieved no needle).
    """
    config = config or DetectorConfig()
    check_params(kind, config)
    return get_detector(kind)(model, config)

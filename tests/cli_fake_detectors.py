"""Small stand-in detectors for the CLI tests: real statistics of the real model, sharded like a
real detector, but cheap and independent of the detector modules' prompt sets.

Run as a script (under torchrun) it registers the stand-in sink (the real previous_token stays)
and calls the CLI: `torchrun --nproc_per_node=2 tests/cli_fake_detectors.py rank ...`.
"""

from __future__ import annotations

import sys

import torch

from headscope.circuits import sharding
from headscope.circuits.ablation import ablate_heads
from headscope.circuits.scores import DetectorResult, Validation, head_scores, top_heads
from headscope.kernels import StatsRequest
from headscope.probe.errors import InputError

FAKES = {"sink": "cli_fake_detectors:fake_sink", "previous_token": "cli_fake_detectors:fake_previous_token"}


def random_prompts(config, default_len: int = 24, default_n: int = 4) -> torch.Tensor:
    """[n, S] random token ids after a BOS (id 1), drawn from the seed: the global prompt set."""
    seq_len, n = config.seq_len or default_len, config.n_prompts or default_n
    g = torch.Generator().manual_seed(config.seed)
    ids = torch.randint(1000, 20000, (n, seq_len), generator=g)
    ids[:, 0] = 1
    return ids


def _loss_sum(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model.hf(input_ids=ids.to(model.device), use_cache=False).logits.double()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten().to(model.device),
                                             reduction="sum").cpu()


def _mean_stat(model, config, ids, request, pick) -> tuple[torch.Tensor, list[float]]:
    """Global mean over prompts and positions of pick(rec) [B, L, H, S'] -> [L, H], sharded;
    and every prompt's mean over all heads, in prompt order (gathered from all processes)."""
    total = torch.zeros(model.meta.n_layers, model.meta.n_heads, dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    per_prompt = []
    mine = sharding.shard(ids)
    for i in range(0, len(mine), config.batch_size):
        batch = mine[i:i + config.batch_size].to(model.device)
        _, rec = model.run_recorded(batch, stats=request)
        values = pick(rec).double().cpu()
        total += values.sum(dim=(0, 3))
        count += values.shape[0] * values.shape[3]
        per_prompt += values.mean(dim=(1, 2, 3)).tolist()
    total, count = sharding.all_reduce_sum(total, count)
    return total / count, sharding.gather_lists(per_prompt)


def _validate(model, kind, config, scores, ids) -> Validation:
    """Loss increase on the prompts from ablating the top-k heads vs random k-head sets."""
    mine = sharding.shard(ids)

    def loss(heads=None):
        if heads is None:
            s = _loss_sum(model, mine) if len(mine) else torch.zeros((), dtype=torch.float64)
        else:
            with ablate_heads(model, heads):
                s = _loss_sum(model, mine) if len(mine) else torch.zeros((), dtype=torch.float64)
        return float(sharding.all_reduce_sum(s)) / (ids.shape[0] * (ids.shape[1] - 1))

    base = loss()
    g = torch.Generator().manual_seed(config.seed + 1)
    n_heads = model.meta.n_layers * model.meta.n_heads
    randoms = []
    for _ in range(config.n_random):
        pick = torch.randperm(n_heads, generator=g)[:config.top_k].tolist()
        randoms.append(loss([divmod(p, model.meta.n_heads) for p in pick]) - base)
    return Validation(kind, config.top_k, "loss increase (nats/token)", loss(top_heads(scores, config.top_k)) - base,
                      randoms, base)


def fake_sink(model, config) -> DetectorResult:
    ids = random_prompts(config)
    grid, per_prompt = _mean_stat(model, config, ids, StatsRequest(sink_k=1), lambda r: r.stat("sink_mass"))
    scores = head_scores("sink", grid)
    summary = {"sink_1_eps": float((grid > 0.3).double().mean()), "eps": 0.3, "per_prompt": per_prompt}
    val = _validate(model, "sink", config, scores, ids) if config.validate else None
    return DetectorResult("sink", scores, summary, val)


fake_sink.min_seq_len = 8


def fake_previous_token(model, config) -> DetectorResult:
    ids = random_prompts(config)
    if ids.shape[1] < 4:
        raise InputError(f"seq_len {ids.shape[1]} is too short for previous_token: it needs at least 4 tokens.")
    grid, _ = _mean_stat(model, config, ids, StatsRequest(offsets=(1,)), lambda r: r.stat("offset_mass")[..., 1:, 0])
    scores = head_scores("previous_token", grid)
    val = _validate(model, "previous_token", config, scores, ids) if config.validate else None
    return DetectorResult("previous_token", scores, {"mean_score": float(grid.mean())}, val)


if __name__ == "__main__":
    import os

    from headscope.apps.cli import main
    from headscope.circuits import detectors

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    # Only sink is a stand-in here (unless the test asks for the shipped one): previous_token is the
    # shipped, sharded detector.
    if not os.environ.get("HEADSCOPE_TEST_REAL_SINK"):
        detectors._DETECTORS["sink"] = FAKES["sink"]
    sys.exit(main(sys.argv[1:]))

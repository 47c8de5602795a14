"""Attention-sink detector (Gu et al. 2024, "When Attention Sink Emerges in Language Models").

Per head, alpha = mean attention that key 0 receives over all queries that can see it (its own row
included, where it is 1), on T = 64-token natural-text prompts: alpha = colsum_0 / T = mean_i
sink_mass_i in a causal layer without a window; a sliding-window layer (window w < T) divides by the
w queries that see key 0 instead of T (the others give it 0 by construction). The
model-level metric is Sink_1^eps = fraction of heads with alpha > eps (eps = 0.3); published:
GPT2-XL 77.0%, Llama-2-7B 92.5%, Llama-3-8B 99.0%.

BOS: Gu et al. measure with the model's BOS at position 0 where it has one. SmolLM2's tokenizer
declares <|im_start|> (id 1) as BOS but never adds it; we put the declared BOS at position 0 (as
TransformerLens' to_tokens does), and because the model did not see a BOS on every training
sequence, the summary also gives Sink_1^eps with the first text token at position 0
(`sink_ratio_no_bos`): Gu et al. find the sink on the first token whatever that token is.

Sink tokens beyond position 0 (ACT's rule): key j >= 1 is a sink in a head when
colsum_j / (S - j) > 0.1, S - j being the number of queries that see key j (capped at the window in
sliding-window layers; S in a non-causal encoder), judged only for keys seen by at least
`min_queries` (8) queries (the mean over fewer rows is dominated by the key's own row, which every
head weights).

Causal check: zero-ablating a head that parks its attention on the sink removes an output that is
small by design, so it tests the wrong thing. We remove the sink itself instead: in the top-k
heads attention on key 0 is scaled by beta = 0 and its mass redistributed over the other keys
(ACT's key_scale arithmetic), vs the same in k random heads; damage = natural-text loss increase.

Parameters (config.params): eps (0.3), bos (True), sink_threshold (0.1), min_queries (8),
compare_no_bos (True), validation_prompts (16).
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch

from headscope.kernels.stats import StatsRequest
from headscope.probe import LayerEdit
from headscope.probe.errors import InputError

from .ablation import heads_by_layer
from .detect_positional import _bos, _texts
from .detectors import DetectorConfig
from .prompts import text_windows
from .runs import recorded_batches, token_loss
from .scores import DetectorResult, head_scores, top_heads
from .sharding import all_reduce_sum, gather_lists, is_main, shard
from .validation import validate_heads

DEFAULTS = dict(seq_len=64, n_prompts=64, eps=0.3, sink_threshold=0.1, min_queries=8)


def _param(config: DetectorConfig, name: str):
    return config.params.get(name, DEFAULTS[name])


def visible_query_counts(valid: torch.Tensor, causal: bool, window: int | None) -> torch.Tensor:
    """[B, S] float64: how many real queries (valid [B, S] bool) can see each key j. Causal: those at
    i >= j, with i - j < window in a sliding-window layer; encoders: every i (|i - j| < window)."""
    S = valid.shape[1]
    c = torch.nn.functional.pad(valid.double().cumsum(1), (1, 0))  # c[:, n] = real tokens before n
    j = torch.arange(S)
    w = S if window is None else int(window)
    hi = torch.clamp(j + w, max=S)
    lo = j if causal else torch.clamp(j - w + 1, min=0)
    return c[:, hi] - c[:, lo]


def queries_seeing_keys(meta, S: int) -> torch.Tensor:
    """[L, S] float64: how many of S queries can see key j in each layer (`visible_query_counts`
    with the layer's window)."""
    every = torch.ones(1, S, dtype=torch.bool)
    return torch.cat([visible_query_counts(every, meta.causal, w)
                      for w in (meta.sliding_windows or (None,) * meta.n_layers)])


def sink_alpha(model, tokens: torch.Tensor, config: DetectorConfig, threshold: float, min_queries: int,
               desc: str = "sink"):
    """(alpha [L, H], extra_sinks [L, H] mean count per prompt, sink-token Counter, prompts with any)."""
    S = tokens.shape[1]
    L, H = model.meta.n_layers, model.meta.n_heads
    alpha = torch.zeros(L, H, dtype=torch.float64)
    extra = torch.zeros(L, H, dtype=torch.float64)
    token_counts: Counter = Counter()
    per_key = queries_seeing_keys(model.meta, S)  # [L, S]
    judged = (torch.arange(S) >= 1) & (per_key >= min_queries)  # [L, S]
    per_key, judged = per_key[:, None], judged[:, None]  # broadcast over heads
    # under torchrun each process records its own slice of the prompts; sums merged below
    for ids, _, rec in recorded_batches(model, shard(tokens), StatsRequest(sink_k=1, colsum=True), config.batch_size,
                                        config.progress and is_main(), desc):
        alpha += (rec.stat("sink_mass").double().sum(-1).cpu() / per_key[..., 0]).sum(0)
        share = rec.stat("colsum").double().cpu() / per_key  # [b, L, H, S]
        sinks = (share > threshold) & judged
        extra += sinks.sum(-1).sum(0).double()
        for b, j in (sinks.any(dim=(1, 2))).nonzero().tolist():
            token_counts[int(ids[b, j])] += int(sinks[b, :, :, j].sum())
    alpha, extra = all_reduce_sum(alpha, extra)
    merged: Counter = Counter()  # rank order = prompt order, so first-seen order (ties) is unchanged
    for t, c in gather_lists(list(token_counts.items())):
        merged[int(t)] += int(c)
    return alpha / len(tokens), extra / len(tokens), merged


def detect_sink(model, config: DetectorConfig) -> DetectorResult:
    T = config.seq_len if config.seq_len is not None else DEFAULTS["seq_len"]
    n = config.n_prompts if config.n_prompts is not None else DEFAULTS["n_prompts"]
    eps, threshold, min_q = float(_param(config, "eps")), float(_param(config, "sink_threshold")), \
        int(_param(config, "min_queries"))
    if T < 2:
        raise InputError(f"sink needs seq_len >= 2 (Gu et al. use 64), got {T}.")
    if n < 1:
        raise InputError(f"n_prompts must be >= 1, got {n}.")
    if not 0 < eps < 1:
        raise InputError(f"sink eps must be in (0, 1), got {eps}.")
    bos = _bos(model, config)
    tokens, repeated = text_windows(model.tokenizer, _texts(config), T, n, config.seed, bos)
    alpha, extra, counts = sink_alpha(model, tokens, config, threshold, min_q)
    ratio = float((alpha > eps).double().mean())
    summary = {
        "eps": eps, "seq_len": T, "n_prompts": n, "bos": bos,
        "bos_token": model.tokenizer.convert_ids_to_tokens(int(tokens[0, 0])) if bos else None,
        f"sink_ratio": ratio, "sink_ratio_percent": round(100 * ratio, 2),
        "corpus_repeated": repeated,
        "extra_sinks": {
            "rule": f"colsum_j / (queries that see key j) > {threshold}, keys j >= 1 seen by >= {min_q} queries",
            "heads_with_extra_sinks": int((extra > 0).sum()),
            "mean_extra_sinks_per_head_prompt": float(extra.mean()),
            "top_tokens": [(model.tokenizer.decode([t]), c) for t, c in counts.most_common(10)],
        },
    }
    if bos and config.params.get("compare_no_bos", True):
        raw, _ = text_windows(model.tokenizer, _texts(config), T, n, config.seed, bos=False)
        alpha_raw, _, _ = sink_alpha(model, raw, config, threshold, min_q, desc="sink (no BOS)")
        summary["sink_ratio_no_bos"] = float((alpha_raw > eps).double().mean())
    df = head_scores("sink", alpha, {"extra_sinks": extra})
    validation = validate_sink(model, config, df, T, bos) if config.validate else None
    return DetectorResult("sink", df, summary, validation)


@contextmanager
def without_sink(model, heads, batch: int, seq_len: int):
    """In the given heads, scale attention on key 0 by 0 and redistribute it (ACT arithmetic)."""
    keys = torch.zeros(batch, seq_len, dtype=torch.bool, device=model.device)
    keys[:, 0] = True
    # key_scale refuses beta <= 0 (issue 5's contract); 1e-6 removes the sink's attention to float precision.
    edits = {l: LayerEdit(key_scale_beta=torch.where(m, 1e-6, 1.0).to(model.device), keys=keys)
             for l, m in heads_by_layer(model, heads).items()}
    with model.edit_attention(edits):
        yield model


def validate_sink(model, config: DetectorConfig, df, T: int, bos: bool):
    n = int(config.params.get("validation_prompts", 16))
    if n < 1:
        raise InputError(f"validation_prompts must be >= 1, got {n}.")
    # every batch the same size (the sink key set is built for one batch size): the largest divisor
    # of n up to config.batch_size
    bs = max(d for d in range(1, min(n, config.batch_size) + 1) if n % d == 0)
    tokens, _ = text_windows(model.tokenizer, _texts(config), T, n, config.seed + 10_000, bos)
    targets = torch.zeros_like(tokens, dtype=torch.bool)
    targets[:, 1:] = True
    return validate_heads(model, "sink", top_heads(df, config.top_k), lambda m: token_loss(m, tokens, targets, bs),
                          config.top_k, config.n_random, config.seed, progress=config.progress,
                          each=config.ablate_each, ablate=lambda m, heads: without_sink(m, heads, bs, T),
                          metric=f"natural-text loss increase (nats/token, T={T}) when attention on key 0 is "
                                 "removed (beta = 0, redistributed)",
                          notes="the sink is removed rather than the head zeroed (see detect_sink); "
                                "random sets exclude the top heads")


# Parameters read from `config.params` (misspelt ones are refused, not ignored).
detect_sink.known_params = ("eps", "sink_threshold", "min_queries", "bos", "compare_no_bos", "validation_prompts")

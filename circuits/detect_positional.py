"""Previous-token, induction and duplicate-token detectors, from attention statistics.

Scores (DESIGN.md "Head types"), every head at once, at any length, batched:
- previous_token: mean offset_mass[1] on natural text (queries i >= 2 when BOS is at 0, so the
  previous token is never the BOS sink).
- induction: on `[BOS] r r` (r = T distinct random tokens): mean offset_mass[T - 1] over the
  second copy (attention to the token after this token's earlier copy). Extra columns:
  `tl_mul`, `tl_abs` (TransformerLens detect_head "induction_head" on the same prompts, from
  next_match_mass), `prefix_matching` (Olsson et al.: mean next_match_mass over repeats 2..4 of 25
  random tokens x 4), `copying` (mean direct logit effect of the head on the token it should copy,
  on the same 25 x 4 prompts; see headscope.circuits.direct_logit for the final-norm treatment).
- duplicate_token: mean offset_mass[T] over the second copy of `[BOS] r r`; `tl_mul` / `tl_abs`
  from match_mass.

Parameters (config.params): bos (True: the tokenizer's BOS at position 0), tl_exclude_bos,
tl_exclude_current_token (TL defaults False), prefix_period (25), prefix_repeats (4),
validation_prompts (16).
"""

from __future__ import annotations

import torch

from headscope.kernels.stats import StatsRequest
from headscope.probe.errors import InputError

from .detectors import DetectorConfig
from .direct_logit import head_logit_effect, unembedding_with_gain
from .prompts import load_prompts, repeated_random_tokens, text_windows
from .runs import recorded_batches, token_loss
from .scores import DetectorResult, head_scores, top_heads
from .sharding import all_reduce_sum, is_main, shard
from .tl_compat import tl_compatible_scores, tl_request
from .validation import validate_heads

PREVIOUS_DEFAULTS = dict(seq_len=128, n_prompts=16)
REPEAT_DEFAULTS = dict(seq_len=101, n_prompts=16)  # period 50 after BOS, as in the TL / ARENA tutorials
MIN_PERIOD = 4
OLSSON = dict(prefix_period=25, prefix_repeats=4)


def _opt(config: DetectorConfig, name: str, defaults: dict):
    value = getattr(config, name)
    return defaults[name] if value is None else value


def _tl_options(config: DetectorConfig) -> dict:
    return dict(exclude_bos=bool(config.params.get("tl_exclude_bos", False)),
                exclude_current_token=bool(config.params.get("tl_exclude_current_token", False)))


def _texts(config: DetectorConfig):
    return load_prompts(config.prompts_file) if config.prompts_file else None


def _bos(model, config: DetectorConfig) -> bool:
    return bool(config.params.get("bos", True)) and model.tokenizer.bos_token_id is not None


class _Mean:
    """Running sum / count of [B, L, H, S] statistics over a [B, S] query mask -> [L, H]."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, stat: torch.Tensor, queries: torch.Tensor):
        m = queries[:, None, None, :].to(stat.device, stat.dtype)
        self.total = self.total + (stat.double() * m).sum(dim=(0, 3)).cpu()
        self.count += int(queries.sum())

    def value(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    def merged(self, shape) -> torch.Tensor:
        """value() over the prompts of every process (after looping over `shard(...)`); every
        process must call it. In a single process it equals value()."""
        total = self.total if torch.is_tensor(self.total) else torch.zeros(shape, dtype=torch.float64)
        total, count = all_reduce_sum(total, torch.tensor(float(self.count), dtype=torch.float64))
        return total / count.clamp_min(1)


# ---- previous token ---------------------------------------------------------------------------
def natural_windows(model, config: DetectorConfig, defaults: dict, min_len: int, kind: str):
    """Natural-text windows [n, seq_len] for a detector (user prompts or the embedded corpus)."""
    seq_len, n = _opt(config, "seq_len", defaults), _opt(config, "n_prompts", defaults)
    if seq_len < min_len:
        raise InputError(f"{kind} needs seq_len >= {min_len}, got {seq_len}.")
    if n < 1:
        raise InputError(f"n_prompts must be >= 1, got {n}.")
    tokens, repeated = text_windows(model.tokenizer, _texts(config), seq_len, n, config.seed, _bos(model, config))
    return tokens, repeated


def detect_previous_token(model, config: DetectorConfig) -> DetectorResult:
    bos = _bos(model, config)
    if config.validate:
        _period(model, config, "validation")  # its [BOS] r r set needs a longer seq_len: fail before recording
    tokens, repeated = natural_windows(model, config, PREVIOUS_DEFAULTS, 2 + bos, "previous_token")
    first_query = 1 + bos
    queries = torch.zeros_like(tokens, dtype=torch.bool)
    queries[:, first_query:] = True
    grid = (model.meta.n_layers, model.meta.n_heads)
    mean, tl_mul, tl_abs = _Mean(), torch.zeros(grid, dtype=torch.float64), torch.zeros(grid, dtype=torch.float64)
    # Under torchrun each process scores its own slice of the prompts; sums are merged below.
    for _, _, rec in recorded_batches(model, shard(tokens), tl_request(), config.batch_size,
                                      config.progress and is_main(), "previous_token"):
        b = rec.batch_size
        mean.add(rec.stat("offset_mass")[..., 1], queries[:b].to(rec.tokens.device))
        tl_mul = tl_mul + tl_compatible_scores(rec, "previous_token", "mul", per_prompt=True,
                                               **_tl_options(config)).sum(0).cpu()
        tl_abs = tl_abs + tl_compatible_scores(rec, "previous_token", "abs", per_prompt=True,
                                               **_tl_options(config)).sum(0).cpu()
    score = mean.merged(grid)
    tl_mul, tl_abs = all_reduce_sum(tl_mul, tl_abs)
    df = head_scores("previous_token", score, {"tl_mul": tl_mul / len(tokens), "tl_abs": tl_abs / len(tokens)})
    summary = dict(seq_len=tokens.shape[1], n_prompts=len(tokens), bos=bos, corpus_repeated=repeated,
                   text="user prompts" if config.prompts_file else "embedded natural text",
                   definition=f"mean offset_mass[1] over queries i >= {first_query}")
    validation = validate_previous_token(model, config, df) if config.validate else None
    return DetectorResult("previous_token", df, summary, validation)


def validate_previous_token(model, config: DetectorConfig, df):
    """Damage: loss increase on the repeated half of `[BOS] r r` (period 50).

    Why this behaviour: on random tokens the only way to predict the second copy is induction,
    and induction needs to know, at each key, which token came before it: previous-token heads
    are the first half of that circuit (Olsson et al. 2022, K-composition). Natural-text loss
    mixes in every other skill of the model, so damage there is not specific to the kind.
    """
    tokens, targets, T = _repeat_validation_set(model, config)
    return validate_heads(model, "previous_token", top_heads(df, config.top_k),
                          lambda m: token_loss(m, tokens, targets, config.batch_size),
                          config.top_k, config.n_random, config.seed, progress=config.progress, each=config.ablate_each,
                          metric=f"loss increase on the repeated half of [BOS] r r, T={T} (nats/token)",
                          notes="previous-token heads feed induction heads; random sets exclude the top heads")


# ---- repeated random tokens -------------------------------------------------------------------
def _period(model, config: DetectorConfig, kind: str) -> tuple[int, int]:
    bos = _bos(model, config)
    seq_len = _opt(config, "seq_len", REPEAT_DEFAULTS)
    T = (seq_len - bos) // 2
    if T < MIN_PERIOD:
        raise InputError(f"{kind} runs on [BOS] r r: seq_len {seq_len} gives period {T}; it needs "
                         f"seq_len >= {2 * MIN_PERIOD + bos} (period >= {MIN_PERIOD}).")
    return T, int(bos)


def _repeat_validation_set(model, config: DetectorConfig):
    """([BOS] r r tokens, targets = the second copy minus its first token, T) on a seed of its own."""
    T, start = _period(model, config, "validation")
    n = int(config.params.get("validation_prompts", 16))
    tokens = repeated_random_tokens(model.tokenizer, n, T, 2, config.seed + 10_000, bool(start))
    targets = torch.zeros_like(tokens, dtype=torch.bool)
    targets[:, start + T + 1:] = True
    return tokens, targets, T


def _repeat_run(model, config: DetectorConfig, kind: str):
    """Record `[BOS] r r` and return (score, tl_mul, tl_abs, T, n) for kind induction / duplicate."""
    T, start = _period(model, config, kind)
    n = _opt(config, "n_prompts", REPEAT_DEFAULTS)
    tokens = repeated_random_tokens(model.tokenizer, n, T, 2, config.seed, bool(start))
    offset = T - 1 if kind == "induction" else T
    queries = torch.zeros_like(tokens, dtype=torch.bool)
    queries[:, start + T:] = True
    grid = (model.meta.n_layers, model.meta.n_heads)
    mean, tl_mul, tl_abs = _Mean(), torch.zeros(grid, dtype=torch.float64), torch.zeros(grid, dtype=torch.float64)
    request = tl_request(offsets=(offset,))
    col = list(request.offsets).index(offset)
    # every prompt has the same query mask, so this process's slice can index it from 0
    for _, _, rec in recorded_batches(model, shard(tokens), request, config.batch_size,
                                      config.progress and is_main(), kind):
        mean.add(rec.stat("offset_mass")[..., col], queries[:rec.batch_size].to(rec.tokens.device))
        tl_mul = tl_mul + tl_compatible_scores(rec, kind, "mul", per_prompt=True, **_tl_options(config)).sum(0).cpu()
        tl_abs = tl_abs + tl_compatible_scores(rec, kind, "abs", per_prompt=True, **_tl_options(config)).sum(0).cpu()
    score = mean.merged(grid)
    tl_mul, tl_abs = all_reduce_sum(tl_mul, tl_abs)
    return score, tl_mul / n, tl_abs / n, T, n


def olsson_scores(model, config: DetectorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix_matching [L, H], copying [L, H]) on random tokens x repeats (Olsson: 25 x 4).

    prefix matching: mean next_match_mass over queries in repeats 2..R. copying: mean over the
    same queries (except the last position) of the head's direct logit effect on the next token,
    which is the token an induction head attends to and should copy.
    """
    P = int(config.params.get("prefix_period", OLSSON["prefix_period"]))
    R = int(config.params.get("prefix_repeats", OLSSON["prefix_repeats"]))
    if P < 2 or R < 2:
        raise InputError(f"prefix matching needs prefix_period >= 2 and prefix_repeats >= 2, got {P} x {R}.")
    start = int(_bos(model, config))
    n = _opt(config, "n_prompts", REPEAT_DEFAULTS)
    tokens = repeated_random_tokens(model.tokenizer, n, P, R, config.seed + 1, bool(start))
    queries = torch.zeros_like(tokens, dtype=torch.bool)
    queries[:, start + P:] = True
    copy_q = queries.clone()
    copy_q[:, -1] = False
    prefix = _Mean()
    L, H = model.meta.n_layers, model.meta.n_heads
    copy_total = torch.zeros(L, H, dtype=torch.float64)
    unembed = unembedding_with_gain(model)
    for ids, _, rec in recorded_batches(model, shard(tokens), StatsRequest(next_match=True), config.batch_size,
                                        config.progress and is_main(), "prefix matching / copying", head_out=True):
        q = queries[:rec.batch_size].to(ids.device)
        prefix.add(rec.stat("next_match_mass"), q)
        targets = torch.roll(ids, -1, dims=1)
        cq = copy_q[:rec.batch_size].to(ids.device)
        for layer in range(L):
            eff = head_logit_effect(model, layer, rec.z(layer), targets, unembed)  # [b, S, H]
            copy_total[layer] += (eff * cq[..., None]).sum(dim=(0, 1)).double().cpu()
    copy_total = all_reduce_sum(copy_total)
    return prefix.merged((L, H)), copy_total / max(int(copy_q.sum()), 1)


def validate_repeat(model, config: DetectorConfig, kind: str, df, notes: str):
    tokens, targets, T = _repeat_validation_set(model, config)
    return validate_heads(model, kind, top_heads(df, config.top_k),
                          lambda m: token_loss(m, tokens, targets, config.batch_size),
                          config.top_k, config.n_random, config.seed, progress=config.progress, each=config.ablate_each,
                          metric=f"loss increase on the repeated half of [BOS] r r, T={T} (nats/token)",
                          notes=notes)


def detect_induction(model, config: DetectorConfig) -> DetectorResult:
    score, tl_mul, tl_abs, T, n = _repeat_run(model, config, "induction")
    prefix, copying = olsson_scores(model, config)
    df = head_scores("induction", score, {"tl_mul": tl_mul, "tl_abs": tl_abs, "prefix_matching": prefix,
                                          "copying": copying})
    summary = dict(period=T, seq_len=2 * T + _bos(model, config), n_prompts=n, bos=_bos(model, config),
                   definition=f"mean offset_mass[{T - 1}] over the second copy of [BOS] r r",
                   olsson=dict(period=int(config.params.get("prefix_period", 25)),
                               repeats=int(config.params.get("prefix_repeats", 4))))
    validation = validate_repeat(model, config, "induction", df,
                                 "zero ablation; random sets exclude the top heads") if config.validate else None
    return DetectorResult("induction", df, summary, validation)


def detect_duplicate_token(model, config: DetectorConfig) -> DetectorResult:
    score, tl_mul, tl_abs, T, n = _repeat_run(model, config, "duplicate_token")
    df = head_scores("duplicate_token", score, {"tl_mul": tl_mul, "tl_abs": tl_abs})
    summary = dict(period=T, seq_len=2 * T + _bos(model, config), n_prompts=n, bos=_bos(model, config),
                   definition=f"mean offset_mass[{T}] over the second copy of [BOS] r r")
    validation = validate_repeat(
        model, config, "duplicate_token", df,
        "behaviour measured: predicting the repeated half, which needs the model to notice that "
        "tokens repeat; duplicate-token heads are one way to notice it (not the only one), so a "
        "weak ratio means other heads do that job here. Random sets exclude the top heads.") if config.validate else None
    return DetectorResult("duplicate_token", df, summary, validation)


# Parameters each detector reads from `config.params` (misspelt ones are refused, not ignored).
_COMMON = ("bos", "tl_exclude_bos", "tl_exclude_current_token", "validation_prompts")
detect_previous_token.known_params = _COMMON


def _min_len(base: int):
    """The shortest seq_len a detector runs on, for the CLI's check before the model loads: the BOS
    token counts unless the config turns it off (a model without one may run on one token less)."""
    return lambda config: base + (0 if config.params.get("bos", True) is False else 1)


# induction and duplicate_token run on repeated random tokens: a --prompts file is not theirs to read
detect_induction.uses_prompts = detect_duplicate_token.uses_prompts = False
detect_previous_token.min_seq_len = _min_len(2)
detect_induction.min_seq_len = _min_len(2 * MIN_PERIOD)
detect_duplicate_token.min_seq_len = _min_len(2 * MIN_PERIOD)
detect_induction.known_params = _COMMON + ("prefix_period", "prefix_repeats")
detect_duplicate_token.known_params = _COMMON

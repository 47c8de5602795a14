"""Causal validation shared by every detector: ablate a kind's top-k heads vs random k-head sets.

Usage from a detector (retrieval, temporal, ... do the same with their own metric):

    def damage(model):                      # the behaviour metric, measured on the model as it
        return token_loss(model, ...)       # stands (called inside the ablation context)
    v = validate_heads(model, "induction", top_heads(df, k), damage, k=8, n_random=5, seed=cfg.seed,
                       metric="loss increase on the repeated half (nats/token)")

`damage_fn(model) -> float` is called once without ablation (the baseline), once with the top-k
heads ablated and once per random set. Damage = metric - baseline (or baseline - metric with
`higher_is_worse=False`, e.g. for accuracies), so a positive damage always means "worse".

Random sets are drawn without replacement from the heads that are NOT among the top k, seeded
with seed, seed + 1, ...: the question is whether the detector's heads matter more than the
other heads of the model, and a random set that could contain top heads would blur exactly that.

`ablate(model, heads)` returns the context manager that removes the heads; default zero ablation
(`ablate_heads(model, heads, "zero")`); pass e.g. `lambda m, h: ablate_heads(m, h, "uniform")` for
the retrieval paper's masking, or any context built on `model.edit_attention`.
"""

from __future__ import annotations

from typing import Callable, ContextManager

import numpy as np
from tqdm.auto import tqdm

from headscope.probe.errors import InputError

from .ablation import ablate_heads
from .scores import Validation


def zero_ablation(model, heads) -> ContextManager:
    return ablate_heads(model, heads, mode="zero")


def random_head_sets(n_layers: int, n_heads: int, k: int, n_sets: int, seed: int, exclude=()) -> list[list[tuple[int, int]]]:
    """n_sets lists of k distinct (layer, head) pairs, seeded (seed + i for set i), avoiding `exclude`."""
    excluded = {(int(l), int(h)) for l, h in exclude}
    pool = [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in excluded]
    if k > len(pool):
        raise InputError(f"cannot draw {k} random heads from the {len(pool)} heads outside the top set.")
    sets = []
    for i in range(n_sets):
        idx = np.random.default_rng(seed + i).choice(len(pool), size=k, replace=False)
        sets.append(sorted(pool[j] for j in idx))
    return sets


def validate_heads(model, kind: str, top_heads, damage_fn: Callable[[object], float], k: int = 8,
                   n_random: int = 5, seed: int = 0, *, metric: str = "", ablate=zero_ablation,
                   higher_is_worse: bool = True, notes: str = "", each: bool = False,
                   progress: bool = False) -> Validation:
    """Damage from ablating the first k of `top_heads` vs `n_random` random k-head sets -> Validation.

    Args:
        model: HeadscopeModel.
        kind: the head kind (for the report).
        top_heads: [(layer, head), ...] best first (e.g. `top_heads(scores_df, k)`); fewer than k
            are validated as they are (random sets of their size, said in the notes), none gives a
            Validation that did not pass.
        damage_fn: model -> float, the behaviour metric (see module docstring).
        k, n_random, seed: heads per set, number of random sets, seed of the first random set.
        metric: what damage_fn measures, in words and units.
        ablate: (model, heads) -> context manager that removes those heads.
        higher_is_worse: False when damage_fn returns something that ablation should lower.
        each: also ablate each top head alone (k more damage_fn calls): `Validation.each_damage`,
            the detector's `ablation_delta` column.
    """
    if n_random < 1:
        raise InputError(f"validation compares the top heads with random head sets: n_random must be >= 1, "
                         f"got {n_random} (use validate=False to skip validation).")
    if k < 1:
        raise InputError(f"validation ablates k heads: k must be >= 1, got {k} (use validate=False to skip it).")
    top = [(int(l), int(h)) for l, h in list(top_heads)[:k]]
    if not top:  # e.g. every head scored 0: no head was singled out, so there is nothing to check
        return Validation(kind=kind, k=0, metric=metric, top_k_damage=float("nan"), random_k_damage=[],
                          baseline=float("nan"), notes=(notes + " " if notes else "") +
                          "No head scores above the others: nothing to validate.")
    if len(top) < k:  # `top_heads` leaves out heads tied with the rest; random sets match the top set's size
        notes = (notes + " " if notes else "") + (f"Only {len(top)} heads score above the rest: {len(top)} "
                                                  f"validated instead of {k}.")
        k = len(top)
    sign = 1.0 if higher_is_worse else -1.0
    sets = random_head_sets(model.meta.n_layers, model.meta.n_heads, k, n_random, seed, exclude=top)
    bar = tqdm(total=2 + n_random + (k if each else 0), desc=f"validate {kind}", disable=not progress, leave=False)
    baseline = float(damage_fn(model))
    bar.update()
    with ablate(model, top):
        top_damage = sign * (float(damage_fn(model)) - baseline)
    bar.update()
    each_damage = None
    if each:
        each_damage = []
        for head in top:
            with ablate(model, [head]):
                each_damage.append((*head, sign * (float(damage_fn(model)) - baseline)))
            bar.update()
    random_damage = []
    for heads in sets:
        with ablate(model, heads):
            random_damage.append(sign * (float(damage_fn(model)) - baseline))
        bar.update()
    bar.close()
    return Validation(kind=kind, k=k, metric=metric, top_k_damage=top_damage, random_k_damage=random_damage,
                      baseline=baseline, notes=notes, each_damage=each_damage)

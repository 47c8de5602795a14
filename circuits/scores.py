"""`HeadScores`: the tidy table every detector returns and every report reads.

One row per (kind, layer, head); columns `kind, layer, head, score, rank` plus kind-specific
columns (e.g. `ablation_delta`). Rank 1 is the most <kind>-like head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

KINDS = ("sink", "previous_token", "induction", "duplicate_token", "retrieval", "temporal")
BASE_COLUMNS = ["kind", "layer", "head", "score", "rank"]


def head_scores(kind: str, score, extra: dict | None = None) -> pd.DataFrame:
    """Build a HeadScores frame from a [L, H] score grid (tensor or array) and optional [L, H] extras.

    NaN scores (heads that could not be scored) rank last.
    """
    grid = score.detach().cpu().double().numpy() if isinstance(score, torch.Tensor) else np.asarray(score, float)
    if grid.ndim != 2:
        raise ValueError(f"scores must be a [layers, heads] grid, got shape {grid.shape}")
    L, H = grid.shape
    layer, head = np.meshgrid(np.arange(L), np.arange(H), indexing="ij")
    df = pd.DataFrame({"kind": kind, "layer": layer.ravel(), "head": head.ravel(), "score": grid.ravel()})
    for name, values in (extra or {}).items():
        v = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        df[name] = v.reshape(-1) if v.shape == grid.shape else v
    order = df["score"].rank(ascending=False, method="first", na_option="bottom")
    df["rank"] = order.astype(int)
    cols = BASE_COLUMNS + [c for c in df.columns if c not in BASE_COLUMNS]
    return df[cols].sort_values(["rank"]).reset_index(drop=True)


def score_grid(df: pd.DataFrame, n_layers: int, n_heads: int, column: str = "score") -> np.ndarray:
    """[L, H] grid of one column of a single-kind HeadScores frame."""
    grid = np.full((n_layers, n_heads), np.nan)
    grid[df["layer"].to_numpy(), df["head"].to_numpy()] = df[column].to_numpy()
    return grid


def top_heads(df: pd.DataFrame, k: int) -> list[tuple[int, int]]:
    """The k best-ranked (layer, head) pairs of a single-kind frame, less any whose score ties with the
    best head left out: ties would be broken by head index, and most retrieval scores are exactly 0,
    so "the top 8" would fill up with layer-0 heads that the detector never singled out. May return
    fewer than k (none when every head scores the same)."""
    ranked = df.dropna(subset=["score"]).sort_values("rank")
    best = ranked.head(k)
    if len(ranked) > k:
        best = best[best["score"] > ranked["score"].iloc[k]]
    return [(int(l), int(h)) for l, h in zip(best["layer"], best["head"])]


@dataclass
class Validation:
    """Causal check of a detector: damage to its behaviour from ablating its top-k heads vs random k."""

    kind: str
    k: int
    metric: str
    top_k_damage: float
    random_k_damage: list[float]
    baseline: float
    notes: str = ""
    # The same head sets on a control behaviour the heads should NOT affect (e.g. temporal heads on
    # time-invariant facts): {"metric", "baseline", "top_k_damage", "random_k_damage": [...]}.
    control: dict | None = None
    # With DetectorConfig.ablate_each: [(layer, head, damage)] of each top head ablated alone.
    each_damage: list | None = None

    @property
    def random_median(self) -> float:
        return float(np.median(self.random_k_damage)) if self.random_k_damage else float("nan")

    @property
    def control_median(self) -> float:
        """Median damage of the random head sets on the control behaviour (nan without a control)."""
        r = self.control["random_k_damage"] if self.control else []
        return float(np.median(r)) if len(r) else float("nan")

    @property
    def random_max(self) -> float:
        return float(max(self.random_k_damage)) if self.random_k_damage else float("nan")

    @property
    def p_value(self) -> float:
        """Empirical one-sided p of the top set among the random ones: (1 + random sets doing at least
        its damage) / (1 + random sets); 1 / (n_random + 1) at best."""
        n = len(self.random_k_damage)
        return (1 + sum(r >= self.top_k_damage for r in self.random_k_damage)) / (n + 1)

    @property
    def beats_random(self) -> bool:
        """The top heads do damage (> 0) and more than every random set. Beating the median alone let a
        top set pass that did no damage (both <= 0) or that 2 of 5 random sets out-damaged."""
        return bool(self.random_k_damage) and self.top_k_damage > 0 and self.top_k_damage > self.random_max

    @property
    def specific(self) -> bool:
        """Without a control: True. With one: the top heads damage their behaviour more than the
        control behaviour (DESIGN: temporal heads hurt temporal facts more than invariant ones)."""
        return not self.control or bool(self.top_k_damage > self.control["top_k_damage"])

    @property
    def passed(self) -> bool:
        """Damage, more than every random set's and, with a control, more than to the control."""
        return self.beats_random and self.specific

    def verdict(self) -> str:
        """One sentence for reports: the top set's damage beside the random sets' range, median and the
        empirical p (a ratio only to the most damaging random set, and only when that one did damage),
        or why the check failed; plus the control numbers when there is a control."""
        n = len(self.random_k_damage)
        if not n:
            return f"no causal check of the {self.kind} heads: {self.notes}"
        # + 0.0: a damage of -0.0 (recall unchanged) would print as "-0"
        spread = (f"{n} random {self.k}-head sets: {min(self.random_k_damage) + 0.0:.4g} to "
                  f"{self.random_max + 0.0:.4g}, median {self.random_median + 0.0:.4g}; empirical p = {self.p_value:.2g}")
        if self.beats_random:
            ratio = (f", {self.top_k_damage / self.random_max:.1f}x the damage of the most damaging random set"
                     if self.random_max > 0 else "")
            text = (f"ablating the top-{self.k} {self.kind} heads does {self.top_k_damage:.4g} damage "
                    f"({self.metric}){ratio}; more than each of the {spread}.")
        elif self.top_k_damage <= 0:
            text = (f"ablating the top-{self.k} {self.kind} heads does no damage ({self.top_k_damage:.4g}, "
                    f"{self.metric}; {spread}): nothing shows that these heads carry the behaviour.")
        else:
            text = (f"the top-{self.k} {self.kind} heads are not more harmful than every random set when ablated "
                    f"({self.top_k_damage:.4g}, {self.metric}; {spread}): the detector is wrong, the behaviour "
                    "is absent in this model, or more random sets are needed to tell.")
        if self.control:
            c = self.control
            text += (f" Control ({c['metric']}): the same top heads do {c['top_k_damage']:.4g} vs median "
                     f"{self.control_median:.4g} for the random sets.")
            if self.beats_random and not self.specific:
                text += (f" They damage the control as much as their own behaviour ({c['top_k_damage']:.4g} vs "
                         f"{self.top_k_damage:.4g}): not specific to {self.kind}, so not validated.")
        return text

    def to_dict(self) -> dict:
        """JSON-ready dict. Unlike the field of the same name, its "random_k_damage" is the median
        (a float); the per-set values are "random_k_damage_all" (likewise in "control")."""
        d = {"k": self.k, "top_k_damage": float(self.top_k_damage), "random_k_damage": float(self.random_median),
             "random_k_damage_all": [float(x) for x in self.random_k_damage], "p_value": self.p_value,
             "metric": self.metric,
             "baseline": float(self.baseline), "passed": self.passed, "verdict": self.verdict(),
             "notes": self.notes}
        if self.control:
            d["control"] = {**self.control, "random_k_damage_all": [float(x) for x in self.control["random_k_damage"]],
                            "random_k_damage": self.control_median}
        if self.each_damage is not None:
            d["each_damage"] = [{"layer": int(l), "head": int(h), "damage": float(x)} for l, h, x in self.each_damage]
        return d


@dataclass
class DetectorResult:
    """What a detector returns: per-head scores, model-level findings, and the causal check."""

    kind: str
    scores: pd.DataFrame
    summary: dict = field(default_factory=dict)
    validation: Validation | None = None

    def __post_init__(self):
        # DESIGN's per-head ablation column: the damage of each top head ablated alone
        # (`Validation.each_damage`, DetectorConfig.ablate_each); NaN for the heads not ablated alone.
        each = self.validation.each_damage if self.validation is not None else None
        if each is not None:
            damage = {(int(l), int(h)): float(x) for l, h, x in each}
            self.scores = self.scores.assign(ablation_delta=[damage.get((int(l), int(h)), float("nan"))
                                                             for l, h in zip(self.scores["layer"], self.scores["head"])])

"""What the head explorer computes, free of Streamlit: report reading, prompt checks, pattern and
statistics views of one head, next-token distributions under an intervention.

Every function here raises a `HeadscopeError` subclass on bad input; the pages turn those into
`st.error` messages. Shapes: S = prompt length in tokens, L layers, H heads.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from headscope.kernels.errors import HeadscopeError
from headscope.kernels.stats import StatsRequest
from headscope.probe.errors import HeadIndexError, InputError

# Above this many tokens the page shows per-position statistics instead of the S x S matrix: a
# 256 x 256 heatmap is the largest one whose cells stay readable and whose hover data stays small.
PATTERN_MAX_TOKENS = 256
# Interactive latency on a 2-core CPU; override with HEADSCOPE_EXPLORE_MAX_TOKENS.
DEFAULT_MAX_TOKENS = 2048


class ReportError(HeadscopeError, ValueError):
    """A rank report directory is missing, unreadable or not in the heads.json / heads.csv format."""


# ---- rank reports -------------------------------------------------------------------------------
@dataclass
class Report:
    """A saved `headscope rank` report: scores [one row per (kind, layer, head)] and validation."""

    path: Path
    model: str
    n_layers: int
    n_heads: int
    scores: pd.DataFrame
    validation: dict = field(default_factory=dict)

    @property
    def kinds(self) -> list[str]:
        return list(dict.fromkeys(self.scores["kind"]))

    def grid(self, kind: str) -> np.ndarray:
        """[L, H] score grid of one kind (NaN where a head has no score)."""
        from headscope.circuits.scores import score_grid

        return score_grid(self.scores[self.scores["kind"] == kind], self.n_layers, self.n_heads)


def load_report(path) -> Report:
    """Read a report directory (heads.json preferred, heads.csv otherwise) or one of those files."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        p = p / "heads.json" if (p / "heads.json").exists() else p / "heads.csv"
    if not p.exists():
        raise ReportError(f"no rank report at {path}: expected a directory holding heads.json or heads.csv "
                          "(write one with `headscope rank --out DIR`).")
    try:
        if p.suffix == ".json":
            data = json.loads(p.read_text())
            scores = pd.DataFrame(data["scores"])
            model, L, H, validation = data.get("model", "?"), data.get("n_layers"), data.get("n_heads"), \
                data.get("validation") or {}
        else:
            scores, model, L, H, validation = pd.read_csv(p), "?", None, None, {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReportError(f"cannot read rank report {p}: {exc}") from exc
    missing = {"kind", "layer", "head", "score"} - set(scores.columns)
    if missing or scores.empty:
        raise ReportError(f"{p} is not a head-score table: missing columns {sorted(missing)}" if missing
                          else f"{p} holds no scores.")
    L = int(L if L is not None else scores["layer"].max() + 1)
    H = int(H if H is not None else scores["head"].max() + 1)
    return Report(path=p.parent, model=str(model), n_layers=L, n_heads=H, scores=scores, validation=validation)


# ---- head selection -----------------------------------------------------------------------------
def check_head(n_layers: int, n_heads: int, layer, head) -> tuple[int, int]:
    """Validate a (layer, head) pair against a model's shape; HeadIndexError says the valid range."""
    try:
        layer, head = int(layer), int(head)
    except (TypeError, ValueError) as exc:
        raise HeadIndexError(f"layer and head must be integers, got {layer!r}, {head!r}.") from exc
    if not 0 <= layer < n_layers:
        raise HeadIndexError(f"layer {layer} is out of range: this model has layers 0..{n_layers - 1}.")
    if not 0 <= head < n_heads:
        raise HeadIndexError(f"head {head} is out of range: this model has heads 0..{n_heads - 1}.")
    return layer, head


def parse_heads(text: str, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """"3.2, L10H4, 5:1" -> [(3, 2), (10, 4), (5, 1)], every pair validated."""
    items = [t for t in re.split(r"[,\s;]+", text.strip()) if t]
    if not items:
        raise InputError("no heads selected: enter heads as layer.head, e.g. `3.2, 10.4`.")
    out = []
    for item in items:
        m = re.fullmatch(r"[Ll]?(-?\d+)(?:[.:]|[Hh])(-?\d+)", item)
        if not m:
            raise InputError(f"cannot read head {item!r}: write layer.head, e.g. `3.2` or `L3H2`.")
        out.append(check_head(n_layers, n_heads, m.group(1), m.group(2)))
    return list(dict.fromkeys(out))


def point_to_head(point: dict) -> tuple[int, int] | None:
    """A plotly selection point of the head map (x = layer, y = head) -> (layer, head)."""
    try:
        return int(round(float(point["x"]))), int(round(float(point["y"])))
    except (KeyError, TypeError, ValueError):
        return None


# ---- prompts ------------------------------------------------------------------------------------
def max_tokens(model) -> int:
    limit = int(os.environ.get("HEADSCOPE_EXPLORE_MAX_TOKENS", DEFAULT_MAX_TOKENS))
    return min(limit, model.meta.max_positions or limit)


def encode_prompt(model, prompt: str) -> tuple[torch.Tensor, list[str]]:
    """Prompt -> (input_ids [1, S] with BOS prepended, token labels "i:token" unique per position)."""
    if not prompt or not prompt.strip():
        raise InputError("the prompt is empty: type some text to run through the model.")
    ids = model.tokenize(prompt, prepend_bos=True)["input_ids"]
    limit = max_tokens(model)
    if ids.shape[1] > limit:
        raise InputError(f"the prompt has {ids.shape[1]} tokens; the explorer runs at most {limit} "
                         "(HEADSCOPE_EXPLORE_MAX_TOKENS, and the model's context). Shorten it.")
    return ids, token_labels(model.tokenizer, ids[0].tolist())


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    # Plotly merges equal category labels, so each label carries its position.
    return [f"{i}:{tokenizer.decode([t])!r}"[:40] for i, t in enumerate(ids)]


# ---- one head on one prompt ---------------------------------------------------------------------
def head_pattern(model, ids: torch.Tensor, layer: int, head: int) -> np.ndarray:
    """Attention probabilities [S, S] (query rows, key columns) of one head, forward stopped after it."""
    if ids.shape[1] > PATTERN_MAX_TOKENS:
        raise InputError(f"{ids.shape[1]} tokens is above the {PATTERN_MAX_TOKENS}-token pattern view; "
                         "use the statistics view.")
    _, rec = model.run_recorded(ids, None, StatsRequest(), patterns={"layers": [layer], "heads": [head]},
                                stop_after_layer=layer)
    return rec.pattern(layer, head)[0].float().cpu().numpy()


def head_statistics(model, ids: torch.Tensor, layer: int, head: int) -> pd.DataFrame:
    """Per-query-position statistics of one head, without the S x S matrix.

    Columns: position, token, entropy (nats), sink_mass (on position 0), prev_token_mass (on i-1),
    max_prob and argmax (the most attended key).
    """
    request = StatsRequest(entropy=True, topk=1, sink_k=1, offsets=(1,))
    _, rec = model.run_recorded(ids, None, request, stop_after_layer=layer)
    get = lambda name: rec.stat(name, layer, head)[0].float().cpu().numpy()  # noqa: E731
    return pd.DataFrame({
        "position": np.arange(ids.shape[1]),
        "entropy": get("entropy"), "sink_mass": get("sink_mass"), "prev_token_mass": get("offset_mass")[:, 0],
        "max_prob": get("max_prob")[:, 0], "argmax": rec.stat("argmax", layer, head)[0, :, 0].cpu().numpy(),
    })


def prompt_head_means(model, ids: torch.Tensor) -> dict[str, np.ndarray]:
    """[L, H] per-head means over the prompt's positions: sink mass, previous-token mass, entropy."""
    request = StatsRequest(entropy=True, sink_k=1, offsets=(1,))
    _, rec = model.run_recorded(ids, None, request, stop_after_layer=model.meta.n_layers - 1)
    later = torch.zeros_like(rec.attention_mask, dtype=torch.bool)
    later[:, 1:] = True  # position 0 sees only itself: its masses are 1 by construction
    return {
        "prompt: sink mass": rec.head_mean("sink_mass", later).numpy(),
        "prompt: previous-token mass": _offset_mean(rec, later),
        "prompt: entropy": rec.head_mean("entropy", later).numpy(),
    }


def _offset_mean(rec, positions) -> np.ndarray:
    # offset_mass has a trailing offsets axis, which Recording.head_mean refuses; offset 1 only here.
    t = rec.stat("offset_mass")[..., 0].float()
    m = (positions.bool() & rec.query_mask())[:, None, None, :]
    return (torch.where(m, t, torch.zeros_like(t)).sum(dim=(0, 3)) / m.sum(dim=(0, 3)).clamp_min(1)).numpy()


# ---- next-token distributions -------------------------------------------------------------------
def next_token_probs(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token probabilities [vocab] after the prompt's last position."""
    if not model.meta.causal:
        raise ReportError(f"{model.meta.name} is an encoder without a next-token head: interventions are "
                          "compared on next-token distributions, so load a causal language model.")
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, -1].float()
    return torch.softmax(logits, dim=-1)


def compare_top(tokenizer, before: torch.Tensor, after: torch.Tensor, k: int = 10) -> pd.DataFrame:
    """Union of the top-k tokens before and after, with both probabilities, sorted by p_before."""
    idx = torch.cat([before.topk(k).indices, after.topk(k).indices]).unique()
    df = pd.DataFrame({"token_id": idx.numpy(), "token": [repr(tokenizer.decode([int(i)])) for i in idx],
                       "p_before": before[idx].numpy(), "p_after": after[idx].numpy()})
    df["change"] = df["p_after"] - df["p_before"]
    df["rank_before"] = [int((before > before[i]).sum()) + 1 for i in idx]
    df["rank_after"] = [int((after > after[i]).sum()) + 1 for i in idx]
    return df.sort_values("p_before", ascending=False).reset_index(drop=True)


def kl_divergence(before: torch.Tensor, after: torch.Tensor) -> float:
    """KL(before || after) in nats."""
    b, a = before.double().clamp_min(1e-30), after.double().clamp_min(1e-30)
    return float((b * (b.log() - a.log())).sum())

"""The machine-readable outputs of `headscope rank`: heads.json, heads.csv, run.json, and the
top-heads summary printed to the terminal.

heads.json holds nothing that changes between runs with the same seed (no times, no paths of
temporary files), so two runs give identical bytes; timing goes to run.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from headscope.circuits.scores import BASE_COLUMNS, DetectorResult
from headscope.probe import ModelMeta


def jsonable(x):
    """Numbers, tensors, arrays, frames and dataclass-likes -> JSON values (NaN/inf -> null)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return jsonable(x.detach().cpu().tolist())
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, pd.DataFrame):
        return jsonable(x.to_dict(orient="records"))
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if x is None or isinstance(x, str):
        return x
    if hasattr(x, "to_dict"):
        return jsonable(x.to_dict())
    return str(x)


def score_rows(df: pd.DataFrame) -> list[dict]:
    """HeadScores rows in rank order: the schema's keys first, then the kind's own columns."""
    extra = [c for c in df.columns if c not in BASE_COLUMNS and df[c].notna().any()]
    rows = []
    for rec in df.sort_values("rank")[BASE_COLUMNS + extra].to_dict(orient="records"):
        rows.append({k: jsonable(v) for k, v in rec.items()})
    return rows


def heads_document(meta: ModelMeta, results: dict[str, DetectorResult]) -> dict:
    """The heads.json document:
    {"model", "n_layers", "n_heads", "scores": [{"kind", "layer", "head", "score", "rank", ...}],
     "validation": {kind: {"k", "top_k_damage", "random_k_damage", "metric", ...}}, "summary": {kind: {...}}}
    random_k_damage is the median over the random head sets (all of them: random_k_damage_all)."""
    return {
        "model": meta.name,
        "n_layers": meta.n_layers,
        "n_heads": meta.n_heads,
        "scores": [row for r in results.values() for row in score_rows(r.scores)],
        "validation": {k: jsonable(r.validation.to_dict()) for k, r in results.items() if r.validation is not None},
        "summary": {k: jsonable(r.summary) for k, r in results.items()},
    }


def write_heads(directory: Path, meta: ModelMeta, results: dict[str, DetectorResult]) -> None:
    """heads.json (sorted keys inside rows' extras kept in table order) and heads.csv (all kinds)."""
    doc = heads_document(meta, results)
    (directory / "heads.json").write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    frames = [r.scores.sort_values("rank") for r in results.values()]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=BASE_COLUMNS)
    table.to_csv(directory / "heads.csv", index=False)


def write_run_info(directory: Path, info: dict) -> None:
    (directory / "run.json").write_text(json.dumps(jsonable(info), indent=1) + "\n")


def scored(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of a HeadScores frame whose head has a score, in rank order. A NaN score means the head
    could not be scored (e.g. retrieval when the model retrieved no needle): it ranks last and is never
    shown as a top head."""
    return df[df["score"].notna()].sort_values("rank")


def top_heads_text(results: dict[str, DetectorResult], k: int) -> str:
    """Terminal summary: the top-k heads of each kind with scores, and the causal verdict."""
    lines = []
    for kind, r in results.items():
        best = scored(r.scores).head(k)
        heads = ", ".join(f"L{int(l)}H{int(h)} {s:.3g}" for l, h, s in zip(best["layer"], best["head"], best["score"]))
        lines.append(f"{kind:>16}: {heads or 'no head could be scored'}"
                     + (f" ({r.summary['note']})" if not heads and r.summary.get("note") else ""))
        if r.validation is not None:
            lines.append(f"{'':>16}  causal check: {r.validation.verdict()}")
    return "\n".join(lines)

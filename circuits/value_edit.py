"""Value-vector editing at one position: the temporal-heads paper's knowledge edit (Park et al. 2025,
"Does Time Have Its Place? Temporal Heads", their notebook 7.temporal_knowledge_edit).

Their edit, in one head h of layer l: take the mean over a source prompt's positions of h's value
vectors, and add coeff x that mean to h's value vector at the last token of a phrase in a target
prompt (the year of "In 2009, ..."); then ask whether the target's answer changes. They sweep every
head of Llama-2-7b-chat (coeff 1, 3, 6; greedy decoding) and count, per head, the prompt pairs where
the wanted answer appears in a 50-token continuation: their temporal head a18.h3 succeeds in 8 of 15.

headscope applies the edit through `LayerEdit.value_delta` (see headscope.probe.edits): the value
vectors are not rewritten; each query i of the head gets p_i(phrase token) x delta added to its output,
with p from the attention call itself. That is the same arithmetic as editing v, but per query head
under GQA (editing v would change every head of the kv group), and it holds in cached decoding.

Differences from the paper's code, on purpose:
- prompts start with BOS (the model's documents do; theirs had none) and the source mean skips it;
- the sweep reads the answer's summed log-prob and the greedy first token with the answer teacher-forced
  (one batched forward per chunk of heads); their 50-token continuation check is `continuation_tokens`;
- a control the paper does not have: the same edit with the *target's own* mean values (the same push,
  coeff x a value mean, without the source's content). An edit that moves the answer no more than its
  control shows a head sensitive to being pushed, not one that carries the source's year. On the
  embedded 135M model and our 56 temporal facts (coeff 6), the ten heads that raised the answer's
  log-prob most did so by 0.04-0.11 nats (median), their controls by 0.04-0.09 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import operator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from headscope.probe import HeadscopeModel, LayerEdit
from headscope.probe.errors import InputError

from .ablation import heads_by_layer
from .scores import score_grid
from .temporal import TemporalFact, answer_ids, phrase_positions, prompt_ids

Head = tuple[int, int]


@dataclass(frozen=True)
class ValueEditCase:
    """One prompt pair: the source whose value vectors are averaged, the target edited at the last
    token of `phrase` (a substring of target), and the answer the edit should bring out."""

    source: str
    target: str
    phrase: str
    answer: str


def cases_from_facts(facts: list[TemporalFact]) -> list[ValueEditCase]:
    """Temporal facts -> cases that move the year: edit the corrupted prompt's year with the values
    of the fact's own prompt, wanting the fact's answer (the corrupted prompt's answer differs)."""
    return [ValueEditCase(source=f.prompt, target=f.corrupt_prompt, phrase=f.corrupt_year, answer=f.answer)
            for f in facts]


def _ids(model: HeadscopeModel, text: str) -> torch.Tensor:
    return torch.tensor([prompt_ids(model, text)], device=model.device)


def head_values(model: HeadscopeModel, input_ids: torch.Tensor, heads,
                attention_mask: torch.Tensor | None = None) -> dict[Head, torch.Tensor]:
    """Value vectors each head reads, {(layer, head): [B, S, D]} for input_ids [B, S] (the kv head
    that serves the query head under GQA; as the attention function sees them); attention_mask [B, S]
    for padded batches."""
    layers = sorted(heads_by_layer(model, heads))
    _, rec = model.run_recorded(input_ids, attention_mask, qkv=layers, stop_after_layer=layers[-1])
    group = model.meta.n_heads // model.meta.n_kv_heads
    return {(l, h): rec.v[:, rec.qkv_layers.index(l), h // group].float() for l, h in heads}


def value_means(model: HeadscopeModel, text: str, heads) -> dict[Head, torch.Tensor]:
    """The paper's source vector: each head's value vectors averaged over the prompt's tokens (BOS
    excluded) -> {(layer, head): [D]}."""
    ids = _ids(model, text)
    skip = 1 if model.tokenizer.bos_token_id is not None else 0
    if ids.shape[1] <= skip:
        raise InputError(f"source prompt {text!r} has no tokens.")
    return {hd: v[0, skip:].mean(0) for hd, v in head_values(model, ids, heads).items()}


def _key_set(positions, device) -> torch.Tensor:
    """An int position (every example), a list of one int per example, or a [B, S] bool mask -> [B, S] bool."""
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        if positions.dim() != 2:
            raise InputError(f"positions as a mask must be [B, S] bool, got {tuple(positions.shape)}.")
        return positions.to(device)
    if isinstance(positions, torch.Tensor) and positions.dim() == 0:
        positions = int(positions)
    try:
        pos = [operator.index(positions)]
    except TypeError:
        pos = [operator.index(p) for p in positions]  # a list, numpy array or 1-D tensor of ints
    if not pos or min(pos) < 0:
        raise InputError(f"positions must be non-negative token positions, got {positions!r}.")
    keys = torch.zeros(len(pos), max(pos) + 1, dtype=torch.bool, device=device)
    keys[torch.arange(len(pos)), torch.tensor(pos)] = True
    return keys


@contextmanager
def edit_values(model: HeadscopeModel, deltas: dict[Head, torch.Tensor], positions):
    """Add deltas[(layer, head)] ([D], or [B, D] one per example) to the head's value vector at
    `positions` in every forward inside the block (yields the model).

    positions: an int (the same token position in every example), a list of one position per
        example, or a [B, S] bool key mask (several keys get the same delta each); positions are
        columns of input_ids, padding included.
    The edit reaches every query that attends to those keys, later generated tokens included; a
    position past the input takes effect once generation reaches it.
    """
    if not deltas:
        raise InputError("edit_values needs at least one (layer, head) -> delta.")
    H, D = model.meta.n_heads, model.meta.head_dim
    layers = heads_by_layer(model, deltas)
    keys = _key_set(positions, model.device)
    per_layer: dict[int, torch.Tensor] = {}
    for (l, h), d in deltas.items():
        d = torch.as_tensor(d, dtype=torch.float32, device=model.device)
        if d.dim() not in (1, 2) or d.shape[-1] != D:
            raise InputError(f"delta of head ({l}, {h}) must be [D] or [B, D] with D = {D}, got {tuple(d.shape)}.")
        if l not in per_layer:
            per_layer[l] = torch.zeros(*d.shape[:-1], H, D, device=model.device)
        elif tuple(per_layer[l].shape[:-2]) != tuple(d.shape[:-1]):
            raise InputError(f"layer {l}: deltas of shapes {tuple(per_layer[l].shape[:-2]) + (D,)} and {tuple(d.shape)}; "
                             "give every delta of a layer as [D], or every one as [B, D] with the same B.")
        per_layer[l][..., h, :] = d
    with model.edit_attention({l: LayerEdit(value_delta=per_layer[l], value_keys=keys) for l in layers}):
        yield model


def _forward_logprobs(model: HeadscopeModel, ids: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """log-softmax [B, S - n_prompt + 1, V] at the prompt's last position and every answer position."""
    with torch.no_grad():
        logits = model.hf(input_ids=ids, use_cache=False, logits_to_keep=ids.shape[1] - n_prompt + 1).logits
    return torch.log_softmax(logits.float(), -1)


def _readout(logp: torch.Tensor, answer: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """([B] summed log-prob of the answer tokens, [B] greedy first token after the prompt)."""
    idx = torch.tensor(answer, device=logp.device)
    summed = logp[:, torch.arange(len(answer)), idx].sum(1)
    return summed.cpu(), logp[:, 0].argmax(-1).cpu()


def _continues_with(model: HeadscopeModel, prompt: torch.Tensor, answer: str, n_tokens: int) -> bool:
    out = model.hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_tokens,
                            do_sample=False, pad_token_id=model.tokenizer.pad_token_id or model.tokenizer.eos_token_id)
    return answer in model.tokenizer.decode(out[0, prompt.shape[1]:])


def value_edit_sweep(model: HeadscopeModel, cases: list[ValueEditCase], heads=None, coeffs=(1.0,), *,
                     control: bool = True, batch_size: int = 64, continuation_tokens: int = 0,
                     progress: bool = True) -> pd.DataFrame:
    """Edit one head at a time (every head by default) for every case and coefficient.

    Returns one row per (case, coeff, layer, head): answer_logprob (summed over the answer's tokens,
    teacher-forced after the edited target), logprob_change (against the unedited target),
    first_token (greedy, decoded), first_token_changed, answer_first (the greedy first token is the
    answer's first token) and, with continuation_tokens > 0, answer_in_continuation (the paper's
    criterion: a greedy continuation of that many tokens contains the answer; run only where the first
    token changed, as in their code, and False elsewhere). With control (twice the forwards):
    control_change, the logprob_change of the same edit made with the target's own value means, and
    specific_change = logprob_change - control_change, what the source's content adds to the push.
    df.attrs["baseline"] has each case's unedited answer_logprob and first_token.
    """
    if not cases:
        raise InputError("value_edit_sweep needs at least one case.")
    heads = [(l, h) for l in range(model.meta.n_layers) for h in range(model.meta.n_heads)] if heads is None \
        else [model.meta.check_head(int(l), int(h)) for l, h in heads]
    if not heads:
        raise InputError("value_edit_sweep: no heads to edit.")
    if len(set(heads)) < len(heads):
        raise InputError(f"value_edit_sweep: heads listed twice: {sorted({h for h in heads if heads.count(h) > 1})}.")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}.")
    coeffs = [float(c) for c in coeffs]
    rows, baseline = [], []
    bar = tqdm(total=len(cases) * len(coeffs) * len(heads), desc="value edits", unit="edit", disable=not progress)
    for ci, case in enumerate(cases):
        prompt = _ids(model, case.target)
        pos = phrase_positions(model, case.target, case.phrase)[-1]
        answer = answer_ids(model, case.answer)
        ids = torch.cat([prompt, torch.tensor([answer], device=model.device)], 1)
        base_lp, base_first = _readout(_forward_logprobs(model, ids, prompt.shape[1]), answer)
        baseline.append({"case": ci, "answer_logprob": float(base_lp[0]),
                         "first_token": model.tokenizer.decode(int(base_first[0]))})
        means = value_means(model, case.source, heads)
        own = value_means(model, case.target, heads) if control else None

        def edited(chunk, source_means, coeff):
            deltas = {}
            for r, hd in enumerate(chunk):
                d = torch.zeros(len(chunk), model.meta.head_dim, device=model.device)
                d[r] = coeff * source_means[hd]  # row r edits only its own head
                deltas[hd] = d
            with edit_values(model, deltas, pos):
                return _readout(_forward_logprobs(model, ids.expand(len(chunk), -1), prompt.shape[1]), answer)

        for coeff in coeffs:
            for s in range(0, len(heads), batch_size):
                chunk = heads[s:s + batch_size]
                lp, first = edited(chunk, means, coeff)
                ctl = edited(chunk, own, coeff)[0] if control else None
                for r, (l, h) in enumerate(chunk):
                    row = {"case": ci, "coeff": coeff, "layer": l, "head": h, "answer_logprob": float(lp[r]),
                           "logprob_change": float(lp[r] - base_lp[0]),
                           "first_token": model.tokenizer.decode(int(first[r])),
                           "first_token_changed": bool(first[r] != base_first[0]),
                           "answer_first": bool(first[r] == answer[0])}
                    if control:
                        row["control_change"] = float(ctl[r] - base_lp[0])
                        row["specific_change"] = float(lp[r] - ctl[r])
                    if continuation_tokens > 0:
                        hit = False
                        if row["first_token_changed"]:
                            with edit_values(model, {(l, h): coeff * means[(l, h)]}, pos), torch.no_grad():
                                hit = _continues_with(model, prompt, case.answer, continuation_tokens)
                        row["answer_in_continuation"] = hit
                    rows.append(row)
                bar.update(len(chunk))
    bar.close()
    df = pd.DataFrame(rows)
    df.attrs["baseline"] = baseline
    return df


AGGREGATES = ("sum", "mean", "median")


def head_grid(df: pd.DataFrame, n_layers: int, n_heads: int, column: str = "specific_change",
              agg: str = "median") -> np.ndarray:
    """[n_layers, n_heads] aggregate of a sweep column over each head's (case, coeff) runs: "sum" of a
    boolean column is the paper's per-head success count; NaN for heads the sweep did not edit."""
    if column not in df.columns:
        raise InputError(f"the sweep has no column {column!r}; it has {list(df.columns)}.")
    if agg not in AGGREGATES:
        raise InputError(f"agg must be one of {AGGREGATES}, got {agg!r}.")
    per_head = df.groupby(["layer", "head"])[column].agg(agg).astype(float).reset_index()
    return score_grid(per_head, n_layers, n_heads, column)


def sweep_heatmap(df: pd.DataFrame, n_layers: int, n_heads: int, column: str = "specific_change",
                  agg: str = "median"):
    """Plotly heatmap of `head_grid`: layers (y) x heads (x); diverging around 0 for changes."""
    import plotly.express as px

    grid = head_grid(df, n_layers, n_heads, column, agg)
    runs = int(df.groupby(["layer", "head"]).size().max())
    counts = agg == "sum" and df[column].dtype == bool
    scale = dict(color_continuous_scale="Viridis", zmin=0, zmax=runs) if counts else \
        dict(color_continuous_scale="RdBu_r", color_continuous_midpoint=0)
    return px.imshow(grid, aspect="auto", labels={"x": "head", "y": "layer", "color": f"{agg} {column}"},
                     title=f"value edit: {agg} of {column} per head ({runs} case x coeff runs each)", **scale)

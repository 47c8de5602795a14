"""Temporal facts (answers that change with the year) with time-invariant controls, and the
candidate-probability evaluation of Park et al. 2025.

Each item: a prompt with a year, its answer, a corrupted prompt (another year, same token count)
with a different answer, and the candidate answers of the relation. Invariant controls have the
same form but the other year gives the same answer. Evaluation: for each item, the summed log-prob
of every candidate's tokens after the prompt, softmax over candidates, probability of the true
answer; the mean over items is the accuracy measure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from headscope.probe import HeadscopeModel
from headscope.probe.errors import InputError

FACTS_FILE = Path(__file__).parent / "data" / "temporal_facts.jsonl"
_FIELDS = ("kind", "relation", "prompt", "answer", "corrupt_prompt", "corrupt_answer", "year", "corrupt_year",
           "candidates")


@dataclass(frozen=True)
class TemporalFact:
    kind: str  # "temporal" or "invariant"
    relation: str
    prompt: str
    answer: str
    corrupt_prompt: str
    corrupt_answer: str
    year: str
    corrupt_year: str
    candidates: tuple[str, ...]


def load_facts(path=None, kind: str | None = None) -> list[TemporalFact]:
    """Facts from a jsonl file (default: circuits/data/temporal_facts.jsonl), optionally one kind."""
    path = Path(path) if path is not None else FACTS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"cannot read temporal facts file {path}: {exc}") from exc
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            missing = [f for f in _FIELDS if f not in d]
            if missing:
                raise InputError(f"missing fields {missing}")
            fact = TemporalFact(**{f: d[f] for f in _FIELDS[:-1]}, candidates=tuple(d["candidates"]))
        except (json.JSONDecodeError, InputError, TypeError) as exc:
            raise InputError(f"{path}:{n}: not a temporal fact ({exc}); fields: {', '.join(_FIELDS)}.") from exc
        if fact.kind not in ("temporal", "invariant"):
            raise InputError(f"{path}:{n}: kind must be 'temporal' or 'invariant', got {fact.kind!r}.")
        if fact.answer not in fact.candidates or fact.corrupt_answer not in fact.candidates:
            raise InputError(f"{path}:{n}: the answer and corrupt answer must be among the candidates.")
        if fact.year not in fact.prompt or fact.corrupt_year not in fact.corrupt_prompt:
            raise InputError(f"{path}:{n}: the prompt must contain its year.")
        out.append(fact)
    if not out:
        raise InputError(f"{path} holds no temporal facts.")
    return [f for f in out if kind is None or f.kind == kind]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(model: HeadscopeModel, text: str) -> list[int]:
    """Prompt token ids with the BOS token first (the model's documents start with it)."""
    ids = _ids(model.tokenizer, text)
    bos = model.tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + ids


def answer_ids(model: HeadscopeModel, answer: str) -> list[int]:
    """Token ids of an answer as it follows the prompt (one leading space)."""
    return _ids(model.tokenizer, " " + answer)


def phrase_positions(model: HeadscopeModel, text: str, phrase: str) -> list[int]:
    """Token positions (in prompt_ids(text)) that cover the characters of the first occurrence of
    `phrase` (a year, a name) in text."""
    if not phrase or phrase not in text:
        raise InputError(f"{phrase!r} does not occur in {text!r}.")
    enc = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    a = text.index(phrase)
    b = a + len(phrase)
    shift = 1 if model.tokenizer.bos_token_id is not None else 0
    return [t + shift for t, (s, e) in enumerate(enc["offset_mapping"]) if e > a and s < b and e > s]


def candidate_logprobs(model: HeadscopeModel, facts: list[TemporalFact], use_corrupt: bool = False,
                       batch_size: int = 64) -> list[torch.Tensor]:
    """For each fact, [n_candidates] summed log-probs of each candidate's tokens after the prompt."""
    seqs, owners = [], []
    for i, f in enumerate(facts):
        p = prompt_ids(model, f.corrupt_prompt if use_corrupt else f.prompt)
        for c in f.candidates:
            a = answer_ids(model, c)
            seqs.append((p + a, len(p), len(a)))
            owners.append(i)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    scores = torch.empty(len(seqs))
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s: s + batch_size]
        S = max(len(x[0]) for x in chunk)
        ids = torch.full((len(chunk), S), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), S, dtype=torch.long)
        for r, (x, _, _) in enumerate(chunk):
            ids[r, : len(x)] = torch.tensor(x)
            mask[r, : len(x)] = 1
        first = min(n_p for _, n_p, _ in chunk) - 1  # no logits before the earliest answer position
        with torch.no_grad():
            logits = model.hf(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                              use_cache=False, logits_to_keep=S - first).logits.float()
        logp = torch.log_softmax(logits, -1)
        for r, (x, n_p, n_a) in enumerate(chunk):
            pos = torch.arange(n_p - 1, n_p - 1 + n_a) - first
            scores[s + r] = logp[r, pos, torch.tensor(x[n_p:])].sum().cpu()
    out, k = [], 0
    for f in facts:
        out.append(scores[k: k + len(f.candidates)])
        k += len(f.candidates)
    return out


def candidate_eval(model: HeadscopeModel, facts: list[TemporalFact], use_corrupt: bool = False,
                   batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """([n_facts] probability of the true answer under a softmax over the candidates' summed log-probs,
    [n_facts] bool whether the true answer has the highest summed log-prob)."""
    if not facts:
        raise InputError("candidate evaluation: no facts given.")
    probs, correct = [], []
    for f, lp in zip(facts, candidate_logprobs(model, facts, use_corrupt, batch_size)):
        i = f.candidates.index(f.corrupt_answer if use_corrupt else f.answer)
        probs.append(torch.softmax(lp, 0)[i])
        correct.append(int(lp.argmax()) == i)
    return torch.stack(probs), torch.tensor(correct)


def candidate_probability(model: HeadscopeModel, facts: list[TemporalFact], use_corrupt: bool = False,
                          batch_size: int = 64) -> torch.Tensor:
    """[n_facts] probability of the true answer (Park et al.'s evaluation; its mean is the score)."""
    return candidate_eval(model, facts, use_corrupt, batch_size)[0]

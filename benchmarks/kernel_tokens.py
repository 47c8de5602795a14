"""Text-like token ids for the GPU kernel benchmarks: Zipf-distributed over a 50k vocabulary.

Random uniform ids almost never repeat, which makes match / next_match trivially sparse; a
sequence of one token makes them dense. Natural text sits between: word frequencies follow
Zipf's law, p(rank r) ~ 1 / r^a with a ~ 1. With a = 1 over 50,000 ids the most frequent id is
8.8% of tokens and the chance that two positions hold the same id is sum p^2 = 1.3%, about what
BPE-tokenised English shows (the, comma, full stop at a few % each).
"""

from __future__ import annotations

import torch

VOCAB = 50_000
EXPONENT = 1.0


def zipf_ids(B: int, S: int, gen: torch.Generator, device, vocab: int = VOCAB, a: float = EXPONENT) -> torch.Tensor:
    """[B, S] int64 ids, id r - 1 drawn with probability proportional to 1 / r^a (ids in rank order)."""
    w = torch.arange(1, vocab + 1, device=device, dtype=torch.float64).pow(-a)
    return torch.multinomial((w / w.sum()).float(), B * S, replacement=True, generator=gen).reshape(B, S)


def repeat_fraction(ids: torch.Tensor) -> float:
    """Fraction of ordered position pairs (i != j) of one sequence holding the same id (averaged over rows)."""
    fr = []
    for row in ids:
        c = torch.bincount(row).double()
        n = row.numel()
        fr.append(((c * (c - 1)).sum() / (n * (n - 1))).item())
    return sum(fr) / len(fr)

"""Prompt sets for the head detectors: seeded, tokenizer-aware, returned as token tensors.

Every detector imports its prompts from here:

- `natural_text()`: the embedded English corpus (`circuits/data/natural_text.txt`, ~50 original
  paragraphs, no download) as a list of paragraphs.
- `load_prompts(path)`: user prompts from a .txt file (paragraphs separated by blank lines, or one
  prompt per line when the file has no blank lines), a .jsonl file (one {"text": ...} per line) or
  a local HF dataset folder.
- `text_windows(tokenizer, texts, seq_len, n, seed, bos)`: [n, seq_len] token windows cut from the
  texts joined into one token stream.
- `repeated_random_tokens(tokenizer, n, period, repeats, seed, bos)`: `[BOS] r r ...` prompts of
  random tokens drawn from `token_pool(tokenizer)`.
- `bos_id(tokenizer)`: the id we put at position 0 (None when the tokenizer declares no BOS).

All functions take the tokenizer (not the model) and return int64 CPU tensors; same seed, same
tokens. Errors are `InputError` with a message that says what to change.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from headscope.probe.errors import InputError

DATA_DIR = Path(__file__).parent / "data"
NATURAL_TEXT = DATA_DIR / "natural_text.txt"

# Tokens of the random-token prompts avoid the corpus' most frequent tokens (they carry bigram
# statistics a model can predict without induction) and the last merges of the vocabulary (BPE
# assigns ids in merge order, so the highest ids are the rarest strings of the tokenizer's
# training corpus, whose embeddings are poorly trained).
N_FREQUENT = 100
RARE_FRACTION = 0.1


def natural_text() -> list[str]:
    """The embedded corpus: ~50 paragraphs of plain English prose written for headscope."""
    return _paragraphs(NATURAL_TEXT.read_text(encoding="utf-8"))


def _paragraphs(text: str) -> list[str]:
    blocks = [b.strip() for b in text.replace("\r\n", "\n").split("\n\n")]
    return [" ".join(b.split("\n")) for b in blocks if b]


def load_prompts(path) -> list[str]:
    """Prompts from a user file.

    .txt: paragraphs separated by blank lines; a file without blank lines gives one prompt per
    non-empty line. .jsonl: one JSON object per line with a non-empty string "text". A directory:
    a local HF dataset saved with `save_to_disk` (its "text" column; the "train" split of a
    DatasetDict), read as the SAE corpus reader reads it.
    Raises InputError for a missing, unreadable, empty or malformed file.
    """
    p = Path(path)
    if p.is_dir():
        from headscope.sae.corpus import CorpusError, load_texts

        try:
            prompts = [t.strip() for t in load_texts(p) if t.strip()]
        except CorpusError as exc:
            raise InputError(str(exc)) from None
        if not prompts:
            raise InputError(f"dataset {p} holds no non-empty texts.")
        return prompts
    if not p.is_file():
        raise InputError(f"prompt file {p} does not exist (or is not a file).")
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read prompt file {p}: {exc}. It must be UTF-8 text (.txt or .jsonl).") from exc
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{p}, line {n}: not valid JSON ({exc.msg}); each line must be {{\"text\": ...}}.") from exc
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"{p}, line {n}: needs a non-empty string field \"text\".")
            prompts.append(text.strip())
    elif suffix == ".txt":
        text = raw.replace("\r\n", "\n")
        has_blank = any(not l.strip() for l in text.strip().split("\n"))
        prompts = _paragraphs(text) if has_blank else [l.strip() for l in text.split("\n") if l.strip()]
    else:
        raise InputError(f"prompt file {p}: unsupported extension {p.suffix!r}; use .txt or .jsonl.")
    if not prompts:
        raise InputError(f"prompt file {p} holds no prompts (it is empty or only whitespace).")
    return prompts


def bos_id(tokenizer) -> int | None:
    """The token placed at position 0: the tokenizer's declared BOS (SmolLM2: <|im_start|>, id 1)."""
    return tokenizer.bos_token_id


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def text_windows(tokenizer, texts: list[str] | None = None, seq_len: int = 64, n: int = 16, seed: int = 0,
                 bos: bool = True) -> tuple[torch.Tensor, bool]:
    """Cut n windows of seq_len tokens from texts joined (with "\\n\\n") into one token stream.

    Window starts are drawn uniformly (seeded) from the stream; with `bos` the tokenizer's BOS
    takes position 0 and the window holds seq_len - 1 text tokens. Windows never span the end of
    the stream unless the stream is shorter than a window: then it is repeated cyclically.
    Returns (tokens [n, seq_len] int64, repeated) where `repeated` says whether text had to be
    repeated inside a window (which creates duplicate/induction structure in natural text).
    """
    texts = natural_text() if texts is None else list(texts)
    if not texts:
        raise InputError("no texts to cut windows from.")
    if seq_len < 2:
        raise InputError(f"seq_len must be at least 2, got {seq_len}.")
    first = bos_id(tokenizer) if bos else None
    width = seq_len - (first is not None)
    stream = _stream(tokenizer, tuple(texts))
    repeated = len(stream) < width
    if repeated:
        stream = stream.repeat(width // len(stream) + 1)
    starts = torch.randint(0, len(stream) - width + 1, (n,), generator=_generator(seed))
    out = torch.stack([stream[s:s + width] for s in starts.tolist()])
    if first is not None:
        out = torch.cat([torch.full((n, 1), first, dtype=torch.long), out], dim=1)
    return out, repeated


def _stream(tokenizer, texts: tuple[str, ...]) -> torch.Tensor:
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError("the texts tokenize to nothing.")
    return torch.tensor(ids, dtype=torch.long)


@lru_cache(maxsize=8)
def _pool_cached(tokenizer, n_frequent: int, rare_fraction: float) -> torch.Tensor:
    vocab = len(tokenizer)
    keep = torch.ones(vocab, dtype=torch.bool)
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    keep[[i for i in special if i < vocab]] = False
    # Byte fragments, whitespace and punctuation runs decode to no letter or digit.
    pieces = tokenizer.convert_ids_to_tokens(list(range(vocab)))
    for i, piece in enumerate(pieces):
        text = tokenizer.convert_tokens_to_string([piece]) if piece is not None else ""
        if "\ufffd" in text or not any(c.isalnum() for c in text):
            keep[i] = False
    counts = torch.bincount(_stream(tokenizer, tuple(natural_text())), minlength=vocab)[:vocab]
    keep[counts.argsort(descending=True)[:n_frequent]] = False
    keep[int(vocab * (1 - rare_fraction)):] = False
    return keep.nonzero().squeeze(1)


def token_pool(tokenizer, n_frequent: int = N_FREQUENT, rare_fraction: float = RARE_FRACTION) -> torch.Tensor:
    """Token ids random-token prompts draw from (sorted int64).

    Excluded: special and added tokens; tokens that decode to no letter or digit (byte fragments,
    whitespace, punctuation); the `n_frequent` most frequent tokens of the embedded corpus; the
    last `rare_fraction` of the id range (in BPE vocabularies ids follow merge order, so these are
    the rarest merges). SmolLM2: 49152 ids -> about 40k kept.
    """
    pool = _pool_cached(tokenizer, int(n_frequent), float(rare_fraction))
    if len(pool) < 16:
        raise InputError(f"only {len(pool)} tokens of this tokenizer are usable for random-token prompts.")
    return pool


def repeated_random_tokens(tokenizer, n: int, period: int, repeats: int = 2, seed: int = 0,
                           bos: bool = True) -> torch.Tensor:
    """[n, (bos) + period * repeats] int64: `[BOS] r r ...`, r = `period` distinct random tokens.

    Tokens within r are distinct (so each token of a later copy has exactly one earlier
    occurrence per copy: offset `period` is the duplicate, offset `period - 1` the induction target).
    """
    if period < 2:
        raise InputError(f"the period of repeated random tokens must be >= 2, got {period}.")
    if repeats < 2:
        raise InputError(f"repeated random tokens need at least 2 copies, got {repeats}.")
    pool = token_pool(tokenizer)
    if period > len(pool):
        raise InputError(f"period {period} exceeds the {len(pool)} usable tokens.")
    g = _generator(seed)
    rows = torch.stack([pool[torch.randperm(len(pool), generator=g)[:period]] for _ in range(n)])
    out = rows.repeat(1, repeats)
    first = bos_id(tokenizer) if bos else None
    if first is not None:
        out = torch.cat([torch.full((n, 1), first, dtype=torch.long), out], dim=1)
    return out

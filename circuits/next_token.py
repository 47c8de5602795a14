"""Next-token read-outs of prompt sets: the log-probabilities at each prompt's last real token."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from headscope.probe import HeadscopeModel
from headscope.probe.errors import InputError

DATA = Path(__file__).parent / "data"


def load_jsonl(name_or_path) -> list[dict]:
    """Rows of a JSON-lines prompt set: a file name under circuits/data/ or any path."""
    path = Path(name_or_path)
    if not path.exists():
        path = DATA / str(name_or_path)
    if not path.exists():
        raise InputError(f"prompt set {name_or_path!r} not found (looked in {DATA} and the given path).")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_token_logprobs(model: HeadscopeModel, prompts: list[str], *, batch_size: int = 32) -> torch.Tensor:
    """Log-probabilities [N, vocab] of the next token after each prompt (BOS prepended; right padding
    so positions are those of the unpadded prompt)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = model.tokenize(prompts[i:i + batch_size], prepend_bos=True, padding_side="right")
        last = batch["attention_mask"].sum(1) - 1
        with torch.no_grad():
            logits = model.hf(**batch, use_cache=False).logits
        out.append(torch.log_softmax(logits[torch.arange(len(last)), last].float(), -1).cpu())
    return torch.cat(out)


def first_token_id(model: HeadscopeModel, text: str) -> int:
    """Id of the first token of `text` as it would continue a prompt (no BOS)."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"{text!r} has no tokens.")
    return ids[0]

"""Attention patterns of each kind's top heads on one short prompt, for the report's thumbnails."""

from __future__ import annotations

import torch

from headscope.circuits.scores import DetectorResult, top_heads
from headscope.probe import HeadscopeModel

from .rank_output import scored
from .report import Thumbnail

# ~24 tokens with a repeated phrase, so previous-token, duplicate and induction heads show their
# stripes, and a first token for sink heads.
THUMBNAIL_PROMPT = "The cat sat on the mat by the door. The dog ran home. The cat sat on the mat by the"


def record_thumbnails(model: HeadscopeModel, results: dict[str, DetectorResult], n: int = 4,
                      prompt: str = THUMBNAIL_PROMPT) -> dict[str, list[Thumbnail]]:
    """Full patterns [S, S] of the top-n heads of every kind, from one recorded forward pass.

    Only the layers and heads shown are recorded (the recorder keeps layers x heads of the request).
    """
    if model.tokenizer is None:
        return {}
    # heads without a score (NaN) are no kind's top heads
    chosen = {kind: top_heads(scored(r.scores), n) for kind, r in results.items()}
    pairs = {p for heads in chosen.values() for p in heads}
    if not pairs:
        return {}
    batch = model.tokenize([prompt], prepend_bos=True)
    spec = {"layers": sorted({l for l, _ in pairs}), "heads": sorted({h for _, h in pairs})}
    _, rec = model.run_recorded(batch["input_ids"], batch["attention_mask"], patterns=spec)
    ids = batch["input_ids"][0].tolist()
    tokens = [t.replace("Ġ", " ").replace("Ċ", "\\n") for t in model.tokenizer.convert_ids_to_tokens(ids)]
    return {kind: [Thumbnail(l, h, tokens, rec.pattern(l, h)[0].to(torch.float32).cpu().numpy()) for l, h in heads]
            for kind, heads in chosen.items()}

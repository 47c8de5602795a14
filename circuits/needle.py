"""Needle-in-a-haystack prompts (Wu et al. 2024) and ROUGE-1 recall.

A trial hides one needle sentence in natural text of a given token length, at a sentence boundary
near the asked depth (0 = start of the context, 1 = end), then asks a question about it after the
context, through the model's chat template where it has one. The needle's answer span is the token
positions of the answer inside the final prompt: retrieval heads are the heads whose attention
argmax lands there on the token being copied.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
import torch

from headscope.probe.errors import InputError

from .prompts import natural_text

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Needle:
    """A fact to hide and the question that retrieves it. `answer` is a substring of `text` (by
    default the whole needle, as in Wu et al.: the model should copy the needle back)."""

    text: str
    question: str
    answer: str | None = None

    @property
    def answer_text(self) -> str:
        return self.answer if self.answer is not None else self.text

    def __post_init__(self):
        if not self.text.strip() or not self.question.strip():
            raise InputError("a needle needs non-empty text and question.")
        if self.answer is not None and self.answer not in self.text:
            raise InputError(f"needle answer {self.answer!r} is not a substring of its text {self.text!r}.")


# Written for this project; none of these facts occurs in the haystack, so only the needle can answer.
NEEDLES = (
    Needle("The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
           "What is the best thing to do in San Francisco?"),
    Needle("The secret ingredient in Grandma Rosa's soup is a spoonful of smoked paprika.",
           "What is the secret ingredient in Grandma Rosa's soup?"),
    Needle("The lighthouse keeper's cat is named Captain Biscuit.",
           "What is the name of the lighthouse keeper's cat?"),
    Needle("The password to the old library vault is purple elephant seven.",
           "What is the password to the old library vault?"),
    Needle("The kite festival in Brightwater is held on the first Sunday of October.",
           "When is the kite festival in Brightwater held?"),
    Needle("Professor Linden keeps her spare keys inside a blue teapot on the kitchen shelf.",
           "Where does Professor Linden keep her spare keys?"),
)
INSTRUCTION = "Answer the question using the document above. Repeat the sentence from the document that answers it."


@dataclass
class NeedlePrompt:
    """One trial's prompt.

    input_ids: [S] token ids of the whole prompt (chat template applied).
    answer_span: (start, end) token positions [start, end) of the answer inside input_ids.
    needle_chars: (start, end) character range of the needle inside `text`.
    """

    needle: Needle
    context_tokens: int
    depth: float
    text: str
    input_ids: torch.Tensor
    answer_span: tuple[int, int]
    needle_chars: tuple[int, int]
    insert_depth: float  # where the needle actually went, as a fraction of the haystack tokens


def haystack_sentences(text: str | None = None) -> list[str]:
    """Natural text split into sentences (default haystack: the embedded corpus, prompts.natural_text)."""
    if text is None:
        text = " ".join(natural_text())
    sentences = [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]
    if len(sentences) < 2:
        raise InputError("the haystack text needs at least two sentences.")
    return sentences


def _token_len(tokenizer, s: str) -> int:
    return len(tokenizer(s, add_special_tokens=False)["input_ids"])


def build_needle_prompt(tokenizer, needle: Needle, context_tokens: int, depth: float,
                        sentences: list[str] | None = None, *, use_chat_template: bool = True) -> NeedlePrompt:
    """A haystack of about `context_tokens` tokens (sentences cycled as needed) with `needle` inserted
    at the sentence boundary closest to `depth` x the haystack's token length, then the question.

    The needle counts toward context_tokens; the chat template and question come on top.
    """
    if not 0.0 <= depth <= 1.0:
        raise InputError(f"needle depth must be in [0, 1], got {depth}.")
    sentences = sentences or haystack_sentences()
    budget = context_tokens - _token_len(tokenizer, needle.text)
    if budget < 16:
        raise InputError(f"context of {context_tokens} tokens is too short for the needle "
                         f"({context_tokens - budget} tokens); use at least {context_tokens - budget + 16}.")
    chosen, lengths, total, i = [], [], 0, 0
    while True:  # the haystack repeats when the text is shorter than the context asked for
        s = sentences[i % len(sentences)]
        n = _token_len(tokenizer, " " + s)
        if total + n > budget and chosen:
            break
        chosen.append(s)
        lengths.append(n)
        total += n
        i += 1
    cum = [0]
    for n in lengths:
        cum.append(cum[-1] + n)
    cut = min(range(len(cum)), key=lambda j: abs(cum[j] - depth * total))
    parts = chosen[:cut] + [needle.text] + chosen[cut:]
    context = " ".join(parts)
    prefix = " ".join(chosen[:cut]) + (" " if cut else "")
    needle_chars = (len(prefix), len(prefix) + len(needle.text))
    user = f"{context}\n\n{INSTRUCTION}\nQuestion: {needle.question}"
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = f"{user}\nAnswer:"
    ctx_at = text.index(context)
    a0 = needle_chars[0] + needle.text.index(needle.answer_text) + ctx_at
    a1 = a0 + len(needle.answer_text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    span = [t for t, (s, e) in enumerate(enc["offset_mapping"]) if e > a0 and s < a1 and e > s]
    if not span:
        raise InputError("the needle's answer did not map onto any prompt token.")
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
        span = [t + 1 for t in span]
    return NeedlePrompt(needle=needle, context_tokens=context_tokens, depth=depth, text=text,
                        input_ids=torch.tensor(ids, dtype=torch.long), answer_span=(span[0], span[-1] + 1),
                        needle_chars=(needle_chars[0] + ctx_at, needle_chars[1] + ctx_at),
                        insert_depth=cum[cut] / total if total else 0.0)


def rouge1_recall(reference: str, hypothesis: str) -> float:
    """ROUGE-1 recall: clipped unigram overlap / reference unigram count, on lowercase alphanumeric
    words (rouge_score's tokenization, without its optional stemmer)."""
    ref = Counter(_WORD.findall(reference.lower()))
    if not ref:
        raise InputError("ROUGE-1 recall needs a reference with at least one word.")
    hyp = Counter(_WORD.findall(hypothesis.lower()))
    return sum(min(c, hyp[w]) for w, c in ref.items()) / sum(ref.values())

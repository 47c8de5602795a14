"""Text for SAE training: user corpora (txt, jsonl, a local HF dataset dir) and an embedded default.

The embedded default needs no download. It is *procedural*: 121 hand-written English sentences
(`sae/data/sentences.txt`) and ~40 sentence templates with slot lists, recombined by a seeded
generator into paragraphs of 4-9 sentences. Limits, said plainly: a small vocabulary (~2k word
types) and recurring sentence frames, so it is far less diverse than web text; activations on it
are easier to reconstruct than on real data, and SAE latents trained on it will partly encode its
templates. Use a real corpus (`--corpus FILE`) for research results.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Iterable, Iterator

import torch

from headscope.kernels.errors import HeadscopeError

_DATA = Path(__file__).with_name("data")


class CorpusError(HeadscopeError, ValueError):
    """A corpus that is missing, empty, or not text."""


# ---- user corpora --------------------------------------------------------------------------
def load_texts(path: str | Path | None = None, *, text_field: str = "text") -> list[str]:
    """Documents of a corpus. path None -> `default_corpus()` is the caller's job; here:
    .txt (documents separated by blank lines), .jsonl (one JSON object per line with `text_field`),
    or a directory saved by `datasets.Dataset.save_to_disk` (needs the optional `datasets`)."""
    p = Path(path)
    if not p.exists():
        raise CorpusError(f"corpus {p} does not exist.")
    if p.is_dir():
        docs = _load_hf_dir(p, text_field)
    else:
        raw = p.read_bytes()
        if b"\x00" in raw[:65536]:
            raise CorpusError(f"corpus {p} is not text (it contains NUL bytes); give a .txt or .jsonl file.")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(f"corpus {p} is not UTF-8 text ({e}).") from None
        if p.suffix == ".jsonl":
            docs = []
            for i, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{p}:{i}: not valid JSON ({e.msg}).") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                    raise CorpusError(f"{p}:{i}: expected an object with a string field {text_field!r}.")
                docs.append(obj[text_field])
        else:
            docs = [d for d in text.split("\n\n")]
    docs = [d.strip() for d in docs if d and d.strip()]
    if not docs:
        raise CorpusError(f"corpus {p} is empty: it holds no non-blank text.")
    return docs


def _load_hf_dir(p: Path, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"{p} is a directory: reading a saved HF dataset needs `pip install datasets`.") from None
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # datasets raises several types for a folder it cannot read
        raise CorpusError(f"{p} is not a dataset saved with save_to_disk: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        # Its "train" split, or its only one: a first split in name order would be "test" over "train".
        if "train" not in ds and len(ds) != 1:
            raise CorpusError(f"dataset {p} has the splits {sorted(ds)} and none is named 'train': save the "
                              "split to read (ds['name'].save_to_disk(...)) and pass its folder.")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if text_field not in ds.column_names:
        raise CorpusError(f"dataset {p} has no column {text_field!r} (columns: {ds.column_names}).")
    return [t for t in ds[text_field] if isinstance(t, str)]


# ---- embedded default ----------------------------------------------------------------------
_SLOTS = {
    "name": "Anna Ben Clara David Elena Farid Grace Hugo Ines James Kofi Lena Marco Nadia Oscar Priya Quentin Rosa "
            "Samuel Tara Umar Vera William Yusuf Zoe Mei Pavel Sofia Tomas Ruth".split(),
    "city": "Lisbon Oslo Cairo Lima Dublin Krakow Nairobi Porto Hanoi Quebec Bergen Seville Tartu Leeds Osaka "
            "Perth Bremen Ghent Malaga Turin".split(),
    "thing": ("lamp;bicycle;violin;kettle;map;coat;basket;ladder;camera;clock;notebook;boat;radio;chair;"
              "wheelbarrow;telescope;piano;suitcase;blanket;compass").split(";"),
    "food": "bread soup rice apples cheese fish beans honey tea coffee oranges potatoes noodles pears".split(),
    "job": ("teacher;nurse;carpenter;engineer;farmer;baker;pilot;librarian;doctor;painter;fisherman;"
            "journalist;gardener;tailor;mechanic;student").split(";"),
    "place": ("station;market;harbour;library;bakery;museum;hospital;school;bridge;garden;church;"
              "factory;post office;town hall;park").split(";"),
    "adj": "old small heavy bright quiet broken new wooden red narrow warm cold strange expensive cheap".split(),
    "day": "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split(),
    "month": "January February March April May June July August September October November December".split(),
    "animal": "dog cat horse goat fox owl sheep rabbit crow deer".split(),
    "verb_past": "found repaired sold borrowed painted lost carried cleaned bought opened".split(),
}
_TEMPLATES = [
    "{name} worked as a {job} in {city} for {n} years before moving to the coast.",
    "On {day} morning {name} {verb_past} a {adj} {thing} near the {place}.",
    "The {place} in {city} was closed for repairs from {month} until {month2}.",
    "{name} asked {name2} whether the {thing} was still in the cellar.",
    "Every {day}, the {job} bought {food} and {food2} at the market in {city}.",
    "In {year}, the population of {city} was about {n} thousand people.",
    "{name} said that the {adj} {thing} belonged to her grandfather, who had been a {job}.",
    "The {animal} ran across the road and disappeared behind the {place}.",
    "It takes {n} minutes to walk from the {place} to the {place2}.",
    "{name} and {name2} met at the {place} on {day} to talk about the plan.",
    "The price of {food} rose by {n} percent between {month} and {month2}.",
    "\"Have you seen my {thing}?\" {name} asked. \"I left it by the {place}.\"",
    "After {n} hours of searching, the {job} finally {verb_past} the missing {thing}.",
    "The train from {city} to {city2} leaves at {hour} o'clock and arrives {n} hours later.",
    "{name} has {n} brothers, and all of them work as {job}s in {city}.",
    "The report published in {month} {year} described the {place} as {adj} and badly lit.",
    "When {name} was a child, she kept a {animal} in the garden behind the house.",
    "A {job} from {city} {verb_past} the {adj} {thing} for {n} euros.",
    "The {place} opens at {hour} and closes at {hour2} every day except {day}.",
    "{name} ate {food} for breakfast, {food2} for lunch and nothing at all for dinner.",
    "If it rains on {day}, the meeting at the {place} will move to {day2}.",
    "The first {place} in {city} was built in {year} by a {job} named {name}.",
    "Nobody knew why the {animal} had followed {name} all the way to the {place}.",
    "{n} people came to the {place} to hear {name} speak about life in {city}.",
    "{name} wrote: \"The weather in {city} is {adj} this {month}, and the {food} is excellent.\"",
    "The {job} explained that the {thing} had to be {verb_past} before {day}.",
    "Between {year} and {year2}, the {place} changed owners {n} times.",
    "{name} put the {thing} on the table, next to a bowl of {food}.",
    "The road between {city} and {city2} is {n} kilometres long and crosses two rivers.",
    "Ask the {job} at the {place}; she knows everyone in {city}.",
    "It was the {adj}est winter anyone in {city} could remember, and the {place} stayed shut for weeks.",
    "{name} counted {n} {animal}s in the field behind the {place}.",
    "The letter from {name2} reached {name} in {city} on the {n}th of {month}.",
    "Most {job}s in {city} start work before {hour} in the morning.",
    "The {thing} cost {n} pounds in {year}; today the same one costs three times as much.",
    "{name} learned to cook {food} from a {job} she met in {city}.",
    "Under the {adj} bridge near the {place}, {name} {verb_past} a box of old photographs.",
    "The museum in {city} keeps a {thing} that once belonged to a famous {job}.",
    "{name} missed the bus on {day} and walked {n} kilometres to the {place}.",
    "By {month} the {food} in the shops of {city} had become too expensive for most families.",
]


def _fill(template: str, rng: random.Random) -> str:
    vals = {}
    for key, words in _SLOTS.items():
        a, b = rng.sample(words, 2)
        vals[key], vals[key + "2"] = a, b
    vals["n"] = rng.choice([2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 25, 30, 40, 50, 60, 75, 90, 120])
    y = rng.randint(1780, 2020)
    vals["year"], vals["year2"] = y, y + rng.randint(2, 60)
    h = rng.randint(5, 11)
    vals["hour"], vals["hour2"] = h, h + rng.randint(6, 10)
    # "a" before a vowel-initial slot word reads as "an"
    return re.sub(r"\b([Aa]) ([aeiouAEIOU])", r"\1n \2", template.format(**vals))


def default_corpus(n_docs: int | None = None, seed: int = 0) -> Iterator[str]:
    """The embedded procedural corpus (see module docstring): deterministic for a seed; endless
    when n_docs is None. Each document is one paragraph of 4-9 sentences (~90-220 tokens)."""
    sentences = [s.strip() for s in (_DATA / "sentences.txt").read_text(encoding="utf-8").splitlines() if s.strip()]
    rng = random.Random(seed)
    i = 0
    while n_docs is None or i < n_docs:
        parts = []
        for _ in range(rng.randint(4, 9)):
            parts.append(rng.choice(sentences) if rng.random() < 0.45 else _fill(rng.choice(_TEMPLATES), rng))
        yield " ".join(parts)
        i += 1


HELD_OUT_EVERY = 20  # about 1 document in 20 of a user corpus is kept out of training for `sae eval`


def split_documents(docs: list[str]) -> tuple[list[str], list[str]]:
    """(train, held_out) of a user corpus, about 1 in HELD_OUT_EVERY documents held out.

    The split hashes each document's text, so it does not depend on file order and a document that
    appears twice lands on one side only (a duplicate on both sides would make the held-out numbers
    a training score). A corpus of at least two distinct documents holds out at least one; a corpus
    of one distinct document cannot be split: held_out is then empty.
    """
    def h(d: str) -> int:
        return int.from_bytes(hashlib.blake2b(d.encode("utf-8"), digest_size=8).digest(), "big")

    distinct = set(docs)
    if len(distinct) < 2:
        return docs, []
    held_set = {d for d in distinct if h(d) % HELD_OUT_EVERY == 0}
    if not held_set or held_set == distinct:  # small corpora: hold out the document with the smallest hash
        held_set = {min(distinct, key=h)}
    return [d for d in docs if d not in held_set], [d for d in docs if d in held_set]


def corpus_texts(path: str | Path | None = None, *, seed: int = 0, text_field: str = "text",
                 split: str = "all") -> Iterator[str]:
    """Endless document stream: the user corpus cycled (epoch e shuffled with seed + e), or the
    embedded default when path is None. The corpus is read, and bad input refused, at the call, not
    at the first document.

    split: "all", or "train" / "held_out" (`split_documents`) of a user corpus: `sae train` reads
    "train" and `sae eval` "held_out". The embedded default is procedural and has no held-out part
    (a different seed draws different paragraphs from the same sentences and templates), so a split
    other than "all" is refused for it."""
    if split not in ("all", "train", "held_out"):
        raise CorpusError(f"split must be 'all', 'train' or 'held_out', not {split!r}.")
    if path is None:
        if split != "all":
            raise CorpusError("the embedded corpus has no held-out split; pass split='all' (and a different seed).")
        return default_corpus(seed=seed)
    docs = load_texts(path, text_field=text_field)
    if split != "all":
        train, held = split_documents(docs)
        if split == "held_out" and not held:
            raise CorpusError(f"corpus {path} has a single distinct document: nothing can be held out of training; "
                              "evaluate on all of it (split='all', `sae eval --split all`).")
        docs = train if split == "train" else held
    return _cycle(docs, seed)


def _cycle(docs: list[str], seed: int) -> Iterator[str]:
    epoch = 0
    while True:
        order = list(range(len(docs)))
        random.Random(seed + epoch).shuffle(order)
        for j in order:
            yield docs[j]
        epoch += 1


def packed_batches(tokenizer, texts: Iterable[str], *, seq_len: int, batch_size: int,
                   bos_id: int | None) -> Iterator[torch.Tensor]:
    """Token rows [batch_size, seq_len] packed from consecutive documents (separated by EOS), each
    row starting with `bos_id` when given (SAELens' prepend_bos convention)."""
    if seq_len < 2:
        raise CorpusError("seq_len must be at least 2.")
    body = seq_len - (1 if bos_id is not None else 0)
    sep = tokenizer.eos_token_id
    buf: list[int] = []
    rows: list[list[int]] = []
    n_tokens_seen = 0
    for doc in texts:
        # No special tokens per document: a BOS-adding tokenizer (Llama, Gemma) would put a BOS in
        # the middle of rows, where the model never sees one; each row gets its own BOS below.
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        n_tokens_seen += len(ids)
        buf.extend(ids)
        if sep is not None:
            buf.append(sep)
        while len(buf) >= body:
            row, buf = buf[:body], buf[body:]
            rows.append(([bos_id] if bos_id is not None else []) + row)
            if len(rows) == batch_size:
                yield torch.tensor(rows, dtype=torch.long)
                rows = []
    if n_tokens_seen == 0:
        raise CorpusError("the corpus produced no tokens.")

"""Prompt sets: seeded, tokenizer-aware, and clear about bad prompt files."""

import json

import pytest
import torch

from headscope.circuits import prompts as P
from headscope.kernels.errors import HeadscopeError
from headscope.probe.errors import InputError


@pytest.fixture(scope="module")
def tok(model):
    return model.tokenizer


def test_embedded_corpus_is_varied_prose():
    paras = P.natural_text()
    assert 40 <= len(paras) <= 80
    assert len(set(paras)) == len(paras)
    assert all(len(p.split()) >= 40 for p in paras)


def test_repeated_random_tokens_structure_and_seed(tok):
    x = P.repeated_random_tokens(tok, 5, 12, repeats=3, seed=7)
    assert x.shape == (5, 1 + 36) and x.dtype == torch.long
    assert (x[:, 0] == tok.bos_token_id).all()
    r = x[:, 1:13]
    assert torch.equal(x[:, 13:25], r) and torch.equal(x[:, 25:], r)
    assert all(len(set(row.tolist())) == 12 for row in r)  # distinct within a copy
    assert torch.equal(x, P.repeated_random_tokens(tok, 5, 12, repeats=3, seed=7))
    assert not torch.equal(x, P.repeated_random_tokens(tok, 5, 12, repeats=3, seed=8))
    nobos = P.repeated_random_tokens(tok, 2, 6, seed=1, bos=False)
    assert nobos.shape == (2, 12) and (nobos != tok.bos_token_id).all()


def test_token_pool_excludes_special_frequent_rare(tok):
    pool = P.token_pool(tok)
    ids = set(pool.tolist())
    assert not ids & set(tok.all_special_ids)
    assert max(ids) < int(len(tok) * (1 - P.RARE_FRACTION))
    stream = tok("\n\n".join(P.natural_text()), add_special_tokens=False)["input_ids"]
    counts = torch.bincount(torch.tensor(stream), minlength=len(tok))
    assert not ids & set(counts.argsort(descending=True)[:P.N_FREQUENT].tolist())
    assert tok.convert_tokens_to_ids(" the") not in ids
    for i in pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:200]].tolist():
        assert any(c.isalnum() for c in tok.decode([i]))
    assert len(pool) > 0.5 * len(tok)


def test_text_windows(tok):
    w, repeated = P.text_windows(tok, seq_len=64, n=6, seed=3)
    assert w.shape == (6, 64) and not repeated
    assert (w[:, 0] == tok.bos_token_id).all() and (w[:, 1:] != tok.bos_token_id).all()
    assert torch.equal(w, P.text_windows(tok, seq_len=64, n=6, seed=3)[0])
    stream = tok("\n\n".join(P.natural_text()), add_special_tokens=False)["input_ids"]
    s = "," + ",".join(map(str, stream)) + ","
    assert all("," + ",".join(map(str, row[1:].tolist())) + "," in s for row in w)  # contiguous slices
    short, repeated = P.text_windows(tok, ["one two three"], seq_len=20, n=2, seed=0, bos=False)
    assert short.shape == (2, 20) and repeated


def test_load_prompts_formats(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("first prompt\nsecond prompt\n\n")
    assert P.load_prompts(lines) == ["first prompt", "second prompt"]
    paras = tmp_path / "paras.txt"
    paras.write_text("a paragraph\nthat wraps\n\nanother one\n")
    assert P.load_prompts(paras) == ["a paragraph that wraps", "another one"]
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "world", "id": 2}) + "\n")
    assert P.load_prompts(jl) == ["hello", "world"]


@pytest.mark.parametrize("name,content,match", [
    ("missing.txt", None, "does not exist"),
    ("empty.txt", "  \n\n ", "no prompts"),
    ("bad.jsonl", '{"text": "ok"}\nnot json\n', "line 2"),
    ("notext.jsonl", '{"body": "x"}\n', "\"text\""),
    ("binary.txt", b"\xff\xfe\x00bad", "UTF-8"),
    ("prompts.csv", "a,b\n", "extension"),
])
def test_load_prompts_errors(tmp_path, name, content, match):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=match) as info:
        P.load_prompts(path)
    assert isinstance(info.value, HeadscopeError)


def test_bad_shapes_raise(tok):
    with pytest.raises(InputError):
        P.repeated_random_tokens(tok, 2, 1)
    with pytest.raises(InputError):
        P.repeated_random_tokens(tok, 2, 5, repeats=1)
    with pytest.raises(InputError):
        P.text_windows(tok, seq_len=1)


def test_load_prompts_from_a_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["held out"]}),
                          "train": datasets.Dataset.from_dict({"text": [" first text ", "", "second"]})}
                         ).save_to_disk(str(tmp_path / "ds"))
    assert P.load_prompts(tmp_path / "ds") == ["first text", "second"]
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "other"))
    with pytest.raises(InputError, match="no column 'text'"):
        P.load_prompts(tmp_path / "other")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="save_to_disk"):
        P.load_prompts(tmp_path / "empty")
    # `headscope rank --prompts DIR` checks the folder the same way before any model work
    from headscope.apps.rank_options import check_prompt_file

    check_prompt_file(str(tmp_path / "ds"))
    with pytest.raises(InputError, match="save_to_disk"):
        check_prompt_file(str(tmp_path / "empty"))

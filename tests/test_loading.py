"""load_model: local directory, model object, embedded encoder, bad specs, damaged cache."""

import shutil

import pytest
import torch

from headscope.probe import ModelLoadError, load_model
from headscope.probe import loading


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                      intermediate_size=64, vocab_size=49152, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def test_local_directory_and_model_object(model, tmp_path):
    hf = _tiny_llama()
    hf.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    by_path = load_model(str(tmp_path))
    by_object = load_model(hf, tokenizer=model.tokenizer)
    for m in (by_path, by_object):
        assert (m.meta.n_layers, m.meta.n_heads, m.meta.n_kv_heads, m.meta.head_dim) == (2, 4, 2, 8)
        assert m.meta.max_positions == 128 and m.meta.causal
    assert by_path.tokenizer is not None and by_path.meta.name == str(tmp_path)
    batch = by_path.tokenize("hello world")
    with torch.no_grad():
        assert torch.equal(by_path(**batch).logits, hf(**batch).logits)


def test_embedded_encoder():
    enc = load_model("all-minilm-l6-v2")
    m = enc.meta
    assert (m.n_layers, m.n_heads, m.head_dim, m.causal, m.architecture) == (6, 12, 32, False, "BertModel")
    assert enc.tokenizer("hi")["input_ids"][0] == enc.tokenizer.cls_token_id


def test_unknown_specs(tmp_path, monkeypatch):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(missing))
    with pytest.raises(ModelLoadError, match="unknown model spec"):
        load_model(42)
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"(?s)hub id 'someone/not-a-model'.*pass its local directory"):
        load_model("someone/not-a-model")


def test_damaged_cache_is_reconverted(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_CACHE", str(tmp_path))
    src = next(p for p in (model.hf.name_or_path,) if p)
    cache = loading.embedded_cache_dir()
    shutil.copytree(src, cache)
    ids = torch.tensor([[1, 504, 2296, 253, 1345]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits

    # a truncated weights file: the manifest's sizes disagree -> converted again from the GGUF
    weights = cache / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 3)
    reloaded = load_model()
    assert weights.stat().st_size > 1_000_000
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, ref)

    # a missing manifest (an interrupted write) also triggers conversion; stand in for the 20 s
    # conversion with a copy of the good cache so this part stays fast
    (cache / loading._MANIFEST).unlink()
    calls = []

    def fake_convert(gguf_dir, dst, source):
        calls.append(dst)
        shutil.rmtree(dst)
        shutil.copytree(src, dst)

    monkeypatch.setattr(loading, "_convert_embedded", fake_convert)
    again = load_model()
    assert calls == [cache] and (cache / loading._MANIFEST).exists()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, ref)
